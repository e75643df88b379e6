'use strict';
// TLS with client certificates (mTLS): a REAL `featureviz serve --tls-cert --tls-key --tls-client-ca` with
// certificates made by openssl for this test, reached by the client and by featureviz-node.

const assert = require('node:assert/strict');
const { execFileSync, execFile } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { after, before, describe, it } = require('node:test');

const { Client } = require('../../clients/node/src');
const { startServer, tempDir } = require('./support');

const CLI = path.join(__dirname, '..', '..', 'clients', 'node', 'src', 'cli.js');

function hasOpenssl() {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A CA, and a server and a client certificate it signed, valid for 127.0.0.1 and localhost. */
function makeCertificates(dir) {
  const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '1',
    '-subj', '/CN=featureviz test CA');
  for (const name of ['server', 'client']) {
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`,
      '-subj', `/CN=${name}`, '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost');
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
      '-out', `${name}.pem`, '-days', '1', '-copy_extensions', 'copy');
  }
  const file = (name) => path.join(dir, name);
  return { ca: file('ca.pem'), cert: file('client.pem'), key: file('client.key'), serverCert: file('server.pem'),
    serverKey: file('server.key') };
}

async function codeOf(promise) {
  try {
    await promise;
  } catch (err) {
    return err.codeName;
  }
  return 'OK';
}

describe('TLS with client certificates against a real server', { skip: !hasOpenssl() && 'openssl is not installed' },
  () => {
    let server;
    let certs;
    let dir;
    const clients = [];
    const client = (options) => {
      const fv = new Client(server.address, { timeoutMs: 30_000, ...options });
      clients.push(fv);
      return fv;
    };

    before(async () => {
      dir = tempDir('certs');
      certs = makeCertificates(dir);
      server = await startServer({ args: ['--tls-cert', certs.serverCert, '--tls-key', certs.serverKey,
        '--tls-client-ca', certs.ca] });
    }, { timeout: 180_000 });

    after(async () => {
      for (const fv of clients) fv.close();
      if (server) await server.stop();
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });

    it('connects with the CA and a client certificate, as files or bytes', async () => {
      const info = await client({ rootCerts: certs.ca, clientCert: certs.cert, clientKey: certs.key }).serverInfo();
      assert.equal(info.apiVersion, 'v1');
      const bytes = { rootCerts: fs.readFileSync(certs.ca), clientCert: fs.readFileSync(certs.cert),
        clientKey: fs.readFileSync(certs.key) };
      assert.equal((await client(bytes).serverInfo()).apiVersion, 'v1');
    });

    it('fails to connect without a client certificate, or in plaintext', async () => {
      assert.equal(await codeOf(client({ rootCerts: certs.ca }).serverInfo()), 'UNAVAILABLE');
      assert.equal(await codeOf(client({ insecure: true }).serverInfo()), 'UNAVAILABLE');
    });

    it('refuses contradictory or half-given TLS options before connecting', () => {
      assert.throws(() => client({ insecure: true, rootCerts: certs.ca }), /insecure/);
      assert.throws(() => client({ clientCert: certs.cert }), /clientKey/);
    });

    it('featureviz-node connects with --tls-ca, --client-cert and --client-key', async () => {
      const run = (args) => new Promise((resolve) => {
        execFile(process.execPath, [CLI, '--server', server.address, ...args, 'info'], { timeout: 60_000 },
          (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout, stderr }));
      });
      const ok = await run(['--tls-ca', certs.ca, '--client-cert', certs.cert, '--client-key', certs.key]);
      assert.equal(ok.code, 0, ok.stderr);
      assert.match(ok.stdout, /api v1/);
      const noCert = await run(['--tls-ca', certs.ca]);
      assert.equal(noCert.code, 1);
      assert.match(noCert.stderr, /UNAVAILABLE/);
    });
  });

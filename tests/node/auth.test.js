'use strict';
// Bearer tokens: the client sends `authorization: Bearer <token>` on unary and streaming calls; the server
// (FEATUREVIZ_TOKENS) maps the token to a tenant and refuses calls without a known one.

const assert = require('node:assert/strict');
const { after, before, describe, it } = require('node:test');

const { Client } = require('../../clients/node/src');
const { startServer } = require('./support');

async function codeOf(promise) {
  try {
    await promise;
  } catch (err) {
    return err.codeName;
  }
  return 'OK';
}

async function drain(iterator) {
  for await (const event of iterator) void event;
}

describe('bearer-token auth against a real server', () => {
  let server;
  const clients = [];
  const client = (options) => {
    const fv = new Client(server.address, { timeoutMs: 60_000, ...options });
    clients.push(fv);
    return fv;
  };

  before(async () => {
    server = await startServer({ env: { FEATUREVIZ_TOKENS: 'tok-alice=alice,tok-bob=bob' } });
  }, { timeout: 180_000 });

  after(async () => {
    for (const fv of clients) fv.close();
    if (server) await server.stop();
  });

  it('maps each token to its tenant', async () => {
    const alice = await client({ token: 'tok-alice' }).serverInfo();
    assert.equal(alice.authRequired, true);
    assert.equal(alice.tenant, 'alice');
    assert.equal((await client({ token: 'tok-bob' }).serverInfo()).tenant, 'bob');
  });

  it('refuses calls without a token or with an unknown one', async () => {
    for (const fv of [client({}), client({ token: 'tok-mallory' })]) {
      assert.equal(await codeOf(fv.serverInfo()), 'UNAUTHENTICATED');
      assert.equal(await codeOf(fv.getModel('0'.repeat(64))), 'UNAUTHENTICATED');
      assert.equal(await codeOf(drain(fv.watchJob('some-job'))), 'UNAUTHENTICATED');
      assert.equal(await codeOf(fv.uploadModel(Buffer.from('onnx?'))), 'UNAUTHENTICATED');
    }
  });

  it('sends the token on streaming and client-streaming calls too', async () => {
    const fv = client({ token: 'tok-alice' });
    assert.equal(await codeOf(drain(fv.watchJob('some-job'))), 'NOT_FOUND');
    const models = [];
    for await (const model of fv.listModels()) models.push(model);
    assert.deepEqual(models, []);
    // client-streaming: the upload reaches the importer, which rejects the bytes
    assert.equal(await codeOf(fv.uploadModel(Buffer.from('not an onnx file'))), 'INVALID_ARGUMENT');
  });
});

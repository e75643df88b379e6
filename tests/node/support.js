'use strict';
/**
 * Fixtures of the Node client tests: a REAL `featureviz serve` subprocess on 127.0.0.1:0 with a temporary
 * store, and a real ONNX export made by torch.onnx.export in the repository's Python environment.
 *
 * Executables: $FEATUREVIZ_BIN (the `featureviz` command) and $FEATUREVIZ_PYTHON, else the repository's
 * .venv/bin, else PATH. tests/service/test_service_node_client.py sets both to its own environment.
 */

const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..');
const VENV_BIN = path.join(REPO, '.venv', 'bin');
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const START_TIMEOUT_MS = 120_000; // the server imports torch before it listens
const LISTENING = /listening on (\S+):(\d+)/;

function executable(envName, name) {
  if (process.env[envName]) return process.env[envName];
  const local = path.join(VENV_BIN, name);
  return fs.existsSync(local) ? local : name;
}

const FEATUREVIZ = executable('FEATUREVIZ_BIN', 'featureviz');
const PYTHON = executable('FEATUREVIZ_PYTHON', 'python');

function tempDir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), `featureviz-node-${prefix}-`));
}

/**
 * Start `featureviz serve` (on `port`, default 0: a free one) and resolve once it reports the port it bound.
 * The store is `store` when given (kept on stop, for restarts), else a temporary folder removed on stop.
 * @returns {Promise<{address: string, port: number, store: string, log: () => string, stop: () => Promise<void>}>}
 */
function startServer({ env = {}, args = [], store: given, port: wanted = 0 } = {}) {
  const store = given || tempDir('store');
  const child = spawn(FEATUREVIZ, ['serve', '--host', '127.0.0.1', '--port', String(wanted), '--store', store,
    '--heartbeat', '0.5', '--grace', '2', ...args], {
    env: { ...process.env, FEATUREVIZ_CACHE: path.join(store, 'cache'), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const log = () => output;
  const orphan = () => child.kill('SIGKILL'); // the test process ends (a crash, a timeout): take the server along
  process.once('exit', orphan);
  child.once('exit', () => process.removeListener('exit', orphan));
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await exited;
      clearTimeout(timer);
    }
    if (!given) fs.rmSync(store, { recursive: true, force: true });
  };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      const err = new Error(`featureviz serve did not report a port within ${START_TIMEOUT_MS} ms:\n${output}`);
      stop().finally(() => reject(err));
    }, START_TIMEOUT_MS);
    const onData = (data) => {
      output += data.toString();
      const match = LISTENING.exec(output);
      if (match) {
        clearTimeout(timer);
        const port = Number(match[2]);
        resolve({ address: `127.0.0.1:${port}`, port, store, log, stop });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${FEATUREVIZ}: ${err.message}`));
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`featureviz serve exited (${code ?? signal}) before listening:\n${output}`));
    });
  });
}

// TinyNet of tests/support/models.py (the Python tests' network): conv-relu-conv-relu-pool-linear, 10 classes
const EXPORT_SCRIPT = `
import sys
import torch

sys.path.insert(0, sys.argv[1])
from support.models import TinyNet, export_onnx

for seed, path in enumerate(sys.argv[2:]):
    torch.manual_seed(seed)
    with open(path, "wb") as out:
        out.write(export_onnx(TinyNet()))
`;

/** Export `count` TinyNets (weights from seeds 0, 1, ...: other bytes each) into `dir`; resolves to their paths. */
function exportTinyOnnx(dir, count = 1) {
  const files = Array.from({ length: count }, (_, seed) => path.join(dir, `tiny-${seed}.onnx`));
  return new Promise((resolve, reject) => {
    execFile(PYTHON, ['-W', 'ignore', '-c', EXPORT_SCRIPT, path.join(REPO, 'tests'), ...files], { timeout: 180_000 },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`torch.onnx.export failed: ${err.message}\n${stderr}`));
        else resolve(files);
      });
  });
}

/** Run a Python snippet in the repository's environment and return its stdout. */
function python(code, args = []) {
  return new Promise((resolve, reject) => {
    execFile(PYTHON, ['-c', code, ...args], { timeout: 120_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`python failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

module.exports = { startServer, exportTinyOnnx, python, tempDir, PNG_SIGNATURE, REPO, FEATUREVIZ, PYTHON };

'use strict';
// A job with a judge through the Node client and featureviz-node: another uploaded classifier ranks the class of
// each image. Its own server (a real `featureviz serve` on a free port).

const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { after, before, describe, it } = require('node:test');

const { Client, toJobSpec } = require('../../clients/node/src');
const { exportTinyOnnx, startServer, tempDir } = require('./support');

const CLI = path.join(__dirname, '..', '..', 'clients', 'node', 'src', 'cli.js');
const TIMEOUT = { timeout: 180_000 };

describe('judge', () => {
  let server;
  let fv;
  let work;
  let store;
  let files;

  before(async () => {
    work = tempDir('judge-work');
    store = tempDir('judge-store');
    [server, files] = await Promise.all([startServer({ store }), exportTinyOnnx(work, 2)]);
    fv = new Client(server.address, { timeoutMs: 120_000 });
  }, TIMEOUT);

  after(async () => {
    if (fv) fv.close();
    if (server) await server.stop();
    for (const dir of [work, store]) if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('accepts a Model, a sha256 or {model, preprocess} as the judge', () => {
    const sha = 'a'.repeat(64);
    const objective = { logit: { index: 1 } };
    assert.deepEqual(toJobSpec({ model: sha, objective, judge: sha }).judge, { model: sha });
    assert.deepEqual(toJobSpec({ model: sha, objective, judge: { sha256: sha } }).judge, { model: sha });
    const pre = { mean: [0.5], std: [0.25] };
    assert.deepEqual(toJobSpec({ model: sha, objective, judge: { model: sha, preprocess: pre } }).judge,
      { model: sha, preprocess: pre });
    assert.equal(toJobSpec({ model: sha, objective, param: 'laplacian' }).param, 'PARAMETERIZATION_LAPLACIAN');
  });

  it('reports the judge\'s rank and probability of each image\'s class', TIMEOUT, async () => {
    const model = await fv.uploadModel(files[0]);
    const judge = await fv.uploadModel(files[1]);
    const job = await fv.createJob({ model, objective: { logit: { index: 3 } }, steps: 2, size: 32, batch: 2, judge });
    assert.equal(job.spec.judge.model, judge.sha256);
    const done = await fv.waitJob(job);
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED');
    for (const image of done.result.images) {
      assert.equal(image.judge.target, 3);
      assert.ok(image.judge.rank >= 1 && image.judge.rank <= 10, String(image.judge.rank));
      assert.ok(image.judge.probability >= 0 && image.judge.probability <= 1);
      assert.equal(image.judge.topClasses.length, 5);
    }
  });

  it('featureviz-node render logit:K --judge prints the verdicts', TIMEOUT, async () => {
    const out = path.join(work, 'out');
    const { code, stdout, stderr } = await new Promise((resolve) => {
      execFile(process.execPath, [CLI, '--server', server.address, 'render', files[0], 'logit:2', '--steps', '1',
        '--size', '32', '--judge', files[1], '--out', out], { timeout: 120_000 },
      (err, so, se) => resolve({ code: err ? err.code : 0, stdout: so, stderr: se }));
    });
    assert.equal(code, 0, stderr);
    assert.match(stderr, /image 0: judge rank \d+ of class 2, p \d\.\d{3}/);
    assert.equal(stdout.trim(), path.join(out, 'logit_2_0.png'));
  });
});

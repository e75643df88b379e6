'use strict';
// The learning-rate schedule and the early stop at a plateau through the Node client and featureviz-node, against
// its own real `featureviz serve` on a free port.

const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { after, before, describe, it } = require('node:test');

const { Client, toJobSpec } = require('../../clients/node/src');
const { exportTinyOnnx, startServer, tempDir } = require('./support');

const CLI = path.join(__dirname, '..', '..', 'clients', 'node', 'src', 'cli.js');
const TIMEOUT = { timeout: 180_000 };

function runCli(args) {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 120_000 },
      (err, so, se) => resolve({ code: err ? err.code : 0, stdout: so, stderr: se }));
  });
}

describe('schedule', () => {
  let server;
  let fv;
  let work;
  let files;

  before(async () => {
    work = tempDir('schedule-work');
    [server, files] = await Promise.all([startServer(), exportTinyOnnx(work, 1)]);
    fv = new Client(server.address, { timeoutMs: 120_000 });
  }, TIMEOUT);

  after(async () => {
    if (fv) fv.close();
    if (server) await server.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('maps the schedule names to the proto enum and refuses unknown ones', () => {
    const sha = 'a'.repeat(64);
    const objective = { logit: { index: 1 } };
    assert.equal(toJobSpec({ model: sha, objective, lrSchedule: 'cosine' }).lrSchedule, 'LR_SCHEDULE_COSINE');
    assert.equal(toJobSpec({ model: sha, objective, lrSchedule: 'LR_SCHEDULE_LINEAR' }).lrSchedule,
      'LR_SCHEDULE_LINEAR');
    assert.throws(() => toJobSpec({ model: sha, objective, lrSchedule: 'exponential' }),
      (err) => err.codeName === 'INVALID_ARGUMENT' && /spec\.lrSchedule/.test(err.message));
  });

  it('a saturating job stops at its plateau and says after which step', TIMEOUT, async () => {
    const model = await fv.uploadModel(files[0]);
    const job = await fv.createJob({ model, objective: { l1: { constant: 0.5 } }, steps: 2000, lr: 0.5, size: 16,
      param: 'pixel', transforms: 'none', lrSchedule: 'cosine', plateau: 0.01, plateauWindow: 8 });
    assert.equal(job.spec.lrSchedule, 'LR_SCHEDULE_COSINE');
    assert.equal(job.spec.plateauWindow, 8);
    const done = await fv.waitJob(job);
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED');
    assert.ok(done.result.stoppedAt >= 16 && done.result.stoppedAt < 2000, String(done.result.stoppedAt));
    assert.equal(done.result.stepsDone, done.result.stoppedAt);
  });

  it('featureviz-node render passes --schedule, --warmup, the plateau options and --transforms; bad ones are refused',
    TIMEOUT,
    async () => {
      const out = path.join(work, 'out');
      const ok = await runCli(['--server', server.address, 'render', files[0], 'logit:2', '--steps', '3',
        '--size', '16', '--schedule', 'linear', '--warmup', '1', '--stop-at-plateau', '0.001',
        '--plateau-window', '40', '--transforms', 'composed', '--out', out]);
      assert.equal(ok.code, 0, ok.stderr);
      const id = /job (\S+):/.exec(ok.stderr)[1];
      const job = await fv.getJob(id);
      assert.equal(job.spec.lrSchedule, 'LR_SCHEDULE_LINEAR');
      assert.equal(job.spec.lrWarmup, 1);
      assert.equal(job.spec.plateau, 0.001);
      assert.equal(job.spec.plateauWindow, 40);
      assert.equal(job.spec.transforms, 'TRANSFORMS_COMPOSED');
      const bad = await runCli(['--server', server.address, 'render', files[0], 'logit:2', '--steps', '3',
        '--stop-at-plateau', '1.5']);
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, /INVALID_ARGUMENT/);
      assert.match(bad.stderr, /spec\.plateau/);
      const usage = await runCli(['--server', server.address, 'render', files[0], 'logit:2', '--stop-at-plateau',
        'soon']);
      assert.equal(usage.code, 2);
      assert.match(usage.stderr, /--stop-at-plateau expects a number/);
    });
});

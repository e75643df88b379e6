'use strict';
// The Node client and the featureviz-node CLI against a REAL `featureviz serve` on a free port, with bearer
// tokens on. One server for the whole file (it imports torch: ~10 s to start); the restart test stops it and
// starts it again on the same port and store.

const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { after, before, describe, it } = require('node:test');

const { Client, FeaturevizError } = require('../../clients/node/src');
const { PNG_SIGNATURE, exportTinyOnnx, startServer, tempDir } = require('./support');

const CLI = path.join(__dirname, '..', '..', 'clients', 'node', 'src', 'cli.js');
const TIMEOUT = { timeout: 180_000 };

async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('expected the call to fail');
}

function runCli(args, env = {}) {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, timeout: 120_000 },
      (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout, stderr }));
  });
}

const TOKENS = 'tok-alice=alice,tok-bob=bob,tok-viewer=alice read';

async function codeOf(promise) {
  try {
    await promise;
  } catch (err) {
    return err.codeName;
  }
  return 'OK';
}

/**
 * A TCP proxy on loopback in front of `upstream`, for broken connections: cut() closes every connection it
 * carries, refuse(n) closes the next n as soon as they are accepted (before a byte reaches the server).
 */
async function tcpProxy(upstream) {
  const colon = upstream.lastIndexOf(':');
  const [host, port] = [upstream.slice(0, colon), Number(upstream.slice(colon + 1))];
  const open = new Set();
  const state = { accepted: 0, refusing: 0 };
  const listener = net.createServer((client) => {
    state.accepted += 1;
    if (state.refusing > 0) {
      state.refusing -= 1;
      client.destroy();
      return;
    }
    const server = net.connect(port, host);
    const drop = () => {
      for (const socket of [client, server]) {
        socket.destroy();
        open.delete(socket);
      }
    };
    for (const socket of [client, server]) {
      open.add(socket);
      socket.on('error', drop);
      socket.on('close', drop);
    }
    client.pipe(server);
    server.pipe(client);
  });
  await new Promise((resolve) => listener.listen(0, '127.0.0.1', resolve));
  return {
    address: `127.0.0.1:${listener.address().port}`,
    get accepted() { return state.accepted; },
    refuse(n = 1) { state.refusing = n; },
    cut() { for (const socket of [...open]) socket.destroy(); },
    close() { this.cut(); listener.close(); },
  };
}

async function drain(iterator) {
  const events = [];
  for await (const event of iterator) events.push(event);
  return events;
}

describe('featureviz Node client against a real server', () => {
  let server;
  let fv;
  let work;
  let store;
  const clients = [];
  const client = (options) => {
    const other = new Client(server.address, { timeoutMs: 60_000, ...options });
    clients.push(other);
    return other;
  };
  let onnxPath;
  let otherPath;
  let model;
  let spatialLayer;

  before(async () => {
    work = tempDir('work');
    store = tempDir('store');
    const env = { FEATUREVIZ_TOKENS: TOKENS };
    [server, [onnxPath, otherPath]] = await Promise.all([startServer({ store, env }), exportTinyOnnx(work, 2)]);
    fv = new Client(server.address, { token: 'tok-alice', timeoutMs: 120_000 });
  }, TIMEOUT);

  after(async () => {
    for (const other of [fv, ...clients]) if (other) other.close();
    if (server) await server.stop();
    for (const dir of [work, store]) if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('reports the server info and its limits', async () => {
    const info = await fv.serverInfo();
    assert.equal(info.apiVersion, 'v1');
    assert.equal(info.authRequired, true);
    assert.equal(info.tenant, 'alice');
    assert.ok(info.limits.maxChunkBytes > 0);
    assert.ok(info.objectiveKinds.includes('channel'), info.objectiveKinds.join(','));
    assert.deepEqual(info.workers.map((w) => w.id), ['local']); // ServerInfo lists the workers
    assert.ok(info.workers[0].pid > 0 && info.workers[0].up, JSON.stringify(info.workers[0]));
  });

  it('uploads a real ONNX export in several chunks and imports it', TIMEOUT, async () => {
    const bytes = fs.readFileSync(onnxPath);
    const sha256 = crypto.createHash('sha256').update(bytes).digest('hex');
    model = await fv.uploadModel(onnxPath, { chunkSize: 1024 }); // ~7 KiB: 8 chunks
    assert.ok(bytes.length > 4 * 1024, `the export is only ${bytes.length} bytes`);
    assert.equal(model.sha256, sha256);
    assert.equal(model.name, `models/${sha256}`);
    assert.equal(model.sizeBytes, bytes.length);
    assert.equal(model.displayName, path.basename(onnxPath));
    assert.equal(model.state, 'MODEL_STATE_READY');
    assert.equal(model.deduplicated, false);
    assert.equal(model.inputSpec.channels, 3);
    assert.equal(model.layerCount, 6); // conv, relu, conv, relu, mean, gemm
    assert.equal(model.check.passed, true);
  });

  it('recognises the same bytes and sends nothing twice', async () => {
    const again = await fv.uploadModel(fs.readFileSync(onnxPath), { name: 'again.onnx' });
    assert.equal(again.sha256, model.sha256);
    assert.equal(again.deduplicated, true);
    const status = await fv.getUpload(model.sha256, model.sizeBytes);
    assert.equal(status.modelExists, true);
    const got = await fv.getModel(`models/${model.sha256}`);
    assert.equal(got.layerCount, model.layerCount);
    const listed = [];
    for await (const m of fv.listModels({ pageSize: 1 })) listed.push(m.sha256);
    assert.deepEqual(listed, [model.sha256]);
  });

  it('lists the layer catalog across pages, in topological order', async () => {
    const layers = [];
    for await (const layer of fv.listLayers(model, { pageSize: 2 })) layers.push(layer);
    assert.equal(layers.length, model.layerCount);
    assert.deepEqual(layers.map((l) => l.depth), [...layers.map((l) => l.depth)].sort((a, b) => a - b));
    assert.equal(layers[0].opType, 'Conv');
    assert.equal(layers[0].channels, 8);
    assert.equal(layers.at(-1).isLogits, true);
    const page = await fv.listLayersPage(model, { spatialOnly: true, pageSize: 1 });
    assert.equal(page.layers.length, 1);
    assert.equal(page.totalSize, 4); // two convs, two relus
    assert.notEqual(page.nextPageToken, '');
    const convs = [];
    for await (const layer of fv.listLayers(model, { filter: 'conv' })) convs.push(layer.name);
    assert.equal(convs.length, 2, convs.join(','));
    spatialLayer = layers.find((l) => l.spatial && l.opType === 'Conv' && l.channels === 16).name;
  });

  it('rejects corrupt bytes with INVALID_ARGUMENT and keeps nothing', TIMEOUT, async () => {
    const corrupt = Buffer.concat([fs.readFileSync(onnxPath).subarray(0, 2000), Buffer.from('not the rest')]);
    const err = await rejection(fv.uploadModel(corrupt, { name: 'corrupt.onnx' }));
    assert.ok(err instanceof FeaturevizError, String(err));
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    assert.equal(err.code, 3);
    assert.equal(err.details.domain, 'featureviz');
    assert.ok(err.reason, 'the server names a reason');
    const sha = crypto.createHash('sha256').update(corrupt).digest('hex');
    const status = await fv.getUpload(sha, corrupt.length);
    assert.equal(status.modelExists, false);
    assert.equal(status.committedBytes, 0);
  });

  it('stops sending when the server refuses an upload mid-stream', async () => {
    const info = await fv.serverInfo();
    const limit = info.limits.maxChunkBytes;
    const bytes = crypto.randomBytes(6 * limit); // chunks of twice the limit: the first one is refused
    const err = await rejection(fv.uploadModel(bytes, { chunkSize: 2 * limit }));
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    assert.equal(err.details.field, 'chunk.data');
    assert.match(err.message, new RegExp(`at most ${limit} bytes`));
  });

  it('resumes an interrupted upload from the bytes the server holds', TIMEOUT, async () => {
    const other = fs.readFileSync(otherPath); // other weights: other bytes
    const sha256 = crypto.createHash('sha256').update(other).digest('hex');
    const header = { sha256, sizeBytes: other.length, displayName: 'other.onnx' };
    // the first attempt breaks after one chunk: the stream ends short of size_bytes without finish_write
    const broken = (async function* () {
      yield { writeOffset: 0, data: other.subarray(0, 1000), finishWrite: false };
    })();
    const err = await rejection(fv._upload(header, broken));
    assert.equal(err.codeName, 'FAILED_PRECONDITION');
    assert.equal(err.reason, 'UPLOAD_INCOMPLETE');
    assert.equal((await fv.getUpload(sha256, other.length)).committedBytes, 1000);
    // a restart from 0 would be refused (write_offset 0, the server holds 1000): success means it resumed
    const resumed = await fv.uploadModel(other, { name: 'other.onnx', chunkSize: 1000 });
    assert.equal(resumed.sha256, sha256);
    assert.equal(resumed.state, 'MODEL_STATE_READY');
    assert.equal(resumed.deduplicated, false);
    assert.deepEqual(await fv.getUpload(sha256, other.length), { sha256, committedBytes: other.length,
      modelExists: true });
    await fv.deleteModel(resumed);
  });

  it('names the bad JobSpec field before any compute', async () => {
    const err = await rejection(fv.createJob({ model, objective: { channel: { layer: spatialLayer, channel: 99 } },
      steps: 2, size: 32 }));
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    assert.equal(err.details.field, 'spec.objective.channel.channel');
    assert.match(err.message, /99/);
    const local = await rejection(fv.createJob({ model, objective: { channel: { layer: spatialLayer, channel: 0 } },
      param: 'wavelet' }));
    assert.equal(local.codeName, 'INVALID_ARGUMENT');
    assert.equal(local.details.field, 'spec.param');
  });

  it('answers NOT_FOUND for unknown jobs and models', async () => {
    assert.equal((await rejection(fv.getJob('no-such-job'))).codeName, 'NOT_FOUND');
    assert.equal((await rejection(fv.getModel('0'.repeat(64)))).codeName, 'NOT_FOUND');
  });

  it('runs a short job and streams progress and PNG results', TIMEOUT, async () => {
    const job = await fv.createJob({
      model, objective: { sum: [{ channel: { layer: spatialLayer, channel: 3 } }, { scale: { factor: -0.01,
        objective: { tv: {} } } }] },
      steps: 6, size: [32, 40], batch: 2, seed: 7, param: 'fft', previewEvery: 3, previewMaxSide: 20,
    }, { requestId: 'node-short-job' });
    // the worker may pick the job up, or even finish its 6 short steps, before createJob reads it back
    assert.ok(['JOB_STATE_QUEUED', 'JOB_STATE_RUNNING', 'JOB_STATE_SUCCEEDED'].includes(job.state), job.state);
    const events = [];
    for await (const event of fv.watchJob(job, { includePreviews: true })) events.push(event);
    assert.equal(events[0].event, 'snapshot');
    const previews = events.filter((e) => e.event === 'preview').map((e) => e.preview);
    assert.deepEqual(previews.map((p) => p.step), [3, 6]);
    for (const image of previews.flatMap((p) => p.images)) {
      assert.ok(image.png.subarray(0, 8).equals(PNG_SIGNATURE), 'preview PNG signature');
      assert.deepEqual([image.png.readUInt32BE(16), image.png.readUInt32BE(20)], [20, 16]); // 40x32 -> 20x16
    }
    const result = events.at(-1);
    assert.equal(result.event, 'result');
    const steps = events.filter((e) => e.event === 'progress').map((e) => e.progress.step);
    assert.ok(steps.length > 0 && steps.every((step, i) => i === 0 || step > steps[i - 1]), steps.join(','));
    assert.equal(steps.at(-1), 6);
    const seqs = events.slice(1).map((e) => e.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    const done = result.result;
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED', JSON.stringify(done.error));
    assert.equal(done.worker, 'local'); // the embedded worker ran it (serve --ray: ray-N)
    assert.equal(done.result.stepsDone, 6);
    assert.equal(done.result.images.length, 2);
    for (const image of done.result.images) {
      assert.ok(image.png.subarray(0, 8).equals(PNG_SIGNATURE), 'PNG signature');
      assert.equal(image.png.readUInt32BE(16), 40); // IHDR width
      assert.equal(image.png.readUInt32BE(20), 32); // IHDR height
      assert.deepEqual([image.width, image.height], [40, 32]);
    }
    // the same request id is the same job; re-attaching after the end replays only what follows fromSeq
    const same = await fv.createJob({ model, objective: { sum: [{ channel: { layer: spatialLayer, channel: 3 } },
      { scale: { factor: -0.01, objective: { tv: {} } } }] }, steps: 6 }, { requestId: 'node-short-job' });
    assert.equal(same.id, job.id);
    const from = seqs.at(-3);
    const replay = [];
    for await (const event of fv.watchJob(job.id, { fromSeq: from })) replay.push(event);
    assert.equal(replay[0].event, 'snapshot');
    assert.ok(replay.slice(1).every((e) => e.seq > from), JSON.stringify(replay.map((e) => e.seq)));
    assert.ok(replay.every((e) => e.event !== 'preview'), 'previews only when asked');
    assert.equal(replay.at(-1).event, 'result');
    const fetched = await fv.getJob(`jobs/${job.id}`);
    assert.ok(fetched.result.images[0].png.equals(done.result.images[0].png));
  });

  it('leaving a watch early stops the stream, not the job', TIMEOUT, async () => {
    const job = await fv.createJob({ model, objective: { layer: { layer: spatialLayer } }, steps: 12, size: 32 });
    for await (const event of fv.watchJob(job)) {
      if (event.event === 'progress') break;
    }
    const done = await fv.waitJob(job);
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED');
    assert.equal(done.step, 12);
  });

  it('creates and watches a job in one call, re-attached across broken connections: one job, every event once',
    TIMEOUT, async () => {
      const proxy = await tcpProxy(server.address);
      const through = client({ token: 'tok-alice' });
      const other = new Client(proxy.address, { token: 'tok-alice', timeoutMs: 120_000 });
      try {
        const before = (await drain(through.listJobs())).length;
        proxy.refuse(1); // the first call never reaches the server: it is sent again with its request id
        const events = [];
        let cut = false;
        const spec = { model, objective: { channel: { layer: spatialLayer, channel: 2 } }, steps: 150, size: 48 };
        for await (const event of other.createAndWatchJob(spec)) {
          events.push(event);
          if (!cut && event.event === 'state' && event.state === 'JOB_STATE_RUNNING') {
            cut = true; // the job has 150 steps to go: its result cannot be in flight yet
            proxy.cut();
          }
        }
        assert.ok(cut && proxy.accepted >= 3, `accepted ${proxy.accepted}`); // refused, the first, the re-attached
        const snapshots = events.filter((e) => e.event === 'snapshot');
        assert.equal(snapshots.length, 2);
        assert.equal(snapshots[1].snapshot.id, snapshots[0].snapshot.id);
        const logged = events.filter((e) => e.event !== 'snapshot' && e.event !== 'heartbeat');
        assert.deepEqual(logged.map((e) => e.seq), logged.map((_, i) => i + 1)); // nothing lost or repeated
        assert.equal(logged.at(-1).event, 'result');
        assert.equal(logged.at(-1).result.state, 'JOB_STATE_SUCCEEDED');
        assert.equal(logged.at(-1).result.id, snapshots[0].snapshot.id);
        // runJob: one call, the finished job; the same request id again is the same job
        const done = await other.runJob({ ...spec, steps: 3, size: 32 }, { requestId: 'node-run-once' });
        assert.equal(done.state, 'JOB_STATE_SUCCEEDED');
        assert.ok(done.result.images[0].png.subarray(0, 8).equals(PNG_SIGNATURE));
        const again = await other.runJob({ ...spec, steps: 3, size: 32 }, { requestId: 'node-run-once' });
        assert.equal(again.id, done.id);
        assert.equal((await drain(through.listJobs())).length, before + 2);
      } finally {
        other.close();
        proxy.close();
      }
    });

  it('cancels a running job and keeps its partial image', TIMEOUT, async () => {
    const info = await fv.serverInfo();
    const job = await fv.createJob({ model, objective: { channel: { layer: spatialLayer, channel: 1 } },
      steps: info.limits.maxSteps, size: 32 });
    let cancelled = null;
    for await (const event of fv.watchJob(job)) {
      if (event.event === 'progress' && !cancelled) cancelled = await fv.cancelJob(job);
      if (event.event === 'result') {
        assert.equal(event.result.state, 'JOB_STATE_CANCELLED');
        assert.ok(event.result.step < info.limits.maxSteps, `stopped at step ${event.result.step}`);
      }
    }
    assert.ok(cancelled, 'saw progress before the end');
    const final = await fv.getJob(job);
    assert.equal(final.state, 'JOB_STATE_CANCELLED');
    assert.ok(final.result.images.length === 0 || final.result.images[0].png.subarray(0, 8).equals(PNG_SIGNATURE));
    const cancelledJobs = [];
    for await (const j of fv.listJobs({ state: 'JOB_STATE_CANCELLED' })) cancelledJobs.push(j.id);
    assert.deepEqual(cancelledJobs, [job.id]);
  });

  it('featureviz-node uploads, lists layers and renders PNG files', TIMEOUT, async () => {
    const env = { FEATUREVIZ_SERVER: server.address, FEATUREVIZ_TOKEN: 'tok-alice' };
    const upload = await runCli(['upload', onnxPath], env);
    assert.equal(upload.code, 0, upload.stderr);
    assert.equal(upload.stdout.trim(), model.sha256);
    const layers = await runCli(['layers', model.sha256, '--spatial'], env);
    assert.equal(layers.code, 0, layers.stderr);
    assert.equal(layers.stdout.trim().split('\n').length, 4);
    assert.match(layers.stdout, new RegExp(`^${spatialLayer.replace(/[/.]/g, '\\$&')}\\tConv\\t`, 'm'));
    const out = path.join(work, 'renders');
    const render = await runCli(['render', model.sha256, `${spatialLayer}:5`, '--steps', '3', '--size', '24',
      '--exclusive', '--out', out], env);
    assert.equal(render.code, 0, render.stderr);
    const [newest] = await drain(fv.listJobs());
    assert.equal(newest.spec.exclusive, true, '--exclusive reached the job spec');
    assert.match(render.stderr, /: -?\d+\.\d+ -> -?\d+\.\d+ \(3 steps, /);
    const files = render.stdout.trim().split('\n');
    assert.equal(files.length, 1);
    const png = fs.readFileSync(files[0]);
    assert.ok(png.subarray(0, 8).equals(PNG_SIGNATURE));
    assert.equal(png.readUInt32BE(16), 24);
    const bad = await runCli(['render', model.sha256, `${spatialLayer}:500`, '--steps', '3'], env);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /INVALID_ARGUMENT.*500/);
    const usage = await runCli(['render', model.sha256, 'no-channel'], env);
    assert.equal(usage.code, 2);
  });

  it('maps each bearer token to its tenant, whose models are its own', async () => {
    const bob = client({ token: 'tok-bob' });
    assert.equal((await bob.serverInfo()).tenant, 'bob');
    assert.equal(await codeOf(bob.getModel(model)), 'NOT_FOUND');
    assert.deepEqual(await drain(bob.listModels()), []);
  });

  it('lets a read-only token read its tenant and refuses every change with PERMISSION_DENIED', async () => {
    const viewer = client({ token: 'tok-viewer' });
    assert.equal((await viewer.serverInfo()).tenant, 'alice');
    assert.equal((await viewer.getModel(model)).sha256, model.sha256);
    const refused = await rejection(viewer.deleteModel(model));
    assert.equal(refused.codeName, 'PERMISSION_DENIED');
    assert.match(refused.message, /read-only.*DeleteModel/);
    assert.equal(await codeOf(viewer.createJob({ model, objective: { channel: { layer: spatialLayer, channel: 0 } },
      steps: 2, size: 32 })), 'PERMISSION_DENIED');
    assert.equal(await codeOf(viewer.uploadModel(Buffer.from('bytes alice has not stored'), { chunkSize: 1024 })),
      'PERMISSION_DENIED');
    assert.equal((await fv.getModel(model)).sha256, model.sha256, 'the model is still there');
  });

  it('refuses unary, streaming and client-streaming calls without a known token', async () => {
    for (const anonymous of [client({}), client({ token: 'tok-mallory' })]) {
      assert.equal(await codeOf(anonymous.serverInfo()), 'UNAUTHENTICATED');
      assert.equal(await codeOf(anonymous.getModel(model)), 'UNAUTHENTICATED');
      assert.equal(await codeOf(drain(anonymous.watchJob('some-job'))), 'UNAUTHENTICATED');
      assert.equal(await codeOf(anonymous.uploadModel(Buffer.from('onnx?'), { chunkSize: 1024 })), 'UNAUTHENTICATED');
      assert.equal(await codeOf(anonymous._upload({ sha256: model.sha256, sizeBytes: model.sizeBytes },
        (async function* () {})())), 'UNAUTHENTICATED');
    }
    const noToken = await runCli(['layers', model.sha256], { FEATUREVIZ_SERVER: server.address, FEATUREVIZ_TOKEN: '' });
    assert.equal(noToken.code, 1);
    assert.match(noToken.stderr, /UNAUTHENTICATED/);
  });

  it('re-attaches a watch across a server restart and keeps streaming the same job', TIMEOUT, async () => {
    const info = await fv.serverInfo();
    const job = await fv.createJob({ model, objective: { channel: { layer: spatialLayer, channel: 2 } },
      steps: info.limits.maxSteps, size: 32 });
    const snapshots = [];
    const seqs = [];
    let restarted = false;
    let result = null;
    for await (const event of fv.watchJob(job)) {
      if (event.event === 'snapshot') snapshots.push(event.snapshot);
      else if (event.event !== 'heartbeat') seqs.push(event.seq);
      if (event.event === 'result') result = event.result;
      if (event.event !== 'progress') continue;
      if (!restarted && event.progress.step >= 3) {
        restarted = true;
        await server.stop(); // SIGTERM: the running job goes back to the queue after --grace
        server = await startServer({ store, port: server.port, env: { FEATUREVIZ_TOKENS: TOKENS } });
      } else if (restarted && snapshots.length === 2) {
        await fv.cancelJob(job);
      }
    }
    assert.ok(restarted, 'the job made progress before the restart');
    assert.equal(snapshots.length, 2, 'one snapshot per server lifetime');
    // The first snapshot may come before the scheduler picked the job up (attempts 0) or after (1).
    assert.ok(snapshots[0].attempts <= 1, `first lifetime's snapshot: attempts ${snapshots[0].attempts}`);
    assert.ok(snapshots[1].attempts >= 1, `second lifetime's snapshot: attempts ${snapshots[1].attempts}`);
    assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b), 'no event twice, none out of order');
    assert.equal(result.state, 'JOB_STATE_CANCELLED');
    assert.equal(result.attempts, 2, 'the restarted server ran the job again');
    assert.equal((await fv.getJob(job)).state, 'JOB_STATE_CANCELLED');
  });

  it('deletes the model', async () => {
    await fv.deleteModel(model);
    assert.equal((await rejection(fv.getModel(model))).codeName, 'NOT_FOUND');
  });
});

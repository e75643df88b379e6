'use strict';
// The Node client's dataset methods against a REAL `featureviz serve` on a free port, with bearer tokens on: upload
// a folder (kind files) in many chunks with progress, a zip Buffer and a tar file, resume an interrupted upload,
// get, list, images, tenant isolation, delete. The images are real files written by Pillow
// (tests/support/images.py), with a text file among them that the report names as skipped.

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { after, before, describe, it } = require('node:test');

const { Client, FeaturevizError, toJobSpec } = require('../../clients/node/src');
const { PNG_SIGNATURE, REPO, python, startServer, tempDir } = require('./support');

const TIMEOUT = { timeout: 180_000 };
const TOKENS = 'tok-alice=alice,tok-bob=bob';

// the hand-built colour model (tests/support/exemplar_models.py: channel 0 of colour_relu is a pixel's red level)
const MAKE_COLOUR_NET = `
import sys
sys.path.insert(0, sys.argv[1])
from support.exemplar_models import colour_net
open(sys.argv[2], "wb").write(colour_net())
`;

// a folder of 3 RGB PNGs, a grayscale JPEG in a sub-folder and a text file; a zip and a gzip tar of other images
const MAKE_IMAGES = `
import io, os, sys, tarfile
sys.path.insert(0, sys.argv[1])
from support.images import image_bytes, zip_of
out = sys.argv[2]
folder = os.path.join(out, "set")
os.makedirs(os.path.join(folder, "sub"))
for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
    open(os.path.join(folder, f"img{i}.png"), "wb").write(image_bytes("png", (24, 16), color=color))
open(os.path.join(folder, "sub", "gray.jpg"), "wb").write(image_bytes("jpeg", (20, 20), mode="L", color=(90,)))
open(os.path.join(folder, "notes.txt"), "wb").write(b"not an image")
open(os.path.join(out, "set.zip"), "wb").write(zip_of({"a.png": image_bytes("png", (8, 8), color=(1, 2, 3)),
                                                       "b.png": image_bytes("png", (8, 8), color=(4, 5, 6)),
                                                       "readme.md": b"# hello"}))
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, color in (("t/x.png", (7, 8, 9)), ("t/y.png", (10, 11, 12))):
        data = image_bytes("png", (10, 6), color=color)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
open(os.path.join(out, "set.tar.gz"), "wb").write(buf.getvalue())
`;

async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('expected the call to fail');
}

async function drain(iterator) {
  const items = [];
  for await (const item of iterator) items.push(item);
  return items;
}

const sha = (bytes) => crypto.createHash('sha256').update(bytes).digest('hex');

describe('the Node client\'s datasets against a real server', () => {
  let server;
  let fv;
  let bob;
  let work;
  let folder;
  let dataset;

  before(async () => {
    work = tempDir('datasets');
    folder = path.join(work, 'set');
    [server] = await Promise.all([startServer({ env: { FEATUREVIZ_TOKENS: TOKENS } }),
      python(MAKE_IMAGES, [path.join(REPO, 'tests'), work])]);
    fv = new Client(server.address, { token: 'tok-alice', timeoutMs: 120_000 });
    bob = new Client(server.address, { token: 'tok-bob', timeoutMs: 120_000 });
  }, TIMEOUT);

  after(async () => {
    for (const c of [fv, bob]) if (c) c.close();
    if (server) await server.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('uploads a folder as single files in many chunks and reports the skipped and converted files', TIMEOUT,
    async () => {
      const progress = [];
      dataset = await fv.uploadDataset(folder, { chunkSize: 64, onProgress: (sent, total) => progress.push([sent,
        total]) });
      const names = ['img0.png', 'img1.png', 'img2.png', 'notes.txt', 'sub/gray.jpg'];
      const total = names.reduce((sum, name) => sum + fs.statSync(path.join(folder, name)).size, 0);
      assert.ok(progress.length > 4, `${progress.length} chunks`);
      assert.deepEqual(progress.at(-1), [total, total]);
      assert.ok(progress.every(([sent], i) => i === 0 || sent > progress[i - 1][0]), 'progress only grows');
      assert.equal(dataset.displayName, 'set');
      assert.equal(dataset.imageCount, 4);
      assert.equal(dataset.deduplicated, false);
      const images = ['img0.png', 'img1.png', 'img2.png', 'sub/gray.jpg'].map((n) => sha(fs.readFileSync(
        path.join(folder, n))));
      assert.equal(dataset.id, sha([...images].sort().join('\n')), 'the id: the sorted image hashes');
      const report = dataset.report;
      assert.equal(report.images, 4);
      assert.equal(report.files, 5);
      assert.equal(report.skipped, 1);
      assert.deepEqual(report.skippedByCause.map((s) => [s.cause, s.count, s.names]),
        [['not_an_image', 1, ['notes.txt']]]);
      assert.deepEqual(report.converted.map((c) => [c.kind, c.count, c.names]), [['grayscale', 1, ['sub/gray.jpg']]]);
      assert.deepEqual(report.formats, { png: 3, jpeg: 1 });
    });

  it('recognises a set the tenant holds, gets, lists and pages its images', async () => {
    const again = await fv.uploadDataset(folder, { name: 'again' });
    assert.equal(again.id, dataset.id);
    assert.equal(again.deduplicated, true);
    const got = await fv.getDataset(`datasets/${dataset.id}`);
    assert.equal(got.imageCount, 4);
    assert.deepEqual(got.report.skippedByCause[0].names, ['notes.txt']);
    const listed = await drain(fv.listDatasets({ pageSize: 1 }));
    assert.deepEqual(listed.map((d) => d.id), [dataset.id]);
    const images = await drain(fv.listDatasetImages(dataset, { pageSize: 2 }));
    assert.deepEqual(images.map((i) => i.name), ['img0.png', 'img1.png', 'img2.png', 'sub/gray.jpg']);
    assert.deepEqual(images.map((i) => [i.format, i.width, i.height]),
      [['png', 24, 16], ['png', 24, 16], ['png', 24, 16], ['jpeg', 20, 20]]);
    assert.deepEqual(images[3].converted, ['grayscale']);
    assert.equal(images[0].sha256, sha(fs.readFileSync(path.join(folder, 'img0.png'))));
  });

  it('uploads a zip Buffer and a tar.gz file, each read by its first bytes', TIMEOUT, async () => {
    const zip = await fv.uploadDataset(fs.readFileSync(path.join(work, 'set.zip')), { name: 'zipped' });
    assert.equal(zip.displayName, 'zipped');
    assert.equal(zip.imageCount, 2);
    assert.deepEqual(zip.report.skippedByCause.map((s) => [s.cause, s.names]), [['not_an_image', ['readme.md']]]);
    const tar = await fv.uploadDataset(path.join(work, 'set.tar.gz'));
    assert.equal(tar.displayName, 'set.tar.gz');
    assert.deepEqual((await drain(fv.listDatasetImages(tar))).map((i) => i.name), ['t/x.png', 't/y.png']);
    assert.equal((await drain(fv.listDatasets())).length, 3);
    await fv.deleteDataset(zip);
    await fv.deleteDataset(tar.id);
  });

  it('resumes an interrupted upload from the bytes the server holds', TIMEOUT, async () => {
    const bytes = fs.readFileSync(path.join(work, 'set.zip'));
    const header = { sha256: sha(bytes), sizeBytes: bytes.length, kind: 'DATASET_SOURCE_KIND_ZIP', displayName: 'z' };
    // the first attempt breaks after 300 bytes: the stream ends short of size_bytes without finish_write
    const broken = (async function* () {
      yield { writeOffset: 0, data: bytes.subarray(0, 300), finishWrite: false };
    })();
    const err = await rejection(fv._upload(header, broken, fv._datasets, 'uploadDataset'));
    assert.equal(err.codeName, 'FAILED_PRECONDITION');
    assert.equal(err.reason, 'UPLOAD_INCOMPLETE');
    assert.equal((await fv.getDatasetUpload(header.sha256, bytes.length)).committedBytes, 300);
    // a restart from 0 would be refused (write_offset 0, the server holds 300): success means it resumed
    const sent = [];
    const resumed = await fv.uploadDataset(bytes, { chunkSize: 100, onProgress: (done) => sent.push(done) });
    assert.equal(sent[0], 400, 'the first chunk starts where the server stopped');
    assert.equal(resumed.imageCount, 2);
    assert.equal((await fv.getDatasetUpload(header.sha256, bytes.length)).committedBytes, 0, 'the partial is gone');
    await fv.deleteDataset(resumed);
  });

  it('keeps a tenant\'s sets its own, and refuses what is not a set before sending', async () => {
    assert.equal((await rejection(bob.getDataset(dataset))).codeName, 'NOT_FOUND');
    assert.deepEqual(await drain(bob.listDatasets()), []);
    assert.equal((await rejection(bob.deleteDataset(dataset))).codeName, 'NOT_FOUND');
    const notArchive = await rejection(fv.uploadDataset(Buffer.from('plain bytes, no archive')));
    assert.ok(notArchive instanceof FeaturevizError);
    assert.equal(notArchive.codeName, 'INVALID_ARGUMENT');
    assert.match(notArchive.message, /zip or tar/);
    const missing = await rejection(fv.uploadDataset(path.join(work, 'no-such-folder')));
    assert.match(missing.message, /no such file or folder/);
    const empty = fs.mkdtempSync(path.join(work, 'empty-'));
    assert.match((await rejection(fv.uploadDataset(empty))).message, /no files to upload/);
    // a set of no image at all is the server's EMPTY_DATASET, one line
    const text = await rejection(fv.uploadDataset([path.join(folder, 'notes.txt')]));
    assert.equal(text.codeName, 'INVALID_ARGUMENT');
    assert.equal(text.reason, 'EMPTY_DATASET');
  });

  it('writes an index job\'s spec against the proto: no objective, the set by id', () => {
    const spec = toJobSpec({ model: 'a'.repeat(64), exemplarIndex: { dataset, layers: ['conv1'], k: 4,
      batch_size: 8 }, size: 32 });
    assert.deepEqual(spec, { model: 'a'.repeat(64), exemplarIndex: { dataset: dataset.id, layers: ['conv1'], k: 4,
      batchSize: 8 }, size: { height: 32, width: 32 } });
    assert.throws(() => toJobSpec({ model: 'a'.repeat(64), exemplarIndex: { dataset, depth: 3 } }),
      /unknown field of ExemplarIndexSpec/);
    assert.throws(() => toJobSpec({ model: 'a'.repeat(64), exemplarIndex: { layers: [] } }), /expected a Dataset/);
  });

  it('runs the index job, then reads ranked examples and their crops as PNG', TIMEOUT, async () => {
    const onnx = path.join(work, 'colour.onnx');
    await python(MAKE_COLOUR_NET, [path.join(REPO, 'tests'), onnx]);
    const model = await fv.uploadModel(onnx);
    const missing = await rejection(fv.exemplars(model, dataset, 'colour_relu', 0));
    assert.equal(missing.codeName, 'NOT_FOUND');
    assert.equal(missing.reason, 'EXEMPLAR_INDEX_NOT_FOUND');
    const job = await fv.indexExemplars(model, dataset, { layers: ['colour_relu'], k: 4, batchSize: 2, size: 32 });
    const steps = [];
    const done = await fv.waitJob(job, { onEvent: (e) => { if (e.event === 'progress') steps.push(e.progress); } });
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED', JSON.stringify(done.error));
    assert.equal(done.result.exemplarIndex.images, 4);
    assert.deepEqual(done.result.exemplarIndex.layers, ['colour_relu']);
    assert.ok(steps.every((p) => p.steps === 4), JSON.stringify(steps));

    const top = await fv.exemplars(model, dataset, 'colour_relu', 0, { k: 4 });
    assert.equal(top.order, 'EXEMPLAR_ORDER_MAX');
    assert.equal(top.exemplars[0].name, 'img0.png'); // the red one: channel 0 is the red level
    assert.deepEqual(top.exemplars.map((e) => e.rank), [0, 1, 2, 3]);
    const green = await fv.exemplars(model, dataset, 'colour_relu', 1, { k: 1 });
    assert.equal(green.exemplars[0].name, 'img1.png');
    const bottom = await fv.exemplars(model, dataset, 'colour_relu', 0, { order: 'min', k: 2 });
    assert.equal(bottom.order, 'EXEMPLAR_ORDER_MIN');
    assert.equal((await rejection(fv.exemplars(model, dataset, 'colour_relu', 0, { order: 'best' }))).codeName,
      'INVALID_ARGUMENT');

    const best = top.exemplars[0];
    const whole = await fv.datasetImage(dataset, best.image);
    assert.ok(whole.png.subarray(0, 8).equals(PNG_SIGNATURE));
    assert.deepEqual([whole.width, whole.height, whole.name], [24, 16, 'img0.png']);
    const box = best.imageBox;
    const crop = await fv.datasetImage(dataset, best, { box });
    assert.deepEqual([crop.png.readUInt32BE(16), crop.png.readUInt32BE(20)], [box.x1 - box.x0, box.y1 - box.y0]);
    const byName = await fv.datasetImage(dataset, 'sub/gray.jpg', { maxSide: 10 });
    assert.deepEqual([byName.width, byName.height], [10, 10]);
    await fv.deleteModel(model);
  });

  it('deletes the set', async () => {
    await fv.deleteDataset(dataset);
    assert.equal((await rejection(fv.getDataset(dataset))).codeName, 'NOT_FOUND');
  });
});

'use strict';
/**
 * The Node client's atlas calls against a REAL `featureviz serve` (tests/node/support.js): start an atlas of a tiny
 * ONNX export, watch it to its end, list its units with their progress, fetch a unit's PNG, cancel another.
 */

const assert = require('node:assert/strict');
const fs = require('node:fs');
const { after, before, describe, it } = require('node:test');

const { Client } = require('../../clients/node/src');
const { PNG_SIGNATURE, exportTinyOnnx, startServer, tempDir } = require('./support');

describe('atlas', () => {
  let server;
  let fv;
  let model;
  let work;

  before(async () => {
    work = tempDir('atlas');
    let paths;
    [server, paths] = await Promise.all([startServer(), exportTinyOnnx(work, 1)]);
    fv = new Client(server.address);
    model = await fv.uploadModel(paths[0]);
  });

  after(async () => {
    if (fv) fv.close();
    if (server) await server.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('starts, watches, lists and fetches an atlas', async () => {
    const job = await fv.createAtlas(model, {
      layers: ['/Relu'], channels: 2, size: 32, steps: 4, seed: 7, negative: true,
    });
    const done = await fv.waitJob(job);
    assert.equal(done.state, 'JOB_STATE_SUCCEEDED');
    assert.equal(done.result.atlas.units, 2);
    const units = [];
    for await (const unit of fv.listAtlasUnits(job)) units.push(unit);
    assert.deepEqual(units.map((u) => [u.layer, u.channel, u.done]), [['/Relu', 0, true], ['/Relu', 1, true]]);
    const image = await fv.getAtlasUnit(job, 1);
    assert.ok(image.png.subarray(0, 8).equals(PNG_SIGNATURE));
    const progress = await fv.atlasProgress(job);
    assert.equal(progress.done, 2);
    assert.equal(progress.variantsDone, 2);
    assert.ok(units.every((u) => u.negativeDone));
    const negative = await fv.getAtlasUnit(job, 1, { variant: 'negative' });
    assert.ok(negative.png.subarray(0, 8).equals(PNG_SIGNATURE) && !negative.png.equals(image.png));
    await assert.rejects(fv.getAtlasUnit(job, 1, { variant: 'diversity' }),
      (err) => err.codeName === 'NOT_FOUND' && /no diversity render/.test(err.message));
  });

  it('cancels an atlas and keeps what is done', async () => {
    const job = await fv.createAtlas(model, { layers: ['/Relu'], channels: 4, size: 32, steps: 5000, seed: 8 });
    await fv.cancelJob(job);
    const done = await fv.waitJob(job);
    assert.equal(done.state, 'JOB_STATE_CANCELLED');
    assert.equal(done.result.atlas.units, 4);
  });
});

'use strict';
// The generator option (issue 25) in the Node client: createJob's spec takes a Model, a sha256 or
// { model, latentL2 } with param 'generator'; featureviz-node render's --generator and --latent-l2 flags. No server:
// the job itself runs over gRPC in tests/service/test_service_generator.py (the Python clients and the CLI).

const assert = require('node:assert/strict');
const { describe, it } = require('node:test');

const { toJobSpec } = require('../../clients/node/src');
const { JOB_FLAGS } = require('../../clients/node/src/cli');

const SHA = 'a'.repeat(64);
const GEN = 'b'.repeat(64);
const OBJECTIVE = { channel: { layer: '/Relu', channel: 1 } };

describe('generator', () => {
  it('accepts a Model, a sha256 or {model, latentL2} as the generator, with param generator', () => {
    const spec = (generator) => toJobSpec({ model: SHA, objective: OBJECTIVE, param: 'generator', generator });
    assert.deepEqual(spec(GEN).generator, { model: GEN });
    assert.deepEqual(spec({ sha256: GEN }).generator, { model: GEN });
    assert.deepEqual(spec({ model: GEN, latentL2: 0.01 }).generator, { model: GEN, latentL2: 0.01 });
    assert.deepEqual(spec({ model: GEN, latent_l2: 0.5 }).generator, { model: GEN, latentL2: 0.5 });
    assert.equal(spec(GEN).param, 'PARAMETERIZATION_GENERATOR');
    assert.throws(() => spec({ model: 42 }),
      (err) => err.codeName === 'INVALID_ARGUMENT' && /spec\.generator\.model/.test(err.message));
  });

  it('featureviz-node render takes --generator', () => {
    assert.deepEqual(JOB_FLAGS.generator.slice(0, 1), ['generator']);
  });
});

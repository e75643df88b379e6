'use strict';
// The job options are declared once (featureviz.options, Python): the Node client's enum choices come from the
// loaded proto by the same naming rule, its createJob takes every JobSpec field and refuses others, and
// featureviz-node render's flags are the declared ones. No server: the declaration is read from
// `python -m featureviz.options --json`.

const assert = require('node:assert/strict');
const { before, describe, it } = require('node:test');

const { toJobSpec, enumChoices, loadContract } = require('../../clients/node/src');
const { JOB_FLAGS } = require('../../clients/node/src/cli');
const { python } = require('./support');

const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const SHA = 'a'.repeat(64);
const OBJECTIVE = { logit: { index: 1 } };

describe('job options', () => {
  let declared;

  before(async () => {
    declared = JSON.parse(await python('from featureviz.options import main; main(["--json"])'));
  });

  it('takes the choices of every enum option from the proto, as the declaration does', () => {
    const fields = loadContract().JobSpec.type.field;
    const choices = declared.filter((o) => o.type === 'choice');
    assert.deepEqual(choices.map((o) => o.name), ['param', 'transforms', 'lr_schedule']);
    for (const option of choices) {
      const fd = fields.find((f) => f.name === camel(option.name));
      assert.deepEqual(Object.keys(enumChoices(fd.typeName)), option.choices, option.name);
      for (const name of option.choices) { // each choice maps, by name, to its enum value
        assert.equal(toJobSpec({ model: SHA, objective: OBJECTIVE, [option.name]: name })[fd.name],
          `${fd.typeName.replace(/(?!^)([A-Z])/g, '_$1').toUpperCase()}_${name.toUpperCase()}`);
      }
    }
    assert.ok(Object.keys(enumChoices('Parameterization')).includes('laplacian'));
  });

  it('createJob takes every declared option, camelCase or snake_case, and refuses others naming the known', () => {
    const fields = loadContract().JobSpec.type.field.map((f) => f.name);
    assert.deepEqual(fields.filter((f) => !['model', 'objective'].includes(f)), declared.map((o) => camel(o.name)));
    const spec = toJobSpec({ model: SHA, objective: OBJECTIVE, lr_warmup: 4, plateauWindow: 8, preview_every: 2 });
    assert.equal(spec.lrWarmup, 4);
    assert.equal(spec.plateauWindow, 8);
    assert.equal(spec.previewEvery, 2);
    assert.throws(() => toJobSpec({ model: SHA, objective: OBJECTIVE, stepz: 3 }),
      (err) => err.codeName === 'INVALID_ARGUMENT' && /spec\.stepz/.test(err.message)
        && /steps, lr, size/.test(err.message));
  });

  it("featureviz-node render's flags are the declared ones for the Node command line", () => {
    const node = declared.filter((o) => o.surfaces.includes('node'));
    assert.deepEqual(Object.keys(JOB_FLAGS).map((flag) => `--${flag}`).sort(), node.map((o) => o.flag).sort());
    for (const option of node) {
      assert.equal(JOB_FLAGS[option.flag.slice(2)][0], camel(option.name), option.name);
    }
  });
});

'use strict';
// toObjective: the engine's objective dicts (the proto's JSON mapping, snake_case names, `{sum: [A, B]}`) become
// proto-loader objects with no code per kind: every kind of tests/service/test_service_proto.py's ALL_KINDS
// encodes to the same message as Python's featureviz.codec.objective_to_proto. No server needed.

const assert = require('node:assert/strict');
const { describe, it } = require('node:test');

const { loadContract, toObjective } = require('../../clients/node/src/index');
const path = require('node:path');

const { python, REPO } = require('./support');

// the helper finds tests/service from the repository root, whatever the working directory (npm test runs in
// clients/node)
const ALL_KINDS = `
import json, sys
sys.path.insert(0, ${JSON.stringify(path.join(REPO, 'tests', 'service'))})
from test_service_proto import ALL_KINDS
from featureviz.codec import objective_to_proto
print(json.dumps(ALL_KINDS))
from featureviz.v1 import featureviz_pb2 as pb
print(pb.CreateJobRequest(spec=pb.JobSpec(objective=objective_to_proto(ALL_KINDS))).SerializeToString().hex())
`;

describe('toObjective', () => {
  it('encodes every kind in the engine form as Python does', { timeout: 120_000 }, async () => {
    const [json, hex] = (await python(ALL_KINDS)).trim().split('\n');
    const { CreateJob: createJob } = loadContract().JobService.service;
    const ours = createJob.requestSerialize({ spec: { objective: toObjective(JSON.parse(json)) } });
    // decoded, not byte for byte: protobufjs writes a set 0 ({prob: {index: 0}}) that protobuf-python leaves out
    assert.deepEqual(createJob.requestDeserialize(ours), createJob.requestDeserialize(Buffer.from(hex, 'hex')));
  });

  it('names the field of a bad objective', () => {
    const fieldOf = (objective) => {
      try {
        toObjective(objective);
      } catch (err) {
        return err.details.field;
      }
      return null;
    };
    assert.equal(fieldOf({}), 'spec.objective');
    assert.equal(fieldOf({ tv: {}, blur: {} }), 'spec.objective');
    assert.equal(fieldOf({ sum: [{ tv: {} }, { nope: {} }] }), 'spec.objective.sum.terms[1].nope');
    assert.equal(fieldOf({ channel: { layer: 'a', chanel: 1 } }), 'spec.objective.channel.chanel');
    assert.equal(fieldOf({ kind: 'tv', tv: {} }), null); // a proto-loader object names its oneof member
  });
});

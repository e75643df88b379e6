'use strict';
// FeaturevizError from the server's real google.rpc.Status bytes: made by featureviz.server.errors.to_status
// in Python (grpcio-status), decoded by the Node client. No server needed.

const assert = require('node:assert/strict');
const { describe, it } = require('node:test');

const { FeaturevizError, decodeStatus, fromGrpcError } = require('../../clients/node/src/errors');
const { python } = require('./support');

const MAKE_STATUS = `
import sys
from featureviz.errors import InvalidSpec, ResourceExhausted
from featureviz.server.errors import to_status
errors = [
    InvalidSpec("spec.size", "2048x2048; the largest side allowed is 1024", reason="TOO_LARGE"),
    ResourceExhausted("32 jobs queued or running, the limit per tenant is 32", reason="QUEUE_FULL"),
    KeyError("boom"),
]
for exc in errors:
    status = to_status(exc)
    (key, value), = [(k, v) for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    print(status.code.value[0], status.details.replace("\\n", " "), value.hex(), sep="\\t")
`;

/** A grpc-js ServiceError as the channel hands it over: code, details and trailing metadata. */
function serviceError(line) {
  const [code, details, hex] = line.split('\t');
  const bin = Buffer.from(hex, 'hex');
  return { code: Number(code), details, metadata: { get: (key) => (key === 'grpc-status-details-bin' ? [bin] : []) } };
}

describe('google.rpc details from the server', () => {
  it('decodes ErrorInfo, BadRequest, QuotaFailure and RetryInfo made by grpcio-status', { timeout: 120_000 },
    async () => {
      const [invalid, exhausted, internal] = (await python(MAKE_STATUS)).trim().split('\n').map(serviceError);

      const bad = fromGrpcError(invalid);
      assert.ok(bad instanceof FeaturevizError);
      assert.equal(bad.code, 3);
      assert.equal(bad.codeName, 'INVALID_ARGUMENT');
      assert.equal(bad.reason, 'TOO_LARGE');
      assert.equal(bad.details.domain, 'featureviz');
      assert.equal(bad.details.field, 'spec.size');
      assert.deepEqual(bad.details.fieldViolations,
        [{ field: 'spec.size', description: '2048x2048; the largest side allowed is 1024', reason: '' }]);
      assert.equal(bad.message, 'INVALID_ARGUMENT: spec.size: 2048x2048; the largest side allowed is 1024');

      const full = fromGrpcError(exhausted);
      assert.equal(full.codeName, 'RESOURCE_EXHAUSTED');
      assert.equal(full.reason, 'QUEUE_FULL');
      assert.equal(full.details.retryDelayMs, 5000);
      assert.equal(full.details.quotaViolations.length, 1);
      assert.equal(full.details.quotaViolations[0].subject, 'QUEUE_FULL');
      assert.match(full.details.quotaViolations[0].description, /limit per tenant is 32/);

      const bug = fromGrpcError(internal);
      assert.equal(bug.codeName, 'INTERNAL');
      assert.equal(bug.reason, 'INTERNAL_ERROR');
      assert.doesNotMatch(bug.message, /boom/); // never a traceback or the exception text
    });

  it('keeps the plain status when there are no details, and reports undecodable ones', () => {
    const plain = fromGrpcError({ code: 14, details: 'connection refused', metadata: { get: () => [] } });
    assert.equal(plain.codeName, 'UNAVAILABLE');
    assert.equal(plain.message, 'UNAVAILABLE: connection refused');
    assert.deepEqual(plain.details, {});
    const broken = fromGrpcError({ code: 3, details: 'x', metadata: { get: () => [Buffer.from([0x12, 0x40, 0x41])] } });
    assert.equal(broken.codeName, 'INVALID_ARGUMENT');
    assert.match(broken.details.undecodable, /truncated/);
    assert.throws(() => decodeStatus(Buffer.from([0x0b])), /wire type 3/);
  });
});

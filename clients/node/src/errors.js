'use strict';
/**
 * The one error type of the Node client, converted from grpc-js errors in one place (`fromGrpcError`).
 *
 *     FeaturevizError            code (number), codeName ("INVALID_ARGUMENT"), message, details
 *       details.reason           ErrorInfo.reason, e.g. DIGEST_MISMATCH, QUEUE_FULL, MODEL_NOT_READY
 *       details.domain           ErrorInfo.domain ("featureviz")
 *       details.metadata         ErrorInfo.metadata
 *       details.fieldViolations  BadRequest: [{field, description, reason}], e.g. field "spec.size"
 *       details.quotaViolations  QuotaFailure: [{subject, description}]
 *       details.retryDelayMs     RetryInfo.retry_delay in milliseconds
 *       details.field            the first field violation's field, for convenience
 *
 * The server sends these as a google.rpc.Status in the `grpc-status-details-bin` trailer (grpcio-status).
 * Only the five small messages above are read, so they are decoded from the wire format here rather than
 * loading googleapis' protos; unknown detail types are kept as {typeUrl, value} in details.other.
 */

const grpc = require('@grpc/grpc-js');

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
const TYPE_PREFIX = 'type.googleapis.com/google.rpc.';

class FeaturevizError extends Error {
  /**
   * @param {number} code  gRPC status code
   * @param {string} codeName  its canonical name, e.g. "NOT_FOUND"
   * @param {string} message  the server's message (names the value, the limit and the fix)
   * @param {object} [details]  see the module docstring
   */
  constructor(code, codeName, message, details = {}) {
    super(`${codeName}: ${message}`);
    this.name = 'FeaturevizError';
    this.code = code;
    this.codeName = codeName;
    this.serverMessage = message;
    this.details = details;
  }

  /** ErrorInfo.reason, or '' when the server sent none. */
  get reason() {
    return this.details.reason || '';
  }
}

/** A client-side bad argument, raised before any call: same type and code as the server's INVALID_ARGUMENT. */
function invalidArgument(field, description) {
  return new FeaturevizError(grpc.status.INVALID_ARGUMENT, 'INVALID_ARGUMENT', `${field}: ${description}`, {
    reason: 'INVALID_ARGUMENT',
    field,
    fieldViolations: [{ field, description, reason: '' }],
  });
}

/** Any error out of grpc-js (a ServiceError with code/details/metadata) -> FeaturevizError. */
function fromGrpcError(err) {
  if (err instanceof FeaturevizError) return err;
  if (err == null || typeof err.code !== 'number') {
    return new FeaturevizError(grpc.status.UNKNOWN, 'UNKNOWN', String(err && err.message ? err.message : err), {});
  }
  const codeName = CODE_NAMES[err.code] || `CODE_${err.code}`;
  let message = err.details || err.message || codeName;
  let details = {};
  const raw = err.metadata && typeof err.metadata.get === 'function' ? err.metadata.get('grpc-status-details-bin') : [];
  if (raw.length > 0) {
    try {
      const status = decodeStatus(Buffer.from(raw[0]));
      message = status.message || message;
      details = statusDetails(status.details);
    } catch (decodeErr) {
      details = { undecodable: String(decodeErr.message) };
    }
  }
  return new FeaturevizError(err.code, codeName, message, details);
}

// ------------------------------------------------------------------------------------------ google.rpc details

function statusDetails(anys) {
  const details = {};
  for (const { typeUrl, value } of anys) {
    const type = typeUrl.startsWith(TYPE_PREFIX) ? typeUrl.slice(TYPE_PREFIX.length) : '';
    if (type === 'ErrorInfo') {
      const fields = readFields(value);
      details.reason = str(fields, 1);
      details.domain = str(fields, 2);
      details.metadata = Object.fromEntries((fields.get(3) || []).map((entry) => {
        const kv = readFields(entry);
        return [str(kv, 1), str(kv, 2)];
      }));
    } else if (type === 'BadRequest') {
      details.fieldViolations = (readFields(value).get(1) || []).map((entry) => {
        const v = readFields(entry);
        return { field: str(v, 1), description: str(v, 2), reason: str(v, 3) };
      });
      if (details.fieldViolations.length > 0) details.field = details.fieldViolations[0].field;
    } else if (type === 'QuotaFailure') {
      details.quotaViolations = (readFields(value).get(1) || []).map((entry) => {
        const v = readFields(entry);
        return { subject: str(v, 1), description: str(v, 2) };
      });
    } else if (type === 'RetryInfo') {
      const delay = readFields(value).get(1);
      const duration = delay ? readFields(delay[0]) : new Map();
      details.retryDelayMs = num(duration, 1) * 1000 + Math.round(num(duration, 2) / 1e6);
    } else {
      (details.other = details.other || []).push({ typeUrl, value });
    }
  }
  return details;
}

/** google.rpc.Status {1: int32 code, 2: string message, 3: repeated Any {1: type_url, 2: value}}. */
function decodeStatus(buf) {
  const fields = readFields(buf);
  return {
    code: num(fields, 1),
    message: str(fields, 2),
    details: (fields.get(3) || []).map((any) => {
      const f = readFields(any);
      return { typeUrl: str(f, 1), value: (f.get(2) || [Buffer.alloc(0)])[0] };
    }),
  };
}

/** Protobuf wire format -> Map(field number -> [values]): varints as numbers, length-delimited as Buffers. */
function readFields(buf) {
  const fields = new Map();
  let pos = 0;
  const varint = () => {
    let result = 0;
    let scale = 1;
    for (;;) {
      if (pos >= buf.length) throw new Error('truncated varint in grpc-status-details-bin');
      const byte = buf[pos++];
      result += (byte & 0x7f) * scale;
      if (byte < 0x80) return result;
      scale *= 128;
    }
  };
  while (pos < buf.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    const wire = key % 8;
    let value;
    if (wire === 0) value = varint();
    else if (wire === 2) {
      const len = varint();
      if (pos + len > buf.length) throw new Error('truncated field in grpc-status-details-bin');
      value = buf.subarray(pos, pos + len);
      pos += len;
    } else if (wire === 1) { value = buf.subarray(pos, pos + 8); pos += 8; }
    else if (wire === 5) { value = buf.subarray(pos, pos + 4); pos += 4; }
    else throw new Error(`unsupported wire type ${wire} in grpc-status-details-bin`);
    if (!fields.has(field)) fields.set(field, []);
    fields.get(field).push(value);
  }
  return fields;
}

function str(fields, n) {
  const values = fields.get(n);
  return values ? values[values.length - 1].toString('utf8') : '';
}

function num(fields, n) {
  const values = fields.get(n);
  return values && typeof values[values.length - 1] === 'number' ? values[values.length - 1] : 0;
}

module.exports = { FeaturevizError, fromGrpcError, invalidArgument, decodeStatus, CODE_NAMES };

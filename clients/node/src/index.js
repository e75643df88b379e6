'use strict';
/**
 * featureviz-client: a thin Node.js client for the featureviz gRPC service (featureviz.v1).
 *
 *     const { Client } = require('featureviz-client');
 *     const fv = new Client('127.0.0.1:50051', { token: process.env.FEATUREVIZ_TOKEN });
 *     const model = await fv.uploadModel('resnet18.onnx');
 *     for await (const layer of fv.listLayers(model, { spatialOnly: true })) console.log(layer.name);
 *     const job = await fv.createJob({ model, objective: { channel: { layer: 'conv1', channel: 3 } }, steps: 64 });
 *     for await (const event of fv.watchJob(job)) if (event.event === 'result') console.log(event.result.state);
 *     fv.close();
 *
 * The contract (protos/featureviz/v1/featureviz.proto) is loaded at run time with @grpc/proto-loader, so no
 * generated code is committed. Messages are plain objects with camelCase fields (sizeBytes, layerCount), enums
 * as names ("JOB_STATE_SUCCEEDED"), bytes as Buffers, int64 as Numbers and a virtual property naming the set
 * member of each oneof (JobEvent.event === "progress"). Every failed call rejects with a FeaturevizError.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { FeaturevizError, fromGrpcError, invalidArgument } = require('./errors');

const PROTO_FILE = 'featureviz/v1/featureviz.proto';
const DEFAULT_CHUNK_BYTES = 1 << 20; // the server's default Limits.max_chunk_bytes
// re-attaching a dropped watch: backoff 250 ms doubling to 2 s, for up to 60 s (a server restart imports torch)
const DEFAULT_RECONNECT_MS = 60_000;
const RECONNECT_FIRST_MS = 250;
const RECONNECT_MAX_MS = 2_000;
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '::1', '[::1]']);
const TERMINAL_STATES = new Set(['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED']);
const LOADER_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true };

// ----------------------------------------------------------------------------------------------- the contract

/**
 * Where featureviz.proto lives: `protoPath` (the file), else $FEATUREVIZ_PROTO, else the copy `npm pack` puts in
 * this package (protos/), else the repository's protos/ next to clients/node.
 */
function findProto(protoPath) {
  const candidates = [
    protoPath,
    process.env.FEATUREVIZ_PROTO,
    path.join(__dirname, '..', 'protos', PROTO_FILE),
    path.join(__dirname, '..', '..', '..', 'protos', PROTO_FILE),
  ].filter(Boolean);
  for (const file of candidates) {
    if (fs.existsSync(file)) return path.resolve(file);
  }
  throw new Error(`featureviz.proto not found (looked in: ${candidates.join(', ')}); ` +
    'pass {protoPath} or set FEATUREVIZ_PROTO to the file');
}

const loaded = new Map();

/** The featureviz.v1 package (grpc-js service constructors), loaded once per proto file. */
function loadContract(protoPath) {
  const file = findProto(protoPath);
  if (!loaded.has(file)) {
    // includeDirs: the folder above featureviz/v1/, so the file's own imports resolve as protoc would
    const root = path.resolve(path.dirname(file), '..', '..');
    const definition = protoLoader.loadSync(file, { ...LOADER_OPTIONS, includeDirs: [root] });
    loaded.set(file, grpc.loadPackageDefinition(definition).featureviz.v1);
  }
  return loaded.get(file);
}

// ---------------------------------------------------------------------------------------------- request shapes

/** A Model, "models/<sha>" or "<sha>" -> the string the server parses. */
function modelRef(model, field = 'model') {
  if (typeof model === 'string' && model) return model;
  if (model && typeof model.sha256 === 'string' && model.sha256) return model.sha256;
  throw invalidArgument(field, `expected a Model or its sha256, got ${JSON.stringify(model)}`);
}

/** A Job, "jobs/<id>" or "<id>" -> the string the server parses. */
function jobRef(job) {
  if (typeof job === 'string' && job) return job;
  if (job && typeof job.id === 'string' && job.id) return job.id;
  throw invalidArgument('job', `expected a Job or its id, got ${JSON.stringify(job)}`);
}

/**
 * An objective as the engine writes it, which is the proto's JSON mapping (docs/ARCHITECTURE.md: field names in
 * snake_case or camelCase, `{tv: {}}`, `{sum: [A, B]}` short for `{sum: {terms: [A, B]}}`) -> the proto-loader
 * object. It walks the message types of the loaded contract, with no code per kind: a kind added to the proto
 * needs nothing here.
 */
function toObjective(objective, field = 'spec.objective', contract = loadContract()) {
  return toMessage(contract, 'Objective', objective, field);
}

const snakeCase = (name) => name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

function toMessage(contract, typeName, value, field) {
  const type = (contract[typeName] || contract[typeName.split('.').pop()]).type;
  if (Array.isArray(value) && type.field.length === 1 && type.field[0].label === 'LABEL_REPEATED') {
    value = { [type.field[0].name]: value }; // a message of one list may be written as the list
  }
  if (value === null || value === undefined) value = {};
  if (typeof value !== 'object' || Array.isArray(value)) {
    throw invalidArgument(field, `expected an object of ${typeName} fields, got ${JSON.stringify(value)}`);
  }
  const oneofs = new Set(type.oneofDecl.map((oneof) => oneof.name)); // proto-loader's virtual "which member" keys
  const keys = Object.keys(value).filter((key) => value[key] !== undefined
    && !(oneofs.has(key) && typeof value[key] === 'string'));
  if (typeName === 'Objective' && keys.length !== 1) {
    throw invalidArgument(field, `an objective has exactly one kind key, got ${JSON.stringify(keys)}`);
  }
  const out = {};
  for (const key of keys) {
    const fd = type.field.find((f) => f.name === key || snakeCase(f.name) === key);
    if (!fd) {
      const known = type.field.map((f) => snakeCase(f.name)).join(', ') || 'none';
      throw invalidArgument(`${field}.${key}`, `unknown field of ${typeName}; known: ${known}`);
    }
    const sub = `${field}.${snakeCase(fd.name)}`;
    let item = value[key];
    if (fd.type === 'TYPE_MESSAGE' && fd.label === 'LABEL_REPEATED') {
      if (!Array.isArray(item)) throw invalidArgument(sub, `expected a list, got ${JSON.stringify(item)}`);
      item = item.map((each, i) => toMessage(contract, fd.typeName, each, `${sub}[${i}]`));
    } else if (fd.type === 'TYPE_MESSAGE') {
      item = toMessage(contract, fd.typeName, item, sub);
    }
    if (item !== null) out[fd.name] = item;
  }
  return out;
}

const upperSnake = (name) => name.replace(/(?!^)([A-Z])/g, '_$1').toUpperCase();

/**
 * A proto enum's choices by the one naming rule (the Python side's featureviz.options): {fft:
 * 'PARAMETERIZATION_FFT', ...}, the enum's name in UPPER_SNAKE as the prefix, the rest in lower case; UNSPECIFIED
 * (the engine default) left out. Read from the loaded contract: an enum value added to the proto needs nothing here.
 */
function enumChoices(typeName, contract = loadContract()) {
  const type = (contract[typeName] || contract[typeName.split('.').pop()]).type;
  const prefix = `${upperSnake(typeName.split('.').pop())}_`;
  return Object.fromEntries(type.value.filter((v) => v.number !== 0)
    .map((v) => [v.name.slice(prefix.length).toLowerCase(), v.name]));
}

function enumName(table, value, field) {
  if (value === undefined || value === null) return undefined;
  if (Object.values(table).includes(value)) return value;
  if (Object.hasOwn(table, value)) return table[value];
  throw invalidArgument(field, `unknown value ${JSON.stringify(value)}; known: ${Object.keys(table).join(', ')}`);
}

/**
 * A JobSpec from friendly input: its fields in camelCase (or snake_case), as the proto declares them (the job
 * options: docs/ARCHITECTURE.md, the README's options table, or `serverInfo().jobOptions`). `model` may be a Model,
 * `objective` the engine's JSON form, `size` a number, [height, width] or {height, width}, each enum field
 * (`param`, `transforms`, `lrSchedule`) its engine name ("fft", "composed", "cosine": the enum's values by the
 * naming rule) or the proto's, `judge` a Model, its sha256 or `{ model, preprocess }` (another classifier that
 * scores each class image: `result.images[i].judge` has its `rank` of the target class and its `probability`).
 * `plateau` and `plateauWindow` stop early once the objective stops rising (`result.stoppedAt`). An unknown key
 * is an INVALID_ARGUMENT naming the known ones.
 */
function toJobSpec(spec, contract = loadContract()) {
  if (!spec || typeof spec !== 'object') throw invalidArgument('spec', 'expected a JobSpec object');
  const fields = contract.JobSpec.type.field;
  const out = {};
  for (const key of Object.keys(spec)) {
    const fd = fields.find((f) => f.name === key || snakeCase(f.name) === key);
    if (!fd) {
      throw invalidArgument(`spec.${key}`, `unknown job option; known: ${fields.map((f) => f.name).join(', ')}`);
    }
    if (spec[key] !== undefined) out[fd.name] = spec[key];
  }
  out.model = modelRef(spec.model, 'spec.model');
  out.objective = toObjective(spec.objective, 'spec.objective', contract);
  if (typeof out.size === 'number') out.size = { height: out.size, width: out.size };
  else if (Array.isArray(out.size)) out.size = { height: out.size[0], width: out.size[1] };
  for (const fd of fields.filter((f) => f.type === 'TYPE_ENUM' && out[f.name] !== undefined)) {
    out[fd.name] = enumName(enumChoices(fd.typeName, contract), out[fd.name], `spec.${fd.name}`);
  }
  if (out.judge !== undefined && out.judge !== null) {
    const judge = typeof out.judge === 'object' && !out.judge.sha256 ? out.judge : { model: out.judge };
    out.judge = { model: modelRef(judge.model, 'spec.judge.model') };
    if (judge.preprocess) out.judge.preprocess = judge.preprocess;
  }
  if (out.initImage !== undefined && !Buffer.isBuffer(out.initImage)) {
    throw invalidArgument('spec.initImage', 'expected a Buffer of PNG or JPEG bytes');
  }
  for (const key of Object.keys(out)) if (out[key] === undefined || out[key] === null) delete out[key];
  return out;
}

/** Plaintext or TLS (mTLS with a client certificate) credentials for `address`. */
function channelCredentials(address, { insecure, rootCerts, clientCert, clientKey }) {
  const host = address.slice(0, address.lastIndexOf(':'));
  const tls = Boolean(rootCerts || clientCert || clientKey);
  if (insecure && tls) {
    throw invalidArgument('insecure', 'TLS certificates were given with insecure: true; drop one or the other');
  }
  if (Boolean(clientCert) !== Boolean(clientKey)) {
    throw invalidArgument(clientCert ? 'clientKey' : 'clientCert', 'mTLS needs both clientCert and clientKey');
  }
  if (insecure ?? (!tls && LOOPBACK.has(host))) return grpc.credentials.createInsecure();
  const pem = (value) => (value == null || Buffer.isBuffer(value) ? value || null : fs.readFileSync(value));
  return grpc.credentials.createSsl(pem(rootCerts), pem(clientKey), pem(clientCert));
}

// ------------------------------------------------------------------------------------------------------ client

class Client {
  /**
   * @param {string} address  "host:port"
   * @param {object} [options]
   * @param {string} [options.token]  bearer token, sent as `authorization: Bearer <token>` on every call
   * @param {boolean} [options.insecure]  plaintext instead of TLS; default: plaintext for loopback hosts given
   *     no certificates, TLS otherwise
   * @param {Buffer|string} [options.rootCerts]  PEM CA (bytes or a file) to verify the server (default: the system's)
   * @param {Buffer|string} [options.clientCert]  PEM client certificate chain, for servers that require mTLS
   * @param {Buffer|string} [options.clientKey]  its PEM private key
   * @param {number} [options.timeoutMs]  deadline of unary calls (uploads and watches have none)
   * @param {string} [options.protoPath]  featureviz.proto to load (default: see findProto)
   * @param {object} [options.channelOptions]  extra grpc-js channel options
   */
  constructor(address, { token, insecure, rootCerts, clientCert, clientKey, timeoutMs, protoPath,
    channelOptions } = {}) {
    if (typeof address !== 'string' || !address.includes(':')) {
      throw invalidArgument('address', `expected "host:port", got ${JSON.stringify(address)}`);
    }
    const credentials = channelCredentials(address, { insecure, rootCerts, clientCert, clientKey });
    const v1 = loadContract(protoPath);
    this._contract = v1;
    const options = { 'grpc.max_receive_message_length': 64 << 20, ...channelOptions };
    this.address = address;
    this.timeoutMs = timeoutMs;
    this._token = token;
    this._models = new v1.ModelService(address, credentials, options);
    // one channel for all three services
    const shared = { ...options, channelOverride: this._models.getChannel() };
    this._jobs = new v1.JobService(address, credentials, shared);
    this._info = new v1.InfoService(address, credentials, shared);
    this._serverInfo = null;
  }

  close() {
    this._models.close();
  }

  // ------------------------------------------------------------------------------------------------ info

  /** ServerInfo: version, limits, device, whether auth is required, the caller's tenant, objective kinds. */
  async serverInfo() {
    this._serverInfo = await this._unary(this._info, 'getServerInfo', {});
    return this._serverInfo;
  }

  // ---------------------------------------------------------------------------------------------- models

  /**
   * Upload an ONNX file (a path or a Buffer) in chunks and return the imported Model (state READY).
   * The file is hashed first; when the server already has the model no bytes are sent (`deduplicated`), and
   * when it holds the prefix of an interrupted upload of the same bytes the upload resumes from there.
   * @param {string|Buffer} source
   * @param {{name?: string, chunkSize?: number, preprocess?: object}} [options]
   */
  async uploadModel(source, { name, chunkSize, preprocess } = {}) {
    const { sha256, sizeBytes } = await digest(source);
    if (sizeBytes === 0) throw invalidArgument('source', 'the model file is empty');
    const displayName = name || (typeof source === 'string' ? path.basename(source) : '');
    const limit = chunkSize || await this._maxChunkBytes();
    const status = await this._unary(this._models, 'getUpload', { sha256, sizeBytes });
    const start = status.modelExists ? sizeBytes : status.committedBytes;
    const header = { sha256, sizeBytes, displayName, ...(preprocess ? { preprocess } : {}) };
    return this._upload(header, chunks(source, start, sizeBytes, limit));
  }

  /** How many bytes of an interrupted upload the server holds: UploadStatus {committedBytes, modelExists}. */
  async getUpload(sha256, sizeBytes = 0) {
    return this._unary(this._models, 'getUpload', { sha256, sizeBytes });
  }

  async getModel(model) {
    return this._unary(this._models, 'getModel', { model: modelRef(model) });
  }

  /** Every model of the caller's tenant; pages are fetched as the iterator advances. */
  async *listModels({ pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this._unary(this._models, 'listModels', { pageSize, pageToken });
      yield* page.models;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  async deleteModel(model) {
    await this._unary(this._models, 'deleteModel', { model: modelRef(model) });
  }

  /**
   * The layer catalog in topological order; pages are fetched as the iterator advances.
   * @param {object} [options] filter (substring of name, alias or op type), spatialOnly, pageSize
   */
  async *listLayers(model, { filter = '', spatialOnly = false, pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this.listLayersPage(model, { filter, spatialOnly, pageSize, pageToken });
      yield* page.layers;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** One page of the catalog: ListLayersResponse {layers, nextPageToken, totalSize}. */
  async listLayersPage(model, { filter = '', spatialOnly = false, pageSize = 0, pageToken = '' } = {}) {
    return this._unary(this._models, 'listLayers', { model: modelRef(model), filter, spatialOnly, pageSize,
      pageToken });
  }

  // ------------------------------------------------------------------------------------------------ jobs

  /**
   * Queue a render; returns the QUEUED Job at once. Bad specs reject with INVALID_ARGUMENT before any compute,
   * `details.field` naming the JobSpec field. See toJobSpec for the accepted shapes.
   * @param {object} spec
   * @param {{requestId?: string}} [options]  idempotency key: the same id returns the same job
   */
  async createJob(spec, { requestId = '' } = {}) {
    return this._unary(this._jobs, 'createJob', { spec: toJobSpec(spec, this._contract), requestId });
  }

  /**
   * The job's events: a snapshot first, then state changes, progress, previews (when asked), heartbeats and a
   * final `result` (the finished Job), after which the iterator ends. A stream that drops (UNAVAILABLE: a
   * network break or a server restart) is re-attached from the last seq seen, retrying with backoff for up to
   * `reconnectMs` after the drop. Leaving the loop early cancels the watch, never the job.
   * @param {object|string} job
   * @param {{fromSeq?: number, includePreviews?: boolean, reconnectMs?: number}} [options]
   */
  async *watchJob(job, { fromSeq = 0, includePreviews = false, reconnectMs = DEFAULT_RECONNECT_MS } = {}) {
    const request = { job: jobRef(job), fromSeq, includePreviews };
    let droppedAt = null;
    let delay = 0;
    for (;;) {
      const call = this._jobs.watchJob(request, this._metadata());
      try {
        for await (const event of call) {
          droppedAt = null;
          delay = 0;
          if (event.event !== 'snapshot' && event.event !== 'heartbeat') request.fromSeq = event.seq;
          yield event;
          if (event.event === 'result') return;
        }
        return;
      } catch (err) {
        droppedAt = droppedAt ?? Date.now();
        if (err.code !== grpc.status.UNAVAILABLE || Date.now() - droppedAt >= reconnectMs) throw fromGrpcError(err);
        delay = Math.min(Math.max(2 * delay, RECONNECT_FIRST_MS), RECONNECT_MAX_MS);
        await sleep(delay);
      } finally {
        call.cancel();
      }
    }
  }

  /** Watch until the job finishes and return the finished Job; `onEvent` sees every event on the way. */
  async waitJob(job, { onEvent, includePreviews = false } = {}) {
    for await (const event of this.watchJob(job, { includePreviews })) {
      if (onEvent) onEvent(event);
      if (event.event === 'result') return event.result;
    }
    throw new FeaturevizError(grpc.status.UNKNOWN, 'UNKNOWN', 'the watch ended without a result event', {});
  }

  async getJob(job) {
    return this._unary(this._jobs, 'getJob', { job: jobRef(job) });
  }

  /** Stop a queued or running job; returns the Job (CANCELLED once the scheduler has stopped it). */
  async cancelJob(job) {
    return this._unary(this._jobs, 'cancelJob', { job: jobRef(job) });
  }

  /** The caller's jobs, newest first; `state` filters, e.g. "JOB_STATE_RUNNING". No image bytes. */
  async *listJobs({ state = 'JOB_STATE_UNSPECIFIED', pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this._unary(this._jobs, 'listJobs', { state, pageSize, pageToken });
      yield* page.jobs;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  // ------------------------------------------------------------------------------------------------ atlases

  /**
   * Start an atlas (JobSpec.atlas): one image per channel of the selected layers (by name, op type or depth range;
   * none: every layer with channels), the first `channels` of each (unset: all), with render options (size, steps,
   * seed, lr, param, transforms, ...; unset: the atlas defaults 128 px, 256 steps, fft, standard, seed 0). Returns
   * the QUEUED or RUNNING Job at once: watch it with watchJob (a progress event per finished unit), stop it with
   * cancelJob (what is done stays), read it with listAtlasUnits and getAtlasUnit.
   */
  async createAtlas(model, { layers, opTypes, minDepth, maxDepth, channels, requestId = '', ...options } = {}) {
    const atlas = {};
    if (layers) atlas.layers = [].concat(layers);
    if (opTypes) atlas.opTypes = [].concat(opTypes);
    if (minDepth !== undefined) atlas.minDepth = minDepth;
    if (maxDepth !== undefined) atlas.maxDepth = maxDepth;
    if (channels !== undefined) atlas.channels = channels;
    const spec = toJobSpec({ model, objective: { tv: {} }, ...options }, this._contract);
    delete spec.objective;
    spec.atlas = atlas;
    return this._unary(this._jobs, 'createJob', { spec, requestId });
  }

  /** The atlas's progress per layer and in total (AtlasResult: units, done, layers, unitsPerHour, etaSeconds). */
  async atlasProgress(job) {
    return (await this._unary(this._jobs, 'listAtlasUnits', { job: jobRef(job), pageSize: 1 })).progress;
  }

  /** Every unit of the atlas (or of one `layer`), in order, done or not; pages are fetched as it advances. */
  async *listAtlasUnits(job, { layer = '', pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this._unary(this._jobs, 'listAtlasUnits', { job: jobRef(job), layer, pageSize, pageToken });
      yield* page.units;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** A finished unit and its PNG: {unit, png} (NOT_FOUND while it is not finished). */
  async getAtlasUnit(job, index) {
    return this._unary(this._jobs, 'getAtlasUnit', { job: jobRef(job), index });
  }

  // --------------------------------------------------------------------------------------------- helpers

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this._token) metadata.set('authorization', `Bearer ${this._token}`);
    return metadata;
  }

  _callOptions() {
    return this.timeoutMs ? { deadline: Date.now() + this.timeoutMs } : {};
  }

  _unary(stub, method, request) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata(), this._callOptions(), (err, reply) => {
        if (err) reject(fromGrpcError(err));
        else resolve(reply);
      });
    });
  }

  async _maxChunkBytes() {
    if (!this._serverInfo) await this.serverInfo();
    return this._serverInfo.limits.maxChunkBytes || DEFAULT_CHUNK_BYTES;
  }

  /** Client-streaming UploadModel: the header, then chunks with their write offsets, honouring backpressure. */
  async _upload(header, chunkIterator) {
    let settled = false;
    let call;
    const reply = new Promise((resolve, reject) => {
      call = this._models.uploadModel(this._metadata(), (err, model) => {
        settled = true;
        if (err) reject(fromGrpcError(err));
        else resolve(model);
      });
    });
    const replied = reply.then(() => true, () => true);
    const send = async (message) => {
      if (!call.write(message)) {
        await Promise.race([new Promise((resolve) => call.once('drain', resolve)), replied]);
      }
    };
    try {
      await send({ header });
      for await (const chunk of chunkIterator) {
        if (settled) break; // the server answered early (a rejected upload): its status is the answer
        await send({ chunk });
      }
      call.end();
    } catch (err) {
      call.cancel();
      throw err;
    }
    return reply;
  }
}

// ------------------------------------------------------------------------------------------------ byte sources

async function digest(source) {
  const hash = crypto.createHash('sha256');
  let sizeBytes = 0;
  if (Buffer.isBuffer(source) || source instanceof Uint8Array) {
    hash.update(source);
    sizeBytes = source.length;
  } else if (typeof source === 'string') {
    for await (const block of fs.createReadStream(source)) {
      hash.update(block);
      sizeBytes += block.length;
    }
  } else {
    throw invalidArgument('source', 'expected a file path or a Buffer of ONNX bytes');
  }
  return { sha256: hash.digest('hex'), sizeBytes };
}

/**
 * UploadChunk messages {writeOffset, data, finishWrite} of at most `limit` bytes, from byte `start` to `size`.
 * finishWrite marks the last one: a stream that ends without it broke, and the server keeps the prefix.
 */
async function* chunks(source, start, size, limit) {
  let offset = start;
  const chunk = (data) => {
    const message = { writeOffset: offset, data, finishWrite: offset + data.length >= size };
    offset += data.length;
    return message;
  };
  if (typeof source === 'string') {
    for await (const block of fs.createReadStream(source, { start, highWaterMark: limit })) {
      for (let at = 0; at < block.length; at += limit) yield chunk(block.subarray(at, at + limit));
    }
  } else {
    const bytes = Buffer.from(source.buffer, source.byteOffset, source.length);
    while (offset < size) yield chunk(bytes.subarray(offset, Math.min(offset + limit, size)));
  }
  if (offset !== size) {
    throw invalidArgument('source', `the file changed while uploading: ${offset} bytes read, ${size} hashed`);
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** True when a Job (or its state name) has finished: SUCCEEDED, FAILED or CANCELLED. */
function isTerminal(jobOrState) {
  return TERMINAL_STATES.has(typeof jobOrState === 'string' ? jobOrState : jobOrState && jobOrState.state);
}

module.exports = {
  Client, FeaturevizError, fromGrpcError, toJobSpec, toObjective, enumChoices, isTerminal, loadContract,
};

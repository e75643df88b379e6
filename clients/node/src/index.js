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
 * scores each class image: `result.images[i].judge` has its `rank` of the target class and its `probability`),
 * `generator` (with `param: 'generator'`) a Model, its sha256 or `{ model, latentL2 }` (an uploaded generator whose
 * latents are optimised instead of pixels).
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
  if (out.exemplarIndex !== undefined && out.exemplarIndex !== null) { // an index job: no objective
    if (spec.objective !== undefined) out.objective = toObjective(spec.objective, 'spec.objective', contract);
    out.exemplarIndex = toExemplarIndex(out.exemplarIndex, contract);
  } else {
    out.objective = toObjective(spec.objective, 'spec.objective', contract);
  }
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
  if (out.generator !== undefined && out.generator !== null) { // a Model, its sha256 or { model, latentL2 }
    const gen = typeof out.generator === 'object' && !out.generator.sha256 ? out.generator : { model: out.generator };
    out.generator = { model: modelRef(gen.model, 'spec.generator.model') };
    const l2 = gen.latentL2 ?? gen.latent_l2;
    if (l2 !== undefined && l2 !== null) out.generator.latentL2 = l2;
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
    // one channel for every service
    const shared = { ...options, channelOverride: this._models.getChannel() };
    this._jobs = new v1.JobService(address, credentials, shared);
    this._info = new v1.InfoService(address, credentials, shared);
    this._datasets = new v1.DatasetService(address, credentials, shared);
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

  // -------------------------------------------------------------------------------------------- datasets

  /**
   * Upload an image set and return the stored Dataset (its `report` says how many images it holds, and which
   * files were skipped and why, per cause, with up to 10 names each). `source`: a folder (every regular file
   * under it by relative name, hidden files and links left out), an array of image file paths (by base name),
   * one image file, or a zip or tar archive (a path or a Buffer; the kind is read from its first bytes). Folders
   * and files go as kind FILES (their bytes one after another, each listed in the header with its size and
   * sha256). As uploadModel, the stream is hashed first and resumes from the bytes the server holds of an
   * interrupted upload of the same stream; a broken stream (UNAVAILABLE and the like) resumes up to `retries`
   * times. A set the tenant holds already comes back with `deduplicated`.
   * @param {string|string[]|Buffer} source
   * @param {{name?: string, chunkSize?: number, retries?: number, onProgress?: (sent: number, total: number) => void}} [options]
   */
  async uploadDataset(source, { name, chunkSize, retries = 3, onProgress } = {}) {
    const upload = await datasetSource(source);
    const header = { sha256: upload.sha256, sizeBytes: upload.sizeBytes, kind: upload.kind, files: upload.files,
      displayName: name ?? upload.displayName };
    const limit = chunkSize || await this._maxChunkBytes();
    for (let attempt = 0; ; attempt++) {
      const status = await this.getDatasetUpload(upload.sha256, upload.sizeBytes);
      const blocks = streamChunks(partBlocks(upload.parts, status.committedBytes, limit), status.committedBytes,
        upload.sizeBytes, onProgress);
      try {
        return await this._upload(header, blocks, this._datasets, 'uploadDataset');
      } catch (err) {
        const resumable = RESUMABLE.has(err.codeName) || err.reason === 'WRITE_OFFSET_MISMATCH';
        if (!resumable || attempt >= retries) throw err;
        await sleep(Math.min(2000, 200 * 2 ** attempt));
      }
    }
  }

  /** How many bytes of an interrupted dataset upload the server holds: UploadStatus {committedBytes}. */
  async getDatasetUpload(sha256, sizeBytes = 0) {
    return this._unary(this._datasets, 'getDatasetUpload', { sha256, sizeBytes });
  }

  /** One of the tenant's sets, with its whole report (NOT_FOUND for a set the tenant does not hold). */
  async getDataset(dataset) {
    return this._unary(this._datasets, 'getDataset', { dataset: datasetRef(dataset) });
  }

  /** The tenant's sets (their reports without the names: getDataset has them); pages fetched as it advances. */
  async *listDatasets({ pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this._unary(this._datasets, 'listDatasets', { pageSize, pageToken });
      yield* page.datasets;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** A set's images {name, sha256, sizeBytes, format, width, height, converted}, in name order, paged. */
  async *listDatasetImages(dataset, { pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this._unary(this._datasets, 'listDatasetImages', { dataset: datasetRef(dataset), pageSize,
        pageToken });
      yield* page.images;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Delete a set: FAILED_PRECONDITION (DATASET_IN_USE, naming the jobs) while a queued or running job uses it. */
  async deleteDataset(dataset) {
    await this._unary(this._datasets, 'deleteDataset', { dataset: datasetRef(dataset) });
  }

  // ------------------------------------------------------------------------------------- dataset examples

  /**
   * Queue an exemplar index job (JobSpec.exemplarIndex): one pass of the set's images through the model, keeping
   * each channel's top images. Returns the QUEUED Job (or a SUCCEEDED one at once when a finished index is
   * reused: `result.exemplarIndex.cached`); follow it with watchJob / waitJob. `layers`: catalog names or
   * aliases (default: every catalog layer with channels), `k` examples kept per channel (default 16),
   * `batchSize` images per forward, `size` the input size every image is resized to (a number, [h, w] or
   * {height, width}; default the model's), `preprocess` (default the model's).
   */
  async indexExemplars(model, dataset, { layers = [], k, batchSize, size, preprocess, requestId = '' } = {}) {
    const exemplarIndex = { dataset: datasetRef(dataset), layers: [].concat(layers) };
    if (k !== undefined && k !== null) exemplarIndex.k = k;
    if (batchSize !== undefined && batchSize !== null) exemplarIndex.batchSize = batchSize;
    const spec = { model, exemplarIndex };
    if (size !== undefined && size !== null) spec.size = size;
    if (preprocess) spec.preprocess = preprocess;
    return this.createJob(spec, { requestId });
  }

  /**
   * One channel's ranked dataset examples from a finished index: GetExemplarsResponse {exemplars: [{rank, image
   * (sha256), name, value, x, y, box, imageBox, whole}], layer, channel, order, index, size, images, p50, p99,
   * max, fieldSize, fieldStride, whole}. `order`: "max" (top by spatial max), "mean" (top by spatial mean) or
   * "min" (bottom by spatial max); `k` default 9. NOT_FOUND (EXEMPLAR_INDEX_NOT_FOUND) until an index job ran.
   */
  async exemplars(model, dataset, layer, channel, { order = 'max', k = 9, size } = {}) {
    const request = { model: modelRef(model), dataset: datasetRef(dataset), layer, channel, k,
      order: enumName(enumChoices('ExemplarOrder', this._contract), order, 'order') };
    if (size !== undefined && size !== null) request.size = imageSize(size, 'size');
    return this._unary(this._datasets, 'getExemplars', request);
  }

  /**
   * One image of a set as a PNG Buffer: whole, or the crop of `box` {x0, y0, x1, y1} (in the original file's
   * pixels, end exclusive: an exemplar's imageBox), downscaled to `maxSide` (0: Limits.max_image_side). `image`
   * is the image's sha256 or its name in the set. Resolves with DatasetImageData {png, width, height, name,
   * sha256}.
   */
  async datasetImage(dataset, image, { box, maxSide = 0 } = {}) {
    const request = { dataset: datasetRef(dataset), image: typeof image === 'object' && image ? image.image
      || image.sha256 : image, maxSide };
    if (box) request.box = box;
    return this._unary(this._datasets, 'getDatasetImage', request);
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
    yield* this._follow({ watch: { job: jobRef(job), fromSeq, includePreviews }, reconnectMs });
  }

  /**
   * Queue a render and stream its events in one call (CreateAndWatchJob): the snapshot first (it names the job),
   * then as watchJob. A stream that drops is re-attached as watchJob's: by WatchJob from the last seq once the
   * snapshot named the job, before that by the same call again with the same request id (the server answers with
   * the job the first one made, if it made one: one job either way). Leaving the loop early cancels the watch,
   * never the job.
   * @param {object} spec  as for createJob
   * @param {{requestId?: string, includePreviews?: boolean, reconnectMs?: number}} [options]
   */
  async *createAndWatchJob(spec, { requestId = '', includePreviews = false, reconnectMs = DEFAULT_RECONNECT_MS }
    = {}) {
    const create = { spec: toJobSpec(spec, this._contract), requestId: requestId || crypto.randomUUID(),
      includePreviews };
    yield* this._follow({ create, watch: null, reconnectMs });
  }

  /** Queue a render and wait for it in one call (createAndWatchJob); resolves with the finished Job. */
  async runJob(spec, { onEvent, requestId = '', includePreviews = false, reconnectMs = DEFAULT_RECONNECT_MS } = {}) {
    for await (const event of this.createAndWatchJob(spec, { requestId, includePreviews, reconnectMs })) {
      if (onEvent) onEvent(event);
      if (event.event === 'result') return event.result;
    }
    throw new FeaturevizError(grpc.status.UNKNOWN, 'UNKNOWN', 'the job\'s watch ended without a result event', {});
  }

  /**
   * The events of one watch (`state.watch`: a WatchJobRequest; or `state.create`: a CreateAndWatchJobRequest,
   * until its snapshot names the job), re-attached after an UNAVAILABLE drop with backoff for up to
   * `state.reconnectMs` after it.
   */
  async *_follow(state) {
    let droppedAt = null;
    let delay = 0;
    for (;;) {
      const call = state.watch ? this._jobs.watchJob(state.watch, this._metadata())
        : this._jobs.createAndWatchJob(state.create, this._metadata());
      try {
        for await (const event of call) {
          droppedAt = null;
          delay = 0;
          if (!state.watch && event.event === 'snapshot') {
            state.watch = { job: event.snapshot.id, fromSeq: 0, includePreviews: state.create.includePreviews };
          } else if (event.event !== 'snapshot' && event.event !== 'heartbeat') {
            state.watch.fromSeq = event.seq;
          }
          yield event;
          if (event.event === 'result') return;
        }
        return;
      } catch (err) {
        droppedAt = droppedAt ?? Date.now();
        if (err.code !== grpc.status.UNAVAILABLE || Date.now() - droppedAt >= state.reconnectMs) {
          throw fromGrpcError(err);
        }
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
   * cancelJob (what is done stays), read it with listAtlasUnits and getAtlasUnit. `dataset`: a dataset id joined to
   * every unit (its exemplar index over the atlas's layers, built or reused: AtlasUnit datasetP50/P99/Max,
   * renderScore, activationRatio, selectivity, dead); `negative`: also render each unit's negative; `diversity`:
   * also a diversity set of N images per unit.
   */
  async createAtlas(model, { layers, opTypes, minDepth, maxDepth, channels, dataset, negative, diversity,
    requestId = '', ...options } = {}) {
    const atlas = {};
    if (layers) atlas.layers = [].concat(layers);
    if (opTypes) atlas.opTypes = [].concat(opTypes);
    if (minDepth !== undefined) atlas.minDepth = minDepth;
    if (maxDepth !== undefined) atlas.maxDepth = maxDepth;
    if (channels !== undefined) atlas.channels = channels;
    if (dataset) atlas.dataset = String(dataset).replace(/^datasets\//, '');
    if (negative) atlas.negative = true;
    if (diversity) atlas.diversity = diversity;
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

  /**
   * A finished unit and its PNG: {unit, png} (NOT_FOUND while it is not finished). `variant`: 'render',
   * 'negative' or 'diversity' (with `image`, the diversity set's image): NOT_FOUND naming a variant not rendered.
   */
  async getAtlasUnit(job, index, { variant = 'render', image = 0 } = {}) {
    return this._unary(this._jobs, 'getAtlasUnit', {
      job: jobRef(job), index, variant: `ATLAS_VARIANT_${String(variant).toUpperCase()}`, image,
    });
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

  /**
   * A client-streaming upload (UploadModel, or UploadDataset): the header, then chunks with their write offsets,
   * honouring backpressure.
   */
  async _upload(header, chunkIterator, stub = this._models, method = 'uploadModel') {
    let settled = false;
    let call;
    const reply = new Promise((resolve, reject) => {
      call = stub[method](this._metadata(), (err, model) => {
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

// ---------------------------------------------------------------------------------------------- dataset sources

const RESUMABLE = new Set(['UNAVAILABLE', 'CANCELLED', 'ABORTED', 'UNKNOWN', 'INTERNAL']); // the Python client's
const TAR_MAGICS = [Buffer.from([0x1f, 0x8b]), Buffer.from('BZh'), Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])];

/** A Dataset, "datasets/<id>" or "<id>" -> the string the server parses. */
function datasetRef(dataset, field = 'dataset') {
  if (typeof dataset === 'string' && dataset) return dataset;
  if (dataset && typeof dataset.id === 'string' && dataset.id) return dataset.id;
  throw invalidArgument(field, `expected a Dataset or its id, got ${JSON.stringify(dataset)}`);
}

/** A size as a number, [height, width] or {height, width} -> ImageSize. */
function imageSize(size, field) {
  if (typeof size === 'number') return { height: size, width: size };
  if (Array.isArray(size) && size.length === 2) return { height: size[0], width: size[1] };
  if (size && typeof size === 'object') return { height: size.height, width: size.width };
  throw invalidArgument(field, `expected a number, [height, width] or {height, width}, got ${JSON.stringify(size)}`);
}

/** ExemplarIndexSpec from friendly input (camelCase or snake_case; a Dataset for `dataset`). */
function toExemplarIndex(value, contract) {
  if (!value || typeof value !== 'object') throw invalidArgument('spec.exemplarIndex', 'expected an object');
  const out = toMessage(contract, 'ExemplarIndexSpec', { ...value, dataset: undefined },
    'spec.exemplar_index');
  out.dataset = datasetRef(value.dataset, 'spec.exemplar_index.dataset');
  return out;
}

/** The archive kind read from a stream's first bytes (the Python client's rule), or null. */
function archiveKind(head) {
  if (head.subarray(0, 4).equals(Buffer.from('PK\x03\x04', 'latin1'))
    || head.subarray(0, 4).equals(Buffer.from('PK\x05\x06', 'latin1'))) return 'DATASET_SOURCE_KIND_ZIP';
  if (TAR_MAGICS.some((magic) => head.subarray(0, magic.length).equals(magic))
    || (head.length >= 263 && head.subarray(257, 262).toString('latin1') === 'ustar')) {
    return 'DATASET_SOURCE_KIND_TAR';
  }
  return null;
}

/** Every regular file under `folder` (links not followed, hidden entries left out), by relative name, in the order
 *  of the Python client (a folder's files sorted, then its sub-folders sorted, depth first). */
function folderFiles(folder) {
  const found = [];
  const walk = (dir, prefix) => {
    const entries = fs.readdirSync(dir, { withFileTypes: true }).filter((e) => !e.name.startsWith('.'));
    const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    for (const entry of entries.filter((e) => e.isFile()).sort(byName)) {
      found.push([prefix + entry.name, path.join(dir, entry.name)]);
    }
    for (const entry of entries.filter((e) => e.isDirectory()).sort(byName)) {
      walk(path.join(dir, entry.name), `${prefix}${entry.name}/`);
    }
  };
  walk(folder, '');
  return found;
}

function readHead(file) {
  const fd = fs.openSync(file, 'r');
  try {
    const head = Buffer.alloc(512);
    return head.subarray(0, fs.readSync(fd, head, 0, 512, 0));
  } finally {
    fs.closeSync(fd);
  }
}

/** What an uploadDataset source sends: {parts (paths or Buffers, in stream order), files, kind, sha256,
 *  sizeBytes, displayName}. */
async function datasetSource(source) {
  let parts;
  let files = [];
  let kind;
  let displayName = '';
  if (Buffer.isBuffer(source) || source instanceof Uint8Array) {
    const bytes = Buffer.from(source.buffer, source.byteOffset, source.length);
    kind = archiveKind(bytes.subarray(0, 512));
    if (!kind) {
      throw invalidArgument('source', 'bytes given to uploadDataset must be a zip or tar archive; give a folder or '
        + 'image files by path');
    }
    parts = [bytes];
  } else if (Array.isArray(source) || (typeof source === 'string' && fs.existsSync(source)
    && fs.statSync(source).isDirectory())) {
    const entries = Array.isArray(source) ? source.map((p) => [path.basename(p), p]) : folderFiles(source);
    if (!entries.length) throw invalidArgument('source', `no files to upload in ${source}`);
    kind = 'DATASET_SOURCE_KIND_FILES';
    for (const [name, file] of entries) {
      const { sha256, sizeBytes } = await digest(file);
      files.push({ name, sizeBytes, sha256 });
    }
    parts = entries.map(([, file]) => file);
    displayName = Array.isArray(source) ? '' : path.basename(path.resolve(source));
  } else if (typeof source === 'string') {
    if (!fs.existsSync(source)) throw invalidArgument('source', `${source}: no such file or folder`);
    kind = archiveKind(readHead(source));
    if (!kind) { // one image file
      kind = 'DATASET_SOURCE_KIND_FILES';
      const { sha256, sizeBytes } = await digest(source);
      files = [{ name: path.basename(source), sizeBytes, sha256 }];
    }
    parts = [source];
    displayName = path.basename(source);
  } else {
    throw invalidArgument('source', 'expected a folder, image file paths, or a zip or tar archive (a path or a Buffer)');
  }
  const hash = crypto.createHash('sha256');
  let sizeBytes = 0;
  for await (const block of partBlocks(parts, 0, DEFAULT_CHUNK_BYTES)) {
    hash.update(block);
    sizeBytes += block.length;
  }
  return { parts, files, kind, sha256: hash.digest('hex'), sizeBytes, displayName };
}

/** The stream's bytes from `offset` (across the parts' boundaries), in blocks of exactly `limit` but the last. */
async function* partBlocks(parts, offset, limit) {
  let pending = [];
  let pendingBytes = 0;
  for (const part of parts) {
    const size = Buffer.isBuffer(part) ? part.length : fs.statSync(part).size;
    if (offset >= size) {
      offset -= size;
      continue;
    }
    const blocks = Buffer.isBuffer(part) ? [part.subarray(offset)]
      : fs.createReadStream(part, { start: offset, highWaterMark: limit });
    offset = 0;
    for await (const block of blocks) {
      pending.push(block);
      pendingBytes += block.length;
      while (pendingBytes >= limit) {
        const joined = Buffer.concat(pending);
        yield joined.subarray(0, limit);
        pending = [joined.subarray(limit)];
        pendingBytes = joined.length - limit;
      }
    }
  }
  if (pendingBytes) yield Buffer.concat(pending);
}

/** UploadChunk messages over byte blocks from `start` to `size` (finishWrite on the last); onProgress after each. */
async function* streamChunks(blocks, start, size, onProgress) {
  let offset = start;
  for await (const data of blocks) {
    const message = { writeOffset: offset, data, finishWrite: offset + data.length >= size };
    offset += data.length;
    if (onProgress) onProgress(offset, size);
    yield message;
  }
  if (offset !== size) {
    throw invalidArgument('source', `the files changed while uploading: ${offset} bytes read, ${size} hashed`);
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

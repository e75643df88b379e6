// The explorer's one door to the server: JSON over fetch, uploads over XHR (for upload progress), job events
// over EventSource. Every URL is relative, so the app also works behind a proxy under a sub-path.
import { sha256File, sha256Files } from "./sha256.js";

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code || `HTTP_${status}`;
    this.reason = error?.reason || "";
    this.fieldViolations = error?.field_violations || [];
  }
}

const listeners = { unauthenticated: [] };

/** Called with no arguments whenever the server answers 401 (the page then asks for a token). */
export function onUnauthenticated(callback) {
  listeners.unauthenticated.push(callback);
}

async function request(method, path, body) {
  const headers = { "X-Featureviz": "1" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new ApiError(response.status, data.error);
    if (response.status === 401 && path !== "api/login") listeners.unauthenticated.forEach((f) => f(error));
    throw error;
  }
  return data;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body = {}) => request("POST", path, body),
  del: (path) => request("DELETE", path),
};

/** Upload a File: its SHA-256 first (onHashing(doneBytes, totalBytes)), then the bytes (onProgress(sentBytes,
 *  totalBytes)); the server streams them into the store and checks the digest. Resolves with the model. */
export async function uploadModel(file, { preprocess, onHashing, onProgress } = {}) {
  const sha256 = await sha256File(file, onHashing);
  const params = new URLSearchParams({ name: file.name, sha256 });
  if (preprocess) {
    params.set("mean", preprocess.mean);
    params.set("std", preprocess.std);
    if (preprocess.bgr) params.set("bgr", "1");
  }
  return sendUpload(`api/models?${params}`, file, onProgress);
}

/** Upload an image set: {archive: File} (a zip or tar: kind read from its first bytes, as the clients do) or
 *  {files: [{name, file}]} (single files by relative name: kind files, the body a JSON list of the files then
 *  their bytes). The digests first (onHashing), then the body (onProgress). Resolves with the set and its report. */
export async function uploadDataset({ archive, files, name }, { onHashing, onProgress } = {}) {
  let body;
  const params = new URLSearchParams({ name: name || "" });
  if (archive) {
    params.set("kind", await archiveKind(archive));
    params.set("sha256", await sha256File(archive, onHashing));
    body = archive;
  } else {
    const { sha256, each } = await sha256Files(files.map((f) => f.file), onHashing);
    const manifest = new TextEncoder().encode(JSON.stringify(
      files.map((f, i) => ({ name: f.name, size: f.file.size, sha256: each[i] }))));
    params.set("kind", "files");
    params.set("sha256", sha256);
    params.set("manifest", String(manifest.length));
    body = new Blob([manifest, ...files.map((f) => f.file)]);
  }
  return sendUpload(`api/datasets?${params}`, body, onProgress);
}

/** "zip" or "tar" from a file's first bytes, or null (not an archive). */
export async function archiveKind(file) {
  const head = new Uint8Array(await file.slice(0, 512).arrayBuffer());
  const starts = (...bytes) => bytes.every((b, i) => head[i] === b);
  if (starts(0x50, 0x4b, 0x03, 0x04) || starts(0x50, 0x4b, 0x05, 0x06)) return "zip";
  if (starts(0x1f, 0x8b) || starts(0x42, 0x5a, 0x68) || starts(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00)) return "tar";
  if (head.length >= 263 && String.fromCharCode(...head.subarray(257, 262)) === "ustar") return "tar";
  return null;
}

/** POST a body over XHR (for upload progress) and resolve with the JSON answer. */
function sendUpload(url, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("X-Featureviz", "1");
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => onProgress?.(e.loaded, e.lengthComputable ? e.total : body.size);
    xhr.onload = () => {
      let data = {};
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON: keep the status */ }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(data);
      const error = new ApiError(xhr.status, data.error);
      if (xhr.status === 401) listeners.unauthenticated.forEach((f) => f(error));
      reject(error);
    };
    xhr.onerror = () => reject(new ApiError(0, { code: "UNAVAILABLE", message: "the upload broke off (network)" }));
    xhr.send(body);
  });
}

/** Follow a job's events (server-sent events). handlers: {snapshot, state, progress, preview, result, error}.
 *  The browser re-attaches by itself after a dropped connection (Last-Event-ID = the last seq). */
export function watchJob(jobId, handlers) {
  const source = new EventSource(`api/jobs/${encodeURIComponent(jobId)}/events`);
  for (const kind of ["snapshot", "state", "progress", "preview", "result", "failure"]) {
    source.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data);
      if (kind === "result") source.close();
      handlers[kind]?.(data);
    });
  }
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) handlers.error?.();
  };
  return () => source.close();
}

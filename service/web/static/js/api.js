// The explorer's one door to the server: JSON over fetch, uploads over XHR (for upload progress), job events
// over EventSource. Every URL is relative, so the app also works behind a proxy under a sub-path.
import { sha256File } from "./sha256.js";

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
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `api/models?${params}`);
    xhr.setRequestHeader("X-Featureviz", "1");
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => onProgress?.(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onload = () => {
      let data = {};
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON: keep the status */ }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(data);
      const error = new ApiError(xhr.status, data.error);
      if (xhr.status === 401) listeners.unauthenticated.forEach((f) => f(error));
      reject(error);
    };
    xhr.onerror = () => reject(new ApiError(0, { code: "UNAVAILABLE", message: "the upload broke off (network)" }));
    xhr.send(file);
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

"""The store: content-addressed model files on disk plus model and job metadata in SQLite.

Layout under the store directory::

    models/ab/abcdef....onnx      one file per distinct content (sha256), shared by the tenants that uploaded it
    images/ab/abcdef....          one dataset image per distinct content (sha256), shared by every set and tenant
    uploads/<sha256>.<tenant>.part  a partial upload, kept across broken streams so the client can resume
    uploads/dataset-<sha256>.<tenant>.part  the same for a dataset upload's stream (archive or files)
    staging/<random>/             a dataset upload being unpacked and checked (removed when it ends, and at start)
    indexes/<id>.npz              a finished exemplar index (``featureviz.engine.exemplars.ExemplarIndex`` format;
                                  written by the worker), shared by every tenant holding its model and set
    indexes/<id>.partial.npz      an unfinished pass's state after its last finished chunk (a rerun resumes it)
    featureviz.sqlite3            tables ``models`` (tenant, sha256 -> Model, catalog), ``jobs``, ``datasets``
                                  (tenant, id -> Dataset, image list) and ``dataset_images`` (id -> image sha256),
                                  ``atlas_units`` (an atlas job's units and their state) and ``unit_renders``
                                  (finished unit renders by content key: PNG, objective, device seconds),
                                  ``atlas_variants`` (a unit's negative and diversity renders), ``atlas_joins``
                                  (an atlas's dataset and exemplar index) and ``unit_scores`` (a render joined to
                                  an index: the channel's p50/p99/max over the set and the render's score)

Model rows and job rows hold their protos serialized, so the metadata is exactly what the API returns.
One connection serves the event loop and the scheduler thread behind a lock; every call is a short
statement (no compute), so the event loop may call it directly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from featureviz.errors import FailedPrecondition
from featureviz.errors import NotFound
from featureviz.errors import ResourceExhausted
from featureviz.errors import echo
from featureviz.phases import phase
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Store", "StoreCorrupt", "JobRow", "TERMINAL_STATES", "file_sha256", "resume_offset", "DISK_FULL_MESSAGE"]

UPLOAD_TTL_SECONDS = 24 * 3600
TERMINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    tenant TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    model BLOB NOT NULL,          -- featureviz.v1.Model
    layers BLOB NOT NULL,         -- featureviz.v1.ListLayersResponse holding the whole catalog
    create_time REAL NOT NULL,
    PRIMARY KEY (tenant, sha256)
);
CREATE TABLE IF NOT EXISTS jobs (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order: the queue order
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    state INTEGER NOT NULL,
    spec BLOB NOT NULL,           -- featureviz.v1.JobSpec
    result BLOB,                  -- featureviz.v1.JobResult
    error BLOB,                   -- featureviz.v1.JobError
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT ''          -- the worker of the latest attempt
);
CREATE TABLE IF NOT EXISTS datasets (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,             -- sha256 of the sorted image sha256 hex digests
    dataset BLOB NOT NULL,        -- featureviz.v1.Dataset (with this tenant's report)
    images BLOB NOT NULL,         -- featureviz.v1.ListDatasetImagesResponse holding every image, sorted by name
    create_time REAL NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS dataset_images (   -- which set holds which image file (any tenant): deletes by refcount
    dataset TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (dataset, sha256)
);
CREATE INDEX IF NOT EXISTS dataset_images_sha ON dataset_images (sha256);
CREATE TABLE IF NOT EXISTS exemplar_indexes (   -- finished exemplar indexes, by the sha256 of their key
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    info BLOB NOT NULL,           -- featureviz.v1.ExemplarIndexResult (cached unset)
    create_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tenant_indexes (     -- which tenant's jobs made or reused which index
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    use_time REAL NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS atlas_units (       -- an atlas job's units, in atlas order
    job TEXT NOT NULL,
    idx INTEGER NOT NULL,
    layer TEXT NOT NULL,
    depth INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    key TEXT NOT NULL,            -- the unit_renders key of its render
    state INTEGER NOT NULL DEFAULT 0,   -- 0 pending, 1 rendered for this atlas, 2 served from the store, 3 failed
    done_time REAL,
    PRIMARY KEY (job, idx)
);
CREATE TABLE IF NOT EXISTS unit_renders (      -- finished unit renders (atlas units), content-addressed
    key TEXT PRIMARY KEY,         -- sha256 of (model, objective, every render option, seed): featureviz.server.atlas
    model TEXT NOT NULL,
    png BLOB NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    objective REAL NOT NULL,
    device_seconds REAL NOT NULL,
    device TEXT NOT NULL,
    renders INTEGER NOT NULL DEFAULT 1,   -- times a render of this key finished (1, unless one ran twice)
    create_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS unit_renders_model ON unit_renders (model);
CREATE TABLE IF NOT EXISTS atlas_variants (    -- an atlas unit's variant renders (AtlasSpec.negative, .diversity)
    job TEXT NOT NULL,
    idx INTEGER NOT NULL,         -- the unit's idx in atlas_units
    variant INTEGER NOT NULL,     -- featureviz.v1.AtlasVariant (NEGATIVE, DIVERSITY)
    key TEXT NOT NULL,            -- its unit_renders key (a diversity set: image i under key/i)
    state INTEGER NOT NULL DEFAULT 0,   -- as atlas_units.state
    done_time REAL,
    PRIMARY KEY (job, idx, variant)
);
CREATE TABLE IF NOT EXISTS atlas_joins (       -- an atlas's dataset join (AtlasSpec.dataset)
    job TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    index_job TEXT NOT NULL,      -- the exemplar index job that builds (or reused) the index
    index_id TEXT NOT NULL        -- the exemplar_indexes id it makes
);
CREATE TABLE IF NOT EXISTS unit_scores (       -- a unit render joined to an exemplar index (content-addressed)
    index_id TEXT NOT NULL,
    key TEXT NOT NULL,            -- the unit_renders key
    p50 REAL NOT NULL,            -- the channel's spatial max over the index's images: p50, p99, max
    p99 REAL NOT NULL,
    max REAL NOT NULL,
    render_score REAL NOT NULL,   -- the render's spatial max on the same measure
    PRIMARY KEY (index_id, key)
);
-- Every query of a request's path searches an index, never scans a table that grows with use
-- (tests/service/test_service_store_plans.py). A partial index serves only queries that repeat its WHERE.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs (tenant, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant);                   -- ListJobs: newest first (ord)
CREATE INDEX IF NOT EXISTS jobs_tenant_state ON jobs (tenant, state);      -- the queue limit, ListJobs by state
CREATE INDEX IF NOT EXISTS models_sha ON models (sha256);                  -- a model's file, whoever holds it
CREATE INDEX IF NOT EXISTS datasets_id ON datasets (id);
CREATE INDEX IF NOT EXISTS atlas_joins_index ON atlas_joins (index_job);
"""

_JOB_COLUMNS = "id, tenant, request_id, model, state, spec, result, error, create_time, start_time, end_time, " \
               "attempts, last_seq, worker"
# the partial index jobs_request serves this only with its own WHERE repeated (else: a scan of every job stored)
_BY_REQUEST = "tenant = ? AND request_id = ? AND request_id != ''"


class JobRow:
    """One row of ``jobs`` as plain attributes."""

    __slots__ = tuple(c.strip() for c in _JOB_COLUMNS.split(","))

    def __init__(self, *values):
        for name, value in zip(self.__slots__, values):
            setattr(self, name, value)

    def to_proto(self, *, with_images: bool = True) -> pb.Job:
        job = pb.Job(id=self.id, name=f"jobs/{self.id}", request_id=self.request_id, state=self.state,
                     attempts=self.attempts, last_seq=self.last_seq, worker=self.worker or "")
        job.spec.ParseFromString(self.spec)
        job.steps = job.spec.steps if job.spec.HasField("steps") else 0
        job.create_time.FromNanoseconds(int(self.create_time * 1e9))
        if self.start_time:
            job.start_time.FromNanoseconds(int(self.start_time * 1e9))
        if self.end_time:
            job.end_time.FromNanoseconds(int(self.end_time * 1e9))
        if self.result:
            job.result.ParseFromString(self.result)
            job.step = job.result.steps_done
            if job.result.HasField("exemplar_index"):  # an index job's steps are the set's images
                job.steps = job.step
            job.objective.extend(image.objective_end for image in job.result.images)
            if not with_images:
                for image in job.result.images:
                    image.ClearField("png")
        if self.error:
            job.error.ParseFromString(self.error)
        return job


class StoreCorrupt(FailedPrecondition):
    """The SQLite database failed its check at start: the server refuses to start rather than fail requests."""

    reason = "STORE_CORRUPT"

    def __init__(self, path: Path, problem: str):
        super().__init__(
            f"the store database {path} is damaged ({problem[:200]}); the server will not start on it. Stop every "
            f"process using it, keep a copy, then recover it with `sqlite3 {path.name} .recover | sqlite3 "
            f"recovered.sqlite3` in {path.parent} and move recovered.sqlite3 over {path.name} (or restore a "
            f"backup). Model files under {path.parent / 'models'} are not affected.")


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "models").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        (self.root / "indexes").mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "indexes").glob(".*.tmp"):  # an index write a kill cut short
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.root / "staging", ignore_errors=True)  # unpacking that a stop or a crash cut short
        (self.root / "staging").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # reentrant: a transaction() holds it around the methods it groups
        self._intact: dict[str, tuple[int, int, int]] = {}  # sha256 -> stat signature of the file last found intact
        self.db_path = self.root / "featureviz.sqlite3"
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        try:
            # WAL with synchronous=NORMAL: a killed process (kill -9) loses no committed transaction
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                first = " ".join(problems[0].split())
                raise StoreCorrupt(self.db_path, f"quick_check found {len(problems)} problem(s), the first: {first}")
            self._db.executescript(_SCHEMA)
            if "worker" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:  # a store before it
                self._db.execute("ALTER TABLE jobs ADD COLUMN worker TEXT NOT NULL DEFAULT ''")
            if "dataset" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:
                # the dataset a job reads (the exemplar index job); '' for renders
                self._db.execute("ALTER TABLE jobs ADD COLUMN dataset TEXT NOT NULL DEFAULT ''")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreCorrupt(self.db_path, str(exc)) from None
        except StoreCorrupt:
            self._db.close()
            raise
        # reads of other threads go to a second connection while this one may hold a batch's transaction (WAL:
        # they see what is committed, never wait for the writer); the thread in a transaction reads its own writes
        self._reader = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._read_lock = threading.Lock()
        self._tx_owner: int | None = None
        # the models with a stored unit render (renders are never deleted; put_unit adds): a render of any other
        # model cannot end from the store, and its CreateJob computes no key and reads nothing for it
        self._rendered = {row[0] for row in self._db.execute("SELECT DISTINCT model FROM unit_renders")}
        # (tenant, sha256) -> its models row's Model bytes, as last read (every CreateJob reads its model): a write
        # to models bumps the generation and empties it, and so does the end of the transaction it was in; a read
        # keeps what it found only when the generation did not move meanwhile and no transaction is open, so it
        # never keeps a stale row
        self._model_rows: dict[tuple[str, str], bytes] = {}
        self._model_gen = 0
        self._models_in_tx = False  # the open transaction wrote models
        self._purge_stale_uploads()

    def _purge_stale_uploads(self) -> None:
        """Partial uploads nobody resumed within UPLOAD_TTL_SECONDS are dropped at start."""
        self.expire_partials(UPLOAD_TTL_SECONDS)

    def expire_partials(self, ttl: float, keep: set[Path] = frozenset()) -> None:
        """Drop the partial uploads (every tenant's) last written more than ``ttl`` seconds ago, except ``keep``."""
        cutoff = time.time() - ttl
        for partial in (self.root / "uploads").glob("*.part"):
            try:
                if partial not in keep and partial.stat().st_mtime < cutoff:
                    partial.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def partials(self, tenant: str) -> list[tuple[Path, int]]:
        """The tenant's partial uploads with their sizes, oldest (least recently written) first."""
        found = []
        for partial in (self.root / "uploads").glob(f"*.{_tenant_key(tenant)}.part"):
            try:
                stat = partial.stat()
            except FileNotFoundError:
                continue
            found.append((stat.st_mtime, partial, stat.st_size))
        return [(path, size) for _, path, size in sorted(found)]

    def trace(self, callback) -> None:
        """``callback(sql)`` with every statement either connection runs, its parameters inlined (None: stop). A
        diagnostic: the query-plan tests read what a request's path asks of SQLite."""
        with self._lock, self._read_lock:
            self._db.set_trace_callback(callback)
            self._reader.set_trace_callback(callback)

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

    @contextlib.contextmanager
    def transaction(self):
        """Group the statements of this thread's calls inside the block into one SQLite transaction (one commit),
        holding the store's lock meanwhile; nested: part of the outer one. An error rolls it back."""
        with phase("store"), self._lock, _disk_full(), self._tx():  # the store phase: BEGIN and COMMIT
            outer, self._tx_owner = self._tx_owner, threading.get_ident()
            try:
                yield
            finally:
                self._tx_owner = outer

    @contextlib.contextmanager
    def _tx(self):
        """BEGIN ... COMMIT (ROLLBACK on an error), or nothing inside a transaction already (call with the lock
        held)."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.rollback()
            self._models_ended()
            raise
        self._db.commit()
        self._models_ended()  # what it wrote to models is visible now

    def _run(self, sql: str, params=()) -> list[tuple]:
        if sql.startswith("SELECT") and self._tx_owner != threading.get_ident():
            with phase("store"), self._read_lock:  # committed rows, without waiting for a batch's transaction
                return self._reader.execute(sql, params).fetchall()
        with phase("store"), self._lock, _disk_full():
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------------------------------- files

    def model_path(self, sha256: str) -> Path:
        return self.root / "models" / sha256[:2] / f"{sha256}.onnx"

    def upload_path(self, sha256: str, tenant: str) -> Path:
        return self.root / "uploads" / f"{sha256}.{_tenant_key(tenant)}.part"

    def commit_file(self, partial: Path, sha256: str) -> Path:
        """Move a verified upload into the content-addressed tree (atomic). It replaces what is there: identical
        content, or a missing or corrupt file this upload restores."""
        final = self.model_path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        self._remember_intact(sha256, final)
        return final

    def read_model_file(self, sha256: str) -> bytes:
        """The stored file's bytes, checked against their sha256: every read to import goes through here. A
        missing or corrupt file marks the model FAILED for every tenant until the same bytes are uploaded again
        (:meth:`restore_model`), and raises FailedPrecondition (MODEL_FILE_MISSING, MODEL_CORRUPT)."""
        path = self.model_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._unusable(sha256, "MODEL_FILE_MISSING") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise self._unusable(sha256, "MODEL_CORRUPT")
        self._remember_intact(sha256, path)
        return data

    def file_intact(self, sha256: str) -> bool:
        """Whether the stored file exists and hashes to ``sha256``. It is hashed again only when its inode, size or
        mtime changed since it was last found intact; a damaged file marks the model FAILED."""
        path = self.model_path(sha256)
        try:
            signature = _signature(path)
        except FileNotFoundError:
            self._unusable(sha256, "MODEL_FILE_MISSING")
            return False
        with self._lock:
            if self._intact.get(sha256) == signature:
                return True
        if file_sha256(path) != sha256:
            self._unusable(sha256, "MODEL_CORRUPT")
            return False
        self._remember_intact(sha256, path)
        return True

    def _remember_intact(self, sha256: str, path: Path) -> None:
        with self._lock:
            self._intact[sha256] = _signature(path)

    def _unusable(self, sha256: str, reason: str) -> FailedPrecondition:
        """Mark every tenant's row of ``sha256`` FAILED with ``reason``; -> the error to raise."""
        if reason == "MODEL_CORRUPT":
            message = (f"the stored file of model {sha256} is corrupt (it no longer matches its sha256); upload the "
                       "same file again to restore it")
        else:
            message = f"the file of model {sha256} is missing from the store; upload the same file again to restore it"
        self._set_state(sha256, pb.MODEL_STATE_FAILED, reason, message)
        with self._lock:
            self._intact.pop(sha256, None)
        return FailedPrecondition(message, reason=reason)

    def restore_model(self, sha256: str) -> None:
        """The file of ``sha256`` is back (an upload of the same bytes): every tenant's row is READY again."""
        self._set_state(sha256, pb.MODEL_STATE_READY, "", "")

    def _models_changed(self) -> None:
        """A write to models (call after it): the rows read before are gone, again at the end of its transaction."""
        self._models_in_tx = self._models_in_tx or self._db.in_transaction
        self._model_gen += 1
        self._model_rows.clear()

    def _models_ended(self) -> None:
        if self._models_in_tx:
            self._models_in_tx = False
            self._models_changed()

    def _set_state(self, sha256: str, state: int, reason: str, message: str) -> None:
        with self._lock, _disk_full(), _then(self._models_changed):
            rows = self._db.execute("SELECT tenant, model FROM models WHERE sha256 = ?", (sha256,)).fetchall()
            for tenant, blob in rows:
                model = pb.Model.FromString(blob)
                if (model.state, model.failure_reason, model.failure_message) == (state, reason, message):
                    continue
                model.state, model.failure_reason, model.failure_message = state, reason, message
                self._db.execute("UPDATE models SET model = ? WHERE tenant = ? AND sha256 = ?",
                                 (model.SerializeToString(), tenant, sha256))

    # ------------------------------------------------------------------------------------------- models

    def put_model(self, tenant: str, model: pb.Model, layers: pb.ListLayersResponse) -> None:
        with _then(self._models_changed):
            self._run("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                      (tenant, model.sha256, model.SerializeToString(), layers.SerializeToString(), time.time()))

    def get_model(self, tenant: str, sha256: str) -> pb.Model:
        key = (tenant, sha256)
        blob = self._model_rows.get(key)
        if blob is None:
            generation = self._model_gen
            rows = self._run("SELECT model FROM models WHERE tenant = ? AND sha256 = ?", (tenant, sha256))
            if not rows:
                raise NotFound(f"model {echo(sha256)} not found; upload it first (featureviz models upload "
                               "FILE.onnx)", reason="MODEL_NOT_FOUND")
            blob = rows[0][0]
            if generation == self._model_gen and not self._db.in_transaction:
                self._model_rows[key] = blob
        return pb.Model.FromString(blob)

    def any_model(self, sha256: str) -> tuple[pb.Model, pb.ListLayersResponse] | None:
        """Metadata of these bytes as imported for any tenant (dedup: identical bytes are imported once)."""
        rows = self._run("SELECT model, layers FROM models WHERE sha256 = ? LIMIT 1", (sha256,))
        if not rows:
            return None
        return pb.Model.FromString(rows[0][0]), pb.ListLayersResponse.FromString(rows[0][1])

    def usage(self, tenant: str, *, besides: str = "") -> tuple[int, int]:
        """(models, bytes) the tenant's rows hold, leaving out the model ``besides`` (an upload of it again is not
        counted twice). A model shared with other tenants counts for each of them."""
        rows = self._run("SELECT model FROM models WHERE tenant = ? AND sha256 != ?", (tenant, besides))
        return len(rows), sum(pb.Model.FromString(row[0]).size_bytes for row in rows)

    def list_models(self, tenant: str, offset: int, limit: int) -> list[pb.Model]:
        rows = self._run("SELECT model FROM models WHERE tenant = ? ORDER BY create_time, sha256 LIMIT ? OFFSET ?",
                         (tenant, limit, offset))
        return [pb.Model.FromString(r[0]) for r in rows]

    def layers(self, tenant: str, sha256: str) -> list[pb.Layer]:
        rows = self._run("SELECT layers FROM models WHERE tenant = ? AND sha256 = ?", (tenant, sha256))
        if not rows:
            raise NotFound(f"model {echo(sha256)} not found", reason="MODEL_NOT_FOUND")
        return list(pb.ListLayersResponse.FromString(rows[0][0]).layers)

    def delete_model(self, tenant: str, sha256: str) -> None:
        """Drop the tenant's row; the file goes when no tenant and no unfinished job references it. Refused
        (FAILED_PRECONDITION, MODEL_IN_USE, naming the jobs) while the tenant has queued or running jobs on it, or
        that read it as their judge or generator (an atlas reads its generator for every unit)."""
        self.get_model(tenant, sha256)
        with self._lock, _disk_full():
            mine = [job_id for job_id, model, spec in self._db.execute(
                "SELECT id, model, spec FROM jobs WHERE tenant = ? AND state IN (?, ?) ORDER BY ord",
                (tenant, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING))
                if model == sha256 or sha256 in _models_read(spec)]
            if mine:
                named = ", ".join(f"jobs/{job_id}" for job_id in mine[:5]) + (f" and {len(mine) - 5} more"
                                                                             if len(mine) > 5 else "")
                raise FailedPrecondition(f"model {sha256} has {len(mine)} queued or running job(s): {named}; cancel "
                                         "them or let them finish, then delete the model", reason="MODEL_IN_USE")
            self._db.execute("DELETE FROM models WHERE tenant = ? AND sha256 = ?", (tenant, sha256))
            self._models_changed()
            users = self._db.execute("SELECT COUNT(*) FROM models WHERE sha256 = ?", (sha256,)).fetchone()[0]
            pending = self._db.execute("SELECT COUNT(*) FROM jobs WHERE model = ? AND state IN (?, ?)",
                                       (sha256, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)).fetchone()[0]
        if users == 0 and pending == 0:
            self.model_path(sha256).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- datasets

    def image_path(self, sha256: str) -> Path:
        return self.root / "images" / sha256[:2] / sha256

    def dataset_upload_path(self, sha256: str, tenant: str) -> Path:
        """A dataset upload's partial stream (``*.<tenant>.part``: counted with the models' partial uploads)."""
        return self.root / "uploads" / f"dataset-{sha256}.{_tenant_key(tenant)}.part"

    def staging_dir(self) -> Path:
        """A fresh folder for one upload being unpacked; the caller removes it."""
        path = self.root / "staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def commit_dataset(self, tenant: str, dataset: pb.Dataset, images: pb.ListDatasetImagesResponse,
                       staged: dict[str, Path]) -> None:
        """Move the staged images (sha256 -> file) that are not stored yet into ``images/`` and insert the tenant's
        row, as one step under the lock (a delete of another set cannot drop a file between the two). A failure
        (a full disk) removes the files this call added and leaves the rows as they were."""
        added: list[Path] = []
        with self._lock:
            try:
                with _disk_full():
                    for sha, path in staged.items():
                        final = self.image_path(sha)
                        if final.exists():
                            continue
                        final.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, final)  # the same file system: atomic, no new blocks
                        added.append(final)
                    with self._tx():  # one transaction
                        self._db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?)",
                                         (tenant, dataset.id, dataset.SerializeToString(), images.SerializeToString(),
                                          time.time()))
                        self._db.executemany("INSERT OR IGNORE INTO dataset_images VALUES (?, ?)",
                                             [(dataset.id, sha) for sha in staged])
            except BaseException:
                for final in added:
                    final.unlink(missing_ok=True)
                raise

    def get_dataset(self, tenant: str, dataset_id: str) -> pb.Dataset:
        rows = self._run("SELECT dataset FROM datasets WHERE tenant = ? AND id = ?", (tenant, dataset_id))
        if not rows:
            raise NotFound(f"dataset {echo(dataset_id)} not found; upload it first (featureviz datasets upload "
                           "DIR|ARCHIVE)", reason="DATASET_NOT_FOUND")
        return pb.Dataset.FromString(rows[0][0])

    def dataset_images(self, tenant: str, dataset_id: str) -> list[pb.DatasetImage]:
        """The set's images (name, sha256, size, format, size in pixels), sorted by name: what an index job reads,
        each file at :meth:`image_path`."""
        rows = self._run("SELECT images FROM datasets WHERE tenant = ? AND id = ?", (tenant, dataset_id))
        if not rows:
            raise NotFound(f"dataset {echo(dataset_id)} not found", reason="DATASET_NOT_FOUND")
        return list(pb.ListDatasetImagesResponse.FromString(rows[0][0]).images)

    def list_datasets(self, tenant: str, offset: int, limit: int) -> list[pb.Dataset]:
        rows = self._run("SELECT dataset FROM datasets WHERE tenant = ? ORDER BY create_time, id LIMIT ? OFFSET ?",
                         (tenant, limit, offset))
        return [pb.Dataset.FromString(r[0]) for r in rows]

    def count_datasets(self, tenant: str, *, besides: str = "") -> int:
        return self._run("SELECT COUNT(*) FROM datasets WHERE tenant = ? AND id != ?", (tenant, besides))[0][0]

    def jobs_using_dataset(self, tenant: str, dataset_id: str) -> list[str]:
        """The ids of the tenant's queued or running jobs that read the set, oldest first."""
        return [row[0] for row in self._run(
            "SELECT id FROM jobs WHERE tenant = ? AND dataset = ? AND state IN (?, ?) ORDER BY ord",
            (tenant, dataset_id, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING))]

    def delete_dataset(self, tenant: str, dataset_id: str) -> int:
        """Drop the tenant's row; the images no set of any tenant holds any more go too. Refused (FAILED_PRECONDITION,
        DATASET_IN_USE, naming the jobs) while the tenant has queued or running jobs on the set. -> files removed."""
        self.get_dataset(tenant, dataset_id)
        with self._lock, _disk_full():
            mine = [row[0] for row in self._db.execute(
                "SELECT id FROM jobs WHERE tenant = ? AND dataset = ? AND state IN (?, ?) ORDER BY ord",
                (tenant, dataset_id, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING))]
            if mine:
                named = ", ".join(f"jobs/{job_id}" for job_id in mine[:5]) + (f" and {len(mine) - 5} more"
                                                                             if len(mine) > 5 else "")
                raise FailedPrecondition(f"dataset {dataset_id} is used by {len(mine)} queued or running job(s): "
                                         f"{named}; cancel them or let them finish, then delete the dataset",
                                         reason="DATASET_IN_USE")
            orphans: list[str] = []
            unheld = False
            with self._tx():
                self._db.execute("DELETE FROM datasets WHERE tenant = ? AND id = ?", (tenant, dataset_id))
                holders = self._db.execute("SELECT COUNT(*) FROM datasets WHERE id = ?", (dataset_id,)).fetchone()[0]
                pending = self._db.execute("SELECT COUNT(*) FROM jobs WHERE dataset = ? AND state IN (?, ?)",
                                           (dataset_id, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)).fetchone()[0]
                if holders == 0 and pending == 0:
                    unheld = True
                    shas = [row[0] for row in self._db.execute(
                        "SELECT sha256 FROM dataset_images WHERE dataset = ?", (dataset_id,))]
                    self._db.execute("DELETE FROM dataset_images WHERE dataset = ?", (dataset_id,))
                    orphans = [sha for sha in shas if not self._db.execute(
                        "SELECT 1 FROM dataset_images WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()]
            for sha in orphans:
                self.image_path(sha).unlink(missing_ok=True)
            if unheld:  # what the worker learned from the set (its priors) goes with it
                shutil.rmtree(self.prior_dir(dataset_id), ignore_errors=True)
        return len(orphans)

    # ------------------------------------------------------------------------------------------- exemplar indexes

    def index_path(self, index_id: str) -> Path:
        """Where the finished index ``index_id`` (a sha256 hex digest, the server's) lives."""
        return self.root / "indexes" / f"{_hex(index_id)}.npz"

    def prior_dir(self, dataset_id: str) -> Path:
        """Where what the worker learns from set ``dataset_id`` (a sha256 hex digest, checked) is cached: its image
        statistics and patch prior per channel count, and their report (``report-<channels>.json``). The id is a
        digest of the set's images, so the cache is the same for every tenant holding the set."""
        return self.root / "priors" / _hex(dataset_id)

    def index_state_path(self, index_id: str) -> Path:
        """Where an unfinished pass of ``index_id`` keeps its state after each finished chunk."""
        return self.root / "indexes" / f"{_hex(index_id)}.partial.npz"

    def record_index(self, tenant: str, model: str, info: pb.ExemplarIndexResult) -> None:
        """Remember a finished index of ``model`` (sha256; once, for every tenant) and that ``tenant`` made or
        reused it."""
        now = time.time()
        stored = pb.ExemplarIndexResult()
        stored.CopyFrom(info)
        stored.cached = False
        with self._lock, _disk_full(), self._tx():
            self._db.execute("INSERT OR IGNORE INTO exemplar_indexes VALUES (?, ?, ?, ?, ?)",
                             (info.index, model, info.dataset, stored.SerializeToString(), now))
            self._db.execute("INSERT OR REPLACE INTO tenant_indexes VALUES (?, ?, ?)", (tenant, info.index, now))

    def get_index(self, index_id: str) -> tuple[str, pb.ExemplarIndexResult] | None:
        """(model sha256, info) of a finished index whose file is there, any tenant's; None otherwise."""
        rows = self._run("SELECT model, info FROM exemplar_indexes WHERE id = ?", (index_id,))
        if not rows or not self.index_path(index_id).is_file():
            return None
        return rows[0][0], pb.ExemplarIndexResult.FromString(rows[0][1])

    def tenant_index(self, tenant: str, index_id: str) -> tuple[str, pb.ExemplarIndexResult] | None:
        """(model sha256, info) of a finished index ``tenant``'s jobs made or reused, whose file is there; None
        otherwise (exemplar matching: a job's ``match`` terms name indexes by id)."""
        rows = self._run("SELECT i.model, i.info FROM tenant_indexes t JOIN exemplar_indexes i ON i.id = t.id "
                         "WHERE t.tenant = ? AND t.id = ?", (tenant, index_id))
        if not rows or not self.index_path(index_id).is_file():
            return None
        return rows[0][0], pb.ExemplarIndexResult.FromString(rows[0][1])

    def find_indexes(self, tenant: str, model: str, dataset: str) -> list[pb.ExemplarIndexResult]:
        """The tenant's finished indexes of ``model`` over ``dataset``, newest use first."""
        rows = self._run("SELECT i.info FROM tenant_indexes t JOIN exemplar_indexes i ON i.id = t.id "
                         "WHERE t.tenant = ? AND i.model = ? AND i.dataset = ? ORDER BY t.use_time DESC",
                         (tenant, model, dataset))
        return [pb.ExemplarIndexResult.FromString(r[0]) for r in rows]

    def forget_indexes(self, tenant: str, keep: int) -> None:
        """Keep the tenant's ``keep`` most recently used indexes (Limits.max_indexes_per_tenant); an index no tenant
        uses any more is deleted with its file."""
        with self._lock, _disk_full():
            dropped = [row[0] for row in self._db.execute(
                "SELECT id FROM tenant_indexes WHERE tenant = ? ORDER BY use_time DESC LIMIT -1 OFFSET ?",
                (tenant, keep))]
            orphans = []
            with self._tx():
                for index_id in dropped:
                    self._db.execute("DELETE FROM tenant_indexes WHERE tenant = ? AND id = ?", (tenant, index_id))
                    if not self._db.execute("SELECT 1 FROM tenant_indexes WHERE id = ? LIMIT 1",
                                            (index_id,)).fetchone():
                        self._db.execute("DELETE FROM exemplar_indexes WHERE id = ?", (index_id,))
                        orphans.append(index_id)
        for index_id in orphans:
            self.index_path(index_id).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- jobs

    def create_job(self, tenant: str, request_id: str, spec: pb.JobSpec, model_sha: str,
                   dataset: str = "") -> tuple[JobRow, bool]:
        """Insert a QUEUED job; with a request id already used by this tenant return that job. -> (row, created)."""
        with phase("store"), self._lock, _disk_full():
            job_id = uuid.uuid4().hex[:16]
            # the row as inserted (the columns' defaults: attempts 0, last_seq 0, worker ''): no read back
            row = JobRow(job_id, tenant, request_id, model_sha, pb.JOB_STATE_QUEUED, spec.SerializeToString(), None,
                         None, time.time(), None, None, 0, 0, "")
            try:  # a request id used before breaks jobs_request's uniqueness: then that job is the answer
                self._db.execute(
                    "INSERT INTO jobs (id, tenant, request_id, model, state, spec, create_time, dataset) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.id, tenant, request_id, model_sha, row.state, row.spec, row.create_time, dataset),
                )
            except sqlite3.IntegrityError:
                found = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {_BY_REQUEST}",
                                         (tenant, request_id)).fetchone() if request_id else None
                if found is None:
                    raise
                return JobRow(*found), False
        return row, True

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRow:
        rows = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows or (tenant is not None and rows[0][1] != tenant):
            raise NotFound(f"job {echo(job_id)} not found", reason="JOB_NOT_FOUND")
        return JobRow(*rows[0])

    def job_by_request(self, tenant: str, request_id: str) -> JobRow | None:
        rows = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {_BY_REQUEST}", (tenant, request_id))
        return JobRow(*rows[0]) if rows else None

    def list_jobs(self, tenant: str, state: int, offset: int, limit: int) -> list[JobRow]:
        where, params = "tenant = ?", [tenant]
        if state:
            where, params = where + " AND state = ?", params + [state]
        rows = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY ord DESC LIMIT ? OFFSET ?",
                         (*params, limit, offset))
        return [JobRow(*r) for r in rows]

    def count_jobs(self, tenant: str, states: tuple[int, ...]) -> int:
        marks = ", ".join("?" * len(states))
        return self._run(f"SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN ({marks})", (tenant, *states))[0][0]

    def unfinished_jobs(self) -> list[JobRow]:
        """QUEUED and RUNNING jobs in creation order (what a restarted scheduler re-queues)."""
        rows = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN (?, ?) ORDER BY ord",
                         (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING))
        return [JobRow(*r) for r in rows]

    def mark_running(self, job_id: str, worker: str = "") -> None:
        self._run("UPDATE jobs SET state = ?, start_time = ?, attempts = attempts + 1, worker = ? WHERE id = ?",
                  (pb.JOB_STATE_RUNNING, time.time(), worker, job_id))

    def mark_queued(self, job_id: str) -> None:
        self._run("UPDATE jobs SET state = ? WHERE id = ?", (pb.JOB_STATE_QUEUED, job_id))

    def finish_job(self, job_id: str, state: int, *, result: pb.JobResult | None = None,
                   error: pb.JobError | None = None) -> None:
        self._run("UPDATE jobs SET state = ?, result = ?, error = ?, end_time = ? WHERE id = ?",
                  (state, result.SerializeToString() if result is not None else None,
                   error.SerializeToString() if error is not None else None, time.time(), job_id))

    def set_last_seq(self, job_id: str, seq: int) -> None:
        self._run("UPDATE jobs SET last_seq = ? WHERE id = ?", (seq, job_id))

    # ------------------------------------------------------------------------------------------- atlases

    def add_atlas_units(self, job_id: str, units: list[tuple[str, int, int, str]]) -> None:
        """An atlas job's units ``(layer, depth, channel, key)``, in order (once, when the job is made)."""
        with self._lock, _disk_full(), self._tx():
            self._db.executemany("INSERT OR IGNORE INTO atlas_units (job, idx, layer, depth, channel, key) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", [(job_id, i, *unit) for i, unit in enumerate(units)])

    def atlas_units(self, job_id: str, layer: str = "", offset: int = 0, limit: int = -1) -> list[tuple]:
        """``(idx, layer, depth, channel, key, state, objective, device_seconds, device, width, height)`` of an
        atlas's units in order (the render's columns None while it is not done)."""
        where, params = ("a.job = ? AND a.layer = ?", (job_id, layer)) if layer else ("a.job = ?", (job_id,))
        return self._run("SELECT a.idx, a.layer, a.depth, a.channel, a.key, a.state, r.objective, r.device_seconds, "
                         "r.device, r.width, r.height FROM atlas_units a LEFT JOIN unit_renders r ON "
                         f"(a.state IN (1, 2) AND r.key = a.key) WHERE {where} ORDER BY a.idx LIMIT ? OFFSET ?",
                         (*params, limit, offset))

    def atlas_unit_count(self, job_id: str) -> int:
        return self._run("SELECT COUNT(*) FROM atlas_units WHERE job = ?", (job_id,))[0][0]

    def atlas_layers(self, job_id: str) -> list[tuple[str, int, int, int, int, int, float]]:
        """Per layer in atlas order: ``(layer, depth, units, rendered, cached, failed, device seconds rendered)``."""
        return self._run("SELECT a.layer, a.depth, COUNT(*), SUM(a.state = 1), SUM(a.state = 2), SUM(a.state = 3), "
                         "COALESCE(SUM(CASE WHEN a.state = 1 THEN r.device_seconds END), 0) FROM atlas_units a "
                         "LEFT JOIN unit_renders r ON r.key = a.key WHERE a.job = ? GROUP BY a.layer, a.depth "
                         "ORDER BY MIN(a.idx)", (job_id,))

    def atlas_rendered_times(self, job_id: str) -> tuple[int, float | None, float | None]:
        """(units rendered for the atlas, first and last done time) for its measured rate."""
        row = self._run("SELECT COUNT(*), MIN(done_time), MAX(done_time) FROM atlas_units WHERE job = ? AND "
                        "state = 1", (job_id,))[0]
        return int(row[0]), row[1], row[2]

    def pending_units(self, job_id: str) -> list[tuple[int, str, int, str]]:
        """``(idx, layer, channel, key)`` of the units not done yet, in order (what a restart resumes)."""
        return self._run("SELECT idx, layer, channel, key FROM atlas_units WHERE job = ? AND state = 0 ORDER BY idx",
                         (job_id,))

    def finish_unit(self, job_id: str, idx: int, state: int) -> None:
        self._run("UPDATE atlas_units SET state = ?, done_time = ? WHERE job = ? AND idx = ? AND state = 0",
                  (state, time.time(), job_id, idx))

    def put_unit(self, key: str, model: str, image: pb.RenderedImage, device_seconds: float, device: str) -> None:
        """A finished unit render, stored under its key (a second render of a key counts in ``renders``)."""
        self._rendered.add(model)  # before the row: a render may be looked up once it is committed
        with self._lock, _disk_full():
            self._db.execute(
                "INSERT INTO unit_renders (key, model, png, width, height, objective, device_seconds, device, "
                "create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET renders = renders + 1",
                (key, model, bytes(image.png), image.width, image.height, float(image.objective_end),
                 float(device_seconds), device, time.time()))

    def get_unit(self, key: str) -> tuple | None:
        """``(png, width, height, objective, device_seconds, device, renders)`` of a stored unit render, or None."""
        rows = self._run("SELECT png, width, height, objective, device_seconds, device, renders FROM unit_renders "
                         "WHERE key = ?", (key,))
        return rows[0] if rows else None

    def has_renders(self, model: str) -> bool:
        """Whether any unit render of this model is stored (from memory)."""
        return model in self._rendered

    def has_unit(self, key: str) -> bool:
        return bool(self._run("SELECT 1 FROM unit_renders WHERE key = ?", (key,)))

    def put_units(self, renders: list[tuple[str, pb.RenderedImage]], model: str, device_seconds: float,
                  device: str) -> None:
        """Several renders at once, in one transaction (a diversity set's images: all stored, or none)."""
        with self.transaction():
            for key, image in renders:
                self.put_unit(key, model, image, device_seconds, device)

    # ------------------------------------------------------------------------------------------- atlas variants

    def add_atlas_variants(self, job_id: str, variants: list[tuple[int, int, str]]) -> None:
        """An atlas's variant renders ``(idx, variant, key)`` (once, when the job is made)."""
        with self._lock, _disk_full(), self._tx():
            self._db.executemany("INSERT OR IGNORE INTO atlas_variants (job, idx, variant, key) VALUES (?, ?, ?, ?)",
                                 [(job_id, *v) for v in variants])

    def pending_variants(self, job_id: str) -> list[tuple[int, str, int, str, int]]:
        """``(idx, layer, channel, key, variant)`` of the variant renders not done yet."""
        return self._run("SELECT v.idx, a.layer, a.channel, v.key, v.variant FROM atlas_variants v JOIN atlas_units a "
                         "ON a.job = v.job AND a.idx = v.idx WHERE v.job = ? AND v.state = 0 ORDER BY v.idx, v.variant",
                         (job_id,))

    def finish_variant(self, job_id: str, idx: int, variant: int, state: int) -> None:
        self._run("UPDATE atlas_variants SET state = ?, done_time = ? WHERE job = ? AND idx = ? AND variant = ? AND "
                  "state = 0", (state, time.time(), job_id, idx, variant))

    def atlas_variants(self, job_id: str, first: int, last: int) -> list[tuple[int, int, int, str]]:
        """``(idx, variant, state, key)`` of the variants of units ``first..last``."""
        return self._run("SELECT idx, variant, state, key FROM atlas_variants WHERE job = ? AND idx BETWEEN ? AND ?",
                         (job_id, first, last))

    def variant_counts(self, job_id: str) -> tuple[int, int, int]:
        """(variant renders, done (rendered or served from the store), failed) of an atlas."""
        row = self._run("SELECT COUNT(*), SUM(state IN (1, 2)), SUM(state = 3) FROM atlas_variants WHERE job = ?",
                        (job_id,))[0]
        return int(row[0]), int(row[1] or 0), int(row[2] or 0)

    # ------------------------------------------------------------------------------------------- atlas joins

    def put_atlas_join(self, job_id: str, dataset: str, index_job: str, index_id: str) -> None:
        self._run("INSERT OR REPLACE INTO atlas_joins (job, dataset, index_job, index_id) VALUES (?, ?, ?, ?)",
                  (job_id, dataset, index_job, index_id))

    def atlas_join(self, job_id: str) -> tuple[str, str, str] | None:
        """``(dataset, index job, index id)`` of an atlas joined to a dataset, else None."""
        rows = self._run("SELECT dataset, index_job, index_id FROM atlas_joins WHERE job = ?", (job_id,))
        return rows[0] if rows else None

    def atlases_joining(self, index_job: str) -> list[str]:
        """The atlases whose join waits for this index job."""
        return [row[0] for row in self._run("SELECT job FROM atlas_joins WHERE index_job = ?", (index_job,))]

    def units_to_join(self, job_id: str, index_id: str) -> list[tuple[int, str, int, str]]:
        """``(idx, layer, channel, key)`` of the atlas's done units with no score for the index yet."""
        return self._run("SELECT a.idx, a.layer, a.channel, a.key FROM atlas_units a LEFT JOIN unit_scores s ON "
                         "s.index_id = ? AND s.key = a.key WHERE a.job = ? AND a.state IN (1, 2) AND s.key IS NULL "
                         "ORDER BY a.idx", (index_id, job_id))

    def joined_units(self, job_id: str, index_id: str) -> int:
        return self._run("SELECT COUNT(*) FROM atlas_units a JOIN unit_scores s ON s.index_id = ? AND s.key = a.key "
                         "WHERE a.job = ?", (index_id, job_id))[0][0]

    def put_scores(self, index_id: str, scores: list[tuple[str, float, float, float, float]]) -> None:
        """``(key, p50, p99, max, render_score)`` of unit renders joined to an index."""
        with self._lock, _disk_full(), self._tx():
            self._db.executemany("INSERT OR REPLACE INTO unit_scores (index_id, key, p50, p99, max, render_score) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", [(index_id, key, *(_real(v) for v in values))
                                                                for key, *values in scores])

    def unit_scores(self, index_id: str, keys: list[str]) -> dict[str, tuple[float, float, float, float]]:
        """key -> (p50, p99, max, render_score) for those of ``keys`` joined to the index."""
        out = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            rows = self._run(f"SELECT key, p50, p99, max, render_score FROM unit_scores WHERE index_id = ? AND key IN "
                             f"({','.join('?' * len(part))})", (index_id, *part))
            out.update({row[0]: row[1:] for row in rows})
        return out


def _real(value: float) -> float:
    """A score for SQLite (NaN, which it stores as NULL, counts as -inf: never active)."""
    value = float(value)
    return -math.inf if value != value else value


def resume_offset(partial: Path, size: int, *, drop: bool = False) -> int:
    """The bytes an unfinished upload holds, where its stream resumes; 0 when it holds more than the declared
    ``size`` (another file: with ``drop`` the partial is removed). ``size`` 0: not declared, whatever it holds."""
    held = partial.stat().st_size if partial.exists() else 0
    if size and held > size:
        if drop:
            partial.unlink(missing_ok=True)
        return 0
    return held


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _hex(digest: str) -> str:
    """A sha256 hex digest, checked: only those name files under the store."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha256 hex digest: {digest[:80]!r}")
    return digest


def _tenant_key(tenant: str) -> str:
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]  # tenant names never reach the file system


def _models_read(spec: bytes) -> tuple[str, str]:
    """The other models a stored job spec reads: its judge's and its generator's sha256 (empty when unset)."""
    parsed = pb.JobSpec.FromString(spec)
    return parsed.judge.model, parsed.generator.model


@contextlib.contextmanager
def _then(action):
    """Run ``action`` after the block, whether it raised or not."""
    try:
        yield
    finally:
        action()


@contextlib.contextmanager
def _disk_full():
    """SQLite's "database or disk is full" (and ENOSPC) -> ResourceExhausted(DISK_FULL); other errors pass."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL and "full" not in str(exc):
            raise
        raise ResourceExhausted(DISK_FULL_MESSAGE, reason="DISK_FULL") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ResourceExhausted(DISK_FULL_MESSAGE, reason="DISK_FULL") from None


DISK_FULL_MESSAGE = ("the server's disk is full: nothing was stored; retry later, or ask the operator to free space "
                     "in the store")

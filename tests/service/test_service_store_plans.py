"""The store's queries stay cheap as it fills: every statement a request's path runs searches an index (no scan of a
table that grows with use), and the work of creating a job does not grow with the jobs stored.

Found by bench/bench_server_cost.py (issue 26): the idempotency lookup of every CreateJob (``tenant = ? AND
request_id = ?``) could not use the partial index ``jobs_request`` (``WHERE request_id != ''``), so each creation
scanned every job ever stored, and 256 jobs took 0.4 s to create on a fresh store and 1.4 s after ten bursts.
Counted in SQLite's virtual-machine steps (deterministic), not in seconds.
"""

from __future__ import annotations

import re
import sqlite3
import threading

import pytest

from featureviz.client import Client
from featureviz.client import pb
from featureviz.errors import NotFound
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.server.store import Store
from support.images import image_bytes

_WRITES = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


def _scans(db_path, statements) -> dict[str, list[str]]:
    """The full scans SQLite's planner chooses for each statement (EXPLAIN QUERY PLAN on the same file)."""
    found = {}
    with sqlite3.connect(db_path) as db:
        for sql in statements:
            plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
            scans = [step for step in plan if step.startswith("SCAN")]
            if scans:
                found[sql[:300]] = scans
    return found


def test_every_statement_of_the_request_paths_searches_an_index(tiny_onnx, tmp_path):
    config = ServerConfig(tmp_path / "store", heartbeat_seconds=0.5, grace_seconds=2.0, progress_interval=0.0)
    statements: list[str] = []
    lock = threading.Lock()

    def seen(sql: str) -> None:
        if _WRITES.match(sql):
            with lock:
                statements.append(sql)

    with serve_in_background(config) as server:
        store = server._server.store
        store.trace(seen)
        try:
            with Client(server.address, timeout=60) as fv:  # what a tenant does, RPC by RPC
                model = fv.upload(tiny_onnx, name="tiny.onnx")
                fv.model(model.sha256)
                list(fv.models())
                list(fv.layers(model.sha256))
                spec = dict(steps=2, size=16, seed=1)
                job = fv.submit(model.sha256, {"channel": {"layer": "/Relu_1", "channel": 0}}, request_id="r-1", **spec)
                again = fv.submit(model.sha256, {"channel": {"layer": "/Relu_1", "channel": 0}}, request_id="r-1",
                                  **spec)
                assert again.id == job.id  # the idempotent retry: the lookup under test
                done = fv.wait(job.id, timeout=60)
                assert done.state == pb.JOB_STATE_SUCCEEDED
                fv.job(job.id)
                list(fv.jobs())
                list(fv.jobs(state=pb.JOB_STATE_SUCCEEDED))
                other = fv.submit(model.sha256, {"channel": {"layer": "/Relu_1", "channel": 1}}, **spec)
                fv.cancel(other.id)
                folder = tmp_path / "set"
                folder.mkdir()
                for i in range(3):
                    (folder / f"{i}.png").write_bytes(image_bytes(color=(10 * i, 20, 30)))
                dataset = fv.upload_dataset(folder)
                fv.dataset(dataset.name)
                list(fv.datasets())
                fv.delete_dataset(dataset.name)
        finally:
            store.trace(None)
        db_path = store.db_path
    assert len(statements) > 20, statements  # the trace saw the workload
    assert _scans(db_path, statements) == {}


def _steps(store: Store, fn) -> int:
    """SQLite virtual-machine instructions ``fn`` runs on the store's connections."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    connections = (store._db, store._reader)
    for db in connections:
        db.set_progress_handler(tick, 1)
    try:
        fn()
    finally:
        for db in connections:
            db.set_progress_handler(None, 1)
    return count[0]


def test_creating_a_job_does_not_grow_with_the_jobs_stored(tmp_path):
    store = Store(tmp_path / "store")
    spec = pb.JobSpec(model="0" * 64, steps=4)
    made = iter(range(10**6))

    def create_path(tenant: str) -> None:  # what CreateJob asks of the store (JobServicer._create)
        i = next(made)
        store.has_renders("0" * 64)
        store.count_jobs(tenant, (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING))
        row, created = store.create_job(tenant, f"req-{i}", spec, "0" * 64)
        assert created
        store.get_job(row.id, tenant)
        store.list_jobs(tenant, 0, 0, 20)

    for _ in range(25):  # a page of ListJobs is full before and after
        create_path("alice")
    fresh = _steps(store, lambda: create_path("alice"))
    for tenant in ("alice", "crowd"):  # thousands of finished jobs, the tenant's own and another's
        for _ in range(1500):
            row, _ = store.create_job(tenant, f"old-{next(made)}", spec, "0" * 64)
            store.finish_job(row.id, pb.JOB_STATE_SUCCEEDED)
    full = _steps(store, lambda: create_path("alice"))
    store.close()
    assert fresh > 0
    # a scan of the 3000 rows would cost tens of thousands of steps; a search of an index a few more than before
    assert full <= fresh * 1.5, (fresh, full)


def test_a_created_row_is_the_row_stored(tmp_path):
    """create_job answers the row it inserted without reading it back: it must be what a read finds."""
    store = Store(tmp_path / "store")
    spec = pb.JobSpec(model="1" * 64, steps=3, seed=7)
    made, created = store.create_job("alice", "req", spec, "1" * 64, dataset="d" * 64)
    read = store.get_job(made.id, "alice")
    store.close()
    assert created
    assert {k: getattr(made, k) for k in made.__slots__} == {k: getattr(read, k) for k in read.__slots__}
    assert made.to_proto() == read.to_proto()


def test_a_request_id_used_before_answers_its_job(tmp_path):
    """create_job inserts first; the request id's uniqueness (per tenant) finds a retry's job."""
    store = Store(tmp_path / "store")
    spec = pb.JobSpec(model="1" * 64, steps=3)
    first, created = store.create_job("alice", "req", spec, "1" * 64)
    again, created_again = store.create_job("alice", "req", pb.JobSpec(model="1" * 64, steps=9), "1" * 64)
    other, created_other = store.create_job("bob", "req", spec, "1" * 64)  # another tenant's id is its own
    plain = [store.create_job("alice", "", spec, "1" * 64) for _ in range(2)]  # no request id: always new
    stored = store.count_jobs("alice", (pb.JOB_STATE_QUEUED,))
    store.close()
    assert (created, created_again, created_other) == (True, False, True)
    assert again.id == first.id and pb.JobSpec.FromString(again.spec).steps == 3
    assert other.id != first.id
    assert all(made for _, made in plain) and plain[0][0].id != plain[1][0].id
    assert stored == 3


def test_the_models_with_unit_renders_are_known_after_a_restart(tmp_path):
    """CreateJob computes a render's key only for a model with a stored unit render (``has_renders``, from memory):
    a stored render must be known again when the store reopens, and one stored now at once."""
    store = Store(tmp_path / "store")
    image = pb.RenderedImage(index=0, png=b"png", width=1, height=1, objective_end=1.0)
    assert not store.has_renders("a" * 64)
    store.put_unit("k" * 64, "a" * 64, image, 0.1, "cpu")
    assert store.has_renders("a" * 64) and not store.has_renders("b" * 64)
    store.close()
    reopened = Store(tmp_path / "store")
    try:
        assert reopened.has_renders("a" * 64) and not reopened.has_renders("b" * 64)
        assert reopened.get_unit("k" * 64)[0] == b"png"
    finally:
        reopened.close()


def test_a_model_read_from_memory_is_never_stale(tmp_path):
    """get_model keeps the rows it read (every CreateJob reads its model): a second read runs no statement, and
    every write to models (an upload, a file found missing, inside a transaction or not, a delete) is seen by
    the next read."""
    store = Store(tmp_path / "store")
    sha = "a" * 64
    statements = []
    store._reader.set_trace_callback(statements.append)
    try:
        store.put_model("alice", pb.Model(sha256=sha, state=pb.MODEL_STATE_READY, name="one"),
                        pb.ListLayersResponse())
        assert store.get_model("alice", sha).name == "one"
        read = len(statements)
        assert store.get_model("alice", sha).name == "one" and len(statements) == read  # from memory
        store.put_model("alice", pb.Model(sha256=sha, state=pb.MODEL_STATE_READY, name="two"),
                        pb.ListLayersResponse())
        assert store.get_model("alice", sha).name == "two"
        with store.transaction():  # a batch that writes no model (the scheduler's events): the rows stay in memory
            store.set_last_seq("none", 1)
        read = len(statements)
        assert store.get_model("alice", sha).name == "two" and len(statements) == read
        with store.transaction():  # the file went missing, found inside a batch: seen once committed
            assert store.get_model("alice", sha).state == pb.MODEL_STATE_READY
            store._set_state(sha, pb.MODEL_STATE_FAILED, "MODEL_FILE_MISSING", "gone")
        failed = store.get_model("alice", sha)
        assert (failed.state, failed.failure_reason) == (pb.MODEL_STATE_FAILED, "MODEL_FILE_MISSING")
        store.restore_model(sha)
        assert store.get_model("alice", sha).state == pb.MODEL_STATE_READY
        store.delete_model("alice", sha)
        with pytest.raises(NotFound):
            store.get_model("alice", sha)
    finally:
        store.close()

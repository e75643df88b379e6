"""Fixtures of the server tests with a scripted worker: the REAL server (grpc.aio on 127.0.0.1:0, the scheduler,
the SQLite store, the event log) with only the worker replaced by :class:`support.fake_worker.FakeWorker`. No torch:
each test takes milliseconds, and the test, not a device, decides when each job starts, ends or is lost."""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_health")  # the server extra

from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.fake_worker import FakeWorker  # noqa: E402

TOKENS = {"tok-flood": "flood", "tok-calm": "calm", "tok-third": "third"}


@pytest.fixture()
def serve(tmp_path):
    """``serve(fake, **config) -> BackgroundServer`` on the test's store (the same store across calls: a restart);
    every server started is stopped at the end of the test."""
    started = []

    def start(fake: FakeWorker, **config):
        config.setdefault("tokens", TOKENS)
        config.setdefault("heartbeat_seconds", 0.5)
        running = serve_in_background(ServerConfig(tmp_path / "store", **config), worker=fake)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture()
def unfinished():
    """``unfinished(server, tenant) -> (in memory, stored)``: the queue limit's count of the tenant's unfinished jobs
    (``Scheduler.unfinished``) and the store's QUEUED and RUNNING rows of it, which it must equal."""
    from featureviz.v1 import featureviz_pb2 as pb

    def counts(server, tenant: str) -> tuple[int, int]:
        inner = server._server
        return (inner.scheduler.unfinished(tenant),
                inner.store.count_jobs(tenant, (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)))

    return counts

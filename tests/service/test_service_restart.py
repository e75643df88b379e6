"""Jobs survive the server: ``featureviz serve`` as a real subprocess, killed (SIGKILL) with one job running
and one queued: the restart on the same store re-queues both, and the exclusive one finishes with the same PNG
bytes as an uninterrupted exclusive run of the same seed (a non-exclusive job's bytes depend on its batch-mates).
Then a graceful stop (SIGTERM) mid-job leaves that job QUEUED."""

from __future__ import annotations

import signal

import pytest

from featureviz.client import Client
from featureviz.client import images
from featureviz.client import pb
from featureviz.server.store import Store
from support.serve import ServeProcess

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 5}}
# long enough that the job is still running when the test, having seen step 5, kills the server: the job runs
# on while that event reaches the test (seconds of margin on a loaded 2-core machine)
RUN_STEPS = 120


def _wait_for_step(fv: Client, job_id: str, step: int) -> int:
    last = 0
    for event in fv.watch(job_id, timeout=120):
        last = max(last, event.seq)
        if event.HasField("progress") and event.progress.step >= step:
            return last
    raise AssertionError(f"job {job_id} ended before step {step}")


@pytest.mark.slow
def test_jobs_survive_a_crash_and_a_graceful_restart(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    first = ServeProcess(store, "--max-step-images", "1")  # one job at a time: the second one waits in the queue
    try:
        with Client(first.address) as fv:
            model = fv.upload(tiny_onnx)
            running = fv.submit(model.sha256, CHANNEL, steps=RUN_STEPS, size=32, seed=7, exclusive=True)
            queued = fv.submit(model.sha256, CHANNEL, steps=10, size=32, seed=8)
            seen_seq = _wait_for_step(fv, running.id, 5)
    finally:
        first.stop(signal.SIGKILL)  # a crash: the job stays RUNNING in the store

    # what the crash left (read after the kill, so no job can move on in between): one job mid-run, one queued
    rows = Store(store)
    try:
        assert rows.get_job(running.id).state == pb.JOB_STATE_RUNNING, "the job finished before the kill"
        assert rows.get_job(queued.id).state == pb.JOB_STATE_QUEUED
    finally:
        rows.close()

    second = ServeProcess(store, "--threads", "1")
    try:
        with Client(second.address) as fv:
            assert fv.info().device.name.endswith(", 1 torch thread")  # --threads reached the compute worker
            rest = list(fv.watch(running.id, from_seq=seen_seq, timeout=240))
            assert all(e.seq > seen_seq for e in rest[1:])  # sequence numbers keep growing across restarts
            done = fv.job(running.id)
            assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempts == 2 and done.result.steps_done == RUN_STEPS
            other = fv.wait(queued.id, timeout=240)
            assert other.state == pb.JOB_STATE_SUCCEEDED and other.attempts == 1
            # an uninterrupted exclusive run of the same spec gives the same bytes (the restarted one ran beside the
            # other job, which the default max batch lets share the device: exclusive kept them apart)
            assert fv.info().max_step_images > 1
            reference = fv.wait(fv.submit(model.sha256, CHANNEL, steps=RUN_STEPS, size=32, seed=7,
                                          exclusive=True).id, timeout=240)
            assert images(reference) == images(done)

            long = fv.submit(model.sha256, CHANNEL, steps=10_000, size=32, seed=9)
            _wait_for_step(fv, long.id, 3)
    finally:
        assert second.stop(signal.SIGTERM) == 0  # graceful: the running job goes back to QUEUED

    # the store says what the next start will do: run it again from step 0
    rows = Store(store)
    try:
        again = rows.get_job(long.id)
        assert again.state == pb.JOB_STATE_QUEUED and again.attempts == 1 and again.result is None
        assert [row.id for row in rows.unfinished_jobs()] == [long.id]
    finally:
        rows.close()

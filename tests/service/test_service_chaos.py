"""Chaos: 40 jobs from 4 clients (tenants) while ``featureviz serve`` is killed (SIGKILL) and restarted on the same
store, up to three times, each kill once the clients have seen a number of progress events in that run (an event,
never a timer). Nothing may be lost: every job ends SUCCEEDED with its images, each tenant holds exactly its 10
jobs (CreateJob with the same request id after a kill returns the same job), and per job the events the clients
saw never repeat a seq and never go back (exactly once, across re-attaches and restarts), with one result each.

The server stores a batch of worker events in one SQLite transaction and publishes them after its commit
(issue 26): this is the test that a watcher never sees a seq that a kill could hand out again."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from featureviz.client import Client
from featureviz.client import pb
from support.serve import ServeProcess

TENANTS = ("c0", "c1", "c2", "c3")
JOBS_PER_TENANT = 10
CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}
STEPS = 24
KILLS = 3
PROGRESS_BEFORE_KILL = 12  # progress events seen in a run before it is killed


class Seen:
    """What the clients saw, across runs: per job, the seqs of its events (snapshots and heartbeats left out), the
    results, and a condition the test waits on."""

    def __init__(self):
        self.cv = threading.Condition()
        self.seqs: dict[str, list[int]] = {}
        self.results: dict[str, int] = {}
        self.progress = 0  # progress events seen in the current run
        self.jobs: dict[tuple[str, int], str] = {}  # (tenant, i) -> job id
        self.problems: list[str] = []

    def event(self, job_id: str, event: pb.JobEvent) -> None:
        with self.cv:
            if event.HasField("snapshot") or event.HasField("heartbeat"):
                return
            self.seqs.setdefault(job_id, []).append(event.seq)
            if event.HasField("progress"):
                self.progress += 1
            if event.HasField("result"):
                self.results[job_id] = self.results.get(job_id, 0) + 1
            self.cv.notify_all()


def _client_run(address: str, tenant: str, sha: str, seen: Seen, done: set) -> None:
    """One client's part of a run: (re)submit its jobs by request id, then watch each unfinished one from the
    last seq it saw until its result or until the server goes away."""
    try:
        with Client(address, token=tenant, timeout=60) as fv:
            for i in range(JOBS_PER_TENANT):
                job = fv.submit(sha, CHANNEL, steps=STEPS, size=32, seed=i, request_id=f"chaos-{tenant}-{i}")
                with seen.cv:
                    known = seen.jobs.setdefault((tenant, i), job.id)
                if known != job.id:
                    seen.problems.append(f"{tenant} job {i}: request id gave {job.id}, before {known}")
            for i in range(JOBS_PER_TENANT):
                job_id = seen.jobs[(tenant, i)]
                if job_id in done:
                    continue
                with seen.cv:
                    last = max(seen.seqs.get(job_id, [0]))
                for event in fv.watch(job_id, from_seq=last, timeout=300, reconnects=0):
                    seen.event(job_id, event)
                    if event.HasField("result"):
                        done.add(job_id)
    except Exception as exc:  # the server was killed: this run ends for this client
        with seen.cv:
            seen.cv.notify_all()
        return exc


@pytest.mark.slow
def test_sigkills_during_40_jobs_from_4_clients_lose_nothing(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    env = dict(os.environ, FEATUREVIZ_TOKENS=",".join(f"{t}={t}" for t in TENANTS))
    args = ("--max-step-images", "4", "--progress-interval", "0", "--threads", "1")
    seen, done = Seen(), set()
    sha = ""
    kills = 0
    for run in range(KILLS + 3):
        server = ServeProcess(store, *args, env=env)
        try:
            if not sha:
                for tenant in TENANTS:
                    with Client(server.address, token=tenant) as fv:
                        sha = fv.upload(tiny_onnx).sha256
            with seen.cv:
                seen.progress = 0
            threads = [threading.Thread(target=_client_run, args=(server.address, t, sha, seen, done))
                       for t in TENANTS]
            for thread in threads:
                thread.start()
            killed = False
            if kills < KILLS:
                with seen.cv:  # kill once enough progress was seen in this run, unless the clients are all done
                    seen.cv.wait_for(lambda: seen.progress >= PROGRESS_BEFORE_KILL
                                     or not any(t.is_alive() for t in threads), timeout=600)
                    enough = seen.progress >= PROGRESS_BEFORE_KILL
                if enough:
                    server.stop(signal.SIGKILL)
                    kills += 1
                    killed = True
            for thread in threads:
                thread.join(600)
                assert not thread.is_alive(), "a client did not end"
        finally:
            if server.proc.poll() is None:
                server.stop(signal.SIGKILL if not killed else signal.SIGTERM)
        if len(done) == len(TENANTS) * JOBS_PER_TENANT and not killed:
            break
    assert kills >= 1, "no kill happened: the jobs ended before enough progress was seen"
    assert not seen.problems, seen.problems
    assert len(done) == len(TENANTS) * JOBS_PER_TENANT

    # nothing lost: each tenant holds exactly its jobs, all SUCCEEDED with their images
    server = ServeProcess(store, *args, env=env)
    try:
        for tenant in TENANTS:
            with Client(server.address, token=tenant) as fv:
                listed = list(fv.jobs())
                assert sorted(j.id for j in listed) == sorted(seen.jobs[(tenant, i)] for i in range(JOBS_PER_TENANT))
                for i in range(JOBS_PER_TENANT):
                    job = fv.job(seen.jobs[(tenant, i)])
                    assert job.state == pb.JOB_STATE_SUCCEEDED, (tenant, i, job.state, job.error)
                    assert job.result.steps_done == STEPS and job.result.images[0].png
                    assert job.last_seq >= max(seen.seqs[job.id])
    finally:
        assert server.stop(signal.SIGTERM) == 0

    # exactly once: per job the seqs seen only grow (no repeat across re-attaches and restarts), one result each
    for job_id, seqs in seen.seqs.items():
        assert seqs == sorted(set(seqs)), (job_id, seqs)
        assert seen.results.get(job_id) == 1, (job_id, seen.results.get(job_id))

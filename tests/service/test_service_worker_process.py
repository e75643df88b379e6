"""The worker in its own process (``featureviz serve --worker-process``, ``featureviz.worker.process``).

A real ``featureviz serve --worker-process`` subprocess on a real port, the real tiny model: jobs run in the child
(one at a time and several in one device step), the server process maps no torch library while the child does,
every job's events arrive once and in order; a SIGKILL of the child during a job sends the job back to the queue
and it succeeds on the next child while the server stays up; a bad upload and a bad spec get the same status,
reason and message as from the in-process worker; a kill -9 of the server ends the child. And the wire's checks
without a server: what the child sends is unpickled with an allow-list, errors keep their class and fields.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import re
import select
import signal
import time
import urllib.request

import pytest

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from support.serve import ServeProcess

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_onnx):
    """``featureviz serve --worker-process`` with up to 8 images a step, every step's progress, metrics; the
    tiny model uploaded. The last test of this module kills it."""
    server = ServeProcess(tmp_path_factory.mktemp("store"), "--worker-process", "--max-step-images", "8",
                          "--progress-interval", "0", "--metrics-port", "0", "--threads", "1")
    with server:
        with Client(server.address, timeout=120) as fv:
            server.sha = fv.upload(tiny_onnx, name="tiny.onnx").sha256
        yield server


def _child(fv: Client) -> int:
    (worker,) = fv.info().workers
    assert worker.up and worker.pid
    return worker.pid


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _metrics(server: ServeProcess) -> dict[str, float]:
    url = next(m.group(1) for line in server.lines if (m := re.search(r"metrics on (http://\S+/metrics)", line)))
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("featureviz_")}


def _events(address: str, job_id: str) -> list:
    with Client(address, timeout=120) as fv:
        return [e for e in fv.watch(job_id, timeout=240) if e.WhichOneof("event") not in ("snapshot", "heartbeat")]


def _wait_exit(pid: int, seconds: float) -> bool:
    """Whether the process ``pid`` (not ours: no waitpid) has ended within ``seconds``: a wait on its pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def test_jobs_run_in_the_child_and_the_server_process_holds_no_torch(served):
    steps = 30
    with Client(served.address, timeout=120) as fv:
        child = _child(fv)
        one = fv.submit(served.sha, CHANNEL, steps=3, size=32, seed=1)
        assert fv.wait(one.id, timeout=240).state == pb.JOB_STATE_SUCCEEDED
        before = _metrics(served)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # at once: admissions in parallel in the child
            jobs = list(pool.map(lambda i: fv.submit(served.sha, CHANNEL, steps=steps, size=32, seed=10 + i),
                                 range(4)))
            streams = list(pool.map(lambda j: _events(served.address, j.id), jobs))
        done = [fv.job(j.id) for j in jobs]
    assert all(d.state == pb.JOB_STATE_SUCCEEDED and len(d.result.images) == 1 for d in done)
    for job, stream in zip(jobs, streams):  # once and in order: seqs contiguous, steps 1..N, one result at the end
        seqs = [e.seq for e in stream]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), job.id
        assert [e.progress.step for e in stream if e.HasField("progress")] == list(range(1, steps + 1)), job.id
        assert [e.HasField("result") for e in stream].count(True) == 1 and stream[-1].HasField("result")
    after = _metrics(served)
    steps_run = after["featureviz_batch_images_count"] - before["featureviz_batch_images_count"]
    images = after["featureviz_batch_images_sum"] - before["featureviz_batch_images_sum"]
    assert images == 4 * steps and steps_run < 4 * steps  # the 4 jobs shared device steps
    assert "libtorch" not in _maps(served.proc.pid)  # the server process: gRPC, the store, no torch
    assert "libtorch" in _maps(child)  # the check is real: the child that ran them has it
    assert any("listening on" in line and "event loop uvloop)" in line for line in served.lines)  # the server extra's


def test_a_job_cancelled_during_a_burst_ends_cancelled_and_the_rest_run(served):
    """A cancel during a burst (held while its admissions arrive, or already started) ends that job alone."""
    steps = 40
    with Client(served.address, timeout=120) as fv:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            jobs = list(pool.map(lambda i: fv.submit(served.sha, CHANNEL, steps=steps, size=32, seed=20 + i),
                                 range(6)))
            cancelled = fv.cancel(jobs[2].id)
            done = list(pool.map(lambda j: fv.wait(j.id, timeout=240), jobs))
    assert cancelled.id == jobs[2].id
    assert done[2].state == pb.JOB_STATE_CANCELLED and done[2].result.steps_done < steps
    others = [d for i, d in enumerate(done) if i != 2]
    assert all(d.state == pb.JOB_STATE_SUCCEEDED and d.result.steps_done == steps for d in others), \
        [pb.JobState.Name(d.state) for d in others]


def test_a_bad_upload_and_a_bad_spec_fail_as_with_the_in_process_worker(served, tmp_path):
    bad = b"\x08\x07" + b"not an onnx model" * 8
    spec = {"channel": {"layer": "/Relu_1", "channel": 99}}

    def outcome(address: str, sha: str | None) -> list:
        found = []
        with Client(address, timeout=120) as fv:
            with pytest.raises(FeaturevizClientError) as upload:
                fv.upload(bad, name="bad.onnx")
            found.append((upload.value.code, upload.value.reason, upload.value.message))
            if sha is not None:  # an error raised by admit in the worker
                with pytest.raises(FeaturevizClientError) as admit:
                    fv.submit(sha, spec, steps=4, size=32)
                found.append((admit.value.code, admit.value.reason, admit.value.message,
                              admit.value.field_violations))
        return found

    through_child = outcome(served.address, served.sha)
    assert through_child[0][0] == "INVALID_ARGUMENT", through_child
    assert through_child[1][0] == "INVALID_ARGUMENT" and through_child[1][1] == "INVALID_SPEC", through_child
    assert through_child[1][3] and through_child[1][3][0][0] == "spec.objective.channel.channel", through_child
    in_process = serve_in_background(ServerConfig(tmp_path / "store", grace_seconds=0.0))
    try:
        assert outcome(in_process.address, None) == through_child[:1]
    finally:
        in_process.stop()


def test_a_killed_child_sends_its_job_back_and_it_succeeds_on_the_next_one(served):
    steps = 400
    with Client(served.address, timeout=240) as fv:
        victim = _child(fv)
        job = fv.submit(served.sha, CHANNEL, steps=steps, size=32, seed=7)
        stream = fv.watch(job.id, timeout=240)
        for event in stream:
            if event.HasField("progress") and event.progress.step >= 2:
                break
        os.kill(victim, signal.SIGKILL)
        rest = [e for e in stream if e.WhichOneof("event") not in ("snapshot", "heartbeat")]
        done = fv.job(job.id)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.result.steps_done == steps
        states = [e.state for e in rest if e.WhichOneof("event") == "state"]
        assert pb.JOB_STATE_QUEUED in states  # it went back to the queue
        progress = [e.progress.step for e in rest if e.HasField("progress")]
        assert 1 in progress and progress[-1] == steps  # and ran again from step 0
        assert _child(fv) != victim
        again = fv.submit(served.sha, CHANNEL, steps=3, size=32, seed=8)
        assert fv.wait(again.id, timeout=240).state == pb.JOB_STATE_SUCCEEDED
    assert served.proc.poll() is None
    assert _wait_exit(victim, 60)
    assert any("died (killed by SIGKILL)" in line for line in served.lines), "".join(served.lines[-20:])


def test_kill_9_of_the_server_ends_its_child(served):
    """Last in this module: it kills the module's server."""
    with Client(served.address, timeout=120) as fv:
        child = _child(fv)
    served.stop(signal.SIGKILL)
    assert _wait_exit(child, 60), f"the worker process {child} outlived its server"


# ------------------------------------------------------------------------------------------- the wire


def test_what_the_child_sends_is_unpickled_with_an_allow_list():
    from featureviz.worker import api
    from featureviz.worker.process import load_reply

    event = api.WorkerEvent(api.FINISHED, "j", state=pb.JOB_STATE_SUCCEEDED, result=pb.JobResult(steps_done=3))
    assert load_reply(pickle.dumps(("events", [event]))) == ("events", [event])
    for hostile in (os.system, print, pickle.loads, ServeProcess):
        with pytest.raises(pickle.UnpicklingError, match="forbidden class"):
            load_reply(pickle.dumps(("reply", 1, True, hostile)))


def test_errors_cross_with_their_class_reason_and_field():
    from featureviz import errors
    from featureviz.worker.process import encode_error
    from featureviz.worker.process import load_reply
    from featureviz.worker.process import raise_error

    for exc in (errors.InvalidSpec("spec.size", "too big", reason="SIZE"), errors.Diverged(3, "the loss", 0.5),
                errors.SignInThrottled("slow down", retry_seconds=2.0),
                errors.ModelImportError("bad", reason="NOT_ONNX"), KeyError("k"),
                type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")):
        sent = load_reply(pickle.dumps(("reply", 1, False, encode_error(exc))))[3]
        with pytest.raises(BaseException) as raised:
            raise_error(sent)
        got = raised.value
        assert type(got).__name__ == type(exc).__name__ and str(got) == str(exc) and got.args == exc.args
        assert errors.code_name(got) == errors.code_name(exc) and errors.job_error(got) == errors.job_error(exc)
        assert getattr(got, "reason", None) == getattr(exc, "reason", None)
        assert getattr(got, "field", None) == getattr(exc, "field", None)


def test_a_child_that_dies_during_stop_does_not_hang_it():
    """The stop call is in flight to a frozen child (SIGSTOP), which is then killed: stop fails the call and
    returns (it does not wait for a reply that never comes, nor start another child)."""
    import threading

    from featureviz.worker.api import WorkerConfig
    from featureviz.worker.process import ProcessWorker

    worker = ProcessWorker(WorkerConfig(device="cpu", threads=1), model_source=lambda sha: None)
    worker.start(lambda events: None)
    child = worker.pid
    os.kill(child, signal.SIGSTOP)
    stopper = threading.Thread(target=worker.stop, args=(0.0,), daemon=True)
    stopper.start()
    with worker._lock:  # until the stop call is registered (sent to the frozen child): polled, with a deadline
        deadline = time.monotonic() + 60
        while not worker._calls and time.monotonic() < deadline:
            worker._lock.wait(0.01)
        assert worker._calls
    os.kill(child, signal.SIGKILL)
    stopper.join(120)
    assert not stopper.is_alive(), "stop waits for a dead child"
    assert _wait_exit(child, 60) and worker.pid == 0 and worker.restarts == 0

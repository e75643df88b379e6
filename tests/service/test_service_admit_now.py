"""Admission without a thread hop (issue 26): the in-process worker checks a render whose admission imports, fits and
decodes nothing on the caller's thread (the event loop's), as a done future; anything that may take long (a model not
in memory, a prior, a match, a judge, a generator, an init image, an atlas, an index, a memory probe) is not done
there. And while the device thread holds a step for admissions in flight, a submission does not wake it: the last
admission's end does. A real worker on the CPU, the tiny model.
"""

from __future__ import annotations

import threading

import pytest

from featureviz.codec import spec_to_proto
from featureviz.errors import InvalidSpec
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import Submission
from featureviz.worker import WorkerConfig
from featureviz.worker import adapter
from featureviz.worker import local_worker
from featureviz.worker import planner

SHA = "a" * 64
CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}


class _Sink:
    """The worker's events by kind, with an Event per job's start and end."""

    def __init__(self):
        self.events: list = []
        self.lock = threading.Lock()
        self.finished: dict[str, threading.Event] = {}

    def __call__(self, batch) -> None:
        for event in batch if isinstance(batch, list) else [batch]:
            with self.lock:
                self.events.append(event)
                if event.kind == "finished":
                    self.finished.setdefault(event.job_id, threading.Event()).set()

    def wait_finished(self, job_id: str) -> bool:
        with self.lock:
            done = self.finished.setdefault(job_id, threading.Event())
        return done.wait(120)


@pytest.fixture
def worker(tiny_onnx):
    asked: list[str] = []

    def source(sha):  # a model the cache does not hold is imported from here: recorded
        asked.append(sha)
        return tiny_onnx

    sink = _Sink()
    made = local_worker(WorkerConfig(device="cpu", max_step_images=4, progress_interval=0.0), model_source=source)
    made.start(sink)
    made.load_model(SHA, tiny_onnx)
    made.asked, made.sink = asked, sink
    try:
        yield made
    finally:
        made.stop(5.0)


def _body(**options) -> bytes:
    return spec_to_proto(SHA, CHANNEL, steps=3, size=16, **options).SerializeToString()


def test_a_render_of_a_held_model_is_checked_on_the_callers_thread_and_runs(worker, monkeypatch):
    first = worker.admit_future(SHA, _body(seed=1))  # its memory is probed once, on the device thread
    assert first is not None and first.result(120).ticket
    threads: list[int] = []
    checked_spec = adapter.checked_spec

    def recorded(*args, **kwargs):
        threads.append(threading.get_ident())
        return checked_spec(*args, **kwargs)

    monkeypatch.setattr(adapter, "checked_spec", recorded)
    body = _body(seed=2)
    future = worker.admit_future(SHA, body)
    assert future is not None and future.done()  # measured already: answered at once
    admission = future.result()
    assert threads == [threading.get_ident()]  # checked here, once
    assert (admission.steps, admission.batch, admission.seed) == (3, 1, 2)
    worker.submit(Submission("job-1", "t", SHA, body, images=1, ticket=admission.ticket))
    worker.admitting(0)
    assert worker.sink.wait_finished("job-1")
    finished = [e for e in worker.sink.events if e.job_id == "job-1" and e.kind == "finished"]
    assert finished[0].state == pb.JOB_STATE_SUCCEEDED
    assert worker.asked == []  # nothing was imported again


def test_a_bad_spec_is_refused_at_once_as_admit_refuses_it(worker):
    body = spec_to_proto(SHA, {"channel": {"layer": "/no/such/layer", "channel": 0}}, steps=3,
                         size=16).SerializeToString()
    with pytest.raises(InvalidSpec) as direct:
        worker.admit(SHA, body)
    future = worker.admit_future(SHA, body)
    assert future is not None and future.done()
    assert isinstance(future.exception(), InvalidSpec)
    assert (future.exception().field, future.exception().description) == (direct.value.field,
                                                                         direct.value.description)


def _with(**fields) -> bytes:
    spec = pb.JobSpec.FromString(_body(seed=1))
    for name, value in fields.items():
        if name == "init_image":
            spec.init_image = value
        else:
            getattr(spec, name).CopyFrom(value)
    return spec.SerializeToString()


@pytest.mark.parametrize("case", ["model not in memory", "prior", "match", "judge", "generator", "init image",
                                  "atlas", "exemplar index"])
def test_an_admission_that_may_take_long_is_left_to_a_thread(worker, case):
    sha, body, priors, matches = SHA, _body(seed=1), None, None
    if case == "model not in memory":
        sha = "b" * 64
    elif case == "prior":
        priors = {"d" * 64: {"images": 64}}
    elif case == "match":
        matches = {"e" * 16: object()}
    elif case == "judge":
        body = _with(judge=pb.Judge(model="c" * 64))
    elif case == "generator":
        body = _with(generator=pb.GeneratorSpec(model="c" * 64))
    elif case == "init image":
        body = _with(init_image=b"\x89PNG\r\n\x1a\n")
    elif case == "atlas":
        body = _with(atlas=pb.AtlasSpec(channels=1))
    else:
        body = _with(exemplar_index=pb.ExemplarIndexSpec(dataset="f" * 64))
    assert worker.admit_future(sha, body, priors, matches) is None
    assert worker.asked == []  # and nothing was imported on this thread


class _CountingCondition(threading.Condition):
    """The worker's condition, counting notify_all and signalling when the device thread holds for admissions."""

    def __init__(self, worker_ref: list):
        super().__init__()
        self.notified = 0
        self.worker_ref = worker_ref
        self.holding = threading.Event()

    def notify_all(self):
        self.notified += 1
        super().notify_all()

    def wait(self, timeout=None):
        if self.worker_ref and self.worker_ref[0]._holding:
            self.holding.set()
        return super().wait(timeout)


def test_a_submission_does_not_wake_a_step_held_for_admissions_and_the_last_end_does(tiny_onnx, monkeypatch):
    monkeypatch.setattr(planner, "HOLD_MAX_SECONDS", 120.0)  # the hold ends by the admissions' end, not by time
    sink, ref = _Sink(), []
    worker = local_worker(WorkerConfig(device="cpu", max_step_images=4, progress_interval=0.0),
                          model_source=lambda sha: tiny_onnx)
    cv = worker._cv = _CountingCondition(ref)
    ref.append(worker)
    worker.start(sink)
    try:
        worker.load_model(SHA, tiny_onnx)
        worker.admit(SHA, _body(seed=0))  # the memory probe, before the burst
        bodies = [_body(seed=i) for i in (1, 2)]
        tickets = [worker.admit(SHA, body).ticket for body in bodies]
        worker.admitting(2)  # two CreateJobs in flight
        worker.submit(Submission("job-1", "t", SHA, bodies[0], images=1, ticket=tickets[0]))
        assert cv.holding.wait(120)  # the device thread holds the step for the second one
        with cv:
            before = cv.notified
            worker.submit(Submission("job-2", "t", SHA, bodies[1], images=1, ticket=tickets[1]))
            assert cv.notified == before  # not woken by it
        worker.admitting(1)
        with cv:
            assert cv.notified == before  # nor by an admission's end while another is in flight
        worker.admitting(0)  # the last one's end: the hold ends, and both start in one step
        assert sink.wait_finished("job-1") and sink.wait_finished("job-2")
    finally:
        worker.stop(5.0)
    steps = [images for event in sink.events if event.kind == "steps" for images, _ in event.steps]
    assert steps[0] == 2
    assert all(e.state == pb.JOB_STATE_SUCCEEDED for e in sink.events if e.kind == "finished")

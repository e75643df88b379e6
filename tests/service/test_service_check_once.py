"""A job's spec is checked once (issue 22 item 2): the worker's admission builds a CheckedSpec (the objective built
from its one normalization, the transforms parsed), keeps it with the ticket, and the job's slot takes that very
object; the server does not convert the spec and throw the result away. A real server and a real worker.
"""

from __future__ import annotations

import threading

import pytest

from featureviz import spec as specs
from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.codec import spec_to_proto
from featureviz.engine import CheckedSpec
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.worker import Submission
from featureviz.worker import WorkerConfig
from featureviz.worker import local_worker

OBJECTIVE = {"sum": [{"channel": {"layer": "/Relu_1", "channel": 3}}, {"scale": {"factor": -0.05,
                                                                                "objective": {"tv": {}}}}]}


def test_a_job_normalizes_its_objective_at_most_twice_from_create_to_result(tmp_path, tiny_onnx, monkeypatch):
    """From CreateJob to the result: the codec's conversion of the JobSpec and validate's check, both in the worker's
    admission. Before (measured): 7, the server's thrown-away conversion and a build in every slot too (the memory
    key's one-image slot, the two memory probes' and the job's)."""
    calls: list[str] = []
    normalize = specs._normalize

    def counted(spec, path, depth, defaults, bare):
        if depth == 0:
            calls.append(path)
        return normalize(spec, path, depth, defaults, bare)

    config = ServerConfig(tmp_path, progress_interval=0.0, max_step_images=2)
    with serve_in_background(config) as running, Client(running.address, timeout=60) as fv:
        sha = fv.upload(tiny_onnx).sha256
        spec = spec_to_proto(sha, OBJECTIVE, steps=3, size=16, seed=1)  # the client's own check, not counted
        monkeypatch.setattr(specs, "_normalize", counted)
        done = fv.wait(fv.submit(sha, spec=spec).id, timeout=120)
        monkeypatch.setattr(specs, "_normalize", normalize)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.result.steps_done == 3
    # validate's, once (the codec's conversion of the JobSpec before it: "spec.objective")
    assert calls.count("objective") == 1 and len(calls) <= 2, calls


def test_the_slot_takes_the_very_checked_spec_that_admission_built(tiny_onnx):
    events: list = []
    started, finished = threading.Event(), threading.Event()

    def sink(batch):  # one event, or several at once (in order) when they queued together
        for event in batch if isinstance(batch, list) else [batch]:
            events.append(event)
            (started if event.kind == "started" else finished if event.kind == "finished" else threading.Event()).set()

    worker = local_worker(WorkerConfig(device="cpu", max_step_images=2, progress_interval=0.0),
                          model_source=lambda sha: None)
    worker.start(sink)
    try:
        sha = "a" * 64
        worker.load_model(sha, tiny_onnx)
        body = spec_to_proto(sha, OBJECTIVE, steps=100_000, size=16, seed=2).SerializeToString()
        admission = worker.admit(sha, body)
        with worker._cv:
            checked = worker._tickets[admission.ticket][1]
        assert isinstance(checked, CheckedSpec)
        worker.submit(Submission("job-1", "t", sha, body, images=1, ticket=admission.ticket))
        assert started.wait(120)
        with worker._cv:
            slot = worker._jobs["job-1"].slot
        assert slot.checked is checked and slot.objective is checked.objective  # no second parse
        assert slot.transforms.steps is checked.transforms  # parsed once
        worker.cancel("job-1")
        assert finished.wait(120)
    finally:
        worker.stop(5.0)
    assert [e.kind for e in events if e.job_id == "job-1"][0] == "started"


@pytest.mark.parametrize("objective, field", [
    (pb.Objective(), "spec.objective"),
    (pb.Objective(sum=pb.SumObjective(terms=[pb.Objective(tv=pb.TotalVariationObjective()), pb.Objective()])),
     "spec.objective.sum.terms[1]"),
])
def test_a_structurally_bad_spec_is_still_refused_before_queueing(client, tiny_model, objective, field):
    """The server no longer converts the spec itself: the worker's admission refuses it, with the proto path."""
    before = len(list(client.jobs()))
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, spec=pb.JobSpec(model=tiny_model.sha256, objective=objective, steps=3))
    assert err.value.code == "INVALID_ARGUMENT"
    assert [f for f, _ in err.value.field_violations] == [field]
    assert len(list(client.jobs())) == before  # no job was made

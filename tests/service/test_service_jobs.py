"""JobService against a real server: a full job with progress, previews and PNG results; re-attach after a
dropped stream; cancel mid-run; deadlines; idempotent create; admission errors before any compute; a job
that fails while running."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import images
from featureviz.client import pb
from featureviz.client import to_pil
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from support.models import export_onnx

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}


def _kinds(events):
    return [e.WhichOneof("event") for e in events]


def test_full_job_streams_progress_previews_and_pngs(client, tiny_model):
    job = client.submit(tiny_model.sha256, CHANNEL, steps=12, size=32, batch=2, seed=5, preview_every=6,
                        preview_max_side=16)
    # the worker may pick the job up, or even finish its 12 short steps, before CreateJob reads it back
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED)
    assert job.spec.model == tiny_model.sha256
    events = list(client.watch(job.id, previews=True, timeout=120))
    kinds = _kinds(events)
    assert kinds[0] == "snapshot" and kinds[-1] == "result"
    logged = [e for e in events if e.WhichOneof("event") not in ("snapshot", "heartbeat")]
    assert [e.seq for e in logged] == list(range(logged[0].seq, logged[0].seq + len(logged)))  # no gaps
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == list(range(1, 13)) and {p.steps for p in progress} == {12}
    assert all(len(p.objective) == 2 and all(math.isfinite(v) for v in p.objective) for p in progress)
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == [6, 12]
    assert all(len(p.images) == 2 and all(max(to_pil(i.png).size) == 16 for i in p.images) for p in previews)

    done = client.job(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempts == 1 and done.result.steps_done == 12
    pngs = images(done)
    assert len(pngs) == 2
    for png, meta in zip(pngs, done.result.images):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        assert (meta.width, meta.height) == (32, 32)
        assert math.isfinite(meta.objective_start) and math.isfinite(meta.objective_end)
    assert pngs[0] != pngs[1]  # two images of a batch differ
    assert set(done.result.phase_seconds) >= {"model", "optimizer"} and done.result.seconds_per_step >= 0
    # without previews asked, none are sent
    assert "preview" not in _kinds(client.watch(job.id))


def test_same_seed_same_images(client, tiny_model):
    a = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=6, size=32, seed=11).id, timeout=120)
    b = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=6, size=32, seed=11).id, timeout=120)
    c = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=6, size=32, seed=12).id, timeout=120)
    assert images(a) == images(b) != images(c)
    # wait() returns the stream's result event: the finished job exactly as GetJob answers it (last_seq included)
    assert a == client.job(a.id) and a.last_seq > 0


def test_reattach_after_a_dropped_stream(client, tiny_model):
    job = client.submit(tiny_model.sha256, CHANNEL, steps=60, size=32)
    seen = []
    for event in client.watch(job.id, timeout=120):  # leaving the loop cancels the stream, not the job
        seen.append(event)
        if len([e for e in seen if e.HasField("progress")]) == 5:
            break
    last = seen[-1].seq
    rest = list(client.watch(job.id, from_seq=last, timeout=120))
    assert rest[0].HasField("snapshot") and rest[0].snapshot.state != pb.JOB_STATE_CANCELLED
    logged = [e for e in rest[1:] if not e.HasField("heartbeat")]
    assert [e.seq for e in logged] == list(range(last + 1, last + 1 + len(logged)))  # nothing lost or repeated
    steps = [e.progress.step for e in seen + rest if e.HasField("progress")]
    assert steps == list(range(1, 61))
    assert rest[-1].HasField("result") and rest[-1].result.state == pb.JOB_STATE_SUCCEEDED
    # re-attaching to a finished job still ends with its result
    again = list(client.watch(job.id, from_seq=rest[-1].seq))
    assert _kinds(again) == ["snapshot", "result"] and again[-1].result.result.steps_done == 60


def test_cancel_mid_run_stops_within_a_few_steps(client, tiny_model):
    job = client.submit(tiny_model.sha256, CHANNEL, steps=5000, size=64)
    step_at_cancel, reply = None, None
    for event in client.watch(job.id, timeout=300):
        if event.HasField("progress") and event.progress.step >= 3 and step_at_cancel is None:
            step_at_cancel = event.progress.step
            reply = client.cancel(job.id)
        if event.HasField("result"):
            break
    done = client.job(job.id)
    assert done.state == pb.JOB_STATE_CANCELLED
    # The job runs on while the event travels to us and the cancel back, so the bound is taken from the
    # cancel's reply: the step the job had reached once the flag was set. Only the step then in flight may
    # still complete (the flag is checked before every step).
    assert reply.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLED)
    assert step_at_cancel <= reply.step <= done.result.steps_done <= reply.step + 1
    assert len(images(done)) == 1  # the partial image is kept
    assert client.cancel(job.id).state == pb.JOB_STATE_CANCELLED  # cancelling again is harmless


def test_cancel_a_queued_job_and_a_finished_one(client, tiny_model):
    # a blocker as large as the worker's batch: the next job waits in the queue
    blocker = client.submit(tiny_model.sha256, CHANNEL, steps=5000, size=32, batch=client.info().max_step_images)
    queued = client.submit(tiny_model.sha256, CHANNEL, steps=5, size=32)
    assert client.job(queued.id).state == pb.JOB_STATE_QUEUED
    assert client.cancel(queued.id).state == pb.JOB_STATE_CANCELLED
    client.cancel(blocker.id)
    assert client.wait(blocker.id, timeout=120).state == pb.JOB_STATE_CANCELLED
    finished = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=2, size=32).id, timeout=120)
    with pytest.raises(FeaturevizClientError) as err:
        client.cancel(finished.id)
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "JOB_FINISHED"


def test_client_deadline_ends_the_watch_not_the_job(client, tiny_model):
    # the longest job the server allows: it cannot end by itself during this test, only by the cancel below
    job = client.submit(tiny_model.sha256, CHANNEL, steps=client.info().limits.max_steps, size=32)
    for event in client.watch(job.id, timeout=120):  # wait for the job to be running (an event, not a clock)
        if event.HasField("progress"):
            break
    with pytest.raises(FeaturevizClientError) as err:
        for _ in client.watch(job.id, timeout=0.5):
            pass
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert client.job(job.id).state == pb.JOB_STATE_RUNNING
    client.cancel(job.id)
    assert client.wait(job.id, timeout=120).state == pb.JOB_STATE_CANCELLED


def test_create_is_idempotent_on_request_id(client, tiny_model):
    first = client.submit(tiny_model.sha256, CHANNEL, steps=3, size=32, request_id="req-1")
    second = client.submit(tiny_model.sha256, CHANNEL, steps=3, size=32, request_id="req-1")
    assert first.id == second.id
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, {"layer": {"layer": "/Relu"}}, request_id="req-1")
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == "request_id"
    client.wait(first.id, timeout=120)


@pytest.mark.parametrize("objective, field, words", [
    ({"channel": {"layer": "/nope", "channel": 0}}, "spec.objective.channel.layer", "unknown layer"),
    ({"channel": {"layer": "/Relu_1", "channel": 16}}, "spec.objective.channel.channel", "out of range"),
    ({"sum": [{"tv": {}}, {"neuron": {"layer": "/Relu", "channel": 99}}]},
     "spec.objective.sum.terms[1].neuron.channel", "out of range"),
    ({"logit": {"index": 10}}, "spec.objective.logit.index", "out of range"),
])
def test_bad_objective_is_rejected_before_any_compute(client, tiny_model, objective, field, words):
    before = len(list(client.jobs()))
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, objective, steps=3, size=32)
    assert err.value.code == "INVALID_ARGUMENT"
    assert [f for f, _ in err.value.field_violations] == [field]
    assert words in err.value.message
    assert len(list(client.jobs())) == before  # no job was made


@pytest.mark.parametrize("options, field", [
    ({"steps": 10**6}, "spec.steps"),
    ({"batch": 0}, "spec.batch"),
    ({"size": 4096}, "spec.size"),
])
def test_limits_are_enforced_at_admission(client, tiny_model, options, field):
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, CHANNEL, **options)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == field


def test_unknown_model_and_job(client):
    with pytest.raises(FeaturevizClientError) as err:
        client.submit("0" * 64, CHANNEL)
    assert err.value.code == "NOT_FOUND"
    for call in (client.job, client.cancel, lambda j: list(client.watch(j))):
        with pytest.raises(FeaturevizClientError) as err:
            call("no-such-job")
        assert err.value.code == "NOT_FOUND" and err.value.reason == "JOB_NOT_FOUND"


class FixedReshape(torch.nn.Module):
    """Imports and verifies at its default size, but its Reshape is fixed to 224x224 inputs: a render at
    another size fails inside the model, while running."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(torch.relu(self.conv(x)), 8)
        return self.fc(x.reshape(-1, 4 * 28 * 28))


def test_a_job_failing_while_running_ends_failed_and_the_server_keeps_serving(client, tiny_model):
    torch.manual_seed(0)
    model = client.upload(export_onnx(FixedReshape(), size=224), name="fixed-reshape.onnx")
    job = client.submit(model.sha256, {"logit": {"index": 1}}, steps=3, size=32)
    done = client.wait(job.id, timeout=120)
    assert done.state == pb.JOB_STATE_FAILED
    assert done.error.code == "INTERNAL" and done.error.reason == "INTERNAL_ERROR"
    assert "Traceback" not in done.error.message
    ok = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=2, size=32).id, timeout=120)
    assert ok.state == pb.JOB_STATE_SUCCEEDED


def test_a_diverging_job_ends_failed_naming_the_step(tmp_path, tiny_onnx):
    # lr 1e308 is past the default max_lr (refused at admission): a server whose operator allows it
    config = ServerConfig(tmp_path / "store", limits=Limits(max_lr=1e308))
    with serve_in_background(config) as server, Client(server.address, timeout=60) as fv:
        done = fv.wait(fv.submit(fv.upload(tiny_onnx).sha256, CHANNEL, steps=20, size=32, lr=1e308).id, timeout=120)
    assert done.state == pb.JOB_STATE_FAILED, done
    assert done.error.code == "INVALID_ARGUMENT" and done.error.reason == "DIVERGED" and done.error.field == "lr"
    assert "diverged at step" in done.error.message and "lower learning rate" in done.error.message
    assert not done.result.images  # no black PNG reported as a result


def test_create_and_watch(client, tiny_model):
    events = list(client.create_and_watch(tiny_model.sha256, CHANNEL, steps=4, size=32, timeout=120))
    assert _kinds(events)[0] == "snapshot" and events[-1].HasField("result")
    assert events[-1].result.state == pb.JOB_STATE_SUCCEEDED
    assert len(events[-1].result.result.images) == 1 and events[-1].result.result.images[0].png


def test_create_and_watch_reattaches_across_broken_connections_and_makes_one_job(server, tiny_model):
    """Through a loopback proxy: the first connection is refused (the call never reaches the server: it is sent
    again with its request id), and every connection is cut once the job has run 3 steps; the stream re-attaches
    by WatchJob from the last seq. One job, every logged event once and in order, and ``run`` returns the same
    finished job in one call."""
    from support.proxy import Proxy

    proxy = Proxy(server.address)
    try:
        with Client(proxy.address, timeout=60) as fv:
            before = len(list(fv.jobs()))
            proxy.refuse(1)
            events, cut = [], False
            for event in fv.create_and_watch(tiny_model.sha256, CHANNEL, steps=40, size=32, timeout=120):
                events.append(event)
                if not cut and event.HasField("progress") and event.progress.step >= 3:
                    cut = True
                    proxy.cut()
            assert cut and proxy.accepted >= 3  # refused, the first stream, the re-attached one
            snapshots = [e for e in events if e.HasField("snapshot")]
            assert len(snapshots) == 2 and snapshots[0].snapshot.id == snapshots[1].snapshot.id
            logged = [e for e in events if not e.HasField("snapshot") and not e.HasField("heartbeat")]
            assert [e.seq for e in logged] == list(range(1, len(logged) + 1))  # nothing lost or repeated
            assert [e.progress.step for e in logged if e.HasField("progress")] == list(range(1, 41))
            assert events[-1].result.state == pb.JOB_STATE_SUCCEEDED and events[-1].result.id == snapshots[0].snapshot.id
            done = fv.run(tiny_model.sha256, CHANNEL, steps=2, size=32, timeout=120)
            assert done.state == pb.JOB_STATE_SUCCEEDED and len(done.result.images) == 1
            assert len(list(fv.jobs())) == before + 2
    finally:
        proxy.close()


def test_list_jobs_pages_and_filters(client, tiny_model):
    for _ in range(3):
        client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=1, size=32).id, timeout=120)
    everything = list(client.jobs())
    assert len(list(client.jobs(page_size=2))) == len(everything) >= 3
    succeeded = list(client.jobs(state=pb.JOB_STATE_SUCCEEDED))
    assert succeeded and all(j.state == pb.JOB_STATE_SUCCEEDED for j in succeeded)
    assert all(not image.png for j in everything for image in j.result.images)  # listings carry no bytes


def test_heartbeats_keep_an_idle_stream_alive(client, tiny_model):
    blocker = client.submit(tiny_model.sha256, CHANNEL, steps=10_000, size=32, batch=client.info().max_step_images)
    next(e for e in client.watch(blocker.id, timeout=120) if e.HasField("progress"))  # it runs
    waiting = client.submit(tiny_model.sha256, CHANNEL, steps=2, size=32)
    beats, snapshot = 0, None
    for event in client.watch(waiting.id, timeout=120):  # the server fixture beats every 0.5 s
        if event.HasField("snapshot"):
            snapshot = event.snapshot
        beats += event.HasField("heartbeat")
        if beats == 2:
            break
    assert snapshot.state == pb.JOB_STATE_QUEUED and snapshot.queue_position == 0
    client.cancel(blocker.id)
    assert client.wait(waiting.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED


def test_async_client_twin(server, tiny_model, tiny_onnx):
    import asyncio

    from featureviz.client import AsyncClient

    async def scenario():
        async with AsyncClient(server.address) as fv:
            model = await fv.upload(tiny_onnx)
            assert model.deduplicated  # the module's server holds these bytes already
            names = [layer.name async for layer in fv.layers(model.sha256, page_size=2)]
            assert "/Relu_1" in names
            job = await fv.submit(model.sha256, CHANNEL, steps=3, size=16)
            steps = [e.progress.step async for e in fv.watch(job.id, timeout=120) if e.HasField("progress")]
            done = await fv.job(job.id)
            with pytest.raises(FeaturevizClientError) as err:
                await fv.submit(model.sha256, {"channel": {"layer": "/Relu_1", "channel": 99}})
            await fv.wait_ready(timeout=30)
            status = await fv.upload_status(model.sha256, len(tiny_onnx))
            seen = []
            waited = await fv.wait((await fv.submit(model.sha256, CHANNEL, steps=2, size=16)).id, timeout=120,
                                   on_event=seen.append)
            streamed = [e async for e in fv.create_and_watch(model.sha256, CHANNEL, steps=2, size=16, timeout=120)]
            return steps, done, err.value, status, seen, waited, streamed

    steps, done, error, status, seen, waited, streamed = asyncio.run(scenario())
    assert steps == [1, 2, 3] and done.state == pb.JOB_STATE_SUCCEEDED and len(images(done)) == 1
    assert status.model_exists
    assert waited.state == pb.JOB_STATE_SUCCEEDED and seen[-1].HasField("result")
    assert streamed[-1].HasField("result") and streamed[-1].result.state == pb.JOB_STATE_SUCCEEDED
    assert error.code == "INVALID_ARGUMENT" and error.field_violations[0][0] == "spec.objective.channel.channel"


def test_the_client_twins_have_the_same_methods_and_signatures():
    """Client and AsyncClient: the same public methods with the same parameters (names, kinds, defaults)."""
    import inspect

    from featureviz.client import AsyncClient
    from featureviz.client import Client

    def public(cls):
        return {name: inspect.signature(member) for name, member in vars(cls).items()
                if callable(member) and not name.startswith("_")}

    sync, aio = public(Client), public(AsyncClient)
    assert sorted(sync) == sorted(aio), set(sync) ^ set(aio)
    for name, signature in sync.items():
        def params(sig):
            return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != "channel"]
        assert params(signature) == params(aio[name]), name


def test_init_image_is_decoded_resized_and_used(client, tiny_model):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (230, 20, 20)).save(buffer, format="PNG")
    job = client.submit(tiny_model.sha256, CHANNEL, steps=1, size=16, param="pixel", transforms="none",
                        init_image=buffer.getvalue())
    done = client.wait(job.id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    red, green, blue = to_pil(images(done)[0]).resize((1, 1)).getpixel((0, 0))
    assert red > 180 and green < 70 and blue < 70  # one small step away from the red start
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, CHANNEL, steps=1, size=16, init_image=b"not an image")
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == "spec.init_image"


def test_engine_defaults_are_recorded_in_the_job(client, tiny_model):
    job = client.submit(tiny_model.sha256, CHANNEL, size=16)  # no steps, batch or seed given
    assert (job.steps, job.spec.steps, job.spec.batch, job.spec.seed) == (512, 512, 1, 0)
    try:  # only to save time: a fast machine may have run the 512 steps already
        client.cancel(job.id)
    except FeaturevizClientError as err:
        assert err.code == "FAILED_PRECONDITION" and err.reason == "JOB_FINISHED"
    done = client.wait(job.id, timeout=120)
    if done.state == pb.JOB_STATE_SUCCEEDED:
        assert done.result.steps_done == 512
    else:
        assert done.state == pb.JOB_STATE_CANCELLED and done.result.steps_done < 512

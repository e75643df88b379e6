"""Exemplar index jobs in the scheduler, the worker scripted (support.fake_worker.FakeWorker): an index job takes no
room in the device steps (a render is granted beside it on a one-image worker), one pass per tenant at a time (its
later renders are not held up), a job whose index another job is making waits for it and then ends cached without
reaching the worker, a finished pass is recorded for its tenant, and a re-queued pass after a crash is granted
again with the same files. Asserted on grants, events and states, never on time."""

from __future__ import annotations

from featureviz.client import Client
from featureviz.client import pb
from support.fake_worker import FakeWorker
from support.images import image_bytes
from support.images import zip_of

MODEL = b"any bytes: the fake worker imports nothing"
CHANNEL = {"channel": {"layer": "conv", "channel": 3}}
IMAGES = [image_bytes("png", (12, 10), color=(i, 2 * i, 3)) for i in range(1, 4)]


def _index_spec(model: str, dataset: str, **fields) -> pb.JobSpec:
    spec = pb.JobSpec(model=model)
    spec.exemplar_index.dataset = dataset
    spec.exemplar_index.layers[:] = ["conv"]
    for name, value in fields.items():
        setattr(spec.exemplar_index, name, value)
    return spec


def _tenant(server, token: str) -> tuple[Client, str, str]:
    fv = Client(server.address, token=token)
    model = fv.upload(MODEL)
    dataset = fv.upload_dataset(zip_of({f"img{i}.png": data for i, data in enumerate(IMAGES)}))
    return fv, model.sha256, dataset.id


def test_an_index_takes_no_step_room_and_a_tenant_runs_one_pass_at_a_time(serve):
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    fv, model, dataset = _tenant(server, "tok-flood")
    first = fv.submit(model, spec=_index_spec(model, dataset))
    work = fake.wait_granted(first.id).index
    assert work is not None and work.names == ["img0.png", "img1.png", "img2.png"] and work.layers == ["conv"]
    assert work.final_path == str(server._server.store.index_path(work.index))
    assert work.state_path == str(server._server.store.index_state_path(work.index))
    second = fv.submit(model, spec=_index_spec(model, dataset, k=3))  # another index of the tenant: it waits
    render = fv.submit(model, CHANNEL, steps=2)  # a render is granted beside the pass, and past the waiting one
    fake.wait_granted(render.id)
    assert fake.granted() == [first.id, render.id]
    fake.start_job(first.id)
    fake.progress(first.id, 2, 3)
    running = fv.job(first.id)
    assert (running.state, running.step, running.steps) == (pb.JOB_STATE_RUNNING, 2, 3)
    fake.finish(first.id)
    assert fake.wait_granted(second.id).index.k == 3
    done = fv.job(first.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and not done.result.exemplar_index.cached
    assert [i.index for i in server._server.store.find_indexes("flood", model, dataset)] == [work.index]
    fv.close()


def test_a_job_whose_index_another_job_is_making_waits_then_ends_cached(serve):
    fake = FakeWorker(max_step_images=4)
    server = serve(fake)
    flood, model, dataset = _tenant(server, "tok-flood")
    calm, _, _ = _tenant(server, "tok-calm")
    third, _, _ = _tenant(server, "tok-third")
    making = flood.submit(model, spec=_index_spec(model, dataset))
    fake.wait_granted(making.id)
    same = calm.submit(model, spec=_index_spec(model, dataset, batch_size=7))  # batch_size is not in the key
    other = third.submit(model, spec=_index_spec(model, dataset, k=5))  # another key: granted beside it
    fake.wait_granted(other.id)
    assert same.id not in fake.granted()
    fake.start_job(making.id)
    fake.finish(making.id)
    events = list(calm.watch(same.id, timeout=60))
    assert events[-1].HasField("result") and events[-1].result.state == pb.JOB_STATE_SUCCEEDED
    assert calm.job(same.id).result.exemplar_index.cached
    assert same.id not in fake.granted()  # nothing reached the worker
    assert calm.job(same.id).result.exemplar_index.index == flood.job(making.id).result.exemplar_index.index
    for client in (flood, calm, third):
        client.close()


def test_a_running_pass_is_granted_again_after_a_crash_with_the_same_files(serve):
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    fv, model, dataset = _tenant(server, "tok-flood")
    job = fv.submit(model, spec=_index_spec(model, dataset))
    before = fake.wait_granted(job.id).index
    fake.start_job(job.id)
    fake.crash_on_stop()
    fv.close()
    server.stop()
    again = FakeWorker(max_step_images=1)
    restarted = serve(again)
    after = again.wait_granted(job.id).index
    assert after == before  # the same key, paths and images: the pass resumes from its state file
    with Client(restarted.address, token="tok-flood") as fv:
        assert fv.job(job.id).state == pb.JOB_STATE_QUEUED

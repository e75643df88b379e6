"""The exemplar index as a JobService job on a real server on loopback with the real worker (torch, CPU): a
hand-built model whose channel 0 is the red level of each pixel (tests/support/exemplar_models.py) over generated
images whose right order and argmax positions are known exactly.

The worker is :class:`support.held_worker.HeldIndexWorker`: the real LocalWorker whose index passes can be held
after a given number of batches until other work reaches the device thread, so a render that arrives, a cancel or a
kill -9 meets the pass part way by construction, not by timing. Nothing here sleeps or times anything."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc_health")

from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.client import pb  # noqa: E402
from featureviz.engine.exemplars import ExemplarIndex  # noqa: E402
from featureviz.server import Limits  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.exemplar_models import colour_net  # noqa: E402
from support.exemplar_models import dot_image  # noqa: E402
from support.exemplar_models import png  # noqa: E402
from support.held_worker import held_worker  # noqa: E402
from support.serve import ServeProcess  # noqa: E402

TOKENS = {"tok-a": "alice", "tok-b": "bob", "tok-c": "carol"}
SIDE = 32
# image i: a red dot of level REDS[i] at (x, y) = (2 + 2 i, 3 + i); channel 0 of colour_relu is the red level
REDS = [50, 200, 120, 250, 10, 90, 160, 30, 220, 70, 180, 140]
EXPECTED = sorted(range(len(REDS)), key=lambda i: -REDS[i])
CHUNK = 4  # the server's index_chunk_images: batches of 2 save every 2 batches
MEMORY = 64 << 20  # the worker's max_job_memory_bytes


def _image_set(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, red in enumerate(REDS):
        (folder / f"img{i:02d}.png").write_bytes(png(dot_image(SIDE, red, 2 + 2 * i, 3 + i)))
    return folder


def _spec(model: str, dataset: str, *, layers=("colour_relu", "r3"), batch_size=2, k=None) -> pb.JobSpec:
    spec = pb.JobSpec(model=model)
    spec.exemplar_index.dataset = dataset
    spec.exemplar_index.layers[:] = list(layers)
    spec.exemplar_index.batch_size = batch_size
    if k is not None:
        spec.exemplar_index.k = k
    spec.size.height = spec.size.width = SIDE
    return spec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One server for the module (alice and bob hold the model and the set; carol only the model)."""
    root = tmp_path_factory.mktemp("index")
    store = root / "store"
    worker = held_worker(store, max_job_memory_bytes=MEMORY)
    server = serve_in_background(ServerConfig(store, tokens=TOKENS, index_chunk_images=CHUNK, progress_interval=0.0,
                                              heartbeat_seconds=0.5, limits=Limits(max_exemplar_k=20)),
                                 worker=worker)
    clients = {tenant: Client(server.address, token=token) for token, tenant in TOKENS.items()}
    model = clients["alice"].upload(colour_net(), name="colour.onnx")
    dataset = clients["alice"].upload_dataset(_image_set(root / "set"))
    clients["bob"].upload(colour_net(), name="colour.onnx")
    clients["bob"].upload_dataset(root / "set")
    clients["carol"].upload(colour_net(), name="colour.onnx")
    yield {"server": server, "worker": worker, "clients": clients, "model": model.sha256, "dataset": dataset.id,
           "store": server._server.store}
    for client in clients.values():
        client.close()
    worker.release()
    server.stop()


@pytest.fixture()
def worker(setup):
    """The held worker, reset to run freely at the end of each test."""
    held = setup["worker"]
    yield held
    held.hold_after = None
    held.release()
    held.released.clear()


def _load(setup, result: pb.ExemplarIndexResult) -> ExemplarIndex:
    return ExemplarIndex.load(setup["store"].index_path(result.index))


def _events_until(stream, predicate):
    """Read a watch stream until ``predicate(event)``; -> the events so far."""
    seen = []
    for event in stream:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"the watch ended first: {seen}")


def _arrays(index: ExemplarIndex) -> dict:
    out = {"image_sizes": index.image_sizes}
    for i, layer in enumerate(index.layers):
        out.update(index.states[layer].arrays(f"L{i}."))
    return out


def _same(a: ExemplarIndex, b: ExemplarIndex) -> None:
    left, right = _arrays(a), _arrays(b)
    assert left.keys() == right.keys()
    for name in left:
        assert np.array_equal(left[name], right[name]), name
    assert a.meta["skipped"] == b.meta["skipped"] and a.meta["indexed"] == b.meta["indexed"] == len(REDS)


# ------------------------------------------------------------------------------------------------ end to end


def test_an_index_job_runs_end_to_end_and_finds_the_expected_images(setup, worker):
    fv = setup["clients"]["alice"]
    job = fv.submit(setup["model"], spec=_spec(setup["model"], setup["dataset"]))
    events = []
    done = fv.wait(job.id, timeout=300, on_event=events.append)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    result = done.result.exemplar_index
    assert (result.dataset, list(result.layers), result.images, result.skipped, result.k, result.cached) == (
        setup["dataset"], ["colour_relu", "r3"], len(REDS), 0, 16, False)
    assert (result.size.height, result.size.width, result.channels) == (SIDE, SIDE, 8)
    assert done.step == done.steps == len(REDS) and not done.result.images
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and progress[-1].step == progress[-1].steps == len(REDS)
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert pb.JOB_STATE_RUNNING in [e.state for e in events if e.HasField("state")]
    # the stored spec records what admission resolved: the index's key
    assert list(done.spec.exemplar_index.layers) == ["colour_relu", "r3"] and done.spec.exemplar_index.k == 16
    assert list(done.spec.preprocess.std) == [1.0, 1.0, 1.0] and not done.spec.HasField("objective")
    index = _load(setup, result)
    top = index.exemplars("colour_relu", 0, "max")
    assert [e.name for e in top] == [f"img{i:02d}.png" for i in EXPECTED]
    assert [e.position for e in top] == [(2 + 2 * i, 3 + i) for i in EXPECTED]
    assert [e.value for e in top[:2]] == pytest.approx([250 / 255, 220 / 255], abs=1e-3)
    assert not setup["store"].index_state_path(result.index).exists()  # the partial state went
    assert setup["store"].find_indexes("alice", setup["model"], setup["dataset"])[0].index == result.index
    assert job.id in worker.index_submissions
    listed = next(j for j in fv.jobs() if j.id == job.id)
    assert listed.objective_text == f"exemplar index of datasets/{setup['dataset']} at 2 layer(s), k=16"


def test_default_layers_are_every_layer_with_channels(setup, worker):
    fv = setup["clients"]["alice"]
    done = fv.wait(fv.submit(setup["model"], spec=_spec(setup["model"], setup["dataset"], layers=(),
                                                         batch_size=5)).id, timeout=300)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    layers = list(done.result.exemplar_index.layers)
    assert {"colour_relu", "r1", "r2", "r3", "pool", "flat"} <= set(layers)
    assert list(done.spec.exemplar_index.layers) == layers


def test_a_second_tenant_holding_the_model_and_set_reuses_the_index(setup, worker):
    alice, bob = setup["clients"]["alice"], setup["clients"]["bob"]
    spec = _spec(setup["model"], setup["dataset"], k=7)
    first = alice.wait(alice.submit(setup["model"], spec=spec).id, timeout=300)
    assert first.state == pb.JOB_STATE_SUCCEEDED and not first.result.exemplar_index.cached
    submitted = list(worker.index_submissions)
    # the same key under an alias (colour_out is colour_relu's output tensor), in another order, with another batch
    again = _spec(setup["model"], setup["dataset"], layers=("r3", "colour_out"), batch_size=3, k=7)
    job = bob.submit(setup["model"], spec=again)
    events = list(bob.watch(job.id, timeout=60))
    assert events[-1].HasField("result") and events[-1].result.state == pb.JOB_STATE_SUCCEEDED
    done = bob.job(job.id)
    assert done.result.exemplar_index.cached and done.result.exemplar_index.index == first.result.exemplar_index.index
    assert worker.index_submissions == submitted  # nothing reached the worker: nothing computed
    assert setup["store"].find_indexes("bob", setup["model"], setup["dataset"])[0].index == \
        first.result.exemplar_index.index


def test_tenants_without_the_set_or_the_model_get_not_found(setup, worker):
    carol = setup["clients"]["carol"]
    with pytest.raises(FeaturevizClientError) as err:
        carol.submit(setup["model"], spec=_spec(setup["model"], setup["dataset"]))
    assert (err.value.code, err.value.reason) == ("NOT_FOUND", "DATASET_NOT_FOUND")
    assert setup["store"].find_indexes("carol", setup["model"], setup["dataset"]) == []
    with pytest.raises(FeaturevizClientError) as err:
        carol.submit("ab" * 32, spec=_spec("ab" * 32, setup["dataset"]))
    assert err.value.code == "NOT_FOUND"
    assert list(carol.jobs()) == []


# ------------------------------------------------------------------------------------------------ refused


def _refused(fv, spec) -> FeaturevizClientError:
    with pytest.raises(FeaturevizClientError) as err:
        fv.submit(spec.model, spec=spec)
    assert err.value.code == "INVALID_ARGUMENT" and "\n" not in err.value.message
    return err.value


def test_an_unknown_layer_is_refused_naming_it_before_any_compute(setup, worker):
    fv = setup["clients"]["alice"]
    jobs, submitted = len(list(fv.jobs())), list(worker.index_submissions)
    error = _refused(fv, _spec(setup["model"], setup["dataset"], layers=("r3", "colour_rel")))
    assert "colour_rel" in error.message and "colour_relu" in error.message  # named, with its close match
    assert [field for field, _ in error.field_violations] == ["spec.exemplar_index.layers[1]"]
    assert len(list(fv.jobs())) == jobs and worker.index_submissions == submitted


@pytest.mark.parametrize("change, field, needle", [
    (lambda s: setattr(s, "steps", 10), "spec.steps", "render"),
    (lambda s: setattr(s, "param", pb.PARAMETERIZATION_PIXEL), "spec.param", "render"),
    (lambda s: setattr(s, "preview_every", 1), "spec.preview_every", "render"),
    (lambda s: s.objective.tv.SetInParent(), "spec.objective", "no objective"),
    (lambda s: setattr(s.exemplar_index, "k", 21), "spec.exemplar_index.k", "max_exemplar_k"),
    (lambda s: setattr(s.exemplar_index, "batch_size", 257), "spec.exemplar_index.batch_size", "max_index_batch"),
    (lambda s: setattr(s.exemplar_index, "dataset", "../../etc"), "spec.exemplar_index.dataset", "dataset id"),
], ids=["steps", "param", "previews", "objective", "k", "batch_size", "dataset"])
def test_render_options_and_out_of_range_settings_are_refused(setup, worker, change, field, needle):
    spec = _spec(setup["model"], setup["dataset"])
    change(spec)
    error = _refused(setup["clients"]["alice"], spec)
    assert [f for f, _ in error.field_violations] == [field] and needle in error.message


def test_a_render_without_an_objective_is_refused_naming_it(setup):
    error = _refused(setup["clients"]["alice"], pb.JobSpec(model=setup["model"], steps=3))
    assert [f for f, _ in error.field_violations] == ["spec.objective"] and "exemplar_index" in error.message


def test_a_pass_holding_too_many_decoded_images_is_refused_before_any_compute(setup, worker):
    fv = setup["clients"]["alice"]
    submitted = list(worker.index_submissions)
    spec = _spec(setup["model"], setup["dataset"], batch_size=64)
    spec.size.height = spec.size.width = 256  # 4 batches of 64 float32 images of 256 x 256: 201 MB
    with pytest.raises(FeaturevizClientError) as err:
        fv.submit(setup["model"], spec=spec)
    assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "JOB_TOO_LARGE")
    assert "max_job_memory_bytes" in err.value.message and "batch_size" in err.value.message
    assert worker.index_submissions == submitted


def test_published_limits_and_options(setup):
    info = setup["clients"]["alice"].info()
    assert (info.limits.max_exemplar_k, info.limits.max_index_batch, info.limits.max_indexes_per_tenant) == (
        20, Limits().max_index_batch, Limits().max_indexes_per_tenant)
    options = {o.name: o for o in info.job_options}
    assert list(options["exemplar_index"].kinds) == ["exemplar_index"]
    assert list(options["preprocess"].kinds) == ["render", "exemplar_index", "atlas"]


# ------------------------------------------------------------------------------------------------ interleaving


def test_a_render_submitted_while_an_index_runs_starts_before_it_ends(setup, worker):
    fv = setup["clients"]["alice"]
    worker.hold_after = 1  # after one batch the pass only moves when other work reaches the device thread
    index_job = fv.submit(setup["model"], spec=_spec(setup["model"], setup["dataset"], batch_size=1, k=3))
    _events_until(fv.watch(index_job.id, timeout=120), lambda e: e.HasField("progress"))
    render = fv.submit(setup["model"], {"channel": {"layer": "r1", "channel": 0}}, steps=2, size=SIDE)
    _events_until(fv.watch(render.id, timeout=120),
                  lambda e: e.HasField("state") and e.state == pb.JOB_STATE_RUNNING)
    running = fv.job(index_job.id)
    assert running.state == pb.JOB_STATE_RUNNING and 0 < running.step < len(REDS)
    worker.release()
    assert fv.wait(render.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED
    assert fv.wait(index_job.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED


# ------------------------------------------------------------------------------------------------ cancel, delete


def test_delete_refused_while_running_and_cancel_keeps_the_state_a_rerun_resumes(setup, worker):
    fv, store = setup["clients"]["alice"], setup["store"]
    worker.hold_after = 2  # two batches of 2: the first chunk (4 images) is saved, then it waits
    spec = _spec(setup["model"], setup["dataset"], k=4)
    job = fv.submit(setup["model"], spec=spec)
    _events_until(fv.watch(job.id, timeout=120), lambda e: e.HasField("progress") and e.progress.step >= CHUNK)
    with pytest.raises(FeaturevizClientError) as err:
        fv.delete_dataset(setup["dataset"])
    assert (err.value.code, err.value.reason) == ("FAILED_PRECONDITION", "DATASET_IN_USE")
    assert f"jobs/{job.id}" in err.value.message
    fv.cancel(job.id)
    assert fv.wait(job.id, timeout=120).state == pb.JOB_STATE_CANCELLED
    ident = pb.JobSpec()
    ident.CopyFrom(fv.job(job.id).spec)
    from featureviz.server.indexes import index_id

    key = index_id(setup["model"], ident)
    partial = ExemplarIndex.load(store.index_state_path(key))  # kept, at a chunk's end
    assert not partial.complete and partial.meta["position"] >= CHUNK and partial.meta["position"] % CHUNK == 0
    saved = partial.meta["position"]
    # the dataset can go now that nothing uses it... but the rerun needs it: it stays
    worker.release()
    rerun = fv.submit(setup["model"], spec=spec)
    events = []
    done = fv.wait(rerun.id, timeout=300, on_event=events.append)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps[0] == saved and steps[-1] == len(REDS)  # it resumed after the last saved chunk
    resumed = _load(setup, done.result.exemplar_index)
    # an uninterrupted pass of the same key: move the finished file aside so the cache misses
    aside = store.index_path(key).with_suffix(".resumed")
    os.replace(store.index_path(key), aside)
    fresh = fv.wait(fv.submit(setup["model"], spec=spec).id, timeout=300)
    assert fresh.state == pb.JOB_STATE_SUCCEEDED and not fresh.result.exemplar_index.cached
    _same(resumed, _load(setup, fresh.result.exemplar_index))
    aside.unlink()


# ------------------------------------------------------------------------------------------------ kill -9


def test_a_pass_killed_part_way_resumes_after_the_last_chunk_with_the_same_index(tmp_path):
    store = tmp_path / "store"
    killed = ServeProcess.support_script("held_worker.py", store, 2, CHUNK)
    try:
        with Client(killed.address) as fv:
            model = fv.upload(colour_net(), name="colour.onnx")
            dataset = fv.upload_dataset(_image_set(tmp_path / "set"))
            spec = _spec(model.sha256, dataset.id)
            job = fv.submit(model.sha256, spec=spec)
            _events_until(fv.watch(job.id, timeout=120), lambda e: e.HasField("progress") and e.progress.step >= CHUNK)
            stored = fv.job(job.id).spec
    finally:
        assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
    from featureviz.server.indexes import index_id

    key = index_id(model.sha256, stored)
    partial_path = store / "indexes" / f"{key}.partial.npz"
    assert ExemplarIndex.load(partial_path).meta["position"] == CHUNK  # held after the first chunk's save
    worker = held_worker(store)
    starts: dict[str, int] = {}
    original = worker._start_index

    def start_index(sub):  # where each pass starts (the worker's own pass object, read after it is made)
        original(sub)
        if sub.job_id in worker._indexes:
            starts[sub.job_id] = worker._indexes[sub.job_id].run.done
    worker._start_index = start_index
    server = serve_in_background(ServerConfig(store, index_chunk_images=CHUNK, progress_interval=0.0,
                                              heartbeat_seconds=0.5), worker=worker)
    try:
        with Client(server.address) as fv:
            done = fv.wait(job.id, timeout=300)  # re-queued at the restart
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
            assert starts[job.id] == CHUNK and done.attempts == 2
            assert not partial_path.exists()
            resumed = ExemplarIndex.load(store / "indexes" / f"{key}.npz")
            os.replace(store / "indexes" / f"{key}.npz", tmp_path / "resumed.npz")
            again = fv.wait(fv.submit(model.sha256, spec=spec).id, timeout=300)  # uninterrupted, from image 0
            assert again.state == pb.JOB_STATE_SUCCEEDED and not again.result.exemplar_index.cached
            assert starts[again.id] == 0
            _same(resumed, ExemplarIndex.load(store / "indexes" / f"{key}.npz"))
    finally:
        server.stop()

"""The atlas job on a real server on loopback with the real worker (torch, CPU) and TinyNet (``/Relu``: 8 channels
at depth 1, ``/Relu_1``: 16 at depth 3).

The worker is :class:`support.atlas_worker.AtlasWorker`: the real LocalWorker that records what each device step
held and, in the kill -9 test, stops stepping after a given number of finished units, so the kill meets the atlas
part way by construction. Nothing here sleeps or times anything: the assertions are on events, stored rows and the
recorded steps."""

from __future__ import annotations

import signal

import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc_health")

from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.client import pb  # noqa: E402
from featureviz.server import Limits  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.atlas_worker import atlas_worker  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402
from support.serve import ServeProcess  # noqa: E402

TOKENS = {"tok-a": "alice", "tok-b": "bob"}
SIDE = 32
STEPS = 8
RENDER = {"size": SIDE, "steps": STEPS}


def _renders(store, keys) -> dict[str, int]:
    """key -> how many renders of it finished (the unit store's count)."""
    return {key: store.get_unit(key)[6] for key in keys}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    store = root / "store"
    worker = atlas_worker(store, max_step_images=4)
    server = serve_in_background(ServerConfig(store, tokens=TOKENS, progress_interval=0.0, heartbeat_seconds=0.5,
                                              max_step_images=4, metrics_port=0,
                                              limits=Limits(max_atlas_units=40)), worker=worker)
    clients = {tenant: Client(server.address, token=token) for token, tenant in TOKENS.items()}
    onnx = export_onnx(TinyNet())
    model = clients["alice"].upload(onnx, name="tiny.onnx")
    clients["bob"].upload(onnx, name="tiny.onnx")
    yield {"server": server, "worker": worker, "clients": clients, "model": model.sha256,
           "store": server._server.store}
    for client in clients.values():
        client.close()
    server.stop()


def _metric(server, name: str, label: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}_total{{source="{label}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_an_atlas_renders_every_unit_and_lists_them_with_progress(setup):
    fv = setup["clients"]["alice"]
    job = fv.atlas(setup["model"], layers=["/Relu", "/Relu_1"], channels=3, seed=11, wait=True, timeout=300, **RENDER)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    atlas = job.result.atlas
    assert (atlas.units, atlas.done, atlas.rendered + atlas.cached, atlas.failed) == (6, 6, 6, 0)
    assert [(layer.layer, layer.depth, layer.units, layer.done) for layer in atlas.layers] == [
        ("/Relu", 1, 3, 3), ("/Relu_1", 3, 3, 3)]
    assert atlas.device_seconds > 0 and atlas.eta_seconds == 0
    units = list(fv.atlas_units(job.id))
    assert [(u.index, u.layer, u.channel, u.done) for u in units] == [
        (i, layer, c, True) for i, (layer, c) in enumerate((l, c) for l in ("/Relu", "/Relu_1") for c in range(3))]
    assert len({u.key for u in units}) == 6 and all(len(u.key) == 64 for u in units)
    assert all((u.width, u.height) == (SIDE, SIDE) and u.device for u in units)
    image = fv.atlas_unit_image(job.id, 4)
    assert image.unit.layer == "/Relu_1" and image.unit.channel == 1 and image.png.startswith(b"\x89PNG")
    assert [u.index for u in fv.atlas_units(job.id, layer="/Relu_1", page_size=2)] == [3, 4, 5]
    spec = fv.job(job.id).spec  # the atlas defaults it ran with are recorded
    assert (spec.size.height, spec.steps, spec.seed, spec.param, spec.transforms) == (
        SIDE, STEPS, 11, pb.PARAMETERIZATION_FFT, pb.TRANSFORMS_STANDARD)
    assert set(_renders(setup["store"], [u.key for u in units]).values()) == {1}


def test_the_default_selection_is_every_layer_with_channels_and_op_types_and_depths_select(setup):
    fv = setup["clients"]["alice"]
    every = fv.atlas(setup["model"], channels=1, wait=True, timeout=300, **RENDER)
    layers = [layer.layer for layer in every.result.atlas.layers]
    assert "/Relu" in layers and "/Relu_1" in layers and len(layers) >= 4
    deep = fv.atlas(setup["model"], op_types=["relu"], min_depth=2, channels=2, wait=True, timeout=300, **RENDER)
    assert [(layer.layer, layer.units) for layer in deep.result.atlas.layers] == [("/Relu_1", 2)]


def test_identical_units_are_served_from_the_store_to_atlases_and_interactive_jobs(setup):
    fv, bob, store, server = setup["clients"]["alice"], setup["clients"]["bob"], setup["store"], setup["server"]
    before = _metric(server, "featureviz_atlas_units", "cached")
    first = fv.atlas(setup["model"], layers=["/Relu"], channels=4, seed=5, wait=True, timeout=300, **RENDER)
    assert (first.result.atlas.rendered, first.result.atlas.cached) == (4, 0)
    rendered = len(setup["worker"].unit_submissions())
    # bob holds the same model: his atlas of /Relu's first 6 channels renders only the 2 new ones
    second = bob.atlas(setup["model"], layers=["/Relu"], channels=6, seed=5, wait=True, timeout=300, **RENDER)
    assert (second.result.atlas.rendered, second.result.atlas.cached) == (2, 4)
    assert len(setup["worker"].unit_submissions()) == rendered + 2
    # an interactive batch-1 render with the same options is the same key: served, nothing submitted
    units = list(fv.atlas_units(first.id))
    submitted = len(setup["worker"].submitted)
    job = bob.submit(setup["model"], {"channel": {"layer": "/Relu", "channel": 2}}, seed=5, **RENDER)
    done = bob.wait(job.id, timeout=60)
    assert done.state == pb.JOB_STATE_SUCCEEDED and len(setup["worker"].submitted) == submitted
    assert done.result.images[0].png == fv.atlas_unit_image(first.id, 2).png
    assert _metric(server, "featureviz_atlas_units", "cached") == before + 5
    # another seed is another key: rendered
    other = bob.wait(bob.submit(setup["model"], {"channel": {"layer": "/Relu", "channel": 2}}, seed=6, **RENDER).id,
                     timeout=300)
    assert other.state == pb.JOB_STATE_SUCCEEDED and len(setup["worker"].submitted) == submitted + 1
    keys = {u.key for u in units} | {u.key for u in bob.atlas_units(second.id)}
    assert set(_renders(store, keys).values()) == {1}


def test_an_interactive_job_starts_at_the_next_device_step_while_an_atlas_fills_them(setup):
    fv, worker = setup["clients"]["alice"], setup["worker"]
    atlas = fv.atlas(setup["model"], layers=["/Relu_1"], channels=8, seed=21, size=SIDE, steps=400)
    seen = []
    for event in fv.watch(atlas.id, timeout=300):  # the atlas's first unit is running
        seen.append(event)
        if event.HasField("state") and event.state == pb.JOB_STATE_RUNNING:
            break
    job = fv.submit(setup["model"], {"channel": {"layer": "/Relu", "channel": 0}}, size=SIDE, steps=4, seed=99)
    assert fv.wait(job.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED
    with worker._cv:
        steps, submitted = list(worker.steps), list(worker.submitted)
    marker = next(at for at, job_id, _ in submitted if job_id == job.id)
    first = next(i for i, step in enumerate(steps) if job.id in step)
    assert first <= marker + 1  # the step running when it arrived, then it steps
    assert all(len(step) <= 4 for step in steps)  # the atlas's units were parked to make room
    last = max(i for i, step in enumerate(steps) if job.id in step)
    beside = [j for step in steps[first:last + 1] for j in step if j.startswith(atlas.id + ":")]
    assert beside  # the atlas's units kept the room the job left (400 steps a unit: none had finished)
    fv.cancel(atlas.id)
    done = fv.wait(atlas.id, timeout=300)
    assert done.state == pb.JOB_STATE_CANCELLED  # cancel keeps what is done
    assert done.result.atlas.units == 8 and done.result.atlas.done == sum(u.done for u in fv.atlas_units(atlas.id))


def test_bad_selections_limits_and_other_tenants_are_refused(setup):
    fv, bob = setup["clients"]["alice"], setup["clients"]["bob"]

    def refused(**kwargs):
        with pytest.raises(FeaturevizClientError) as err:
            fv.atlas(setup["model"], **{**RENDER, **kwargs})
        return err.value

    err = refused(op_types=["Softmax"])
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "EMPTY_SELECTION") and "matches no layer" in err.message
    err = refused(min_depth=1000)
    assert err.code == "INVALID_ARGUMENT" and "depth >= 1000" in err.message
    err = refused()  # every layer with channels: more than max_atlas_units
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "TOO_MANY_UNITS") and "max_atlas_units = 40" in err.message
    err = refused(layers=["/Nope"])
    assert err.code == "INVALID_ARGUMENT" and "spec.atlas.layers[0]" in str(err.field_violations or err.message)
    with pytest.raises(FeaturevizClientError) as bad:
        fv.submit(setup["model"], spec=pb.JobSpec(model=setup["model"], atlas=pb.AtlasSpec(channels=1),
                                                  objective=pb.Objective(channel=pb.ChannelObjective(layer="/Relu"))))
    assert bad.value.code == "INVALID_ARGUMENT" and "no objective" in bad.value.message
    with pytest.raises(FeaturevizClientError) as bad:
        fv.submit(setup["model"], spec=pb.JobSpec(model=setup["model"], atlas=pb.AtlasSpec(channels=1), batch=2))
    assert bad.value.code == "INVALID_ARGUMENT" and "batch" in bad.value.message
    job = fv.atlas(setup["model"], layers=["/Relu"], channels=1, wait=True, timeout=300, **RENDER)
    for call in (lambda: list(bob.atlas_units(job.id)), lambda: bob.atlas_unit_image(job.id, 0),
                 lambda: bob.job(job.id), lambda: bob.cancel(job.id), lambda: fv.atlas_unit_image(job.id, 5),
                 lambda: list(fv.atlas_units("nosuchjob"))):
        with pytest.raises(FeaturevizClientError) as missing:
            call()
        assert missing.value.code == "NOT_FOUND"
    assert job.id not in {j.id for j in bob.jobs()}
    plain = fv.submit(setup["model"], {"channel": {"layer": "/Relu", "channel": 0}}, **RENDER)
    with pytest.raises(FeaturevizClientError) as not_atlas:
        list(fv.atlas_units(plain.id))
    assert (not_atlas.value.code, not_atlas.value.reason) == ("FAILED_PRECONDITION", "NOT_AN_ATLAS")
    fv.wait(plain.id, timeout=300)


def test_the_async_client_twins_start_watch_list_fetch_and_cancel(setup):
    import asyncio

    from featureviz.client import AsyncClient

    async def scenario():
        async with AsyncClient(setup["server"].address, token="tok-b") as fv:
            job = await fv.atlas(setup["model"], layers=["/Relu_1"], channels=2, seed=31, wait=True, timeout=300,
                                 **RENDER)
            units = [unit async for unit in fv.atlas_units(job.id)]
            image = await fv.atlas_unit_image(job.id, 1)
            progress = await fv.atlas_progress(job.id)
            long = await fv.atlas(setup["model"], layers=["/Relu_1"], channels=4, seed=32, size=SIDE, steps=5000)
            cancelled = await fv.cancel(long.id)
            ended = await fv.wait(long.id, timeout=300)
            return job, units, image, progress, cancelled, ended

    job, units, image, progress, cancelled, ended = asyncio.run(scenario())
    assert job.state == pb.JOB_STATE_SUCCEEDED and [u.channel for u in units] == [0, 1]
    assert image.png.startswith(b"\x89PNG") and image.unit.key == units[1].key
    assert (progress.units, progress.done) == (2, 2) and progress.layers[0].layer == "/Relu_1"
    assert ended.state == pb.JOB_STATE_CANCELLED and ended.result.atlas.units == 4


def test_published_limits_and_options(setup):
    info = setup["clients"]["alice"].info()
    assert info.limits.max_atlas_units == 40 and info.limits.max_atlases_per_tenant == Limits().max_atlases_per_tenant
    options = {option.name: option for option in info.job_options}
    assert list(options["atlas"].kinds) == ["atlas"]
    assert "atlas" in options["steps"].kinds and "atlas" not in options["batch"].kinds


# ------------------------------------------------------------------------------------------------ kill -9, resume


def test_an_atlas_killed_part_way_resumes_with_the_units_not_done_and_renders_none_twice(tmp_path):
    store = tmp_path / "store"
    killed = ServeProcess.support_script("atlas_worker.py", store, 2, 2)
    try:
        with Client(killed.address) as fv:
            model = fv.upload(export_onnx(TinyNet()), name="tiny.onnx")
            job = fv.atlas(model.sha256, layers=["/Relu"], channels=6, **RENDER)
            for event in fv.watch(job.id, timeout=300):  # two units stored; the worker steps no more
                if event.HasField("progress") and event.progress.step >= 2:
                    break
            before = {u.index for u in fv.atlas_units(job.id) if u.done}
    finally:
        assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
    assert len(before) == 2
    worker = atlas_worker(store, max_step_images=2)
    server = serve_in_background(ServerConfig(store, progress_interval=0.0, heartbeat_seconds=0.5,
                                              max_step_images=2), worker=worker)
    try:
        with Client(server.address) as fv:
            done = fv.wait(job.id, timeout=300)
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
            assert (done.result.atlas.units, done.result.atlas.done, done.result.atlas.rendered) == (6, 6, 6)
            resumed = worker.unit_submissions()
            assert sorted(int(unit.split(":")[1]) for unit in resumed) == sorted(set(range(6)) - before)
            units = list(fv.atlas_units(job.id))
            store_ = server._server.store
            assert set(_renders(store_, [u.key for u in units]).values()) == {1}  # no unit rendered twice
    finally:
        server.stop()

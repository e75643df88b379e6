"""The atlas's dataset join and its variant renders on a real server on loopback with the real worker (torch, CPU).

The model is the hand-built ``colour_net`` (tests/support/exemplar_models.py): at ``colour_relu`` channel 0 is a
pixel's red level, 1 its green, 2 its blue, 3 one minus its red. The set is black images with one red dot each: no
image has any green or blue, so channels 1 and 2 are never active on it (dead units), and the channels' dataset
scores are known from GetExemplars on the same index. A render's score is checked against an exemplar index of a
set made of that very render: the same measure, through the same pass. Nothing here sleeps or times anything."""

from __future__ import annotations

from pathlib import Path

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
from support.exemplar_models import colour_net  # noqa: E402
from support.exemplar_models import dot_image  # noqa: E402
from support.exemplar_models import png  # noqa: E402

TOKENS = {"tok-a": "alice", "tok-b": "bob", "tok-c": "carol"}
SIDE = 32
REDS = [50, 200, 120, 250, 10, 90]
RENDER = {"size": SIDE, "steps": 4}
LAYER = "colour_relu"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlasjoin")
    store = root / "store"
    worker = atlas_worker(store, max_step_images=4)
    server = serve_in_background(ServerConfig(store, tokens=TOKENS, progress_interval=0.0, heartbeat_seconds=0.5,
                                              max_step_images=4, limits=Limits(max_atlas_diversity=3)),
                                 worker=worker)
    clients = {tenant: Client(server.address, token=token) for token, tenant in TOKENS.items()}
    folder = root / "set"
    folder.mkdir()
    for i, red in enumerate(REDS):
        (folder / f"dot{i}.png").write_bytes(png(dot_image(SIDE, red, 3 + 4 * i, 5 + 3 * i)))
    model = clients["alice"].upload(colour_net(), name="colour.onnx")
    dataset = clients["alice"].upload_dataset(folder)
    for tenant in ("bob", "carol"):
        clients[tenant].upload(colour_net(), name="colour.onnx")
    clients["bob"].upload_dataset(folder)
    yield {"server": server, "worker": worker, "clients": clients, "model": model.sha256, "dataset": dataset.id,
           "store": server._server.store, "root": root}
    for client in clients.values():
        client.close()
    server.stop()


def test_each_unit_carries_its_dataset_join_consistent_with_get_exemplars(setup, tmp_path):
    fv, model, dataset = setup["clients"]["alice"], setup["model"], setup["dataset"]
    job = fv.atlas(model, layers=[LAYER], dataset=dataset, seed=1, wait=True, timeout=300, **RENDER)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    progress = fv.atlas_progress(job.id)
    assert (progress.units, progress.done, progress.joined) == (4, 4, 4)
    index_job = fv.job(progress.index_job)  # the join's index is a job of the tenant's, over the atlas's layers
    assert index_job.state == pb.JOB_STATE_SUCCEEDED and list(index_job.spec.exemplar_index.layers) == [LAYER]
    index = index_job.result.exemplar_index.index
    units = list(fv.atlas_units(job.id))
    assert [u.channel for u in units] == [0, 1, 2, 3] and all(u.exemplar_index == index for u in units)
    for unit in units:
        answer = fv.exemplars(model, dataset, LAYER, unit.channel, k=3)
        assert answer.index == index
        assert (unit.dataset_p50, unit.dataset_p99, unit.dataset_max) == (answer.p50, answer.p99, answer.max)
        assert unit.dataset_max == answer.exemplars[0].value  # the best example's score
        assert unit.dead == (unit.dataset_max <= 0)
        if unit.dead:
            assert unit.activation_ratio == 0 and unit.selectivity == 0
        else:
            assert unit.activation_ratio == pytest.approx(unit.render_score / unit.dataset_max)
            assert unit.selectivity == (pytest.approx(unit.dataset_p99 / unit.dataset_p50)
                                        if unit.dataset_p50 > 0 else 0)
    assert [u.dead for u in units] == [False, True, True, False]  # no green, no blue in the set
    assert units[0].dataset_max == pytest.approx(max(REDS) / 255, rel=1e-6)
    # the render's score is the measure the index ranks by: an index over a set made of the render agrees
    folder = tmp_path / "render"
    folder.mkdir()
    (folder / "render.png").write_bytes(fv.atlas_unit_image(job.id, 0).png)
    alone = fv.upload_dataset(folder)
    built = fv.index_exemplars(model, alone.id, [LAYER], wait=True, timeout=300)
    assert built.state == pb.JOB_STATE_SUCCEEDED, built.error
    assert units[0].render_score == pytest.approx(fv.exemplars(model, alone.id, LAYER, 0, k=1).max, rel=1e-5)
    # the same atlas again: the index is reused (its job ends cached), the scores are stored by render and index
    again = fv.atlas(model, layers=[LAYER], dataset=dataset, seed=1, wait=True, timeout=300, **RENDER)
    assert fv.job(fv.atlas_progress(again.id).index_job).result.exemplar_index.cached
    assert [(u.render_score, u.dataset_max) for u in fv.atlas_units(again.id)] == [
        (u.render_score, u.dataset_max) for u in units]


def test_negative_and_diversity_renders_are_stored_cached_across_atlases_and_served(setup):
    fv, bob, model, worker = setup["clients"]["alice"], setup["clients"]["bob"], setup["model"], setup["worker"]
    before = len(worker.unit_submissions())
    first = fv.atlas(model, layers=[LAYER], channels=2, negative=True, diversity=2, seed=7, wait=True, timeout=300,
                     **RENDER)
    assert first.state == pb.JOB_STATE_SUCCEEDED, first.error
    submitted = worker.unit_submissions()[before:]
    assert sorted(submitted) == sorted(f"{first.id}:{i}{v}" for i in range(2) for v in ("", ":2", ":3"))
    assert first.result.atlas.variants_done == 4 and first.result.atlas.done == 2
    units = list(fv.atlas_units(first.id))
    assert all(u.negative_done and u.diversity_done == 2 for u in units)
    render = fv.atlas_unit_image(first.id, 1)
    negative = fv.atlas_unit_image(first.id, 1, variant="negative")
    diverse = [fv.atlas_unit_image(first.id, 1, variant="diversity", image=i).png for i in range(2)]
    assert all(p.startswith(b"\x89PNG") for p in (render.png, negative.png, *diverse))
    assert len({render.png, negative.png, *diverse}) == 4
    with pytest.raises(FeaturevizClientError) as missing:
        fv.atlas_unit_image(first.id, 1, variant="diversity", image=2)
    assert missing.value.code == "NOT_FOUND" and "diversity image 2" in missing.value.message
    # bob's atlas with the same options renders nothing: units and variants come from the store
    count = len(worker.unit_submissions())
    second = bob.atlas(model, layers=[LAYER], channels=2, negative=True, diversity=2, seed=7, wait=True,
                       timeout=300, **RENDER)
    assert second.state == pb.JOB_STATE_SUCCEEDED and len(worker.unit_submissions()) == count
    assert (second.result.atlas.cached, second.result.atlas.variants_done) == (2, 4)
    assert bob.atlas_unit_image(second.id, 1, variant="negative").png == negative.png
    store = setup["store"]
    rows = store.atlas_variants(first.id, 0, 1)
    keys = [key for _, variant, _, key in rows if variant == pb.ATLAS_VARIANT_NEGATIVE]
    keys += [f"{key}/{i}" for _, variant, _, key in rows if variant == pb.ATLAS_VARIANT_DIVERSITY for i in range(2)]
    assert len(keys) == 6 and {store.get_unit(key)[6] for key in keys} == {1}  # each rendered once
    # an atlas without variants: NOT_FOUND naming the variant
    plain = fv.atlas(model, layers=[LAYER], channels=1, seed=7, wait=True, timeout=300, **RENDER)
    with pytest.raises(FeaturevizClientError) as none:
        fv.atlas_unit_image(plain.id, 0, variant="negative")
    assert none.value.code == "NOT_FOUND" and "no negative render" in none.value.message


def test_an_unknown_dataset_or_too_large_a_diversity_set_is_refused(setup):
    fv, carol, model, dataset = setup["clients"]["alice"], setup["clients"]["carol"], setup["model"], \
        setup["dataset"]
    with pytest.raises(FeaturevizClientError) as err:
        fv.atlas(model, layers=[LAYER], dataset="0" * 64, **RENDER)
    assert (err.value.code, err.value.reason) == ("NOT_FOUND", "DATASET_NOT_FOUND") and "0" * 64 in err.value.message
    with pytest.raises(FeaturevizClientError) as err:  # another tenant's set
        carol.atlas(model, layers=[LAYER], dataset=dataset, **RENDER)
    assert err.value.code == "NOT_FOUND" and dataset in err.value.message
    with pytest.raises(FeaturevizClientError) as err:
        fv.atlas(model, layers=[LAYER], dataset="not-an-id", **RENDER)
    assert err.value.code == "INVALID_ARGUMENT" and "spec.atlas.dataset" in str(err.value.field_violations or
                                                                              err.value.message)
    with pytest.raises(FeaturevizClientError) as err:
        fv.atlas(model, layers=[LAYER], diversity=4, **RENDER)
    assert err.value.code == "INVALID_ARGUMENT" and "max_atlas_diversity" in err.value.message
    assert fv.info().limits.max_atlas_diversity == 3


def test_a_restart_part_way_resumes_the_variants_and_the_join_and_renders_nothing_twice(setup, tmp_path):
    """A server stopped after two renders of an atlas with a negative and a join (the worker holds its device thread
    from then on, so the stop meets the atlas part way by construction): the next server on the same store renders
    only the rest and completes the join."""
    store = tmp_path / "store"
    folder = setup["root"] / "set"
    worker = atlas_worker(store, max_step_images=1, hold_after_units=2)
    server = serve_in_background(ServerConfig(store, progress_interval=0.0, heartbeat_seconds=0.5, grace_seconds=0.0,
                                              max_step_images=1), worker=worker)
    try:
        with Client(server.address) as fv:
            model = fv.upload(colour_net(), name="colour.onnx").sha256
            dataset = fv.upload_dataset(folder).id
            job = fv.atlas(model, layers=[LAYER], channels=2, negative=True, dataset=dataset, seed=9, **RENDER)
            for event in fv.watch(job.id, timeout=300):  # two renders stored; the worker steps no more
                if event.HasField("progress") and event.progress.step >= 2:
                    break
            stored = {f"{job.id}:{u.index}" for u in fv.atlas_units(job.id) if u.done}
            stored |= {f"{job.id}:{u.index}:2" for u in fv.atlas_units(job.id) if u.negative_done}
    finally:
        server.stop()
    assert len(stored) == 2
    worker = atlas_worker(store, max_step_images=1)
    server = serve_in_background(ServerConfig(store, progress_interval=0.0, heartbeat_seconds=0.5,
                                              max_step_images=1), worker=worker)
    try:
        with Client(server.address) as fv:
            done = fv.wait(job.id, timeout=300)
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
            progress = fv.atlas_progress(job.id)
            assert (progress.done, progress.variants_done, progress.joined) == (2, 2, 2)
            units = list(fv.atlas_units(job.id))
            assert all(u.negative_done and u.exemplar_index for u in units)
            every = {f"{job.id}:{i}{v}" for i in range(2) for v in ("", ":2")}
            assert sorted(worker.unit_submissions()) == sorted(every - stored)  # only what was not stored
            store_ = server._server.store
            keys = [u.key for u in units] + [key for _, _, _, key in store_.atlas_variants(job.id, 0, 1)]
            assert {store_.get_unit(key)[6] for key in keys} == {1}  # nothing rendered twice
    finally:
        server.stop()

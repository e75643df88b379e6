"""GetExemplars and GetDatasetImage on a real server on loopback, through the Python clients: the hand-built colour
model (channel 0 of ``colour_relu`` is a pixel's red level) over generated images whose ranking, positions and
boxes are known exactly; the three orders; a global-pool layer's whole-image units; the receptive field of the
conv stack (15 px, stride 8) and its cache; tenant isolation of sets and indexes; every bad argument named; the
crops' pixels against the original file's.

The indexes are built with the engine over the stored set's own image files and registered in the server's store
(``Store.record_index``), as a finished index job leaves them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from featureviz.client import AsyncClient  # noqa: E402
from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.client import pb  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.exemplar_models import colour_net  # noqa: E402
from support.exemplar_models import dot_image  # noqa: E402
from support.exemplar_models import png  # noqa: E402

SIDE = 64
RED = [30, 220, 90, 180, 250, 60]       # the red level of each image's square (channel 0: its spatial max)
SQUARE = [1, 1, 3, 1, 1, 4]             # its side (the spatial mean grows with its area)
POS = [(3, 60), (50, 10), (20, 20), (63, 0), (33, 41), (8, 8)]
NAMES = [f"dot{i}.png" for i in range(len(RED))]
TOKENS = {"token-a": "alice", "token-b": "bob"}


def _arrays():
    return [dot_image(SIDE, red, x, y, side=side, green=(17 * i) % 256)
            for i, (red, (x, y), side) in enumerate(zip(RED, POS, SQUARE))]


class _StoredSet:
    """The stored set's images in the set's order (names, files under the store): what an index job reads."""

    def __init__(self, store, tenant: str, dataset: str):
        self.images = store.dataset_images(tenant, dataset)
        self.names = [image.name for image in self.images]
        self.store = store

    def read(self, i: int) -> bytes:
        return self.store.image_path(self.images[i].sha256).read_bytes()


def build_server_index(server, tenant: str, model_bytes: bytes, dataset: str, layers: list[str], *, size: int,
                       k: int = 6) -> str:
    """Index the stored set with the engine, save it where the server keeps finished indexes and record it for
    ``tenant``; returns the index id."""
    from featureviz.engine.exemplars import build_index
    from featureviz.importer import import_model

    store = server._server.store
    model = import_model(model_bytes, use_cache=False)
    index = build_index(model, _StoredSet(store, tenant, dataset), layers=layers, k=k, size=size, batch_size=4)
    ident = hashlib.sha256(json.dumps([model.sha256, dataset, index.layers, size, k]).encode()).hexdigest()
    index.save(store.index_path(ident))
    store.record_index(tenant, model.sha256, pb.ExemplarIndexResult(
        index=ident, dataset=dataset, layers=index.layers, images=index.indexed, k=k,
        size=pb.ImageSize(height=size, width=size), channels=sum(index.states[n].channels for n in index.layers)))
    return ident


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exemplars")
    folder = root / "set"
    folder.mkdir()
    for name, array in zip(NAMES, _arrays()):
        (folder / name).write_bytes(png(array))
    config = ServerConfig(root / "store", tokens=TOKENS, heartbeat_seconds=0.5, grace_seconds=1.0)
    server = serve_in_background(config)
    model_bytes = colour_net()
    with Client(server.address, token="token-a") as alice, Client(server.address, token="token-b") as bob:
        model = alice.upload(model_bytes, name="colour.onnx")
        dataset = alice.upload_dataset(folder)
        bob.upload(model_bytes, name="colour.onnx")
        index = build_server_index(server, "alice", model_bytes, dataset.id, ["colour_relu", "r3", "pool", "flat"],
                                   size=SIDE)
        yield {"server": server, "model": model.sha256, "dataset": dataset.id, "index": index, "folder": folder,
               "model_bytes": model_bytes}
    server.stop()


@pytest.fixture()
def alice(setup):
    with Client(setup["server"].address, token="token-a") as fv:
        yield fv


@pytest.fixture()
def bob(setup):
    with Client(setup["server"].address, token="token-b") as fv:
        yield fv


def _ranked(key):
    return sorted(range(len(RED)), key=key)


def test_max_order_ranks_positions_and_boxes(setup, alice):
    answer = alice.exemplars(setup["model"], setup["dataset"], "colour_relu", 0, k=4)
    order = _ranked(lambda i: -RED[i])[:4]
    assert [e.name for e in answer.exemplars] == [NAMES[i] for i in order]
    assert [e.rank for e in answer.exemplars] == [0, 1, 2, 3]
    assert [(e.x, e.y) for e in answer.exemplars] == [POS[i] for i in order]
    assert [e.value for e in answer.exemplars] == [float(np.float32(RED[i]) / np.float32(255)) for i in order]
    # a 1x1 conv: the field is the pixel itself, the same in the file (the model saw it at its own size)
    for e, i in zip(answer.exemplars, order):
        x, y = POS[i]
        assert (e.box.x0, e.box.y0, e.box.x1, e.box.y1) == (x, y, x + 1, y + 1)
        assert e.image_box == e.box and not e.whole
    images = {image.name: image.sha256 for image in alice.dataset_images(setup["dataset"])}
    assert [e.image for e in answer.exemplars] == [images[NAMES[i]] for i in order]
    assert answer.layer == "colour_relu" and answer.channel == 0 and answer.order == pb.EXEMPLAR_ORDER_MAX
    assert answer.index == setup["index"] and answer.images == len(RED)
    assert (answer.size.height, answer.size.width) == (SIDE, SIDE)
    assert (answer.field_size, answer.field_stride, answer.whole) == (1, 1, False)
    assert answer.max == pytest.approx(250 / 255, rel=1e-6)
    assert answer.p50 <= answer.p99 <= answer.max
    default = alice.exemplars(setup["model"], setup["dataset"], "colour_out", 0, k=0)  # an alias; k 0 -> 9
    assert len(default.exemplars) == 6 and default.layer == "colour_relu"  # at most what the index keeps (6)


def test_mean_and_min_orders(setup, alice):
    mean = alice.exemplars(setup["model"], setup["dataset"], "colour_relu", 0, order="mean", k=6)
    by_mean = _ranked(lambda i: -RED[i] * SQUARE[i] ** 2)
    assert [e.name for e in mean.exemplars] == [NAMES[i] for i in by_mean]
    assert [e.value for e in mean.exemplars] == pytest.approx(
        [RED[i] / 255 * SQUARE[i] ** 2 / SIDE ** 2 for i in by_mean], rel=1e-5)
    assert mean.order == pb.EXEMPLAR_ORDER_MEAN
    low = alice.exemplars(setup["model"], setup["dataset"], "colour_relu", 0, order="min", k=3)
    by_min = _ranked(lambda i: RED[i])[:3]
    assert [e.name for e in low.exemplars] == [NAMES[i] for i in by_min]
    assert [(e.x, e.y) for e in low.exemplars] == [POS[i] for i in by_min]  # top-left pixel of each square
    assert low.order == pb.EXEMPLAR_ORDER_MIN


def test_conv_stack_field_and_its_cache(setup, alice):
    server = setup["server"]
    queries = server._server.scheduler.worker.queries
    answer = alice.exemplars(setup["model"], setup["dataset"], "r3", 0, k=6)
    assert (answer.field_size, answer.field_stride, answer.whole) == (15, 8, False)  # three 3x3 stride-2 convs
    for e in answer.exemplars:
        assert 0 <= e.x < 8 and 0 <= e.y < 8
        x0, y0 = e.x * 8 - 7, e.y * 8 - 7  # offset 7, clipped at the border
        assert (e.box.x0, e.box.y0, e.box.x1, e.box.y1) == (max(0, x0), max(0, y0), min(SIDE, x0 + 15),
                                                            min(SIDE, y0 + 15))
        assert e.image_box == e.box  # the model saw each file at its own size
    computed = queries.computed
    again = alice.exemplars(setup["model"], setup["dataset"], "r3", 1, k=2)
    assert queries.computed == computed and again.field_size == 15  # cached per (model, layer, input size)
    sidecars = list(server._server.store.index_path(setup["index"]).parent.glob("fields-*.json"))
    assert len(sidecars) == 1 and "r3" in json.loads(sidecars[0].read_text())["fields"]
    from featureviz.engine.exemplars import ReceptiveField

    field = ReceptiveField.from_dict(json.loads(sidecars[0].read_text())["fields"]["r3"])
    assert field.crop_box((0, 0)) == (0, 0, 8, 8) and field.crop_box((7, 7)) == (49, 49, 64, 64)  # clipped borders


def test_global_pool_units_see_the_whole_image(setup, alice):
    for layer in ("pool", "flat"):
        answer = alice.exemplars(setup["model"], setup["dataset"], layer, 0, k=3)
        assert answer.whole and answer.field_size == 0
        for e in answer.exemplars:
            assert e.whole and (e.image_box.x0, e.image_box.y0, e.image_box.x1, e.image_box.y1) == (0, 0, SIDE, SIDE)
    assert not answer.exemplars[0].HasField("x")  # rank 2: no position


@pytest.mark.parametrize("args,kwargs,field,words", [
    (("colour_relu", 4), {}, "channel", "4 channels"),
    (("colour_relu", -1), {}, "channel", "4 channels"),
    (("no_such_layer", 0), {}, "layer", "no_such_layer"),
    (("colour_relu", 0), {"k": 101}, "k", "max_exemplar_k"),
    (("colour_relu", 0), {"k": 7}, "k", "keeps (6)"),
    (("colour_relu", 0), {"k": -2}, "k", "k must be"),
], ids=["channel-high", "channel-negative", "layer", "k-over-limit", "k-over-index", "k-negative"])
def test_bad_arguments_are_named(setup, alice, args, kwargs, field, words):
    with pytest.raises(FeaturevizClientError) as err:
        alice.exemplars(setup["model"], setup["dataset"], *args, **kwargs)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == field
    assert words in err.value.message and "\n" not in err.value.message


def test_bad_order_is_named(setup, alice):
    request = pb.GetExemplarsRequest(model=setup["model"], dataset=setup["dataset"], layer="colour_relu", order=9)
    with pytest.raises(FeaturevizClientError) as err:
        alice._call(alice._datasets.GetExemplars, request)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == "order"
    with pytest.raises(ValueError, match="order"):
        alice.exemplars(setup["model"], setup["dataset"], "colour_relu", 0, order="median")


def test_no_index_of_the_layer_or_size_names_the_job_to_run(setup, alice):
    for layer, size in (("r1", None), ("colour_relu", 32)):
        with pytest.raises(FeaturevizClientError) as err:
            alice.exemplars(setup["model"], setup["dataset"], layer, 0, size=size)
        assert (err.value.code, err.value.reason) == ("NOT_FOUND", "EXEMPLAR_INDEX_NOT_FOUND")
        assert "featureviz exemplars" in err.value.message and "exemplar_index" in err.value.message


def test_tenants_see_only_their_sets_and_indexes(setup, bob, tmp_path):
    with pytest.raises(FeaturevizClientError) as err:  # bob holds the model, not the set
        bob.exemplars(setup["model"], setup["dataset"], "colour_relu", 0)
    assert (err.value.code, err.value.reason) == ("NOT_FOUND", "DATASET_NOT_FOUND")
    with pytest.raises(FeaturevizClientError) as err:
        bob.dataset_image(setup["dataset"], NAMES[0])
    assert (err.value.code, err.value.reason) == ("NOT_FOUND", "DATASET_NOT_FOUND")
    with Client(setup["server"].address, token="token-b") as other:  # the same set, uploaded by bob: no index yet
        assert other.upload_dataset(setup["folder"]).id == setup["dataset"]
        with pytest.raises(FeaturevizClientError) as err:
            other.exemplars(setup["model"], setup["dataset"], "colour_relu", 0)
        assert (err.value.code, err.value.reason) == ("NOT_FOUND", "EXEMPLAR_INDEX_NOT_FOUND")
        other.delete_dataset(setup["dataset"])


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_dataset_image_whole_crop_and_downscale(setup, alice):
    arrays = _arrays()
    whole = alice.dataset_image(setup["dataset"], NAMES[2])
    assert np.array_equal(_decode(whole), arrays[2])
    sha = next(i.sha256 for i in alice.dataset_images(setup["dataset"]) if i.name == NAMES[4])
    crop = alice.dataset_image(setup["dataset"], sha, box=(3, 5, 20, 17))
    assert _decode(crop).shape == (12, 17, 3) and np.array_equal(_decode(crop), arrays[4][5:17, 3:20])
    clipped = alice.dataset_image(setup["dataset"], NAMES[4], box=(50, 60, 80, 90))  # clipped to the image
    assert np.array_equal(_decode(clipped), arrays[4][60:, 50:])
    small = alice.dataset_image(setup["dataset"], NAMES[4], max_side=16)
    assert _decode(small).shape == (16, 16, 3)
    answer = alice.exemplars(setup["model"], setup["dataset"], "r3", 0, k=1)
    e = answer.exemplars[0]
    piece = alice.dataset_image(setup["dataset"], e, box=e.image_box)
    b = e.image_box
    assert np.array_equal(_decode(piece), arrays[NAMES.index(e.name)][b.y0:b.y1, b.x0:b.x1])
    reply = alice._call(alice._datasets.GetDatasetImage, pb.GetDatasetImageRequest(
        dataset=setup["dataset"], image=NAMES[1], box=pb.CropBox(x0=1, y0=2, x1=5, y1=9)))
    assert (reply.width, reply.height, reply.name, reply.sha256) == (4, 7, NAMES[1], next(
        i.sha256 for i in alice.dataset_images(setup["dataset"]) if i.name == NAMES[1]))


@pytest.mark.parametrize("image,kwargs,code,field", [
    ("nope.png", {}, "NOT_FOUND", None),
    ("0" * 64, {}, "NOT_FOUND", None),
    ("", {}, "INVALID_ARGUMENT", "image"),
    ("dot0.png", {"box": (10, 10, 10, 20)}, "INVALID_ARGUMENT", "box"),
    ("dot0.png", {"box": (70, 0, 90, 10)}, "INVALID_ARGUMENT", "box"),
    ("dot0.png", {"box": (-20, -20, -1, -1)}, "INVALID_ARGUMENT", "box"),
    ("dot0.png", {"max_side": 100000}, "INVALID_ARGUMENT", "max_side"),
], ids=["unknown-name", "unknown-sha", "empty", "empty-box", "box-outside", "box-negative", "max-side"])
def test_dataset_image_refusals(setup, alice, image, kwargs, code, field):
    with pytest.raises(FeaturevizClientError) as err:
        alice.dataset_image(setup["dataset"], image, **kwargs)
    assert err.value.code == code and "\n" not in err.value.message
    if field:
        assert err.value.field_violations[0][0] == field
    else:
        assert err.value.reason == "IMAGE_NOT_FOUND"


def test_async_client_twins(setup):
    async def scenario():
        async with AsyncClient(setup["server"].address, token="token-a") as fv:
            answer = await fv.exemplars(setup["model"], setup["dataset"], "colour_relu", 0, k=2)
            data = await fv.dataset_image(setup["dataset"], answer.exemplars[0], box=answer.exemplars[0].image_box)
            return answer, data

    answer, data = asyncio.run(scenario())
    assert [e.name for e in answer.exemplars] == [NAMES[4], NAMES[1]]
    assert _decode(data).shape == (1, 1, 3) and _decode(data)[0, 0, 0] == 250


def _cli(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "featureviz", "exemplars", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_cli_remote_and_local_give_the_same_keys_and_grid(setup, tmp_path):
    remote_grid, local_grid = tmp_path / "remote.png", tmp_path / "local.png"
    model_file = tmp_path / "colour.onnx"
    model_file.write_bytes(setup["model_bytes"])
    remote = _cli(setup["model"], setup["dataset"], "colour_relu:0", "--k", "4", "--size", SIDE, "--json",
                  "--out", remote_grid, "--server", setup["server"].address, "--token", "token-a")
    assert remote.returncode == 0, remote.stderr
    by_file = _cli(model_file, setup["folder"], "colour_relu:0", "--k", "4", "--size", SIDE, "--json",
                   env={"FEATUREVIZ_SERVER": setup["server"].address, "FEATUREVIZ_TOKEN": "token-a"})
    assert by_file.returncode == 0, by_file.stderr  # the file and the folder: found on the server by their bytes
    local = _cli(model_file, setup["folder"], "colour_relu:0", "--k", "4", "--size", SIDE, "--json", "--out",
                 local_grid, "--local", "--cache-dir", tmp_path / "cache", "--layers", "r3,pool,flat")
    assert local.returncode == 0, local.stderr
    remote_json, file_json, local_json = (json.loads(r.stdout) for r in (remote, by_file, local))
    assert set(remote_json) == set(local_json) and remote_json == {**file_json, "grid": str(remote_grid)}
    assert [set(e) for e in remote_json["exemplars"]] == [set(e) for e in local_json["exemplars"]]
    for key in ("name", "value", "position", "box", "image_box", "whole", "rank"):
        assert [e[key] for e in remote_json["exemplars"]] == [e[key] for e in local_json["exemplars"]], key
    assert (remote_json["layer"], remote_json["indexed"], remote_json["input_size"]) == ("colour_relu", 6, [64, 64])
    assert remote_json["index"] == setup["index"] and remote_json["field"] == local_json["field"]
    images = {i.name: i.sha256 for i in Client(setup["server"].address, token="token-a").dataset_images(
        setup["dataset"])}
    assert [e["image"] for e in remote_json["exemplars"]] == [images[e["name"]] for e in remote_json["exemplars"]]
    assert np.array_equal(_decode(remote_grid.read_bytes()), _decode(local_grid.read_bytes()))
    top = _decode(remote_grid.read_bytes())[2 + 48, 2 + 48]  # the first tile's middle: the top image's red pixel
    assert tuple(top) == (250, 68, 0)


def test_cli_remote_errors_are_one_line(setup, tmp_path):
    missing = _cli(setup["model"], setup["dataset"], "nope:0", "--server", setup["server"].address, "--token",
                   "token-a", "--size", SIDE)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "UNKNOWN_LAYER" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = _cli(setup["model"], setup["dataset"], "colour_relu:9", "--size", SIDE, "--server",
               setup["server"].address, "--token", "token-a")
    assert bad.returncode == 1 and "4 channels" in bad.stderr and "Traceback" not in bad.stderr
    other = _cli(setup["model"], setup["dataset"], "colour_relu:0", "--server", setup["server"].address, "--token",
                 "token-b")
    assert other.returncode == 1 and "DATASET_NOT_FOUND" in other.stderr


def test_index_job_through_the_clients_then_its_examples(setup, alice):
    job = alice.index_exemplars(setup["model"], setup["dataset"], ["r1", "colour"], k=5, batch_size=4, size=SIDE)
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED)
    done = alice.wait(job.id, timeout=600)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    result = done.result.exemplar_index
    assert set(result.layers) == {"r1", "colour"} and result.k == 5 and result.images == len(RED)
    answer = alice.exemplars(setup["model"], setup["dataset"], "colour_pre", 0, k=5)  # colour, by its alias
    assert answer.index == result.index and answer.layer == "colour"
    assert [e.name for e in answer.exemplars] == [NAMES[i] for i in _ranked(lambda i: -RED[i])[:5]]
    r1 = alice.exemplars(setup["model"], setup["dataset"], "r1", 2, k=5)
    assert (r1.field_size, r1.field_stride) == (3, 2) and r1.index == result.index

    async def again():
        async with AsyncClient(setup["server"].address, token="token-a") as fv:
            return await fv.index_exemplars(setup["model"], setup["dataset"], ["r1", "colour"], k=5, size=SIDE,
                                            wait=True, timeout=600)

    cached = asyncio.run(again())
    assert cached.state == pb.JOB_STATE_SUCCEEDED and cached.result.exemplar_index.cached
    assert cached.result.exemplar_index.index == result.index


def test_cli_remote_runs_the_index_job_when_none_holds_the_layer(setup, tmp_path):
    grid = tmp_path / "grid.png"
    run = _cli(setup["model"], setup["dataset"], "r2:1", "--k", "3", "--index-k", "4", "--size", SIDE, "--json",
               "--out", grid, "--server", setup["server"].address, "--token", "token-a")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["layer"] == "r2" and len(data["exemplars"]) == 3 and data["indexed"] == len(RED)
    assert data["field"] == {"whole": False, "regular": True, "size": [7, 7], "stride": [4, 4]}
    with Client(setup["server"].address, token="token-a") as fv:
        jobs = [j for j in fv.jobs() if j.spec.HasField("exemplar_index") and list(j.spec.exemplar_index.layers)
                == ["r2"]]
    assert len(jobs) == 1 and jobs[0].result.exemplar_index.index == data["index"]
    assert _decode(grid.read_bytes()).shape == (2 + 2 * 98, 2 + 2 * 98, 3)


def test_the_index_jobs_progress_bar_counts_images(setup, capsys):
    """The command line's job watcher (featureviz.cli.remote) draws an index job's progress in images: it has no
    objective to show."""
    from featureviz.cli.remote import watch_with_progress

    with Client(setup["server"].address, token="token-a") as fv:
        job = fv.index_exemplars(setup["model"], setup["dataset"], ["r1"], k=5, size=SIDE)
        done = watch_with_progress(fv, job.id, label="index")
    assert done.state == pb.JOB_STATE_SUCCEEDED
    bar = [line for line in capsys.readouterr().err.splitlines() if line.startswith("index")]
    assert bar and all("objective" not in line for line in bar), bar
    assert any(f"{len(RED)}/{len(RED)} images" in line for line in bar), bar


def test_concurrent_queries_compute_a_field_once(setup):
    from concurrent.futures import ThreadPoolExecutor

    server = setup["server"]
    build_server_index(server, "alice", setup["model_bytes"], setup["dataset"], ["c2"], size=SIDE, k=3)
    queries = server._server.scheduler.worker.queries
    with Client(server.address, token="token-a") as fv:
        fv.exemplars(setup["model"], setup["dataset"], "r3", 0, k=1)  # another field of that model and size
    before = queries.computed

    def ask(channel):
        with Client(server.address, token="token-a") as fv:
            return fv.exemplars(setup["model"], setup["dataset"], "c2", channel % 4, k=3)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert queries.computed == before + 1
    assert {(a.field_size, a.field_stride) for a in answers} == {(7, 4)}
    assert answers[0] == answers[4] and answers[1] == answers[5]
    sidecar = next(server._server.store.index_path(setup["index"]).parent.glob("fields-*.json"))
    assert {"c2", "r3"} <= set(json.loads(sidecar.read_text())["fields"])  # merged, none lost
    from featureviz.worker.api import ExemplarQuery
    from featureviz.worker.queries import Queries

    fresh = Queries(models=None)  # another process (a restart, another Ray actor): the sidecar, no model needed
    path = str(server._server.store.index_path(setup["index"]))
    again = fresh.exemplars(ExemplarQuery(index_path=path, model=setup["model"], layer="r3", channel=0, order="max",
                                          k=3))
    assert fresh.computed == 0 and (again.field_size, again.field_stride) == (15, 8)
    sidecar.write_text("{not json")  # damaged: ignored, computed again and rewritten
    with pytest.raises(AttributeError):  # no model to compute it with: it did try
        Queries(models=None).exemplars(ExemplarQuery(index_path=path, model=setup["model"], layer="r3", channel=0,
                                                     order="max", k=3))

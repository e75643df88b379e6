"""The exemplar index on a hand-built model whose answers are known exactly (tests/support/exemplar_models.py):
top-k / mean / bottom-k order and argmax positions, deterministic ties, the quantile sketch's error bound,
receptive fields against the hand-computed conv stack, and resume after kill -9 giving an identical index."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from featureviz.engine.exemplars import ExemplarIndex  # noqa: E402
from featureviz.engine.exemplars import ImageFolder  # noqa: E402
from featureviz.engine.exemplars import LayerState  # noqa: E402
from featureviz.engine.exemplars import SKETCH_ERROR  # noqa: E402
from featureviz.engine.exemplars import build_index  # noqa: E402
from featureviz.engine.exemplars import receptive_field  # noqa: E402
from featureviz.engine.exemplars import reduce_activation  # noqa: E402
from featureviz.errors import InvalidSpec  # noqa: E402
from featureviz.errors import NotFound  # noqa: E402
from tests.support.exemplar_models import colour_net  # noqa: E402
from tests.support.exemplar_models import dot_image  # noqa: E402
from tests.support.exemplar_models import png  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# image i: a red dot of level RED[i] at (X[i], Y[i]) on a green background of level GREEN[i] (32 x 32)
RED = [40, 200, 120, 200, 10, 250, 90, 160, 30, 250, 70, 5]
GREEN = [3, 80, 10, 40, 90, 1, 60, 20, 90, 7, 50, 30]
X = [0, 31, 5, 9, 17, 3, 28, 14, 22, 30, 8, 11]
Y = [0, 31, 7, 2, 25, 19, 4, 30, 13, 0, 16, 21]


def _f32(level: int) -> float:
    return float(np.float32(level) / np.float32(255.0))


@pytest.fixture(scope="module")
def model():
    from featureviz.importer import import_model

    return import_model(colour_net(), use_cache=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dots")
    for i, (red, green, x, y) in enumerate(zip(RED, GREEN, X, Y)):
        (path / f"img{i:02d}.png").write_bytes(png(dot_image(32, red, x, y, green=green)))
    return path


@pytest.fixture(scope="module")
def index(model, folder):
    return build_index(model, ImageFolder(folder), layers=["colour_relu", "r3", "pool", "flat"], k=5, size=32,
                       batch_size=4, chunk_images=8)


def _expected(keys: list, descending: bool, k: int) -> list[int]:
    """Image indices sorted by key (descending or not), ties by the lower index."""
    return sorted(range(len(keys)), key=lambda i: (-keys[i] if descending else keys[i], i))[:k]


def test_top_k_by_max_exact_values_order_ties_and_positions(model, index):
    got = index.exemplars("colour_relu", 0, "max", model=model)
    want = _expected(RED, True, 5)
    assert want[:2] == [5, 9] and want[2:4] == [1, 3]  # the two ties, broken by the lower image index
    assert [e.image for e in got] == want
    assert [e.name for e in got] == [f"img{i:02d}.png" for i in want]
    assert [e.value for e in got] == [_f32(RED[i]) for i in want]
    assert [e.position for e in got] == [(X[i], Y[i]) for i in want]
    # colour_relu's field is one pixel: the crop box is the dot itself
    assert [e.box for e in got] == [(X[i], Y[i], X[i] + 1, Y[i] + 1) for i in want]


def test_top_k_by_mean_and_bottom_k_by_max(model, index):
    by_mean = index.exemplars("colour_relu", 1, "mean")  # channel 1 is green: uniform, so its mean is its level
    assert [e.image for e in by_mean] == _expected(GREEN, True, 5)
    assert [e.value for e in by_mean] == pytest.approx([_f32(GREEN[i]) for i in _expected(GREEN, True, 5)],
                                                       rel=1e-6)
    low = index.exemplars("colour_relu", 0, "min", k=3)
    assert [e.image for e in low] == _expected(RED, False, 3)
    assert [e.value for e in low] == [_f32(RED[i]) for i in _expected(RED, False, 3)]
    # channel 3 is 1 - R: its max is 1 (any black pixel), so every image ties and the lowest indices win
    assert [e.image for e in index.exemplars("colour_relu", 3, "max")] == [0, 1, 2, 3, 4]


def test_quantiles_p50_p99_max_from_the_sketch(index):
    q = index.quantiles("colour_relu")
    values = sorted(_f32(level) for level in RED)
    assert q["max"][0] == values[-1]  # exact
    p50 = values[int(np.ceil(0.5 * len(values))) - 1]  # nearest rank
    assert abs(q["p50"][0] - p50) <= SKETCH_ERROR * p50


def test_sketch_error_bound_and_fixed_memory():
    generator = torch.Generator().manual_seed(0)
    state = LayerState(3, 4)
    before = state.sketch.shape
    for n in range(20):  # values over 6 decades, both signs
        batch = torch.exp(torch.randn(100, 3, generator=generator) * 3) * torch.tensor([1.0, -1.0, 1.0])
        state.update(batch, batch, torch.zeros(100, 3, dtype=torch.int64), torch.arange(n * 100, n * 100 + 100))
        values = batch if n == 0 else torch.cat([values, batch])  # noqa: F821
    assert state.sketch.shape == before and int(state.count) == 2000
    q = state.quantiles()
    for name, p in (("p50", 0.5), ("p99", 0.99)):
        for c in range(3):
            exact = torch.sort(values[:, c]).values[int(np.ceil(p * 2000)) - 1].item()
            assert abs(q[name][c].item() - exact) <= SKETCH_ERROR * abs(exact) + 1e-3, (name, c)
    assert q["max"].tolist() == values.max(0).values.double().tolist()


def test_reduce_tokens_and_rank_two():
    tokens = torch.zeros(2, 1 + 6, 3)  # one CLS token, then a 2 x 3 patch grid
    tokens[:, 0, :] = 100.0  # the CLS token never counts
    tokens[0, 1 + 4, 1] = 5.0  # patch 4: row 1, column 1
    best, mean, where = reduce_activation(tokens, prefix_tokens=1)
    assert best[0, 1] == 5.0 and where[0, 1] == 4 and mean[0, 1] == pytest.approx(5.0 / 6)
    flat = torch.tensor([[1.0, -2.0], [float("nan"), 3.0]])
    best, mean, where = reduce_activation(flat)
    assert best[0].tolist() == [1.0, -2.0] and mean[0].tolist() == [1.0, -2.0] and (where == -1).all()
    assert best[1, 0] == float("-inf")  # NaN never ranks first


def test_receptive_field_of_the_stride_two_stack(model):
    fields = {name: receptive_field(model, name, (64, 64)) for name in ("r1", "r2", "r3", "pool", "flat")}
    assert [(f.size, f.stride, f.offset) for f in (fields["r1"], fields["r2"], fields["r3"])] == [
        ((3, 3), (2, 2), (1, 1)), ((7, 7), (4, 4), (3, 3)), ((15, 15), (8, 8), (7, 7))]
    r3 = fields["r3"]
    assert r3.regular and not r3.whole and r3.map_size == (8, 8)
    assert r3.crop_box((3, 2)) == (17, 9, 32, 24)  # 8p - 7 .. 8p + 8
    assert r3.crop_box((0, 0)) == (0, 0, 8, 8)  # clipped at the top-left border
    assert r3.crop_box((7, 0)) == (49, 0, 64, 8)
    assert fields["pool"].whole and fields["pool"].crop_box((0, 0)) == (0, 0, 64, 64)
    assert fields["flat"].whole and fields["flat"].crop_box(None) == (0, 0, 64, 64)
    with pytest.raises(ValueError, match="outside"):
        r3.crop_box((8, 0))


def _saturating_pool_net() -> bytes:
    """Conv 3x3 (pad 1, large positive weights) -> Clip 0..6 (saturates: zero gradient almost everywhere) ->
    MaxPool 2x2 stride 2 with SAME_UPPER (the importer's own PaddedMaxPool, not nn.MaxPool2d) -> Conv 3x3 (pad 1,
    mixed signs) -> Relu -> ReduceMax over H, W. Fields by hand: c1 and r1 3 (stride 1, offset 1); p1 4 (stride 2,
    offset 1); c2 and r2 4 + 2 * 2 = 8 (stride 2, offset 1 + 2 = 3); the ReduceMax the whole image."""
    import onnx
    from onnx import TensorProto
    from onnx import helper
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.random((4, 3, 3, 3)) * 2 + 1).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="r1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="p1", kernel_shape=[2, 2], strides=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
             helper.make_node("ReduceMax", ["r2"], ["g"], name="g", axes=[2, 3], keepdims=1)]
    graph = helper.make_graph(nodes, "saturating_pool",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 4, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_receptive_fields_through_saturating_clamps_and_the_importers_max_pool():
    """Before SupportMode the gradient through the saturated Clip was zero and every layer after it said 'whole';
    max pools that are not nn.MaxPool2d (the importer's PaddedMaxPool) kept only their winners."""
    from featureviz.importer import import_model

    model = import_model(_saturating_pool_net(), use_cache=False, verify=False)
    assert "PaddedMaxPool" in {type(m).__name__ for m in model.module.modules()}
    fields = {name: receptive_field(model, name, (32, 32)) for name in ("c1", "r1", "p1", "c2", "r2", "g")}
    assert [(f.size, f.stride, f.offset) for f in (fields[n] for n in ("c1", "r1", "p1", "c2", "r2"))] == [
        ((3, 3), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1)), ((4, 4), (2, 2), (1, 1)), ((8, 8), (2, 2), (3, 3)),
        ((8, 8), (2, 2), (3, 3))]
    assert all(fields[n].regular and not fields[n].whole for n in ("c1", "r1", "p1", "c2", "r2"))
    assert fields["r2"].crop_box((3, 3)) == (3, 3, 11, 11)
    assert fields["r2"].crop_box((0, 15)) == (0, 27, 5, 32)  # clipped at the left and bottom borders
    assert fields["g"].whole


def test_whole_image_layers_say_so_in_the_query(model, index):
    (first,) = index.exemplars("flat", 0, "max", k=1, model=model)
    assert first.whole and first.position is None and first.box == (0, 0, 32, 32)
    (pooled,) = index.exemplars("pool", 0, "max", k=1, model=model)
    assert pooled.whole and pooled.box == (0, 0, 32, 32)


def test_bad_queries_and_unknown_layers_before_compute(model, folder, index):
    with pytest.raises(NotFound, match="nope"):
        build_index(model, ImageFolder(folder), layers=["nope"], size=32)
    with pytest.raises(InvalidSpec, match="channel 4 is out of range"):
        index.exemplars("colour_relu", 4)
    with pytest.raises(InvalidSpec, match="k must be 1..5"):
        index.exemplars("colour_relu", 0, k=6)
    with pytest.raises(InvalidSpec, match="order"):
        index.exemplars("colour_relu", 0, order="median")
    with pytest.raises(InvalidSpec, match="k must be 1..100"):
        build_index(model, ImageFolder(folder), k=101, size=32)


def test_save_and_load_round_trip_without_pickle(model, index, tmp_path):
    index.field("r3", model)
    index.save(tmp_path / "i.npz")
    loaded = ExemplarIndex.load(tmp_path / "i.npz")
    assert loaded.exemplars("r3", 2) == index.exemplars("r3", 2)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="not a readable exemplar index"):
        ExemplarIndex.load(tmp_path / "bad.npz")


CHILD = textwrap.dedent("""
    import sys
    from featureviz.engine.exemplars import ImageFolder, build_index
    from featureviz.importer import import_model

    model_path, folder, state, stop_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def on_chunk(position, total):
        print("CHUNK", position, flush=True)
        if position == stop_at:
            sys.stdin.read()  # the parent kills us here: after this chunk's state is on disk

    model = import_model(model_path, verify=False, cache_dir=state.split(",")[0] + ".models")
    for path in state.split(","):  # resume (or start) each state in turn, in this one process
        build_index(model, ImageFolder(folder), layers=["colour_relu", "r2", "r3", "flat"], k=4, size=32,
                    batch_size=3, chunk_images=6, state_path=path, on_chunk=on_chunk)
        print("DONE", flush=True)
""")


def _child(tmp_path, folder, state: str, stop_at):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "m.onnx"), str(folder), str(state),
                             str(stop_at)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def test_resume_after_kill_9_gives_an_identical_index(tmp_path):
    (tmp_path / "m.onnx").write_bytes(colour_net())
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):  # 7 chunks of 6 images (the last one short), in batches of 3
        (folder / f"{i:03d}.png").write_bytes(png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    whole_file = (folder / "019.png").read_bytes()
    (folder / "019.png").write_bytes(whole_file[:len(whole_file) // 2])  # truncated: a skip in a killed chunk

    killed = _child(tmp_path, folder, tmp_path / "state.npz", stop_at=12)
    assert killed.stdout.readline().split() == ["CHUNK", "6"]
    assert killed.stdout.readline().split() == ["CHUNK", "12"]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    killed.stdout.close()
    saved = ExemplarIndex.load(tmp_path / "state.npz")
    assert saved.meta["position"] == 12 and not saved.complete

    # the resumed pass and an uninterrupted one, in one process (same threads, same kernels)
    again = _child(tmp_path, folder, f"{tmp_path / 'state.npz'},{tmp_path / 'whole.npz'}", stop_at=-1)
    out, _ = again.communicate("")
    assert again.returncode == 0
    lines = out.split("\n")
    assert lines[0] == "CHUNK 18"  # it went on after the last finished chunk
    assert lines[lines.index("DONE") + 1] == "CHUNK 6"  # the uninterrupted pass did every chunk

    with np.load(tmp_path / "state.npz", allow_pickle=False) as a, np.load(tmp_path / "whole.npz",
                                                                          allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    done = ExemplarIndex.load(tmp_path / "state.npz")
    assert done.complete and done.indexed == 39 and done.skipped["corrupt"]["names"][0][0] == "019.png"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

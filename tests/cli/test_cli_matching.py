"""``featureviz render ... match:L:C@NAME --match-images NAME=DIR`` in a real subprocess (local mode): the folder is
indexed once (cached under the model cache's exemplars/), the render runs; an unknown name is NOT_FOUND naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from support.images import noisy_png  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _render(*args, cache):
    env = {**os.environ, "FEATUREVIZ_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "featureviz", "render", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_local_render_with_a_match_term(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "m.onnx").write_bytes(export_onnx(TinyNet()))
    images = tmp_path / "noise"
    images.mkdir()
    for i in range(6):
        (images / f"n{i}.png").write_bytes(noisy_png(40, seed=i))
    cache = tmp_path / "cache"
    done = _render(tmp_path / "m.onnx", "/Relu_1:3 - 0.5*match:/Relu_1:3@noise", "--match-images", images,
                   "--steps", 2, "--size", 32, "--out", tmp_path / "out.png", cache=cache)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").stat().st_size > 0
    assert len(list((cache / "models" / "exemplars").glob("*.npz"))) == 1  # the folder's index, cached
    # a name the folder does not answer to: NOT_FOUND naming it, before any index is built
    from featureviz.cli.matching import local_match_targets
    from featureviz.engine import objectives as O
    from featureviz.errors import NotFound
    from featureviz.importer import import_model

    resolve = local_match_targets(f"noise={images}", import_model(tmp_path / "m.onnx", use_cache=False))
    with pytest.raises(NotFound, match="no image folder named 'other'"):
        resolve(O.Match("/Relu_1", 3, "other"), layer="/Relu_1", match_layer="/Relu_1", size=(32, 32),
                preprocess=None, path="objective.match")

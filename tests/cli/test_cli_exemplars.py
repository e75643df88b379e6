"""``featureviz exemplars`` in a real subprocess (local mode): the ranked JSON of a hand-built model over a folder
of generated images, the crop grid, the cache making the second call skip the pass, and hostile files (corrupt,
truncated, non-image, a 20000x20000 header, a symbolic link) skipped and named, never a traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from tests.support.exemplar_models import colour_net  # noqa: E402
from tests.support.exemplar_models import dot_image  # noqa: E402
from tests.support.exemplar_models import png  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RED = [30, 220, 90, 180, 250, 60]
POS = [(3, 60), (50, 10), (20, 20), (63, 0), (33, 41), (8, 8)]


def _huge_header_png(side: int = 20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _run(*args, cache):
    env = {**os.environ, "FEATUREVIZ_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "featureviz", "exemplars", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exemplars_cli")
    (root / "m.onnx").write_bytes(colour_net())
    images = root / "images"
    images.mkdir()
    for i, (red, (x, y)) in enumerate(zip(RED, POS)):
        (images / f"dot{i}.png").write_bytes(png(dot_image(64, red, x, y)))
    good = (images / "dot0.png").read_bytes()
    (images / "cut.png").write_bytes(good[:len(good) // 2])
    (images / "notes.txt").write_text("not an image")
    (images / "huge.png").write_bytes(_huge_header_png())
    outside = root / "outside.png"
    outside.write_bytes(png(dot_image(64, 255, 0, 0)))
    (images / "link.png").symlink_to(outside)
    return root


def test_json_ranked_examples_grid_and_cache(setup, tmp_path):
    cache = tmp_path / "cache"
    grid = tmp_path / "grid.png"
    first = _run(setup / "m.onnx", setup / "images", "colour_relu:0", "--k", "4", "--size", "64", "--json",
                 "--layers", "r3", "--out", grid, cache=cache)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    order = sorted(range(len(RED)), key=lambda i: -RED[i])[:4]
    assert [e["name"] for e in data["exemplars"]] == [f"dot{i}.png" for i in order]
    assert [e["position"] for e in data["exemplars"]] == [list(POS[i]) for i in order]
    assert [e["box"] for e in data["exemplars"]] == [[POS[i][0], POS[i][1], POS[i][0] + 1, POS[i][1] + 1]
                                                     for i in order]
    assert [e["value"] for e in data["exemplars"]] == [float(np.float32(RED[i]) / np.float32(255)) for i in order]
    assert data["indexed"] == 6 and data["skipped"] == {"not_image": 1, "corrupt": 1, "too_large": 1}
    assert "link.png" not in first.stdout + first.stderr  # a symbolic link is not part of the set
    for name in ("cut.png", "notes.txt", "huge.png"):
        assert name in first.stderr
    huge = [line for line in first.stderr.splitlines() if "huge.png" in line]
    assert len(huge) == 1 and "too large" in huge[0] and "Traceback" not in first.stderr
    from PIL import Image
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size[0] > 96 and img.size[1] >= 96

    # the second call (another layer of the same pass, text output) reads the cache: no pass runs
    second = _run(setup / "m.onnx", setup / "images", "r3:0", "--k", "2", "--size", "64", "--layers", "colour_relu",
                  cache=cache)
    assert second.returncode == 0, second.stderr
    assert "index " not in second.stderr and "field 15x15, stride 8" in second.stdout
    assert len(list((cache / "models" / "exemplars").glob("*.npz"))) == 1


def test_unknown_layer_and_bad_unit_are_one_line(setup, tmp_path):
    cache = tmp_path / "cache"
    bad = _run(setup / "m.onnx", setup / "images", "nope:0", "--size", "64", cache=cache)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr
    assert not list(cache.glob("models/exemplars/*.npz"))
    out_of_range = _run(setup / "m.onnx", setup / "images", "r3:9", "--size", "64", cache=cache)
    assert out_of_range.returncode == 1 and "channel 9 is out of range" in out_of_range.stderr
    assert "Traceback" not in bad.stderr + out_of_range.stderr

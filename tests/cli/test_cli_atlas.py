"""``featureviz atlas``: the real command as a subprocess, against a real server on loopback (``--server``) and
with its embedded server; the folder it writes (PNGs named by unit index, atlas.json) and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc_health")

from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402


def _run(*args):
    return subprocess.run([sys.executable, "-m", "featureviz", "atlas", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("atlas-cli") / "tiny.onnx"
    path.write_bytes(export_onnx(TinyNet()))
    return path


def test_an_atlas_through_a_server_writes_every_unit_and_the_manifest(model, tmp_path):
    server = serve_in_background(ServerConfig(tmp_path / "store", max_step_images=4))
    try:
        out = tmp_path / "out"
        done = _run(model, "--server", server.address, "--layers", "/Relu,/Relu_1", "--channels", 2, "--size", 32,
                    "--steps", 8, "--seed", 3, "--out", out)
        assert done.returncode == 0, done.stderr
        manifest = json.loads((out / "atlas.json").read_text())
        assert manifest["state"] == "JOB_STATE_SUCCEEDED" and manifest["options"]["seed"] == 3
        assert manifest["options"]["size"] == [32, 32] and manifest["options"]["steps"] == 8
        assert [(u["layer"], u["channel"]) for u in manifest["units"]] == [
            ("/Relu", 0), ("/Relu", 1), ("/Relu_1", 0), ("/Relu_1", 1)]
        for unit in manifest["units"]:
            assert (out / unit["image"]).read_bytes().startswith(b"\x89PNG") and unit["device_seconds"] > 0
        assert sorted(p.name for p in (out / "units").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
        again = _run(model, "--server", server.address, "--layers", "/Relu", "--channels", 2, "--size", 32,
                     "--steps", 8, "--seed", 3, "--out", out)  # an earlier atlas's folder may be written again
        assert again.returncode == 0, again.stderr
        assert json.loads((out / "atlas.json").read_text())["progress"]["cached"] == 2
    finally:
        server.stop()


def test_the_embedded_server_and_the_refusals(model, tmp_path):
    from support.images import noisy_png

    folder = tmp_path / "set"  # --dataset FOLDER: uploaded to the embedded server and joined to every unit
    folder.mkdir()
    for i in range(3):
        (folder / f"n{i}.png").write_bytes(noisy_png(16, i))
    out = tmp_path / "local"
    done = _run(model, "--layers", "/Relu", "--channels", 1, "--size", 32, "--steps", 4, "--dataset", folder,
                "--negative", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "atlas.json").read_text())
    assert manifest["progress"]["done"] == 1
    assert len(manifest["units"][0]["exemplar_index"]) == 64 and "dataset_max" in manifest["units"][0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused = _run(model, "--channels", 1, "--out", busy)
    assert refused.returncode != 0 and "not empty" in refused.stderr and len(refused.stderr.splitlines()) <= 2
    empty = _run(model, "--op-types", "Softmax", "--size", 32, "--out", tmp_path / "none")
    assert empty.returncode != 0 and "matches no layer" in empty.stderr

"""The thin client install (``pip install featureviz``: grpcio, grpcio-status, protobuf) in a real virtual
environment that has nothing else: the client commands work against a real server, and the commands that need the
server extra end with one line saying what to install, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

# what `pip install featureviz` brings: the base dependencies of pyproject.toml and theirs
BASE = ("grpc", "grpc_status", "google", "typing_extensions.py")
BASE_DISTS = ("grpcio", "grpcio_status", "protobuf", "googleapis_common_protos", "typing_extensions")


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    """A venv with the base install only: the base packages and the featureviz install of this checkout, linked
    from the test's own environment (no network), and no torch, onnx, numpy, PIL or grpc health/reflection."""
    site = Path(sysconfig.get_paths()["purelib"])
    featureviz = [p for p in site.iterdir() if "featureviz" in p.name.lower()]
    if not featureviz:
        pytest.skip("featureviz is not pip-installed in this environment")
    root = tmp_path_factory.mktemp("client-only")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    for path in site.iterdir():
        dist = path.name.split("-")[0].lower() if path.name.endswith(".dist-info") else None
        if path.name in BASE or dist in BASE_DISTS or path in featureviz:
            (target / path.name).symlink_to(path)
    return python


def _run(python, *argv, env=None):
    return subprocess.run([python, "-m", "featureviz", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_the_environment_really_is_client_only(client_python):
    probe = "import importlib.util as u; print([m for m in ('torch', 'onnx', 'numpy', 'PIL', 'grpc_health') " \
            "if u.find_spec(m)]); import featureviz.client"
    done = subprocess.run([client_python, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, needle", [
    (["render", "{model}", "/Relu_1:1", "--steps", "1"], "pip install 'featureviz[server]', or pass --server ADDR"),
    (["inspect", "{model}"], "pip install 'featureviz[server]'"),
    (["serve", "--port", "0"], "pip install 'featureviz[server]'"),
    (["health", "--server", "127.0.0.1:1"], "needs grpcio-health-checking: pip install 'featureviz[server]'"),
])
def test_commands_that_need_the_server_extra_say_what_to_install(client_python, tmp_path, tiny_onnx, argv, needle):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx)
    done = _run(client_python, *[a.format(model=model) for a in argv])
    assert done.returncode == 1, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_client_commands_work_against_a_real_server(client_python, server, tmp_path, tiny_onnx):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx)
    up = _run(client_python, "models", "upload", model, "--server", server.address, "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["state"] == "MODEL_STATE_READY"
    out = tmp_path / "remote.png"
    done = _run(client_python, "render", model, "/Relu_1:1", "--steps", "2", "--size", "24", "--out", out,
                "--json", "--server", server.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == [str(out)] and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sys.executable != str(client_python)

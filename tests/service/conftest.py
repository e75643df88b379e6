"""Fixtures of the service tests: real ONNX exports and a REAL server on 127.0.0.1:0 with a temporary store.

The in-process server runs on its own event loop thread (``serve_in_background``); the restart test starts
``featureviz serve`` as a subprocess instead (``support.serve.ServeProcess``). The network is
``support.models.TinyNet``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from featureviz.client import Client  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402


@pytest.fixture(scope="session")
def tiny_onnx() -> bytes:
    torch.manual_seed(0)
    return export_onnx(TinyNet())


@pytest.fixture(scope="session")
def tiny_onnx_other() -> bytes:
    """Same architecture, other weights: other bytes, other sha256."""
    torch.manual_seed(1)
    net = TinyNet()
    return export_onnx(net)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # every step's progress (the default coalesces them), and the device's default max batch: jobs share steps
    config = ServerConfig(tmp_path_factory.mktemp("store"), heartbeat_seconds=0.5, grace_seconds=2.0,
                          progress_interval=0.0)
    running = serve_in_background(config)
    yield running
    running.stop()


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=60) as fv:
        yield fv


@pytest.fixture(scope="module")
def tiny_model(server, tiny_onnx):
    with Client(server.address) as fv:
        return fv.upload(tiny_onnx, name="tiny.onnx")

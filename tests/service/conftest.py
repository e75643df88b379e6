"""Fixtures of the service tests: real ONNX exports and a REAL server on 127.0.0.1:0 with a temporary store.

The in-process server runs on its own event loop thread (``serve_in_background``); the restart test starts
``featureviz serve`` as a subprocess instead.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from featureviz.client import Client  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402


class TinyNet(torch.nn.Module):
    """conv-relu-conv-relu-pool-linear, 10 classes: small enough that a 32x32 render step takes milliseconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def export_onnx(module: torch.nn.Module, size: int = 32, **kwargs) -> bytes:
    torch.manual_seed(0)
    module.eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, torch.rand(1, 3, size, size), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}}, opset_version=17,
                      dynamo=False, **kwargs)
    return buffer.getvalue()


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

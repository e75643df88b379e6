"""A cached model starts fast: a cache hit, and a render of it, import torch and featureviz only.

The converted graph is cached with portable leaf modules (featureviz.importer.portable), so unpickling it needs
neither onnx2torch (which imports torchvision and onnx) nor onnxruntime. The check looks at ``sys.modules`` in a
fresh interpreter, never at a clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from featureviz.importer.portable import Clip
from featureviz.importer.portable import foreign_modules
from featureviz.importer.portable import make_portable

HEAVY = ("onnx2torch", "onnxruntime", "onnx", "torchvision")

_CHILD = r"""
import json, sys
from featureviz.importer import import_model
model = import_model(sys.argv[1], cache_dir=sys.argv[2])
after_import = sorted({k.split(".")[0] for k in sys.modules} & set(sys.argv[3].split(",")))
from featureviz.engine import RenderSpec, render
result = render(model, RenderSpec({"logit": {"index": 1}}, steps=1, size=32, device="cpu"))
after_render = sorted({k.split(".")[0] for k in sys.modules} & set(sys.argv[3].split(",")))
print(json.dumps({"cache": model.timings, "after_import": after_import, "after_render": after_render,
                  "dynamo": "torch._dynamo" in sys.modules, "steps": result.steps_done}))
"""


@pytest.fixture(scope="module")
def cached_lite0(tmp_path_factory):
    """The real EfficientNet-Lite0 (dynamic size), imported once into a fresh cache folder."""
    from featureviz import zoo
    from featureviz.importer import import_model

    cache = tmp_path_factory.mktemp("startup-cache")
    path = zoo.efficientnet_lite0(dynamic_size=True)
    model = import_model(path, cache_dir=cache)
    return path, cache, model


def test_the_cached_model_holds_only_portable_modules(cached_lite0):
    _, _, model = cached_lite0
    assert foreign_modules(model.module) == []


def test_a_cache_hit_and_a_render_import_neither_onnx2torch_nor_onnxruntime(cached_lite0):
    path, cache, _ = cached_lite0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(cache), ",".join(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "cache" in report["cache"], report  # it was a hit
    assert report["after_import"] == [], report
    assert report["after_render"] == [], report
    assert not report["dynamo"], report  # the engine's Adam is not torch.optim's (whose constructor imports it)
    assert report["steps"] == 1


def test_make_portable_replaces_foreign_leaves_and_keeps_the_output():
    onnx2torch = pytest.importorskip("onnx2torch")
    from onnx2torch.node_converters.clip import OnnxClip
    from onnx2torch.node_converters.gather import OnnxGather
    from onnx2torch.node_converters.reshape import OnnxReshape

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.clip = OnnxClip(-0.25, 0.5)
            self.gather = OnnxGather(axis=1)
            self.reshape = OnnxReshape()

        def forward(self, x):
            y = self.clip(self.conv(x))
            y = self.gather(y, torch.tensor([2, 0]))
            return self.reshape(y, torch.tensor([0, -1]))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(2, 3, 9, 9)
    want, other = net(x), net(torch.ones(1, 3, 9, 9))
    assert len(foreign_modules(net)) == 3
    assert make_portable(net, x) == []
    assert foreign_modules(net) == []
    assert isinstance(net.clip, Clip) and (net.clip.min_val, net.clip.max_val) == (-0.25, 0.5)
    assert torch.equal(net(x), want)
    assert torch.equal(net(torch.ones(1, 3, 9, 9)), other)  # another batch size: nothing was baked in
    del onnx2torch


def test_make_portable_keeps_a_module_it_cannot_trace():
    class Branchy(nn.Module):  # control flow on a value: fx cannot trace it
        def forward(self, x):
            return x * 2 if float(x.sum()) > 0 else x

    Branchy.__module__ = "someone_else.ops"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.op = Branchy()

        def forward(self, x):
            return self.op(x)

    net = Net()
    x = torch.ones(1, 2)
    kept = make_portable(net, x)
    assert kept == ["someone_else.ops.test_make_portable_keeps_a_module_it_cannot_trace.<locals>.Branchy"]
    assert isinstance(net.op, Branchy)
    assert torch.equal(net(x), x * 2)

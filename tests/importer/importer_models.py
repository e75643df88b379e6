"""Test models of the importer tests: real ONNX files exported with torch.onnx, and the ONNX zoo layouts.

The fixtures (conftest.py) export each once per session (``tmp_path_factory``); torchvision models use
``weights=None`` (random weights are enough to compare a conversion with onnxruntime) and small inputs. The nine "light" zoo models
that ship inside the onnx package compute their weights with ``ConstantOfShape`` (all 0.02), which makes
every output uniform and any comparison trivially exact; :func:`randomized_light_model` replaces those
weights with seeded random ones so that the check means something.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx import shape_inference
from torch import nn

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.name for p in LIGHT_DIR.glob("light_*.onnx"))


def randomized_light_model(path: Path, seed: int = 0) -> bytes:
    """The zoo layout with its ConstantOfShape weights replaced by seeded random initializers."""
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in consts:
            shape = tuple(int(v) for v in consts[node.input[0]])
            if len(shape) >= 2:
                fan_in = int(np.prod(shape[1:]))
                values = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
            else:  # biases and batch-norm scale/shift/mean/variance: positive keeps the variance valid
                values = rng.uniform(0.5, 1.5, size=shape)
            model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.ir_version = max(model.ir_version, 4)  # IR 3 wants every initializer listed as an input too
    # random weights saturate the Softmax (exact 0/1 on both sides): expose the logits so they are compared too
    softmax = [node for node in model.graph.node if node.op_type == "Softmax"]
    if softmax:
        inferred = shape_inference.infer_shapes(model)
        logits = next(v for v in inferred.graph.value_info if v.name == softmax[-1].input[0])
        model.graph.output.append(logits)
    return model.SerializeToString()


class NHWCNet(nn.Module):
    """A Keras-style model: takes NHWC, transposes to NCHW first."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
        )

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2))


class GrayNet(nn.Module):
    """A 1-channel MNIST-style CNN with its normalization inside the graph and a Softmax head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3), nn.Sigmoid(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        x = (x - 0.1307) / 0.3081
        x = self.features(x)
        return torch.softmax(self.fc(x.reshape(x.shape[0], -1)), dim=1)


def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: outputs would be 0
    return model


@dataclass(frozen=True)
class Export:
    """How one test model is built and exported."""

    key: str
    build: str  # torchvision name or one of the local builders
    size: int = 64
    channels: int = 3
    opset: int | None = None
    dynamo: bool = False
    dynamic_batch: bool = False
    dynamic_hw: bool = False
    nhwc: bool = False


EXPORTS = [
    Export("resnet18_legacy_op11", "resnet18", opset=11),
    Export("mobilenet_v3_small_legacy_op13_dynbatch", "mobilenet_v3_small", opset=13, dynamic_batch=True),
    Export("shufflenet_v2_legacy_op14", "shufflenet_v2_x0_5", opset=14),
    Export("googlenet_legacy_op12", "googlenet", opset=12),
    Export("efficientnet_b0_legacy_op17", "efficientnet_b0", opset=17),
    Export("squeezenet_dynamo_op18", "squeezenet1_1", opset=18, dynamo=True),
    Export("resnet18_dynamo_dynamic", "resnet18", dynamo=True, dynamic_batch=True, dynamic_hw=True),
    Export("nhwc_legacy_op16", "nhwc", size=32, opset=16, nhwc=True),
    Export("gray_legacy_op15_dynhw", "gray", size=28, channels=1, opset=15, dynamic_hw=False),
    Export("vit_legacy_op17", "vit", size=32, opset=17),
    Export("vit_dynamo_op18", "vit", size=32, opset=18, dynamo=True),
]


def build_model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    if name == "nhwc":
        return NHWCNet()
    if name == "gray":
        return GrayNet()
    if name == "vit":
        return tiny_vit()
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def export(spec: Export, path: Path) -> Path:
    model = build_model(spec.build).eval()
    shape = (1, spec.size, spec.size, spec.channels) if spec.nhwc else (1, spec.channels, spec.size, spec.size)
    x = torch.rand(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.dynamo:
            dynamic_shapes = None
            if spec.dynamic_batch or spec.dynamic_hw:
                dim = torch.export.Dim
                axes = {}
                if spec.dynamic_batch:
                    axes[0] = dim("batch", min=1, max=64)
                if spec.dynamic_hw:
                    axes[2] = dim("height", min=32, max=512)
                    axes[3] = dim("width", min=32, max=512)
                dynamic_shapes = {"x": axes}
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, opset_version=spec.opset,
                              input_names=["image"], dynamic_shapes=dynamic_shapes, verbose=False)
        else:
            axes = {}
            if spec.dynamic_batch:
                axes[0] = "batch"
            if spec.dynamic_hw:
                axes.update({2: "height", 3: "width"})
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=spec.opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes} if axes else None)
    return path




def tiny_conv_model(channels: int = 3, *, extra_node: onnx.NodeProto | None = None, opset: int = 13,
                    extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """A one-Conv ONNX model built by hand (input "x" [1, channels, 8, 8]), optionally with one more node."""
    from onnx import TensorProto
    from onnx import helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, channels, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    out = "y"
    if extra_node is not None:
        nodes.append(extra_node)
        out = extra_node.output[0]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[weight],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_model(graph, opset_imports=opsets)

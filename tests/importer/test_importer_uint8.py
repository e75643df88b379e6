"""uint8 image inputs (issue 8, item 14): TF/TFLite-style exports that take uint8 NHWC images and Cast them to float
at the front import, match onnxruntime fed the same uint8 values, and render through the graph's own Cast."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from featureviz.engine import RenderSpec
from featureviz.engine import render
from featureviz.errors import ModelImportError
from featureviz.importer import import_model


class Uint8Net(nn.Module):
    """Takes uint8 NHWC pixels 0..255 as a TF export does: Cast to float, scale, transpose to NCHW, convolve."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = x.float() * (2 / 255) - 1
        return self.body(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def uint8_export(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("uint8") / "uint8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Uint8Net().eval(), (torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8),), str(path),
                          dynamo=False, opset_version=13, input_names=["pixels"], output_names=["logits"])
    data = path.read_bytes()
    model = onnx.load_from_string(data)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.node[0].op_type == "Cast"  # what makes this "such an export"
    return data


def test_uint8_input_imports_and_matches_onnxruntime(uint8_export):
    model = import_model(uint8_export, use_cache=False)
    spec = model.input_spec
    assert spec.dtype == "uint8" and spec.layout == "NHWC" and spec.channels == 3
    assert spec.preprocess.std == pytest.approx((1 / 255,) * 3) and spec.preprocess.mean == (0.0, 0.0, 0.0)
    assert model.check.verified and model.check.passed and model.check.max_rel_err < 1e-5

    # batch 3 of whole pixel values: the module (NCHW float 0..255) against onnxruntime fed uint8 NHWC
    pixels = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.module(pixels.float()).numpy()
    session = ort.InferenceSession(uint8_export, providers=["CPUExecutionProvider"])
    feed = pixels.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    want = np.concatenate([session.run(None, {"pixels": feed[i: i + 1]})[0] for i in range(3)])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_uint8_model_renders_through_its_cast(uint8_export):
    model = import_model(uint8_export, use_cache=False)
    conv = next(layer for layer in model.layers if layer.op_type == "Conv")
    x = torch.full((1, 3, 32, 32), 128.0, requires_grad=True)  # gradients reach the input through the Cast
    model.truncate([conv.name])(x)[conv.name][:, 0].mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    result = render(model, RenderSpec(objective={"channel": {"layer": conv.name, "channel": 1}}, steps=2, batch=2,
                                      seed=0))
    assert result.images.shape == (2, 3, 32, 32) and result.steps_done == 2
    assert torch.isfinite(torch.tensor(result.objective_end)).all()


def test_uint8_input_used_other_than_by_a_cast_is_refused():
    from onnx import TensorProto
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="passthrough")], "u8",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 8, 8])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    with pytest.raises(ModelImportError) as info:
        import_model(data, use_cache=False)
    assert info.value.reason == "UNSUPPORTED_INPUT" and "UINT8" in str(info.value) and "Cast" in str(info.value)

"""Models exported here with torch.onnx (legacy and dynamo, opsets 11-18) import, match onnxruntime, run batch 4."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from featureviz.importer import import_model

from importer_models import EXPORTS

# the quick ones run in every pass; the bigger torchvision nets are marked slow
_FAST = {"resnet18_legacy_op11", "nhwc_legacy_op16", "gray_legacy_op15_dynhw", "vit_legacy_op17",
         "shufflenet_v2_legacy_op14"}


def _params():
    for spec in EXPORTS:
        marks = () if spec.key in _FAST else (pytest.mark.slow,)
        yield pytest.param(spec, id=spec.key, marks=marks)


def _ort_per_image(path, spec, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = x.transpose(0, 2, 3, 1) if spec.nhwc else x
    return np.concatenate([session.run(None, {name: feed[i : i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("spec", list(_params()))
def test_export_imports_matches_and_runs_batch_4(spec, exported, cache_dir):
    path = exported(spec.key)
    model = import_model(path, cache_dir=cache_dir)

    assert model.check.verified and model.check.passed
    assert model.check.max_rel_err < 1e-4
    assert model.input_spec.layout == ("NHWC" if spec.nhwc else "NCHW")
    assert model.input_spec.channels == spec.channels
    expected_size = (224, 224) if spec.dynamic_hw else (spec.size, spec.size)
    assert model.input_spec.default_size == expected_size
    assert model.input_spec.batch == (None if spec.dynamic_batch else 1)
    assert model.logits is not None and model.layer(model.logits).is_logits

    # batch 4 through the imported module (always NCHW) against onnxruntime image by image
    h, w = model.input_spec.default_size
    x = torch.rand(4, spec.channels, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.module(x)
    want = _ort_per_image(path, spec, x.numpy())
    assert got.shape == want.shape
    err = np.abs(got.numpy() - want).max() / np.abs(want).max()
    assert err < 1e-4, f"batch 4 differs from onnxruntime by {err:.3g}"

    # the module is frozen and eval, and differentiable with respect to its input
    assert not any(p.requires_grad for p in model.module.parameters())
    assert not model.module.training
    x.requires_grad_(True)
    model.module(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.slow
def test_dynamic_spatial_model_runs_other_sizes(exported, cache_dir):
    model = import_model(exported("resnet18_dynamo_dynamic"), cache_dir=cache_dir)
    assert (model.input_spec.height, model.input_spec.width) == (None, None)
    with torch.no_grad():
        out = model.module(torch.rand(2, 3, 96, 128))
    assert out.shape == (2, 1000)


def test_softmax_head_names_logits_before_it(exported, cache_dir):
    model = import_model(exported("gray_legacy_op15_dynhw"), cache_dir=cache_dir)
    logits = model.layer(model.logits)
    assert logits.op_type == "Gemm" and logits.shape == (1, 10)
    softmax = [layer for layer in model.layers if layer.op_type == "Softmax"]
    assert softmax and not softmax[0].is_logits
    assert logits.pre_activation_of == softmax[0].name

"""Graph clean-up pieces: the batch placement of Reshape targets, our converters, opset handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from importer_models import tiny_conv_model
from onnx import helper
from onnx import numpy_helper

from featureviz.importer import import_model
from featureviz.importer.clean import _reshape_target


@pytest.mark.parametrize(
    ("in_shape", "where", "target", "want", "want_where"),
    [
        # flatten before the classifier: [1, 1280] -> [-1, 1280]
        ([1, 1280, 1, 1], (0, 1), [1, 1280], [-1, 1280], (0, 1)),
        # ViT patch embedding: [1, 32, 4, 4] -> [1, 32, 16]
        ([1, 32, 4, 4], (0, 1), [1, 32, 16], [-1, 32, 16], (0, 1)),
        # attention, sequence first: q [17, 1, 32] -> [17, 1 * heads, 16]: the batch leads the heads axis
        ([17, 1, 32], (1, 1), [17, 2, 16], [17, -1, 16], (1, 2)),
        # attention output: [17, B * heads, 16] -> [17 * B, 32]: the last axis keeps the features
        ([17, 2, 16], (1, 2), [17, 32], [-1, 32], (0, 1)),
        # back to [17, B, 32]
        ([17, 32], (0, 1), [17, 1, 32], [17, -1, 32], (1, 1)),
        # heads merged into the batch axis: [1, 12, 197, 64] -> [12, 197, 64]
        ([1, 12, 197, 64], (0, 1), [12, 197, 64], [-1, 197, 64], (0, 12)),
        # channel shuffle with 0 (copy) and -1 (infer) in the target
        ([1, 116, 8, 8], (0, 1), [0, 2, 58, -1, 8], [-1, 2, 58, 8, 8], (0, 1)),
    ],
)
def test_reshape_target_places_the_batch(in_shape, where, target, want, want_where):
    got, got_where = _reshape_target(in_shape, where, np.array(target))
    assert got.tolist() == want and got_where == want_where


def test_reshape_target_gives_up_on_unknown_sizes():
    assert _reshape_target([1, None, 4], (0, 1), np.array([1, -1])) is None


def test_asymmetric_average_pool_matches_onnxruntime():
    # Inception v1 from the ONNX zoo pools with pads (0, 0, 1, 1); onnx2torch refuses that
    for count_include_pad in (0, 1):
        node = helper.make_node("AveragePool", ["y"], ["z"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                                pads=[0, 0, 1, 1], count_include_pad=count_include_pad)
        model = import_model(tiny_conv_model(extra_node=node).SerializeToString(), use_cache=False)
        assert model.check.max_rel_err < 1e-5
        assert model.layer("pool").shape == (1, 4, 4, 4)


def test_old_opset_is_upgraded_and_dropout_dropped():
    dropout = helper.make_node("Dropout", ["y"], ["z", "mask"], name="drop", ratio=0.5)
    model = tiny_conv_model(extra_node=dropout, opset=9)
    imported = import_model(model.SerializeToString(), use_cache=False)
    assert imported.check.passed
    assert "Dropout" not in {layer.op_type for layer in imported.layers}


def test_batch_specific_graph_falls_back_to_per_image():
    # x[0:1] on the batch axis: a fixed-batch graph no constant rewrite can free
    node = helper.make_node("Slice", ["y", "starts", "ends", "axes"], ["z"], name="first_image")
    model = tiny_conv_model(extra_node=node)
    for name, value in (("starts", 0), ("ends", 1), ("axes", 0)):
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    imported = import_model(model.SerializeToString(), use_cache=False)
    assert imported.check.batch_mode == "per-image" and imported.check.passed
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        out = imported.module(x)
        acts = imported.truncate(["conv"])(x)["conv"]
    assert out.shape == (3, 4, 8, 8) and acts.shape == (3, 4, 8, 8)
    torch.testing.assert_close(out, acts)

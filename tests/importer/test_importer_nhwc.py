"""Channels-last rank 4 activations inside a model (issue 10): Swin works in (N, H, W, C) throughout, ConvNeXt's
blocks permute to it around their LayerNorm. The catalog must read their channels from axis 3, and channel and
neuron objectives must select channels and places on the right axes (before, "channels" was the height).

Swin-Tiny's architecture (timm, random weights, 64 px, window 2) is exported with torch.onnx here; the objectives'
values are checked against the activations read directly from the converted graph.
"""

from __future__ import annotations

import pytest
import torch

from featureviz.engine import RenderSpec
from featureviz.engine import objectives as objs
from featureviz.engine import render
from featureviz.engine import validate
from featureviz.errors import InvalidSpec
from featureviz.importer import import_model
from featureviz.importer.catalog import record_outputs
from featureviz.importer.catalog import spatial_layout


@pytest.mark.parametrize("shape,size,layout", [
    ((1, 96, 56, 56), (224, 224), "NCHW"),
    ((1, 56, 56, 96), (224, 224), "NHWC"),
    ((1, 1, 1, 320), (64, 64), "NHWC"),        # ConvNeXt's head norm after global pooling
    ((1, 56, 56, 56), (224, 224), "NCHW"),     # both read as grids: NCHW, as before
    ((1, 56, 56, 1), (224, 224), "NCHW"),      # one channel last: a pooled map, not NHWC
    ((1, 64, 7, 10), (224, 320), "NCHW"),      # a non-square input
    ((1, 7, 10, 64), (224, 320), "NHWC"),
    ((1, 8, 11, 64), (225, 321), "NHWC"),      # odd sizes rounded up at each stride
    ((1, 3, 4, 32), (64, 64), "NCHW"),         # 3 x 4 is no grid of a square input
])
def test_spatial_layout_reads_the_axes_from_the_shape(shape, size, layout):
    assert spatial_layout(shape, size) == layout


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    pytest.importorskip("timm", reason="the Swin export needs the test extra: make setup")
    from timm_models import BY_NAME
    from timm_models import export_timm

    path = export_timm(BY_NAME["swin_tiny_patch4_window7_224"], tmp_path_factory.mktemp("swin") / "swin.onnx",
                       dynamo=False, dynamic_batch=True)
    return import_model(path, cache_dir=tmp_path_factory.mktemp("cache"))


def _stage_output(swin):
    """The first block's output of stage 1 ((1, 16, 16, 96) channels last at 64 px)."""
    layers = [layer for layer in swin.layers if layer.layout == "NHWC" and layer.op_type == "Add"]
    assert layers, "no channels-last layer in Swin's catalog"
    return layers[0]


def test_catalog_reads_channels_last_layers(swin):
    layer = _stage_output(swin)
    assert layer.shape == (1, 16, 16, 96) and layer.channels == 96 and layer.channel_axis == 3
    assert layer.spatial and layer.spatial_size == (16, 16) and layer.to_dict()["layout"] == "NHWC"
    assert all(layer.shape[0] == 1 for layer in swin.layers), "a tensor whose axis 0 is not the batch is listed"
    assert sum(layer.layout == "NHWC" for layer in swin.layers) > 20


def test_channels_last_objectives_read_the_channel_axis(swin):
    layer = _stage_output(swin)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    raw = record_outputs(swin.graph_module, x)[layer.target.node]  # (2, 16, 16, 96) as the model computes it
    assert raw.shape == (2, 16, 16, 96)
    z = swin.truncate([layer.name])(x)[layer.name]
    assert z.shape == (2, 96, 16, 16) and torch.equal(z, raw.permute(0, 3, 1, 2))
    acts = objs.Activations({layer.name: z}, x)
    c = 70  # a channel index beyond the height: it used to fail validation, or select rows
    assert torch.allclose(objs.Channel(layer.name, c)(acts), raw[..., c].mean((1, 2)))
    assert torch.allclose(objs.Neuron(layer.name, c, x=3, y=11)(acts), raw[:, 11, 3, c])
    validate(swin, RenderSpec(objective={"channel": {"layer": layer.name, "channel": 95}}, steps=1))
    with pytest.raises(InvalidSpec, match="96 channels"):
        validate(swin, RenderSpec(objective={"channel": {"layer": layer.name, "channel": 96}}, steps=1))
    with pytest.raises(InvalidSpec, match="16 wide and 16 high"):
        validate(swin, RenderSpec(objective={"neuron": {"layer": layer.name, "channel": 0, "x": 16, "y": 0}},
                                  steps=1))


@pytest.mark.parametrize("objective", ["channel", "neuron"])
def test_channels_last_visualizations_render(swin, objective):
    layer = _stage_output(swin)
    body = {"layer": layer.name, "channel": 70, **({"x": 8, "y": 8} if objective == "neuron" else {})}
    result = render(swin, RenderSpec(objective={objective: body}, steps=2, batch=2, seed=0))
    assert result.images.shape == (2, 3, 64, 64) and result.steps_done == 2
    assert torch.isfinite(torch.tensor(result.objective_end)).all() and result.images.std() > 0

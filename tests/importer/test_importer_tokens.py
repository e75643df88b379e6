"""Transformer token tensors (N, tokens, C) as first-class targets (issue 10, item 3).

The tiny torchvision ViT (32x32, patch 8: a CLS token then a 4x4 grid of patch tokens, width 32) is imported from
its ONNX export; the objectives' values are checked against the activations read directly, and class, CLS-token,
patch and channel visualizations render 2 steps at batch 2.
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
from featureviz.spec import format_objective
from featureviz.spec import parse_objective


@pytest.fixture(scope="module")
def vit(exported, cache_dir):
    return import_model(exported("vit_legacy_op17"), cache_dir=cache_dir)


def _block_output(vit):
    tokens = [layer for layer in vit.layers if layer.grid is not None and layer.channels == 32]
    assert tokens, "no token tensor in the catalog"
    return tokens[len(tokens) // 2]


def test_catalog_marks_the_cls_token_and_the_patch_grid(vit):
    layer = _block_output(vit)
    assert layer.shape == (1, 17, 32) and layer.channel_axis == 2
    assert layer.prefix_tokens == 1 and layer.grid == (4, 4)
    assert layer.to_dict()["prefix_tokens"] == 1 and layer.to_dict()["grid"] == [4, 4]


def test_token_objectives_read_the_right_tokens(vit):
    layer = _block_output(vit)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = vit.truncate([layer.name])(x)[layer.name]  # (2, 17, 32)
    acts = objs.Activations({layer.name: z}, x, prefixes={layer.name: layer.prefix_tokens})
    c = 5
    cases = {
        "cls token": (objs.Neuron(layer.name, c, x=0), z[:, 0, c]),
        "token 7": (objs.Neuron(layer.name, c, x=7), z[:, 7, c]),
        "patch column 3, row 1": (objs.Neuron(layer.name, c, x=3, y=1), z[:, 1 + 1 * 4 + 3, c]),
        "centre patch": (objs.Neuron(layer.name, c), z[:, 1 + 2 * 4 + 2, c]),
        "mean over patch tokens": (objs.Channel(layer.name, c), z[:, 1:, c].mean(1)),
    }
    for what, (objective, want) in cases.items():
        assert torch.allclose(objective(acts), want), what
    vector = torch.arange(32, dtype=torch.float32) / 32
    direction = objs.Direction(layer.name, vector.tolist())(acts)
    assert torch.allclose(direction, (z[:, 1:] @ vector).mean(1), atol=1e-5)


def test_token_places_are_validated(vit):
    layer = _block_output(vit)
    validate(vit, RenderSpec(objective={"neuron": {"layer": layer.name, "channel": 0, "x": 16}}, steps=1))
    with pytest.raises(InvalidSpec, match="token 17 is outside"):
        validate(vit, RenderSpec(objective={"neuron": {"layer": layer.name, "channel": 0, "x": 17}}, steps=1))
    with pytest.raises(InvalidSpec, match="outside the patch grid"):
        validate(vit, RenderSpec(objective={"neuron": {"layer": layer.name, "channel": 0, "x": 4, "y": 0}}, steps=1))


def test_token_neuron_text_syntax():
    assert parse_objective("blocks/ln:5@0") == {"neuron": {"layer": "blocks/ln", "channel": 5, "x": 0, "y": None}}
    assert format_objective(parse_objective("blocks/ln:5@3")) == "blocks/ln:5@3"
    assert parse_objective("blocks/ln:5@3,1")["neuron"]["y"] == 1


@pytest.mark.parametrize("objective", [
    "logit:3",            # a class visualization of a ViT
    "{L}:5@0",            # the CLS token
    "{L}:5@1,2",          # a patch token
    "{L}:5",              # the mean over patch tokens
])
def test_vit_visualizations_render(vit, objective):
    layer = _block_output(vit)
    spec = parse_objective(objective.replace("{L}", f"'{layer.name}'"))
    result = render(vit, RenderSpec(objective=spec, steps=2, batch=2, seed=0))
    assert result.images.shape == (2, 3, 32, 32) and result.steps_done == 2
    assert torch.isfinite(torch.tensor(result.objective_end)).all()
    assert result.images.std() > 0

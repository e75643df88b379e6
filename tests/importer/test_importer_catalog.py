"""The layer catalog (names, aliases, pre-activations, logits), truncation and the cache."""

from __future__ import annotations

import time

import pytest
import torch

from featureviz.errors import NotFound
from featureviz.importer import Preprocess
from featureviz.importer import import_model
from featureviz.importer.catalog import record_outputs


@pytest.fixture(scope="module")
def resnet(exported, cache_dir):
    return import_model(exported("resnet18_legacy_op11"), cache_dir=cache_dir)


def test_catalog_names_and_aliases_resolve(resnet):
    layers = resnet.layers
    assert [layer.depth for layer in layers] == list(range(len(layers)))
    assert len({layer.name for layer in layers}) == len(layers)
    conv = resnet.layer("/layer1/layer1.0/conv1/Conv")
    assert conv.op_type == "Conv" and conv.shape == (1, 64, 16, 16) and conv.channels == 64 and conv.spatial
    # the output tensor name and the torch module name resolve to the same entry
    assert resnet.layer("/layer1/layer1.0/conv1/Conv_output_0") is conv
    assert resnet.layer("layer1/layer1/0/conv1/Conv") is conv
    fc = resnet.layer(resnet.logits)
    assert fc.op_type == "Gemm" and fc.shape == (1, 1000) and not fc.spatial and fc.is_logits
    assert sum(layer.is_logits for layer in layers) == 1


def test_pre_activation_tensors_are_targets(resnet):
    relu = resnet.layer("/layer1/layer1.0/relu/Relu")
    pre = resnet.layer("/layer1/layer1.0/relu/Relu:pre")
    assert pre.op_type == "BatchNormalization" or pre.op_type == "Conv"  # BN is folded into the conv
    assert pre.pre_activation_of == "/layer1/layer1.0/relu/Relu"
    assert pre.depth < relu.depth and pre.shape == relu.shape
    x = torch.randn(1, 3, 64, 64)
    acts = resnet.truncate([pre.name, relu.name])(x)
    assert (acts[pre.name] < 0).any()  # before the ReLU, negative values exist
    assert torch.equal(acts[relu.name], acts[pre.name].clamp_min(0))


def test_unknown_layer_lists_close_matches(resnet):
    with pytest.raises(NotFound) as info:
        resnet.layer("/layer1/layer1.0/conv1/Con")
    assert "/layer1/layer1.0/conv1/Conv" in str(info.value)


def test_truncation_returns_the_same_activations_as_the_full_model(resnet):
    early, middle, late = resnet.layers[3], resnet.layers[len(resnet.layers) // 2], resnet.layers[-2]
    names = [early.name, middle.aliases[0], late.name]  # a tensor-name alias works as a key too
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    full = record_outputs(resnet.module, x)
    acts = resnet.truncate(names)(x)
    assert list(acts) == names
    for name in names:
        torch.testing.assert_close(acts[name], full[resnet.layer(name).target.node], rtol=0, atol=0)
    # the early cut computes a fraction of the graph
    early_only = resnet.truncate([early.name])
    assert len(early_only.graph.nodes) < len(resnet.module.graph.nodes) // 4
    assert not any(p.requires_grad for p in early_only.parameters())


def test_truncation_of_a_vit_block_and_gradients(exported, cache_dir):
    vit = import_model(exported("vit_legacy_op17"), cache_dir=cache_dir)
    tokens = [layer for layer in vit.layers if len(layer.shape) == 3 and layer.shape[1] == 17]  # 16 patches + cls
    assert len(tokens) > 5 and all(layer.channel_axis == 2 and not layer.spatial for layer in tokens)
    target = tokens[len(tokens) // 2]
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    act = vit.truncate([target.name])(x)[target.name]
    assert act.shape == (4, *target.shape[1:])
    act[:, 0, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    full = record_outputs(vit.module, x.detach())
    torch.testing.assert_close(act.detach(), full[target.target.node])


def test_cache_makes_the_second_import_fast(exported, tmp_path):
    path = exported("shufflenet_v2_legacy_op14")
    start = time.perf_counter()
    first = import_model(path, cache_dir=tmp_path)
    first_s = time.perf_counter() - start
    second = import_model(path, cache_dir=tmp_path)
    assert "cache" in second.timings and "convert" in first.timings
    assert list(tmp_path.glob(f"{first.sha256}.pt"))
    assert [layer.name for layer in second.layers] == [layer.name for layer in first.layers]
    assert second.check == first.check and second.input_spec == first.input_spec
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(second.module(x), first.module(x))
    print(f"shufflenet import {first_s:.2f} s, from cache {second.timings['cache']:.3f} s")


def test_preprocess_is_set_by_the_user(exported, cache_dir):
    pre = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order="BGR")
    model = import_model(exported("resnet18_legacy_op11"), cache_dir=cache_dir, preprocess=pre)
    assert model.input_spec.preprocess == pre
    default = import_model(exported("resnet18_legacy_op11"), cache_dir=cache_dir)
    assert default.input_spec.preprocess == Preprocess()  # identity unless set; the cache keeps no user setting

"""Truncation: a module that computes only what the requested layers need.

The converted model is a ``torch.fx.GraphModule``; the truncated module is a new graph holding the ancestors
of the target nodes only, in the original order, whose output is ``{catalog name: tensor}``. A channels-last
target (``LayerInfo.layout == "NHWC"``) comes out permuted to NCHW (a view), so that every spatial activation the
engine sees has its channels on axis 1. For an early
layer that skips most of the network in both the forward and the backward pass (bench/bench_truncation.py).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch import nn

from featureviz.importer.catalog import LayerInfo

__all__ = ["truncate_graph", "freeze", "PerImage"]


class PerImage(nn.Module):
    """Runs a graph image by image and concatenates the results along the batch axis.

    The fallback for a fixed-batch export whose batch-specific constants the rewrite could not free
    (``CheckReport.batch_mode == "per-image"``): always correct, slower on a GPU.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        outs = [self.inner(x[i : i + 1]) for i in range(x.shape[0])]
        first = outs[0]
        if isinstance(first, dict):
            return {key: torch.cat([out[key] for out in outs]) for key in first}
        if isinstance(first, (tuple, list)):
            return type(first)(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def truncate_graph(gm: fx.GraphModule, targets: dict[str, LayerInfo]) -> fx.GraphModule:
    """A GraphModule computing ``{key: activation of layer}`` for ``targets`` (key -> catalog entry)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    wanted = {by_name[layer.target.node] for layer in targets.values()}
    needed: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    outputs = {}
    for key, layer in targets.items():
        value = env[by_name[layer.target.node]]
        if layer.target.index is not None:
            value = graph.call_function(operator.getitem, (value, layer.target.index))
        if layer.layout == "NHWC":
            value = graph.call_method("permute", (value, 0, 3, 1, 2))
        outputs[key] = value
    graph.output(outputs)
    graph.lint()
    return freeze(fx.GraphModule(gm, graph, class_name="Truncated"))

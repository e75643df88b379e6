"""A generator (issue 25): an uploaded ONNX graph whose input is a latent vector and whose output is an image.

The engine's ``generator`` parameterization optimizes the latent (Nguyen et al. 2016; lucent's ``upconvGAN``). What
it needs is read from the graph here, when the upload is imported (:func:`read_generator`, from
``featureviz.importer.model.assemble``), and refused with one line when it cannot be used:

- the latent: the input (N, Z) or (N, Z, 1, 1) (``featureviz.importer.inputs``), Z fixed;
- the output: one tensor (N, C, H, W) with C 1 or 3 (UNSUPPORTED_GENERATOR otherwise);
- the output's range, from the op that ends the graph: Tanh -> [-1, 1], Sigmoid -> [0, 1], Clip -> its constant
  bounds; anything else is refused (UNSUPPORTED_GENERATOR): an unbounded output has no range to map to [0, 1];
- gradients: the latent's gradient must flow to the output. onnx2torch converts these ops to torch functions whose
  gradient is zero or absent (:data:`NON_DIFFERENTIABLE`): on the path from the latent to the output they block the
  optimization, and the node and its op are named (NOT_DIFFERENTIABLE). A gradient check behind it (the output's
  gradient reaches the latent, non-zero) catches what the list misses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featureviz.errors import ModelImportError
from featureviz.errors import echo

__all__ = ["GeneratorInfo", "read_generator", "NON_DIFFERENTIABLE", "RANGES"]

# ops whose onnx2torch conversion has a zero or no gradient (torch.round/floor/ceil/sign: zero almost everywhere;
# argmax/argmin/topk indices/nonzero/NMS/one-hot/hardmax: integer or piecewise-constant outputs; the comparisons and
# logic: booleans; QuantizeLinear: a rounding; the random ops: no gradient to their input)
NON_DIFFERENTIABLE = frozenset({
    "ArgMax", "ArgMin", "Round", "Floor", "Ceil", "Sign", "NonMaxSuppression", "NonZero", "TopK", "OneHot", "Hardmax",
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf",
    "QuantizeLinear", "Mod", "BitShift", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
# the last op -> the output's range
RANGES = {"Tanh": (-1.0, 1.0), "Sigmoid": (0.0, 1.0)}


@dataclass(frozen=True)
class GeneratorInfo:
    """What the engine needs of a generator: the latent's length, the output image's channels and size, and the range
    its values lie in (mapped to [0, 1] by ``(x - low) / (high - low)``)."""

    latent: int
    channels: int
    height: int
    width: int
    low: float
    high: float
    last_op: str

    def to_dict(self) -> dict:
        return {"latent": self.latent, "channels": self.channels, "height": self.height, "width": self.width,
                "low": self.low, "high": self.high, "last_op": self.last_op}


def _refuse(message: str, reason: str = "UNSUPPORTED_GENERATOR"):
    raise ModelImportError(message, reason=reason)


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output if out}


def _on_path(graph, start: str, end: str) -> list:
    """The nodes (in graph order) that read ``start`` (transitively) and that ``end`` depends on."""
    producers = _producers(graph)
    upstream, todo = set(), [end]
    while todo:  # the nodes the output depends on
        node = producers.get(todo.pop())
        if node is None or id(node) in upstream:
            continue
        upstream.add(id(node))
        todo.extend(node.input)
    reached, found = {start}, []
    for node in graph.node:  # topological order: the nodes that read the latent
        if any(name in reached for name in node.input):
            reached.update(node.output)
            if id(node) in upstream:
                found.append(node)
    return found


def _constant(graph, name: str):
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            return float(value.reshape(-1)[0]) if value.size == 1 else None
    return None


def _range(graph, last) -> tuple[float, float]:
    if last.op_type in RANGES:
        return RANGES[last.op_type]
    if last.op_type == "Clip":
        low = _constant(graph, last.input[1]) if len(last.input) > 1 and last.input[1] else None
        high = _constant(graph, last.input[2]) if len(last.input) > 2 and last.input[2] else None
        for a in last.attribute:  # opset < 11: attributes
            if a.name == "min":
                low = a.f
            if a.name == "max":
                high = a.f
        if low is not None and high is not None and high > low:
            return low, high
    _refuse(f"the generator's output range is unknown: its last op is {echo(last.op_type)} (node {last.name}); end "
            "the graph with Tanh (-1..1), Sigmoid (0..1) or a Clip with constant bounds")


def read_generator(module: torch.nn.Module, model, spec) -> GeneratorInfo:
    """The :class:`GeneratorInfo` of a cleaned graph ``model`` (onnx.ModelProto) with a latent input ``spec`` and its
    converted ``module``; ModelImportError (one line) when it cannot serve as a parameterization."""
    graph = model.graph
    if len(graph.output) != 1:
        _refuse(f"a generator has one output (the image), this graph has {len(graph.output)}")
    output = graph.output[0].name
    last = _producers(graph).get(output)
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if last is None or not inputs:
        _refuse("the generator's output is not computed from its latent input")
    for node in _on_path(graph, inputs[0], output):
        if node.op_type in NON_DIFFERENTIABLE:
            _refuse(f"the generator is not differentiable: node {node.name} ({node.op_type}) lies between the latent "
                    f"and the image, and its gradient is zero or absent; export it without {node.op_type}",
                    reason="NOT_DIFFERENTIABLE")
    low, high = _range(graph, last)
    z = torch.randn(spec.shape(2), generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.enable_grad():
        try:
            out = module(z)
        except RuntimeError as exc:
            _refuse(f"the generator fails on a latent of shape {tuple(z.shape)}: {str(exc).strip().splitlines()[0]}")
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out) or out.dim() != 4 or out.shape[1] not in (1, 3):
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            _refuse(f"a generator's output is an image (N, C, H, W) with 1 or 3 channels; this one gives {shape}")
        if min(out.shape[-2:]) < 2:
            _refuse(f"the generator's image is {out.shape[-2]}x{out.shape[-1]}; it must be at least 2x2")
        grad = None
        if out.requires_grad:
            (grad,) = torch.autograd.grad(out.float().sum(), z, allow_unused=True)
    if grad is None or not bool((grad != 0).any()) or not bool(torch.isfinite(grad).all()):
        _refuse("the generator is not differentiable: the image's gradient does not reach its latent (an op without "
                "a gradient between them)", reason="NOT_DIFFERENTIABLE")
    return GeneratorInfo(latent=spec.latent, channels=int(out.shape[1]), height=int(out.shape[2]),
                         width=int(out.shape[3]), low=float(low), high=float(high), last_op=last.op_type)

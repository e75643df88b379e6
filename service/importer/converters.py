"""onnx2torch with our own converters for the ops it lacks or mishandles on real vision models.

``convert(model)`` maps onnx2torch's failures to :class:`ModelImportError`: an op without a converter is
``UNSUPPORTED_OP`` and names the op, its opset and the node; anything else is ``CONVERSION_FAILED``.
Our converters replace onnx2torch's entries for the same (op, version) keys:

- ``Reshape`` with ``allowzero=1`` (every dynamo export): onnx2torch refuses the attribute.
- ``Reduce*`` of opset 18+ whose ``axes`` are an input (when a model cannot be converted down to opset 17).
- ``AveragePool`` with asymmetric padding (Inception v1 from the ONNX zoo): explicit pad, then pool; with
  ``count_include_pad=0`` the padded zeros are kept out of the average by dividing by a pooled mask.
"""

from __future__ import annotations

import re
import threading

import onnx
import torch
import torch.nn.functional as F
from torch import fx
from torch import nn

from featureviz.errors import ModelImportError

__all__ = ["convert"]

_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def same_pads(sizes, kernel, stride, dilation, lower: bool) -> list[int]:
    """ONNX ``auto_pad`` SAME_UPPER/SAME_LOWER (TF's "SAME"): pads that make each output size ceil(in / stride).

    Returned in ``F.pad`` order (last axis first: left, right, top, bottom). SAME_UPPER puts the odd pixel at
    the end, SAME_LOWER at the beginning.
    """
    pads: list[int] = []
    for size, k, s, d in zip(sizes, kernel, stride, dilation):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if lower else (small, big))
    return [v for pair in reversed(pads) for v in pair]


def _torch_pads(onnx_pads) -> list[int]:
    """ONNX pads (begin_1, ..., begin_n, end_1, ..., end_n) in ``F.pad`` order."""
    n = len(onnx_pads) // 2
    return [v for i in reversed(range(n)) for v in (onnx_pads[i], onnx_pads[n + i])]


class _Padding(nn.Module):
    """Explicit padding before an op whose own padding is symmetric only: fixed ONNX pads or TF-style SAME."""

    def __init__(self, kernel, stride, dilation, pads=None, auto_pad: str = "NOTSET"):
        super().__init__()
        rank = len(kernel)
        self.kernel = tuple(int(k) for k in kernel)
        self.stride = tuple(int(v) for v in (stride or [1] * rank))
        self.dilation = tuple(int(v) for v in (dilation or [1] * rank))
        self.auto_pad = auto_pad
        self.pads = _torch_pads(pads) if pads else [0] * 2 * rank

    def padding(self, x: torch.Tensor) -> list[int]:
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            sizes = [int(v) for v in x.shape[2:]]
            return same_pads(sizes, self.kernel, self.stride, self.dilation, self.auto_pad == "SAME_LOWER")
        return self.pads


class PaddedMaxPool(_Padding):
    """ONNX MaxPool with SAME or asymmetric pads: pad with -inf (never the max), then pool without padding."""

    def __init__(self, kernel, stride, dilation, pads, auto_pad, ceil_mode: bool):
        super().__init__(kernel, stride, dilation, pads, auto_pad)
        self.ceil_mode = ceil_mode and auto_pad not in ("SAME_UPPER", "SAME_LOWER")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool2d if len(self.kernel) == 2 else F.max_pool1d if len(self.kernel) == 1 else F.max_pool3d
        x = F.pad(x, self.padding(x), value=float("-inf"))
        return pool(x, self.kernel, self.stride, 0, self.dilation, ceil_mode=self.ceil_mode)


class PaddedAvgPool(_Padding):
    """ONNX AveragePool with pads torch's symmetric padding cannot express (asymmetric, or TF-style SAME).

    Explicit zero pad, then pool; with ``count_include_pad=0`` the padded zeros are kept out of the average by
    dividing by the pooled mask of real pixels.
    """

    def __init__(self, kernel, stride, pads, auto_pad, ceil_mode: bool, count_include_pad: bool):
        super().__init__(kernel, stride, None, pads, auto_pad)
        self.ceil_mode = ceil_mode and auto_pad not in ("SAME_UPPER", "SAME_LOWER")
        self.count_include_pad = count_include_pad

    def _pool(self, x):
        pool = F.avg_pool2d if len(self.kernel) == 2 else F.avg_pool1d if len(self.kernel) == 1 else F.avg_pool3d
        return pool(x, self.kernel, self.stride, 0, ceil_mode=self.ceil_mode, count_include_pad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.padding(x)
        out = self._pool(F.pad(x, pads))
        if self.count_include_pad or not any(pads):
            return out
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        return out / self._pool(ones)


class OnnxConv(_Padding):
    """ONNX Conv whose weights are computed in the graph (an input, not an initializer), or with TF-style SAME or
    asymmetric pads: explicit pad, then ``F.conv{1,2,3}d`` with the weight and bias it is given."""

    def __init__(self, kernel, stride, dilation, pads, auto_pad, groups: int):
        super().__init__(kernel, stride, dilation, pads, auto_pad)
        self.groups = groups

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel) - 1]
        pads = self.padding(x)
        n = len(self.kernel)
        symmetric = all(pads[2 * i] == pads[2 * i + 1] for i in range(n))
        if symmetric:  # let the convolution pad: no copy of the input
            padding = tuple(pads[2 * (n - 1 - i)] for i in range(n))
        else:
            x, padding = F.pad(x, pads), 0
        return conv(x, weight, bias, self.stride, padding, self.dilation, self.groups)


class StaticConv(nn.Module):
    """A torch convolution module (its weights stay parameters) behind an explicit pad: SAME or asymmetric."""

    def __init__(self, pad: _Padding, conv: nn.Module):
        super().__init__()
        self.pad = pad
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad.padding(x)))


class DynamicClip(nn.Module):
    """ONNX Clip whose min/max are tensors computed in the graph (EdgeNeXt's clamp by a norm)."""

    def forward(self, x: torch.Tensor, min: torch.Tensor | None = None,  # noqa: A002 - ONNX's input names
                max: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
        if min is not None:
            x = torch.maximum(x, min.to(x.dtype))
        if max is not None:
            x = torch.minimum(x, max.to(x.dtype))
        return x


class OnnxClip(nn.Module):
    """ONNX Clip with constant bounds, either may be absent (named and shaped as onnx2torch's: the engine's
    redirected ReLU gradient reads ``min_val``/``max_val``)."""

    def __init__(self, min_val: float | None, max_val: float | None):
        super().__init__()
        self.min_val, self.max_val = min_val, max_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.min_val, self.max_val)


class OnnxLayerNorm(nn.Module):
    """ONNX LayerNormalization over ``x.shape[axis:]`` read at run time (Swin, MobileViT: the normalized shape is not
    in the file's shape information). ``scale``/``bias`` broadcast over the normalized axes, as ONNX allows."""

    def __init__(self, axis: int, epsilon: float, scale: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.axis = axis
        self.epsilon = epsilon
        self.weight = None if scale is None else nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.weight if scale is None else scale
        bias = self.bias if bias is None else bias
        shape = tuple(x.shape[self.axis:])
        if (scale is None or tuple(scale.shape) == shape) and (bias is None or tuple(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, self.epsilon)
        out = F.layer_norm(x, shape, None, None, self.epsilon)
        if scale is not None:
            out = out * scale
        return out if bias is None else out + bias


class OnnxSplit18(nn.Module):
    """ONNX Split-18: sizes from the ``split`` input, else ``num_outputs`` chunks of ceil(n / num_outputs)."""

    def __init__(self, axis: int, num_outputs: int):
        super().__init__()
        self.axis, self.num_outputs = axis, num_outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None):
        if split is not None:
            return torch.split(x, [int(v) for v in split.tolist()], self.axis)
        return torch.split(x, -(-x.shape[self.axis] // self.num_outputs), self.axis)


class ReshapeAllowZero(nn.Module):
    """ONNX Reshape with allowzero=1: a 0 in the target is a size of 0, not "copy the input's size"."""

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [int(v) for v in shape.tolist()])


def _register() -> None:
    with _REGISTER_LOCK:
        _register_once()


def _register_once() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx2torch.node_converters import registry
    from onnx2torch.node_converters.registry import OperationDescription
    from onnx2torch.utils.common import OnnxMapping
    from onnx2torch.utils.common import OperationConverterResult
    from onnx2torch.utils.common import onnx_mapping_from_node

    def override(op_type: str, versions: tuple[int, ...], like: int | None = None):
        """Register ``fn`` for ``op_type`` at ``versions``; where onnx2torch has none, fall back to its converter
        of version ``like`` (a newer version whose changes do not matter to it, such as new element types)."""
        def deco(fn):
            for version in versions:
                key = OperationDescription(domain="", operation_type=op_type, version=version)
                previous = registry._CONVERTER_REGISTRY.get(key)
                if previous is None and like is not None:
                    previous = registry._CONVERTER_REGISTRY.get(key._replace(version=like))
                registry._CONVERTER_REGISTRY[key] = _chain(fn, previous)
            return fn

        return deco

    def _chain(fn, previous):
        # ours first; None means "not our case", then onnx2torch's
        def converter(node, graph):
            result = fn(node, graph)
            if result is None:
                if previous is None:
                    raise NotImplementedError(
                        f"Converter is not implemented (OperationDescription(domain='', "
                        f"operation_type='{node.operation_type}', version={_opset_of(graph, node)}))"
                    )
                return previous(node, graph)
            if isinstance(result, OperationConverterResult):
                return result
            return OperationConverterResult(torch_module=result, onnx_mapping=onnx_mapping_from_node(node))

        return converter

    def const(graph, name):
        """The tensor of an initializer input, None for an empty (omitted) input, KeyError for a computed one."""
        if not name:
            return None
        return graph.initializers[name].to_torch()

    def pooling(node):
        attrs = node.attributes
        kernel = list(attrs["kernel_shape"])
        pads = list(attrs.get("pads", [])) or [0] * 2 * len(kernel)
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad == "VALID":
            pads = [0] * 2 * len(kernel)
        return attrs, kernel, pads, auto_pad

    def needs_padding(pads, auto_pad) -> bool:
        n = len(pads) // 2
        return auto_pad in ("SAME_UPPER", "SAME_LOWER") or pads[:n] != pads[n:]

    @override("AveragePool", (7, 10, 11, 19, 22))
    def _average_pool(node, graph):
        attrs, kernel, pads, auto_pad = pooling(node)
        n = len(kernel)
        if n > 3 or list(attrs.get("dilations", [1] * n)) != [1] * n:
            return None
        strides = list(attrs.get("strides", [1] * n))
        ceil_mode, include = bool(attrs.get("ceil_mode", 0)), bool(attrs.get("count_include_pad", 0))
        if needs_padding(pads, auto_pad) or any(2 * p > k for p, k in zip(pads, kernel)):
            return PaddedAvgPool(kernel, strides, pads, auto_pad, ceil_mode, include)
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[n - 1]
        return pool(kernel, strides, pads[:n], ceil_mode=ceil_mode, count_include_pad=include)

    @override("MaxPool", (8, 10, 11, 12, 22))
    def _max_pool(node, graph):
        attrs, kernel, pads, auto_pad = pooling(node)
        n = len(kernel)
        if n > 3 or len(node.output_values) > 1 or attrs.get("storage_order", 0):
            return None  # the Indices output: onnx2torch's converter (or its error)
        strides, dilations = list(attrs.get("strides", [1] * n)), list(attrs.get("dilations", [1] * n))
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        if needs_padding(pads, auto_pad) or any(2 * p > k for p, k in zip(pads, kernel)):
            return PaddedMaxPool(kernel, strides, dilations, pads, auto_pad, ceil_mode)
        pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[n - 1]
        return OperationConverterResult(
            torch_module=pool(kernel, strides, pads[:n], dilations, ceil_mode=ceil_mode),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))

    @override("Conv", (1, 11, 22))
    def _conv(node, graph):
        # ONNX Conv: weights may be computed in the graph (not initializers) and pads may be TF-style SAME
        attrs = node.attributes
        inputs = node.input_values
        weight_shape = _static_shape(graph, inputs[1])
        kernel = list(attrs.get("kernel_shape", weight_shape[2:] if weight_shape else []))
        if not kernel or len(kernel) > 3:
            return None
        pads = list(attrs.get("pads", [])) or [0] * 2 * len(kernel)
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad == "VALID":
            pads = [0] * 2 * len(kernel)
        static = inputs[1] in graph.initializers and (len(inputs) < 3 or not inputs[2] or inputs[2] in
                                                       graph.initializers)
        padding = OnnxConv(kernel, attrs.get("strides"), attrs.get("dilations"), pads, auto_pad,
                           attrs.get("group", 1))
        if not static:
            return padding
        weight = const(graph, inputs[1])
        bias = const(graph, inputs[2]) if len(inputs) > 2 else None
        conv_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(kernel) - 1]
        explicit = needs_padding(pads, auto_pad)
        conv = conv_class(weight.shape[1] * padding.groups, weight.shape[0], kernel, padding.stride,
                          0 if explicit else tuple(pads[: len(kernel)]), padding.dilation, padding.groups,
                          bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return OperationConverterResult(torch_module=StaticConv(padding, conv) if explicit else conv,
                                        onnx_mapping=OnnxMapping(inputs=(inputs[0],), outputs=node.output_values))

    @override("Clip", (11, 12, 13))
    def _clip(node, graph):
        inputs = list(node.input_values) + [""] * (3 - len(node.input_values))
        if not all(not name or name in graph.initializers for name in inputs[1:]):
            return DynamicClip()
        low, high = (None if not name else float(const(graph, name)) for name in inputs[1:3])
        if low == 0 and high is None:
            module = nn.ReLU()
        elif low == 0 and high == 6:
            module = nn.ReLU6()
        else:
            module = OnnxClip(low, high)
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=OnnxMapping(inputs=(inputs[0],), outputs=node.output_values))

    @override("LayerNormalization", (17,))
    def _layer_norm(node, graph):
        attrs = node.attributes
        inputs = node.input_values
        axis, epsilon = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
        if attrs.get("stash_type", 1) != 1 or len(node.output_values) > 1:
            return None
        shape = _static_shape(graph, inputs[0])
        params = [name for name in inputs[1:] if name]
        normalized = shape[axis:] if shape else []
        if normalized and all(d > 0 for d in normalized) and all(name in graph.initializers for name in params):
            return None  # a static normalized shape: onnx2torch's nn.LayerNorm
        if all(name in graph.initializers for name in params):
            module = OnnxLayerNorm(axis, epsilon, const(graph, inputs[1]),
                                   const(graph, inputs[2]) if len(inputs) > 2 else None)
            return OperationConverterResult(torch_module=module,
                                            onnx_mapping=OnnxMapping(inputs=(inputs[0],), outputs=node.output_values))
        return OnnxLayerNorm(axis, epsilon, None, None)

    # newer versions that only added element types (or inputs the exporters leave empty): onnx2torch's converter of
    # the version before, for the models that stay at opset 18+ (when the opset down-conversion fails)
    for op, versions, like in (("Shape", (19, 21), 15), ("Cast", (19, 21), 13), ("Constant", (19, 21), 13),
                               ("Identity", (19, 21), 16), ("Squeeze", (21,), 13), ("Unsqueeze", (21,), 13),
                               ("Transpose", (21,), 13), ("Flatten", (21,), 13), ("Equal", (19,), 13),
                               ("ConstantOfShape", (20, 21), 9), ("Pad", (18, 19, 21), 13)):
        override(op, versions, like=like)(lambda node, graph: None)

    @override("Split", (18,))
    def _split(node, graph):
        # opset 18 added `num_outputs` (the last chunk may be smaller) beside the `split` input of opset 13
        return OnnxSplit18(node.attributes.get("axis", 0), node.attributes.get("num_outputs", len(node.output_values)))

    @override("Gelu", (20,))
    def _gelu(node, graph):
        return nn.GELU(approximate=node.attributes.get("approximate", "none"))

    @override("Reshape", (5, 13, 14, 19, 21), like=14)
    def _reshape_allowzero(node, graph):
        # dynamo exports set allowzero=1; onnx2torch refuses it although a 0 is then just a size of 0
        if node.attributes.get("allowzero", 0) != 1:
            return None
        return ReshapeAllowZero()

    @override("ReduceL1", (18,))
    @override("ReduceL2", (18,))
    @override("ReduceLogSum", (18,))
    @override("ReduceLogSumExp", (18,))
    @override("ReduceMax", (18, 20))
    @override("ReduceMean", (18,))
    @override("ReduceMin", (18, 20))
    @override("ReduceProd", (18,))
    @override("ReduceSumSquare", (18,))
    def _reduce_axes_input(node, graph):
        # opset 18 moved `axes` from an attribute to an input; after constant folding it is an initializer
        from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
        from onnx2torch.utils.common import OnnxMapping

        attrs = node.attributes
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            if node.input_values[1] not in graph.initializers:
                return None  # dynamic axes: no converter
            axes = graph.initializers[node.input_values[1]].to_torch().tolist()
        if not axes and attrs.get("noop_with_empty_axes", 0):
            module = nn.Identity()
        else:
            module = OnnxReduceStaticAxes(node.operation_type, axes or None, attrs.get("keepdims", 1))
        return OperationConverterResult(
            torch_module=module,
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    _REGISTERED = True


def _opset_of(graph, node) -> str:
    return "?"


def _static_shape(graph, name: str) -> list[int] | None:
    """The shape of a value from the graph's shape information (0 for an unknown dimension), None if unknown."""
    if name in graph.initializers:
        return list(graph.initializers[name].to_torch().shape)
    info = graph.value_info.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]


_MISSING = re.compile(r"operation_type='([^']*)', version=(\d+)")
_WHAT_TO_DO = ("re-export the model with another opset (17 converts best), or open an issue attaching the ONNX "
               "file")


def _model_opset(model: onnx.ModelProto) -> int:
    return next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)


def _cap(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def convert(model: onnx.ModelProto) -> fx.GraphModule:
    """onnx2torch conversion of a cleaned, named model. Every failure is one line naming the op, the node, the
    opset and what to do: ``UNSUPPORTED_OP`` for an op or case without a converter, else ``CONVERSION_FAILED``."""
    _register()
    from onnx2torch import convert as onnx2torch_convert

    opset = _model_opset(model)
    try:
        return onnx2torch_convert(model)
    except NotImplementedError as exc:
        text = str(exc)
        found = _MISSING.search(text)
        if found:
            op, version = found.groups()
            nodes = [n.name for n in model.graph.node if n.op_type == op]
            where = f" (node {_cap(nodes[0])!r}{f' and {len(nodes) - 1} more' if len(nodes) > 1 else ''})" \
                if nodes else ""
            raise ModelImportError(
                f"operator {op} (ai.onnx opset {opset}, {op}-{version}) has no converter to torch{where}; "
                f"{_WHAT_TO_DO}",
                reason="UNSUPPORTED_OP",
            ) from exc
        raise ModelImportError(f"cannot convert{_failing_op(exc, opset)}: {_cap(text.strip().splitlines()[0], 200)}"
                               f"; {_WHAT_TO_DO}", reason="UNSUPPORTED_OP") from exc
    except Exception as exc:
        where = _failing_op(exc, opset)
        if isinstance(exc, KeyError) and where:
            problem = (f"its input {_cap(str(exc.args[0]))!r} is computed in the graph where the converter needs a "
                       "constant")
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problem = f"{type(exc).__name__}: {_cap(first, 200)}"
        raise ModelImportError(
            f"conversion to torch failed{' at' + where if where else ''}: {problem}; {_WHAT_TO_DO}",
            reason="CONVERSION_FAILED",
        ) from exc


def _failing_op(exc: BaseException, opset: int) -> str:
    tb = exc.__traceback__
    found = ""
    while tb is not None:  # the innermost converter frame names the node
        node = tb.tb_frame.f_locals.get("node")
        if node is not None and hasattr(node, "operation_type"):
            found = f" {node.operation_type} node {_cap(node.name)!r} (ai.onnx opset {opset})"
        tb = tb.tb_next
    return found

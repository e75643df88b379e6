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


class AsymmetricAvgPool2d(nn.Module):
    """ONNX AveragePool with pads (top, left, bottom, right) that torch's symmetric padding cannot express."""

    def __init__(self, kernel, stride, pads, ceil_mode: bool, count_include_pad: bool):
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        top, left, bottom, right = pads
        self.pad = (left, right, top, bottom)  # F.pad order: last axis first
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, self.pad)
        out = F.avg_pool2d(padded, self.kernel, self.stride, ceil_mode=self.ceil_mode, count_include_pad=True)
        if self.count_include_pad:
            return out
        ones = F.pad(torch.ones_like(x[:1, :1]), self.pad)
        frac = F.avg_pool2d(ones, self.kernel, self.stride, ceil_mode=self.ceil_mode, count_include_pad=True)
        return out / frac


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
    from onnx2torch.utils.common import OperationConverterResult
    from onnx2torch.utils.common import onnx_mapping_from_node

    def override(op_type: str, versions: tuple[int, ...]):
        def deco(fn):
            for version in versions:
                key = OperationDescription(domain="", operation_type=op_type, version=version)
                previous = registry._CONVERTER_REGISTRY.get(key)
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

    @override("AveragePool", (7, 10, 11, 19))
    def _average_pool(node, graph):
        attrs = node.attributes
        pads = list(attrs.get("pads", []))
        kernel = list(attrs["kernel_shape"])
        if len(kernel) != 2 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or len(pads) != 4:
            return None
        if pads[0] == pads[2] and pads[1] == pads[3]:
            return None
        return AsymmetricAvgPool2d(kernel, attrs.get("strides", [1, 1]), [pads[0], pads[1], pads[2], pads[3]],
                                   bool(attrs.get("ceil_mode", 0)), bool(attrs.get("count_include_pad", 0)))

    @override("Reshape", (5, 13, 14, 19, 21))
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


_MISSING = re.compile(r"operation_type='([^']*)', version=(\d+)")


def convert(model: onnx.ModelProto) -> fx.GraphModule:
    """onnx2torch conversion of a cleaned, named model; errors name the op."""
    _register()
    from onnx2torch import convert as onnx2torch_convert

    try:
        return onnx2torch_convert(model)
    except NotImplementedError as exc:
        text = str(exc)
        found = _MISSING.search(text)
        if found:
            op, version = found.groups()
            nodes = [n.name for n in model.graph.node if n.op_type == op]
            where = f" (node {nodes[0]!r}{f' and {len(nodes) - 1} more' if len(nodes) > 1 else ''})" if nodes else ""
            raise ModelImportError(
                f"operator {op} (opset {version}) has no converter to torch{where}", reason="UNSUPPORTED_OP"
            ) from exc
        op = _failing_op(exc)
        raise ModelImportError(f"cannot convert{op}: {text}", reason="UNSUPPORTED_OP") from exc
    except Exception as exc:
        raise ModelImportError(
            f"conversion to torch failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}",
            reason="CONVERSION_FAILED",
        ) from exc


def _failing_op(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if node is not None and hasattr(node, "operation_type"):
            return f" {node.operation_type} node {node.name!r}"
        tb = tb.tb_next
    return ""

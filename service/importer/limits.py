"""Size limits checked before any conversion work: a model too big for the machine is refused from its shapes.

A fixed input side above ``max_image_side`` (a 1x3x40000x40000 input would make the check allocate 19 GB), a
graph of more than ``max_nodes`` nodes (100,000 nodes took 14 s and 1.4 GB to inspect) and an activation memory
at the default size above ``max_activation_bytes`` are refused with ``MODEL_TOO_LARGE`` naming the figure and
the limit. The activation estimate sums the sizes of every tensor the graph computes for one image, from ONNX
shape inference with the input fixed at its default size: the import's catalog pass keeps them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from featureviz.errors import ModelImportError
from featureviz.importer._lazy import lazy
from featureviz.importer.inputs import InputSpec

onnx = lazy("onnx")  # imported on first use: a cache hit never checks a graph

__all__ = ["ImportLimits", "check_graph_size", "check_input_size", "estimate_activation_bytes"]

GiB = 1 << 30


@dataclass(frozen=True)
class ImportLimits:
    """What an import may cost. The server publishes its own (``ServerInfo.limits``); these are the defaults."""

    max_image_side: int = 1024
    max_nodes: int = 20_000
    max_activation_bytes: int = 4 * GiB

    @classmethod
    def unbounded(cls) -> "ImportLimits":
        """No limit (a model that passed them when it was stored)."""
        return cls(max_image_side=1 << 62, max_nodes=1 << 62, max_activation_bytes=1 << 62)


def check_graph_size(model: onnx.ModelProto, limits: ImportLimits) -> None:
    nodes = len(model.graph.node) + sum(len(f.node) for f in model.functions)
    if nodes > limits.max_nodes:
        raise ModelImportError(
            f"the graph has {nodes} nodes, above the limit of {limits.max_nodes} (max_model_nodes); "
            "export a smaller model or simplify it (onnxsim) first",
            reason="MODEL_TOO_LARGE",
        )


def check_input_size(model: onnx.ModelProto, spec: InputSpec, limits: ImportLimits) -> None:
    """Refuse a fixed input side above the limit, then an activation estimate above the limit."""
    for what, side in (("height", spec.height), ("width", spec.width)):
        if side is not None and side > limits.max_image_side:
            raise ModelImportError(
                f"input {_cap(spec.name)!r} has a fixed {what} of {side}, above the largest image side "
                f"{limits.max_image_side} (max_image_side); re-export it at a smaller size or with a dynamic size",
                reason="MODEL_TOO_LARGE",
            )
    estimate = estimate_activation_bytes(model, spec)
    if estimate > limits.max_activation_bytes:
        h, w = spec.default_size
        raise ModelImportError(
            f"the activations of one {h}x{w} image need about {estimate / GiB:.1f} GiB, above the limit of "
            f"{limits.max_activation_bytes / GiB:.1f} GiB (max_activation_bytes); export a smaller model or input",
            reason="MODEL_TOO_LARGE",
        )


def _itemsize() -> dict[int, int]:
    """Bytes per element of the ONNX tensor types (built on use: onnx is imported lazily)."""
    t = onnx.TensorProto
    return {t.FLOAT: 4, t.DOUBLE: 8, t.FLOAT16: 2, t.BFLOAT16: 2, t.INT64: 8, t.INT32: 4, t.INT16: 2, t.INT8: 1,
            t.UINT8: 1, t.BOOL: 1}


def estimate_activation_bytes(model: onnx.ModelProto, spec: InputSpec) -> int:
    """Bytes of every tensor the graph computes for one image at the default size (unknown shapes count 0)."""
    from featureviz.importer.clean import infer_shapes
    from featureviz.importer.clean import structural

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    value = next(v for v in probe.graph.input if v.name == spec.name)
    h, w = spec.default_size
    dims = (1, h, w, spec.channels) if spec.layout == "NHWC" else spec.shape(1)
    for dim, size in zip(value.type.tensor_type.shape.dim, dims):
        dim.Clear()
        dim.dim_value = size
    inferred = structural(infer_shapes, probe, restore=False)
    total, itemsize = 0, _itemsize()
    for info in (*inferred.graph.value_info, *inferred.graph.output):
        t = info.type.tensor_type
        if not t.HasField("shape"):
            continue
        count = 1
        for d in t.shape.dim:
            if not d.HasField("dim_value"):
                count = 0
                break
            count *= d.dim_value
        total += count * itemsize.get(t.elem_type, 4)
    return total


def _cap(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"



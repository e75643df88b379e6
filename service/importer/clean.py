"""Graph clean-up before conversion: opset upgrade, NHWC front, simplification, batch rewrite.

Why each step (all seen on real files, see docs/ARCHITECTURE.md and the importer tests):

- The dynamo exporter writes opset 18+ (``Reshape`` 19, ``ReduceMean`` with an axes input) where onnx2torch
  has few converters: those models are converted down to :data:`MAX_OPSET`.
- Old zoos ship opsets 7-9 (``Dropout`` v7, ``Upsample``...) that onnx2torch has no converters for: they are
  upgraded to opset :data:`TARGET_OPSET` with ``onnx.version_converter``.
- Keras/TF exports take NHWC and start with ``Transpose(perm=[0, 3, 1, 2])``: a ``Transpose`` from an NCHW
  input is put in front, so the pair folds away and the engine always works in NCHW.
- Legacy torch exports alias identical initializers through ``Identity`` nodes and compute weights with
  ``ConstantOfShape``; onnx2torch wants Conv weights as initializers: constant folding and identity
  elimination (onnxsim, the onnxscript optimizer as a fallback) fix both.
- An export with a fixed batch of 1 bakes the batch into ``Reshape`` targets ([1, 1280]) and constant
  ``Concat`` operands (a ViT class token); :func:`make_batch_dynamic` tracks which axis of each tensor is the
  batch and rewrites those constants so that any batch runs. The verification at batch > 1 checks the result.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import shape_inference
from onnx import version_converter

from featureviz.errors import ModelImportError
from featureviz.importer.inputs import InputSpec

__all__ = [
    "TARGET_OPSET",
    "upgrade_opset",
    "nhwc_to_nchw",
    "simplify",
    "make_batch_dynamic",
    "infer_shapes",
    "constants_to_initializers",
    "uint8_to_float_input",
]

_LOG = logging.getLogger(__name__)

# Opsets below MIN_OPSET are upgraded to TARGET_OPSET (onnx2torch covers 9..18 unevenly; 13 is its sweet spot).
MIN_OPSET = 11
TARGET_OPSET = 13
# Newer opsets (dynamo exports use 18-20) are converted down to this one: onnx2torch knows few ops past it.
MAX_OPSET = 17
BATCH_PARAM = "batch"


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bring the opset into the range onnx2torch covers: old ones up to 13, newer than 17 down to 17."""
    version = _opset(model)
    if version > MAX_OPSET:
        model = lower_gelu(model)
        try:
            return structural(lambda m: version_converter.convert_version(m, MAX_OPSET), model)
        except Exception as exc:  # keep the newer opset; our converters cover the common ops there
            _LOG.info("cannot convert opset %d down to %d: %s", version, MAX_OPSET, exc)
            return model
    if version >= MIN_OPSET:
        return model
    try:
        upgraded = structural(lambda m: version_converter.convert_version(m, TARGET_OPSET), model)
    except Exception as exc:  # the converter raises bare RuntimeErrors and ValueErrors
        raise ModelImportError(
            f"cannot upgrade opset {version} to {TARGET_OPSET}: {str(exc).strip().splitlines()[0]}",
            reason="CONVERSION_FAILED",
        ) from exc
    return upgraded


def lower_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Write ``Gelu`` (opset 20, every dynamo export of a transformer) with opset-13 ops, so that the model can be
    converted down to :data:`MAX_OPSET`; the last node keeps the Gelu's name and output (the catalog's name).

    approximate="none": 0.5 x (1 + erf(x / sqrt 2)); "tanh": 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
    """
    if not any(node.op_type == "Gelu" for node in model.graph.node):
        return model
    model = _copy(model)
    graph = model.graph
    nodes = []
    consts: dict[float, str] = {}

    def const(value: float) -> str:
        if value not in consts:
            consts[value] = f"featureviz/gelu/const_{len(consts)}"
            graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), consts[value]))
        return consts[value]

    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, y, p = node.input[0], node.output[0], f"{node.name or node.output[0]}/featureviz"
        if _attr(node, "approximate", b"none") in (b"tanh", "tanh"):
            nodes += [helper.make_node("Mul", [x, x], [f"{p}/x2"], name=f"{p}/x2"),
                      helper.make_node("Mul", [f"{p}/x2", x], [f"{p}/x3"], name=f"{p}/x3"),
                      helper.make_node("Mul", [f"{p}/x3", const(0.044715)], [f"{p}/c"], name=f"{p}/c"),
                      helper.make_node("Add", [x, f"{p}/c"], [f"{p}/inner"], name=f"{p}/inner"),
                      helper.make_node("Mul", [f"{p}/inner", const(math.sqrt(2 / math.pi))], [f"{p}/s"],
                                       name=f"{p}/s"),
                      helper.make_node("Tanh", [f"{p}/s"], [f"{p}/t"], name=f"{p}/t")]
        else:
            nodes += [helper.make_node("Mul", [x, const(1 / math.sqrt(2))], [f"{p}/s"], name=f"{p}/s"),
                      helper.make_node("Erf", [f"{p}/s"], [f"{p}/t"], name=f"{p}/t")]
        nodes += [helper.make_node("Add", [f"{p}/t", const(1.0)], [f"{p}/one_plus"], name=f"{p}/one_plus"),
                  helper.make_node("Mul", [x, const(0.5)], [f"{p}/half"], name=f"{p}/half"),
                  helper.make_node("Mul", [f"{p}/half", f"{p}/one_plus"], [y], name=node.name)]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def nhwc_to_nchw(model: onnx.ModelProto, spec: InputSpec) -> onnx.ModelProto:
    """Give an NHWC model an NCHW input of the same name, followed by a Transpose to what the graph expects."""
    if spec.layout != "NHWC":
        return model
    model = _copy(model)
    graph = model.graph
    inner = f"{spec.name}__nhwc"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == spec.name:
                node.input[i] = inner
    for output in graph.output:
        if output.name == spec.name:
            raise ModelImportError(f"input {spec.name!r} is also a graph output", reason="UNSUPPORTED_INPUT")
    value = next(v for v in graph.input if v.name == spec.name)
    dims = list(value.type.tensor_type.shape.dim)
    old = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
    for d, src in zip(old, dims):
        d.CopyFrom(src)
    for i, src in enumerate((0, 3, 1, 2)):
        dims[i].CopyFrom(old[src])
    graph.node.insert(0, helper.make_node("Transpose", [spec.name], [inner], name="featureviz/nchw_to_nhwc",
                                          perm=[0, 2, 3, 1]))
    return model


def uint8_to_float_input(model: onnx.ModelProto, spec: InputSpec) -> onnx.ModelProto:
    """A uint8 image input becomes float32 (values 0..255); the graph's own Cast to float then passes it on."""
    if spec.dtype != "uint8":
        return model
    model = _copy(model)
    value = next(v for v in model.graph.input if v.name == spec.name)
    value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


def drop_dropout(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove inference-time Dropout (an identity); old zoos give it a mask output onnx2torch mishandles."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    outputs = {v.name for v in graph.output}
    rename: dict[str, str] = {}
    keep = []
    changed = False
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        mask_used = len(node.output) > 1 and node.output[1] and node.output[1] in used
        if node.op_type == "Dropout" and not mask_used:
            if node.output[0] in outputs:  # a graph output keeps its name: an Identity then
                keep.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
            else:
                rename[node.output[0]] = node.input[0]
            changed = True
            continue
        keep.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(keep)
    return model


# Initializers above this size travel around the structural passes (opset conversion, shape inference), which
# copy and re-serialize the whole model but read only the dims of weight tensors: VGG-19 carries 548 MB.
_BIG_TENSOR = 1 << 16


def _strip_weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """Move the raw data of large initializers out of ``model`` (in place); dims and types stay."""
    taken = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > _BIG_TENSOR:
            taken[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    return taken


def _restore_weights(model: onnx.ModelProto, taken: dict[str, bytes]) -> None:
    for tensor in model.graph.initializer:
        if tensor.name in taken and not tensor.raw_data:
            tensor.raw_data = taken[tensor.name]


def structural(fn, model: onnx.ModelProto, *, restore: bool = True):
    """``fn(model)`` run while the large weights are out of ``model``; they go back into it and, with
    ``restore``, into a new model ``fn`` returns."""
    taken = _strip_weights(model)
    try:
        result = fn(model)
    finally:
        _restore_weights(model, taken)
    if restore and isinstance(result, onnx.ModelProto) and result is not model:
        _restore_weights(result, taken)
    return result


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, strict_mode=strict, data_prop=True)
    except Exception as exc:
        if strict:
            raise
        _LOG.debug("shape inference failed: %s", exc)
        return model


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    initializers = {t.name for t in model.graph.initializer}
    keep = [v for v in model.graph.input if v.name not in initializers]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
        # IR < 4 requires every initializer to be an input; IR 7 is what opset 13 (our upgrade target) pairs with
        model.ir_version = max(model.ir_version, 7)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, identity/dropout elimination and shape inference (onnxsim; onnxscript as fallback)."""
    model = drop_dropout(_copy(model))
    _drop_initializer_inputs(model)
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model, check_n=0)
        if ok:
            return simplified
        _LOG.info("onnxsim could not validate its result; falling back to the onnxscript optimizer")
    except Exception as exc:  # onnxsim raises plain RuntimeErrors from C++
        _LOG.info("onnxsim failed (%s); falling back to the onnxscript optimizer", str(exc).splitlines()[0])
    try:
        import onnxscript.optimizer

        return onnxscript.optimizer.optimize(model)
    except Exception as exc:
        raise ModelImportError(
            f"graph simplification failed: {str(exc).strip().splitlines()[0]}", reason="CONVERSION_FAILED"
        ) from exc


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn ``Constant`` nodes into initializers (in place).

    onnx2torch reads Conv, Gemm and normalization weights only from initializers; paddle2onnx writes every
    weight as a ``Constant`` node, and constant folding leaves folded weights (a ConvNeXt layer scale, a
    re-parameterized branch) in ``Constant`` nodes too.
    """
    graph = model.graph
    outputs = {v.name for v in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            try:
                value = _constant_value(node)
            except (ValueError, TypeError):
                value = None
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    return model


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    (attr,) = node.attribute
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    scalars = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name in scalars:
        return np.asarray(helper.get_attribute_value(attr), dtype=scalars[attr.name])
    return None  # sparse and string constants stay nodes


# ---------------------------------------------------------------------------------------------- batch rewrite


def _shape_of(value: onnx.ValueInfoProto) -> list[int | None] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _batch_axis_out(node, in_axis: int, in_rank: int, out_rank: int | None, consts: dict) -> int | None:
    """Which axis of the node's (first) output carries the batch, given the batch axis of its data input."""
    op = node.op_type
    if op == "Transpose":
        perm = list(_attr(node, "perm", list(range(in_rank))[::-1]))
        return perm.index(in_axis)
    if op == "Flatten":
        axis = _attr(node, "axis", 1) % max(in_rank, 1)
        return 0 if in_axis < axis else 1
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1] in consts:
            axes = consts[node.input[1]].tolist()
        if axes is None:
            return in_axis if out_rank == in_rank else None
        if op == "Squeeze":
            axes = sorted(a % in_rank for a in axes)
            return None if in_axis in axes else in_axis - sum(a < in_axis for a in axes)
        axes = sorted(a % out_rank for a in axes) if out_rank else sorted(axes)
        pos = in_axis
        for a in axes:
            if a <= pos:
                pos += 1
        return pos
    if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
        keep = _attr(node, "keepdims", 1)
        if keep or out_rank == in_rank:
            return in_axis
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1] in consts:
            axes = consts[node.input[1]].tolist()
        if axes is None:
            return None
        axes = sorted(a % in_rank for a in axes)
        return None if in_axis in axes else in_axis - sum(a < in_axis for a in axes)
    if op == "Gather":
        axis = _attr(node, "axis", 0) % in_rank
        if axis == in_axis or out_rank is None:
            return None
        return in_axis if in_axis < axis else in_axis + (out_rank - in_rank)
    if op == "Shape" or op == "Size":
        return None
    if out_rank is not None and out_rank == in_rank:
        return in_axis
    if out_rank is not None and out_rank > in_rank and op in ("MatMul", "Add", "Mul", "Sub", "Div", "Where"):
        return in_axis + (out_rank - in_rank)  # broadcasting prepends axes
    return None


def _reshape_target(in_shape: list[int], where: tuple[int, int], target: np.ndarray, allowzero: int = 0
                    ) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Rewrite a batch-1 Reshape target so that the batch is inferred (-1).

    ``where = (axis, inner)``: the batch is a factor of ``axis`` with ``inner`` elements of that axis inside it
    (a ViT's ``[B * heads, ...]`` has inner = heads). A reshape keeps row-major order, so the batch sits at
    the same flat position ``P`` (elements before it, in units of the part after it) in the output; it lands in
    the output axis spanning P. When P falls on an axis boundary either neighbour is a valid view; the batch
    then goes into the following axis (batch-major, as torch code writes ``[B * heads, ...]``) unless that is
    the last axis, which holds features (``view(tokens * B, dim)`` in attention).
    """
    if any(d is None for d in in_shape):
        return None
    axis, inner = where
    total = math.prod(in_shape)
    target = target.astype(np.int64).copy()
    for i, v in enumerate(target):  # resolve 0 (copy) and -1 (infer) into the batch-1 sizes
        if v == 0 and not allowzero:
            target[i] = in_shape[i]
    if (target == -1).sum() == 1:
        known = math.prod(int(v) for v in target if v != -1)
        target[target == -1] = total // max(known, 1)
    if math.prod(int(v) for v in target) != total or in_shape[axis] % inner:
        return None
    position = math.prod(in_shape[:axis]) * (in_shape[axis] // inner)
    cut = 1
    for j, v in enumerate(target):
        v = int(v)
        if cut == position:  # on the boundary before axis j
            if j == len(target) - 1 and j > 0:
                j, new_inner = j - 1, 1
            else:
                new_inner = v
            break
        if cut * v > position:  # strictly inside axis j
            outer = position // cut
            if position % cut or v % outer:
                return None
            new_inner = v // outer
            break
        cut *= v
    else:
        if cut != position or not len(target):
            return None
        j, new_inner = len(target) - 1, 1  # the batch is the innermost factor of the last axis
    target[j] = -1
    return target, (j, new_inner)


def make_batch_dynamic(model: onnx.ModelProto, spec: InputSpec) -> tuple[onnx.ModelProto, bool]:
    """Make a model exported at batch 1 run any batch. Returns the model and whether anything was rewritten."""
    if spec.batch != 1:
        return model, False
    shaped = structural(infer_shapes, model, restore=False)
    shapes = {v.name: _shape_of(v) for v in (*shaped.graph.value_info, *shaped.graph.input, *shaped.graph.output)}
    # rewritten in place: the model is the simplifier's fresh output
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    init_by_name = {t.name: t for t in graph.initializer}
    use_count: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            use_count[name] = use_count.get(name, 0) + 1

    batch_axis: dict[str, tuple[int, int]] = {spec.name: (0, 1)}
    new_nodes: list[onnx.NodeProto] = []
    changed = False
    for node in graph.node:
        data = next(((name, batch_axis[name]) for name in node.input if name in batch_axis), None)
        if data is None:
            new_nodes.append(node)
            continue
        in_name, (in_axis, inner) = data
        in_shape = shapes.get(in_name)
        out_shape = shapes.get(node.output[0]) if node.output else None
        in_rank = len(in_shape) if in_shape else None
        out_rank = len(out_shape) if out_shape else None
        out_axis: int | None
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts and in_shape:
            rewritten = _reshape_target(in_shape, (in_axis, inner), consts[node.input[1]],
                                        _attr(node, "allowzero", 0))
            if rewritten is None:
                out_axis = None
                _LOG.info("batch rewrite: cannot place the batch in Reshape %s", node.name)
            else:
                target, (out_axis, inner) = rewritten
                name = node.input[1]
                if use_count.get(name, 0) > 1:  # shared constant: give this node its own copy
                    name = f"{name}__batch_{node.name or len(new_nodes)}"
                    graph.initializer.append(numpy_helper.from_array(target, name))
                    node.input[1] = name
                else:
                    init_by_name[name].CopyFrom(numpy_helper.from_array(target, name))
                consts[name] = target
                changed = True
        elif node.op_type == "Concat" and in_rank:
            axis = _attr(node, "axis") % in_rank
            out_axis = in_axis
            if axis != in_axis:
                for i, name in enumerate(node.input):
                    if (inner == 1 and name in consts and consts[name].ndim == in_rank
                            and consts[name].shape[in_axis] == 1):
                        node.input[i] = _expand_to_batch(new_nodes, name, in_name, in_axis, in_rank, node.name, i)
                        changed = True
        elif in_rank is None:
            out_axis = None
        else:
            out_axis = _batch_axis_out(node, in_axis, in_rank, out_rank, consts)
            if node.op_type == "Flatten" and out_axis is not None:  # the axes after the batch merge inside it
                cut = _attr(node, "axis", 1) % max(in_rank, 1)
                inner *= math.prod(d or 1 for d in in_shape[in_axis + 1 : cut if out_axis == 0 else in_rank])
        if out_axis is not None:
            for out in node.output:
                batch_axis[out] = (out_axis, inner)
        new_nodes.append(node)

    del graph.node[:]
    graph.node.extend(new_nodes)
    # the batch is now symbolic on the input and on the outputs that carry it
    _set_dim_param(next(v for v in graph.input if v.name == spec.name), 0)
    for value in graph.output:
        if value.name in batch_axis:
            _set_dim_param(value, batch_axis[value.name][0])
    del graph.value_info[:]
    return model, changed


def _set_dim_param(value: onnx.ValueInfoProto, axis: int) -> None:
    dims = value.type.tensor_type.shape.dim
    if axis < len(dims):
        dims[axis].Clear()
        dims[axis].dim_param = BATCH_PARAM


def _expand_to_batch(nodes: list, const: str, like: str, axis: int, rank: int, owner: str, k: int) -> str:
    """Nodes computing ``Expand(const, shape)`` where shape is 1 everywhere but the batch axis of ``like``."""
    prefix = f"featureviz/batch/{owner}/{k}"
    ones = [1] * rank
    nodes.append(helper.make_node("Shape", [like], [f"{prefix}/shape_all"], name=f"{prefix}/Shape"))
    nodes.append(helper.make_node("Constant", [], [f"{prefix}/axis"], name=f"{prefix}/axis",
                                  value=numpy_helper.from_array(np.array([axis], np.int64))))
    nodes.append(helper.make_node("Gather", [f"{prefix}/shape_all", f"{prefix}/axis"], [f"{prefix}/shape"],
                                  name=f"{prefix}/Gather", axis=0))
    pieces = []
    if axis > 0:
        pieces.append(helper.make_node("Constant", [], [f"{prefix}/pre"], name=f"{prefix}/pre",
                                       value=numpy_helper.from_array(np.array(ones[:axis], np.int64))))
    if axis < rank - 1:
        pieces.append(helper.make_node("Constant", [], [f"{prefix}/post"], name=f"{prefix}/post",
                                       value=numpy_helper.from_array(np.array(ones[axis + 1:], np.int64))))
    nodes.extend(pieces)
    parts = ([f"{prefix}/pre"] if axis > 0 else []) + [f"{prefix}/shape"] + ([f"{prefix}/post"] if axis < rank - 1
                                                                             else [])
    nodes.append(helper.make_node("Concat", parts, [f"{prefix}/target"], name=f"{prefix}/Concat", axis=0))
    nodes.append(helper.make_node("Expand", [const, f"{prefix}/target"], [f"{prefix}/out"], name=f"{prefix}/Expand"))
    return f"{prefix}/out"

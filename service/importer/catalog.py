"""The layer catalog: every tensor of the converted model that can be a visualization target.

One :class:`LayerInfo` per output tensor of a converted ONNX node that depends on the image input and is a
float tensor of rank >= 2, in topological order. Names:

- ``name`` is the ONNX node name (unique; nodes without one get ``<OpType>_<index>``). For a node with
  several outputs (``Split``) there is one entry per output, named by the output tensor.
- ``aliases`` are every other string that resolves to it: the output tensor name, the torch module name
  onnx2torch gives the node (dots become slashes) and, for a pre-activation tensor, ``"<activation>:pre"``.
- Pre-activation tensors (the input of a ``Relu``, ``Clip``, ``Sigmoid`` ...) are the outputs of the node
  before the activation; their entry says which activation they feed in ``pre_activation_of`` and answers
  to ``"<activation node>:pre"``, so ``"conv1/Relu:pre"`` is the conv output before the ReLU.
- Tensors whose axis 0 is not the batch (Swin's (windows, ...) partitions, attention reshaped over heads) are
  not listed: an objective needs one value per image.
- ``is_logits`` marks the model's first output, or the input of its final ``Softmax``/``LogSoftmax``.

Channels are on axis 1 for rank 2 and rank 4 (NCHW) tensors and on the last axis for rank 3 token tensors
(N, tokens, C) of vision transformers: :attr:`LayerInfo.channel_axis`. Some models keep channels-last rank 4
tensors inside (ConvNeXt's blocks permute to (N, H, W, C) around their LayerNorm and MLP; Swin works in
(N, H, W, C) throughout). :func:`spatial_layout` tells them apart by the shape alone: a rank 4 tensor whose axes
2 and 3 are not a grid of the input but whose axes 1 and 2 are (same aspect as the input, within rounding) is
``NHWC``. ``LayerInfo.layout`` records it ("NC", "NCHW", "NHWC", "NLC" for tokens), ``channels`` and
``spatial_size`` read the right axes, and :func:`featureviz.importer.truncate.truncate_graph` hands every
spatial target to the engine as NCHW, so objectives never see the difference. The rule cannot tell an attention
tensor (N, heads, tokens, dim) from a map; such tensors are no image maps either way. A token tensor whose token count is a
patch grid of the input (``(H / s) * (W / s)`` for a stride s) after up to :data:`MAX_PREFIX_TOKENS` leading
tokens records them: ``prefix_tokens`` (1 for a CLS token, 2 with a distillation token) and ``grid`` (rows,
columns of patches at the default size).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from dataclasses import field

import torch
from torch import fx

from featureviz.errors import ECHO_CHARS
from featureviz.errors import NotFound
from featureviz.errors import echo
from featureviz.importer._lazy import lazy

onnx = lazy("onnx")  # imported on first use: a cache hit never builds a catalog


__all__ = ["LayerInfo", "Target", "ACTIVATIONS", "build_catalog", "name_index", "resolve", "record_outputs",
           "spatial_layout"]

ACTIVATIONS = frozenset({
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Softmax", "LogSoftmax",
})
_SOFTMAX = ("Softmax", "LogSoftmax")
_CHANNEL_AXIS = {"NHWC": 3, "NLC": 2}  # layout -> the channels' axis; 1 for the others


@dataclass(frozen=True)
class Target:
    """Where a catalog tensor comes from in the fx graph: the node and, for tuple outputs, the index."""

    node: str
    index: int | None = None


@dataclass(frozen=True)
class LayerInfo:
    name: str
    aliases: tuple[str, ...]
    op_type: str
    shape: tuple[int, ...]  # at the default input size, batch 1
    channels: int
    spatial: bool  # rank 4 (N, C, H, W)
    depth: int  # topological index in the catalog
    is_logits: bool = False
    pre_activation_of: str | None = None
    target: Target = field(default=Target(""), repr=False, compare=False)
    prefix_tokens: int | None = None  # token tensors: tokens before the patch tokens (CLS ...); None otherwise
    grid: tuple[int, int] | None = None  # token tensors: (rows, columns) of the patch tokens at the default size
    layout: str = ""  # "NC", "NCHW", "NHWC" (channels last), "NLC" (tokens); "" for other ranks

    @property
    def channel_axis(self) -> int:
        return _CHANNEL_AXIS.get(self.layout, 1)

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        """(H, W) of a spatial layer at the default input size; None for others."""
        if not self.spatial:
            return None
        return tuple(self.shape[1:3]) if self.layout == "NHWC" else tuple(self.shape[2:4])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "op_type": self.op_type,
            "shape": list(self.shape),
            "channels": self.channels,
            "spatial": self.spatial,
            "depth": self.depth,
            "is_logits": self.is_logits,
            "pre_activation_of": self.pre_activation_of,
            "layout": self.layout,
            **({"prefix_tokens": self.prefix_tokens, "grid": list(self.grid)} if self.grid else {}),
        }


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.values[n.name] = value
        return value


@torch.no_grad()
def record_outputs(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, object]:
    """Run ``gm`` on ``x`` and return every fx node's output by node name."""
    recorder = _Recorder(gm)
    recorder.run(x)
    return recorder.values


def module_name(node_name: str) -> str:
    """The torch module name onnx2torch gives an ONNX node (dots are not allowed in module names)."""
    return node_name.replace(".", "/").lstrip("/")


def _input_dependent(gm: fx.GraphModule) -> set[str]:
    dependent: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a.name in dependent for a in n.all_input_nodes):
            dependent.add(n.name)
    return dependent


def build_catalog(gm: fx.GraphModule, model: onnx.ModelProto, example: torch.Tensor,
                  values: dict[str, object] | None = None, names=None) -> list[LayerInfo]:
    """List the target tensors of ``gm`` (converted from the cleaned, named ``model``), shapes from ``example``
    (or from ``values``, the recorded outputs of a batch-1 run at the default size). ``names``
    (:class:`featureviz.importer.names.Names`) gives the file's name of each safe node and value id; the catalog
    speaks only those."""
    if not values:
        values = record_outputs(gm, example)
    node_name = names.node_name if names is not None else (lambda name: name)
    tensor_name_of = names.tensor_name if names is not None else (lambda name: name)
    dependent = _input_dependent(gm)
    onnx_nodes = {module_name(node.name): node for node in model.graph.node}
    producer = {out: node for node in model.graph.node for out in node.output}

    # pre-activation: the tensor an activation node reads
    pre_of: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ACTIVATIONS and node.input and node.input[0] in producer:
            pre_of.setdefault(node.input[0], node_name(node.name))

    logits_tensor = model.graph.output[0].name if model.graph.output else None
    head = producer.get(logits_tensor)
    if head is not None and head.op_type in _SOFTMAX:
        logits_tensor = head.input[0]

    layers: list[LayerInfo] = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.name not in dependent or n.target not in onnx_nodes:
            continue
        onnx_node = onnx_nodes[n.target]
        value = values.get(n.name)
        outputs = value if isinstance(value, (tuple, list)) else (value,)
        multi = len(onnx_node.output) > 1
        shown = node_name(onnx_node.name)
        for index, (tensor, out) in enumerate(zip(onnx_node.output, outputs)):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 2:
                continue
            if out.shape[0] != example.shape[0]:  # axis 0 is not the batch (Swin's windows): no per-image target
                continue
            tensor_name = tensor_name_of(tensor)
            name = tensor_name if multi else shown
            aliases = [tensor_name] if not multi else [f"{shown}:{index}"]
            if module_name(shown) not in (name, ""):
                aliases.append(module_name(shown))
            pre = pre_of.get(tensor)
            if pre is not None:
                aliases.append(f"{pre}:pre")
            shape = tuple(int(s) for s in out.shape)
            size = tuple(example.shape[-2:])
            layout = patch_layout(shape[1], size) if len(shape) == 3 else None
            axes = {2: "NC", 3: "NLC", 4: spatial_layout(shape, size) if len(shape) == 4 else ""}.get(len(shape), "")
            layers.append(LayerInfo(
                name=name,
                aliases=tuple(dict.fromkeys(a for a in aliases if a != name)),
                op_type=onnx_node.op_type,
                shape=shape,
                channels=shape[_CHANNEL_AXIS.get(axes, 1)],
                spatial=len(shape) == 4,
                depth=len(layers),
                is_logits=tensor == logits_tensor,
                pre_activation_of=pre,
                target=Target(n.name, index if isinstance(value, (tuple, list)) else None),
                prefix_tokens=layout[0] if layout else None,
                grid=layout[1] if layout else None,
                layout=axes,
            ))
    return layers


MAX_PREFIX_TOKENS = 8


def _grid_of(rows: int, columns: int, size: tuple[int, int]) -> bool:
    """Whether ``rows`` x ``columns`` can be the grid of an input of ``size`` (H, W) downsampled by one stride on
    both axes, rounded down or up alike (the same ops run along both axes; a square input gives a square grid)."""
    h, w = size
    if h == w:
        return 0 < rows == columns <= h
    return any((rows, columns) in ((h // s, w // s), (-(-h // s), -(-w // s))) for s in range(1, max(h, w) + 1))


def spatial_layout(shape: tuple[int, ...], size: tuple[int, int]) -> str:
    """"NCHW" or "NHWC" for a rank 4 activation ``shape`` of an input of ``size`` (H, W).

    NCHW unless axes 2, 3 are no grid of the input while axes 1, 2 are and axis 3 has more than one channel: a
    (1, 96, 56, 56) tensor of a 224 px input is NCHW, a (1, 56, 56, 96) one NHWC. When both read as grids
    ((1, 56, 56, 56)) NCHW wins, as before this rule.
    """
    if len(shape) != 4 or _grid_of(shape[2], shape[3], size):
        return "NCHW"
    return "NHWC" if shape[3] > 1 and _grid_of(shape[1], shape[2], size) else "NCHW"


def patch_layout(tokens: int, size: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    """(prefix, (rows, columns)) when ``tokens`` is a few leading tokens and a patch grid of an input of ``size``
    (the fewest leading tokens that fit; the finest grid that fits them); None otherwise."""
    h, w = size
    grids = {}
    for stride in range(min(h, w), 0, -1):  # coarse to fine: a finer grid of the same count wins
        if h % stride == 0 and w % stride == 0:
            grids[(h // stride) * (w // stride)] = (h // stride, w // stride)
    for prefix in range(0, MAX_PREFIX_TOKENS + 1):
        if tokens - prefix in grids and tokens - prefix > 1:
            return prefix, grids[tokens - prefix]
    return None


def name_index(layers: list[LayerInfo]) -> dict[str, LayerInfo]:
    """Every name and alias -> its layer; canonical names win over aliases."""
    index = {layer.name: layer for layer in layers}
    for layer in layers:
        for alias in layer.aliases:
            index.setdefault(alias, layer)
    return index


def resolve(index: dict[str, LayerInfo], name: str) -> LayerInfo:
    try:
        return index[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name)[:ECHO_CHARS * 2], list(index), n=5, cutoff=0.5)
        close = [c if len(c) <= ECHO_CHARS else c[:ECHO_CHARS] + "\u2026" for c in close]
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise NotFound(f"unknown layer {echo(name)} (the model has {len(set(index.values()))} layers{hint})",
                       reason="LAYER_NOT_FOUND") from None

"""What the model takes: :class:`InputSpec` (name, layout, channels, sizes) and :class:`Preprocess`.

The imported module always takes NCHW float32 in the model's own value range. ``Preprocess`` says how an image
in [0, 1] becomes that input; the engine applies it:

    model_input[c] = (image01[order[c]] - mean[c]) / std[c]        (1-channel models: luminance first)

It defaults to the identity (mean 0, std 1, RGB): the importer cannot know a model's training normalization,
unless it is baked into the graph, in which case the identity is right. The user sets it otherwise.

uint8 image inputs (TF/TFLite exports: ``Cast`` to float at the front) are accepted when every use of the input
is such a Cast: the module then takes float32 in the model's 0..255 range, which flows through the graph's own
Cast, and ``preprocess`` defaults to std 1/255 (``model_input = 255 * image01``).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

from featureviz.errors import InvalidSpec
from featureviz.errors import ModelImportError
from featureviz.errors import echo
from featureviz.importer._lazy import lazy
from featureviz.spec import check_preprocess

onnx = lazy("onnx")  # imported on first use: a cache hit never reads a graph


__all__ = ["InputSpec", "Preprocess", "detect_input", "graph_inputs", "DEFAULT_SIZE"]

# Used for a dynamic height or width: the ImageNet size most vision models are trained at.
DEFAULT_SIZE = 224


@dataclass(frozen=True)
class Preprocess:
    """How an image in [0, 1] becomes model input. ``mean``/``std`` are per model channel, in [0, 1] units."""

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise InvalidSpec("preprocess.channel_order", f"must be 'RGB' or 'BGR', got {echo(self.channel_order)}")
        check_preprocess(self.mean, self.std, self.channel_order)  # the one rule (an upload's header too)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def identity(cls, channels: int = 3) -> "Preprocess":
        return cls(mean=(0.0,) * channels, std=(1.0,) * channels)

    def for_channels(self, channels: int) -> "Preprocess":
        """The same preprocessing with ``channels`` values (a 1-channel model takes the first mean/std)."""
        if len(self.mean) == channels:
            return self
        if channels == 1:
            return Preprocess(mean=self.mean[:1], std=self.std[:1], channel_order=self.channel_order)
        return Preprocess(mean=self.mean * channels, std=self.std * channels, channel_order=self.channel_order)


@dataclass(frozen=True)
class InputSpec:
    """The model's image input. ``height``/``width``/``batch`` are None when dynamic in the file."""

    name: str
    layout: str  # "NCHW" | "NHWC" as in the file; the imported module always takes NCHW
    channels: int  # 1 | 3
    height: int | None
    width: int | None
    batch: int | None
    default_size: tuple[int, int]
    preprocess: Preprocess = field(default_factory=Preprocess)
    dtype: str = "float32"  # "float32" | "uint8": the element type of the file's input (the module takes float32)
    # a generator's latent input (issue 25): its length Z; ``layout`` is "NC" for (N, Z) or "NCHW" for (N, Z, 1, 1),
    # ``channels`` is Z and the sizes are 1 (0: an image input)
    latent: int = 0

    def shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape of a batch of the module's (NCHW) input at the default size: a latent's (N, Z) or (N, Z, 1, 1)."""
        if self.layout == "NC":
            return batch, self.channels
        return (batch, self.channels, *self.default_size)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "batch": self.batch,
            "default_size": list(self.default_size),
            "dtype": self.dtype,
            "latent": self.latent,
            "preprocess": {
                "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std),
                "channel_order": self.preprocess.channel_order,
            },
        }


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: old exporters (IR 3) also list every initializer as a graph input."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def _starts_with_nhwc_transpose(model: onnx.ModelProto, name: str) -> bool:
    for node in model.graph.node:
        if name in node.input and node.op_type == "Cast" and _starts_with_nhwc_transpose(model, node.output[0]):
            return True
        if name in node.input and node.op_type == "Transpose":
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            if perm and list(perm[0]) == [0, 3, 1, 2]:
                return True
    return False


def _casts_to_float(model: onnx.ModelProto, name: str) -> bool:
    """Whether every node that reads ``name`` is a Cast to float32 (and something reads it)."""
    users = [node for node in model.graph.node if name in node.input]
    return bool(users) and all(
        node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
        for node in users
    )


def detect_input(model: onnx.ModelProto) -> InputSpec:
    """Find the one image input and its layout; refuse what the engine cannot drive."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(echo(i.name) for i in inputs[:5]) or "none"
        names += f" and {len(inputs) - 5} more" if len(inputs) > 5 else ""
        raise ModelImportError(
            f"the model needs exactly one image input, it has {len(inputs)} ({names})", reason="UNSUPPORTED_INPUT"
        )
    value = inputs[0]
    tensor_type = value.type.tensor_type
    uint8 = value.type.HasField("tensor_type") and tensor_type.elem_type == onnx.TensorProto.UINT8
    if uint8 and not _casts_to_float(model, value.name):
        raise ModelImportError(
            f"input {echo(value.name)} is UINT8 and is used other than through a Cast to float; only float32 inputs, "
            "or uint8 inputs cast to float at the front, are supported", reason="UNSUPPORTED_INPUT"
        )
    if not value.type.HasField("tensor_type") or (tensor_type.elem_type != onnx.TensorProto.FLOAT and not uint8):
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "non-tensor"
        raise ModelImportError(
            f"input {echo(value.name)} is {dtype}; only float32 image inputs (or uint8 cast to float) are supported",
            reason="UNSUPPORTED_INPUT"
        )
    latent = _latent_input(value, uint8)
    if latent is not None:
        return latent
    if not tensor_type.HasField("shape") or len(tensor_type.shape.dim) != 4:
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else "unknown"
        raise ModelImportError(
            f"input {echo(value.name)} has rank {rank}; an image input has rank 4 (NCHW or NHWC)",
            reason="UNSUPPORTED_INPUT",
        )
    n, d1, d2, d3 = _dims(value)
    if _starts_with_nhwc_transpose(model, value.name) or (d1 not in (1, 3) and d3 in (1, 3)):
        layout, channels, height, width = "NHWC", d3, d1, d2
    else:
        layout, channels, height, width = "NCHW", d1, d2, d3
    if channels not in (1, 3):
        shown = [d if d is not None else "?" for d in (n, d1, d2, d3)]
        raise ModelImportError(
            f"input {echo(value.name)} of shape {shown} ({layout}) has {channels if channels else 'dynamic'} channels; "
            "only 1 (grayscale) or 3 (colour) channel images are supported",
            reason="UNSUPPORTED_INPUT",
        )
    default = (height or DEFAULT_SIZE, width or DEFAULT_SIZE)
    return InputSpec(
        name=value.name,
        layout=layout,
        channels=channels,
        height=height,
        width=width,
        batch=n,
        default_size=default,
        preprocess=Preprocess(mean=(0.0,) * channels, std=(1 / 255,) * channels) if uint8
        else Preprocess.identity(channels),
        dtype="uint8" if uint8 else "float32",
    )


def _latent_input(value, uint8: bool) -> InputSpec | None:
    """A generator's latent input (issue 25): float (N, Z), or (N, Z, 1, 1) with Z not an image's channel count (1 or
    3), Z fixed. None for anything else (an image input, or a refusal below)."""
    dims = _dims(value) if value.type.tensor_type.HasField("shape") else []
    if uint8 or len(dims) not in (2, 4):
        return None
    if len(dims) == 4 and not (dims[2] == 1 and dims[3] == 1 and dims[1] not in (None, 1, 3)):
        return None
    if dims[1] is None:
        raise ModelImportError(f"input {echo(value.name)} is a latent vector of dynamic length; a generator's latent "
                               "size must be fixed in the file", reason="UNSUPPORTED_INPUT")
    return InputSpec(name=value.name, layout="NC" if len(dims) == 2 else "NCHW", channels=dims[1],
                     height=None if len(dims) == 2 else 1, width=None if len(dims) == 2 else 1, batch=dims[0],
                     default_size=(1, 1), preprocess=Preprocess.identity(3), latent=dims[1])

"""Every job option declared once: :data:`OPTIONS` (torch- and grpc-free; protobuf only).

A job option is a field of the proto's ``JobSpec`` besides ``model`` and ``objective``: ``steps``, ``lr``,
``param``, ``lr_schedule`` ... Each is one :class:`Option`: its name (the proto field name, which is also the
engine's ``RenderSpec`` keyword and the Python clients' keyword argument), type, default (the engine's), allowed
range or choices, help text, command-line flag, and the surfaces that offer it. Derived from it:

- the choices of an enum option: the proto enum's values by one naming rule (``PARAMETERIZATION_FFT`` <-> ``fft``:
  the enum's name in UPPER_SNAKE as a prefix, the rest in lower case; ``*_UNSPECIFIED`` is "the engine default");
- the proto <-> spec conversion (``featureviz.codec.spec_to_proto`` / ``spec_from_proto``: one pass through
  ``json_format`` plus that rule) and the Python clients' accepted keywords (an unknown one names the known ones);
- the server's range checks against its published ``Limits`` (:func:`check_limits`, the errors name the field,
  the value and the limit) and ``ServerInfo.job_options`` (:func:`job_options`), which the web explorer's form
  and any client read their choices and ranges from;
- the command-line flags of ``featureviz render`` and ``featureviz evaluate`` (``featureviz.cli.options``), the
  web API's job keys (``featureviz.web.gateway``) and the README's options table (``python -m featureviz.options
  --markdown``);
- checked in tests against the declaration: the proto's ``JobSpec`` (every field declared, types agree), the
  engine's ``RenderSpec`` defaults and range checks, the Node client's command line (``--json``).

Job kinds (:data:`KINDS`): a job renders (``render``: an objective and the render options) or indexes a dataset's
images (``exemplar_index``: ``JobSpec.exemplar_index`` set, no objective). Each option says which kinds it applies
to (``kinds``: ``size`` and ``preprocess`` apply to both); :func:`check_kind` refuses an option of the other kind,
an index job with an objective and a render without one. The index job's own settings (``k``, ``batch_size``) are
declared as the ``parts`` of its option, bounded by published limits like the top-level options.

Adding a job option: its :class:`Option` here, its field in the proto's ``JobSpec`` (``make proto``), and the
engine code where it acts (a ``RenderSpec`` field and what reads it). docs/ARCHITECTURE.md, "Where to change what".
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from dataclasses import dataclass
from typing import Any

from featureviz.errors import InvalidSpec
from featureviz.errors import echo
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Option", "OPTIONS", "BY_NAME", "SURFACES", "KINDS", "RENDER", "EXEMPLAR_INDEX", "offered", "enum_prefix",
           "ATLAS", "ATLAS_DEFAULTS", "enum_choices", "check_value", "check_limits", "check_kind", "job_kind",
           "bounds", "job_options",
           "markdown_table", "declaration_json"]

# where an option is offered: the local and remote `featureviz render` command line, `featureviz evaluate`, the
# Node client's command line (featureviz-node render), the web API's job (POST api/jobs) and the explorer's form.
# Every option is a keyword of the Python clients (submit, create_and_watch) and a field of the Node client's
# createJob: those take them all.
SURFACES = ("render", "evaluate", "node", "web", "form")

# job kinds: a render (an objective optimised into images) or an exemplar index (a dataset's images through the
# model, JobSpec.exemplar_index set); each option applies to some of them
RENDER, EXEMPLAR_INDEX, ATLAS = "render", "exemplar_index", "atlas"
KINDS = (RENDER, EXEMPLAR_INDEX, ATLAS)
# an atlas job's defaults where they differ from a render's, or where a render leaves them to the engine or the
# model (size unset: the model's fixed input side, else this; a size given is rendered at, as a render's is, the
# model seeing it resized); the server stores them in the job's spec, so every unit's key names every option
ATLAS_DEFAULTS = {"size": 128, "steps": 256, "param": "fft", "transforms": "standard", "seed": 0}

# value types: int, float, bool, choice (a proto enum), size (S or (H, W)), image (PNG/JPEG bytes),
# preprocess ({mean, std, channel_order}), judge (a model's sha256 or {model, preprocess}), exemplar_index
# ({dataset, layers, k, batch_size}: the index job's spec)
_TYPES = ("int", "float", "bool", "choice", "size", "image", "preprocess", "judge", "exemplar_index", "atlas",
          "dataset", "generator")
# the proto field type each value type is written in (checked against JobSpec by the tests)
PROTO_TYPES = {"int": ("int32", "int64"), "float": ("double",), "bool": ("bool",), "choice": ("enum",),
               "size": ("ImageSize",), "image": ("bytes",), "preprocess": ("Preprocess",), "judge": ("Judge",),
               "exemplar_index": ("ExemplarIndexSpec",), "atlas": ("AtlasSpec",), "dataset": ("string",),
               "generator": ("GeneratorSpec",)}


@dataclass(frozen=True)
class Option:
    """One job option. ``name``: the JobSpec field, RenderSpec keyword and client keyword. ``default``: the
    engine's (None: the model's, or unset). ``minimum`` / ``maximum``: fixed bounds (inclusive; ``below``: an
    exclusive upper bound); ``min_limit`` / ``max_limit``: the published ``Limits`` field that bounds it on a
    server (the server checks those; the engine checks the fixed ones). ``flags``: its command-line flags (default
    ``--name`` with dashes; several for compound values such as preprocess). ``engine``: the engine's RenderSpec
    takes it (else it is the job's: previews, the judge, running alone). ``explicit``: the command line sends its
    default, so the job records it. ``kinds``: the job kinds it applies to (:data:`KINDS`). ``parent``: for a part
    of a message option (``exemplar_index.k``), the JobSpec field whose message holds it; ``parts``: a message
    option's declared fields."""

    name: str
    type: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    below: float | None = None
    min_limit: str | None = None
    max_limit: str | None = None
    reason: str | None = None  # the error reason when a server limit refuses the value
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    surfaces: tuple[str, ...] = ("render", "node", "web")
    engine: bool = True
    explicit: bool = False
    kinds: tuple[str, ...] = (RENDER,)
    parent: str | None = None
    parts: tuple["Option", ...] = ()

    @property
    def field(self):
        """The proto's field descriptor (``JobSpec``'s, or its parent message's for a part)."""
        if self.parent:
            return pb.JobSpec.DESCRIPTOR.fields_by_name[self.parent].message_type.fields_by_name[self.name]
        return pb.JobSpec.DESCRIPTOR.fields_by_name[self.name]

    @property
    def path(self) -> str:
        """The field's path in a CreateJob request's errors (``spec.steps``, ``spec.exemplar_index.k``)."""
        return f"spec.{self.parent}.{self.name}" if self.parent else f"spec.{self.name}"

    @property
    def flag(self) -> str:
        """The (first) command-line flag."""
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...]:
        """An enum option's names, derived from the proto enum (empty for other types)."""
        return enum_choices(self.field.enum_type) if self.type == "choice" else ()

    def enum_value(self, name: str, path: str | None = None) -> int:
        """``"fft"`` -> ``PARAMETERIZATION_FFT``'s number; an unknown name is InvalidSpec naming the known ones."""
        if isinstance(name, str) and name in self.choices:
            return self.field.enum_type.values_by_name[enum_prefix(self.field.enum_type) + name.upper()].number
        raise InvalidSpec(path or f"spec.{self.name}", f"unknown value {echo(name)}; known: {', '.join(self.choices)}")

    def enum_name(self, number: int, path: str | None = None) -> str | None:
        """An enum number -> its engine name (None for UNSPECIFIED: the engine default)."""
        if number == 0:
            return None
        value = self.field.enum_type.values_by_number.get(number)
        name = value.name.removeprefix(enum_prefix(self.field.enum_type)).lower() if value else None
        if name not in self.choices:  # a newer client's value: name the proto's values
            known = ", ".join(enum_prefix(self.field.enum_type) + choice.upper() for choice in self.choices)
            raise InvalidSpec(path or f"spec.{self.name}", f"unknown value {number}; known: {known}")
        return name


def enum_prefix(enum) -> str:
    """The naming rule's prefix: ``Parameterization`` -> ``PARAMETERIZATION_``, ``LrSchedule`` -> ``LR_SCHEDULE_``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_choices(enum) -> tuple[str, ...]:
    """A proto enum's engine names: its values without the prefix, in lower case, UNSPECIFIED (0) left out."""
    prefix = enum_prefix(enum)
    return tuple(v.name.removeprefix(prefix).lower() for v in enum.values if v.number != 0)


_ALL_CLI = ("render", "evaluate", "node", "web", "form")
_BOTH = (RENDER, EXEMPLAR_INDEX)
_RA = (RENDER, ATLAS)  # the render options an atlas's units take

OPTIONS: tuple[Option, ...] = (
    Option("steps", "int", 512, "optimisation steps", minimum=1, max_limit="max_steps", metavar="N",
           surfaces=_ALL_CLI, explicit=True, kinds=_RA),
    Option("lr", "float", 0.05, "Adam learning rate", min_limit="min_lr", max_limit="max_lr",
           reason="LR_OUT_OF_RANGE", metavar="X", surfaces=_ALL_CLI, explicit=True, kinds=_RA),
    Option("size", "size", None, "image size S or HxW (default: the model's input size; an index job resizes each "
           "image to it)", min_limit="min_image_side", max_limit="max_image_side", metavar="S", surfaces=_ALL_CLI,
           kinds=KINDS),
    Option("batch", "int", 1, "images optimised together", minimum=1, max_limit="max_images_per_job", metavar="B",
           surfaces=_ALL_CLI, explicit=True),
    Option("seed", "int", 0, "random seed", minimum=0, maximum=2**63 - 1, metavar="K",
           surfaces=("render", "node", "web", "form"), explicit=True, kinds=_RA),
    Option("param", "choice", "fft", "image parameterization (laplacian: lucid's Laplacian pyramid)",
           surfaces=_ALL_CLI, explicit=True, kinds=_RA),
    Option("decay", "float", None, "spectrum exponent 1/f^decay (default 1.0 for fft, 1.4 for maco)", minimum=0, metavar="X",
           surfaces=("render", "evaluate", "node", "web"), kinds=_RA),
    Option("transforms", "choice", "standard", "robustness transforms (standard: lucid's pad, jitter, scale, "
           "rotate, each step its own resample; composed: the same in one resample, cheaper on a CPU)",
           surfaces=_ALL_CLI, explicit=True, kinds=_RA),
    Option("init_image", "image", None, "start from this image (PNG or JPEG; the web API: base64)", flags=("--init",),
           metavar="IMAGE"),
    Option("preprocess", "preprocess", None, "the model's preprocessing on [0, 1] images: mean, std and "
           "channel order (default: the model's; the command line's: ImageNet's)",
           flags=("--mean", "--std", "--bgr"), surfaces=("render", "evaluate", "web"), kinds=KINDS),
    Option("preview_every", "int", 0, "a preview image every N steps (0: none)", minimum=0, engine=False,
           surfaces=("web",)),
    Option("preview_max_side", "int", 0, "previews are downscaled to this side (0: 128)", minimum=0, engine=False,
           surfaces=("web",)),
    Option("exclusive", "bool", False, "run alone, never sharing a device step (the same seed on the same device "
           "gives the same PNG bytes); a local render always runs alone", engine=False),
    Option("judge", "judge", None, "another classifier with the same classes scores each image: its rank of the "
           "target class and its probability", flags=("--judge", "--judge-mean", "--judge-std", "--judge-bgr"),
           metavar="JUDGE", engine=False, surfaces=("render", "evaluate", "node", "web")),
    Option("lr_schedule", "choice", "constant", "learning-rate schedule over the steps: constant, or a cosine or "
           "linear decay from lr to 0", flags=("--schedule",), surfaces=("render", "node", "web", "form"), kinds=_RA),
    Option("lr_warmup", "int", 0, "steps of linear learning-rate warm-up (at most the steps)", minimum=0,
           flags=("--warmup",), metavar="N", kinds=_RA),
    Option("plateau", "float", 0.0, "stop early once the objective's relative gain over the last plateau_window "
           "steps (against the window before) is below this, e.g. 0.01 (default 0: run every step)", minimum=0, below=1,
           flags=("--stop-at-plateau",), metavar="GAIN"),
    Option("plateau_window", "int", 32, "steps of each window of the plateau stop", minimum=1, maximum=50_000,
           metavar="N"),
    Option("exemplar_index", "exemplar_index", None, "index a dataset's images instead of rendering: {dataset, "
           "layers (default: every layer with channels), k, batch_size}; the job has no objective and takes only "
           "size and preprocess besides", engine=False, surfaces=(), kinds=(EXEMPLAR_INDEX,), parts=(
               Option("k", "int", 16, "examples kept per channel and order", minimum=1, max_limit="max_exemplar_k",
                      engine=False, surfaces=(), kinds=(EXEMPLAR_INDEX,), parent="exemplar_index"),
               Option("batch_size", "int", 32, "images per forward of the index pass", minimum=1,
                      max_limit="max_index_batch", engine=False, surfaces=(), kinds=(EXEMPLAR_INDEX,),
                      parent="exemplar_index"))),
    Option("atlas", "atlas", None, "render one image per unit (a channel of a layer) instead of one objective: "
           "{layers, op_types, min_depth, max_depth, channels, dataset, negative, diversity}; the layers by name, op "
           "type or depth range (default: every layer with channels); dataset: a dataset id whose exemplar index over "
           "the atlas's layers is built or reused and joined to each unit; negative: also render each unit's "
           "negative; diversity: also render a diversity set of N images per unit; the job has no objective and "
           "takes the render options (atlas defaults: size 128, 256 steps, fft, standard transforms, seed 0)",
           engine=False, surfaces=(), kinds=(ATLAS,), parts=(
               Option("channels", "int", 0, "the first N channels of each layer (0: all)", minimum=0, engine=False,
                      surfaces=(), kinds=(ATLAS,), parent="atlas"),
               Option("diversity", "int", 0, "images of each unit's diversity set (0: none)", minimum=0,
                      max_limit="max_atlas_diversity", engine=False, surfaces=(), kinds=(ATLAS,), parent="atlas"))),
    Option("prior_dataset", "dataset", None, "learn the image statistics from this dataset (its id): the "
           "parameterization uses its colour matrix instead of ImageNet's and, for fft and laplacian, its spectrum decay "
           "instead of 1/f (on a server; locally: --prior-images DIR)", flags=("--prior",), metavar="DATASET", engine=False,
           surfaces=("render", "node", "web"), kinds=_RA),
    # --- generator (issue 25): param generator's model; its part latent_l2 is the RenderSpec's own keyword
    Option("generator", "generator", None, "with param generator: an uploaded generator (a latent vector in, an "
           "image of the model's channels out) whose latents are optimised instead of pixels: its sha256 or "
           "{model, latent_l2}; the command line: --generator GEN.onnx (uploaded with --server)",
           flags=("--generator", "--latent-l2"), metavar="GEN.onnx", surfaces=("render", "node", "web"), kinds=_RA,
           parts=(Option("latent_l2", "float", 0.0, "the objective minus latent_l2 * |z|^2 per image", minimum=0,
                         metavar="X", surfaces=("render", "node", "web"), kinds=_RA, parent="generator"),)),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}


def offered(surface: str) -> tuple[Option, ...]:
    """The options a surface offers, in declaration (proto) order."""
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}; known: {', '.join(SURFACES)}")
    return tuple(option for option in OPTIONS if surface in option.surfaces)


# ------------------------------------------------------------------------------------------------ checks


def check_value(option: Option, value, path: str | None = None):
    """A caller's Python value for ``option`` -> the value the proto conversion takes, or InvalidSpec naming the
    field (``spec.steps: must be an integer, got '5'``). Ranges are the engine's and the server's business."""
    path = path or f"spec.{option.name}"
    kind = option.type
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidSpec(path, f"must be an integer, got {echo(value)}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidSpec(path, f"must be a number, got {echo(value)}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise InvalidSpec(path, f"must be true or false, got {echo(value)}")
        return bool(value)
    if kind == "choice":
        option.enum_value(value, path)
        return value
    if kind == "size":
        sides = (value, value) if isinstance(value, numbers.Integral) else value
        if not isinstance(sides, (list, tuple)) or len(sides) != 2 or any(
                isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in sides):
            raise InvalidSpec(path, f"must be an integer or [height, width], got {echo(value)}")
        return int(sides[0]), int(sides[1])
    if kind == "image":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidSpec(path, f"must be the bytes of a PNG or JPEG image, got {type(value).__name__}")
        return bytes(value)
    if kind == "exemplar_index":
        return _index_value(value, path)
    if kind == "atlas":
        return _atlas_value(value, path)
    if kind == "dataset":
        if not isinstance(value, str) or not value.strip():
            raise InvalidSpec(path, f"must be a dataset id (or 'datasets/<id>'), got {echo(value)}")
        return value.strip()
    if kind == "generator":
        return _generator_value(value, path)
    if kind in ("preprocess", "judge"):
        if kind == "judge" and isinstance(value, str):
            return {"model": value}
        if not isinstance(value, dict):
            raise InvalidSpec(path, f"must be an object ({'a model sha256 or ' if kind == 'judge' else ''}"
                                    f"{'{model, preprocess}' if kind == 'judge' else '{mean, std, channel_order}'}), "
                                    f"got {echo(value)}")
        return value
    raise AssertionError(kind)


def _generator_value(value, path: str) -> dict:
    """A generator as the caller gives it: its sha256 (or "models/<sha256>"), or ``{"model": ..., "latent_l2": x}``."""
    if isinstance(value, str):
        value = {"model": value}
    if not isinstance(value, dict):
        raise InvalidSpec(path, f"must be a model sha256 or an object {{model, latent_l2}}, got {echo(value)}")
    unknown = [key for key in value if key not in ("model", "latent_l2")]
    if unknown:
        raise InvalidSpec(path, f"unknown key {echo(unknown[0])}; known: model, latent_l2")
    if not isinstance(value.get("model"), str) or not value["model"]:
        raise InvalidSpec(f"{path}.model", f"name the generator (an uploaded model's sha256), got "
                                           f"{echo(value.get('model'))}")
    out = {"model": value["model"]}
    if value.get("latent_l2") is not None:
        out["latent_l2"] = check_value(BY_NAME["generator"].parts[0], value["latent_l2"], f"{path}.latent_l2")
    return out


def _index_value(value, path: str) -> dict:
    """An index job's spec as the caller gives it: ``{"dataset": id, "layers": [...], "k": int, "batch_size": int}``
    (a bare string: the dataset)."""
    if isinstance(value, str):
        value = {"dataset": value}
    if not isinstance(value, dict):
        raise InvalidSpec(path, f"must be an object {{dataset, layers, k, batch_size}}, got {echo(value)}")
    unknown = [key for key in value if key not in ("dataset", "layers", "k", "batch_size")]
    if unknown:
        raise InvalidSpec(path, f"unknown key {echo(unknown[0])}; known: dataset, layers, k, batch_size")
    if not isinstance(value.get("dataset"), str) or not value["dataset"]:
        raise InvalidSpec(f"{path}.dataset", f"name the dataset (its id or 'datasets/<id>'), got "
                                             f"{echo(value.get('dataset'))}")
    layers = value.get("layers") or []
    if isinstance(layers, str) or not all(isinstance(layer, str) for layer in layers):
        raise InvalidSpec(f"{path}.layers", f"must be a list of layer names, got {echo(layers)}")
    out = {"dataset": value["dataset"], "layers": list(layers)}
    for part in BY_NAME["exemplar_index"].parts:
        if value.get(part.name) is not None:
            out[part.name] = check_value(part, value[part.name], f"{path}.{part.name}")
    return out


def _atlas_value(value, path: str) -> dict:
    """An atlas's spec as the caller gives it: ``{"layers": [...], "op_types": [...], "min_depth": int,
    "max_depth": int, "channels": int, "dataset": id, "negative": bool, "diversity": int}`` (every key optional;
    ``{}``: every layer, every channel, no join, no variants)."""
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise InvalidSpec(path, f"must be an object {{layers, op_types, min_depth, max_depth, channels, dataset, "
                                f"negative, diversity}}, got {echo(value)}")
    known = ("layers", "op_types", "min_depth", "max_depth", "channels", "dataset", "negative", "diversity")
    unknown = [key for key in value if key not in known]
    if unknown:
        raise InvalidSpec(path, f"unknown key {echo(unknown[0])}; known: {', '.join(known)}")
    out: dict = {}
    for key in ("layers", "op_types"):
        names = value.get(key) or []
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise InvalidSpec(f"{path}.{key}", f"must be a list of names, got {echo(names)}")
        if names:
            out[key] = list(names)
    if value.get("dataset"):
        if not isinstance(value["dataset"], str):
            raise InvalidSpec(f"{path}.dataset", f"must be a dataset id, got {echo(value['dataset'])}")
        out["dataset"] = value["dataset"]
    if value.get("negative") is not None:
        if not isinstance(value["negative"], bool):
            raise InvalidSpec(f"{path}.negative", f"must be true or false, got {echo(value['negative'])}")
        out["negative"] = value["negative"]
    for key in ("min_depth", "max_depth", "channels", "diversity"):
        if value.get(key) is not None:
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < 0:
                raise InvalidSpec(f"{path}.{key}", f"must be an integer >= 0, got {echo(number)}")
            out[key] = int(number)
    return out


def job_kind(spec: pb.JobSpec) -> str:
    """The kind of a JobSpec: ``exemplar_index`` or ``atlas`` when that field is set, else ``render``."""
    if spec.HasField("atlas"):
        return ATLAS
    return EXEMPLAR_INDEX if spec.HasField("exemplar_index") else RENDER


def _is_set(option: Option, message) -> bool:
    if option.field.has_presence:
        return message.HasField(option.name)
    value = getattr(message, option.name)
    return bool(len(value)) if option.field.is_repeated else bool(value)


def check_kind(spec: pb.JobSpec) -> str:
    """The job's kind (:func:`job_kind`), after refusing (InvalidSpec naming the field) an option set that does not
    apply to it (``spec.steps`` on an index job), an index job with an objective and a render without one."""
    kind = job_kind(spec)
    if spec.HasField("atlas") and spec.HasField("exemplar_index"):
        raise InvalidSpec("spec.atlas", "a job is an atlas or an exemplar index, not both; set one of them")
    if kind == ATLAS and spec.HasField("objective"):
        raise InvalidSpec("spec.objective", "an atlas job has no objective: each unit's is channel(layer, c); leave "
                                            "the objective unset, or leave atlas unset to render it")
    if kind == EXEMPLAR_INDEX and spec.HasField("objective"):
        raise InvalidSpec("spec.objective", "an exemplar_index job has no objective: it indexes a dataset's images; "
                                            "leave the objective unset, or leave exemplar_index unset to render")
    if kind == RENDER and not spec.HasField("objective"):
        raise InvalidSpec("spec.objective", "a render job needs an objective (or set exemplar_index to index a "
                                            "dataset)")
    for option in OPTIONS:
        if kind not in option.kinds and _is_set(option, spec):
            takes = ", ".join(o.name for o in OPTIONS if kind in o.kinds)
            raise InvalidSpec(f"spec.{option.name}", f"{option.name} applies to {' and '.join(option.kinds)} jobs, "
                                                     f"not to {kind} jobs (which take {takes}); leave it unset")
    return kind


def bounds(option: Option, limits=None) -> tuple[float | None, float | None]:
    """The option's (minimum, maximum): the published limits' values where ``limits`` is given, else the fixed
    bounds."""
    low = getattr(limits, option.min_limit) if limits is not None and option.min_limit else option.minimum
    high = getattr(limits, option.max_limit) if limits is not None and option.max_limit else option.maximum
    return low, high


def check_limits(spec: pb.JobSpec, limits) -> None:
    """The server's range checks of a JobSpec's options: those that a published limit bounds (``Limits.max_steps``,
    ``min_lr``..``max_lr``, ``max_images_per_job``, ``min_image_side``..``max_image_side``) and the job's own (the
    previews), which the engine never sees; the engine checks the fixed bounds of its options. InvalidSpec names
    the field, the value, the range and the limits' names. NaN is in no range. The parts of a message option
    (``exemplar_index.k`` within ``max_exemplar_k``, ``batch_size`` within ``max_index_batch``) are checked when
    it is set."""
    for option, message in _checked(spec):
        limited = option.min_limit or option.max_limit
        if not (limited or (not option.engine and option.type in ("int", "float"))):
            continue
        if option.field.has_presence and not message.HasField(option.name):
            continue
        low, high = bounds(option, limits)
        names = f" ({', '.join(n for n in (option.min_limit, option.max_limit) if n)})" if limited else ""
        if option.type == "size":
            size = spec.size
            if not all(low <= side <= high for side in (size.height, size.width)):
                raise InvalidSpec("spec.size", f"{size.height}x{size.width}; each side must be {low} to {high} pixels"
                                               f"{names}; leave size unset for the model's default",
                                  reason=option.reason)
            continue
        value = getattr(message, option.name)
        if not (math.isfinite(value) and (low is None or low <= value) and (high is None or value <= high)):
            wanted = f"{_number(low)} to {_number(high)}" if high is not None else f">= {_number(low)}"
            default = f"; the default is {option.default}" if option.default is not None else ""
            raise InvalidSpec(option.path, f"{value!r}; {option.name} must be {wanted}{names}{default}",
                              reason=option.reason)


def _checked(spec: pb.JobSpec):
    """(option, the message holding its field) for every declared option and the parts of the set message ones."""
    for option in OPTIONS:
        yield option, spec
        if option.parts and spec.HasField(option.name):
            for part in option.parts:
                yield part, getattr(spec, option.name)


# ------------------------------------------------------------------------------------------------ published


def job_options(limits=None) -> list[pb.JobOption]:
    """The declaration as ``ServerInfo.job_options``: with a server's ``limits``, the bounds are the published
    values."""
    out = []
    for option in OPTIONS:
        low, high = bounds(option, limits)
        message = pb.JobOption(name=option.name, type=option.type, help=option.help, choices=option.choices,
                               flag=option.flag, surfaces=option.surfaces, engine=option.engine,
                               min_limit=option.min_limit or "", max_limit=option.max_limit or "",
                               kinds=option.kinds)
        if option.default is not None:
            message.default = _text(option.default)
        if low is not None:
            message.minimum = float(low)
        if high is not None:
            message.maximum = float(high)
        if option.below is not None:
            message.below = float(option.below)
        out.append(message)
    return out


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _range_text(option: Option) -> str:
    if option.choices:
        return " \\| ".join(f"`{c}`" for c in option.choices)
    low = f"`{option.min_limit}`" if option.min_limit else (_number(option.minimum) if option.minimum is not None
                                                            else None)
    high = f"`{option.max_limit}`" if option.max_limit else (_number(option.maximum) if option.maximum is not None
                                                             else None)
    if option.below is not None:
        return f"{low} to < {_number(option.below)}"
    if low is not None and high is not None:
        return f"{low} to {high}" + (" per side" if option.type == "size" else "")
    return f">= {low}" if low is not None else ""


def markdown_table() -> str:
    """The README's options table (``python -m featureviz.options --markdown``)."""
    rows = ["| option (JobSpec field, client keyword) | jobs | command line | type | default | range or choices "
            "| what |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for option in OPTIONS:
        for row in (option, *option.parts):
            flags = " ".join(f"`{f}`" for f in row.flags) if row.flags else f"`{row.flag}`"
            cli = flags if "render" in row.surfaces or "evaluate" in row.surfaces else "-"
            default = "-" if row.default is None else f"`{_text(row.default)}`"
            name = f"{row.parent}.{row.name}" if row.parent else row.name
            kinds = "all" if set(row.kinds) == set(KINDS) else " ".join(row.kinds)
            rows.append(f"| `{name}` | {kinds} | {cli} | {row.type} | {default} | {_range_text(row)} | "
                        f"{row.help.replace('|', '/')} |")
    return "\n".join(rows)


def declaration_json() -> list[dict]:
    """The declaration as plain data (``python -m featureviz.options --json``; the Node tests read it)."""
    return [{"name": o.name, "type": o.type, "default": o.default, "choices": list(o.choices), "flag": o.flag,
             "flags": list(o.flags) or [o.flag], "minimum": o.minimum, "maximum": o.maximum, "below": o.below,
             "min_limit": o.min_limit, "max_limit": o.max_limit, "surfaces": list(o.surfaces), "engine": o.engine,
             "help": o.help, "kinds": list(o.kinds)} for o in OPTIONS]


def main(argv: list[str] | None = None) -> int:
    import json

    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        print(markdown_table())
    elif args == ["--json"]:
        print(json.dumps(declaration_json(), indent=1))
    else:
        print("usage: python -m featureviz.options --markdown | --json", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

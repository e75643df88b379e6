"""The one conversion between the proto messages and the engine's plain spec dicts.

The engine builds objectives from JSON-able dicts (docs/ARCHITECTURE.md, "Objective spec"): the proto's JSON
mapping, so ``google.protobuf.json_format`` converts them, and ``featureviz.spec.normalize_objective`` (the one
check derived from the kind declarations) checks them on the way. Both directions live here, torch- and grpc-free
(protobuf only), below every part that uses them: the client (``featureviz render --server``), the server, the
worker and the web gateway share one copy (``featureviz.client.convert`` re-exports it for older callers). Problems (no kind set, a vector that is
empty) raise :class:`featureviz.errors.InvalidSpec` naming the proto field path, e.g. ``spec.objective.sum.terms[1]``.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf import json_format

from featureviz.errors import InvalidSpec
from featureviz.errors import echo
from featureviz.options import BY_NAME
from featureviz.options import OPTIONS
from featureviz.options import Option
from featureviz.options import check_value
from featureviz.options import enum_prefix
from featureviz.spec import normalize_objective
from featureviz.v1 import featureviz_pb2 as pb

__all__ = [
    "objective_to_proto",
    "objective_from_proto",
    "spec_to_proto",
    "spec_from_proto",
    "OBJECTIVE_KINDS",
    "PARAM_NAMES",
    "TRANSFORM_NAMES",
    "SCHEDULE_NAMES",
    "judge_from_proto",
    "judge_score_to_proto",
    "judge_score_from_proto",
]

OBJECTIVE_KINDS = tuple(f.name for f in pb.Objective.DESCRIPTOR.oneofs_by_name["kind"].fields)


def _names(option: str) -> dict[int, str]:
    """enum number -> engine name, by the declaration's one naming rule (UNSPECIFIED: no key at all)."""
    field = BY_NAME[option].field
    return {field.enum_type.values_by_name[enum_prefix(field.enum_type) + name.upper()].number: name
            for name in BY_NAME[option].choices}


# derived from the proto enums (featureviz.options), kept for callers of the first releases
PARAM_NAMES = _names("param")
TRANSFORM_NAMES = _names("transforms")
SCHEDULE_NAMES = _names("lr_schedule")

# ------------------------------------------------------------------------------------------------ dict -> proto


def objective_to_proto(spec: dict, field: str = "objective") -> pb.Objective:
    """An engine objective dict (``{"channel": {"layer": "conv1", "channel": 3}}``) -> ``pb.Objective``: checked
    against the declaration (featureviz.spec.KINDS), written as the proto's JSON mapping, parsed by json_format."""
    try:
        return json_format.ParseDict(normalize_objective(spec, field, defaults=False, bare=False), pb.Objective())
    except json_format.ParseError as exc:  # a value the proto cannot hold (an index past int32)
        raise InvalidSpec(field, echo(str(exc))) from None


def spec_to_proto(model: str, objective: dict | pb.Objective | None, **options) -> pb.JobSpec:
    """Job options named as in ``RenderSpec`` (the declaration, :data:`featureviz.options.OPTIONS`; None: the engine
    default) -> ``pb.JobSpec``: each value checked against its declared type, written in the proto's JSON mapping
    (enums by the naming rule: ``param="fft"`` -> ``PARAMETERIZATION_FFT``) and parsed by json_format. ``size``:
    S or (H, W); ``init_image``: PNG/JPEG bytes; ``preprocess``: ``{"mean", "std", "channel_order"}``;
    ``exclusive``: the job never shares a device step (bitwise repeatable for the same seed on the same device);
    ``judge``: the sha256 of an uploaded classifier, or ``{"model": sha256, "preprocess": {...}}``;
    ``exemplar_index``: ``{"dataset", "layers", "k", "batch_size"}``, ``atlas``: ``{"layers", "op_types",
    "min_depth", "max_depth", "channels"}`` (then ``objective`` is None); ``generator``: an uploaded generator's
    sha256 or ``{"model": sha256, "latent_l2": x}`` (with ``param="generator"``). An unknown
    keyword is InvalidSpec naming the known ones."""
    unknown = [name for name in options if name not in BY_NAME]
    if unknown:
        raise InvalidSpec("spec", f"unknown job option {echo(unknown[0])}; known: {', '.join(BY_NAME)}")
    spec = pb.JobSpec(model=model)
    if isinstance(objective, pb.Objective):
        spec.objective.CopyFrom(objective)
    elif objective is not None:  # None: an exemplar_index job (no objective)
        spec.objective.CopyFrom(objective_to_proto(objective))
    for name, value in options.items():
        if value is None:
            continue
        option = BY_NAME[name]
        value = check_value(option, value)
        if option.type in ("image", "judge") and not (value.get("model") if option.type == "judge" else value):
            continue  # no image, no judge
        try:
            json_format.ParseDict({name: _json_value(option, value)}, spec)
        except json_format.ParseError as exc:  # a value the field cannot hold (steps past int32)
            raise InvalidSpec(f"spec.{name}", echo(str(exc))) from None
    return spec


def _json_value(option: Option, value):
    """A checked option value -> the proto's JSON mapping of its field."""
    if option.type == "choice":
        return enum_prefix(option.field.enum_type) + value.upper()
    if option.type == "size":
        return {"height": value[0], "width": value[1]}
    if option.type == "image":
        return base64.b64encode(value).decode("ascii")
    if option.type == "preprocess":
        return json_format.MessageToDict(preprocess_to_proto(value), preserving_proto_field_name=True)
    if option.type in ("exemplar_index", "atlas", "generator"):
        return {key: item for key, item in value.items() if item is not None}
    if option.type == "judge":
        body = {"model": str(value.get("model") or "")}
        if value.get("preprocess"):
            body["preprocess"] = _json_value(BY_NAME["preprocess"], value["preprocess"])
        return body
    if option.type == "float" and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")  # the server refuses it
    return value


def preprocess_to_proto(preprocess: dict) -> pb.Preprocess:
    return pb.Preprocess(
        mean=[float(v) for v in preprocess.get("mean", ())],
        std=[float(v) for v in preprocess.get("std", ())],
        channel_order=str(preprocess.get("channel_order", "")),
    )


# ------------------------------------------------------------------------------------------------ proto -> dict


def objective_from_proto(msg: pb.Objective, field: str = "spec.objective") -> dict:
    """``pb.Objective`` -> the engine's objective dict (json_format, checked against the declaration). Unset
    optional fields are left out (engine defaults)."""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return normalize_objective(data, field, defaults=False)


def spec_from_proto(spec: pb.JobSpec, field: str = "spec") -> dict:
    """``pb.JobSpec`` -> ``RenderSpec`` keyword arguments (plain data; ``init_image`` stays PNG/JPEG bytes and
    ``preprocess`` a dict: the server turns them into engine objects): the declared engine options, read through
    json_format, enums by the naming rule. Unset fields are left out."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True, use_integers_for_enums=True)
    out: dict[str, Any] = {"objective": objective_from_proto(spec.objective, f"{field}.objective")}
    for option in OPTIONS:
        if option.engine and option.name in data:
            value = _engine_value(option, data[option.name], spec, f"{field}.{option.name}")
            if value is not None:
                out[option.name] = value
    return out


def _engine_value(option: Option, value, spec: pb.JobSpec, path: str):
    """One field of MessageToDict's output -> the engine's value (None: the engine default)."""
    if option.type == "choice":
        return option.enum_name(value, path)
    if option.type == "size":
        if spec.size.height <= 0 or spec.size.width <= 0:
            raise InvalidSpec(path, f"height and width must be positive, got {spec.size.height}x{spec.size.width}; "
                                    "leave size unset for the model default")
        return spec.size.height, spec.size.width
    if option.type == "image":
        return bytes(spec.init_image)
    if option.type == "preprocess":
        p = spec.preprocess
        return {"mean": list(p.mean), "std": list(p.std), "channel_order": p.channel_order or "RGB"}
    if option.type == "generator":  # {model, latent_l2}: the worker resolves the model (featureviz.worker.adapter)
        out = {"model": spec.generator.model}
        if spec.generator.HasField("latent_l2"):
            out["latent_l2"] = spec.generator.latent_l2
        return out
    if option.type == "int":
        return int(value)  # int64 is a string in the JSON mapping
    if option.type == "float":
        return float(value)  # "NaN" and "Infinity" too
    return value


def judge_from_proto(spec: pb.JobSpec, field: str = "spec.judge") -> dict | None:
    """``spec.judge`` -> ``{"model": sha256 or "models/{sha256}", "preprocess": dict | None}``, or None if unset."""
    if not spec.HasField("judge"):
        return None
    if not spec.judge.model:
        raise InvalidSpec(f"{field}.model", "name the judge: the sha256 of an uploaded classifier")
    p = spec.judge.preprocess
    preprocess = ({"mean": list(p.mean), "std": list(p.std), "channel_order": p.channel_order or "RGB"}
                  if spec.judge.HasField("preprocess") else None)
    return {"model": spec.judge.model, "preprocess": preprocess}


def judge_score_to_proto(score: dict) -> pb.JudgeScore:
    """A :class:`featureviz.engine.quality.JudgeScore` dict -> ``pb.JudgeScore``."""
    out = pb.JudgeScore()
    for key in ("target", "rank", "probability"):
        if score.get(key) is not None:
            setattr(out, key, score[key])
    for k, p in score.get("top", ()):
        out.top_classes.append(int(k))
        out.top_probabilities.append(float(p))
    return out


def judge_score_from_proto(msg: pb.JudgeScore) -> dict:
    """``pb.JudgeScore`` -> ``{"target", "rank", "probability", "top": [[class, p], ...]}`` (None where unset)."""
    return {key: (getattr(msg, key) if msg.HasField(key) else None) for key in ("target", "rank", "probability")} | {
        "top": [[int(k), float(p)] for k, p in zip(msg.top_classes, msg.top_probabilities)]}

"""The one conversion between the proto messages and the engine's plain spec dicts.

The engine builds objectives from JSON-able dicts (docs/ARCHITECTURE.md, "Objective spec"): the proto's JSON
mapping, so ``google.protobuf.json_format`` converts them, and ``featureviz.spec.normalize_objective`` (the one
check derived from the kind declarations) checks them on the way. Both directions live here, torch- and grpc-free
(protobuf only), below every part that uses them: the client (``featureviz render --server``), the server, the
worker and the web gateway share one copy (``featureviz.client.convert`` re-exports it for older callers). Problems (no kind set, a vector that is
empty) raise :class:`featureviz.errors.InvalidSpec` naming the proto field path, e.g. ``spec.objective.sum.terms[1]``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from featureviz.errors import InvalidSpec
from featureviz.errors import echo
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

# enum value <-> engine name; UNSPECIFIED means "engine default" and maps to no key at all
PARAM_NAMES = {pb.PARAMETERIZATION_FFT: "fft", pb.PARAMETERIZATION_PIXEL: "pixel", pb.PARAMETERIZATION_MACO: "maco",
               pb.PARAMETERIZATION_LAPLACIAN: "laplacian"}
TRANSFORM_NAMES = {pb.TRANSFORMS_STANDARD: "standard", pb.TRANSFORMS_COMPOSED: "composed",
                   pb.TRANSFORMS_NONE: "none"}
SCHEDULE_NAMES = {pb.LR_SCHEDULE_CONSTANT: "constant", pb.LR_SCHEDULE_COSINE: "cosine",
                  pb.LR_SCHEDULE_LINEAR: "linear"}

# ------------------------------------------------------------------------------------------------ dict -> proto


def objective_to_proto(spec: dict, field: str = "objective") -> pb.Objective:
    """An engine objective dict (``{"channel": {"layer": "conv1", "channel": 3}}``) -> ``pb.Objective``: checked
    against the declaration (featureviz.spec.KINDS), written as the proto's JSON mapping, parsed by json_format."""
    try:
        return json_format.ParseDict(normalize_objective(spec, field, defaults=False, bare=False), pb.Objective())
    except json_format.ParseError as exc:  # a value the proto cannot hold (an index past int32)
        raise InvalidSpec(field, echo(str(exc))) from None


def spec_to_proto(
    model: str,
    objective: dict | pb.Objective,
    *,
    steps: int | None = None,
    lr: float | None = None,
    size: int | tuple[int, int] | None = None,
    batch: int | None = None,
    seed: int | None = None,
    param: str | None = None,
    decay: float | None = None,
    transforms: str | None = None,
    init_image: bytes | None = None,
    preprocess: dict | None = None,
    preview_every: int = 0,
    preview_max_side: int = 0,
    exclusive: bool = False,
    judge: str | dict | None = None,
    lr_schedule: str | None = None,
    lr_warmup: int | None = None,
    plateau: float | None = None,
    plateau_window: int | None = None,
) -> pb.JobSpec:
    """Keyword arguments named as in ``RenderSpec`` -> ``pb.JobSpec`` (None: the engine default). ``exclusive``: the
    job never shares a device step (bitwise repeatable for the same seed on the same device). ``judge``: the sha256
    of an uploaded classifier, or ``{"model": sha256, "preprocess": {...}}``."""
    spec = pb.JobSpec(model=model, preview_every=preview_every, preview_max_side=preview_max_side,
                      exclusive=bool(exclusive))
    if isinstance(objective, pb.Objective):
        spec.objective.CopyFrom(objective)
    else:
        spec.objective.CopyFrom(objective_to_proto(objective))
    for key, value in (("steps", steps), ("lr", lr), ("batch", batch), ("seed", seed), ("decay", decay),
                       ("lr_warmup", lr_warmup), ("plateau", plateau), ("plateau_window", plateau_window)):
        if value is not None:
            setattr(spec, key, value)
    if lr_schedule is not None:
        spec.lr_schedule = _enum_value(SCHEDULE_NAMES, lr_schedule, "spec.lr_schedule")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        spec.size.height, spec.size.width = int(height), int(width)
    if param is not None:
        spec.param = _enum_value(PARAM_NAMES, param, "spec.param")
    if transforms is not None:
        spec.transforms = _enum_value(TRANSFORM_NAMES, transforms, "spec.transforms")
    if init_image:
        spec.init_image = bytes(init_image)
    if preprocess is not None:
        spec.preprocess.CopyFrom(preprocess_to_proto(preprocess))
    if judge:
        body = {"model": judge} if isinstance(judge, str) else judge
        spec.judge.model = str(body.get("model") or "")
        if body.get("preprocess"):
            spec.judge.preprocess.CopyFrom(preprocess_to_proto(body["preprocess"]))
    return spec


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
    ``preprocess`` a dict: the server turns them into engine objects). Unset fields are left out."""
    out: dict[str, Any] = {"objective": objective_from_proto(spec.objective, f"{field}.objective")}
    for key in ("steps", "lr", "batch", "seed", "decay", "lr_warmup", "plateau", "plateau_window"):
        if spec.HasField(key):
            out[key] = getattr(spec, key)
    if spec.lr_schedule != pb.LR_SCHEDULE_UNSPECIFIED:
        if spec.lr_schedule not in SCHEDULE_NAMES:
            raise InvalidSpec(f"{field}.lr_schedule", f"unknown value {spec.lr_schedule}; known: "
                              f"{', '.join(pb.LrSchedule.Name(v) for v in SCHEDULE_NAMES)}")
        out["lr_schedule"] = SCHEDULE_NAMES[spec.lr_schedule]
    if spec.HasField("size"):
        if spec.size.height <= 0 or spec.size.width <= 0:
            raise InvalidSpec(f"{field}.size", f"height and width must be positive, got "
                              f"{spec.size.height}x{spec.size.width}; leave size unset for the model default")
        out["size"] = (spec.size.height, spec.size.width)
    if spec.param != pb.PARAMETERIZATION_UNSPECIFIED:
        out["param"] = PARAM_NAMES[spec.param]
    if spec.transforms != pb.TRANSFORMS_UNSPECIFIED:
        out["transforms"] = TRANSFORM_NAMES[spec.transforms]
    if spec.init_image:
        out["init_image"] = bytes(spec.init_image)
    if spec.HasField("preprocess"):
        p = spec.preprocess
        out["preprocess"] = {"mean": list(p.mean), "std": list(p.std), "channel_order": p.channel_order or "RGB"}
    return out


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


# ------------------------------------------------------------------------------------------------ helpers


def _enum_value(names: dict[int, str], name: str, field: str) -> int:
    for value, known in names.items():
        if known == name:
            return value
    raise InvalidSpec(field, f"unknown value {echo(name)}; known: {', '.join(names.values())}")

"""The one conversion between the proto messages and the engine's plain spec dicts.

The engine builds objectives from JSON-able dicts (docs/ARCHITECTURE.md, "Objective spec"); the service
speaks ``featureviz.v1.Objective``. Both directions live here, torch-free, so the client (``featureviz render
--server``) and the server share one copy. Structural problems (no kind set, a vector that is empty) raise
:class:`featureviz.errors.InvalidSpec` naming the proto field path, e.g. ``spec.objective.sum.terms[1]``.
"""

from __future__ import annotations

from typing import Any

from featureviz.errors import InvalidSpec
from featureviz.errors import echo
from featureviz.v1 import featureviz_pb2 as pb

__all__ = [
    "objective_to_proto",
    "objective_from_proto",
    "spec_to_proto",
    "spec_from_proto",
    "OBJECTIVE_KINDS",
    "PARAM_NAMES",
    "TRANSFORM_NAMES",
]

OBJECTIVE_KINDS = tuple(f.name for f in pb.Objective.DESCRIPTOR.oneofs_by_name["kind"].fields)

# enum value <-> engine name; UNSPECIFIED means "engine default" and maps to no key at all
PARAM_NAMES = {pb.PARAMETERIZATION_FFT: "fft", pb.PARAMETERIZATION_PIXEL: "pixel", pb.PARAMETERIZATION_MACO: "maco"}
TRANSFORM_NAMES = {pb.TRANSFORMS_STANDARD: "standard", pb.TRANSFORMS_NONE: "none"}

# kinds whose message is {layer} / {index} / {constant}
_LAYER_KINDS = ("layer", "diversity")
_CLASS_KINDS = ("logit", "prob")
_CONSTANT_KINDS = ("l1", "l2")


# ------------------------------------------------------------------------------------------------ dict -> proto


def objective_to_proto(spec: dict, field: str = "objective") -> pb.Objective:
    """An engine objective dict (``{"channel": {"layer": "conv1", "channel": 3}}``) -> ``pb.Objective``."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise InvalidSpec(field, f"an objective is a dict with exactly one kind key, got {echo(spec)}")
    ((kind, body),) = spec.items()
    if kind not in OBJECTIVE_KINDS:
        raise InvalidSpec(field, f"unknown objective kind {echo(kind)}; known: {', '.join(OBJECTIVE_KINDS)}")
    sub = f"{field}.{kind}"
    out = pb.Objective()
    if kind == "sum":
        if not isinstance(body, (list, tuple)):
            raise InvalidSpec(sub, f"sum takes a list of objectives, got {echo(body)}")
        out.sum.terms.extend(objective_to_proto(term, f"{sub}[{i}]") for i, term in enumerate(body))
        return out
    body = _body(body, sub)
    if kind in ("interpolate",):
        out.interpolate.a.CopyFrom(objective_to_proto(_get(body, "a", sub), f"{sub}.a"))
        out.interpolate.b.CopyFrom(objective_to_proto(_get(body, "b", sub), f"{sub}.b"))
    elif kind in ("scale", "batch"):
        msg = getattr(out, kind)
        if kind == "scale":
            msg.factor = float(_get(body, "factor", sub))
        else:
            msg.index = int(_get(body, "index", sub))
        msg.objective.CopyFrom(objective_to_proto(_get(body, "objective", sub), f"{sub}.objective"))
    else:
        msg = getattr(out, kind)
        msg.SetInParent()  # tv and blur have no fields: the kind must still be set
        for key, value in body.items():
            if value is None:
                continue
            if key not in msg.DESCRIPTOR.fields_by_name:
                known = ", ".join(msg.DESCRIPTOR.fields_by_name)
                raise InvalidSpec(f"{sub}.{key}", f"unknown argument of {kind}; known: {known or 'none'}")
            if key == "vector":
                msg.vector.extend(float(v) for v in value)
            else:
                setattr(msg, key, value)
    return out


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
) -> pb.JobSpec:
    """Keyword arguments named as in ``RenderSpec`` -> ``pb.JobSpec`` (None: the engine default). ``exclusive``: the
    job never shares a device step (bitwise repeatable for the same seed on the same device)."""
    spec = pb.JobSpec(model=model, preview_every=preview_every, preview_max_side=preview_max_side,
                      exclusive=bool(exclusive))
    if isinstance(objective, pb.Objective):
        spec.objective.CopyFrom(objective)
    else:
        spec.objective.CopyFrom(objective_to_proto(objective))
    for key, value in (("steps", steps), ("lr", lr), ("batch", batch), ("seed", seed), ("decay", decay)):
        if value is not None:
            setattr(spec, key, value)
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
    return spec


def preprocess_to_proto(preprocess: dict) -> pb.Preprocess:
    return pb.Preprocess(
        mean=[float(v) for v in preprocess.get("mean", ())],
        std=[float(v) for v in preprocess.get("std", ())],
        channel_order=str(preprocess.get("channel_order", "")),
    )


# ------------------------------------------------------------------------------------------------ proto -> dict


def objective_from_proto(msg: pb.Objective, field: str = "spec.objective") -> dict:
    """``pb.Objective`` -> the engine's objective dict. Unset optional fields are left out (engine defaults)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidSpec(field, f"no objective kind set; set one of: {', '.join(OBJECTIVE_KINDS)}")
    sub = f"{field}.{kind}"
    body = getattr(msg, kind)
    if kind == "sum":
        if not body.terms:
            raise InvalidSpec(f"{sub}.terms", "a sum needs at least one term")
        return {"sum": [objective_from_proto(t, f"{sub}.terms[{i}]") for i, t in enumerate(body.terms)]}
    if kind == "interpolate":
        return {"interpolate": {"a": objective_from_proto(body.a, f"{sub}.a"),
                                "b": objective_from_proto(body.b, f"{sub}.b")}}
    if kind == "scale":
        return {"scale": {"factor": body.factor, "objective": objective_from_proto(body.objective, f"{sub}.objective")}}
    if kind == "batch":
        return {"batch": {"index": body.index, "objective": objective_from_proto(body.objective, f"{sub}.objective")}}
    out: dict[str, Any] = {}
    for fd in body.DESCRIPTOR.fields:
        if fd.has_presence and not body.HasField(fd.name):
            continue
        value = getattr(body, fd.name)
        if fd.name == "vector":
            if not value:
                raise InvalidSpec(f"{sub}.vector", "the direction vector is empty; give one value per channel")
            value = [float(v) for v in value]
        out[fd.name] = value
    if "y" in out and "x" not in out:
        raise InvalidSpec(f"{sub}.x", "give both x and y, neither (centre), or x alone (a token index of a token "
                                      "tensor)")
    return {kind: out}


def spec_from_proto(spec: pb.JobSpec, field: str = "spec") -> dict:
    """``pb.JobSpec`` -> ``RenderSpec`` keyword arguments (plain data; ``init_image`` stays PNG/JPEG bytes and
    ``preprocess`` a dict: the server turns them into engine objects). Unset fields are left out."""
    out: dict[str, Any] = {"objective": objective_from_proto(spec.objective, f"{field}.objective")}
    for key in ("steps", "lr", "batch", "seed", "decay"):
        if spec.HasField(key):
            out[key] = getattr(spec, key)
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


# ------------------------------------------------------------------------------------------------ helpers


def _body(body: Any, field: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidSpec(field, f"expected a dict of arguments, got {echo(body)}")
    return body


def _get(body: dict, key: str, field: str) -> Any:
    if key not in body:
        raise InvalidSpec(f"{field}.{key}", "missing")
    return body[key]


def _enum_value(names: dict[int, str], name: str, field: str) -> int:
    for value, known in names.items():
        if known == name:
            return value
    raise InvalidSpec(field, f"unknown value {echo(name)}; known: {', '.join(names.values())}")

"""The atlas job's server side (no torch): its units, their content-addressed keys and its progress.

An atlas (``JobSpec.atlas``) is one job row; its units (one per channel of each selected layer, resolved by the
worker's admission: ``featureviz.worker.adapter.atlas_admission``) are rows of ``Store.atlas_units``. Each unit is
rendered as a batch-1 render of the objective ``channel(layer, c)`` with the atlas's render options
(:func:`unit_spec`), submitted by the scheduler as a *background* slot (``Submission.background``: it takes only
the room interactive jobs leave in a device step). A finished unit's PNG, objective value and device seconds are
stored at once under :func:`unit_key` (``Store.unit_renders``), so a restart resumes with the units not done, and
any later atlas unit or interactive batch-1 channel render with the same key is served from the store.
"""

from __future__ import annotations

import hashlib
import json

from featureviz.options import BY_NAME
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["unit_spec", "unit_key", "render_key", "progress", "UNIT_RENDERED", "UNIT_CACHED", "UNIT_FAILED",
           "unit_job_id", "parse_unit_job_id", "RENDER", "NEGATIVE", "DIVERSITY", "variant_spec", "variant_key",
           "variants_of", "image_key", "DIVERSITY_WEIGHT"]

UNIT_RENDERED, UNIT_CACHED, UNIT_FAILED = 1, 2, 3
# a unit's renders (pb.AtlasVariant numbers): the render, its negative (the channel minimised), its diversity set
RENDER, NEGATIVE, DIVERSITY = pb.ATLAS_VARIANT_RENDER, pb.ATLAS_VARIANT_NEGATIVE, pb.ATLAS_VARIANT_DIVERSITY
# lucid's diversity weight (``channel - 1e2 * diversity``; featureviz's diversity term has the maximising sign)
DIVERSITY_WEIGHT = 100.0

# the JobSpec fields a unit's render reads besides its objective (the render options an atlas takes)
_RENDER_FIELDS = ("steps", "lr", "size", "seed", "param", "decay", "transforms", "preprocess", "lr_schedule",
                  "lr_warmup", "plateau", "plateau_window")
# fields that make a render something else than a plain unit (an interactive job with any of them never hits)
_OTHER_FIELDS = ("init_image", "judge", "exemplar_index", "atlas", "exclusive")  # exclusive: bitwise alone


def unit_job_id(atlas_id: str, index: int, variant: int = RENDER) -> str:
    """The id a unit's render (or variant render) has on the worker (never a job row)."""
    return f"{atlas_id}:{index}" if variant == RENDER else f"{atlas_id}:{index}:{variant}"


def parse_unit_job_id(job_id: str) -> tuple[str, int] | None:
    atlas_id, sep, index = job_id.partition(":")
    index = index.partition(":")[0]
    return (atlas_id, int(index)) if sep and index.isdigit() else None


def variants_of(atlas: pb.JobSpec) -> list[int]:
    """The variant renders each unit of this atlas takes besides its render (AtlasSpec.negative, .diversity)."""
    return ([NEGATIVE] if atlas.atlas.negative else []) + ([DIVERSITY] if atlas.atlas.diversity > 0 else [])


def variant_spec(atlas: pb.JobSpec, layer: str, channel: int, variant: int) -> pb.JobSpec:
    """The render of one of a unit's variants: the unit's spec with the objective -channel (NEGATIVE: scale -1), or
    channel + DIVERSITY_WEIGHT * diversity(layer) over a batch of AtlasSpec.diversity images (DIVERSITY: lucid's
    diversity set, the Gram-matrix term on the unit's own layer)."""
    spec = unit_spec(atlas, layer, channel)
    if variant == RENDER:
        return spec
    channel_objective = pb.Objective()
    channel_objective.CopyFrom(spec.objective)
    spec.ClearField("objective")
    if variant == NEGATIVE:
        spec.objective.scale.factor = -1.0
        spec.objective.scale.objective.CopyFrom(channel_objective)
    elif variant == DIVERSITY:
        spec.batch = atlas.atlas.diversity
        spec.objective.sum.terms.append(channel_objective)
        term = spec.objective.sum.terms.add()
        term.scale.factor = DIVERSITY_WEIGHT
        term.scale.objective.diversity.layer = layer
    else:
        raise ValueError(f"unknown atlas variant {variant}")
    return spec


def variant_key(model: str, atlas: pb.JobSpec, layer: str, channel: int, variant: int) -> str:
    """The content key of a unit's variant render: the unit's key material (every render option, seed) with the
    variant (and the diversity set's size) added, so an identical variant of any atlas is the same key."""
    if variant == RENDER:
        return unit_key(model, atlas, layer, channel)
    spec = unit_spec(atlas, layer, channel)
    extra = {"variant": pb.AtlasVariant.Name(variant)}
    if variant == DIVERSITY:
        extra["images"], extra["weight"] = int(atlas.atlas.diversity), DIVERSITY_WEIGHT
    return render_key(model, spec, (spec.size.height, spec.size.width), extra=extra)


def image_key(key: str, image: int) -> str:
    """The unit_renders key of image ``image`` of a diversity set stored under ``key``."""
    return f"{key}/{image}"


def unit_spec(atlas: pb.JobSpec, layer: str, channel: int) -> pb.JobSpec:
    """The render of one unit: the atlas's stored spec without ``atlas``, batch 1, objective channel(layer, c)."""
    spec = pb.JobSpec()
    spec.CopyFrom(atlas)
    spec.ClearField("atlas")
    spec.batch = 1
    spec.objective.channel.layer, spec.objective.channel.channel = layer, channel
    return spec


def render_key(model: str, spec: pb.JobSpec, default_size: tuple[int, int], extra: dict | None = None) -> str | None:
    """The content key of a batch-1 render of one channel: sha256 of (model, layer, channel, every render option
    with the declared defaults filled in, seed); None when the job is not such a render (another objective, a batch,
    an init image, a judge...). ``default_size``: the model's input size, for a spec that leaves size unset."""
    if spec.HasField("batch") and spec.batch != 1:
        return None
    if spec.objective.WhichOneof("kind") != "channel" or any(_set(spec, name) for name in _OTHER_FIELDS):
        return None
    values: dict = {"model": model, "layer": spec.objective.channel.layer, "channel": spec.objective.channel.channel}
    for name in _RENDER_FIELDS:
        option = BY_NAME[name]
        if name == "size":
            values[name] = [spec.size.height, spec.size.width] if spec.HasField("size") else list(default_size)
        elif name == "preprocess":
            p = spec.preprocess
            values[name] = {"mean": [float(v) for v in p.mean], "std": [float(v) for v in p.std],
                            "channel_order": p.channel_order or "RGB"} if spec.HasField("preprocess") else None
        elif option.type == "choice":
            number = getattr(spec, name)
            values[name] = option.enum_name(number) if number else option.default
        elif option.field.has_presence and not spec.HasField(name):
            values[name] = option.default
        else:
            values[name] = getattr(spec, name)
    if not values["plateau"]:
        values["plateau"], values["plateau_window"] = 0.0, None  # the window means nothing without the stop
    # a learned prior's dataset id (a set's images never change) and a generator's sha256 with its latent penalty; a
    # key without them has no such entries, as before they existed
    if spec.prior_dataset:
        values["prior_dataset"] = spec.prior_dataset
    if spec.HasField("generator"):
        values["generator"] = {"model": spec.generator.model.removeprefix("models/"),
                               "latent_l2": spec.generator.latent_l2 if spec.generator.HasField("latent_l2") else 0.0}
    if extra:  # a unit's variant (variant_key): the same key material with the variant named
        values.update(extra)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def unit_key(model: str, atlas: pb.JobSpec, layer: str, channel: int) -> str:
    """A unit's key (the atlas's stored spec has its size)."""
    spec = unit_spec(atlas, layer, channel)
    return render_key(model, spec, (spec.size.height, spec.size.width))


def _set(spec: pb.JobSpec, name: str) -> bool:
    field = pb.JobSpec.DESCRIPTOR.fields_by_name[name]
    return spec.HasField(name) if field.has_presence else bool(getattr(spec, name))


def progress(store, job_id: str, *, start_time: float | None = None, finished: bool = False) -> pb.AtlasResult:
    """An atlas's progress per layer and in total, with the measured rate of the units rendered for it (first to
    last finished unit, counted from ``start_time`` when there is one) and the ETA of the rest at that rate."""
    out = pb.AtlasResult()
    for layer, depth, units, rendered, cached, failed, seconds in store.atlas_layers(job_id):
        rendered, cached, failed = int(rendered or 0), int(cached or 0), int(failed or 0)
        out.layers.add(layer=layer, depth=int(depth), units=int(units), done=rendered + cached)
        out.units += int(units)
        out.rendered += rendered
        out.cached += cached
        out.failed += failed
        out.device_seconds += float(seconds or 0.0)
    out.done = out.rendered + out.cached
    count, first, last = store.atlas_rendered_times(job_id)
    begin = start_time if start_time else first
    if count and begin is not None and last is not None and last > begin:
        out.units_per_hour = count / (last - begin) * 3600.0
    left = out.units - out.done - out.failed
    if left > 0 and out.units_per_hour > 0 and not finished:
        out.eta_seconds = left / out.units_per_hour * 3600.0
    out.variants_done = store.variant_counts(job_id)[1]
    join = store.atlas_join(job_id)
    if join is not None:
        out.index_job = f"jobs/{join[1]}"
        out.joined = store.joined_units(job_id, join[2])
    return out


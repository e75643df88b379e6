"""JobSpec <-> engine: the one conversion and check of a job's spec (a RenderSpec with its init image decoded and
its Preprocess built, checked into a CheckedSpec), and of a render's images into PNG messages."""

from __future__ import annotations

from featureviz.codec import spec_from_proto
from featureviz.errors import InvalidSpec
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["checked_spec", "generator_of", "rendered", "job_result", "judge_of", "judge_check", "judge_scores", "DEFAULT_PREVIEW_SIDE",
           "index_admission", "index_result", "atlas_admission"]

DEFAULT_PREVIEW_SIDE = 128


def checked_spec(model, spec: pb.JobSpec, device: str | None, *, max_image_side: int = 4096,
                 priors: dict | None = None, learned=None, models=None,
                 match_targets=None):
    """pb.JobSpec -> the engine's RenderSpec checked against ``model``: the :class:`featureviz.engine.CheckedSpec`
    (objective built, transforms parsed) that the job's slot takes as it is (InvalidSpec with engine paths).
    ``priors`` (dataset id -> api.PriorSource, the server's) and ``learned`` (a :class:`featureviz.worker.priors.
    Priors`): ``spec.prior_dataset`` becomes the set's ImageStats (``RenderSpec.prior``), and ``prior:DATASET`` terms
    resolve to its patch prior (``RenderSpec.patch_priors``), for the model's channel count.
    ``models(sha256)``: the imported model of another sha256 (the worker's cache), for ``spec.generator``.
    ``match_targets``: the resolver of the objective's ``match`` terms (``featureviz.worker.matching``)."""
    from featureviz.engine import RenderSpec
    from featureviz.engine import validate
    from featureviz.engine.images import decode_image
    from featureviz.importer import Preprocess

    kwargs = spec_from_proto(spec)
    kwargs.pop("exclusive", None)
    kwargs.pop("judge", None)
    if getattr(model, "generator", None) is not None:  # a generator is a parameterization, not a model to render
        raise InvalidSpec("spec.model", "this model is a generator (a latent vector in, an image out): render a "
                                        "classifier, and name the generator as spec.generator with param generator")
    if "generator" in kwargs:  # --- generator (issue 25): the uploaded generator from the worker's model cache
        kwargs.update(generator_of(kwargs.pop("generator"), models))
    if "init_image" in kwargs:
        size = kwargs.get("size") or tuple(model.input_spec.default_size)
        kwargs["init_image"] = decode_image(kwargs["init_image"], size, field="spec.init_image",
                                            max_side=max_image_side)
    if "preprocess" in kwargs:
        p = kwargs["preprocess"]
        try:
            kwargs["preprocess"] = Preprocess(mean=tuple(p["mean"]), std=tuple(p["std"]),
                                              channel_order=p["channel_order"])
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec.preprocess", str(exc)) from exc
    if learned is not None and (priors or spec.prior_dataset):  # a prior_dataset without its source is NOT_FOUND,
        kwargs |= _priors(model, spec, priors or {}, learned)  # never a render with ImageNet's statistics
    result = RenderSpec(**kwargs, device=device, match_targets=match_targets)  # match: exemplar matching
    if spec.preview_every > 0:
        result.snapshot_steps = tuple(range(spec.preview_every, result.steps + 1, spec.preview_every))
    return validate(model, result)


def _priors(model, spec: pb.JobSpec, priors: dict, learned) -> dict:
    """The RenderSpec's ``prior`` and ``patch_priors`` of a job's prior datasets (learned here on first use)."""
    from featureviz.errors import NotFound

    channels = model.input_spec.channels
    out: dict = {}

    def source(name: str, field: str):
        found = priors.get(name.removeprefix("datasets/").strip().lower())
        if found is None:  # the server resolves every set the spec names; anything else is not the tenant's
            raise NotFound(f"{field}: no dataset {name[:80]!r} for a prior", reason="DATASET_NOT_FOUND")
        return found

    if spec.prior_dataset:
        out["prior"] = learned.stats(source(spec.prior_dataset, "spec.prior_dataset"), channels)
    out["patch_priors"] = lambda name: learned.patch(source(name, "spec.objective.prior.dataset"), channels)
    return out


def generator_of(value: dict, models) -> dict:
    """``spec.generator`` ({model, latent_l2}) -> the RenderSpec's ``generator`` (the imported generator) and
    ``latent_l2``; InvalidSpec when the model is not a generator (the server checked the tenant holds it)."""
    sha = value["model"].removeprefix("models/")
    if models is None:
        raise InvalidSpec("spec.generator", "this worker cannot resolve a generator here")
    imported = models(sha)
    if getattr(imported, "generator", None) is None:
        raise InvalidSpec("spec.generator.model", f"model {sha} is not a generator: a generator's input is a latent "
                                                  "vector (N, Z) or (N, Z, 1, 1) and its output an image")
    return {"generator": imported, "latent_l2": float(value.get("latent_l2", 0.0))}


def rendered(index: int, image, *, max_side: int | None = None, start: float = 0.0,
             end: float = 0.0) -> pb.RenderedImage:
    """(3, H, W) float tensor in [0, 1] -> a RenderedImage with PNG bytes (downscaled to ``max_side``)."""
    from featureviz.engine.images import png_bytes

    png = png_bytes(image, max_side=max_side)
    height, width = image.shape[-2:]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        width, height = _png_size(png, width, height)
    return pb.RenderedImage(index=index, png=png, width=int(width), height=int(height), objective_start=start,
                            objective_end=end)


def _png_size(png: bytes, width: int, height: int) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR), the truth after a downscale."""
    if len(png) >= 24 and png[12:16] == b"IHDR":
        return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return width, height


def judge_of(spec: pb.JobSpec) -> tuple[str, object] | None:
    """``(judge sha256, Preprocess or None)`` of a job with a judge, else None."""
    from featureviz.codec import judge_from_proto

    judge = judge_from_proto(spec)
    if judge is None:
        return None
    preprocess = None
    if judge["preprocess"] is not None:
        from featureviz.importer import Preprocess

        p = judge["preprocess"]
        try:
            preprocess = Preprocess(mean=tuple(p["mean"]), std=tuple(p["std"]), channel_order=p["channel_order"])
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec.judge.preprocess", str(exc)) from exc
    return judge["model"].removeprefix("models/"), preprocess


def judge_check(judge, checked) -> None:
    """InvalidSpec (``spec.judge``) unless ``judge`` is a classifier that has every class the images aim at
    (``checked``: the job's CheckedSpec)."""
    from featureviz.engine.quality import class_targets

    if not judge.logits:
        raise InvalidSpec("spec.judge", "the judge model has no logits output: a judge must be a classifier")
    classes = judge.layer(judge.logits).channels
    for i, target in enumerate(class_targets(checked.objective, checked.spec.batch)):
        if target is not None and target >= classes:
            raise InvalidSpec("spec.judge", f"image {i} aims at class {target}, but the judge has {classes} classes")


def judge_scores(judge, preprocess, checked, images, device=None) -> list[dict]:
    """The judge's verdict on each image (JudgeScore dicts), targets read from the render's built objective
    (``checked``: the job's CheckedSpec)."""
    from featureviz.engine.quality import class_targets
    from featureviz.engine.quality import judge_images

    targets = class_targets(checked.objective, images.shape[0])
    return [s.to_dict() for s in judge_images(judge, images, targets, preprocess=preprocess, device=device)]


def job_result(result: dict) -> pb.JobResult:
    """A render's result (BatchEngine.finish's dict, with ``judge`` verdicts when the job has a judge) -> JobResult
    with PNG bytes."""
    from featureviz.codec import judge_score_to_proto

    images = [rendered(i, image, start=float(result["objective_start"][i]), end=float(result["objective_end"][i]))
              for i, image in enumerate(result["images"])]
    for image, verdict in zip(images, result.get("judge") or ()):
        image.judge.CopyFrom(judge_score_to_proto(verdict))
    out = pb.JobResult(images=images, steps_done=int(result["steps_done"]),
                       seconds_per_step=float(result["seconds_per_step"]),
                       objective_description=str(result.get("objective", "") or ""),
                       stopped_at=int(result.get("stopped_at", 0) or 0),
                       device_seconds=float(result.get("device_seconds", 0.0) or 0.0))
    for key, value in (result.get("phase_seconds") or {}).items():
        out.phase_seconds[key] = float(value)
    return out


# ------------------------------------------------------------------------------------------------ exemplar index


def index_admission(model, spec: pb.JobSpec, *, max_k: int = 100):
    """An exemplar index job's spec resolved against ``model`` before any compute: the layers (catalog names; an
    unknown one is InvalidSpec naming it and its close matches; none given: every catalog layer with channels), the
    input size (the model's default unless set; a fixed input side must match), the preprocessing (the model's
    unless set), k and batch_size (their declared defaults) -> :class:`featureviz.worker.api.Admission`."""
    from featureviz.engine.exemplars import index_layers
    from featureviz.errors import NotFound
    from featureviz.importer import Preprocess
    from featureviz.options import BY_NAME
    from featureviz.worker.api import Admission

    index = spec.exemplar_index
    layers = list(index.layers) or None
    try:
        names = index_layers(model, layers)
    except NotFound as err:
        bad = next((i for i, name in enumerate(layers or ()) if _missing(model, name)), 0)
        raise InvalidSpec(f"spec.exemplar_index.layers[{bad}]", str(err), reason="LAYER_NOT_FOUND") from err
    except InvalidSpec as err:
        raise InvalidSpec("spec.exemplar_index.layers", err.description, reason=err.reason) from err
    if not names:
        raise InvalidSpec("spec.exemplar_index.layers", "the model has no layer with channels to index")
    order = {info.name: i for i, info in enumerate(model.layers)}
    names = sorted(names, key=order.__getitem__)  # catalog order: the same set of layers is the same index
    inputs = model.input_spec
    size = (spec.size.height, spec.size.width) if spec.HasField("size") else tuple(inputs.default_size)
    for axis, fixed, want in (("height", inputs.height, size[0]), ("width", inputs.width, size[1])):
        if fixed is not None and fixed != want:
            raise InvalidSpec("spec.size", f"the model's input {axis} is fixed at {fixed}; got {want}")
    if spec.HasField("preprocess"):
        p = spec.preprocess
        try:
            preprocess = Preprocess(mean=tuple(p.mean), std=tuple(p.std), channel_order=p.channel_order or "RGB")
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec.preprocess", str(exc)) from exc
    else:
        preprocess = inputs.preprocess
    try:
        preprocess = preprocess.for_channels(inputs.channels)
    except (TypeError, ValueError) as exc:
        raise InvalidSpec("spec.preprocess", str(exc)) from exc
    parts = {part.name: part for part in BY_NAME["exemplar_index"].parts}
    k = index.k if index.HasField("k") else parts["k"].default
    batch_size = index.batch_size if index.HasField("batch_size") else parts["batch_size"].default
    if not 1 <= k <= max_k:
        raise InvalidSpec("spec.exemplar_index.k", f"k must be 1..{max_k}, got {k}")
    return Admission(ticket="", kind="exemplar_index", layers=names, size=(int(size[0]), int(size[1])),
                     preprocess={"mean": [float(v) for v in preprocess.mean], "std": [float(v) for v in preprocess.std],
                                 "channel_order": preprocess.channel_order},
                     k=int(k), batch_size=int(batch_size),
                     channels=sum(int(model.layer(name).channels) for name in names))


def _missing(model, name: str) -> bool:
    from featureviz.errors import NotFound

    try:
        model.layer(name)
        return False
    except NotFound:
        return True


def index_result(index, work) -> pb.JobResult:
    """A finished pass (an ExemplarIndex) of ``work`` (api.IndexWork) -> JobResult with ``exemplar_index``."""
    meta = index.meta
    info = pb.ExemplarIndexResult(index=work.index, dataset=work.dataset, layers=list(index.layers),
                                  images=int(meta["indexed"]),
                                  skipped=sum(int(v["count"]) for v in meta["skipped"].values()), k=int(meta["k"]),
                                  size=pb.ImageSize(height=int(meta["size"][0]), width=int(meta["size"][1])),
                                  cached=False, channels=sum(int(c) for c in meta["channels"].values()))
    return pb.JobResult(exemplar_index=info, steps_done=int(meta["position"]))


# ------------------------------------------------------------------------------------------------ atlas


def atlas_admission(model, spec: pb.JobSpec, *, max_units: int | None = None):
    """An atlas job's spec resolved against ``model`` before any compute: the selected layers (catalog order; by
    names, op types and a depth range, all of them applying; none given: every catalog layer with channels), the
    units per layer (its channels, or the first ``spec.atlas.channels``) and the render size (``spec.size`` as a
    render takes it; unset: the model's fixed input side, else the atlas default 128). A selection matching nothing, or more units than ``max_units``, is
    InvalidSpec naming it; a unit's render spec is checked once here (its size, preprocessing, options)."""
    from featureviz.engine.exemplars import index_layers
    from featureviz.errors import NotFound
    from featureviz.worker.api import Admission

    atlas = spec.atlas
    names = list(atlas.layers)
    try:
        chosen = index_layers(model, names or None)
    except NotFound as err:
        bad = next((i for i, name in enumerate(names) if _missing(model, name)), 0)
        raise InvalidSpec(f"spec.atlas.layers[{bad}]", str(err), reason="LAYER_NOT_FOUND") from err
    except InvalidSpec as err:
        raise InvalidSpec("spec.atlas.layers", err.description, reason=err.reason) from err
    infos = [model.layer(name) for name in chosen]
    if atlas.op_types:
        wanted = {op.lower() for op in atlas.op_types}
        infos = [info for info in infos if info.op_type.lower() in wanted]
    if atlas.HasField("min_depth"):
        infos = [info for info in infos if info.depth >= atlas.min_depth]
    if atlas.HasField("max_depth"):
        infos = [info for info in infos if info.depth <= atlas.max_depth]
    if not infos:
        from featureviz.errors import echo

        said = "; ".join(part for part in (
            f"layers {echo(names)}" if names else "", f"op types {echo(list(atlas.op_types))}" if atlas.op_types
            else "", f"depth >= {atlas.min_depth}" if atlas.HasField("min_depth") else "",
            f"depth <= {atlas.max_depth}" if atlas.HasField("max_depth") else "") if part) or "every layer"
        ops = sorted({info.op_type for info in model.layers if info.channels})
        raise InvalidSpec("spec.atlas", f"the layer selection ({said}) matches no layer with channels; the model's "
                                        f"op types: {echo(', '.join(ops))}; depths 0..{len(model.layers) - 1}",
                          reason="EMPTY_SELECTION")
    order = {info.name: i for i, info in enumerate(model.layers)}
    infos.sort(key=lambda info: order[info.name])
    limit = atlas.channels if atlas.HasField("channels") and atlas.channels > 0 else None
    units = [min(int(info.channels), limit) if limit else int(info.channels) for info in infos]
    total = sum(units)
    if max_units is not None and total > max_units:
        raise InvalidSpec("spec.atlas", f"{total} units ({len(infos)} layers); the limit is max_atlas_units = "
                                        f"{max_units}: select fewer layers or set channels", reason="TOO_MANY_UNITS")
    inputs = model.input_spec
    if spec.HasField("size"):  # as a render's: a fixed-size model sees the image resized to its input
        size = (spec.size.height, spec.size.width)
    else:  # the atlas default, or the model's fixed input side
        from featureviz.options import ATLAS_DEFAULTS

        size = (inputs.height or ATLAS_DEFAULTS["size"], inputs.width or ATLAS_DEFAULTS["size"])
    return Admission(ticket="", kind="atlas", layers=[info.name for info in infos], size=(int(size[0]), int(size[1])),
                     units=units, depths=[int(info.depth) for info in infos], channels=total)

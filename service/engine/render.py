"""The render loop: parameters -> image -> transforms + preprocessing -> truncated model -> objective -> Adam.

:func:`validate` checks a :class:`RenderSpec` against a model before any compute and raises
:class:`InvalidSpec` naming the field, or returns a :class:`CheckedSpec` holding what it built (the objective,
the transform steps), which a slot takes without parsing the spec again; :func:`render` runs the optimisation
and returns a :class:`RenderResult`. The loop maximises the objective (it negates it exactly once), draws all
randomness from one ``torch.Generator`` seeded with ``spec.seed`` (same seed and device, same images), checks
``cancel`` every step, reports ``progress`` and ``snapshot`` to callbacks, and times its phases. The backward
pass is cut at the model input and at the image (free ``detach`` points), so the model, the transforms and the
parameterization are timed separately without extra compute.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from dataclasses import field

import torch

from featureviz import spec as specs
from featureviz.engine import layout as layouts
from featureviz.engine import objectives as objs
from featureviz.engine.batch import BatchEngine
from featureviz.engine.batch import CheckedSpec
from featureviz.engine.batch import Slot
from featureviz.engine.batch import image_size
from featureviz.engine.batch import model_size
from featureviz.engine.params import PARAMS
from featureviz.engine.schedule import DEFAULT_PLATEAU_WINDOW
from featureviz.engine.schedule import SCHEDULES
from featureviz.engine.transforms import parse_transforms
from featureviz.errors import InvalidSpec
from featureviz.errors import NotFound
from featureviz.errors import echo

__all__ = ["RenderSpec", "RenderResult", "CheckedSpec", "render", "validate", "MAX_STEPS",
           "MAX_IMAGES_PER_RENDER", "MAX_SIZE"]

MAX_STEPS = 100_000
MAX_IMAGES_PER_RENDER = 256  # the engine's bound on spec.batch (a server's Limits.max_images_per_job is lower)
MAX_SIZE = 4096
MIN_SIZE = 8
RELU_WARMUP_STEPS = 16  # lucid's default for the redirected ReLU gradient


@dataclass
class RenderSpec:
    """What to render. ``objective`` is a spec dict (docs/ARCHITECTURE.md) or an :class:`Objective`.

    ``size``: int or (H, W) of the optimised image (default: the model's default input size); the model sees it
    resized to its input size when that is fixed. ``decay``: spectrum exponent (default 1.0 for fft, 1.4 for
    maco). ``init_image``: (3, H, W) or (B, 3, H, W) tensor in [0, 1] to start from. ``preprocess``: an object
    with ``mean``, ``std``, ``channel_order`` (default: the model's). ``relu_warmup``: steps of redirected ReLU
    gradient at the start. ``profile``: synchronise CUDA at phase boundaries so ``phase_seconds`` is exact.
    ``memory_format``: ``auto`` (channels_last on the CPU when the model has convolutions and passes the probe
    of :mod:`featureviz.engine.layout`), ``channels_last`` (the same probe, on any device) or ``contiguous``.
    ``lr_schedule``: ``constant``, ``cosine`` or ``linear`` decay of ``lr`` over ``steps``, after ``lr_warmup``
    steps of linear warm-up (:mod:`featureviz.engine.schedule`). ``plateau``: stop early once the objective's
    relative gain over the last ``plateau_window`` steps (against the window before) is below this (0: never);
    ``RenderResult.stopped_at`` says after which step.

    Learned priors (:mod:`featureviz.engine.priors`, engine-level: the Python API and the local CLI): ``prior`` is
    an image set's :class:`~featureviz.engine.priors.ImageStats` (or its ``to_dict``): its colour matrix replaces
    ImageNet's and, for ``fft``, its fitted decay the 1/f scale (unless ``decay`` is given). ``patch_priors``
    resolves the objective's ``prior:DATASET`` terms: a mapping or a callable ``name -> PatchPrior`` (raising
    ``NotFound`` for a name it does not hold); names are only looked up, never opened as paths.

    ``param="generator"`` optimizes the latents of ``generator`` (an imported generator: a latent vector in, an image
    of the model's channel count out) instead of pixels; ``latent_l2`` penalizes their squared norm.
    """

    objective: object
    steps: int = 512
    lr: float = 0.05
    size: int | tuple[int, int] | None = None
    batch: int = 1
    seed: int = 0
    param: str = "fft"
    decay: float | None = None
    transforms: object = "standard"
    init_image: object = None
    preprocess: object = None
    snapshot_steps: tuple[int, ...] = ()
    device: str | None = None
    relu_warmup: int = RELU_WARMUP_STEPS
    profile: bool = False
    memory_format: str = "auto"
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    plateau: float = 0.0
    plateau_window: int = DEFAULT_PLATEAU_WINDOW
    prior: object = None
    patch_priors: object = None
    # param generator (issue 25): the generator (featureviz.engine.params.Generator, or an imported generator) and the
    # L2 penalty on its latents (the objective minus latent_l2 * |z|^2 per image)
    generator: object = None
    latent_l2: float = 0.0
    # exemplar matching (issue 25 item 4): resolves the objective's ``match`` terms; a callable
    # ``(term, layer=, match_layer=, size=, preprocess=) -> featureviz.engine.matching.MatchTargets`` (catalog
    # names; size: the model input (H, W)), raising NotFound / InvalidSpec; terms bound in Python keep their targets
    match_targets: object = None


@dataclass
class RenderResult:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1], CPU
    objective_start: list[float]  # per image, before the first step (pads and resize, no random transforms)
    objective_end: list[float]  # per image, after the last step (pads and resize, no random transforms)
    seconds_per_step: float
    phase_seconds: dict[str, float] = field(default_factory=dict)  # param, transforms, model, optimizer
    steps_done: int = 0
    cancelled: bool = False
    objective: str = ""  # description
    memory_format: str = "contiguous"  # the layout the model ran in: channels_last or contiguous
    stopped_at: int = 0  # the step after which the plateau stop ended the render (0: it ran its steps)
    # its share of the device steps it took part in: each step's seconds x its images / the step's images (alone:
    # every step's whole time), so the shares of the renders that shared steps add up to the steps' time
    device_seconds: float = 0.0


_size = image_size
_model_size = model_size


def _int(value, path, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec(path, f"must be an integer in [{low}, {high}], got {value!r}")


def validate(model, spec: RenderSpec) -> CheckedSpec:
    """Raise :class:`InvalidSpec` for anything wrong in ``spec`` for ``model``, before any compute; else return the
    :class:`CheckedSpec` (the objective built and the transforms parsed once) that a Slot or :func:`render`
    takes as it is."""
    _int(spec.steps, "steps", 1, MAX_STEPS)
    _int(spec.batch, "batch", 1, MAX_IMAGES_PER_RENDER)
    _int(spec.seed, "seed", 0, 2**63 - 1)
    _int(spec.relu_warmup, "relu_warmup", 0, MAX_STEPS)
    if spec.memory_format not in layouts.LAYOUTS:
        raise InvalidSpec("memory_format", f"must be one of {', '.join(layouts.LAYOUTS)}, got {spec.memory_format!r}")
    if isinstance(spec.lr, bool) or not isinstance(spec.lr, (int, float)) or not (math.isfinite(spec.lr)
                                                                                  and spec.lr > 0):
        raise InvalidSpec("lr", f"must be a finite number > 0, got {spec.lr!r}")
    if spec.lr_schedule not in SCHEDULES:
        raise InvalidSpec("lr_schedule", f"unknown schedule {echo(spec.lr_schedule)}; use one of {', '.join(SCHEDULES)}")
    _int(spec.lr_warmup, "lr_warmup", 0, spec.steps)
    if isinstance(spec.plateau, bool) or not isinstance(spec.plateau, (int, float)) or not (
            math.isfinite(spec.plateau) and 0 <= spec.plateau < 1):
        raise InvalidSpec("plateau", f"must be a relative gain in [0, 1) (0: never stop early), got {spec.plateau!r}")
    _int(spec.plateau_window, "plateau_window", 1, MAX_STEPS // 2)
    if spec.param not in PARAMS:
        raise InvalidSpec("param", f"unknown parameterization {spec.param!r}; use one of {', '.join(PARAMS)}")
    if spec.decay is not None and (isinstance(spec.decay, bool) or not isinstance(spec.decay, (int, float))
                                   or not math.isfinite(spec.decay) or spec.decay < 0):
        raise InvalidSpec("decay", f"must be a finite number >= 0, got {spec.decay!r}")
    spec = _check_generator(model, spec)
    size = spec.size
    if size is not None:
        sizes = [size] if isinstance(size, int) and not isinstance(size, bool) else list(size) \
            if isinstance(size, (list, tuple)) and len(size) == 2 else None
        if sizes is None:
            raise InvalidSpec("size", f"must be an integer or (height, width), got {size!r}")
        for value in sizes:
            _int(value, "size", MIN_SIZE, MAX_SIZE)
    image_size = _size(size, model)
    steps = parse_transforms(spec.transforms)
    reflect = sum(s.width for s in steps if getattr(s, "mode", None) == "reflect")
    if reflect >= min(image_size):
        raise InvalidSpec("transforms", f"a reflect pad of {reflect} needs an image larger than {reflect}, "
                                        f"got {image_size}")
    for i, step in enumerate(spec.snapshot_steps):
        _int(step, f"snapshot_steps[{i}]", 0, spec.steps)
    if spec.init_image is not None:
        shape = tuple(getattr(spec.init_image, "shape", ()))
        want = (3, *image_size)
        if shape != want and shape != (spec.batch, *want) and shape != (1, *want):
            raise InvalidSpec("init_image", f"must be an image tensor {want} or ({spec.batch}, 3, H, W) at the "
                                            f"render size, got {shape or type(spec.init_image).__name__}")
    if spec.preprocess is not None:  # the one rule (featureviz.spec), also an upload's header's
        specs.check_preprocess(getattr(spec.preprocess, "mean", None), getattr(spec.preprocess, "std", None),
                               getattr(spec.preprocess, "channel_order", "RGB"))
    if isinstance(spec.objective, objs.Objective):
        objective = spec.objective
        objective_spec = specs.normalize_objective(objective.spec())
    else:  # the one normalization of a job's objective: built from it, checked on it
        objective_spec = specs.normalize_objective(spec.objective)
        objective = objs.build(objective_spec, normalized=True)
    if spec.prior is not None:
        from featureviz.engine.priors import ImageStats

        stats = spec.prior if isinstance(spec.prior, ImageStats) else ImageStats.from_dict(spec.prior)
        if stats is not spec.prior:
            spec = dataclasses.replace(spec, prior=stats)
    model_size = _model_size(model, image_size)
    _check_objective(model, objective_spec, "objective", spec.batch, model_size)
    _bind_priors(objective, objective_spec, spec.patch_priors)
    _bind_matches(model, objective, objective_spec, spec, model_size)
    names: dict = {}
    for layer in objective.layers:
        names.setdefault(layer, model.layer(model.logits if layer is None else layer).name)
    return CheckedSpec(spec=spec, objective=objective, transforms=steps, image_size=image_size,
                       model_size=model_size, names=names)


def _check_generator(model, spec: RenderSpec) -> RenderSpec:
    """param generator: the generator resolved (:class:`~featureviz.engine.params.Generator`) and checked against the
    model (its image's channels are the model's); a generator given to another param is refused."""
    if spec.param != "generator":
        if spec.generator is not None:
            raise InvalidSpec("generator", f"a generator is the generator parameterization's; set param generator "
                                           f"(the job's param is {spec.param})")
        return spec
    from featureviz.engine.params import Generator

    if spec.generator is None:
        raise InvalidSpec("generator", "param generator needs a generator: an uploaded model with a latent input "
                                       "and an image output")
    generator = Generator.of(spec.generator)
    channels = model.input_spec.channels
    if generator.info.channels != channels:
        raise InvalidSpec("generator", f"the generator makes {generator.info.channels}-channel images; the model "
                                       f"takes {channels}-channel images")
    l2 = spec.latent_l2
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not (math.isfinite(l2) and l2 >= 0):
        raise InvalidSpec("latent_l2", f"must be a finite number >= 0, got {l2!r}")
    if spec.init_image is not None:
        raise InvalidSpec("init_image", "a generator render starts from random latents, not from an image")
    return dataclasses.replace(spec, generator=generator) if generator is not spec.generator else spec


def _bind_priors(objective, objective_spec, resolver) -> None:
    """Give each ``prior`` term its fitted patch prior, by name through ``resolver`` (RenderSpec.patch_priors). Terms
    of an Objective built in Python with its prior already bound keep it."""
    unbound = {node.dataset for node in objs.walk(objective)
               if isinstance(node, objs.PatchPrior) and node.prior is None}
    wanted = {body["dataset"]: here for kind, body, here in specs.walk_spec(objective_spec)
              if kind.name == "prior" and body["dataset"] in unbound}
    if not wanted:
        return
    found = {}
    for name, here in wanted.items():
        if resolver is None:
            raise InvalidSpec(f"{here}.dataset", "no learned prior is available to this render; locally give "
                                                 "--prior-images NAME=DIR (RenderSpec.patch_priors)")
        if callable(resolver):
            found[name] = resolver(name)  # NotFound for a name it does not hold
        elif name in resolver:
            found[name] = resolver[name]
        else:
            raise NotFound(f"{here}.dataset: no image set named {echo(name)} for a prior; known: "
                           f"{', '.join(sorted(map(str, resolver))) or 'none'}", reason="PRIOR_NOT_FOUND")
    for node in objs.walk(objective):
        if isinstance(node, objs.PatchPrior) and node.prior is None:
            node.prior = found[node.dataset]


def _bind_matches(model, objective, objective_spec, spec, model_size) -> None:
    """Give each ``match`` term its exemplar targets through ``spec.match_targets`` (exemplar matching): the match
    layer must exist, and the targets must have one row per channel of it."""
    terms = [node for node in objs.walk(objective) if isinstance(node, objs.Match)]
    if not terms:
        return
    places = [here for kind, _, here in specs.walk_spec(objective_spec) if kind.name == "match"]
    preprocess = spec.preprocess if spec.preprocess is not None else model.input_spec.preprocess
    for node, here in zip(terms, places):
        if node.match_layer is not None:
            info = _layer_info(model, node.match_layer, f"{here}.match_layer")
        else:
            info = model.layer(node.layer)
        if node.targets is None:
            if spec.match_targets is None:
                raise InvalidSpec(f"{here}.index", "no exemplar index is available to this render (on a server: an "
                                                   "index id the tenant's jobs made; RenderSpec.match_targets)")
            node.targets = spec.match_targets(node, layer=model.layer(node.layer).name, match_layer=info.name,
                                              size=tuple(model_size), preprocess=preprocess, path=here)
        if node.targets.channels != info.channels:
            raise InvalidSpec(f"{here}.index", f"the targets have {node.targets.channels} channels, layer "
                                               f"{info.name!r} has {info.channels}")


def _layer_info(model, name, path):
    try:
        return model.layer(name)
    except NotFound as err:
        raise InvalidSpec(path, str(err)) from err


def _check_objective(model, spec, path, batch, model_size):
    """What needs the model, by the declared roles of the fields (featureviz.spec.KINDS): layers exist, channels,
    classes and batch images are in range, vectors have one value per channel, positions fit the layer."""
    for kind, body, here in specs.walk_spec(spec, path):
        roles = {field.type.role: name for name, field in kind.fields.items() if field.type.role}
        if "image" in roles and body[roles["image"]] >= batch:
            raise InvalidSpec(f"{here}.{roles['image']}", f"image {body[roles['image']]} is outside a batch of {batch}")
        if "class" in roles:
            name = roles["class"]
            if not model.logits:
                raise InvalidSpec(here, "this model has no logits output to take a class from; use a channel "
                                        "objective on its last layer")
            info = model.layer(model.logits)
            if body[name] >= info.channels:
                raise InvalidSpec(f"{here}.{name}", f"class {body[name]} is out of range: the model has "
                                                    f"{info.channels} classes (0..{info.channels - 1})")
        if "layer" in roles:
            _check_layer_fields(model, kind, body, here, roles, model_size)
        if batch < kind.min_batch:
            raise InvalidSpec(here, f"{kind.name} compares the images of a batch; use batch >= {kind.min_batch}")


def _check_layer_fields(model, kind, body, here, roles, model_size):
    info = _layer_info(model, body[roles["layer"]], f"{here}.{roles['layer']}")
    if "channel" in roles and body[roles["channel"]] >= info.channels:
        raise InvalidSpec(f"{here}.{roles['channel']}", f"channel {body[roles['channel']]} is out of range for layer "
                                                        f"{info.name!r} with {info.channels} channels "
                                                        f"(0..{info.channels - 1})")
    if "vector" in roles and len(body[roles["vector"]]) != info.channels:
        raise InvalidSpec(f"{here}.{roles['vector']}", f"has {len(body[roles['vector']])} values; layer "
                                                       f"{info.name!r} has {info.channels} channels")
    if "x" not in roles:
        return
    if len(info.shape) == 3:  # tokens: x is a token or a column
        _check_token_place(model, info, body, here, model_size)
    elif body.get("x") is not None:
        if info.spatial and body.get("y") is None:
            raise InvalidSpec(f"{here}.y", f"layer {info.name!r} is a spatial map: give both x and y (x alone is "
                                           "a token index of a token tensor)")
        if not info.spatial:
            raise InvalidSpec(f"{here}.x", f"layer {info.name!r} has no spatial positions (shape "
                                           f"{tuple(info.shape)}); leave x and y out")
        h, w = _spatial_at(model, info, model_size)
        for axis, limit in (("x", w), ("y", h)):
            if body[axis] >= limit:
                raise InvalidSpec(f"{here}.{axis}", f"{axis}={body[axis]} is outside layer {info.name!r}, "
                                                    f"which is {w} wide and {h} high at this input size")


def _check_token_place(model, info, body, here, model_size):
    """x alone: a token index; x and y: a column and row of the patch grid (scaled from the catalog's)."""
    prefix = info.prefix_tokens or 0
    patches = info.shape[1] - prefix
    dh, dw = model.input_spec.default_size
    if info.grid is not None:
        rows, columns = info.grid
        rows = max(1, round(rows * model_size[0] / dh))
        columns = max(1, round(columns * model_size[1] / dw))
        patches = rows * columns
    else:
        rows, columns = objs.token_grid(patches, model_size)
    x, y = body.get("x"), body.get("y")
    if x is not None and y is None:
        if x >= prefix + patches:
            raise InvalidSpec(f"{here}.x", f"token {x} is outside layer {info.name!r}, which has {prefix + patches} "
                                           f"tokens at this input size (0..{prefix + patches - 1}; 0 is the first"
                                           f"{', the CLS token' if prefix else ''})")
        return
    for axis, value, limit in (("x", x, columns), ("y", y, rows)):
        if value is not None and value >= limit:
            raise InvalidSpec(f"{here}.{axis}", f"{axis}={value} is outside the patch grid of layer {info.name!r}, "
                                                f"which is {columns} wide and {rows} high at this input size")


def _spatial_at(model, info, model_size):
    """(H, W) of a spatial layer when the model input is ``model_size`` (scaled from the catalog's shape)."""
    h, w = info.spatial_size
    dh, dw = model.input_spec.default_size
    return max(1, round(h * model_size[0] / dh)), max(1, round(w * model_size[1] / dw))


def render(model, spec: RenderSpec | CheckedSpec, *, progress=None, snapshot=None, cancel=None) -> RenderResult:
    """Optimise ``spec.batch`` images to maximise ``spec.objective`` on ``model`` (an ImportedModel). ``spec``: a
    RenderSpec (checked here) or :func:`validate`'s CheckedSpec of it.

    Args:
        progress: ``progress(step, total, values)`` for every step, in order; ``values`` is the (B,) objective
            of that step (with its random transforms) as a detached tensor. On CUDA it is a CPU tensor handed
            over one step late (no host sync per step), the last step's before ``render`` returns.
        snapshot: ``snapshot(step, images)`` at each of ``spec.snapshot_steps`` (0 = the initial image), with
            images (B, 3, H, W) on the CPU.
        cancel: a ``threading.Event`` or a callable returning True to stop; checked before every step. A
            cancelled render returns the images so far with ``cancelled=True``.
    """
    checked = spec if isinstance(spec, CheckedSpec) else validate(model, spec)
    spec = checked.spec
    device = torch.device(spec.device) if spec.device else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    engine = BatchEngine(device, profile=spec.profile)
    slot = Slot(model, checked, device=device, progress=progress, snapshot=snapshot, cancel=cancel)
    engine.join([slot])
    while not slot.done and slot.error is None:
        if slot.is_cancelled():
            slot.cancelled = True
            break
        engine.step([slot])
    engine.flush()
    if slot.error is not None:  # Diverged (on CUDA found one step late)
        engine.drop([slot])
        raise slot.error
    return RenderResult(**engine.finish([slot])[0])

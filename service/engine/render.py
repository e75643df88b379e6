"""The render loop: parameters -> image -> transforms + preprocessing -> truncated model -> objective -> Adam.

:func:`validate` checks a :class:`RenderSpec` against a model before any compute and raises
:class:`InvalidSpec` naming the field; :func:`render` runs the optimisation and returns a :class:`RenderResult`.
The loop maximises the objective (it negates it exactly once), draws all randomness from one
``torch.Generator`` seeded with ``spec.seed`` (same seed and device, same images), checks ``cancel`` every step,
reports ``progress`` and ``snapshot`` to callbacks, and times its phases. The backward pass is cut at the
model input and at the image (free ``detach`` points), so the model, the transforms and the parameterization
are timed separately without extra compute.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from dataclasses import field

import torch

from featureviz import spec as specs
from featureviz.engine import layout as layouts
from featureviz.engine import objectives as objs
from featureviz.engine.params import PARAMS
from featureviz.engine.params import make_param
from featureviz.engine.relu import redirected_relu_grad
from featureviz.engine.transforms import Transforms
from featureviz.engine.transforms import parse_transforms
from featureviz.errors import Diverged
from featureviz.errors import InvalidSpec
from featureviz.errors import NotFound
from featureviz.errors import echo

__all__ = ["RenderSpec", "RenderResult", "render", "validate", "MAX_STEPS", "MAX_BATCH", "MAX_SIZE"]

MAX_STEPS = 100_000
MAX_BATCH = 256
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


def _size(spec_size, model) -> tuple[int, int]:
    if spec_size is None:
        return tuple(model.input_spec.default_size)
    if isinstance(spec_size, int) and not isinstance(spec_size, bool):
        return spec_size, spec_size
    return tuple(spec_size)


def _model_size(model, image_size) -> tuple[int, int]:
    inp = model.input_spec
    if inp.height is not None and inp.width is not None:
        return inp.height, inp.width
    return image_size


def _int(value, path, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec(path, f"must be an integer in [{low}, {high}], got {value!r}")


def validate(model, spec: RenderSpec) -> None:
    """Raise :class:`InvalidSpec` for anything wrong in ``spec`` for ``model``, before any compute."""
    _int(spec.steps, "steps", 1, MAX_STEPS)
    _int(spec.batch, "batch", 1, MAX_BATCH)
    _int(spec.seed, "seed", 0, 2**63 - 1)
    _int(spec.relu_warmup, "relu_warmup", 0, MAX_STEPS)
    if spec.memory_format not in layouts.LAYOUTS:
        raise InvalidSpec("memory_format", f"must be one of {', '.join(layouts.LAYOUTS)}, got {spec.memory_format!r}")
    if isinstance(spec.lr, bool) or not isinstance(spec.lr, (int, float)) or not (math.isfinite(spec.lr)
                                                                                  and spec.lr > 0):
        raise InvalidSpec("lr", f"must be a finite number > 0, got {spec.lr!r}")
    if spec.param not in PARAMS:
        raise InvalidSpec("param", f"unknown parameterization {spec.param!r}; use one of {', '.join(PARAMS)}")
    if spec.decay is not None and (isinstance(spec.decay, bool) or not isinstance(spec.decay, (int, float))
                                   or not math.isfinite(spec.decay) or spec.decay < 0):
        raise InvalidSpec("decay", f"must be a finite number >= 0, got {spec.decay!r}")
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
    if spec.preprocess is not None:
        for name in ("mean", "std"):
            values = getattr(spec.preprocess, name, None)
            if values is None or len(values) not in (1, 3):
                raise InvalidSpec(f"preprocess.{name}", f"needs 1 or 3 values, got {echo(values)}")
        if any(s <= 0 for s in spec.preprocess.std):
            raise InvalidSpec("preprocess.std", f"must be > 0, got {echo(spec.preprocess.std)}")
    if isinstance(spec.objective, objs.Objective):
        objective_spec = specs.normalize_objective(spec.objective.spec())
    else:
        objective_spec = specs.normalize_objective(spec.objective)
    _check_objective(model, objective_spec, "objective", spec.batch, _model_size(model, image_size))


def _layer_info(model, name, path):
    try:
        return model.layer(name)
    except NotFound as err:
        raise InvalidSpec(path, str(err)) from err


def _check_objective(model, spec, path, batch, model_size):
    stack = [(spec, path)]
    while stack:
        node, here = stack.pop()
        (kind, body), = node.items()
        here = f"{here}.{kind}"
        if kind == "sum":
            stack.extend((term, f"{here}[{i}]") for i, term in enumerate(body))
            continue
        if kind in ("scale", "batch"):
            if kind == "batch" and body["index"] >= batch:
                raise InvalidSpec(f"{here}.index", f"image {body['index']} is outside a batch of {batch}")
            stack.append((body["objective"], f"{here}.objective"))
            continue
        if kind == "interpolate":
            stack.extend([(body["a"], f"{here}.a"), (body["b"], f"{here}.b")])
            continue
        if kind in ("logit", "prob"):
            if not model.logits:
                raise InvalidSpec(here, "this model has no logits output to take a class from; use a channel "
                                        "objective on its last layer")
            info = model.layer(model.logits)
            if body["index"] >= info.channels:
                raise InvalidSpec(f"{here}.index", f"class {body['index']} is out of range: the model has "
                                                   f"{info.channels} classes (0..{info.channels - 1})")
            continue
        if "layer" not in body:
            continue  # image regularizers
        info = _layer_info(model, body["layer"], f"{here}.layer")
        if "channel" in body and body["channel"] >= info.channels:
            raise InvalidSpec(f"{here}.channel", f"channel {body['channel']} is out of range for layer "
                                                 f"{info.name!r} with {info.channels} channels "
                                                 f"(0..{info.channels - 1})")
        if "vector" in body and len(body["vector"]) != info.channels:
            raise InvalidSpec(f"{here}.vector", f"has {len(body['vector'])} values; layer {info.name!r} has "
                                                f"{info.channels} channels")
        if body.get("x") is not None:
            if not info.spatial:
                raise InvalidSpec(f"{here}.x", f"layer {info.name!r} has no spatial positions (shape "
                                               f"{tuple(info.shape)}); leave x and y out")
            h, w = _spatial_at(model, info, model_size)
            for axis, limit in (("x", w), ("y", h)):
                if body[axis] >= limit:
                    raise InvalidSpec(f"{here}.{axis}", f"{axis}={body[axis]} is outside layer {info.name!r}, "
                                                        f"which is {w} wide and {h} high at this input size")
        if kind in ("diversity", "alignment") and batch < 2:
            raise InvalidSpec(here, f"{kind} compares the images of a batch; use batch >= 2")


def _spatial_at(model, info, model_size):
    """(H, W) of a spatial layer when the model input is ``model_size`` (scaled from the catalog's shape)."""
    h, w = info.shape[-2:]
    dh, dw = model.input_spec.default_size
    return max(1, round(h * model_size[0] / dh)), max(1, round(w * model_size[1] / dw))


class _Clock:
    """Phase timer: wall time per phase, with a CUDA sync at each boundary when ``sync``."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.enabled = device.type != "cuda" or self.sync
        self.totals = {"param": 0.0, "transforms": 0.0, "model": 0.0, "optimizer": 0.0}
        self._t = 0.0

    def start(self):
        if self.enabled:
            if self.sync:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

    def lap(self, phase: str):
        if self.enabled:
            if self.sync:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.totals[phase] += now - self._t
            self._t = now


class _Progress:
    """Calls ``progress(step, total, values)`` and stops a diverging render (:class:`Diverged`).

    Each step hands over its objective values and a flag saying whether they and the parameters' gradients are
    all finite. On the CPU both are read at once. On CUDA, reading them on the host would wait for the whole step
    and leave the GPU idle while the next one is queued, so each step's values are copied asynchronously and
    handed over (and checked) one step later (CPU tensors); :meth:`flush` hands over the last."""

    def __init__(self, fn, device: torch.device, lr: float):
        self.fn, self.lag, self.lr, self.pending = fn, device.type == "cuda", lr, None

    def __call__(self, step: int, total: int, values: torch.Tensor, finite: torch.Tensor) -> None:
        if not self.lag:
            self._hand_over(step, total, values.detach(), finite)
            return
        host = values.detach().to("cpu", non_blocking=True)
        finite = finite.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(values.device))  # the render's device, not the current one
        self.flush()
        self.pending = (step, total, host, finite, done)

    def flush(self) -> None:
        if self.pending is not None:
            step, total, host, finite, done = self.pending
            self.pending = None
            done.synchronize()
            self._hand_over(step, total, host, finite)

    def _hand_over(self, step, total, values, finite) -> None:
        if not bool(finite):
            what = "the objective" if not bool(torch.isfinite(values).all()) else "the gradient"
            raise Diverged(step, what, self.lr)
        if self.fn is not None:
            self.fn(step, total, values)


def _all_finite(values: torch.Tensor, params) -> torch.Tensor:
    """One boolean tensor: the objective values and every parameter gradient are finite."""
    flags = [torch.isfinite(values.detach()).all()]
    flags += [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return torch.stack(flags).all()


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return cancel.is_set()
    return bool(cancel())


def render(model, spec: RenderSpec, *, progress=None, snapshot=None, cancel=None) -> RenderResult:
    """Optimise ``spec.batch`` images to maximise ``spec.objective`` on ``model`` (an ImportedModel).

    Args:
        progress: ``progress(step, total, values)`` for every step, in order; ``values`` is the (B,) objective
            of that step (with its random transforms) as a detached tensor. On CUDA it is a CPU tensor handed
            over one step late (no host sync per step), the last step's before ``render`` returns.
        snapshot: ``snapshot(step, images)`` at each of ``spec.snapshot_steps`` (0 = the initial image), with
            images (B, 3, H, W) on the CPU.
        cancel: a ``threading.Event`` or a callable returning True to stop; checked before every step. A
            cancelled render returns the images so far with ``cancelled=True``.
    """
    validate(model, spec)
    device = torch.device(spec.device) if spec.device else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    objective = objs.build(spec.objective)
    image_size = _size(spec.size, model)
    model_size = _model_size(model, image_size)
    names: dict = {}
    for layer in objective.layers:
        key = model.logits if layer is None else layer
        names.setdefault(layer, model.layer(key).name)
    canonical = sorted(set(names.values()))
    truncated = model.truncate(canonical).to(device) if canonical else None  # None: image regularizers only
    preprocess = spec.preprocess if spec.preprocess is not None else model.input_spec.preprocess
    channels = model.input_spec.channels

    generator = torch.Generator(device=device)
    generator.manual_seed(spec.seed)
    init = None
    if spec.init_image is not None:
        init = torch.as_tensor(spec.init_image, dtype=torch.float32).to(device)
    params, image_fn = make_param(spec.param, spec.batch, image_size, generator=generator, decay=spec.decay,
                                  init=init, device=device)
    # alignment compares images position by position: they must see the same transform (lucid draws one per batch)
    shared = any(isinstance(node, objs.Alignment) for node in objs.walk(objective))
    transforms = Transforms(parse_transforms(spec.transforms), image_size, model_size, preprocess, channels,
                            device=device, shared=shared)
    plain = transforms.centred()
    optimizer = torch.optim.Adam(params, lr=spec.lr)
    with torch.no_grad():
        layout = layouts.prepare(truncated, spec.memory_format, device, lambda: plain(image_fn()))

    def activations(x, image):
        out = truncated(x) if truncated is not None else {}
        return objs.Activations({layer: out[key] for layer, key in names.items()}, image)

    def evaluate():
        with torch.no_grad():
            image = image_fn()
            return objective(activations(layouts.to_layout(plain(image), layout), image)).float().cpu(), image

    snapshots = set(spec.snapshot_steps)
    start_values, image = evaluate()
    if snapshot is not None and 0 in snapshots:
        snapshot(0, image.detach().cpu())

    clock = _Clock(device, spec.profile)
    report = _Progress(progress, device, spec.lr)
    steps_done, cancelled = 0, False
    began = time.perf_counter()
    for step in range(spec.steps):
        if _is_cancelled(cancel):
            cancelled = True
            break
        clock.start()
        image = image_fn()
        image_in = image.detach().requires_grad_(True)  # cut: the parameterization's graph ends here
        clock.lap("param")
        x = transforms(image_in, generator)
        x_in = layouts.to_layout(x.detach(), layout).requires_grad_(True)  # cut: the transforms' graph ends here
        clock.lap("transforms")
        with redirected_relu_grad(truncated, enabled=truncated is not None and step < spec.relu_warmup):
            values = objective(activations(x_in, image_in))
            loss = -values.sum()  # maximise: the one negation
            loss.backward()
        clock.lap("model")
        if x_in.grad is not None:  # accumulates into image_in.grad next to any image regularizer's gradient
            x.backward(x_in.grad)
        clock.lap("transforms")
        if image_in.grad is not None:
            image.backward(image_in.grad)
        clock.lap("param")
        finite = _all_finite(values, params)  # a device flag: no host sync here
        if device.type != "cuda":
            report(step + 1, spec.steps, values, finite)  # raises Diverged before a non-finite update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        steps_done = step + 1
        if device.type == "cuda":
            report(steps_done, spec.steps, values, finite)  # checked one step late
        if snapshot is not None and steps_done in snapshots:
            with torch.no_grad():
                snapshot(steps_done, image_fn().cpu())
    report.flush()
    elapsed = time.perf_counter() - began
    end_values, image = evaluate()
    return RenderResult(
        images=image.detach().clamp(0, 1).cpu(),
        objective_start=start_values.tolist(),
        objective_end=end_values.tolist(),
        seconds_per_step=elapsed / max(steps_done, 1),
        phase_seconds=dict(clock.totals) if clock.enabled else {},
        steps_done=steps_done,
        cancelled=cancelled,
        objective=str(objective),
        memory_format=layout,
    )

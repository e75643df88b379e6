"""Robustness transforms and model preprocessing as one affine resample per image, or one per step.

lucid's ``standard_transforms`` (pad 12, jitter 8, random scale 0.90..1.10, random rotation -10..10 degrees,
jitter 4) followed by the resize to the model's input size are all affine maps, so they compose into one inverse
affine matrix per image, drawn from an explicit ``torch.Generator`` (independent draws per image; the engine
uses a CPU generator per render, so a device step of many renders builds its matrices on the host and sends them
in one copy), and one bilinear resample (``featureviz.kernels.affine_resample``): the ``"composed"`` stack.
Renders whose stacks have the same ``resample_key`` resample together in one call (:meth:`Transforms.resample`
with their matrices concatenated). A constant pad is exact as the resample's constant border; a reflect pad is applied to
the image first. The model's preprocessing (channel
order, grey for 1-channel models, mean and std) is a per-pixel affine colour map folded into the same call.

``Resample("each")`` applies the random steps as lucid and lucent do instead: each step is its own bilinear
resample of the padded canvas (the pad drawn into it, ``fill`` beyond it; a jitter is a whole-pixel shift, taken
exactly by the nearest pixel), then one more resample takes the view and the colour map. The ``"standard"`` stack
is lucid's steps applied this way, with black beyond the grey pad: its class images keep their evidence in coarser
detail, and other classifiers recognise them better than those of the composed resample (bench/RESULTS.md,
issue 11).

Coordinates: the forward map of each step acts on centred pixel coordinates of the padded canvas (x right,
y down); a positive rotation turns the picture counter-clockwise as displayed. The output grid covers the
padded canvas resized to the model's input size when that upsamples it; a canvas larger than the input is never
shrunk while the image fits: the input then shows the image at its own pixels (see ``_view``).
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featureviz.errors import InvalidSpec
from featureviz.kernels import affine_resample
from featureviz.kernels import nearest_resample

__all__ = [
    "Pad",
    "Jitter",
    "RandomScale",
    "RandomRotate",
    "Resample",
    "STANDARD_TRANSFORMS",
    "COMPOSED_TRANSFORMS",
    "TRANSFORMS",
    "Transforms",
    "parse_transforms",
    "preprocess_map",
]

# ITU-R BT.601 luma weights: how a 1-channel model sees an RGB image
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Pad:
    """Pad ``width`` pixels on each side: ``mode="constant"`` with ``value`` (image units) or ``"reflect"``.

    ``fill``: what jitter, rotation and zoom-out bring in from beyond a constant pad (default: ``value``, one
    grey border). lucid's rotation and lucent's kornia transforms fill 0 there (black)."""

    width: int = 12
    mode: str = "constant"
    value: float = 0.5
    fill: float | None = None


@dataclass(frozen=True)
class Jitter:
    """Shift by a whole number of pixels, drawn uniformly per image and axis from ``-pixels//2 .. pixels - pixels//2``
    (lucid's random crop of ``pixels`` less, centred)."""

    pixels: int
    uniforms = 2  # uniform draws in [0, 1) per image: x and y

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        shift = torch.floor(u * (self.pixels + 1)).clamp_(max=self.pixels) - self.pixels // 2
        return _translation(-shift)


@dataclass(frozen=True)
class RandomScale:
    """Zoom about the centre by a factor drawn per image from ``factors``."""

    factors: tuple[float, ...]
    uniforms = 1

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(self.factors, dtype=torch.float32, device=u.device)[_pick(u[:, 0], len(self.factors))]
        out = torch.zeros(u.shape[0], 3, 3, device=u.device)
        out[:, 0, 0] = 1.0 / s
        out[:, 1, 1] = 1.0 / s
        out[:, 2, 2] = 1.0
        return out


@dataclass(frozen=True)
class RandomRotate:
    """Rotate about the centre by an angle in degrees drawn per image from ``degrees``."""

    degrees: tuple[float, ...]
    uniforms = 1

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        angle = torch.tensor(self.degrees, dtype=torch.float32, device=u.device)[_pick(u[:, 0], len(self.degrees))]
        return _rotation(-angle * (math.pi / 180.0))


@dataclass(frozen=True)
class Resample:
    """How the random steps are applied: ``"once"`` composes them (and the resize) into one resample per image;
    ``"each"`` resamples after every step, in order, on the padded canvas (lucid's and lucent's way: more
    smoothing, one resample more per step)."""

    mode: str = "once"


RESAMPLE_MODES = ("once", "each")


def _pick(u: torch.Tensor, n: int) -> torch.Tensor:
    """Indices 0..n-1, uniformly, from uniforms in [0, 1)."""
    return torch.floor(u * n).long().clamp_(max=n - 1)


def _translation(shift):
    out = torch.eye(3, device=shift.device).repeat(shift.shape[0], 1, 1)
    out[:, :2, 2] = shift
    return out


def _rotation(radians):
    # forward rotation by +a, counter-clockwise on screen with y down: [[cos, sin], [-sin, cos]]
    cos, sin = torch.cos(radians), torch.sin(radians)
    out = torch.zeros(radians.shape[0], 3, 3, device=radians.device)
    out[:, 0, 0] = cos
    out[:, 0, 1] = sin
    out[:, 1, 0] = -sin
    out[:, 1, 1] = cos
    out[:, 2, 2] = 1.0
    return out


# lucid optvis/transform.py standard_transforms; scales 1 + (i - 5) / 50, angles -10..10 plus five extra zeros
_LUCID_STEPS = (
    Jitter(8),
    RandomScale(tuple(1 + (i - 5) / 50 for i in range(11))),
    RandomRotate(tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5),
    Jitter(4),
)
# applied as lucid and lucent apply them: each step its own resample, black beyond the grey pad (lucid's rotation,
# lucent's kornia). Their class images transfer to other classifiers better than those of the composed stack below
# (bench/RESULTS.md, issue 11: "Resample after each step").
STANDARD_TRANSFORMS = (Pad(12, "constant", 0.5, 0.0), *_LUCID_STEPS, Resample("each"))
# the same steps in one composed resample, grey beyond the pad: fewer resamples (cheaper on a CPU), finer detail
COMPOSED_TRANSFORMS = (Pad(12, "constant", 0.5), *_LUCID_STEPS)
TRANSFORMS = {"standard": STANDARD_TRANSFORMS, "composed": COMPOSED_TRANSFORMS, "none": ()}


def parse_transforms(spec, path: str = "transforms") -> tuple:
    """``"standard"``, ``"composed"``, ``"none"``, or a list of ``{"pad": {...}}``, ``{"jitter": {"pixels": N}}``,
    ``{"scale": {"factors": [...]}}``, ``{"rotate": {"degrees": [...]}}`` dicts, or transform objects."""
    if isinstance(spec, str):
        if spec not in TRANSFORMS:
            raise InvalidSpec(path, f"unknown transform stack {spec[:40]!r}; use one of {', '.join(TRANSFORMS)} "
                                    f"or a list of steps")
        return TRANSFORMS[spec]
    if not isinstance(spec, (list, tuple)):
        raise InvalidSpec(path, f"must be one of {', '.join(TRANSFORMS)} or a list of steps, got "
                                f"{type(spec).__name__}")
    steps = []
    for i, step in enumerate(spec):
        here = f"{path}[{i}]"
        if isinstance(step, (Pad, Jitter, RandomScale, RandomRotate, Resample)):
            steps.append(step)
            continue
        if not isinstance(step, dict) or len(step) != 1:
            raise InvalidSpec(here, "must be an object with one key: pad, jitter, scale, rotate or resample")
        (kind, body), = step.items()
        body = body or {}
        if not isinstance(body, dict):
            raise InvalidSpec(f"{here}.{str(kind)[:40]}", f"must be an object of settings, got {type(body).__name__}")
        if kind == "pad":
            width, mode, value = body.get("width", 12), body.get("mode", "constant"), body.get("value", 0.5)
            fill = body.get("fill")
            if isinstance(width, bool) or not isinstance(width, int) or width < 0:
                raise InvalidSpec(f"{here}.pad.width", f"must be an integer >= 0, got {width!r}")
            if mode not in ("constant", "reflect"):
                raise InvalidSpec(f"{here}.pad.mode", f"must be 'constant' or 'reflect', got {mode!r}")
            for name, number in (("value", value), ("fill", fill)):
                if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))
                                           or not math.isfinite(number)):
                    raise InvalidSpec(f"{here}.pad.{name}", f"must be a finite number, got {number!r}")
            steps.append(Pad(width, mode, float(value), None if fill is None else float(fill)))
        elif kind == "jitter":
            pixels = body.get("pixels")
            if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
                raise InvalidSpec(f"{here}.jitter.pixels", f"must be an integer >= 0, got {pixels!r}")
            steps.append(Jitter(pixels))
        elif kind in ("scale", "rotate"):
            key = "factors" if kind == "scale" else "degrees"
            values = body.get(key)
            if not isinstance(values, (list, tuple)) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise InvalidSpec(f"{here}.{kind}.{key}", "must be a non-empty list of finite numbers")
            if kind == "scale" and min(values) <= 0:
                raise InvalidSpec(f"{here}.scale.factors", f"must be > 0, got {min(values)}")
            steps.append(RandomScale(tuple(map(float, values))) if kind == "scale"
                         else RandomRotate(tuple(map(float, values))))
        elif kind == "resample":
            mode = body.get("mode", "once")
            if mode not in RESAMPLE_MODES:
                raise InvalidSpec(f"{here}.resample.mode", f"must be one of {', '.join(RESAMPLE_MODES)}, "
                                                           f"got {str(mode)[:40]!r}")
            steps.append(Resample(mode))
        else:
            raise InvalidSpec(here, f"unknown transform {str(kind)[:40]!r}; use pad, jitter, scale, rotate or "
                                    f"resample")
    _check_order(steps, path)
    return tuple(steps)


def _check_order(steps, path):
    seen_other = False
    values = set()
    if sum(isinstance(step, Resample) for step in steps) > 1:
        raise InvalidSpec(path, "at most one resample setting")
    for i, step in enumerate(steps):
        if isinstance(step, Resample):
            continue
        if isinstance(step, Pad):
            if seen_other:
                raise InvalidSpec(f"{path}[{i}]", "pads must come before jitter, scale and rotate")
            if step.mode == "constant" and step.width:
                values.add((step.value, step.value if step.fill is None else step.fill))
        else:
            seen_other = True
    if len(values) > 1:
        raise InvalidSpec(path, f"constant pads must share one value and fill, got {sorted(values)}")


def preprocess_map(preprocess, channels: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix (Co, 3), bias (Co,))`` with model_input = matrix @ rgb01 + bias per pixel.

    ``model_input[c] = (image01[order[c]] - mean[c]) / std[c]``; a 1-channel model sees luminance
    (ITU-R BT.601) first. ``preprocess`` has ``mean``, ``std`` (1 or 3 values) and ``channel_order``.
    """
    mean = list(preprocess.mean)
    std = list(preprocess.std)
    if len(mean) != channels:
        mean, std = (mean[:1], std[:1]) if channels == 1 else (mean * channels, std * channels)
    if channels == 1:
        matrix = torch.tensor([LUMA], dtype=torch.float32) / std[0]
    elif channels == 3:
        order = (2, 1, 0) if preprocess.channel_order == "BGR" else (0, 1, 2)
        matrix = torch.zeros(3, 3)
        for c in range(3):
            matrix[c, order[c]] = 1.0 / std[c]
    else:
        raise InvalidSpec("model.input.channels", f"models with {channels} input channels are not supported "
                                                  f"(1 or 3)")
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
    return matrix.to(device), bias.to(device)


def _view(canvas: int, image: int, model: int) -> int:
    """Canvas pixels (one axis) the model's input covers, centred. The whole padded canvas when the input is at
    least as large (it is then upsampled, as lucent does below 224 px); when the canvas is larger than the input,
    the image at its own pixel size (a window of the canvas: the pad shows only through jitter, rotation and
    zoom-out), or the image alone when the image itself is larger. Shrinking the canvas instead (224 px + pads onto
    a 224 input: x0.9) aliases the image's finest detail into frequencies the model sees, and the optimisation
    fills the image with high-frequency texture (bench/RESULTS.md, issue 11); lucid and lucent never shrink it:
    their model takes the canvas at its own size."""
    if model >= canvas:
        return canvas
    return max(model, image)


class Transforms:
    """The transform stack of one render: image (B, 3, H, W) in [0, 1] -> model input (B, Co, Ho, Wo).

    Calling it draws the random steps per image (or once for the batch when ``shared``) from ``generator`` and
    resamples once, or once per random step plus the view with ``Resample("each")`` (the standard stack).
    """

    def __init__(self, steps, image_size: tuple[int, int], model_size: tuple[int, int], preprocess,
                 channels: int = 3, *, device=None, shared: bool = False):
        self.steps = tuple(steps)
        self.shared = shared  # one random draw for the whole batch (objectives comparing images position-wise)
        self._preprocess, self._channels = preprocess, channels
        self.image_size = tuple(image_size)
        self.model_size = tuple(model_size)
        self.device = torch.device(device or "cpu")
        pads = [s for s in self.steps if isinstance(s, Pad)]
        self.random_steps = [s for s in self.steps if not isinstance(s, (Pad, Resample))]
        # each step its own resample (only worth it when there are random steps)
        self.each = bool(self.random_steps) and any(isinstance(s, Resample) and s.mode == "each"
                                                    for s in self.steps)
        self.uniforms = sum(s.uniforms for s in self.random_steps)
        self.reflect = sum(p.width for p in pads if p.mode == "reflect")
        constant = sum(p.width for p in pads if p.mode == "constant")
        first = next((p for p in pads if p.mode == "constant" and p.width), Pad(0))
        self.pad_value = first.value
        self.border = first.value if first.fill is None else first.fill  # beyond the source
        # a fill other than the pad's value, or a resample per step (the steps move the padded canvas): the
        # constant pad becomes part of the source, the border beyond it
        self.explicit = constant if self.border != first.value or self.each else 0
        h, w = self.image_size
        grown = self.reflect + self.explicit
        src_h, src_w = h + 2 * grown, w + 2 * grown  # what affine_resample samples
        canvas_h, canvas_w = src_h + 2 * (constant - self.explicit), src_w + 2 * (constant - self.explicit)
        view_h, view_w = _view(canvas_h, h, self.model_size[0]), _view(canvas_w, w, self.model_size[1])
        # "each" with a view that is a whole-pixel window of the canvas (the model's input at the canvas's own
        # pixels): a last jitter and the view are then one whole-pixel shift of the window, exactly (the window
        # lies inside the canvas, so nothing the jitter moves out of the canvas could have been seen)
        self._window = self.each and isinstance(self.random_steps[-1], Jitter) and \
            (view_h, view_w) == self.model_size and (canvas_h - view_h) % 2 == 0 and (canvas_w - view_w) % 2 == 0
        # output normalised [-1, 1] -> canvas centred pixels; source centred pixels -> source normalised
        # built where the generator draws (the host for the engine's renders), then sent with the maps
        self._out_to_canvas = torch.diag(torch.tensor([view_w / 2, view_h / 2, 1.0]))
        self._src_from_canvas = torch.diag(torch.tensor([2 / src_w, 2 / src_h, 1.0]))
        self._canvas_from_src = torch.diag(torch.tensor([src_w / 2, src_h / 2, 1.0]))  # "each": source = canvas
        self._canvas_size = (src_h, src_w)
        matrix, bias = preprocess_map(preprocess, channels)
        # stacks with equal keys are the same function of (image, random draws): they may resample together
        self.resample_key = (self.steps, self.shared, self.image_size, self.model_size, self.reflect, self.border,
                    tuple(matrix.flatten().tolist()), tuple(bias.tolist()), str(self.device))
        self.matrix, self.bias = matrix.to(self.device), bias.to(self.device)

    def draw(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B, U) uniforms in [0, 1): the random draws of one call, on the generator's device (the host without
        one); with ``shared`` one row serves the whole batch."""
        rows = 1 if self.shared else batch
        where = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(rows, self.uniforms, generator=generator, device=where).expand(batch, self.uniforms)

    def theta(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 2, 3) inverse affine maps, output -> source normalised coordinates, on the generator's device."""
        return self.maps(self.draw(batch, generator))

    def maps(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse affine maps from (B, U) uniforms (of several renders with this ``resample_key`` at once): (B, 2, 3),
        output -> source normalised coordinates; with ``Resample("each")`` (B, n + 1, 2, 3), one map per random
        step (canvas -> canvas, in order) and the view last (output -> canvas)."""
        b = u.shape[0]
        src_from_canvas = self._src_from_canvas.to(u.device).expand(b, 3, 3)
        out_to_canvas = self._out_to_canvas.to(u.device).expand(b, 3, 3)
        column, inverses = 0, []
        for step in self.random_steps:
            inverses.append(step.inverse(u[:, column: column + step.uniforms]))
            column += step.uniforms
        if self.each:  # each step in normalised canvas coordinates, then the view (with the last jitter: window)
            canvas_from_src = self._canvas_from_src.to(u.device).expand(b, 3, 3)
            last = inverses.pop() if self._window else None
            maps = [torch.bmm(torch.bmm(src_from_canvas, inv), canvas_from_src) for inv in inverses]
            view = src_from_canvas if last is None else torch.bmm(src_from_canvas, last)
            maps.append(torch.bmm(view, out_to_canvas))
            return torch.stack(maps, 1)[:, :, :2, :]
        inv = src_from_canvas
        for step_inv in inverses:  # forward M = S_n ... S_1, so M^-1 = S_1^-1 ... S_n^-1
            inv = torch.bmm(inv, step_inv)
        # bmm, not matmul: a (B, 3, 3) @ (3, 3) matmul folds into one tall mm that took ~20 ms on a CPU (MKL)
        return torch.bmm(inv, out_to_canvas)[:, :2, :]

    @staticmethod
    def of(steps, image_size: tuple[int, int], model_size: tuple[int, int], preprocess, channels: int = 3, *,
           device=None, shared: bool = False) -> "Transforms":
        """``Transforms(...)``, built once per distinct stack and shared: a stack never changes once built (its
        random draws come from the caller's generator), and a burst of jobs of one model and size would otherwise
        build the same small tensors again for each job (``_built``: the last 256 distinct stacks)."""
        return _built(tuple(steps), tuple(image_size), tuple(model_size), tuple(preprocess.mean),
                      tuple(preprocess.std), preprocess.channel_order, channels, torch.device(device or "cpu"), shared)

    def centred(self) -> "Transforms":
        """The deterministic part of this stack: the pads and the resize, without random steps (the geometry the
        model sees on average; used to measure objectives before and after a render)."""
        return Transforms.of([s for s in self.steps if isinstance(s, Pad)], self.image_size, self.model_size,
                             self._preprocess, self._channels, device=self.device)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.resample(image, self.theta(image.shape[0], generator))

    def resample(self, image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The stack under the given inverse maps (from :meth:`maps`): the images of several renders with this
        ``resample_key`` and their maps concatenated go through in one call."""
        if self.reflect:
            image = F.pad(image, [self.reflect] * 4, mode="reflect")
        if self.explicit:
            image = F.pad(image, [self.explicit] * 4, value=self.pad_value)
        theta = theta.to(image.device, non_blocking=True)
        if theta.dim() == 4:  # Resample("each"): the random steps one by one on the canvas, then the view
            for i in range(theta.shape[1] - 1):  # a jitter is a whole-pixel shift: exact when nearest
                sample = nearest_resample if isinstance(self.random_steps[i], Jitter) else affine_resample
                image = sample(image, theta[:, i], self._canvas_size, border=self.border)
            theta = theta[:, -1]
            if self._window:
                return nearest_resample(image, theta, self.model_size, border=self.border, matrix=self.matrix,
                                        bias=self.bias)
        return affine_resample(image, theta, self.model_size, border=self.border, matrix=self.matrix,
                               bias=self.bias)


@functools.lru_cache(maxsize=256)
def _built(steps: tuple, image_size: tuple, model_size: tuple, mean: tuple, std: tuple, channel_order: str,
           channels: int, device: torch.device, shared: bool) -> Transforms:
    """:meth:`Transforms.of`'s stacks, by their arguments (the preprocessing by its values)."""
    preprocess = types.SimpleNamespace(mean=mean, std=std, channel_order=channel_order)
    return Transforms(steps, image_size, model_size, preprocess, channels, device=device, shared=shared)

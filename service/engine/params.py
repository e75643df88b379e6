"""Image parameterizations: what the optimizer changes, and how it becomes an RGB image in [0, 1].

Each builder returns ``(params, image_fn)`` (lucid's convention): ``params`` is the list of leaf tensors for
the optimizer, ``image_fn()`` renders the current (B, 3, H, W) image. ``image_fn`` is an :class:`ImageFn`:
parameterizations with the same ``render_key`` (kind, size and settings) render together in one call
(:func:`render_group`: their parameters concatenated along the batch), which is how the batched engine renders
all the slots of a device step with one kernel launch per parameterization. Random initial values come from an
explicit ``torch.Generator``, so the same seed on the same device gives the same start.

- ``pixel``: the image itself in decorrelated colour space, N(0, 0.01), then colour matrix and sigmoid.
- ``fft``: a half spectrum scaled by 1/f^decay (Olah et al. 2017; lucid ``param/spatial.py``), N(0, 0.01) for
  real and imaginary parts, inverse DFT, colour matrix, sigmoid; ``featureviz.kernels.spectrum_to_image``.
- ``laplacian``: lucid's Laplacian-pyramid parameterization (``laplacian_pyramid_image``): the sum of
  :data:`LAPLACIAN_LEVELS` tensors at full, 1/2, 1/4 and 1/8 resolution, each upsampled bilinearly, then colour
  matrix and sigmoid. With Adam every level takes steps of the same size, so coarse structure moves as fast as
  fine detail (a preconditioner towards low frequencies, like the 1/f scale of ``fft``).
- Learned statistics (``prior``, :mod:`featureviz.engine.priors`) replace ImageNet's colour matrix (every kind) and,
  for ``fft``, the 1/f scale by the image set's fitted 1/f^decay.
- ``maco``: only the phase is optimised; the magnitude is a fixed natural-image template 1/f^decay
  (Fel et al. 2023, MaCo; Horama). Phase and image are standardised per image before the colour matrix.

- ``generator``: the latent of an uploaded generator (Nguyen et al. 2016; lucent's ``upconvGAN``), one N(0, 1)
  vector per image; the generator's output is mapped from its range to [0, 1] (``featureviz.importer.generator``
  reads the range from the graph), a 1-channel output repeated to grey RGB, and resized (bilinear) to the render
  size. Slots of one generator render in one forward of it. ``latent_l2``: a penalty ``latent_l2 * |z|^2`` per image,
  subtracted from the objective (:attr:`ImageFn.penalty`).

Any of them (but ``generator``) can start from a given image (:func:`image_to_pixel`, :func:`image_to_spectrum`): the inverse of
sigmoid, colour matrix and DFT, so rendering the parameters back gives the image (for ``maco`` only the
phase is taken from the image; the magnitude stays the template).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from featureviz.errors import InvalidSpec
from featureviz.kernels import rfft2_freqs
from featureviz.kernels import spectrum_to_image

__all__ = [
    "PARAMS",
    "COLOR_CORRELATION_SVD_SQRT",
    "MAX_NORM_SVD_SQRT",
    "color_matrix",
    "fft_scale",
    "make_param",
    "ImageFn",
    "render_group",
    "image_to_pixel",
    "image_to_spectrum",
    "Generator",
]

PARAMS = ("fft", "pixel", "maco", "laplacian", "generator")
LAPLACIAN_LEVELS = 4  # lucid's default

# Square root of the colour correlation of ImageNet, from its SVD (lucid param/color.py, lucent, captum):
# rgb = (C / max column norm) @ t decorrelates the optimised channels.
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02),
                              (0.27, 0.00, -0.05),
                              (0.27, -0.09, 0.03))
MAX_NORM_SVD_SQRT = 0.4619524  # largest column L2 norm of the matrix above (lucid's constant)

# lucid and lucent divide the inverse DFT by 4 ("TODO: is that a magic constant?"): it keeps the initial
# image near grey after the sigmoid. We fold it into the spectrum scale so the kernel applies one scale.
FFT_IMAGE_GAIN = 0.25
INIT_SD = 0.01  # lucid's initial standard deviation for pixel and spectrum parameters
MACO_DEFAULT_DECAY = 1.4  # log-log magnitude slope of natural images at low frequencies (xplique's template)
_EPS_SIGMOID = 1e-4  # images are clipped to [eps, 1 - eps] before the inverse sigmoid


def color_matrix(*, device=None, dtype=torch.float32) -> torch.Tensor:
    """The (3, 3) decorrelation matrix ``C / 0.4619524`` applied per pixel: rgb = color_matrix() @ t."""
    return torch.tensor(COLOR_CORRELATION_SVD_SQRT, device=device, dtype=dtype) / MAX_NORM_SVD_SQRT


def fft_scale(height: int, width: int, decay: float = 1.0, *, gain: float = FFT_IMAGE_GAIN,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-bin spectrum scale (H, W//2+1): ``gain / max(|f|, 1/max(H, W)) ** decay`` (lucid ``fft_image``).

    With an orthonormal inverse DFT this gives every frequency the same learning rate relative to its natural
    energy (1/f), and pixel-like step sizes overall; the floor keeps the DC bin finite.
    """
    freqs = rfft2_freqs(height, width, device=device, dtype=dtype)
    return gain / torch.clamp(freqs, min=1.0 / max(height, width)) ** decay


@functools.lru_cache(maxsize=64)
def _shared_color(device: str) -> torch.Tensor:
    """:func:`color_matrix` on ``device``, made once and shared by the parameterizations (read only: nothing
    writes to it; the public function gives a fresh tensor)."""
    return color_matrix(device=device)


@functools.lru_cache(maxsize=256)
def _shared_scale(height: int, width: int, decay: float, device: str) -> torch.Tensor:
    """:func:`fft_scale` at lucid's gain, made once per size, decay and device and shared as ``_shared_color``: a
    burst of jobs of one size makes it once."""
    return fft_scale(height, width, decay, device=device)


def _check(batch: int, size: tuple[int, int]):
    if batch < 1:
        raise InvalidSpec("batch", f"must be >= 1, got {batch}")
    if min(size) < 2:
        raise InvalidSpec("size", f"must be at least 2x2, got {size}")


def _to_rgb(t: torch.Tensor, color: torch.Tensor | None, sigmoid: bool) -> torch.Tensor:
    if color is not None:
        t = torch.einsum("oc,bchw->bohw", color, t)
    if sigmoid:
        return torch.sigmoid(t)
    # lucid's to_valid_rgb(sigmoid=False): clamp to [0, 1], letting the gradient through the clamp
    return t + 0.5 + (torch.clamp(t + 0.5, 0.0, 1.0) - (t + 0.5)).detach()


def _inverse_rgb(image: torch.Tensor, color: torch.Tensor | None, sigmoid: bool, *, pinv: bool = False) -> torch.Tensor:
    if sigmoid:
        image = image.clamp(_EPS_SIGMOID, 1.0 - _EPS_SIGMOID)
        t = torch.log(image) - torch.log1p(-image)
    else:
        t = image - 0.5
    if color is not None:  # a learned matrix may be singular (a grey image set): its pseudo-inverse
        inverse = torch.linalg.pinv(color) if pinv else torch.linalg.inv(color)
        t = torch.einsum("oc,bchw->bohw", inverse, t)
    return t


def image_to_pixel(image: torch.Tensor, *, decorrelate: bool = True, sigmoid: bool = True,
                   color: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel parameters (B, 3, H, W) that render to ``image`` (B, 3, H, W) in [0, 1] (clipped to [1e-4, 1-1e-4]).
    ``color``: a learned colour matrix instead of ImageNet's (the closest parameters when it is singular)."""
    if not decorrelate:
        return _inverse_rgb(image, None, sigmoid)
    if color is not None:
        return _inverse_rgb(image, color.to(device=image.device, dtype=image.dtype), sigmoid, pinv=True)
    return _inverse_rgb(image, color_matrix(device=image.device, dtype=image.dtype), sigmoid)


def image_to_spectrum(image: torch.Tensor, scale: torch.Tensor, *, decorrelate: bool = True,
                      sigmoid: bool = True, color: torch.Tensor | None = None) -> torch.Tensor:
    """Spectrum parameters (B, 3, H, W//2+1, 2) that render to ``image`` through ``spectrum_to_image``:
    inverse sigmoid, inverse colour matrix, ``rfft2(norm="ortho")``, divide by ``scale``."""
    t = image_to_pixel(image, decorrelate=decorrelate, sigmoid=sigmoid, color=color)
    spectrum = torch.fft.rfft2(t, norm="ortho") / scale
    return torch.view_as_real(spectrum).contiguous()


class ImageFn:
    """``image_fn()`` of a parameterization: ``fn(*params)``. Two with equal ``render_key`` compute the same function
    of their parameters, so :func:`render_group` may run them as one batch (``render_key`` None: never grouped)."""

    def __init__(self, fn, params: list, render_key: tuple | None, penalty=None):
        self.fn, self.params, self.render_key = fn, params, render_key
        self.penalty = penalty  # None, or () -> (B,) per-image values the objective loses (a latent's L2)

    def __call__(self) -> torch.Tensor:
        return self.fn(*self.params)


def render_group(fns: list) -> torch.Tensor:
    """The images of several parameterizations of one ``render_key``, concatenated along the batch, in one call."""
    if len(fns) == 1:
        return fns[0]()
    keys = {getattr(f, "render_key", None) for f in fns}
    if len(keys) != 1 or None in keys:
        raise ValueError("render_group needs image functions of one render_key")
    return fns[0].fn(*(torch.cat(group) for group in zip(*(f.params for f in fns))))


class Generator:
    """A generator as a parameterization (issue 25): its frozen module (latent in, image out), what the importer read
    of it (:class:`featureviz.importer.generator.GeneratorInfo`: latent size, output channels, size and range) and a
    ``key`` naming it (its sha256): slots with the same key and render size render in one forward."""

    def __init__(self, module: torch.nn.Module, info, key: str, *, latent_4d: bool = False):
        self.module, self.info, self.key, self.latent_4d = module, info, str(key), latent_4d
        self._on: dict[str, torch.nn.Module] = {}

    @classmethod
    def of(cls, value) -> "Generator":
        """``value`` itself, or the Generator of an imported generator (``ImportedModel`` with ``generator`` set)."""
        if isinstance(value, cls):
            return value
        info = getattr(value, "generator", None)
        if info is None:
            raise InvalidSpec("generator", "this model is not a generator: a generator's input is a latent vector "
                                           "(N, Z) or (N, Z, 1, 1) and its output an image")
        return cls(value.module, info, value.sha256, latent_4d=value.input_spec.layout != "NC")

    def on(self, device) -> torch.nn.Module:
        """The module on ``device`` (one copy per device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.module
        found = self._on.get(str(device))
        if found is None:
            import copy

            found = self._on[str(device)] = copy.deepcopy(self.module).to(device)
        return found


def _generator_param(gen: Generator, batch: int, size, *, generator: torch.Generator, device, latent_l2: float):
    info = gen.info
    module = gen.on(device)
    latent = torch.randn(batch, info.latent, generator=generator, device=device).requires_grad_(True)
    low, span = float(info.low), float(info.high) - float(info.low)
    shape = (-1, info.latent, 1, 1) if gen.latent_4d else (-1, info.latent)

    def image_fn(z):
        x = module(z.reshape(shape))
        x = (x[0] if isinstance(x, (tuple, list)) else x).float()
        x = (x - low) / span
        if x.shape[1] == 1:  # grey: the same value in R, G and B (the engine's images are RGB)
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-2] > size[0] or x.shape[-1] > size[1])
        return x

    penalty = (lambda: latent_l2 * latent.pow(2).sum(dim=1)) if latent_l2 else None
    render_key = ("generator", gen.key, tuple(size), str(device))
    return [latent], ImageFn(image_fn, [latent], render_key, penalty)


def make_param(kind: str, batch: int, size: tuple[int, int], *, generator: torch.Generator,
               decay: float | None = None, init: torch.Tensor | None = None, decorrelate: bool = True,
               sigmoid: bool = True, device=None, prior=None, image_generator: Generator | None = None,
               latent_l2: float = 0.0):
    """Build a parameterization. Returns ``(params, image_fn)``.

    Args:
        kind: ``"fft"``, ``"pixel"``, ``"maco"`` or ``"laplacian"``.
        batch, size: B and (H, W) of the image.
        generator: draws the initial values (must live on ``device``).
        decay: spectrum exponent; default 1.0 for ``fft`` (lucid) and 1.4 for ``maco``.
        init: optional (3, H, W) or (B, 3, H, W) image in [0, 1] to start from.
        decorrelate, sigmoid: the colour matrix and the final sigmoid (both on in lucid's defaults).
        prior: learned image statistics (:class:`featureviz.engine.priors.ImageStats`): its colour matrix replaces
            ImageNet's (every kind), and for ``fft`` (and ``laplacian``: its levels' weights) its fitted ``decay``
            replaces 1/f unless ``decay`` is given,
            rescaled to the RMS of the 1/f scale at the same size (the shape of the set's spectrum at lucid's
            level: without it a steep decay multiplies the lowest frequencies by max(H, W)^(decay - 1) and the
            sigmoid saturates into flat regions with hard edges, the opposite of a smoother image).
            ``maco`` keeps its own magnitude template.
        image_generator, latent_l2: the :class:`Generator` of ``generator`` (required for it) and its latent penalty.
    """
    _check(batch, size)
    device = torch.device(device) if device is not None else generator.device
    if kind == "generator":
        if image_generator is None:
            raise InvalidSpec("generator", "param generator needs a generator (an uploaded latent-to-image model)")
        if init is not None:
            raise InvalidSpec("init_image", "a generator render starts from random latents, not from an image")
        return _generator_param(Generator.of(image_generator), batch, size, generator=generator, device=device,
                                latent_l2=float(latent_l2 or 0.0))
    height, width = size
    learned = prior.rgb_color(device=device) if prior is not None and decorrelate else None
    color = learned if learned is not None else _shared_color(str(device)) if decorrelate else None
    learned_decay = prior is not None and kind in ("fft", "laplacian") and decay is None
    if learned_decay:
        decay = prior.decay
    prior_key = prior.key() if prior is not None else None
    if init is not None:
        init = init.to(device=device, dtype=torch.float32)
        if init.dim() == 3:
            init = init.unsqueeze(0)
        if init.shape[1:] != (3, height, width) or init.shape[0] not in (1, batch):
            raise InvalidSpec("init_image", f"must be (3, {height}, {width}) or ({batch}, 3, {height}, {width}), "
                                            f"got {tuple(init.shape)}")
        init = init.expand(batch, 3, height, width)

    if kind == "pixel":
        if init is None:
            pixels = torch.randn(batch, 3, height, width, generator=generator, device=device) * INIT_SD
        else:
            pixels = image_to_pixel(init, decorrelate=decorrelate, sigmoid=sigmoid, color=learned)
        pixels.requires_grad_(True)
        render_key = ("pixel", tuple(size), decorrelate, sigmoid, str(device), prior_key)
        return [pixels], ImageFn(lambda p: _to_rgb(p, color, sigmoid), [pixels], render_key)

    if kind == "fft":
        scale = _shared_scale(height, width, 1.0 if decay is None else float(decay), str(device))
        if learned_decay:  # the set's spectral shape at lucid's level: the RMS over the bins of the 1/f scale
            scale = scale * (fft_scale(height, width, 1.0, device=device).norm() / scale.norm())
        if init is None:
            shape = (batch, 3, height, width // 2 + 1, 2)
            spectrum = torch.randn(shape, generator=generator, device=device) * INIT_SD
        else:
            spectrum = image_to_spectrum(init, scale, decorrelate=decorrelate, sigmoid=sigmoid, color=learned)
        spectrum.requires_grad_(True)
        render_key = ("fft", tuple(size), decay, decorrelate, sigmoid, str(device), prior_key)
        if sigmoid:
            return [spectrum], ImageFn(lambda p: spectrum_to_image(p, scale, color, size, sigmoid=True), [spectrum],
                                       render_key)
        return [spectrum], ImageFn(lambda p: _to_rgb(spectrum_to_image(p, scale, None, size, sigmoid=False), color,
                                                     False), [spectrum], render_key)

    if kind == "laplacian":
        # equal levels give about a 1/f amplitude spectrum (level n: a band near 2^-n cycles per pixel, its power
        # spread over 4^-n of the plane); a learned decay d weights level n by 2^(n (d - 1)), normalized to an RMS
        # of 1 over the levels (the default's level), as fft's learned scale keeps 1/f's RMS
        weights = [1.0] * LAPLACIAN_LEVELS
        if learned_decay:
            raw = [2.0 ** (n * (decay - 1.0)) for n in range(LAPLACIAN_LEVELS)]
            rms = math.sqrt(sum(w * w for w in raw) / len(raw))
            weights = [w / rms for w in raw]
        levels = []
        for n in range(LAPLACIAN_LEVELS):
            shape = (batch, 3, max(1, height >> n), max(1, width >> n))
            if init is not None:  # the image in the finest level, the coarser ones start at zero
                level = image_to_pixel(init, decorrelate=decorrelate, sigmoid=sigmoid, color=learned) / weights[0] \
                    if n == 0 else torch.zeros(shape, device=device)
            else:
                level = torch.randn(shape, generator=generator, device=device) * INIT_SD
            levels.append(level.requires_grad_(True))

        def pyramid(*parts):  # per image: each level is upsampled on its own image
            t = parts[0] * weights[0] if weights[0] != 1.0 else parts[0]
            for level, weight in zip(parts[1:], weights[1:]):
                up = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
                t = t + (up * weight if weight != 1.0 else up)
            return _to_rgb(t, color, sigmoid)

        render_key = ("laplacian", tuple(size), decorrelate, sigmoid, str(device), prior_key)  # the key has the decay
        return levels, ImageFn(pyramid, levels, render_key)

    if kind == "maco":
        magnitude = fft_scale(height, width, MACO_DEFAULT_DECAY if decay is None else decay, gain=1.0, device=device)
        if init is None:
            phase = torch.randn(batch, 3, height, width // 2 + 1, generator=generator, device=device)
        else:
            t = image_to_pixel(init, decorrelate=decorrelate, sigmoid=sigmoid, color=learned)
            phase = torch.angle(torch.fft.rfft2(t, norm="ortho"))
        phase.requires_grad_(True)
        # MaCo standardises a random phase; an image's phase is kept as it is (standardising would change it)
        standardize_phase = init is None

        def image_fn(p):  # per image: the standardisations reduce over each image's own dimensions
            p = _standardize(p) if standardize_phase else p
            unit = torch.stack([torch.cos(p), torch.sin(p)], dim=-1)
            t = spectrum_to_image(unit, magnitude, None, size, sigmoid=False)
            return _to_rgb(_standardize(t) * _MACO_STD, color, sigmoid)

        render_key = ("maco", tuple(size), decay, standardize_phase, decorrelate, sigmoid, str(device), prior_key)
        return [phase], ImageFn(image_fn, [phase], render_key)

    raise InvalidSpec("param", f"unknown parameterization {kind!r}; use one of {', '.join(PARAMS)}")


# Standard deviation of the standardised MaCo image before the sigmoid: with the colour matrix this keeps most
# pixels inside the sigmoid's responsive range (Horama standardises to unit variance, then recorrelates).
_MACO_STD = 1.0


def _standardize(t: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, t.dim()))
    mean = t.mean(dim=dims, keepdim=True)
    std = t.std(dim=dims, keepdim=True)
    return (t - mean) / (std + 1e-6)


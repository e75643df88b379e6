"""Learned priors from a user's images (issue 25): colour and spectrum statistics, and a patch prior (EPLL).

Olah et al. (2017) name three regularizers: frequency penalization, transformation robustness, and a learned prior.
The fixed priors of the parameterizations are ImageNet's (lucid's colour matrix, a 1/f spectrum scale). This module
learns them from an image set instead, in one streaming pass (one decoded image in memory at a time):

- :func:`image_statistics` -> :class:`ImageStats`: the colour decorrelation matrix made the way lucid's ImageNet
  matrix was (``params.COLOR_CORRELATION_SVD_SQRT``; captum optim's ``dataset_klt_matrix``): the square root of the
  channel covariance from its eigendecomposition, ``U diag(sqrt(lambda))``, divided by its largest column norm (the
  convention ``params.color_matrix`` uses); and the radially averaged power spectrum with a fitted power law
  ``P(f) ~ f^-alpha``. The fft parameterization scales its spectrum by ``1 / f^decay`` in amplitude, so the learned
  ``decay`` is ``alpha / 2`` (natural photographs: alpha ~ 2, lucid's decay 1). ``channels=1`` (a 1-channel model,
  which sees luminance): the statistics of the luminance; the colour matrix is then 1x1 and renders are grey
  (:meth:`ImageStats.rgb_color`).
- :func:`fit_patch_prior` -> :class:`PatchPrior`: a zero-mean Gaussian mixture over 8x8 patches with their mean
  removed (Zoran and Weiss, ICCV 2011, "From learning models of natural image patches to whole image restoration"),
  fitted by EM in torch, deterministic given a seed, with its held-out log-likelihood. ``PatchPrior.nll(images)``
  is the differentiable term behind the ``prior`` objective kind (``featureviz.engine.objectives.PatchPrior``).

Both results are plain data: ``to_dict``/``from_dict`` (JSON) and, for the patch prior, ``save``/``load`` (``.npz``
loaded with ``allow_pickle=False``); ``from_dict``/``load`` check every shape and number, since a stored file is input.

Sources are :class:`featureviz.engine.exemplars.ImageSource`: ``names`` and ``read(i) -> bytes`` (an
``ImageFolder``). Undecodable files are skipped and counted; fewer than :data:`MIN_IMAGES` decodable images (or
fewer than :data:`MIN_PATCHES` patches) is refused with one line (``FailedPrecondition``, ``DATASET_TOO_SMALL``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass
from dataclasses import field

import numpy as np
import torch
import torch.nn.functional as F

from featureviz.errors import FailedPrecondition
from featureviz.errors import InvalidSpec

__all__ = ["ImageStats", "PatchPrior", "image_statistics", "fit_patch_prior", "radial_power", "fit_decay",
           "spectrum_decay",
           "MIN_IMAGES", "MIN_PATCHES", "PATCH", "LUMA", "FolderPriors"]

MIN_IMAGES = 8  # decodable images a set needs for either prior
PATCH = 8  # patch side of the EPLL prior (Zoran and Weiss)
MIN_PATCHES = 1000  # patches the mixture needs at least (training and held out)
MAX_COMPONENTS = 64
LUMA = (0.299, 0.587, 0.114)  # the luminance a 1-channel model sees (featureviz.engine.transforms.LUMA)
SPECTRUM_CROP = 256  # the central square of at most this side is measured (no resampling: the pixel scale is kept)
MIN_SPECTRUM_SIDE = 16  # smaller images are left out of the spectrum (still in the colour statistics)
# radial bins, cycles per pixel, log-spaced from 1/256 to the corner of the spectrum; the fit uses FIT_BAND
SPECTRUM_BINS = np.geomspace(1.0 / SPECTRUM_CROP, 0.5 * math.sqrt(2.0), 33)
FIT_BAND = (1.0 / 64.0, 0.35)  # below: few bins, the crop's window; above: JPEG and demosaicing artefacts
PATCH_SIDE = 256  # images are resized (antialiased) so the shorter side is at most this before patches are taken
PATCHES_PER_IMAGE = 1000
COV_EPS = 1e-4  # added to each component's covariance: a noise floor (sd 0.01, ~2.5 of 255 levels: quantization,
# JPEG) that keeps flat image sets from making a prior infinitely sharp; the mean-removed directions have no other
FORMAT = "featureviz-patch-prior-1"
STATS_FORMAT = "featureviz-image-stats-1"
MAX_SIDE = 4096


def _too_small(what: str) -> FailedPrecondition:
    return FailedPrecondition(what, reason="DATASET_TOO_SMALL")


# ---------------------------------------------------------------------------------------------------------------
# reading a source, one image at a time


def _images(source, *, channels: int, max_side: int, shorter_side: int | None = None, skipped: dict):
    """(index, (C, H, W) float tensor in [0, 1]) of each decodable image, in order; ``channels=1``: luminance.
    ``shorter_side``: resized (Pillow's antialiased bicubic) so the shorter side is at most this."""
    from featureviz.engine.exemplars.index import IMAGE_FORMATS
    from featureviz.engine.exemplars.index import _decode
    from featureviz.engine.images import image_size

    for i in range(len(source.names)):
        size = None
        if shorter_side is not None:
            try:
                width, height = image_size(source.read(i), field="image", formats=IMAGE_FORMATS)
            except (InvalidSpec, ValueError, OSError):
                width = height = 0
            if min(width, height) > shorter_side:
                factor = shorter_side / min(width, height)
                size = (max(1, round(height * factor)), max(1, round(width * factor)))
        tensor, info = _decode(source, i, size, max_side)
        if tensor is None:
            cause, line = info
            entry = skipped.setdefault(cause, {"count": 0, "names": []})
            entry["count"] += 1
            if len(entry["names"]) < 10:
                entry["names"].append(source.names[i])
            continue
        if channels == 1:
            tensor = torch.einsum("c,chw->hw", torch.tensor(LUMA), tensor)[None]
        yield i, tensor


# ---------------------------------------------------------------------------------------------------------------
# colour and spectrum


@dataclass
class ImageStats:
    """Colour and spectrum statistics of an image set (plain data).

    ``color``: (C, C) list, ``U diag(sqrt(lambda))`` of the channel covariance (eigenvalues in decreasing order, each
    column's largest entry positive), divided by its largest column norm; ``mean``: per channel; ``decay``: the
    amplitude exponent for the fft parameterization (``alpha / 2``); ``alpha``: the fitted power-spectrum slope;
    ``freqs``/``power``: the radially averaged power spectrum (cycles per pixel; bins with no data left out);
    ``images``: how many images were measured (``spectrum_images`` of them large enough for the spectrum)."""

    channels: int
    color: list
    mean: list
    decay: float
    alpha: float
    freqs: list = field(default_factory=list)
    power: list = field(default_factory=list)
    images: int = 0
    spectrum_images: int = 0
    pixels: int = 0
    skipped: dict = field(default_factory=dict)

    def color_matrix(self, *, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.color, device=device, dtype=dtype)

    def rgb_color(self, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The (3, 3) matrix the parameterizations apply per pixel (``rgb = M @ t``): the colour matrix itself for
        3 channels; for 1 channel, the luminance direction (1, 1, 1)/sqrt(3) as the first column and zeros (grey
        images: what lucid's formula gives for a grey image set in RGB)."""
        if self.channels == 3:
            return self.color_matrix(device=device, dtype=dtype)
        out = torch.zeros(3, 3, device=device, dtype=dtype)
        out[:, 0] = float(self.color[0][0]) / math.sqrt(3.0)
        return out

    def key(self) -> str:
        """A short digest of what the parameterizations use (the colour matrix and the decay)."""
        text = json.dumps([self.channels, self.color, self.decay])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"format": STATS_FORMAT, "channels": self.channels, "color": self.color, "mean": self.mean,
                "decay": self.decay, "alpha": self.alpha, "freqs": self.freqs, "power": self.power,
                "images": self.images, "spectrum_images": self.spectrum_images, "pixels": self.pixels,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data) -> "ImageStats":
        """Checked: a stored or client-sent dict is input (InvalidSpec on ``prior``)."""
        if not isinstance(data, dict):
            raise InvalidSpec("prior", "must be image statistics (a dict from ImageStats.to_dict)")
        channels = data.get("channels")
        if channels not in (1, 3):
            raise InvalidSpec("prior.channels", "must be 1 or 3")
        color = _matrix(data.get("color"), channels, "prior.color")
        mean = _numbers(data.get("mean"), channels, "prior.mean")
        decay = _finite(data.get("decay"), "prior.decay", 0.0, 4.0)
        alpha = _finite(data.get("alpha", 2 * decay), "prior.alpha", 0.0, 8.0)
        freqs = _numbers(data.get("freqs", []), None, "prior.freqs")
        power = _numbers(data.get("power", []), len(freqs), "prior.power")
        counts = {}
        for name in ("images", "spectrum_images", "pixels"):
            value = data.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSpec(f"prior.{name}", "must be an integer >= 0")
            counts[name] = value
        skipped = data.get("skipped", {})
        return cls(channels=channels, color=color, mean=mean, decay=decay, alpha=alpha, freqs=freqs, power=power,
                   skipped=skipped if isinstance(skipped, dict) else {}, **counts)


def _finite(value, path, low, high) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidSpec(path, f"must be a finite number in [{low:g}, {high:g}]")
    return float(value)


def _numbers(values, n, path) -> list:
    if not isinstance(values, (list, tuple)) or (n is not None and len(values) != n) or len(values) > 4096:
        raise InvalidSpec(path, f"must be a list of {n if n is not None else 'at most 4096'} numbers")
    return [_finite(v, f"{path}[{i}]", -1e30, 1e30) for i, v in enumerate(values)]


def _matrix(values, n, path) -> list:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise InvalidSpec(path, f"must be a {n}x{n} matrix (a list of {n} rows)")
    rows = [_numbers(row, n, f"{path}[{i}]") for i, row in enumerate(values)]
    if not any(any(row) for row in rows):
        raise InvalidSpec(path, "must not be all zeros")
    return rows


def radial_power(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(sum of power, count) per :data:`SPECTRUM_BINS` bin of one (C, H, W) image: the central square of side
    min(H, W, 256), each channel less its mean, times a 2-D Hann window, |DFT|^2 / sum(window^2), averaged over
    channels, binned by radial frequency (cycles per pixel)."""
    c, h, w = image.shape
    side = min(h, w, SPECTRUM_CROP)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top:top + side, left:left + side].double()
    crop = crop - crop.mean(dim=(1, 2), keepdim=True)
    hann = torch.hann_window(side, periodic=False, dtype=torch.float64)
    window = hann[:, None] * hann[None, :]
    power = torch.fft.fft2(crop * window).abs().pow(2).mean(0) / window.pow(2).sum()
    fy = torch.fft.fftfreq(side, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(side, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fx * fx + fy * fy).numpy().ravel()
    which = np.digitize(radius, SPECTRUM_BINS) - 1
    inside = (which >= 0) & (which < len(SPECTRUM_BINS) - 1)
    sums = np.bincount(which[inside], weights=power.numpy().ravel()[inside], minlength=len(SPECTRUM_BINS) - 1)
    counts = np.bincount(which[inside], minlength=len(SPECTRUM_BINS) - 1)
    return sums, counts


def fit_decay(freqs, power, band=FIT_BAND) -> float:
    """alpha of ``power ~ f^-alpha``: least squares of log power on log frequency over the bins inside ``band``."""
    freqs, power = np.asarray(freqs, dtype=np.float64), np.asarray(power, dtype=np.float64)
    keep = (freqs >= band[0]) & (freqs <= band[1]) & (power > 0)
    if keep.sum() < 3:
        raise _too_small("the image set's spectrum has fewer than 3 frequency bands to fit; use images of at least "
                         f"{MIN_SPECTRUM_SIDE}x{MIN_SPECTRUM_SIDE} pixels")
    slope, _ = np.polyfit(np.log(freqs[keep]), np.log(power[keep]), 1)
    return float(-slope)


def spectrum_decay(image: torch.Tensor) -> float:
    """The fitted amplitude decay (alpha / 2) of one (C, H, W) image, as :func:`image_statistics` measures a set's."""
    sums, counts = radial_power(image)
    centres = np.sqrt(SPECTRUM_BINS[:-1] * SPECTRUM_BINS[1:])
    have = counts > 0
    return fit_decay(centres[have], sums[have] / counts[have]) / 2


def image_statistics(source, *, channels: int = 3, max_side: int = MAX_SIDE) -> ImageStats:
    """Colour and spectrum statistics of ``source`` (an ImageSource), one image in memory at a time. Refuses a set
    with fewer than :data:`MIN_IMAGES` decodable images (FailedPrecondition ``DATASET_TOO_SMALL``)."""
    if channels not in (1, 3):
        raise InvalidSpec("channels", f"must be 1 or 3, got {channels!r}")
    skipped: dict = {}
    total = np.zeros(channels)
    outer = np.zeros((channels, channels))
    pixels = 0
    bins = len(SPECTRUM_BINS) - 1
    sums, counts = np.zeros(bins), np.zeros(bins)
    images = spectrum_images = 0
    for _, image in _images(source, channels=channels, max_side=max_side, skipped=skipped):
        flat = image.reshape(channels, -1).double()
        total += flat.sum(1).numpy()
        outer += (flat @ flat.T).numpy()
        pixels += flat.shape[1]
        images += 1
        if min(image.shape[1:]) >= MIN_SPECTRUM_SIDE:
            s, n = radial_power(image)
            sums += s
            counts += n
            spectrum_images += 1
    if images < MIN_IMAGES:
        raise _too_small(f"the image set has {images} decodable image{'s' * (images != 1)}; learning a prior needs "
                         f"at least {MIN_IMAGES}")
    mean = total / pixels
    cov = outer / pixels - np.outer(mean, mean)
    color = _sqrt_color(cov)
    centres = np.sqrt(SPECTRUM_BINS[:-1] * SPECTRUM_BINS[1:])
    have = counts > 0
    freqs, power = centres[have], sums[have] / counts[have]
    alpha = fit_decay(freqs, power)
    return ImageStats(channels=channels, color=color.tolist(), mean=mean.tolist(), decay=alpha / 2, alpha=alpha,
                      freqs=freqs.tolist(), power=power.tolist(), images=images, spectrum_images=spectrum_images,
                      pixels=pixels, skipped=skipped)


def _sqrt_color(cov: np.ndarray) -> np.ndarray:
    """``U diag(sqrt(lambda))`` of a covariance (lucid's and captum's ``svd_sqrt``), eigenvalues decreasing, each
    column's largest entry positive, divided by the largest column norm."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    for j in range(vectors.shape[1]):
        if vectors[np.argmax(np.abs(vectors[:, j])), j] < 0:
            vectors[:, j] = -vectors[:, j]
    root = vectors * np.sqrt(values)[None, :]
    norm = np.linalg.norm(root, axis=0).max()
    if not norm > 0:
        raise _too_small("the image set has no colour variation (every pixel the same); a prior needs varied images")
    return root / norm


# ---------------------------------------------------------------------------------------------------------------
# the patch prior


def patches_of(images: torch.Tensor, stride: int, patch: int = PATCH) -> torch.Tensor:
    """(B, L, C*patch*patch): the patches of (B, C, H, W) images at ``stride``, each channel less its mean."""
    b, c = images.shape[:2]
    cols = F.unfold(images, kernel_size=patch, stride=stride)  # (B, C*p*p, L)
    cols = cols.reshape(b, c, patch * patch, -1)
    cols = cols - cols.mean(dim=2, keepdim=True)
    return cols.reshape(b, c * patch * patch, -1).transpose(1, 2)


@dataclass
class PatchPrior:
    """A zero-mean Gaussian mixture over mean-removed ``patch`` x ``patch`` patches of ``channels`` channels.

    ``weights`` (K,), ``covs`` (K, d, d) float64 tensors (d = channels * patch^2); ``held_out`` and ``train``: the
    mean log-likelihood per patch of the held-out and training patches (nats); ``stride``: the patch grid
    :meth:`nll` reads a render at."""

    channels: int
    weights: torch.Tensor
    covs: torch.Tensor
    patch: int = PATCH
    stride: int = 4
    held_out: float = float("nan")
    train: float = float("nan")
    images: int = 0
    patches: int = 0
    iterations: int = 0
    seed: int = 0
    skipped: dict = field(default_factory=dict)

    def __post_init__(self):
        self._cache: dict = {}
        self._whiten = None

    @property
    def dim(self) -> int:
        return self.channels * self.patch * self.patch

    @property
    def components(self) -> int:
        return int(self.weights.shape[0])

    def _factors(self, device, dtype):
        """(W (d, K*d): each component's inverse Cholesky factor transposed, side by side; const (K,): log w_k -
        0.5 (log det + d log 2 pi)), cached per device and dtype."""
        key = (str(device), dtype)
        found = self._cache.get(key)
        if found is None:
            chol = torch.linalg.cholesky(self.covs.double())
            eye = torch.eye(self.dim, dtype=torch.float64).expand_as(chol)
            inv = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^-1
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            const = torch.log(self.weights.double()) - 0.5 * (logdet + self.dim * math.log(2 * math.pi))
            w = inv.transpose(1, 2).permute(1, 0, 2).reshape(self.dim, -1)  # x @ w -> (.., K*d): L_k^-1 x
            found = (w.to(device=device, dtype=dtype), const.to(device=device, dtype=dtype))
            self._cache[key] = found
        return found

    def log_likelihood(self, patches: torch.Tensor) -> torch.Tensor:
        """log p(x) of mean-removed patches (..., d)."""
        w, const = self._factors(patches.device, patches.dtype)
        k = self.components
        y = (patches @ w).unflatten(-1, (k, self.dim))
        return torch.logsumexp(const - 0.5 * y.pow(2).sum(-1), dim=-1)

    def nll(self, images: torch.Tensor) -> torch.Tensor:
        """(B,): the mean over an image's patches (at :attr:`stride`) of -log p(patch), divided by the patch's
        dimension d (nats per pixel value, so a weight means the same for any patch size or channel count).
        ``images`` (B, 3, H, W) in [0, 1]; a 1-channel prior reads their luminance."""
        if self.channels == 1 and images.shape[1] == 3:
            luma = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
            images = torch.einsum("c,bchw->bhw", luma, images)[:, None]
        if min(images.shape[-2:]) < self.patch:
            raise InvalidSpec("size", f"the patch prior needs images of at least {self.patch}x{self.patch} pixels")
        patches = patches_of(images, self.stride, self.patch)
        return -self.log_likelihood(patches).mean(-1) / self.dim

    # ------------------------------------------------------------------------------------------- storage

    def meta(self) -> dict:
        return {"format": FORMAT, "channels": self.channels, "patch": self.patch, "stride": self.stride,
                "held_out": self.held_out, "train": self.train, "images": self.images, "patches": self.patches,
                "iterations": self.iterations, "seed": self.seed, "components": self.components,
                "skipped": self.skipped}

    def to_dict(self) -> dict:
        return self.meta() | {"weights": self.weights.tolist(), "covs": self.covs.tolist()}

    @classmethod
    def from_dict(cls, data) -> "PatchPrior":
        if not isinstance(data, dict):
            raise InvalidSpec("prior", "must be a patch prior (a dict from PatchPrior.to_dict)")
        try:
            weights = np.asarray(data.get("weights"), dtype=np.float64)
            covs = np.asarray(data.get("covs"), dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidSpec("prior", "weights and covs must be arrays of numbers") from None
        return cls._checked(data, weights, covs)

    def save(self, path: str | os.PathLike) -> None:
        """One ``.npz`` (weights, covs, the JSON meta as uint8), written to a temp file and renamed."""
        meta = np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, weights=self.weights.double().numpy(), covs=self.covs.double().numpy(), meta=meta)
        _write_atomic(os.fspath(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchPrior":
        try:
            with np.load(os.fspath(path), allow_pickle=False) as arrays:
                meta = json.loads(arrays["meta"].tobytes().decode())
                weights, covs = arrays["weights"], arrays["covs"]
        except (OSError, KeyError, ValueError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as exc:
            raise InvalidSpec("prior", f"not a readable patch prior ({type(exc).__name__})") from None
        return cls._checked(meta, weights, covs)

    @classmethod
    def _checked(cls, meta, weights: np.ndarray, covs: np.ndarray) -> "PatchPrior":
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InvalidSpec("prior", f"not a patch prior of format {FORMAT}")
        channels, patch, stride = meta.get("channels"), meta.get("patch"), meta.get("stride")
        if channels not in (1, 3) or patch not in range(2, 17) or stride not in range(1, 17):
            raise InvalidSpec("prior", "channels must be 1 or 3, patch 2..16, stride 1..16")
        d = channels * patch * patch
        if weights.ndim != 1 or not 1 <= weights.shape[0] <= MAX_COMPONENTS or covs.shape != (weights.shape[0], d, d):
            raise InvalidSpec("prior", f"weights must be (K,) with K <= {MAX_COMPONENTS}, covs (K, {d}, {d})")
        if not (np.isfinite(weights).all() and np.isfinite(covs).all() and (weights > 0).all()):
            raise InvalidSpec("prior", "weights must be finite and positive, covs finite")
        covs_t = torch.from_numpy(np.ascontiguousarray(covs, dtype=np.float64))
        if torch.linalg.cholesky_ex(covs_t).info.any():
            raise InvalidSpec("prior", "every covariance must be symmetric positive definite")
        numbers = {}
        for name in ("held_out", "train"):
            value = meta.get(name, float("nan"))
            numbers[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
                else float("nan")
        counts = {name: meta.get(name, 0) if isinstance(meta.get(name, 0), int) else 0
                  for name in ("images", "patches", "iterations", "seed")}
        skipped = meta.get("skipped", {})
        return cls(channels=channels, weights=torch.from_numpy(weights / weights.sum()), covs=covs_t, patch=patch,
                   stride=stride, skipped=skipped if isinstance(skipped, dict) else {}, **numbers, **counts)


def _reservoir_add(store: torch.Tensor, filled: int, seen: int, batch: torch.Tensor,
                   generator: torch.Generator) -> tuple[int, int]:
    """Algorithm R over the rows of ``batch``: ``store`` keeps a uniform sample of every row seen."""
    capacity = store.shape[0]
    n = batch.shape[0]
    room = min(capacity - filled, n)
    if room > 0:
        store[filled:filled + room] = batch[:room]
        filled += room
    rest = batch[room:]
    if rest.shape[0]:
        index = torch.arange(seen + room, seen + n, dtype=torch.float64) + 1
        slots = (torch.rand(rest.shape[0], generator=generator, dtype=torch.float64) * index).long()
        take = slots < capacity
        chosen, rows = slots[take].tolist(), torch.nonzero(take).flatten().tolist()
        last = dict(zip(chosen, rows))  # in order: a later row replaces an earlier one in the same place
        if last:
            store[torch.tensor(list(last))] = rest[torch.tensor(list(last.values()))]
    return filled, seen + n


def _log_resp(x: torch.Tensor, weights: torch.Tensor, covs: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(N, K) float64 log w_k N(x; 0, cov_k), in chunks of rows. The factors are float64; the (N, d) x (d, K d)
    product runs in ``x``'s dtype (float32 in EM: the Mahalanobis terms lose ~1e-6 relatively, well below the
    tolerance, for half the time)."""
    d = x.shape[1]
    chol = torch.linalg.cholesky(covs.double())
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    const = torch.log(weights.double()) - 0.5 * (logdet + d * math.log(2 * math.pi))
    eye = torch.eye(d, dtype=torch.float64).expand_as(chol)
    w = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2).permute(1, 0, 2).reshape(d, -1)
    w = w.to(x.dtype)
    out = []
    for rows in x.split(chunk):
        y = (rows @ w).unflatten(-1, (weights.shape[0], d))
        out.append(const - 0.5 * y.pow(2).sum(-1).double())
    return torch.cat(out)


def fit_patch_prior(source, *, channels: int = 3, components: int = 8, max_patches: int = 20000,
                    held_out: float = 0.1, iterations: int = 40, tolerance: float = 1e-3, seed: int = 0,
                    patch: int = PATCH, stride: int = 4, patches_per_image: int = PATCHES_PER_IMAGE,
                    shorter_side: int = PATCH_SIDE, max_side: int = MAX_SIDE, progress=None) -> PatchPrior:
    """Fit the EPLL patch prior to ``source`` (an ImageSource) by EM, deterministic for a ``seed``.

    Each decodable image (resized so its shorter side is at most ``shorter_side``) gives ``patches_per_image``
    patches at random places; a reservoir keeps a uniform sample of ``max_patches`` of all of them (memory flat in
    the number of images). A ``held_out`` fraction is set aside; EM (zero-mean components, ``COV_EPS`` on the
    diagonal) runs at most ``iterations`` iterations, until the training log-likelihood per patch gains less than
    ``tolerance``. ``progress(iteration, train_ll)`` after each."""
    if channels not in (1, 3):
        raise InvalidSpec("channels", f"must be 1 or 3, got {channels!r}")
    if not 1 <= components <= MAX_COMPONENTS:
        raise InvalidSpec("components", f"must be 1..{MAX_COMPONENTS}, got {components!r}")
    generator = torch.Generator().manual_seed(seed)
    d = channels * patch * patch
    store = torch.empty(max_patches, d, dtype=torch.float32)
    filled = seen = images = 0
    skipped: dict = {}
    for _, image in _images(source, channels=channels, max_side=max_side, shorter_side=shorter_side,
                            skipped=skipped):
        h, w = image.shape[1:]
        if h < patch or w < patch:
            continue
        images += 1
        ys = torch.randint(0, h - patch + 1, (patches_per_image,), generator=generator)
        xs = torch.randint(0, w - patch + 1, (patches_per_image,), generator=generator)
        offsets = torch.arange(patch)
        rows = (ys[:, None] + offsets[None, :])[:, :, None]  # (n, p, 1)
        cols = (xs[:, None] + offsets[None, :])[:, None, :]  # (n, 1, p)
        crops = image[:, rows, cols].permute(1, 0, 2, 3)  # (n, C, p, p)
        crops = crops.reshape(patches_per_image, channels, -1)
        crops = (crops - crops.mean(-1, keepdim=True)).reshape(patches_per_image, d)
        filled, seen = _reservoir_add(store, filled, seen, crops, generator)
    if images < MIN_IMAGES:
        raise _too_small(f"the image set has {images} decodable image{'s' * (images != 1)} of at least {patch}x{patch} "
                         f"pixels; learning a patch prior needs at least {MIN_IMAGES}")
    if filled < MIN_PATCHES:
        raise _too_small(f"the image set gives {filled} patches; the patch prior needs at least {MIN_PATCHES}")
    data = store[:filled][torch.randperm(filled, generator=generator)]
    n_test = max(1, int(round(filled * held_out)))
    test, train = data[:n_test], data[n_test:]
    weights, covs, iters, train_ll = _em(train, components, iterations, tolerance, generator, progress)
    test_ll = float(torch.logsumexp(_log_resp(test, weights, covs), dim=1).mean())
    return PatchPrior(channels=channels, weights=weights, covs=covs, patch=patch, stride=stride, held_out=test_ll,
                      train=train_ll, images=images, patches=filled, iterations=iters, seed=seed, skipped=skipped)


def _em(x: torch.Tensor, k: int, iterations: int, tolerance: float, generator, progress):
    """EM for a zero-mean full-covariance mixture over ``x`` (N, d) float32. Start: the patches sorted by energy
    (log of the squared norm, with a small seeded jitter) into ``k`` equal groups, each group's covariance: a scale
    mixture, which EM then turns into contrast and orientation components. Stops when the log-likelihood per patch
    gains less than ``tolerance`` nats per dimension. Covariances are accumulated in float32 products and kept in
    float64 with ``COV_EPS`` on the diagonal."""
    n, d = x.shape
    eye = torch.eye(d, dtype=torch.float64) * COV_EPS
    energy = torch.log(x.double().pow(2).sum(1) + 1e-12) + 1e-3 * torch.randn(n, generator=generator,
                                                                             dtype=torch.float64)
    order = torch.argsort(energy)
    covs = torch.stack([(x[g].T @ x[g]).double() / max(len(g), 1) + eye for g in order.tensor_split(k)])
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    whole = (x.T @ x).double() / n + eye
    previous = -math.inf
    done = 0
    for done in range(1, iterations + 1):
        log_p = _log_resp(x, weights, covs)
        total = torch.logsumexp(log_p, dim=1, keepdim=True)
        ll = float(total.mean())
        resp = torch.exp(log_p - total)  # (N, K)
        counts = resp.sum(0)
        weights = (counts / n).clamp_min(1e-8)
        weights = weights / weights.sum()
        weighted = x[None] * resp.T.to(x.dtype)[:, :, None]  # (K, N, d)
        covs = torch.bmm(weighted.transpose(1, 2), x.expand(k, n, d)).double() / counts.clamp_min(1e-8)[:, None, None]
        covs = (covs + covs.transpose(1, 2)) / 2 + eye
        empty = counts < 1e-3 * n / k  # a component that lost its patches restarts at the whole set's covariance
        if empty.any():
            covs[empty] = whole
        if progress is not None:
            progress(done, ll)
        if done > 1 and (ll - previous) / d < tolerance:
            break
        previous = ll
    ll = float(torch.logsumexp(_log_resp(x, weights, covs), dim=1).mean())
    return weights, covs, done, ll


# ---------------------------------------------------------------------------------------------------------------
# a local resolver: prior:NAME -> the patch prior fitted on a folder (the command line's --prior-images)


class FolderPriors:
    """``prior:NAME`` terms resolved against folders given by the user (``--prior-images [NAME=]DIR``): a dict
    lookup; a name in a spec never becomes a path. Each folder's statistics and patch prior are computed once, on
    first use, and cached in ``cache_dir`` (``<model cache>/priors/``), keyed by the folder's content digest,
    the channels and the fit's settings."""

    def __init__(self, folders: dict, *, cache_dir: str | os.PathLike | None = None, channels: int = 3, **fit):
        from featureviz.engine.exemplars import ImageFolder

        self.sources = {name: ImageFolder(folder) for name, folder in folders.items()}
        self.cache_dir = cache_dir
        self.channels = channels
        self.fit = fit
        self._fitted: dict = {}
        self._stats: dict = {}
        self._digests: dict = {}

    def names(self) -> list[str]:
        return sorted(self.sources)

    def __call__(self, name: str) -> PatchPrior:
        found = self._fitted.get(name)
        if found is None:
            found = self._fitted[name] = self._load_or_fit(name)
        return found

    def stats(self, name: str) -> ImageStats:
        found = self._stats.get(name)
        if found is None:
            path = self._path(name, "stats", ".json")
            if path is not None and os.path.exists(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        found = ImageStats.from_dict(json.load(f))
                except (OSError, ValueError, InvalidSpec):
                    found = None
            if found is None:
                found = image_statistics(self._source(name), channels=self.channels)
                if path is not None:
                    _write_atomic(path, json.dumps(found.to_dict()).encode())
            self._stats[name] = found
        return found

    def _source(self, name: str):
        from featureviz.errors import NotFound
        from featureviz.errors import echo

        if name not in self.sources:
            known = ", ".join(self.names()) or "none; give --prior-images NAME=DIR"
            raise NotFound(f"no image set named {echo(name)} for a prior; known: {known}", reason="PRIOR_NOT_FOUND")
        return self.sources[name]

    def _path(self, name: str, kind: str, suffix: str) -> str | None:
        if self.cache_dir is None:
            return None
        source = self._source(name)
        if name not in self._digests:
            self._digests[name] = source.digest()
        key = json.dumps([kind, FORMAT, STATS_FORMAT, self._digests[name], self.channels, sorted(self.fit.items())])
        folder = os.path.join(os.fspath(self.cache_dir), "priors")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest() + suffix)

    def _load_or_fit(self, name: str) -> PatchPrior:
        source = self._source(name)
        path = self._path(name, "patch", ".npz")
        if path is not None and os.path.exists(path):
            try:
                return PatchPrior.load(path)
            except InvalidSpec:
                pass  # refit over a damaged file
        prior = fit_patch_prior(source, channels=self.channels, **self.fit)
        if path is not None:
            prior.save(path)
        return prior


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

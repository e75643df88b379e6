"""Synthetic image sets with known statistics, for the learned priors (featureviz.engine.priors): Gaussian images
with a power-law spectrum and a known colour covariance, and dead-leaves images (occluding discs with power-law
radii: piecewise smooth, with edges and a ~1/f^2 power spectrum, a standard model of natural image statistics).
Written as real PNG files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

__all__ = ["power_law_image", "dead_leaves", "write_pngs", "png"]


def power_law_image(size: int, decay: float, mixing, seed: int) -> np.ndarray:
    """(H, W, 3) float image: three independent Gaussian fields with amplitude spectrum 1/f^decay (random phase),
    each standardized, mixed by ``mixing`` (3x3: pixel = mixing @ fields), plus 0.5. Colour covariance =
    mixing mixing^T (before clipping and 8-bit rounding)."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amplitude = f ** -decay
    amplitude[0, 0] = 0.0
    fields = []
    for _ in range(3):
        spectrum = amplitude * (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape))
        field = np.fft.irfft2(spectrum, s=(size, size))
        fields.append((field - field.mean()) / field.std())
    fields = np.stack(fields, -1)
    return fields @ np.asarray(mixing, dtype=np.float64).T + 0.5


def dead_leaves(size: int, seed: int, *, discs: int = 600, rmin: float = 2.0, rmax: float = 80.0,
                grey: bool = False) -> np.ndarray:
    """(H, W, 3) float image in [0, 1]: discs with radii ~ r^-3 between rmin and rmax, drawn back to front, each a
    random colour with a little shading, then a light blur (the optics of a camera)."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 0.5)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(discs):
        u = rng.random()
        r = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5  # pdf ~ r^-3
        cy, cx = rng.random(2) * size
        colour = rng.random(3) * 0.8 + 0.1
        if grey:
            colour[:] = colour[0]
        else:  # natural colours are correlated: a shared brightness plus a smaller hue
            colour = 0.75 * colour[0] + 0.25 * colour
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        shade = 1.0 + 0.15 * ((xx[mask] - cx) / r)
        image[mask] = np.clip(colour[None, :] * shade[:, None], 0.0, 1.0)
    # a 3x3 binomial blur
    kernel = np.array([1.0, 2.0, 1.0]) / 4.0
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    image = sum(kernel[i] * padded[i:i + size, 1:-1] for i in range(3))
    padded = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    image = sum(kernel[i] * padded[:, i:i + size] for i in range(3))
    return image


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    array = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array if array.ndim == 2 or array.shape[-1] != 1 else array[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(folder: Path, images) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(png(image))
    return folder

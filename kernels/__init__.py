"""Pure tensor operations for the hot paths outside the model.

Each operation has one API (the signature of its torch reference in ``reference.py``); the implementation
is chosen at every call by device and by ``FEATUREVIZ_KERNELS=auto|torch|triton`` (see ``_dispatch.py``):
Triton on CUDA by default, the reference on CPU. The Triton modules (``fft_image``, ``resample``) are imported
on first use, so importing this package does not import triton.
"""

from __future__ import annotations

import torch

from . import _dispatch
from . import reference
from .reference import rfft2_freqs

__all__ = ["spectrum_to_image", "affine_resample", "nearest_resample", "rfft2_freqs"]


# Above this many images ``auto`` renders spectra with the torch reference (cuFFT): on an H200 (bench/RESULTS.md,
# 2026-11-30) the Triton kernel took 0.51-0.52 ms forward + backward at 1, 4 and 16 images of 224 px against
# cuFFT's 0.88-0.89 ms, and 1.99 ms against 0.90 ms at 64.
SPECTRUM_TRITON_MAX_BATCH = 16


def _first_unsupported(checks: dict[str, bool]) -> str | None:
    return next((what for what, bad in checks.items() if bad), None)


def _grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _not_fp32(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype != torch.float32 for t in tensors)


def spectrum_to_image(
    spectrum: torch.Tensor,
    scale: torch.Tensor,
    color: torch.Tensor | None,
    size: tuple[int, int],
    *,
    sigmoid: bool = True,
) -> torch.Tensor:
    """Half spectrum (B, C, H, W//2+1, 2) -> image (B, Co, H, W); see ``reference.spectrum_to_image``.

    The Triton kernel takes float32 and gives gradients for ``spectrum`` and ``scale``; a ``color`` that
    requires grad, or other dtypes, go to the reference under ``auto`` and are an error under ``triton``.
    """
    unsupported = _first_unsupported({
        "inputs other than float32": _not_fp32(spectrum, scale),
        "a gradient for color": _grad(color),
        "a scale per image or channel": any(n != 1 for n in scale.shape[:-2]),
    })
    slower = spectrum.dim() == 5 and spectrum.shape[0] > SPECTRUM_TRITON_MAX_BATCH
    if _dispatch.use_triton("spectrum_to_image", (spectrum, scale, color), unsupported, slower=slower):
        from . import fft_image

        return fft_image.spectrum_to_image(spectrum, scale, color, size, sigmoid=sigmoid)
    return reference.spectrum_to_image(spectrum, scale, color, size, sigmoid=sigmoid)


def affine_resample(
    image: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int],
    *,
    border: float = 0.5,
    matrix: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bilinear resample under per-image inverse affine maps + colour map; see ``reference.affine_resample``.

    The Triton kernel takes a float32 image and gives the gradient for ``image`` only; ``theta``,
    ``matrix`` or ``bias`` requiring grad, or other dtypes, go to the reference under ``auto`` and are an
    error under ``triton``.
    """
    unsupported = _first_unsupported({
        "images other than float32": _not_fp32(image),
        "a gradient for theta": _grad(theta),
        "a gradient for matrix": _grad(matrix),
        "a gradient for bias": _grad(bias),
    })
    if _dispatch.use_triton("affine_resample", (image, theta, matrix, bias), unsupported):
        from . import resample

        return resample.affine_resample(image, theta, size, border=border, matrix=matrix, bias=bias)
    return reference.affine_resample(image, theta, size, border=border, matrix=matrix, bias=bias)


def nearest_resample(
    image: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int],
    *,
    border: float = 0.5,
    matrix: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``affine_resample`` with the nearest pixel instead of bilinear weights: exact for whole-pixel
    translations (the jitter steps of a stack that resamples after each step), where bilinear sampling gives the
    same numbers at two to three times the cost. The torch reference on every device."""
    return reference.affine_resample(image, theta, size, border=border, matrix=matrix, bias=bias, mode="nearest")

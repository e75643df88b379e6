"""Torch reference implementations of the two hot paths outside the model.

This file is the specification. The Triton kernels (``featureviz.kernels.fft_image``,
``featureviz.kernels.resample``) implement exactly these maps; tests, the CPU path and the
benchmarks import these functions and none copies them.

1. ``spectrum_to_image``: the Fourier / colour-decorrelated parameterization (Olah et al. 2017; lucid
   ``param/spatial.py`` and ``param/color.py``)::

       X      = complex(spectrum[..., 0], spectrum[..., 1]) * scale          # (B, C, H, W//2+1)
       t      = irfft2(X, s=(H, W), norm="ortho")                            # (B, C, H, W)
       rgb    = color @ t        (per pixel, over channels)                  # (B, Co, H, W)
       image  = sigmoid(rgb)     (when sigmoid=True)

   The half spectrum is *not* required to be Hermitian. The map is defined as the real part of the
   inverse DFT with Hermitian weights along W (column 0 and, for even W, column W/2 count once, the
   others twice), i.e.::

       t[h, w] = 1/sqrt(H W) * sum_{k < H} sum_{l <= W//2} c_l * Re(X[k, l] * exp(2 pi i (k h / H + l w / W)))

   which is what ``torch.fft.irfft2`` computes on the CPU (pocketfft takes the real part of the DC and
   Nyquist columns after the transform along H). cuFFT may differ on non-Hermitian inputs
   (pytorch/pytorch#154496), so GPU code is tested against this definition, not against cuFFT.

2. ``affine_resample``: pad / jitter / scale / rotate / resize as ONE inverse affine map per image, one
   bilinear resample with a constant border, then a per-pixel colour map (channel order, grey, mean/std)::

       grid = affine_grid(theta, (B, C, Ho, Wo), align_corners=False)       # output -> input coords in [-1, 1]
       s    = grid_sample(image - border, grid, bilinear, zeros, align_corners=False) + border
       out  = matrix @ s + bias  (per pixel, over channels)                  # (B, Co, Ho, Wo)

   Outside the input the sample is exactly ``border`` (a constant pad of value ``border``): the
   bilinear weights of the in-bounds neighbours multiply ``p - border``. ``mode="nearest"`` (the reference
   only) takes the nearest pixel instead: exact for whole-pixel translations (the jitter steps of a stack that
   resamples after each step), which on a CPU are done as slices (``shift_resample``), the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spectrum_to_image", "affine_resample", "affine_grid", "whole_pixel_shifts", "shift_resample",
           "rfft2_freqs", "check_spectrum_args", "check_resample_args"]


def rfft2_freqs(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Radial frequency |f| of each bin of an rfft2 half spectrum, shape (H, W//2+1) (lucid ``rfft2d_freqs``)."""
    fy = torch.fft.fftfreq(height, device=device, dtype=dtype)[:, None]
    fx = torch.fft.rfftfreq(width, device=device, dtype=dtype)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def spectrum_to_image(
    spectrum: torch.Tensor,
    scale: torch.Tensor,
    color: torch.Tensor | None,
    size: tuple[int, int],
    *,
    sigmoid: bool = True,
) -> torch.Tensor:
    """Half spectrum -> image.

    Args:
        spectrum: real tensor (B, C, H, W//2+1, 2), real and imaginary parts.
        scale: real tensor (H, W//2+1), multiplies every bin (the 1/f^decay scaling and any gain).
        color: (Co, C) matrix applied per pixel after the inverse DFT, or None for the identity.
        size: (H, W) of the image; W is needed because W//2+1 is the same for W = 2n and 2n+1.
        sigmoid: apply the logistic sigmoid at the end.

    Returns:
        (B, Co, H, W) tensor of spectrum's dtype.
    """
    height, width = check_spectrum_args(spectrum, size)
    x = torch.complex(spectrum[..., 0], spectrum[..., 1]) * scale
    t = torch.fft.irfft2(x, s=(height, width), norm="ortho")
    if color is not None:
        t = torch.einsum("oc,bchw->bohw", color.to(t.dtype), t)
    return torch.sigmoid(t) if sigmoid else t


# On a CPU, nearest resamples of whole-pixel translations of up to this many images are slices (one per image);
# on CUDA, and for larger batches, one grid_sample launch does them all.
SHIFT_MAX_BATCH = 64


def affine_resample(
    image: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int],
    *,
    border: float = 0.5,
    matrix: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Bilinear resample of each image under its own inverse affine map, then a per-pixel colour map.

    Args:
        image: (B, C, H, W).
        theta: (B, 2, 3) inverse affine matrices, mapping output coordinates to input coordinates in
            the normalized [-1, 1] convention of ``F.affine_grid(..., align_corners=False)``. A device
            tensor: building it needs no host sync.
        size: (Ho, Wo) of the output.
        border: the constant value of the image outside its bounds.
        matrix: (Co, C) colour map applied per pixel after sampling (channel order, grey, 1/std), or None.
        bias: (Co,) added after ``matrix`` (-mean/std), or None.
        mode: ``"bilinear"``, or ``"nearest"`` (exact for whole-pixel translations).

    Returns:
        (B, Co, Ho, Wo).
    """
    check_resample_args(image, theta, size)
    b, c = image.shape[:2]
    shifts = None
    if mode == "nearest" and not image.is_cuda and b <= SHIFT_MAX_BATCH:
        shifts = whole_pixel_shifts(theta, image.shape[2:], size)
    if shifts is not None:  # whole-pixel translations (the jitters): a copy, no grid
        out = shift_resample(image, shifts, size, border=border)
    elif b == 1 and c > 1 and not image.is_cuda and torch.get_num_threads() > 1:
        # one image on a CPU: torch's grid_sample spreads its work over the batch only (its backward at
        # least), so sample the channels as a batch of one-channel images sharing the grid (stride 0): the same
        # numbers, 1.5x faster on 2 threads (2.8 -> 1.85 ms forward + backward at 248 px)
        grid = affine_grid(theta.to(image.dtype), size).expand(c, *size, 2)
        flat = F.grid_sample((image - border).view(c, 1, *image.shape[2:]), grid, mode=mode, padding_mode="zeros",
                             align_corners=False)
        out = flat.view(1, c, *flat.shape[2:]) + border
    else:
        out = F.grid_sample(image - border, affine_grid(theta.to(image.dtype), size), mode=mode,
                            padding_mode="zeros", align_corners=False) + border
    if matrix is not None:
        out = torch.einsum("oc,bchw->bohw", matrix.to(out.dtype), out)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    return out


def whole_pixel_shifts(theta: torch.Tensor, image_size: tuple[int, int], size: tuple[int, int]
                       ) -> list[tuple[int, int]] | None:
    """The (dy, dx) pixel offsets when every map of ``theta`` (B, 2, 3) is a translation at the input's own pixel
    size (output pixel (i, j) samples input pixel (i + dy, j + dx)), else None. Nearest sampling of such a map is
    exactly that copy: offsets within 0.25 px of a whole pixel and scales off by under 1e-3 px across the image (a
    float32 theta: 224 / 248 is 2e-8 off) put every sample nearest to the shifted pixel. Reads theta on the host."""
    (h, w), (out_h, out_w) = image_size, size
    t = theta.detach().to("cpu", torch.float64)
    linear = t[:, :, :2]
    unit = torch.tensor([[out_w / w, 0.0], [0.0, out_h / h]], dtype=torch.float64)
    if not torch.allclose(linear, unit.expand_as(linear), rtol=0, atol=1e-3 / max(h, w, out_h, out_w)):
        return None
    # normalised -> pixels (align_corners=False): x_in = j + (W - Wo + t_x W) / 2, the same along y
    ox = (w - out_w + t[:, 0, 2] * w) / 2
    oy = (h - out_h + t[:, 1, 2] * h) / 2
    rx, ry = torch.round(ox), torch.round(oy)
    if (ox - rx).abs().max() > 0.25 or (oy - ry).abs().max() > 0.25:
        return None
    return list(zip(ry.long().tolist(), rx.long().tolist()))


def shift_resample(image: torch.Tensor, shifts: list[tuple[int, int]], size: tuple[int, int], *,
                   border: float = 0.5) -> torch.Tensor:
    """Whole-pixel shifts by slicing: output (i, j) of image b is ``image[b, :, i + dy, j + dx]``, ``border``
    outside the image. The numbers of a nearest resample of those translations without a sampling grid: for one
    248 px image on one EPYC core, forward and backward (with a clone and a sum), 0.75 ms against grid_sample's
    1.3-1.6 ms."""
    h, w = image.shape[2:]
    out_h, out_w = int(size[0]), int(size[1])
    dys, dxs = [d[0] for d in shifts], [d[1] for d in shifts]
    # pad just enough that every image's window lies inside, then one slice per image
    top, left = max(0, -min(dys)), max(0, -min(dxs))
    bottom, right = max(0, max(dys) + out_h - h), max(0, max(dxs) + out_w - w)
    if top or left or bottom or right:
        image = F.pad(image, [left, right, top, bottom], value=border)
    rows = [image[b: b + 1, :, dy + top: dy + top + out_h, dx + left: dx + left + out_w]
            for b, (dy, dx) in enumerate(shifts)]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, Ho, Wo), align_corners=False)`` by broadcasting, a (B, Ho, Wo, 2) view:
    the same numbers to float rounding, about 10x faster on a CPU (F.affine_grid's batched matmul of a
    (B, Ho*Wo, 3) base grid by (3, 2) took 15 ms for 10 images of 248 px on one EPYC core, this 1.3 ms)."""
    out_h, out_w = int(size[0]), int(size[1])
    xs = (torch.arange(out_w, dtype=theta.dtype, device=theta.device) * 2 + 1) / out_w - 1
    ys = (torch.arange(out_h, dtype=theta.dtype, device=theta.device) * 2 + 1) / out_h - 1
    t = theta[:, :, None, None, :]  # (B, 2, 1, 1, 3)
    grid = t[..., 0] * xs + t[..., 1] * ys[:, None] + t[..., 2]  # (B, 2, Ho, Wo): x and y
    return grid.permute(0, 2, 3, 1)


# Argument checks shared by the references and the Triton launchers, so both reject the same inputs the same way.


def check_spectrum_args(spectrum: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """Raise ValueError unless ``spectrum`` is (B, C, H, W//2+1, 2) for ``size`` = (H, W); return (H, W)."""
    height, width = int(size[0]), int(size[1])
    if spectrum.dim() != 5 or spectrum.shape[-1] != 2:
        raise ValueError(f"spectrum must be (B, C, H, W//2+1, 2), got {tuple(spectrum.shape)}")
    if spectrum.shape[2] != height or spectrum.shape[3] != width // 2 + 1:
        raise ValueError(f"spectrum {tuple(spectrum.shape)} does not match size {size}: want H={height}, "
                         f"W//2+1={width // 2 + 1}")
    return height, width


def check_resample_args(image: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """Raise ValueError unless ``image`` is (B, C, H, W), ``theta`` is (B, 2, 3) and ``size`` is positive."""
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    b = image.shape[0]
    if theta.shape != (b, 2, 3):
        raise ValueError(f"theta must be ({b}, 2, 3), got {tuple(theta.shape)}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    return out_h, out_w

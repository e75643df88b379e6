"""Affine resample + colour map in one Triton kernel per direction (the random transforms of a render step).

Forward, the map of ``reference.affine_resample`` (``F.affine_grid`` + ``F.grid_sample``, bilinear,
``align_corners=False``, constant border ``beta``). For output pixel (i, j) of image b::

    xn, yn   = (2 j + 1) / Wo - 1,  (2 i + 1) / Ho - 1
    gx, gy   = theta_b @ (xn, yn, 1)                            (inverse affine, normalized coordinates)
    ix, iy   = ((gx + 1) W - 1) / 2,  ((gy + 1) H - 1) / 2      (source position in pixels)
    s_c      = beta + sum_{(y, x) in bounds} k(ix - x) k(iy - y) (img_c[y, x] - beta),   k(d) = max(0, 1 - |d|)
    out_o    = sum_c matrix[o, c] s_c + bias_o

All channels of a pixel share the coordinate arithmetic: lanes hold (pixel, channel) pairs.

Backward (image only; theta, matrix and bias are constants), as a deterministic gather rather than a
scatter with atomics: input pixel (y, x) receives k(ix - x) k(iy - y) (matrix^T g)[p] from every output
pixel p whose sample lies within one pixel of it. Those p form a parallelogram, the preimage of the square
|ix - x| < 1, |iy - y| < 1 under the pixel-space affine map (j, i) -> (ix, iy); each program loops over its
bounding box (size from theta, at most the whole output for a singular theta) and recomputes each
candidate's weight with the forward's own formula, so no candidate with a non-zero weight is missed and
candidates outside get weight zero. At 224 -> 224 with +-10 degrees and 0.9-1.1 scale that is 4x4 candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _dispatch
from .reference import check_resample_args

__all__ = ["affine_resample", "affine_resample_forward", "affine_resample_backward", "AffineResampleFunction"]

# Candidate windows are widened by this many pixels so float32 rounding of the preimage never drops a tap.
_WINDOW_MARGIN = 1e-2


@triton.jit
def _source_coords(Theta_ptr, b, i, j, H, W, HO, WO):
    """(ix, iy): where output pixel (i, j) of image b samples its input, in input pixel units."""
    t = Theta_ptr + b * 6
    xn = (2 * j + 1).to(tl.float32) / WO - 1.0
    yn = (2 * i + 1).to(tl.float32) / HO - 1.0
    gx = tl.load(t + 0) * xn + tl.load(t + 1) * yn + tl.load(t + 2)
    gy = tl.load(t + 3) * xn + tl.load(t + 4) * yn + tl.load(t + 5)
    return ((gx + 1.0) * W - 1.0) * 0.5, ((gy + 1.0) * H - 1.0) * 0.5


@triton.jit
def _tap(base, xx, yy, weight, H, W, p_mask, c_mask, border):
    """weight * (img[:, yy, xx] - border) for each (pixel, channel) lane, 0 where (yy, xx) is outside the image."""
    inside = p_mask & (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
    v = tl.load(base + (yy * W + xx)[:, None], mask=inside[:, None] & c_mask[None, :], other=0.0)
    return tl.where(inside[:, None], weight[:, None] * (v - border), 0.0)


@triton.jit
def _affine_resample_forward_kernel(
    # pointers: image (B, C, H, W), theta (B, 2, 3), matrix (CO, C), bias (CO,), output (B, CO, HO, WO)
    X_ptr, Theta_ptr, M_ptr, Bias_ptr, Out_ptr,
    # sizes and the border value
    H, W, HO, WO, border,
    # meta-parameters
    C: tl.constexpr, CO: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p_mask = p < HO * WO
    ix, iy = _source_coords(Theta_ptr, b, p // WO, p % WO, H, W, HO, WO)
    # clamping keeps far-away samples (all four taps outside, value = border) in int32 range
    ix = tl.minimum(tl.maximum(ix, -2.0), W + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), H + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    wx1 = ix - x0f
    wy1 = iy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    c = tl.arange(0, C_PAD)
    c_mask = c < C
    base = X_ptr + b * C * H * W + c[None, :] * H * W

    # load data: four taps per (pixel, channel); out-of-bounds taps contribute nothing to s - border
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    s = _tap(base, x0, y0, wx0 * wy0, H, W, p_mask, c_mask, border)
    s += _tap(base, x0 + 1, y0, wx1 * wy0, H, W, p_mask, c_mask, border)
    s += _tap(base, x0, y0 + 1, wx0 * wy1, H, W, p_mask, c_mask, border)
    s += _tap(base, x0 + 1, y0 + 1, wx1 * wy1, H, W, p_mask, c_mask, border)
    s += border

    # colour map (channel order, 1/std, -mean/std) in the same pass, then write-back
    for o in tl.static_range(CO):
        m = tl.load(M_ptr + o * C + c, mask=c_mask, other=0.0)
        out = tl.sum(s * m[None, :], axis=1) + tl.load(Bias_ptr + o)
        tl.store(Out_ptr + (b * CO + o) * HO * WO + p, out, mask=p_mask)


@triton.jit
def _affine_resample_backward_kernel(
    # pointers: dL/dout (B, CO, HO, WO), theta (B, 2, 3), matrix (CO, C), dL/dimage (B, C, H, W)
    G_ptr, Theta_ptr, M_ptr, DX_ptr,
    # sizes
    H, W, HO, WO,
    # meta-parameters
    C: tl.constexpr, CO: tl.constexpr, CO_PAD: tl.constexpr, BLOCK: tl.constexpr, MARGIN: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    q_mask = q < H * W
    y = (q // W).to(tl.float32)
    x = (q % W).to(tl.float32)

    # the pixel-space map (j, i) -> (ix, iy) = (a j + bb i + c0, d j + e i + f0), and its inverse
    t = Theta_ptr + b * 6
    a = tl.load(t + 0) * W / WO
    bb = tl.load(t + 1) * W / HO
    c0 = 0.5 * W * (tl.load(t + 0) * (1.0 / WO - 1.0) + tl.load(t + 1) * (1.0 / HO - 1.0) + tl.load(t + 2)) \
        + 0.5 * (W - 1.0)
    d = tl.load(t + 3) * H / WO
    e = tl.load(t + 4) * H / HO
    f0 = 0.5 * H * (tl.load(t + 3) * (1.0 / WO - 1.0) + tl.load(t + 4) * (1.0 / HO - 1.0) + tl.load(t + 5)) \
        + 0.5 * (H - 1.0)
    det = a * e - bb * d
    singular = tl.abs(det) < 1e-6
    inv = 1.0 / tl.where(singular, 1.0, det)
    # half-extents of the preimage of the unit square, in output pixels, and the candidate window
    ej = (tl.abs(e) + tl.abs(bb)) * tl.abs(inv) + MARGIN
    ei = (tl.abs(d) + tl.abs(a)) * tl.abs(inv) + MARGIN
    full_j = singular | (2.0 * ej + 1.0 >= WO)
    full_i = singular | (2.0 * ei + 1.0 >= HO)
    nj = tl.where(full_j, WO, tl.ceil(2.0 * ej).to(tl.int32) + 1)
    ni = tl.where(full_i, HO, tl.ceil(2.0 * ei).to(tl.int32) + 1)
    cj = (e * (x - c0) - bb * (y - f0)) * inv
    ci = (a * (y - f0) - d * (x - c0)) * inv
    j_lo = tl.where(full_j, 0, tl.floor(cj - ej).to(tl.int32) + 1)
    i_lo = tl.where(full_i, 0, tl.floor(ci - ei).to(tl.int32) + 1)

    o = tl.arange(0, CO_PAD)
    o_mask = o < CO
    g_base = G_ptr + b * CO * HO * WO + o[None, :] * HO * WO
    acc = tl.zeros((BLOCK, CO_PAD), dtype=tl.float32)
    for dj in range(0, nj):
        j = j_lo + dj
        for di in range(0, ni):
            i = i_lo + di
            valid = q_mask & (j >= 0) & (j < WO) & (i >= 0) & (i < HO)
            ix, iy = _source_coords(Theta_ptr, b, i, j, H, W, HO, WO)
            k = tl.maximum(1.0 - tl.abs(ix - x), 0.0) * tl.maximum(1.0 - tl.abs(iy - y), 0.0)
            hit = valid & (k > 0.0)
            g = tl.load(g_base + (i * WO + j)[:, None], mask=hit[:, None] & o_mask[None, :], other=0.0)
            acc += tl.where(hit, k, 0.0)[:, None] * g

    # transposed colour map, write-back: dL/dimage_c = sum_o matrix[o, c] acc_o
    for c in tl.static_range(C):
        m = tl.load(M_ptr + o * C + c, mask=o_mask, other=0.0)
        tl.store(DX_ptr + (b * C + c) * H * W + q, tl.sum(acc * m[None, :], axis=1), mask=q_mask)


def _colour_args(matrix, bias, channels, device):
    matrix = torch.eye(channels, device=device) if matrix is None else matrix.float().contiguous()
    if matrix.dim() != 2 or matrix.shape[1] != channels:
        raise ValueError(f"matrix must be (Co, {channels}), got {tuple(matrix.shape)}")
    bias = torch.zeros(matrix.shape[0], device=device) if bias is None else bias.float().contiguous()
    if bias.shape != (matrix.shape[0],):
        raise ValueError(f"bias must be ({matrix.shape[0]},), got {tuple(bias.shape)}")
    return matrix, bias


def affine_resample_forward(image, theta, size, *, border=0.5, matrix=None, bias=None):
    """Launch the forward kernel: image (B, C, H, W) fp32, theta (B, 2, 3) -> (B, Co, Ho, Wo)."""
    out_h, out_w = check_resample_args(image, theta, size)
    batch, channels, height, width = image.shape
    _dispatch.require_runnable(_affine_resample_forward_kernel, image)
    matrix, bias = _colour_args(matrix, bias, channels, image.device)
    image, theta = image.float().contiguous(), theta.float().contiguous()
    out = torch.empty(batch, matrix.shape[0], out_h, out_w, device=image.device, dtype=torch.float32)
    block = 256  # 95 registers, no spills on sm_90 (bench/compile_check.py)
    _affine_resample_forward_kernel[(batch, triton.cdiv(out_h * out_w, block))](
        image, theta, matrix, bias, out,
        height, width, out_h, out_w, float(border),
        C=channels, CO=matrix.shape[0], C_PAD=triton.next_power_of_2(channels), BLOCK=block, num_warps=4,
    )
    return out


def affine_resample_backward(grad_out, theta, image_shape, *, matrix=None):
    """Launch the backward kernel: dL/dout (B, Co, Ho, Wo) -> dL/dimage of ``image_shape`` (B, C, H, W)."""
    batch, channels, height, width = image_shape
    out_h, out_w = grad_out.shape[2:]
    matrix, _ = _colour_args(matrix, None, channels, grad_out.device)
    grad_out, theta = grad_out.float().contiguous(), theta.float().contiguous()
    grad_image = torch.empty(image_shape, device=grad_out.device, dtype=torch.float32)
    block = 128  # 56 registers on sm_90; the candidate loop is latency-bound, so many warps in flight help
    _affine_resample_backward_kernel[(batch, triton.cdiv(height * width, block))](
        grad_out, theta, matrix, grad_image,
        height, width, out_h, out_w,
        C=channels, CO=matrix.shape[0], CO_PAD=triton.next_power_of_2(matrix.shape[0]), BLOCK=block,
        MARGIN=_WINDOW_MARGIN, num_warps=4,
    )
    return grad_image


class AffineResampleFunction(torch.autograd.Function):
    """Autograd wrapper: gradient for the image only (theta, matrix and bias are constants of a step)."""

    @staticmethod
    def forward(ctx, image, theta, size, border, matrix, bias):
        out = affine_resample_forward(image, theta, size, border=border, matrix=matrix, bias=bias)
        ctx.save_for_backward(theta, matrix)
        ctx.image_shape = tuple(image.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        theta, matrix = ctx.saved_tensors
        grad_image = affine_resample_backward(grad_out, theta, ctx.image_shape, matrix=matrix)
        return grad_image, None, None, None, None, None


def affine_resample(image, theta, size, *, border=0.5, matrix=None, bias=None):
    """The Triton path of ``reference.affine_resample`` (same arguments)."""
    out_h, out_w = check_resample_args(image, theta, size)
    return AffineResampleFunction.apply(image, theta, (out_h, out_w), float(border), matrix, bias)

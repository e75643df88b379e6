"""Spectrum -> image in one Triton kernel per direction (the Fourier, colour-decorrelated parameterization).

Forward (Olah et al., Distill 2017; lucid ``param/spatial.py`` + ``param/color.py``), the map of
``reference.spectrum_to_image`` for X_c = (Sr_c + i Si_c) * scale, image size H x W, Wf = W//2 + 1::

    Y_c[h, l]  = sum_k  exp(2 pi i h k / H) X_c[k, l]                   (complex inverse DFT along H)
    Y'_o       = sum_c color[o, c] Y_c                                  (colour commutes with the DFT)
    t_o[h, w]  = sum_l  Re(Y'_o[h, l] * c_l exp(2 pi i l w / W)) / sqrt(H W)   (real output along W)
    image_o    = sigmoid(t_o)

with c_l = 1 for the DC column and (even W) the Nyquist column, 2 otherwise. As real matmuls with
CH = cos(2 pi h k / H), SH = sin(...), CW = c_l cos(2 pi l w / W) / sqrt(HW), NSW = -c_l sin(...) / sqrt(HW)::

    Yr = CH Xr - SH Xi,   Yi = SH Xr + CH Xi,   t = Yr CW + Yi NSW.

Backward (the adjoint; CH and SH are symmetric), from g_o = dL/dimage_o * y_o (1 - y_o)::

    dYr'_o = g_o CW^T,  dYi'_o = g_o NSW^T,  dY_c = sum_o color[o, c] dY'_o
    dXr_c = CH dYr_c + SH dYi_c,  dXi_c = CH dYi_c - SH dYr_c
    dSr_c = scale * dXr_c,  dSi_c = scale * dXi_c,  dscale = sum_{b,c} (dXr_c Sr_c + dXi_c Si_c)

Each program owns a band of rows (forward) or of spectrum columns (backward) of one image for all its
channels: the first phase writes its band of Y (dY) to a private scratch buffer, a CTA barrier, the second
phase reads it back. Every output depends on every input, so a band needs the whole input image; reading it
once per band from L2 is the price of one launch instead of two and no intermediate round trip through HBM.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from . import _dispatch
from .reference import check_spectrum_args

__all__ = ["spectrum_to_image", "spectrum_to_image_forward", "spectrum_to_image_backward", "SpectrumToImageFunction"]

# tl.dot precision on the GPU: "tf32" (default; ~2e-4 relative error forward, ~1.4e-3 gradient at 224,
# see shared kernels.md), "tf32x3" (~1e-7, 3x the tensor-core work) or "ieee". The interpreter computes fp32.
PRECISION_ENV_VAR = "FEATUREVIZ_KERNELS_PRECISION"


@triton.jit
def _spectrum_to_image_forward_kernel(
    # pointers: spectrum (B, C, H, WF, 2), scale (H, WF), color (CO, C), DFT matrices, scratch Y (B, C, H, WF, 2),
    # output (B, CO, H, W); all contiguous
    X_ptr, Scale_ptr, Color_ptr, CH_ptr, SH_ptr, CW_ptr, NSW_ptr, Y_ptr, Out_ptr,
    # sizes
    H, W, WF,
    # meta-parameters
    C: tl.constexpr, CO: tl.constexpr, SIGMOID: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < H
    plane = H * WF * 2  # floats per (image, channel) of the spectrum and of the scratch

    # phase 1: Y_c[h, l] for this program's rows, every channel and column, to the scratch buffer
    for c in tl.static_range(C):
        x_base = X_ptr + (b * C + c) * plane
        y_base = Y_ptr + (b * C + c) * plane
        for l0 in range(0, WF, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            l_mask = l < WF
            yr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            yi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                hk_mask = h_mask[:, None] & (k[None, :] < H)
                ch = tl.load(CH_ptr + h[:, None] * H + k[None, :], mask=hk_mask, other=0.0)
                sh = tl.load(SH_ptr + h[:, None] * H + k[None, :], mask=hk_mask, other=0.0)
                kl = k[:, None] * WF + l[None, :]
                kl_mask = (k[:, None] < H) & l_mask[None, :]
                # the 1/f scale is applied on load: it commutes with nothing else, so here it is free
                s = tl.load(Scale_ptr + kl, mask=kl_mask, other=0.0)
                xr = tl.load(x_base + kl * 2, mask=kl_mask, other=0.0) * s
                xi = tl.load(x_base + kl * 2 + 1, mask=kl_mask, other=0.0) * s
                yr = tl.dot(ch, xr, yr, input_precision=PRECISION)
                yr = tl.dot(sh, -xi, yr, input_precision=PRECISION)
                yi = tl.dot(sh, xr, yi, input_precision=PRECISION)
                yi = tl.dot(ch, xi, yi, input_precision=PRECISION)
            hl = h[:, None] * WF + l[None, :]
            hl_mask = h_mask[:, None] & l_mask[None, :]
            tl.store(y_base + hl * 2, yr, mask=hl_mask)
            tl.store(y_base + hl * 2 + 1, yi, mask=hl_mask)
    # the scratch rows written above are read back below by other threads of this program
    tl.debug_barrier()

    # phase 2: colour mix while loading Y, real DFT along W, sigmoid, one store per pixel
    for o in tl.static_range(CO):
        out_base = Out_ptr + (b * CO + o) * H * W
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            w_mask = w < W
            acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
            for l0 in range(0, WF, BLOCK_L):
                l = l0 + tl.arange(0, BLOCK_L)
                l_mask = l < WF
                hl = h[:, None] * WF + l[None, :]
                hl_mask = h_mask[:, None] & l_mask[None, :]
                yr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                yi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                for c in tl.static_range(C):
                    m = tl.load(Color_ptr + o * C + c)
                    y_base = Y_ptr + (b * C + c) * plane
                    yr += m * tl.load(y_base + hl * 2, mask=hl_mask, other=0.0)
                    yi += m * tl.load(y_base + hl * 2 + 1, mask=hl_mask, other=0.0)
                lw = l[:, None] * W + w[None, :]
                lw_mask = l_mask[:, None] & w_mask[None, :]
                cw = tl.load(CW_ptr + lw, mask=lw_mask, other=0.0)
                nsw = tl.load(NSW_ptr + lw, mask=lw_mask, other=0.0)
                acc = tl.dot(yr, cw, acc, input_precision=PRECISION)
                acc = tl.dot(yi, nsw, acc, input_precision=PRECISION)
            if SIGMOID:
                acc = tl.sigmoid(acc)
            tl.store(out_base + h[:, None] * W + w[None, :], acc, mask=h_mask[:, None] & w_mask[None, :])


@triton.jit
def _spectrum_to_image_backward_kernel(
    # pointers: dL/dimage and image (B, CO, H, W), spectrum (B, C, H, WF, 2), scale (H, WF), color (CO, C),
    # DFT matrices (CWT, NSWT are (W, WF)), scratch dY' (B, CO, H, WF, 2), outputs dspectrum (B, C, H, WF, 2)
    # and per-image dscale partial sums (B, H, WF); all contiguous
    G_ptr, Img_ptr, X_ptr, Scale_ptr, Color_ptr, CH_ptr, SH_ptr, CWT_ptr, NSWT_ptr, DY_ptr, DX_ptr, DScale_ptr,
    # sizes
    H, W, WF,
    # meta-parameters
    C: tl.constexpr, CO: tl.constexpr, SIGMOID: tl.constexpr, SCALE_GRAD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = l < WF
    plane = H * WF * 2

    # phase 1: dY'_o[h, l] = g_o CW^T (real part), g_o NSW^T (imaginary part) for this program's columns l
    for o in tl.static_range(CO):
        g_base = (b * CO + o) * H * W
        dy_base = DY_ptr + (b * CO + o) * plane
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_mask = h < H
            dyr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            dyi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            for w0 in range(0, W, BLOCK_W):
                w = w0 + tl.arange(0, BLOCK_W)
                hw = h[:, None] * W + w[None, :]
                hw_mask = h_mask[:, None] & (w[None, :] < W)
                g = tl.load(G_ptr + g_base + hw, mask=hw_mask, other=0.0)
                if SIGMOID:
                    # sigmoid' from the saved output: y (1 - y), no recomputation
                    y = tl.load(Img_ptr + g_base + hw, mask=hw_mask, other=0.0)
                    g = g * y * (1.0 - y)
                wl = w[:, None] * WF + l[None, :]
                wl_mask = (w[:, None] < W) & l_mask[None, :]
                cwt = tl.load(CWT_ptr + wl, mask=wl_mask, other=0.0)
                nswt = tl.load(NSWT_ptr + wl, mask=wl_mask, other=0.0)
                dyr = tl.dot(g, cwt, dyr, input_precision=PRECISION)
                dyi = tl.dot(g, nswt, dyi, input_precision=PRECISION)
            hl = h[:, None] * WF + l[None, :]
            hl_mask = h_mask[:, None] & l_mask[None, :]
            tl.store(dy_base + hl * 2, dyr, mask=hl_mask)
            tl.store(dy_base + hl * 2 + 1, dyi, mask=hl_mask)
    tl.debug_barrier()

    # phase 2: transposed colour mix on load, adjoint DFT along H, times the scale
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H
        kl = k[:, None] * WF + l[None, :]
        kl_mask = k_mask[:, None] & l_mask[None, :]
        s = tl.load(Scale_ptr + kl, mask=kl_mask, other=0.0)
        ds = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
        for c in tl.static_range(C):
            dxr = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            dxi = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                h_mask = h < H
                kh_mask = k_mask[:, None] & h_mask[None, :]
                ch = tl.load(CH_ptr + k[:, None] * H + h[None, :], mask=kh_mask, other=0.0)
                sh = tl.load(SH_ptr + k[:, None] * H + h[None, :], mask=kh_mask, other=0.0)
                hl = h[:, None] * WF + l[None, :]
                hl_mask = h_mask[:, None] & l_mask[None, :]
                dyr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                dyi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                for o in tl.static_range(CO):
                    m = tl.load(Color_ptr + o * C + c)
                    dy_base = DY_ptr + (b * CO + o) * plane
                    dyr += m * tl.load(dy_base + hl * 2, mask=hl_mask, other=0.0)
                    dyi += m * tl.load(dy_base + hl * 2 + 1, mask=hl_mask, other=0.0)
                dxr = tl.dot(ch, dyr, dxr, input_precision=PRECISION)
                dxr = tl.dot(sh, dyi, dxr, input_precision=PRECISION)
                dxi = tl.dot(ch, dyi, dxi, input_precision=PRECISION)
                dxi = tl.dot(sh, -dyr, dxi, input_precision=PRECISION)
            dx_base = DX_ptr + (b * C + c) * plane
            tl.store(dx_base + kl * 2, dxr * s, mask=kl_mask)
            tl.store(dx_base + kl * 2 + 1, dxi * s, mask=kl_mask)
            if SCALE_GRAD:
                x_base = X_ptr + (b * C + c) * plane
                ds += dxr * tl.load(x_base + kl * 2, mask=kl_mask, other=0.0)
                ds += dxi * tl.load(x_base + kl * 2 + 1, mask=kl_mask, other=0.0)
        if SCALE_GRAD:
            # one partial sum per image; the launcher reduces over the batch in a fixed order (deterministic)
            tl.store(DScale_ptr + b * H * WF + kl, ds, mask=kl_mask)


@functools.lru_cache(maxsize=32)
def _dft_matrices(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """CH, SH (H, H); CW, NSW (Wf, W); CWT, NSWT (W, Wf): built once per size and device in float64.

    Angles use (h k mod H) so they stay exact for large indices; 1/sqrt(HW) and the Hermitian weights c_l
    are folded into the W matrices.
    """
    wf = width // 2 + 1
    hh = torch.arange(height, dtype=torch.float64)
    ang_h = 2 * math.pi * torch.remainder(hh[:, None] * hh[None, :], height) / height
    ll = torch.arange(wf, dtype=torch.float64)
    ww = torch.arange(width, dtype=torch.float64)
    ang_w = 2 * math.pi * torch.remainder(ll[:, None] * ww[None, :], width) / width
    weight = torch.full((wf,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if width % 2 == 0:
        weight[-1] = 1.0
    weight /= math.sqrt(height * width)
    cw = weight[:, None] * torch.cos(ang_w)
    nsw = -weight[:, None] * torch.sin(ang_w)
    mats = (torch.cos(ang_h), torch.sin(ang_h), cw, nsw, cw.T, nsw.T)
    return tuple(m.to(device=device, dtype=torch.float32).contiguous() for m in mats)


def _precision() -> str:
    value = os.environ.get(PRECISION_ENV_VAR, "tf32")
    if value not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"{PRECISION_ENV_VAR}={value!r} is not one of tf32, tf32x3, ieee")
    return value


# Launch configurations, checked by compiling for sm_90 without a GPU (bench/compile_check.py, Triton 3.9):
# 64-row bands halve the L2 re-reads of the input against 32-row ones and use wgmma; 8 warps and 2 stages fit
# them in 255 registers with 8 bytes of spill (4 warps spill ~1.7 KB per thread). 16-row bands (168 registers,
# mma, no spill) keep the SMs busy at small batch. Backward, 8 warps, 1 stage: 214-238 registers, no spill.
FORWARD_CONFIGS = {
    64: dict(BLOCK_H=64, BLOCK_K=32, BLOCK_L=32, BLOCK_W=64, num_warps=8, num_stages=2),
    16: dict(BLOCK_H=16, BLOCK_K=32, BLOCK_L=32, BLOCK_W=64, num_warps=4, num_stages=1),
}
BACKWARD_CONFIG = dict(BLOCK_L=32, BLOCK_H=32, BLOCK_W=64, BLOCK_K=64, num_warps=8, num_stages=1)


def _forward_config(batch: int, height: int, device: torch.device) -> dict:
    """64-row bands when they give at least one program per SM, else 16-row bands."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return FORWARD_CONFIGS[64 if batch * triton.cdiv(height, 64) >= n_sm else 16]


def spectrum_to_image_forward(spectrum, scale, color, size, *, sigmoid=True):
    """Launch the forward kernel. spectrum (B, C, H, Wf, 2) fp32, scale (H, Wf), color (Co, C) or None."""
    height, width = check_spectrum_args(spectrum, size)
    batch, channels, _, wf, _ = spectrum.shape
    if scale.shape != (height, wf):
        raise ValueError(f"scale must be ({height}, {wf}), got {tuple(scale.shape)}")
    if color is None:
        color = torch.eye(channels, device=spectrum.device)
    out_channels = color.shape[0]
    if color.shape != (out_channels, channels):
        raise ValueError(f"color must be (Co, {channels}), got {tuple(color.shape)}")
    _dispatch.require_runnable(_spectrum_to_image_forward_kernel, spectrum)
    spectrum, scale, color = (t.float().contiguous() for t in (spectrum, scale, color))
    ch, sh, cw, nsw, _, _ = _dft_matrices(height, width, spectrum.device)
    scratch = torch.empty_like(spectrum)
    out = torch.empty(batch, out_channels, height, width, device=spectrum.device, dtype=torch.float32)
    config = _forward_config(batch, height, spectrum.device)
    _spectrum_to_image_forward_kernel[(batch, triton.cdiv(height, config["BLOCK_H"]))](
        spectrum, scale, color, ch, sh, cw, nsw, scratch, out,
        height, width, wf,
        C=channels, CO=out_channels, SIGMOID=sigmoid, PRECISION=_precision(), **config,
    )
    return out


def spectrum_to_image_backward(grad_image, image, spectrum, scale, color, size, *, sigmoid=True, scale_grad=False):
    """Launch the backward kernel; returns (dL/dspectrum, dL/dscale or None). ``image`` is the forward output."""
    height, width = check_spectrum_args(spectrum, size)
    batch, channels, _, wf, _ = spectrum.shape
    if color is None:
        color = torch.eye(channels, device=spectrum.device)
    grad_image, color = grad_image.float().contiguous(), color.float().contiguous()
    ch, sh, _, _, cwt, nswt = _dft_matrices(height, width, spectrum.device)
    scratch = torch.empty(batch, color.shape[0], height, wf, 2, device=spectrum.device, dtype=torch.float32)
    grad_spectrum = torch.empty_like(spectrum)
    partial = torch.empty(batch, height, wf, device=spectrum.device, dtype=torch.float32) if scale_grad else scratch
    _spectrum_to_image_backward_kernel[(batch, triton.cdiv(wf, BACKWARD_CONFIG["BLOCK_L"]))](
        grad_image, image, spectrum, scale, color, ch, sh, cwt, nswt, scratch, grad_spectrum, partial,
        height, width, wf,
        C=channels, CO=color.shape[0], SIGMOID=sigmoid, SCALE_GRAD=scale_grad, PRECISION=_precision(),
        **BACKWARD_CONFIG,
    )
    return grad_spectrum, (partial.sum(0) if scale_grad else None)


class SpectrumToImageFunction(torch.autograd.Function):
    """Autograd wrapper: gradients for spectrum and scale; color and size are constants."""

    @staticmethod
    def forward(ctx, spectrum, scale, color, size, sigmoid):
        spectrum, scale = spectrum.float().contiguous(), scale.float().contiguous()
        image = spectrum_to_image_forward(spectrum, scale, color, size, sigmoid=sigmoid)
        ctx.save_for_backward(spectrum, scale, color, image)
        ctx.size, ctx.sigmoid = size, sigmoid
        return image

    @staticmethod
    def backward(ctx, grad_image):
        spectrum, scale, color, image = ctx.saved_tensors
        grad_spectrum, grad_scale = spectrum_to_image_backward(
            grad_image, image, spectrum, scale, color, ctx.size, sigmoid=ctx.sigmoid,
            scale_grad=ctx.needs_input_grad[1])
        return grad_spectrum, grad_scale, None, None, None


def spectrum_to_image(spectrum, scale, color, size, *, sigmoid=True):
    """The Triton path of ``reference.spectrum_to_image`` (same arguments; scale broadcasts to (H, W//2+1))."""
    height, width = check_spectrum_args(spectrum, size)
    if scale.dim() > 2:  # (1, 1, H, Wf) and the like: one scale shared by every image and channel
        if any(n != 1 for n in scale.shape[:-2]):
            raise ValueError(f"the Triton kernel takes one scale for all images and channels, broadcastable to "
                             f"({height}, {width // 2 + 1}); got {tuple(scale.shape)}")
        scale = scale.reshape(scale.shape[-2:])
    scale = scale.expand(height, width // 2 + 1)
    return SpectrumToImageFunction.apply(spectrum, scale, color, (height, width), sigmoid)

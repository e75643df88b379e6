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

Mirror folding: cos is even and sin odd in every index, so with E = X[k] + X[H-k], O = X[k] - X[H-k] over
k <= H/2, P = CH E and Q = SH O give both Y[h] = P + iQ and Y[H-h] = P - iQ, and along W, with A = Y'r CW and
B = Y'i NSW over w <= W/2, t[w] = A + B and t[W-w] = A - B. The H pass costs a quarter of the plain matmuls,
the W pass half, a third in all (4.4 GFLOP forward at batch 64, 224x224, RGB); the backward folds the same way.

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
    HH = H // 2 + 1  # rows (and spectrum rows) 0..H//2; the others are their mirrors H - h
    WH = W // 2 + 1  # columns 0..W//2; the others are their mirrors W - w
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < HH
    hm_mask = (h >= 1) & (2 * h < H)  # h has a mirror row H - h distinct from itself
    plane = H * WF * 2  # floats per (image, channel) of the spectrum and of the scratch

    # phase 1: Y_c rows h and H - h, every channel and column, to the scratch buffer
    for c in tl.static_range(C):
        x_base = X_ptr + (b * C + c) * plane
        y_base = Y_ptr + (b * C + c) * plane
        for l0 in range(0, WF, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            l_mask = l < WF
            pr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            pi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            qr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            qi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            for k0 in range(0, HH, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_mask = k < HH
                km_mask = (k >= 1) & (2 * k < H)
                hk_mask = h_mask[:, None] & k_mask[None, :]
                ch = tl.load(CH_ptr + h[:, None] * H + k[None, :], mask=hk_mask, other=0.0)
                sh = tl.load(SH_ptr + h[:, None] * H + k[None, :], mask=hk_mask, other=0.0)
                kl = k[:, None] * WF + l[None, :]
                kl_mask = k_mask[:, None] & l_mask[None, :]
                mkl = (H - k)[:, None] * WF + l[None, :]
                mkl_mask = km_mask[:, None] & l_mask[None, :]
                # load data: spectrum rows k and H - k, times the 1/f scale
                s = tl.load(Scale_ptr + kl, mask=kl_mask, other=0.0)
                sm = tl.load(Scale_ptr + mkl, mask=mkl_mask, other=0.0)
                xr = tl.load(x_base + kl * 2, mask=kl_mask, other=0.0) * s
                xi = tl.load(x_base + kl * 2 + 1, mask=kl_mask, other=0.0) * s
                mr = tl.load(x_base + mkl * 2, mask=mkl_mask, other=0.0) * sm
                mi = tl.load(x_base + mkl * 2 + 1, mask=mkl_mask, other=0.0) * sm
                # cos is even and sin odd in k: P = CH (X[k] + X[H-k]), Q = SH (X[k] - X[H-k])
                pr = tl.dot(ch, xr + mr, pr, input_precision=PRECISION)
                pi = tl.dot(ch, xi + mi, pi, input_precision=PRECISION)
                qr = tl.dot(sh, xr - mr, qr, input_precision=PRECISION)
                qi = tl.dot(sh, xi - mi, qi, input_precision=PRECISION)
            # and in h: Y[h] = P + iQ, Y[H - h] = P - iQ
            hl = h[:, None] * WF + l[None, :]
            mhl = (H - h)[:, None] * WF + l[None, :]
            hl_mask = h_mask[:, None] & l_mask[None, :]
            mhl_mask = hm_mask[:, None] & l_mask[None, :]
            tl.store(y_base + hl * 2, pr - qi, mask=hl_mask)
            tl.store(y_base + hl * 2 + 1, pi + qr, mask=hl_mask)
            tl.store(y_base + mhl * 2, pr + qi, mask=mhl_mask)
            tl.store(y_base + mhl * 2 + 1, pi - qr, mask=mhl_mask)
    # the scratch rows written above are read back below by other threads of this program
    tl.debug_barrier()

    # phase 2, for rows h then their mirrors: colour mix while loading Y, real DFT along W, sigmoid, store
    for half in range(2):  # a runtime loop: one copy of the code, half the registers of an unrolled one
        rows = h + half * (H - 2 * h)
        r_mask = (h_mask & (half == 0)) | (hm_mask & (half == 1))
        for o in range(CO):
            out_base = Out_ptr + (b * CO + o) * H * W
            for w0 in range(0, WH, BLOCK_W):
                w = w0 + tl.arange(0, BLOCK_W)
                w_mask = w < WH
                wm_mask = (w >= 1) & (2 * w < W)
                even = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
                odd = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
                for l0 in range(0, WF, BLOCK_L):
                    l = l0 + tl.arange(0, BLOCK_L)
                    l_mask = l < WF
                    rl = rows[:, None] * WF + l[None, :]
                    rl_mask = r_mask[:, None] & l_mask[None, :]
                    yr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                    yi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                    for c in tl.static_range(C):
                        m = tl.load(Color_ptr + o * C + c)
                        y_base = Y_ptr + (b * C + c) * plane
                        yr += m * tl.load(y_base + rl * 2, mask=rl_mask, other=0.0)
                        yi += m * tl.load(y_base + rl * 2 + 1, mask=rl_mask, other=0.0)
                    lw = l[:, None] * W + w[None, :]
                    lw_mask = l_mask[:, None] & w_mask[None, :]
                    cw = tl.load(CW_ptr + lw, mask=lw_mask, other=0.0)
                    nsw = tl.load(NSW_ptr + lw, mask=lw_mask, other=0.0)
                    even = tl.dot(yr, cw, even, input_precision=PRECISION)
                    odd = tl.dot(yi, nsw, odd, input_precision=PRECISION)
                # cos even, sin odd in w: t[w] = even + odd, t[W - w] = even - odd
                t = even + odd
                tm = even - odd
                if SIGMOID:
                    t = tl.sigmoid(t)
                    tm = tl.sigmoid(tm)
                tl.store(out_base + rows[:, None] * W + w[None, :], t, mask=r_mask[:, None] & w_mask[None, :])
                tl.store(out_base + rows[:, None] * W + (W - w)[None, :], tm,
                         mask=r_mask[:, None] & wm_mask[None, :])


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
    HH = H // 2 + 1
    WH = W // 2 + 1
    b = tl.program_id(0).to(tl.int64)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = l < WF
    plane = H * WF * 2

    # phase 1: dY'_o[h, l] = (g_o CW^T, g_o NSW^T) for this program's columns l, folding columns w and W - w
    for o in tl.static_range(CO):
        g_base = (b * CO + o) * H * W
        dy_base = DY_ptr + (b * CO + o) * plane
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_mask = h < H
            dyr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            dyi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
            for w0 in range(0, WH, BLOCK_W):
                w = w0 + tl.arange(0, BLOCK_W)
                w_mask = w < WH
                hw_mask = h_mask[:, None] & w_mask[None, :]
                hwm_mask = h_mask[:, None] & ((w >= 1) & (2 * w < W))[None, :]
                hw = h[:, None] * W + w[None, :]
                hwm = h[:, None] * W + (W - w)[None, :]
                g = tl.load(G_ptr + g_base + hw, mask=hw_mask, other=0.0)
                gm = tl.load(G_ptr + g_base + hwm, mask=hwm_mask, other=0.0)
                if SIGMOID:
                    # sigmoid' from the saved output: y (1 - y), no recomputation
                    y = tl.load(Img_ptr + g_base + hw, mask=hw_mask, other=0.0)
                    ym = tl.load(Img_ptr + g_base + hwm, mask=hwm_mask, other=0.0)
                    g = g * y * (1.0 - y)
                    gm = gm * ym * (1.0 - ym)
                wl = w[:, None] * WF + l[None, :]
                wl_mask = w_mask[:, None] & l_mask[None, :]
                cwt = tl.load(CWT_ptr + wl, mask=wl_mask, other=0.0)
                nswt = tl.load(NSWT_ptr + wl, mask=wl_mask, other=0.0)
                dyr = tl.dot(g + gm, cwt, dyr, input_precision=PRECISION)
                dyi = tl.dot(g - gm, nswt, dyi, input_precision=PRECISION)
            hl = h[:, None] * WF + l[None, :]
            hl_mask = h_mask[:, None] & l_mask[None, :]
            tl.store(dy_base + hl * 2, dyr, mask=hl_mask)
            tl.store(dy_base + hl * 2 + 1, dyi, mask=hl_mask)
    tl.debug_barrier()

    # phase 2: transposed colour mix on load, adjoint DFT along H folded in h and k, times the scale
    for k0 in range(0, HH, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < HH
        kl = k[:, None] * WF + l[None, :]
        mkl = (H - k)[:, None] * WF + l[None, :]
        kl_mask = k_mask[:, None] & l_mask[None, :]
        mkl_mask = ((k >= 1) & (2 * k < H))[:, None] & l_mask[None, :]
        s = tl.load(Scale_ptr + kl, mask=kl_mask, other=0.0)
        sm = tl.load(Scale_ptr + mkl, mask=mkl_mask, other=0.0)
        ds = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
        dsm = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
        for c in tl.static_range(C):
            ur = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            ui = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            vr = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            vi = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            for h0 in range(0, HH, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                h_mask = h < HH
                kh_mask = k_mask[:, None] & h_mask[None, :]
                ch = tl.load(CH_ptr + k[:, None] * H + h[None, :], mask=kh_mask, other=0.0)
                sh = tl.load(SH_ptr + k[:, None] * H + h[None, :], mask=kh_mask, other=0.0)
                hl = h[:, None] * WF + l[None, :]
                mhl = (H - h)[:, None] * WF + l[None, :]
                hl_mask = h_mask[:, None] & l_mask[None, :]
                mhl_mask = ((h >= 1) & (2 * h < H))[:, None] & l_mask[None, :]
                er = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)  # dY_c[h] + dY_c[H - h]
                ei = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                odr = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)  # dY_c[h] - dY_c[H - h]
                odi = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
                for o in tl.static_range(CO):
                    m = tl.load(Color_ptr + o * C + c)
                    dy_base = DY_ptr + (b * CO + o) * plane
                    ar = tl.load(dy_base + hl * 2, mask=hl_mask, other=0.0)
                    ai = tl.load(dy_base + hl * 2 + 1, mask=hl_mask, other=0.0)
                    br = tl.load(dy_base + mhl * 2, mask=mhl_mask, other=0.0)
                    bi = tl.load(dy_base + mhl * 2 + 1, mask=mhl_mask, other=0.0)
                    er += m * (ar + br)
                    ei += m * (ai + bi)
                    odr += m * (ar - br)
                    odi += m * (ai - bi)
                ur = tl.dot(ch, er, ur, input_precision=PRECISION)
                ui = tl.dot(ch, ei, ui, input_precision=PRECISION)
                vr = tl.dot(sh, odr, vr, input_precision=PRECISION)
                vi = tl.dot(sh, odi, vi, input_precision=PRECISION)
            # dX[k] = (Ur + Vi, Ui - Vr), dX[H - k] = (Ur - Vi, Ui + Vr)
            dx_base = DX_ptr + (b * C + c) * plane
            tl.store(dx_base + kl * 2, (ur + vi) * s, mask=kl_mask)
            tl.store(dx_base + kl * 2 + 1, (ui - vr) * s, mask=kl_mask)
            tl.store(dx_base + mkl * 2, (ur - vi) * sm, mask=mkl_mask)
            tl.store(dx_base + mkl * 2 + 1, (ui + vr) * sm, mask=mkl_mask)
            if SCALE_GRAD:
                x_base = X_ptr + (b * C + c) * plane
                ds += (ur + vi) * tl.load(x_base + kl * 2, mask=kl_mask, other=0.0)
                ds += (ui - vr) * tl.load(x_base + kl * 2 + 1, mask=kl_mask, other=0.0)
                dsm += (ur - vi) * tl.load(x_base + mkl * 2, mask=mkl_mask, other=0.0)
                dsm += (ui + vr) * tl.load(x_base + mkl * 2 + 1, mask=mkl_mask, other=0.0)
        if SCALE_GRAD:
            # one partial sum per image; the launcher reduces over the batch in a fixed order (deterministic)
            tl.store(DScale_ptr + b * H * WF + kl, ds, mask=kl_mask)
            tl.store(DScale_ptr + b * H * WF + mkl, dsm, mask=mkl_mask)


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


# Launch configurations, checked by compiling for sm_90 without a GPU (bench/compile_check.py, Triton 3.9).
# Forward, 64-row bands (wgmma): 8 warps, 2 stages, 16-column spectrum tiles: 255 registers, 24 bytes of spill
# (32-column tiles spill 280 bytes, 4 warps more). 16-row bands (mma, no spill) keep the SMs busy at small batch.
# Backward, 8 warps, 1 stage, 16 spectrum columns per program: up to 251 registers, no spill.
FORWARD_CONFIGS = {
    64: dict(BLOCK_H=64, BLOCK_K=32, BLOCK_L=16, BLOCK_W=64, num_warps=8, num_stages=2),
    16: dict(BLOCK_H=16, BLOCK_K=32, BLOCK_L=32, BLOCK_W=64, num_warps=4, num_stages=1),
}
BACKWARD_CONFIG = dict(BLOCK_L=16, BLOCK_H=32, BLOCK_W=64, BLOCK_K=64, num_warps=8, num_stages=1)


def _forward_config(batch: int, height: int, device: torch.device) -> dict:
    """64-row bands when they give at least one program per SM, else 16-row bands."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return FORWARD_CONFIGS[64 if batch * triton.cdiv(height // 2 + 1, 64) >= n_sm else 16]


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
    _spectrum_to_image_forward_kernel[(batch, triton.cdiv(height // 2 + 1, config["BLOCK_H"]))](
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

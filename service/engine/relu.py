"""Dead units at the start: lucid's redirected ReLU gradient for the first steps of a render.

A ReLU (or ReLU6 / Clip) that is off for the whole image passes no gradient, so an objective behind it never
moves and the render stays grey. lucid (``optvis/overrides/redirected_relu_grad.py``) replaces the gradient of
every ReLU during the first 16 steps: where the ordinary gradient of an image is all zero, it lets through the
part of the incoming gradient that pushes the unit back into its active range (and still blocks the part that
would push it further out). Once units are on, the ordinary gradient takes over.

:func:`redirected_relu_grad` swaps the ``forward`` of the clamp-like submodules of a module (ReLU, ReLU6, Hardtanh,
onnx2torch's Clip) for this one and restores them on exit.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["redirected_relu_grad", "clamp_bounds"]


def clamp_bounds(module: nn.Module) -> tuple[float | None, float | None] | None:
    """``(low, high)`` of a ReLU-like module (None = unbounded side), or None for other modules."""
    if isinstance(module, nn.ReLU):
        return 0.0, None
    if isinstance(module, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if type(module).__name__ in ("OnnxClip", "Clip"):  # onnx2torch's Clip with other bounds, or its portable twin
        low, high = getattr(module, "min_val", None), getattr(module, "max_val", None)
        if low is None and high is None:
            return None
        return (None if low is None else float(low)), (None if high is None else float(high))
    return None


class _RedirectedClamp(torch.autograd.Function):
    """y = clamp(x, low, high); backward: the ordinary gradient, or, for an image whose ordinary gradient is all
    zero, the incoming gradient wherever it pushes x back inside (descent convention: dL/dy > 0 lowers y)."""

    @staticmethod
    def forward(ctx, x, low, high, rows):
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        ctx.rows = rows
        if low is not None and high is not None:
            return F.hardtanh(x, low, high)
        if low == 0.0:
            return torch.relu(x)
        return torch.clamp(x, low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        # the ordinary gradient with the fused aten kernels (one pass); masks only in the rare redirect case
        if low is not None and high is not None:
            ordinary = torch.ops.aten.hardtanh_backward(grad, x, low, high)
        elif low is not None:
            ordinary = torch.ops.aten.threshold_backward(grad, x, low)
        else:
            ordinary = grad.masked_fill(x >= high, 0)
        if x.dim() < 2:
            return ordinary, None, None, None
        passes = _per_image(ordinary).abs().amax(dim=1) > 0  # ~25x faster than count_nonzero on the CPU
        if ctx.rows is not None and ctx.rows.shape[0] == passes.shape[0]:  # rows past the warm-up: ordinary
            passes = passes | ~ctx.rows  # (a module run image by image sees one row: no gating)
        if bool(passes.all()):  # the common case once units are on: nothing to redirect
            return ordinary, None, None, None
        blocked = torch.zeros_like(x, dtype=torch.bool)
        if low is not None:
            blocked |= (x <= low) & (grad > 0)
        if high is not None:
            blocked |= (x >= high) & (grad < 0)
        redirected = grad.masked_fill(blocked, 0)
        passes = passes.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(passes, ordinary, redirected), None, None, None


def _per_image(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (N, rest) without a copy when each image is one dense block of memory (NCHW or NHWC alike); the
    order inside a row is the memory order, which is all a per-image count needs."""
    n = t.shape[0]
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    if dense and n and t.stride(0) * n == t.numel():
        return t.as_strided((n, t.numel() // n), (t.stride(0), 1))
    return t.reshape(n, -1)


@contextlib.contextmanager
def redirected_relu_grad(module: nn.Module, enabled: bool = True, rows: torch.Tensor | None = None):
    """Within the block, every clamp-like submodule of ``module`` back-propagates the redirected gradient.

    ``rows``: a (N,) bool tensor on the module's device: only these rows of the batch get the redirect (the
    rows of the slots still in their warm-up when several renders share a step); None: every row. The
    submodules' ``forward`` is replaced for the duration (an instance attribute, removed on exit), so the
    clamp is computed once."""
    patched = []
    if enabled:
        for sub in module.modules():
            bounds = clamp_bounds(sub)
            if bounds is None or "forward" in vars(sub):
                continue
            sub.forward = _redirected_forward(*bounds, rows)
            patched.append(sub)
    try:
        yield len(patched)
    finally:
        for sub in patched:
            del sub.forward


def _redirected_forward(low, high, rows=None):
    def forward(x):
        return _RedirectedClamp.apply(x, low, high, rows)

    return forward

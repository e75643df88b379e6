"""Dead units at the start: lucid's redirected ReLU gradient for the first steps of a render.

A ReLU (or ReLU6 / Clip) that is off for the whole image passes no gradient, so an objective behind it never
moves and the render stays grey. lucid (``optvis/overrides/redirected_relu_grad.py``) replaces the gradient of
every ReLU during the first 16 steps: where the ordinary gradient of an image is all zero, it lets through the
part of the incoming gradient that pushes the unit back into its active range (and still blocks the part that
would push it further out). Once units are on, the ordinary gradient takes over.

:func:`redirected_relu_grad` installs this as forward hooks on the clamp-like modules of a module and removes
them on exit.
"""

from __future__ import annotations

import contextlib

import torch
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
    if type(module).__name__ == "OnnxClip":  # onnx2torch's Clip with other bounds
        low, high = getattr(module, "min_val", None), getattr(module, "max_val", None)
        if low is None and high is None:
            return None
        return (None if low is None else float(low)), (None if high is None else float(high))
    return None


class _RedirectedClamp(torch.autograd.Function):
    """y = clamp(x, low, high); backward: the ordinary gradient, or, for an image whose ordinary gradient is all
    zero, the incoming gradient wherever it pushes x back inside (descent convention: dL/dy > 0 lowers y)."""

    @staticmethod
    def forward(ctx, x, low, high):
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return torch.clamp(x, low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        inside = torch.ones_like(x, dtype=torch.bool)
        keep = torch.ones_like(x, dtype=torch.bool)
        if low is not None:
            inside &= x > low
            keep &= ~((x <= low) & (grad > 0))
        if high is not None:
            inside &= x < high
            keep &= ~((x >= high) & (grad < 0))
        ordinary = grad * inside
        redirected = grad * keep
        if x.dim() < 2:
            return ordinary, None, None
        passes = ordinary.reshape(x.shape[0], -1).abs().amax(dim=1) > 0
        passes = passes.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(passes, ordinary, redirected), None, None


@contextlib.contextmanager
def redirected_relu_grad(module: nn.Module, enabled: bool = True):
    """Within the block, every clamp-like submodule of ``module`` back-propagates the redirected gradient."""
    handles = []
    if enabled:
        for sub in module.modules():
            bounds = clamp_bounds(sub)
            if bounds is None:
                continue

            def hook(mod, inputs, output, bounds=bounds):
                return _RedirectedClamp.apply(inputs[0], *bounds)

            handles.append(sub.register_forward_hook(hook))
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()

"""Memory layout of the model's activations: NCHW (``contiguous``) or NHWC (``channels_last``).

On a CPU, oneDNN's convolutions run forward and backward markedly faster on NHWC tensors than on NCHW ones
(EfficientNet-Lite0 truncated at a middle block: about 1.4x for forward + input gradient on this project's
x86 machines, bench/RESULTS.md), and the model's forward + backward is 80-90% of a render step. So the render
loop stores the model's 4-D weights and its input channels_last on the CPU (``auto``).

A converted ONNX graph is arbitrary code, though: an op may ``view`` a tensor in a way that assumes NCHW
strides. :func:`adopt` therefore converts a module only after checking it on a probe batch: the NHWC
forward must run and give the same activations as the NCHW one, else the module is put back and the render
runs NCHW. On CUDA ``auto`` keeps NCHW (fp32 cuDNN gains little from NHWC; not yet measured here).

``FEATUREVIZ_MEMORY_FORMAT=auto|channels_last|contiguous`` overrides ``auto`` for a whole process.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["LAYOUTS", "choose", "adopt", "prepare", "to_layout", "outputs", "same"]

LAYOUTS = ("auto", "channels_last", "contiguous")
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def choose(request: str | None, device: torch.device, module: nn.Module | None) -> str:
    """The layout to try: ``channels_last`` or ``contiguous`` (``request`` ``None`` means ``auto``)."""
    request = request or "auto"
    if request == "auto":
        request = os.environ.get("FEATUREVIZ_MEMORY_FORMAT", "auto") or "auto"
    if request not in LAYOUTS:
        raise ValueError(f"memory format must be one of {', '.join(LAYOUTS)}, got {request!r}")
    if module is None or request == "contiguous":
        return "contiguous"
    has_conv = any(p.dim() == 4 for p in module.parameters())
    if request == "auto" and (device.type != "cpu" or not has_conv):
        return "contiguous"
    return "channels_last"


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` in ``layout`` (a copy only when its strides differ); tensors that are not 4-D pass through."""
    return x.contiguous(memory_format=_FORMATS[layout]) if x.dim() == 4 else x


def outputs(out) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [v for v in out if isinstance(v, torch.Tensor)]
    return [out]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs().max() <= 1e-4 * max(scale, 1e-6)).item()) if b.numel() else True


def adopt(module: nn.Module, probe: torch.Tensor) -> str:
    """Convert ``module``'s 4-D parameters and buffers to channels_last in place if that is safe for ``probe``.

    Returns the layout the caller must feed the module in: ``channels_last`` when the NHWC forward of ``probe``
    ran and matched the NCHW one (max difference within 1e-4 of the largest activation), else
    ``contiguous`` with the module put back as it was. The parameters of a truncated module are shared with
    the imported model, so the conversion is seen by every later user of that model: harmless, since a
    layout changes strides, never values, and it is idempotent.
    """
    with torch.no_grad():
        # the reference runs NCHW weights too: weights shared with a module adopted earlier may be NHWC already,
        # and oneDNN follows the weights' layout, so this forward could otherwise hit the NHWC-unsafe op itself
        module.to(memory_format=torch.contiguous_format)
        reference = outputs(module(to_layout(probe, "contiguous")))
        try:
            # torch converts 5-D tensors too, and refuses channels_last for them (Swin's 5-D attention buffers)
            module.to(memory_format=torch.channels_last)
            converted = outputs(module(to_layout(probe, "channels_last")))
            matches = len(converted) == len(reference) and all(map(same, converted, reference))
        except RuntimeError:  # e.g. a .view() that needs NCHW strides
            matches = False
        if not matches:
            module.to(memory_format=torch.contiguous_format)
    return "channels_last" if matches else "contiguous"


def prepare(module: nn.Module | None, request: str | None, device: torch.device, probe) -> str:
    """Put ``module`` in the layout a render should run it in and return that layout's name.

    ``probe()`` gives the probe batch (only called when channels_last is tried). A ``contiguous`` outcome also
    converts the weights back: they are shared with the imported model, so an earlier render may have left
    them NHWC, and oneDNN follows the weights' layout whatever the input's.
    """
    layout = choose(request, device, module)
    if layout == "channels_last":
        return adopt(module, probe())
    if module is not None:
        module.to(memory_format=torch.contiguous_format)
    return "contiguous"

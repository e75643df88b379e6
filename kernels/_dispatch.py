"""Choosing between the Triton kernels and the torch references.

``FEATUREVIZ_KERNELS`` is read at every call, so a test or a benchmark can switch it with ``monkeypatch.setenv``:

- ``auto`` (default): Triton when every tensor is on CUDA, Triton imports, the kernel covers the call
  (float32, no gradient asked of a constant such as ``color`` or ``theta``) and it was not measured slower than
  the reference for such a call (``spectrum_to_image`` above 16 images: cuFFT wins there); the reference otherwise.
- ``torch``: always the reference.
- ``triton``: always the kernel; a call it does not cover is an error, never a silent fallback. On CPU
  tensors the kernels run through the Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the
  environment *before* the kernel module is first imported (``triton.jit`` reads it when it decorates).
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["ENV_VAR", "MODES", "kernels_mode", "use_triton", "require_runnable"]

ENV_VAR = "FEATUREVIZ_KERNELS"
MODES = ("auto", "torch", "triton")


def kernels_mode() -> str:
    """The value of ``FEATUREVIZ_KERNELS`` (default ``auto``); ValueError naming the choices if unknown."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not one of {', '.join(MODES)}; "
                         f"unset it or pick one (auto: Triton on CUDA, the torch reference on CPU)")
    return mode


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(op: str, tensors: tuple[torch.Tensor | None, ...], unsupported: str | None, *,
               slower: bool = False) -> bool:
    """Whether ``op`` runs its Triton kernel on ``tensors``.

    ``unsupported`` is None when the kernel covers the call, else a phrase saying what it does not cover
    (``"float64 inputs"``); under ``auto`` that means the reference, under ``triton`` an error. ``slower``: the
    reference was measured faster for calls like this one, so ``auto`` takes it (``triton`` still runs the kernel).
    """
    mode = kernels_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if mode == "auto":
        return on_cuda and unsupported is None and not slower and _triton_importable()
    if unsupported is not None:
        raise ValueError(f"{ENV_VAR}=triton: the Triton kernel of {op} does not support {unsupported}; "
                         f"set {ENV_VAR}=auto to use the torch reference for such calls")
    if not _triton_importable():
        raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported; install featureviz[server] "
                           f"on Linux or set {ENV_VAR}=auto")
    return True


def require_runnable(kernel, tensor: torch.Tensor) -> None:
    """Raise a clear error if ``kernel`` cannot run on ``tensor``'s device (CPU needs the interpreter)."""
    if tensor.is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"{ENV_VAR}=triton on CPU tensors needs the Triton interpreter, but {kernel} was compiled for a GPU: "
            f"set TRITON_INTERPRET=1 in the environment before featureviz.kernels first runs a Triton kernel "
            f"(triton.jit reads it when the kernel module is imported), or use {ENV_VAR}=auto/torch on CPU")

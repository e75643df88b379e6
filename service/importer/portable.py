"""Portable converted models: leaf modules that unpickle with torch alone.

onnx2torch builds the converted graph from its own module classes (``OnnxConstant``, ``OnnxShape``,
``OnnxBinaryMathOperation`` ...). Pickling such a graph into the model cache stores references to those classes,
so loading it imports onnx2torch, which imports torchvision and onnx: seconds of start-up on a cache hit for
code a render never runs. :func:`make_portable` replaces every leaf module whose class lives outside torch with
an equivalent whose code does not:

- a few ops by the small modules of this file (``Clip``, ``Gather``, ``Reshape``), whose forward reads runtime
  values that fx cannot trace;
- every other leaf by its own ``torch.fx.symbolic_trace``: a GraphModule of plain torch calls (fx pickles it as
  generated code, not as a class reference).

Each replacement is checked on the inputs the original module saw in one forward of an example batch and must
give exactly the same output; a leaf that cannot be traced, or whose trace differs, is kept as it is (the model
still works; loading it from the cache then imports its package). Node targets (the module names the catalog
and truncation use) do not change.

This module imports only torch: the cache loader and the engine import it.
"""

import logging

import torch
from torch import fx
from torch import nn

__all__ = ["Clip", "Gather", "Reshape", "make_portable", "foreign_modules"]

_LOG = logging.getLogger(__name__)


class Clip(nn.Module):
    """ONNX Clip with constant bounds (None = unbounded side); ``min_val``/``max_val`` as onnx2torch names them."""

    def __init__(self, min_val=None, max_val=None):
        super().__init__()
        self.min_val = _number(min_val)
        self.max_val = _number(max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.min_val, self.max_val)


class Gather(nn.Module):
    """ONNX Gather (numpy.take along ``axis``): ``x[:, ..., indices]`` with ``axis`` leading full slices."""

    def __init__(self, axis: int = 0):
        super().__init__()
        self.axis = int(axis)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        return x[(slice(None),) * axis + (indices.long(),)]


class Reshape(nn.Module):
    """ONNX Reshape to a runtime shape tensor; without ``allowzero`` a 0 keeps the input's size on that axis."""

    def __init__(self, allowzero: bool = False):
        super().__init__()
        self.allowzero = bool(allowzero)

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(v) for v in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return torch.reshape(x, dims)


def _number(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    return value


# Ops whose onnx2torch module reads runtime values (control flow on tensors): class name -> replacement builder.
_BY_NAME = {
    "OnnxClip": lambda m: Clip(getattr(m, "min_val", None), getattr(m, "max_val", None)),
    "OnnxGather": lambda m: Gather(getattr(m, "_axis", 0)),
    "OnnxReshape": lambda m: Reshape(False),
    "ReshapeAllowZero": lambda m: Reshape(True),
}


def _portable_class(cls) -> bool:
    module = cls.__module__ or ""
    return module == "torch" or module.startswith("torch.") or module == __name__


def foreign_modules(root: nn.Module) -> list[str]:
    """Qualified class names of the modules under ``root`` (not ``root`` itself) that do not unpickle with torch
    alone."""
    names = set()
    for name, module in root.named_modules():
        cls = type(module)
        if not name or isinstance(module, fx.GraphModule):
            continue  # pickled as generated code; its submodules are visited on their own
        if not _portable_class(cls):
            names.add(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(names)


def _replacement(module: nn.Module):
    build = _BY_NAME.get(type(module).__name__)
    if build is not None:
        return build(module)
    traced = fx.symbolic_trace(module)
    if foreign_modules(traced):
        raise TypeError("its trace still holds foreign modules")
    return traced


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@torch.no_grad()
def make_portable(gm: nn.Module, example: torch.Tensor) -> list[str]:
    """Replace in place every non-torch module under ``gm`` (at any depth) that has a checked portable equivalent.

    ``example`` is one input batch ``gm`` runs on. Returns the qualified class names left as they were.
    """
    foreign = {}
    for name, module in gm.named_modules():
        if name and not isinstance(module, fx.GraphModule) and not _portable_class(type(module)):
            if not any(name.startswith(outer + ".") for outer in foreign):  # the outermost foreign module only
                foreign[name] = module
    if not foreign:
        return []
    seen: dict[str, tuple] = {}

    def recorder(name):
        def hook(module, args, kwargs, out):
            seen.setdefault(name, (args, kwargs, out))
        return hook

    handles = [module.register_forward_hook(recorder(name), with_kwargs=True) for name, module in foreign.items()]
    try:
        gm(example)
    finally:
        for handle in handles:
            handle.remove()
    kept = set()
    for target, module in foreign.items():
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        if target not in seen:  # not reached by the example: nothing to check a replacement on
            kept.add(name)
            continue
        args, kwargs, want = seen[target]
        try:
            new = _replacement(module)
            new.train(module.training)
            got = new(*args, **kwargs)
        except Exception as exc:  # untraceable or failing: keep the original, which works
            _LOG.debug("keeping %s (%s): %s", target, name, exc)
            kept.add(name)
            continue
        if not _same(got, want):
            _LOG.debug("keeping %s (%s): its replacement differs", target, name)
            kept.add(name)
            continue
        parent, _, leaf = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    for param in gm.parameters():
        param.requires_grad_(False)
    return sorted(kept)

"""Per-channel state of the exemplar index: exact running top-k / bottom-k with deterministic ties, and a fixed-size
log-histogram sketch of the spatial max. Everything is plain tensors (saved as ``.npz`` without pickle)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["LayerState", "reduce_activation", "SKETCH_BINS", "SKETCH_ERROR", "sketch_bin", "sketch_value",
           "QUANTILES"]

# The sketch: a histogram of the spatial max per channel over fixed bins, symmetric in sign and log-spaced in
# magnitude: |v| < 1e-3 is the zero bin; 1e-3 <= |v| < 1e5 falls in 32 bins per decade (8 decades); beyond, the
# last bin. A quantile is read as the geometric middle of its bin and clamped to the exact min and max of the
# channel, so its relative error is at most 10**(1/64) - 1 = 3.7% (absolute 1e-3 near zero; values beyond 1e5 are
# only bounded by the exact max). Memory: C x 513 int32 per layer, whatever the number of images.
_PER_DECADE = 32
_LOW, _DECADES = -3, 8
_SIDE = _PER_DECADE * _DECADES
SKETCH_BINS = 2 * _SIDE + 1
SKETCH_ERROR = 10 ** (1 / (2 * _PER_DECADE)) - 1
QUANTILES = {"p50": 0.5, "p99": 0.99}


def sketch_bin(values: torch.Tensor) -> torch.Tensor:
    """Bin index (int64) of each value; bin ``_SIDE`` is zero, above it the positive side, below the negative."""
    magnitude = values.abs().clamp_min(1e-30)
    step = torch.floor((torch.log10(magnitude) - _LOW) * _PER_DECADE).clamp(-1, _SIDE - 1).to(torch.int64)
    step = torch.where(magnitude < 10.0 ** _LOW, torch.full_like(step, -1), step)
    return _SIDE + torch.sign(values).to(torch.int64) * (step + 1)


def sketch_value(bins: torch.Tensor) -> torch.Tensor:
    """Representative value (float64) of each bin: the geometric middle of its magnitude range (0 for zero)."""
    offset = (bins - _SIDE).to(torch.float64)
    magnitude = 10.0 ** (_LOW + (offset.abs() - 0.5) / _PER_DECADE)
    return torch.where(offset == 0, torch.zeros_like(magnitude), torch.sign(offset) * magnitude)


def reduce_activation(act: torch.Tensor, prefix_tokens: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's activation -> (spatial max (N, C), spatial mean (N, C), argmax position (N, C) int64: the flat
    index into the layer's map, row-major; -1 where the layer has no positions).

    - rank 4 (N, C, H, W) (channels-last layers arrive as NCHW views): max and mean over H x W;
    - rank 3 tokens (N, T, C): over the patch tokens only (the ``prefix_tokens`` CLS/register tokens are left
      out); the position is the patch index (row-major over the patch grid);
    - rank 2 (N, C): the value itself is the max and the mean; no position.
    NaN counts as -inf (last in the top-k, first in the bottom-k)."""
    act = act.detach()
    if act.dim() == 2:
        values = torch.nan_to_num(act.float(), nan=-math.inf)
        return values, values, torch.full(values.shape, -1, dtype=torch.int64, device=values.device)
    if act.dim() == 3:
        flat = act[:, prefix_tokens or 0:, :].transpose(1, 2).float()
    elif act.dim() == 4:
        flat = act.flatten(2).float()
    else:
        raise ValueError(f"activations of rank {act.dim()} are not indexed (2, 3 or 4)")
    flat = torch.nan_to_num(flat, nan=-math.inf)
    best, where = flat.max(dim=2)
    return best, flat.mean(dim=2), where


def _merge(values: torch.Tensor, index: torch.Tensor, extra: list[torch.Tensor], new_values: torch.Tensor,
           new_index: torch.Tensor, new_extra: list[torch.Tensor], k: int, descending: bool):
    """Keep the k best of (state, batch) per channel. Ties go to the lower image index: the state holds only
    images before the batch's, and its equal values are in index order, so a stable sort of the concatenation
    (state first) ranks equal values by index."""
    cat_values = torch.cat([values, new_values], dim=1)
    order = torch.sort(cat_values, dim=1, descending=descending, stable=True).indices[:, :k]
    pick = [torch.gather(cat_values, 1, order), torch.gather(torch.cat([index, new_index], dim=1), 1, order)]
    pick += [torch.gather(torch.cat([a, b], dim=1), 1, order) for a, b in zip(extra, new_extra)]
    return pick


class LayerState:
    """The running state of one layer's C channels (all on CPU, in plain tensors):

    ``max_value, max_image, max_pos`` (C, <=k): top-k images by spatial max, with the argmax position;
    ``mean_value, mean_image, mean_pos``: top-k by spatial mean (the position: that image's argmax);
    ``min_value, min_image, min_pos``: bottom-k by spatial max; ``sketch`` (C, SKETCH_BINS) int32; ``count``."""

    NAMES = ("max_value", "max_image", "max_pos", "mean_value", "mean_image", "mean_pos", "min_value", "min_image",
             "min_pos", "sketch", "count")

    def __init__(self, channels: int, k: int):
        self.channels, self.k = channels, k
        empty_f = torch.empty(channels, 0, dtype=torch.float32)
        empty_i = torch.empty(channels, 0, dtype=torch.int64)
        self.max_value, self.max_image, self.max_pos = empty_f, empty_i, empty_i
        self.mean_value, self.mean_image, self.mean_pos = empty_f, empty_i, empty_i
        self.min_value, self.min_image, self.min_pos = empty_f, empty_i, empty_i
        self.sketch = torch.zeros(channels, SKETCH_BINS, dtype=torch.int32)
        self.count = torch.zeros((), dtype=torch.int64)

    def update(self, best: torch.Tensor, mean: torch.Tensor, where: torch.Tensor, images: torch.Tensor) -> None:
        """Add a batch: ``best``, ``mean``, ``where`` (N, C) from :func:`reduce_activation`, ``images`` (N,) the
        global image indices, increasing and above every index seen before."""
        best, mean, where = best.cpu().t(), mean.cpu().t(), where.cpu().t()
        index = images.to(torch.int64).unsqueeze(0).expand(self.channels, -1)
        k = self.k
        self.max_value, self.max_image, self.max_pos = _merge(
            self.max_value, self.max_image, [self.max_pos], best, index, [where], k, True)
        self.mean_value, self.mean_image, self.mean_pos = _merge(
            self.mean_value, self.mean_image, [self.mean_pos], torch.nan_to_num(mean, nan=-math.inf), index,
            [where], k, True)
        self.min_value, self.min_image, self.min_pos = _merge(
            self.min_value, self.min_image, [self.min_pos], best, index, [where], k, False)
        bins = sketch_bin(best) + torch.arange(self.channels).unsqueeze(1) * SKETCH_BINS
        self.sketch.view(-1).index_add_(0, bins.reshape(-1), torch.ones(bins.numel(), dtype=torch.int32))
        self.count += best.shape[1]

    def quantiles(self) -> dict[str, torch.Tensor]:
        """{"p50", "p99", "max"} of the spatial max per channel (float64, NaN before any image): the max is exact,
        the others from the sketch (relative error at most :data:`SKETCH_ERROR`)."""
        n = int(self.count)
        out = {}
        if n == 0:
            nan = torch.full((self.channels,), math.nan, dtype=torch.float64)
            return {**{name: nan for name in QUANTILES}, "max": nan}
        cumulative = self.sketch.to(torch.int64).cumsum(dim=1)
        top, bottom = self.max_value[:, 0].double(), self.min_value[:, 0].double()
        for name, q in QUANTILES.items():
            rank = max(1, math.ceil(q * n))  # the rank-th smallest value (nearest-rank quantile)
            bins = torch.searchsorted(cumulative, torch.full((self.channels, 1), rank, dtype=torch.int64)).squeeze(1)
            out[name] = torch.minimum(torch.maximum(sketch_value(bins), bottom), top)
        out["max"] = top
        return out

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{name}": getattr(self, name).numpy() for name in self.NAMES}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, channels: int, k: int) -> "LayerState":
        state = cls(channels, k)
        for name in cls.NAMES:
            value = torch.from_numpy(np.array(arrays[f"{prefix}{name}"]))
            expected = getattr(state, name)
            if value.dtype != expected.dtype or value.dim() != expected.dim() or (
                    value.dim() and value.shape[0] != channels):
                raise ValueError(f"{prefix}{name}: {value.dtype} {tuple(value.shape)} does not fit {channels} channels")
            setattr(state, name, value)
        return state

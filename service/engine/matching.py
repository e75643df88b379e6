"""Exemplar matching targets (VITAL, ICCV 2025; issue 25 item 4): the sorted features of a unit's top-k dataset
examples at a layer, the distribution the ``match`` objective (:class:`featureviz.engine.objectives.Match`) pulls a
render's features towards.

Choice: the examples are the whole images (the index's top-k by spatial max of the unit), each resized (antialiased,
as the index pass decodes them) to the render's model input size, preprocessed like the render's input and run
through the model truncated at the match layer once. Per channel, the values over all positions of all k examples
are sorted: ``MatchTargets.values`` (C, k * P). A render with P' positions compares its own sorted values with the
targets resampled to P' quantiles (linear interpolation at (i + 1/2) / P'; identity when P' = k * P). Crops at the
unit's receptive field were the alternative: for early layers a crop is a few pixels, blown up to the render size
its features are those of a blurred patch, not of real images, so whole images are used at every layer.
"""

from __future__ import annotations

import torch

from featureviz.errors import InvalidSpec

__all__ = ["MatchTargets", "resample_sorted", "feature_targets", "sorted_positions", "index_targets"]


def sorted_positions(z: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """(N, C, P) per-channel values over positions (rank 4: H*W; tokens (N, T, C): the patch tokens; rank 2: one)."""
    from featureviz.engine.objectives import _patches
    from featureviz.engine.objectives import _positions

    return _positions(_patches(z, prefix) if z.dim() == 3 else z)


def resample_sorted(values: torch.Tensor, count: int) -> torch.Tensor:
    """(C, N) sorted rows -> (C, count): the rows' quantiles at (i + 1/2) / count, linearly interpolated (the 1-D
    optimal transport map between two empirical distributions of different sizes); identity when count == N."""
    n = values.shape[-1]
    if n == count:
        return values
    pos = (torch.arange(count, dtype=torch.float64) + 0.5) * (n / count) - 0.5
    pos = pos.clamp(0, n - 1)
    low = pos.floor().long()
    high = (low + 1).clamp(max=n - 1)
    frac = (pos - low).to(values.dtype)
    return values[:, low] * (1 - frac) + values[:, high] * frac


class MatchTargets:
    """Sorted target features (C, N) (CPU, float32) and their resampled copies per (count, device, dtype)."""

    def __init__(self, values: torch.Tensor, *, examples: int = 0, images: list[str] | None = None):
        if values.dim() != 2 or values.shape[-1] < 1:
            raise ValueError(f"targets must be (channels, values), got {tuple(values.shape)}")
        self.values = values.detach().to("cpu").sort(dim=-1).values
        self.examples = examples
        self.images = list(images or [])
        self._at: dict = {}

    @property
    def channels(self) -> int:
        return self.values.shape[0]

    def at(self, count: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        key = (count, str(device), dtype)
        found = self._at.get(key)
        if found is None:
            found = resample_sorted(self.values.to(dtype), count).to(device)
            self._at[key] = found
        return found

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


def feature_targets(model, images: torch.Tensor, layer: str, *, preprocess=None, device=None,
                    names: list[str] | None = None) -> MatchTargets:
    """The sorted features at ``layer`` (catalog name) of ``images`` (K, 3, H, W) in [0, 1], already at the model
    input size, preprocessed with ``preprocess`` (default: the model's): one forward under inference mode."""
    from featureviz.engine.transforms import preprocess_map

    preprocess = preprocess if preprocess is not None else model.input_spec.preprocess
    matrix, bias = preprocess_map(preprocess, model.input_spec.channels, device=device)
    truncated = model.truncate([layer])
    if device is not None:
        truncated = truncated.to(device)
        images = images.to(device)
    x = torch.einsum("oc,nchw->nohw", matrix, images.to(matrix.dtype)) + bias.view(1, -1, 1, 1)
    with torch.inference_mode():
        z = truncated(x)[layer]
        info = model.layer(layer)
        values = sorted_positions(z.float(), info.prefix_tokens or 0)  # (K, C, P)
        values = values.transpose(0, 1).reshape(values.shape[1], -1)  # (C, K*P)
    return MatchTargets(values.clone().cpu(), examples=images.shape[0], images=names)


def index_targets(model, index, read, *, layer: str, channel: int, k: int, match_layer: str,
                  size: tuple[int, int], preprocess=None, device=None, path: str = "objective.match",
                  max_side: int = 4096, index_name: str = "") -> MatchTargets:
    """Targets of unit ``layer:channel`` from a finished :class:`~featureviz.engine.exemplars.ExemplarIndex`:
    its top-``k`` images by spatial max (``read(i) -> bytes`` reads the set's image i), decoded at ``size`` (H, W).
    ``layer`` and ``match_layer`` are catalog names. InvalidSpec naming ``path``'s fields when the index does not
    cover ``layer``, has fewer than ``k`` examples, or none of the images decodes."""
    from featureviz.engine.exemplars.index import IMAGE_FORMATS
    from featureviz.engine.images import decode_image

    if layer not in index.states:
        covered = ", ".join(index.layers[:20]) + (" ..." if len(index.layers) > 20 else "")
        name = f" {index_name}" if index_name else ""
        raise InvalidSpec(f"{path}.layer", f"layer {layer!r} is not in exemplar index{name}; it covers: {covered}")
    index_k = int(index.meta.get("k", 0))
    if k > index_k:
        raise InvalidSpec(f"{path}.k", f"k={k} is more than the {index_k} examples the exemplar index keeps per "
                                       f"channel; use k <= {index_k}")
    examples = index.exemplars(layer, channel, "max", k)
    images, names = [], []
    for example in examples:
        try:
            images.append(decode_image(read(example.image), size, max_side=max_side, field="image",
                                       formats=IMAGE_FORMATS))
            names.append(example.name)
        except (InvalidSpec, OSError, ValueError):
            continue  # a file gone or changed since the pass: matched without it
    if not images:
        raise InvalidSpec(f"{path}.index", f"none of the top-{k} example images of {layer}:{channel} can be read "
                                           "from the set; index it again")
    return feature_targets(model, torch.stack(images), match_layer, preprocess=preprocess, device=device,
                           names=names)

"""Receptive fields from the graph itself: the support of the gradient of one activation with respect to the input.

The gradient is taken through a positive copy of the truncated model (every floating parameter ``|w| + 0.01``,
max pooling replaced by average pooling of the same window) at a positive random input, so no zero tap, dead ReLU
or max-pool winner shrinks the support below the field the graph allows. The boxes of a few positions per axis are
fitted to ``x0 = clip(p * stride - offset)``, ``x1 = clip(p * stride - offset + size)``; when every sampled
position fits, the layer is *regular* and any box is arithmetic, else each asked position takes its own gradient.
A field that covers the whole image at every sampled position (global pooling, attention, SE blocks) is
``whole``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch

__all__ = ["ReceptiveField", "receptive_field", "positive_copy"]

_SAMPLES = 9  # positions sampled per axis


@dataclass
class ReceptiveField:
    """The field of one layer at one input ``image_size`` = (H, W). ``map_size`` (rows, columns) of the layer's
    positions (None for rank-2 layers). Regular: ``size``, ``stride``, ``offset`` as (y, x) pairs."""

    layer: str
    image_size: tuple[int, int]
    map_size: tuple[int, int] | None
    whole: bool
    regular: bool
    size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    offset: tuple[int, int] | None = None
    boxes: dict = dc_field(default_factory=dict, repr=False)  # irregular: (x, y) -> box, filled on demand
    _probe: object = dc_field(default=None, repr=False, compare=False)

    def crop_box(self, position: tuple[int, int] | None) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end exclusive, clipped to the image: the input pixels that can influence the unit at
        ``position`` = (x, y) of the layer's map (None, or a whole field: the whole image)."""
        h, w = self.image_size
        if self.whole or position is None or self.map_size is None:
            return (0, 0, w, h)
        x, y = int(position[0]), int(position[1])
        rows, columns = self.map_size
        if not (0 <= x < columns and 0 <= y < rows):
            raise ValueError(f"position ({x}, {y}) is outside the {columns}x{rows} map of {self.layer}")
        if self.regular:
            y0 = y * self.stride[0] - self.offset[0]
            x0 = x * self.stride[1] - self.offset[1]
            return (max(0, x0), max(0, y0), min(w, x0 + self.size[1]), min(h, y0 + self.size[0]))
        if (x, y) not in self.boxes:
            if self._probe is None:
                raise ValueError(f"the field of {self.layer} is irregular and this copy cannot compute new boxes")
            self.boxes[(x, y)] = self._probe([(x, y)])[0]
        return self.boxes[(x, y)]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "image_size": list(self.image_size),
                "map_size": list(self.map_size) if self.map_size else None, "whole": self.whole,
                "regular": self.regular, "size": _list(self.size), "stride": _list(self.stride),
                "offset": _list(self.offset),
                "boxes": [[x, y, *box] for (x, y), box in sorted(self.boxes.items())]}

    @classmethod
    def from_dict(cls, data: dict) -> "ReceptiveField":
        pair = lambda v: tuple(int(a) for a in v) if v is not None else None  # noqa: E731
        return cls(layer=str(data["layer"]), image_size=pair(data["image_size"]), map_size=pair(data["map_size"]),
                   whole=bool(data["whole"]), regular=bool(data["regular"]), size=pair(data["size"]),
                   stride=pair(data["stride"]), offset=pair(data["offset"]),
                   boxes={(int(b[0]), int(b[1])): tuple(int(v) for v in b[2:6]) for b in data.get("boxes", [])})


def _list(value):
    return list(value) if value is not None else None


def positive_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy whose every floating parameter is ``|w| + 0.01``, whose max pools are average pools, and whose
    saturating activations (``nn.Hardtanh`` and so ``nn.ReLU6``, ``nn.Hardsigmoid``) are identities: the positive
    copy's activations grow past any clip bound, and a saturated clip would give no gradient at all (EfficientNet-
    Lite's ReLU6 units then measured as seeing the whole image)."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(p.abs() + 0.01)
    for name, child in list(module.named_modules()):
        if not name:
            continue
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if isinstance(child, torch.nn.MaxPool2d) and not child.return_indices:
            setattr(parent, name.rsplit(".", 1)[-1], torch.nn.AvgPool2d(
                child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode, count_include_pad=True))
        elif isinstance(child, (torch.nn.Hardtanh, torch.nn.Hardsigmoid)):
            setattr(parent, name.rsplit(".", 1)[-1], torch.nn.Identity())
    return module.eval()


def _support(grad: torch.Tensor) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) bounding box of the nonzero entries of a (C, H, W) gradient (the whole image if none)."""
    mask = grad.abs().sum(0) > 0
    if not mask.any():
        return (0, 0, mask.shape[1], mask.shape[0])
    rows = torch.nonzero(mask.any(1)).flatten()
    columns = torch.nonzero(mask.any(0)).flatten()
    return (int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1)


def receptive_field(model, layer: str, image_size: tuple[int, int], *, channels: int | None = None,
                    seed: int = 0) -> ReceptiveField:
    """The :class:`ReceptiveField` of ``layer`` (a catalog name of ``model``, an ImportedModel) at input
    ``image_size`` = (H, W). Costs one forward and backward of a batch of ``2 * 9`` positions."""
    info = model.layer(layer)
    positive = positive_copy(model.truncate([layer]))
    h, w = image_size
    channels = channels or model.input_spec.channels
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, channels, h, w, generator=generator) * 0.5 + 0.5
    weights = next(positive.parameters(), None)
    if weights is not None:  # the model may live on the worker's device (a render moved it): follow it
        base = base.to(weights.device)

    with torch.no_grad():
        shape = tuple(positive(base)[layer].shape)
    if len(shape) == 4:
        map_size = shape[2:4]
    elif len(shape) == 3:
        patches = shape[1] - (info.prefix_tokens or 0)
        map_size = _token_grid(info, patches, image_size)
    else:
        map_size = None

    def probe(positions):
        x = base.expand(len(positions), -1, -1, -1).clone().requires_grad_(True)
        act = positive(x)[layer]
        picked = []
        for i, position in enumerate(positions):
            if act.dim() == 4:
                picked.append(act[i, :, position[1], position[0]].sum())
            elif act.dim() == 3:
                token = (info.prefix_tokens or 0) + position[1] * map_size[1] + position[0]
                picked.append(act[i, token, :].sum())
            else:
                picked.append(act[i].sum())
        (grad,) = torch.autograd.grad(torch.stack(picked).sum(), x)
        return [_support(g) for g in grad]

    if map_size is None:
        box = probe([(0, 0)])[0]
        return ReceptiveField(layer, (h, w), None, whole=box == (0, 0, w, h), regular=False, _probe=probe,
                              boxes={} if box == (0, 0, w, h) else {(0, 0): box})
    rows, columns = map_size
    along_x = [(x, rows // 2) for x in _spread(columns)]
    along_y = [(columns // 2, y) for y in _spread(rows)]
    boxes = probe(along_x + along_y)
    box_x, box_y = boxes[:len(along_x)], boxes[len(along_x):]
    whole = all(box == (0, 0, w, h) for box in boxes)
    if whole:
        return ReceptiveField(layer, (h, w), (rows, columns), whole=True, regular=False, _probe=probe)
    fit_x = _fit([p[0] for p in along_x], [(b[0], b[2]) for b in box_x], w)
    fit_y = _fit([p[1] for p in along_y], [(b[1], b[3]) for b in box_y], h)
    found = {**{p: b for p, b in zip(along_x, box_x)}, **{p: b for p, b in zip(along_y, box_y)}}
    if fit_x is None or fit_y is None:
        return ReceptiveField(layer, (h, w), (rows, columns), whole=False, regular=False, boxes=found, _probe=probe)
    field = ReceptiveField(layer, (h, w), (rows, columns), whole=False, regular=True,
                           size=(fit_y[0], fit_x[0]), stride=(fit_y[1], fit_x[1]), offset=(fit_y[2], fit_x[2]),
                           _probe=probe)
    # the fit holds on both axes together: check a few positions off the two sampled lines
    corners = [(0, 0), (columns - 1, rows - 1), (columns // 3, (2 * rows) // 3)]
    if any(field.crop_box(p) != b for p, b in zip(corners, probe(corners))):
        return ReceptiveField(layer, (h, w), (rows, columns), whole=False, regular=False, boxes=found, _probe=probe)
    return field


def _spread(n: int) -> list[int]:
    """Up to ``_SAMPLES`` positions of 0..n-1, spread evenly, both ends included."""
    if n <= _SAMPLES:
        return list(range(n))
    return sorted({round(i * (n - 1) / (_SAMPLES - 1)) for i in range(_SAMPLES)})


def _fit(positions: list[int], spans: list[tuple[int, int]], length: int) -> tuple[int, int, int] | None:
    """(size, stride, offset) with ``span = clip(p * stride - offset, p * stride - offset + size)`` for every
    sampled position, from the unclipped starts and ends; None when the spans do not fit one such rule."""
    starts = [(p, a) for p, (a, _) in zip(positions, spans) if a > 0]
    if len(starts) >= 2:
        (p1, a1), (p2, a2) = starts[0], starts[-1]
        if p2 == p1 or (a2 - a1) % (p2 - p1):
            return None
        stride = (a2 - a1) // (p2 - p1)
        offset = p1 * stride - a1
    elif len(positions) == 1:  # one position (a 1x1 map) that is not the whole image: its own box
        a, b = spans[0]
        return (b - a, 1, -a)
    else:
        return None
    ends = [(p, b) for p, (_, b) in zip(positions, spans) if b < length]
    if not ends:
        return None
    size = ends[0][1] - (ends[0][0] * stride - offset)
    for p, (a, b) in zip(positions, spans):
        start = p * stride - offset
        if (max(0, start), min(length, start + size)) != (a, b):
            return None
    return (size, stride, offset)


def _token_grid(info, patches: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the patch tokens at ``image_size``: the catalog's grid scaled by the input size."""
    if info.grid:
        rows, columns = info.grid
        if rows * columns == patches:
            return (rows, columns)
    side = int(round(patches ** 0.5))
    h, w = image_size
    for rows in range(max(1, side - 64), patches + 1):
        if patches % rows == 0 and abs(rows / (patches // rows) - h / w) < 1e-6:
            return (rows, patches // rows)
    return (1, patches)

"""Dataset examples for the demo's channel renders: each rendered channel's top images from the demo's image set
(:mod:`featureviz.demo.images`) by the render's own measure, the channel's spatial mean (the index's "mean" order;
its "max" order ties at 6.0 on many images for the ReLU6 units of EfficientNet-Lite), each cropped at the receptive
field of the image's strongest position, and the ratio of the render's value to the best image's, which says how
far the optimisation went beyond the data.

Two sources give the same :class:`ChannelExamples`: :func:`local_examples` (the exemplar index of the engine, in
this process: ``featureviz demo --local``) and :func:`service_examples` (the server's index job, GetExemplars and
GetDatasetImage through :class:`featureviz.client.Client`). Torch-free at import.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from typing import Callable, Iterable, Sequence

__all__ = ["EXAMPLES_K", "CROP_SIDE", "Example", "ChannelExamples", "units_of", "local_examples",
           "service_examples", "crop_png", "write_crops", "attach"]

EXAMPLES_K = 6      # examples shown per channel (and kept per channel and order by the demo's index)
CROP_SIDE = 160     # a crop's long side at most, in pixels


@dataclasses.dataclass(frozen=True)
class Example:
    name: str                                     # the image's file name in the set
    value: float                                  # the channel's spatial mean on it (the render's objective)
    png: bytes                                    # the crop (or the whole image when ``whole``)
    box: tuple[int, int, int, int] | None         # the crop in the file's pixels, end exclusive
    whole: bool                                   # the unit sees the whole image: no crop

    def record(self, file: str) -> dict:
        return {"file": file, "image": self.name, "value": self.value,
                "box": list(self.box) if self.box is not None else None, "whole": self.whole}


@dataclasses.dataclass(frozen=True)
class ChannelExamples:
    layer: str
    channel: int
    examples: tuple[Example, ...]                 # top-k by spatial mean, best first, each cropped at the receptive
                                                  # field of the image's strongest position
    best_mean: float                              # the highest spatial mean of the channel over the set
    best_mean_name: str                           # on this image (examples[0])
    images: int                                   # images indexed
    field: str                                    # e.g. "receptive field 99 px, stride 16" or "the whole image"

    def ratio(self, render_value: float) -> float | None:
        """The render's objective (the channel's spatial mean on the render) over the best real image's: how far
        the optimisation went beyond the data. None when the best real mean is not positive."""
        return render_value / self.best_mean if self.best_mean > 0 else None


def units_of(panels: Iterable) -> list[tuple[str, int]]:
    """The (layer, channel) of every channel render of ``panels`` (:class:`featureviz.demo.Panel`), in order,
    each once."""
    out = []
    for panel in panels:
        for unit in panel.units:
            if unit is not None and unit not in out:
                out.append(unit)
    return out


def crop_png(data: bytes, box: Sequence[int] | None, *, max_side: int = CROP_SIDE) -> bytes:
    """``box`` (x0, y0, x1, y1, end exclusive; None: the whole image) of the image ``data``, RGB, downscaled to
    ``max_side`` on its long side, as PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if box is not None:
            image = image.crop(tuple(int(v) for v in box))
        scale = max_side / max(image.size)
        if scale < 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()


def _field_text(field) -> str:
    if field is None:
        return "receptive field unknown"
    if field.whole:
        return "the whole image (the unit's receptive field covers it)"
    if field.regular:  # the server's GetExemplars gives one side and one stride: the same words for a square field
        size = f"{field.size[1]}" if field.size[0] == field.size[1] else f"{field.size[1]} x {field.size[0]}"
        stride = f"{field.stride[1]}" if field.stride[0] == field.stride[1] else f"{field.stride[1]} x {field.stride[0]}"
        return f"receptive field {size} px, stride {stride} px"
    return "receptive field measured per position"


def local_examples(model, folder: str | os.PathLike, units: Sequence[tuple[str, int]], *, k: int = EXAMPLES_K,
                   batch_size: int = 16, device=None, state_path: str | os.PathLike | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[tuple[str, int], ChannelExamples]:
    """Index ``folder``'s images through ``model`` (an ImportedModel) at the units' layers in this process
    (:func:`featureviz.engine.exemplars.build_index`) and return each unit's examples, cropped from the files."""
    from featureviz.engine.exemplars import ImageFolder
    from featureviz.engine.exemplars import build_index

    layers = list(dict.fromkeys(layer for layer, _ in units))
    source = ImageFolder(folder)
    index = build_index(model, source, layers=layers, k=k, batch_size=batch_size, chunk_images=4 * batch_size,
                        device=device, state_path=state_path, progress=progress)
    out = {}
    for layer, channel in units:
        top = index.exemplars(layer, channel, "mean", k, model=model)
        best = top[0]
        examples = tuple(
            Example(name=e.name, value=float(e.value), whole=e.whole, box=None if e.whole else e.image_box,
                    png=crop_png(source.read(e.image), None if e.whole else e.image_box))
            for e in top)
        out[(layer, channel)] = ChannelExamples(
            layer=layer, channel=channel, examples=examples, best_mean=float(best.value), best_mean_name=best.name,
            images=index.indexed, field=_field_text(index.fields.get(layer)))
    return out


def service_examples(client, model: str, dataset: str, units: Sequence[tuple[str, int]], *, k: int = EXAMPLES_K,
                     batch_size: int = 16, on_job: Callable | None = None) -> dict[tuple[str, int], ChannelExamples]:
    """The same through a featureviz server: one index job over ``dataset`` at the units' layers
    (``client.index_exemplars``; a finished index of the same inputs is reused), then GetExemplars for each unit
    and GetDatasetImage for each crop."""
    layers = list(dict.fromkeys(layer for layer, _ in units))
    job = client.index_exemplars(model, dataset, layers=layers, k=k, batch_size=batch_size)
    if on_job is not None:
        job = on_job(job)
    out = {}
    for layer, channel in units:
        top = client.exemplars(model, dataset, layer, channel, order="mean", k=k)
        examples = []
        for e in top.exemplars:
            box = None if e.whole else (e.image_box.x0, e.image_box.y0, e.image_box.x1, e.image_box.y1)
            png = client.dataset_image(dataset, e.image, box=box, max_side=CROP_SIDE)
            examples.append(Example(name=e.name, value=float(e.value), png=_png_bytes(png), box=box,
                                    whole=e.whole))
        if top.whole:
            field = "the whole image (the unit's receptive field covers it)"
        elif top.field_size:
            field = f"receptive field {top.field_size} px, stride {top.field_stride} px"
        else:
            field = "receptive field measured per position"
        out[(layer, channel)] = ChannelExamples(
            layer=layer, channel=channel, examples=tuple(examples), best_mean=float(top.exemplars[0].value),
            best_mean_name=top.exemplars[0].name, images=int(top.images), field=field)
    return out


def _png_bytes(answer) -> bytes:
    """``dataset_image``'s answer: PNG bytes, or a message holding them (``DatasetImageData.png``)."""
    return answer if isinstance(answer, (bytes, bytearray)) else bytes(answer.png)


def write_crops(out_dir: str | os.PathLike, key: str, examples: ChannelExamples) -> list[str]:
    """Write the crops as ``<key>-ex<rank>.png`` into ``out_dir``; returns the file names."""
    out = pathlib.Path(out_dir)
    names = []
    for rank, example in enumerate(examples.examples):
        name = f"{key}-ex{rank}.png"
        (out / name).write_bytes(example.png)
        names.append(name)
    return names


def attach(results: Iterable, found: dict[tuple[str, int], ChannelExamples]) -> None:
    """Give each channel render of ``results`` (:class:`featureviz.demo.PanelResult`) its unit's examples."""
    for result in results:
        units = result.panel.units
        if any(unit is not None for unit in units):
            result.examples = [found.get(units[i]) if i < len(units) and units[i] is not None else None
                               for i in range(len(result.pngs))]

"""The requests of the dataset-example calls, shared by :class:`featureviz.client.Client` and its asyncio twin:
the exemplar index job (``JobSpec.exemplar_index``), GetExemplars and GetDatasetImage."""

from __future__ import annotations

from collections.abc import Sequence

from featureviz.codec import preprocess_to_proto
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["index_job_spec", "exemplars_request", "image_request", "ORDERS"]

ORDERS = {"max": pb.EXEMPLAR_ORDER_MAX, "mean": pb.EXEMPLAR_ORDER_MEAN, "min": pb.EXEMPLAR_ORDER_MIN}


def _size(size) -> pb.ImageSize | None:
    if size is None:
        return None
    if isinstance(size, int):
        return pb.ImageSize(height=size, width=size)
    height, width = size
    return pb.ImageSize(height=int(height), width=int(width))


def _name(value, kind: str) -> str:
    """A message (pb.Model, pb.Dataset) or a string -> the id or name the server reads."""
    if isinstance(value, pb.Model):
        return value.sha256
    if isinstance(value, pb.Dataset):
        return value.id
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a string (its id) or a pb.{kind.capitalize()}, got {type(value).__name__}")
    return value


def index_job_spec(model, dataset, *, layers: Sequence[str] | None = None, k: int | None = None,
                   batch_size: int | None = None, size=None, preprocess: dict | None = None) -> pb.JobSpec:
    """The JobSpec of an exemplar index job: ``layers`` (catalog names or aliases; None: every layer with
    channels), ``k`` examples kept per channel and order, ``batch_size`` images per forward, ``size`` S or (H, W)
    (None: the model's default), ``preprocess`` ``{"mean", "std", "channel_order"}`` (None: the model's)."""
    if isinstance(layers, str):
        layers = [layers]
    index = pb.ExemplarIndexSpec(dataset=_name(dataset, "dataset"), layers=list(layers or ()))
    if k is not None:
        index.k = int(k)
    if batch_size is not None:
        index.batch_size = int(batch_size)
    spec = pb.JobSpec(model=_name(model, "model"), exemplar_index=index)
    if size is not None:
        spec.size.CopyFrom(_size(size))
    if preprocess is not None:
        spec.preprocess.CopyFrom(preprocess_to_proto(preprocess))
    return spec


def exemplars_request(model, dataset, layer: str, channel: int, order: str, k: int, size) -> pb.GetExemplarsRequest:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    request = pb.GetExemplarsRequest(model=_name(model, "model"), dataset=_name(dataset, "dataset"), layer=layer,
                                     channel=int(channel), order=ORDERS[order], k=int(k or 0))
    if size is not None:
        request.size.CopyFrom(_size(size))
    return request


def image_request(dataset, image: str, box, max_side: int) -> pb.GetDatasetImageRequest:
    """``image``: its sha256 or name (or a pb.Exemplar / pb.DatasetImage); ``box``: (x0, y0, x1, y1) or a
    pb.CropBox in the file's pixels, end exclusive (None: the whole image)."""
    if isinstance(image, pb.Exemplar):
        image = image.image
    elif isinstance(image, pb.DatasetImage):
        image = image.sha256
    request = pb.GetDatasetImageRequest(dataset=_name(dataset, "dataset"), image=image, max_side=int(max_side or 0))
    if box is not None:
        if isinstance(box, pb.CropBox):
            request.box.CopyFrom(box)
        else:
            x0, y0, x1, y1 = (int(v) for v in box)
            request.box.CopyFrom(pb.CropBox(x0=x0, y0=y0, x1=x1, y1=y1))
    return request

"""The worker's answers to GetExemplars and GetDatasetImage (torch side; plain data in and out).

``Queries.exemplars(query)`` reads a finished exemplar index file (``ExemplarIndex.load``: arrays and JSON, no
pickle; loaded indexes kept by (path, inode, size, mtime)) and ranks one channel. The crop boxes need the layer's
receptive field at the index's input size: computed with the model the first time (``receptive_field``, one
forward and backward of a positive copy) and cached per (model, layer, input size): in memory, and in a sidecar
``fields-<sha256 of (model, height, width)>.json`` beside the index files, shared by every index of that model and
size. The sidecar is rewritten read-merge-write under an exclusive ``flock`` of ``<sidecar>.lock`` (Ray actors on
one store too), through a unique temp file renamed over it, so concurrent queries never lose or tear it; a sidecar
that does not parse is ignored and rewritten. Irregular fields (boxes per position) keep their probe in memory
only; the sidecar holds regular and whole ones.

``dataset_image(query)`` decodes a stored image (its side read from the header and refused above
``max_decode_side`` before any pixel is decoded; palette, 16-bit, grey and alpha converted to RGB as the index
pass does), crops the box, downscales it to ``max_side`` and encodes it as PNG.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

from featureviz.errors import FailedPrecondition
from featureviz.errors import InvalidSpec
from featureviz.errors import NotFound
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Queries", "dataset_image", "fields_path", "FIELDS_FORMAT"]

FIELDS_FORMAT = 1
_INDEXES_KEPT = 8
_MAX_IMAGE_FILE_BYTES = 256 << 20  # a stored image is at most Limits.max_dataset_image_bytes; a bound regardless


def fields_path(folder: str | os.PathLike, model: str, size: tuple[int, int]) -> Path:
    """The sidecar holding the receptive fields of ``model``'s layers at input ``size`` = (H, W)."""
    key = hashlib.sha256(json.dumps([FIELDS_FORMAT, model, int(size[0]), int(size[1])]).encode()).hexdigest()
    return Path(folder) / f"fields-{key}.json"


class Queries:
    """``models``: the worker's :class:`featureviz.worker.models.ModelCache` (the model a field is computed with);
    ``on_device(fn)``: runs the field's computation where the model's other work runs (the LocalWorker's device
    thread, between rounds: it shares the model's weights with the renders); default: in the calling thread."""

    def __init__(self, models, *, on_device=None, indexes_kept: int = _INDEXES_KEPT):
        self.models = models
        self._on_device = on_device or (lambda fn: fn())
        self._lock = threading.Lock()
        self._indexes: collections.OrderedDict[tuple, object] = collections.OrderedDict()
        self._indexes_kept = max(1, indexes_kept)
        self._fields: dict[tuple, object] = {}  # (model, layer, H, W) -> ReceptiveField (with its probe)
        self._computing: dict[tuple, threading.Lock] = {}  # one computation per key
        self.computed = 0  # receptive fields computed with a model (tests read it: the cache is used)

    # ------------------------------------------------------------------------------------------- exemplars

    def exemplars(self, query) -> pb.GetExemplarsResponse:
        index = self._index(query.index_path)
        if not index.complete:
            raise FailedPrecondition("the exemplar index is not finished; wait for its job", reason="INDEX_UNFINISHED")
        if index.meta.get("model") != query.model:
            raise FailedPrecondition("the exemplar index was built with another model", reason="INDEX_MISMATCH")
        if query.layer not in index.states:
            raise InvalidSpec("layer", f"layer {query.layer} is not in this index")
        size = tuple(int(v) for v in index.input_size)
        field = self._field(query.model, query.layer, size, Path(query.index_path).parent)
        key = (query.model, query.layer, *size)
        with self._computing[key]:  # an irregular field fills its boxes on demand
            index.fields[query.layer] = field
            examples = index.exemplars(query.layer, query.channel, query.order, query.k)
        quantiles = index.quantiles(query.layer)
        regular = field.regular and field.size is not None
        out = pb.GetExemplarsResponse(
            layer=query.layer, channel=query.channel, size=pb.ImageSize(height=size[0], width=size[1]),
            images=index.indexed, p50=quantiles["p50"][query.channel], p99=quantiles["p99"][query.channel],
            max=quantiles["max"][query.channel], field_size=max(field.size) if regular else 0,
            field_stride=max(field.stride) if regular else 0, whole=bool(field.whole or field.map_size is None))
        for example in examples:
            item = out.exemplars.add(rank=example.rank, name=example.name, value=example.value, whole=example.whole)
            if example.position is not None:
                item.x, item.y = int(example.position[0]), int(example.position[1])
            if example.box is not None:
                item.box.CopyFrom(_box(example.box))
            if example.image_box is not None:
                item.image_box.CopyFrom(_box(example.image_box))
        return out

    def join_scores(self, query) -> list[tuple[float, float, float, float]]:
        """An atlas's dataset join: per ``(channel, png)`` of ``query.units`` the channel's (p50, p99, max) over the
        index's images and the render's score on the same measure (``score_images``: the render through the
        model as a set's image, on the device thread)."""
        from featureviz.engine.exemplars import score_images

        index = self._index(query.index_path)
        if not index.complete:
            raise FailedPrecondition("the exemplar index is not finished; wait for its job", reason="INDEX_UNFINISHED")
        if index.meta.get("model") != query.model:
            raise FailedPrecondition("the exemplar index was built with another model", reason="INDEX_MISMATCH")
        quantiles = index.quantiles(query.layer)
        model = self.models.get(query.model)
        scores = self._on_device(lambda: score_images(model, index, query.layer, query.units))
        return [(quantiles["p50"][channel], quantiles["p99"][channel], quantiles["max"][channel], score)
                for (channel, _), score in zip(query.units, scores)]

    def _index(self, path: str):
        from featureviz.engine.exemplars import ExemplarIndex

        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise NotFound("the exemplar index file is gone; run the index job again",
                           reason="EXEMPLAR_INDEX_NOT_FOUND") from None
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
        try:
            index = ExemplarIndex.load(path)
        except ValueError as exc:
            raise FailedPrecondition(f"the exemplar index file cannot be read ({exc}); run the index job again",
                                     reason="INDEX_DAMAGED") from None
        with self._lock:
            self._indexes[key] = index
            while len(self._indexes) > self._indexes_kept:
                self._indexes.popitem(last=False)
        return index

    def _field(self, model_sha: str, layer: str, size: tuple[int, int], folder: Path):
        from featureviz.engine.exemplars import ReceptiveField
        from featureviz.engine.exemplars import receptive_field

        key = (model_sha, layer, *size)
        with self._lock:
            if key in self._fields:
                return self._fields[key]
            computing = self._computing.setdefault(key, threading.Lock())
        with computing:
            with self._lock:
                if key in self._fields:
                    return self._fields[key]
            path = fields_path(folder, model_sha, size)
            stored = _read_fields(path, model_sha, size).get(layer)
            field = None
            if stored is not None:
                try:
                    field = ReceptiveField.from_dict(stored)
                except (KeyError, TypeError, ValueError):
                    field = None
                if field is not None and (field.layer != layer or tuple(field.image_size) != size
                                          or not (field.regular or field.whole or field.map_size is None)):
                    field = None  # an irregular field needs its probe: computed again below
            if field is None:
                model = self.models.get(model_sha)
                field = self._on_device(lambda: receptive_field(model, layer, size))
                self.computed += 1
                _write_field(path, model_sha, size, layer, field.to_dict())
            with self._lock:
                self._fields[key] = field
            return field


def _box(box) -> pb.CropBox:
    x0, y0, x1, y1 = (int(v) for v in box)
    return pb.CropBox(x0=x0, y0=y0, x1=x1, y1=y1)


def _read_fields(path: Path, model: str, size: tuple[int, int]) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(16 << 20).decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FIELDS_FORMAT or data.get("model") != model \
            or data.get("size") != list(size) or not isinstance(data.get("fields"), dict):
        return {}
    return data["fields"]


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive ``flock`` of ``path`` (created), held for the block: one writer of the sidecar at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the in-process lock only
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_field(path: Path, model: str, size: tuple[int, int], layer: str, field: dict) -> None:
    """Merge one layer's field into the sidecar: read, add, write a unique temp file, fsync, rename. A failure
    (read-only or full disk) only costs a recomputation in another process."""
    try:
        with _exclusive(path.with_name(path.name + ".lock")):
            fields = dict(_read_fields(path, model, size))
            fields[layer] = field
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "w") as f:
                    json.dump({"format": FIELDS_FORMAT, "model": model, "size": list(size), "fields": fields}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- images

def dataset_image(query) -> pb.DatasetImageData:
    """The stored image at ``query.path`` (or its ``box``), downscaled to fit ``query.max_side``, as PNG."""
    from featureviz.engine.exemplars.index import IMAGE_FORMATS
    from featureviz.engine.images import decode_image
    from featureviz.engine.images import png_bytes
    from featureviz.worker.adapter import _png_size

    try:
        with open(query.path, "rb") as f:
            data = f.read(_MAX_IMAGE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise NotFound("the image file is gone from the store; upload the set again",
                       reason="IMAGE_NOT_FOUND") from None
    if len(data) > _MAX_IMAGE_FILE_BYTES:
        raise InvalidSpec("image", f"the stored file is over {_MAX_IMAGE_FILE_BYTES} bytes", reason="IMAGE_TOO_LARGE")
    image = decode_image(data, None, max_side=query.max_decode_side, field="image", formats=IMAGE_FORMATS)
    if query.box is not None:
        x0, y0, x1, y1 = query.box
        if not (0 <= x0 < x1 <= image.shape[2] and 0 <= y0 < y1 <= image.shape[1]):
            raise InvalidSpec("box", f"the box ({x0}, {y0}, {x1}, {y1}) is not inside the "
                                     f"{image.shape[2]}x{image.shape[1]} image")
        image = image[:, y0:y1, x0:x1]
    height, width = image.shape[1:]
    png = png_bytes(image, max_side=query.max_side or None)
    width, height = _png_size(png, int(width), int(height))
    return pb.DatasetImageData(png=png, width=width, height=height)

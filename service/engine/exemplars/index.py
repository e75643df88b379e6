"""The exemplar index: one streaming pass over a set of images through the model truncated at the chosen layers.

Images are decoded by a small thread pool a few batches ahead of the forward pass; the pass works in chunks of
``chunk_images`` images and after each finished chunk writes its whole state (plain arrays + JSON, one ``.npz``,
no pickle) atomically (temp file, fsync, rename). Rerun with the same ``state_path`` and the same inputs, it resumes
after the last finished chunk; batches are aligned to chunk boundaries, so a resumed pass sees the same batches
in the same order and ends with exactly the same arrays as an uninterrupted one."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import stat
import threading
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from featureviz.errors import Cancelled
from featureviz.errors import InvalidSpec
from featureviz.errors import echo

from .fields import ReceptiveField
from .fields import _token_grid
from .fields import receptive_field
from .state import LayerState
from .state import reduce_activation

__all__ = ["ImageSource", "ImageFolder", "ImageFiles", "ExemplarIndex", "Exemplar", "IndexPass", "build_index",
           "index_layers", "score_images", "DEFAULT_K", "MAX_K", "ORDERS", "FORMAT", "SKIP_CAUSES", "MAX_FILE_BYTES"]

FORMAT = 1
DEFAULT_K = 16
MAX_K = 100
ORDERS = ("max", "mean", "min")
SKIP_CAUSES = ("not_image", "corrupt", "too_large")
NAMES_PER_CAUSE = 10
MAX_FILE_BYTES = 64 << 20  # a file in an image folder larger than this is skipped as too large, unread
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class ImageSource(Protocol):
    """What the pass reads: ``names`` (one per image, in the order indexed) and ``read(i) -> bytes``."""

    names: Sequence[str]

    def read(self, i: int) -> bytes: ...


class ImageFolder:
    """The regular files directly in ``folder`` (no subfolders; symbolic links, devices and dot files left out),
    sorted by name. ``read`` refuses (as too large, via :class:`ValueError`) files over ``max_bytes``."""

    def __init__(self, folder: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InvalidSpec("images", f"{echo(str(folder))} is not a folder; pass a folder of images")
        self.max_bytes = max_bytes
        names = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
        self.names = sorted(names)

    def read(self, i: int) -> bytes:
        path = self.folder / self.names[i]
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise ValueError(f"the file is over {self.max_bytes} bytes")
        return data

    def digest(self) -> str:
        """sha256 over the sorted (name, sha256 of the bytes) pairs: the image set's identity for caching."""
        outer = hashlib.sha256()
        for i, name in enumerate(self.names):
            try:
                inner = hashlib.sha256(self.read(i)).hexdigest()
            except (OSError, ValueError) as exc:
                inner = f"unreadable:{type(exc).__name__}"
            outer.update(json.dumps([name, inner]).encode())
        return outer.hexdigest()


@dataclass(frozen=True)
class Exemplar:
    """One ranked example. ``position`` (x, y) in the layer's map (None for rank-2 layers); ``box`` (x0, y0, x1,
    y1), end exclusive, in the pixels of the image as the model saw it (resized to ``input_size``);
    ``image_box`` the same box in the pixels of the original file; ``whole``: the unit sees the whole image."""

    rank: int
    image: int
    name: str
    value: float
    position: tuple[int, int] | None
    box: tuple[int, int, int, int] | None
    image_box: tuple[int, int, int, int] | None
    whole: bool

    def to_dict(self) -> dict:
        return {"rank": self.rank, "image": self.image, "name": self.name, "value": self.value,
                "position": list(self.position) if self.position is not None else None,
                "box": list(self.box) if self.box is not None else None,
                "image_box": list(self.image_box) if self.image_box is not None else None, "whole": self.whole}


def index_layers(model, layers: Sequence[str] | None = None) -> list[str]:
    """Catalog names of ``layers`` (any alias; unknown names raise NotFound naming close matches before any
    compute), default: every catalog layer with channels of rank 2, 3 or 4, in catalog order."""
    if layers is None:
        return [info.name for info in model.layers if info.channels and len(info.shape) in (2, 3, 4)]
    names = []
    for name in layers:
        info = model.layer(name)
        if not info.channels or len(info.shape) not in (2, 3, 4):
            raise InvalidSpec("layers", f"layer {echo(name)} has shape {list(info.shape)}: only layers with "
                                        "channels of rank 2, 3 or 4 are indexed")
        if info.name not in names:
            names.append(info.name)
    return names


class ExemplarIndex:
    """The per-channel state of every indexed layer, with the image names and the pass's position."""

    def __init__(self, meta: dict, states: dict[str, LayerState], image_sizes: np.ndarray):
        self.meta = meta
        self.states = states
        self.image_sizes = image_sizes  # (N, 2) int32: (width, height) of each file, 0 when skipped
        self.fields: dict[str, ReceptiveField] = {
            name: ReceptiveField.from_dict(data) for name, data in meta.get("fields", {}).items()}

    # -- what it holds
    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def names(self) -> list[str]:
        return list(self.meta["names"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta["size"])

    @property
    def skipped(self) -> dict:
        return self.meta["skipped"]

    @property
    def indexed(self) -> int:
        """Images that went through the model."""
        return int(self.meta["indexed"])

    def state(self, layer: str) -> LayerState:
        if layer not in self.states:
            raise InvalidSpec("layer", f"layer {echo(layer)} is not in this index; it holds "
                                       f"{echo(self.layers[:20])}; index it with --layers")
        return self.states[layer]

    def quantiles(self, layer: str) -> dict[str, list[float]]:
        """{"p50", "p99", "max"}: per channel, of the spatial max over the set (see :mod:`.state` for the error)."""
        return {name: [float(v) for v in values] for name, values in self.state(layer).quantiles().items()}

    # -- receptive fields
    def field(self, layer: str, model=None) -> ReceptiveField:
        """The layer's :class:`ReceptiveField` at the index's input size, computed with ``model`` the first time
        and kept in the index (saved with it)."""
        if layer not in self.fields:
            if model is None:
                raise InvalidSpec("layer", f"the receptive field of {echo(layer)} is not computed yet; pass the model")
            if model.sha256 != self.meta["model"]:
                raise InvalidSpec("model", "this index was built with another model")
            self.fields[layer] = receptive_field(model, layer, self.input_size)
            self.meta.setdefault("fields", {})[layer] = self.fields[layer].to_dict()
        return self.fields[layer]

    # -- queries
    def exemplars(self, layer: str, channel: int, order: str = "max", k: int | None = None,
                  model=None) -> list[Exemplar]:
        """The ranked examples of one channel: ``order`` "max" (top-k by spatial max), "mean" (top-k by spatial
        mean) or "min" (bottom-k by spatial max); ``k`` at most the index's k. Crop boxes need the layer's field
        (:meth:`field`): computed with ``model`` when not yet in the index, else the boxes are None."""
        state = self.state(layer)
        if order not in ORDERS:
            raise InvalidSpec("order", f"order must be one of {', '.join(ORDERS)}, got {echo(order)}")
        if not isinstance(channel, int) or not 0 <= channel < state.channels:
            raise InvalidSpec("channel", f"channel {echo(channel)} is out of range: {layer} has {state.channels} "
                                         f"channels (0..{state.channels - 1})")
        k = self.meta["k"] if k is None else k
        if not isinstance(k, int) or not 1 <= k <= self.meta["k"]:
            raise InvalidSpec("k", f"k must be 1..{self.meta['k']} (this index keeps {self.meta['k']}), got {echo(k)}")
        values = getattr(state, f"{order}_value")[channel, :k]
        images = getattr(state, f"{order}_image")[channel, :k]
        positions = getattr(state, f"{order}_pos")[channel, :k]
        field = self.fields.get(layer) if model is None else self.field(layer, model)
        columns = (self.meta["maps"].get(layer) or [0, 0])[1]
        names, out = self.meta["names"], []
        for rank, (value, image, flat) in enumerate(zip(values.tolist(), images.tolist(), positions.tolist())):
            position = (flat % columns, flat // columns) if flat >= 0 and columns else None
            box = field.crop_box(position) if field is not None else None
            out.append(Exemplar(rank=rank, image=image, name=names[image], value=value, position=position, box=box,
                                image_box=self._image_box(image, box), whole=bool(field and (field.whole or
                                                                                            position is None))))
        return out

    def _image_box(self, image: int, box):
        if box is None:
            return None
        w, h = (int(v) for v in self.image_sizes[image])
        th, tw = self.input_size
        if not w or not h:
            return None
        x0, y0, x1, y1 = box
        return (math.floor(x0 * w / tw), math.floor(y0 * h / th), math.ceil(x1 * w / tw), math.ceil(y1 * h / th))

    # -- files
    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically: ``path``'s folder gets a temp file, fsynced, then renamed over ``path``."""
        path = Path(path)
        arrays = {"image_sizes": self.image_sizes}
        for i, layer in enumerate(self.meta["layers"]):
            arrays.update(self.states[layer].arrays(f"L{i}."))
        arrays["meta"] = np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # two passes, two names
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExemplarIndex":
        """Read an index written by :meth:`save` (``allow_pickle=False``: arrays and JSON only). ValueError when
        the file is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            meta = json.loads(arrays["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            states = {}
            for i, layer in enumerate(meta["layers"]):
                states[layer] = LayerState.from_arrays(arrays, f"L{i}.", int(meta["channels"][layer]), int(meta["k"]))
            sizes = np.array(arrays["image_sizes"], dtype=np.int32)
            if sizes.shape != (len(meta["names"]), 2):
                raise ValueError("image_sizes does not match the names")
        except (OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError,
                ValueError) as exc:
            raise ValueError(f"not a readable exemplar index ({type(exc).__name__}: {exc})") from None
        return cls(meta, states, sizes)


def _decode(source: ImageSource, i: int, size: tuple[int, int], max_side: int):
    """(tensor (3, H, W), (width, height)) or (None, (cause, line))."""
    from featureviz.engine.images import decode_image
    from featureviz.engine.images import image_size

    try:
        data = source.read(i)
    except ValueError as exc:
        return None, ("too_large", str(exc))
    except OSError as exc:
        return None, ("corrupt", f"cannot be read ({exc.strerror or type(exc).__name__})")
    try:
        width, height = image_size(data, field="image", formats=IMAGE_FORMATS)
        tensor = decode_image(data, size, max_side=max_side, field="image", formats=IMAGE_FORMATS)
    except InvalidSpec as exc:
        cause = ("too_large" if exc.reason == "IMAGE_TOO_LARGE" else
                 "not_image" if exc.description.startswith(("not a", "the image is empty")) else "corrupt")
        return None, (cause, exc.description)
    return tensor, (width, height)


class IndexPass:
    """One index pass made steppable: :meth:`step` runs one batch (decoded ahead by the pass's thread pool), so a
    caller can interleave it with other device work (the server's worker runs one batch per device round beside
    the render steps). The arguments are :func:`build_index`'s, which is the loop over it: resume from
    ``state_path`` (a state of other inputs is started over), a state save after each finished chunk, the same
    arrays whether run at once, stepped, or resumed after a kill. ``done``/``total``: images passed / in the set;
    ``finished``: every batch ran (then :meth:`result`). Call :meth:`close` when leaving early (cancel, error):
    it drops the decodes still pending; the saved state stays."""

    def __init__(self, model, source: ImageSource, *, layers: Sequence[str] | None = None, k: int = DEFAULT_K,
                 size: tuple[int, int] | int | None = None, preprocess=None, batch_size: int = 32,
                 chunk_images: int = 256, state_path: str | os.PathLike | None = None, set_hash: str = "",
                 max_side: int = 4096, workers: int = 2, device=None,
                 progress: Callable[[int, int], None] | None = None,
                 on_chunk: Callable[[int, int], None] | None = None):
        from featureviz.engine.transforms import preprocess_map

        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidSpec("k", f"k must be 1..{MAX_K}, got {echo(k)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidSpec("batch_size", f"batch_size must be a positive integer, got {echo(batch_size)}")
        names = index_layers(model, layers)
        spec = model.input_spec
        size = (size, size) if isinstance(size, int) else tuple(size or spec.default_size)
        for axis, fixed, want in (("height", spec.height, size[0]), ("width", spec.width, size[1])):
            if fixed is not None and fixed != want:
                raise InvalidSpec("size", f"the model's input {axis} is fixed at {fixed}; got {want}")
        preprocess = (preprocess or spec.preprocess).for_channels(spec.channels)
        chunk_images = max(batch_size, -(-chunk_images // batch_size) * batch_size)  # a multiple of the batch
        total = len(source.names)
        meta_key = {"format": FORMAT, "model": model.sha256, "set": set_hash, "layers": names, "k": k,
                    "size": list(size), "preprocess": {"mean": list(preprocess.mean), "std": list(preprocess.std),
                                                       "channel_order": preprocess.channel_order},
                    "batch_size": batch_size, "chunk_images": chunk_images, "names": list(source.names)}

        index = None
        if state_path is not None and Path(state_path).exists():
            try:
                index = ExemplarIndex.load(state_path)
            except ValueError:
                index = None
            if index is not None and any(index.meta.get(key) != value for key, value in meta_key.items()):
                index = None  # another pass's state: start over
        infos = {name: model.layer(name) for name in names}
        if index is None:
            meta = {**meta_key, "position": 0, "indexed": 0, "complete": False, "maps": {},
                    "channels": {name: int(infos[name].channels) for name in names},
                    "skipped": {cause: {"count": 0, "names": []} for cause in SKIP_CAUSES}, "fields": {}}
            states = {name: LayerState(infos[name].channels, k) for name in names}
            index = ExemplarIndex(meta, states, np.zeros((total, 2), dtype=np.int32))
        self.index, self.source, self.total, self.size = index, source, total, size
        self.state_path, self.chunk_images, self.max_side = state_path, chunk_images, max_side
        self.progress, self.on_chunk, self.device, self.infos = progress, on_chunk, device, infos
        self.layers = names
        self._truncated = None
        self._pool = None
        self._pending: collections.deque = collections.deque()
        self._ahead = max(2, workers + 1)
        self._workers = max(1, workers)
        start = int(index.meta["position"])
        self._batches = [] if index.meta["complete"] else [
            (s, min(s + batch_size, total, (s // chunk_images + 1) * chunk_images))
            for s in range(start, total, batch_size)]
        self._next = 0
        self._model, self._preprocess, self._map = model, preprocess, preprocess_map

    @staticmethod
    def decoded_bytes(batch_size: int, size: tuple[int, int], workers: int = 2) -> int:
        """The most bytes of decoded images a pass holds at once: the batches decoded ahead (``max(2, workers +
        1)``) and the one in the forward pass, each ``batch_size`` float32 (3, H, W) images."""
        return (max(2, workers + 1) + 1) * batch_size * 3 * int(size[0]) * int(size[1]) * 4

    @property
    def done(self) -> int:
        """Images passed so far (the resume point, then each batch's end)."""
        return self._batches[self._next - 1][1] if self._next else int(self.index.meta["position"])

    @property
    def finished(self) -> bool:
        return self._next >= len(self._batches)

    def _start(self) -> None:
        self._truncated = self._model.truncate(self.layers)
        self._matrix, self._bias = self._map(self._preprocess, self._model.input_spec.channels, device=self.device)
        if self.device is not None:
            self._truncated = self._truncated.to(self.device)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="exemplar-decode")
        self._pending.extend(self._pool.submit(self._decode_batch, span) for span in self._batches[:self._ahead])

    def _decode_batch(self, span):
        return [(i, *_decode(self.source, i, self.size, self.max_side)) for i in range(*span)]

    def step(self) -> bool:
        """Run the next batch (decode, forward, top-k update; a state save at a chunk's end). -> finished."""
        if self.finished:
            return True
        if self._pool is None:
            self._start()
        n = self._next
        span = self._batches[n]
        index, meta = self.index, self.index.meta
        decoded = self._pending.popleft().result()
        if n + self._ahead < len(self._batches):
            self._pending.append(self._pool.submit(self._decode_batch, self._batches[n + self._ahead]))
        good = []
        for i, tensor, info in decoded:
            if tensor is None:
                cause, line = info
                entry = meta["skipped"][cause]
                entry["count"] += 1
                if len(entry["names"]) < NAMES_PER_CAUSE:
                    entry["names"].append([self.source.names[i], line])
            else:
                index.image_sizes[i] = info
                good.append((i, tensor))
        if good:
            _forward(index, self._truncated, self.infos, good, self._matrix, self._bias, self.device, self.size)
        self._next += 1
        chunk_end = span[1] % self.chunk_images == 0 or span[1] == self.total
        if chunk_end:  # saved before the progress is told: a reader of the progress may rely on it
            meta["position"] = span[1]
            meta["complete"] = span[1] == self.total
            if self.state_path is not None:
                index.save(self.state_path)
        if self.progress is not None:
            self.progress(span[1], self.total)
        if chunk_end and self.on_chunk is not None:
            self.on_chunk(span[1], self.total)
        if self.finished:
            self.close()
        return self.finished

    def result(self) -> ExemplarIndex:
        """The finished index; InvalidSpec when no image of the set could be indexed."""
        meta = self.index.meta
        if self.total == 0 and not meta["complete"]:
            meta["complete"] = True
            if self.state_path is not None:
                self.index.save(self.state_path)
        if meta["indexed"] == 0:
            raise InvalidSpec("images", f"none of the {self.total} files could be indexed as an image ("
                                        + ", ".join(f"{c}: {v['count']}" for c, v in meta["skipped"].items()) + ")")
        return self.index

    def close(self) -> None:
        """Drop the pending decodes and the thread pool (the saved state stays)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def build_index(model, source: ImageSource, *, layers: Sequence[str] | None = None, k: int = DEFAULT_K,
                size: tuple[int, int] | int | None = None, preprocess=None, batch_size: int = 32,
                chunk_images: int = 256, state_path: str | os.PathLike | None = None, set_hash: str = "",
                max_side: int = 4096, workers: int = 2, device=None,
                progress: Callable[[int, int], None] | None = None,
                on_chunk: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> ExemplarIndex:
    """Index ``source``'s images through ``model`` (an ImportedModel) at ``layers`` (default :func:`index_layers`).

    ``size`` (H, W) the input size (default the model's), each image resized to it (bicubic); ``preprocess``
    (default the model's). ``state_path``: where each finished chunk is saved and a rerun resumes from (a state of
    other inputs is started over); the finished index is saved there too. ``progress(done, total)`` after each
    batch (after its chunk's state is saved, when it ends one), ``on_chunk(position, total)`` after each chunk is
    saved, ``cancel()`` checked before each batch (then :class:`Cancelled`; the last saved chunk stays). The loop
    over an :class:`IndexPass`."""
    run = IndexPass(model, source, layers=layers, k=k, size=size, preprocess=preprocess, batch_size=batch_size,
                    chunk_images=chunk_images, state_path=state_path, set_hash=set_hash, max_side=max_side,
                    workers=workers, device=device, progress=progress, on_chunk=on_chunk)
    try:
        while not run.finished:
            if cancel is not None and cancel():
                raise Cancelled(f"indexing cancelled at image {run.done} of {run.total}; the state up to image "
                                f"{run.index.meta['position']} is kept")
            run.step()
    finally:
        run.close()
    return run.result()


class ImageFiles:
    """An :class:`ImageSource` over given files: ``names`` (as indexed) and their ``paths`` (a server's stored images,
    ``Store.image_path``). ``read`` opens without following a symbolic link and refuses (ValueError, as too large)
    a file over ``max_bytes``."""

    def __init__(self, names: Sequence[str], paths: Sequence[str | os.PathLike], *, max_bytes: int = MAX_FILE_BYTES):
        if len(names) != len(paths):
            raise ValueError("one path per name")
        self.names, self.paths, self.max_bytes = list(names), [Path(p) for p in paths], max_bytes

    def read(self, i: int) -> bytes:
        fd = os.open(self.paths[i], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise ValueError(f"the file is over {self.max_bytes} bytes")
        return data


def _forward(index, truncated, infos, good, matrix, bias, device, size) -> None:
    images = torch.stack([tensor for _, tensor in good])
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = torch.einsum("oc,nchw->nohw", matrix, images) + bias.view(1, -1, 1, 1)
    ids = torch.tensor([i for i, _ in good], dtype=torch.int64)
    with torch.inference_mode():
        out = truncated(x)
        for name, info in infos.items():
            act = out[name]
            best, mean, where = reduce_activation(act, info.prefix_tokens)
            if name not in index.meta["maps"]:
                if act.dim() == 4:
                    index.meta["maps"][name] = [int(act.shape[2]), int(act.shape[3])]
                elif act.dim() == 3:
                    patches = act.shape[1] - (info.prefix_tokens or 0)
                    index.meta["maps"][name] = list(_token_grid(info, patches, size))
                else:
                    index.meta["maps"][name] = None
            index.states[name].update(best, mean, where, ids)
    index.meta["indexed"] += len(good)


def score_images(model, index: ExemplarIndex, layer: str, images: Sequence[tuple[int, bytes]], *,
                 max_side: int = 4096, device=None) -> list[float]:
    """Each ``(channel, PNG/JPEG bytes)`` image's score on the index's measure (the atlas's dataset join): the
    image goes through the model exactly as a set's image does in the pass (decoded, resized to the index's input
    size, the index's preprocess) and its score is the channel's spatial max at ``layer``
    (:func:`.state.reduce_activation`), the value the index ranks and quantiles. NaN counts as -inf."""
    from featureviz.engine.images import decode_image
    from featureviz.engine.transforms import preprocess_map

    if not images:
        return []
    if index.meta.get("model") != model.sha256:
        raise InvalidSpec("model", "this index was built with another model")
    index.state(layer)  # InvalidSpec naming the layer when the index does not hold it
    size = tuple(int(v) for v in index.input_size)
    p = index.meta["preprocess"]
    preprocess = types.SimpleNamespace(mean=tuple(p["mean"]), std=tuple(p["std"]), channel_order=p["channel_order"])
    matrix, bias = preprocess_map(preprocess, model.input_spec.channels, device=device)
    truncated = model.truncate([layer])
    if device is not None:
        truncated = truncated.to(device)
    info = model.layer(layer)
    batch = torch.stack([decode_image(data, size, max_side=max_side, field="image", formats=IMAGE_FORMATS)
                         for _, data in images])
    if device is not None:
        batch = batch.to(device)
    x = torch.einsum("oc,nchw->nohw", matrix, batch) + bias.view(1, -1, 1, 1)
    with torch.inference_mode():
        best, _, _ = reduce_activation(truncated(x)[layer], info.prefix_tokens)
    best = best.double().cpu()
    return [float(best[i, channel]) for i, (channel, _) in enumerate(images)]

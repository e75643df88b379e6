"""The worker's model cache (imported models by sha256) and the model's description for the server."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

from featureviz.errors import FailedPrecondition
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["ModelCache", "describe_model"]

# the server's published bounds of the import process -> featureviz.importer.isolated.Isolation fields
_ISOLATION_LIMITS = {"import_timeout_seconds": "timeout_seconds", "import_memory_bytes": "memory_bytes"}


class ModelCache:
    """Imported models by sha256, least recently used dropped first. ``source(sha256)`` gives the bytes or the
    path of a model the cache does not hold (None: unknown). Imports happen outside the lock, one per model.

    Imports run in a separate, limited process (``featureviz.importer.isolated``: the file is parsed, cleaned,
    converted and verified there; this process converts the sanitized graph it returns). ``isolation``: True
    (the default bounds), a ``featureviz.importer.isolated.Isolation``, or None to import in this process."""

    def __init__(self, source, *, size: int = 4, cache_dir: str | None = None, on_drop=None,
                 isolation=True):
        self._isolation = isolation
        self._source = source
        self._size = max(1, size)
        self._cache_dir = cache_dir
        self._on_drop = on_drop
        self._models: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def put(self, sha256: str, model) -> None:
        dropped = []
        with self._lock:
            self._models[sha256] = model
            self._models.move_to_end(sha256)
            while len(self._models) > self._size:
                dropped.append(self._models.popitem(last=False)[1])
        for old in dropped:
            if self._on_drop is not None:
                self._on_drop(old)

    def get(self, sha256: str, source=None, limits: dict | None = None):
        """The imported model; ``source`` (bytes or a path) overrides where it is read from. ``limits``:
        ImportLimits keywords for an upload; a stored model was checked when it was uploaded, so it always loads
        again (no limits)."""
        with self._lock:
            if sha256 in self._models:
                self._models.move_to_end(sha256)
                return self._models[sha256]
            loading = self._loading.setdefault(sha256, threading.Lock())
        with loading:  # one import per model even when several callers ask at once
            with self._lock:
                if sha256 in self._models:
                    return self._models[sha256]
            from featureviz.importer import ImportLimits
            from featureviz.importer import import_model
            from featureviz.importer.isolated import Isolation
            from featureviz.importer.isolated import import_isolated

            if source is None:
                source = self._source(sha256)
            if source is None:
                raise FailedPrecondition(f"the file of model {sha256} is missing from the store; upload it again",
                                         reason="MODEL_FILE_MISSING")
            limits = dict(limits) if limits is not None else None
            process = {name: limits.pop(name) for name in _ISOLATION_LIMITS if name in limits} if limits else {}
            bounds = ImportLimits(**limits) if limits is not None else ImportLimits.unbounded()
            if self._isolation:
                bound = self._isolation if isinstance(self._isolation, Isolation) else Isolation()
                bound = dataclasses.replace(bound, **{_ISOLATION_LIMITS[name]: value for name, value in process.items()})
                model = import_isolated(source, cache_dir=self._cache_dir, limits=bounds, isolation=bound)
            else:
                model = import_model(source, cache_dir=self._cache_dir, limits=bounds)
            self.put(sha256, model)
            return model

    def held_model(self, sha256: str):
        """The imported model when the cache holds it (as recently used), else None: never imports."""
        with self._lock:
            model = self._models.get(sha256)
            if model is not None:
                self._models.move_to_end(sha256)
            return model

    def held(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def drop(self, sha256: str) -> None:
        with self._lock:
            model = self._models.pop(sha256, None)
        if model is not None and self._on_drop is not None:
            self._on_drop(model)


def describe_model(imported, sha: str, size: int) -> tuple[pb.Model, pb.ListLayersResponse]:
    """An importer.ImportedModel -> the Model message and the whole catalog as a ListLayersResponse."""
    spec = imported.input_spec
    pre = spec.preprocess
    default_h, default_w = spec.default_size
    input_spec = pb.InputSpec(
        name=spec.name, layout=spec.layout, channels=spec.channels, height=spec.height or 0,
        width=spec.width or 0, batch=spec.batch or 0, default_height=default_h, default_width=default_w,
        preprocess=pb.Preprocess(mean=list(pre.mean), std=list(pre.std), channel_order=pre.channel_order),
    )
    check = imported.check
    report = pb.CheckReport(
        max_rel_err=float(getattr(check, "max_rel_err", 0.0) or 0.0),
        max_rel_err_batch=float(getattr(check, "max_rel_err_batch", 0.0) or 0.0),
        tolerance=float(getattr(check, "tolerance", 0.0) or 0.0),
        passed=bool(getattr(check, "passed", False)),
    )
    layers = [
        pb.Layer(name=lay.name, aliases=list(lay.aliases), op_type=lay.op_type, shape=list(lay.shape),
                 channels=lay.channels, spatial=lay.spatial, depth=lay.depth, is_logits=lay.is_logits,
                 pre_activation_of=lay.pre_activation_of or "", layout=lay.layout)
        for lay in imported.layers
    ]
    model = pb.Model(name=f"models/{sha}", sha256=sha, size_bytes=size, state=pb.MODEL_STATE_READY,
                     input_spec=input_spec, layer_count=len(layers), logits_layer=imported.logits or "", check=report)
    info = getattr(imported, "generator", None)
    if info is not None:  # --- generator (issue 25): what the importer read of its graph
        model.generator.CopyFrom(pb.GeneratorInfo(latent_size=info.latent, channels=info.channels, height=info.height,
                                                  width=info.width, output_min=info.low, output_max=info.high,
                                                  last_op=info.last_op))
    model.create_time.FromNanoseconds(int(time.time() * 1e9))
    return model, pb.ListLayersResponse(layers=layers, total_size=len(layers))

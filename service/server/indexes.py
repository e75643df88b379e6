"""The exemplar index job on the server side (no torch): its cache key and id, and what the worker reads and writes.

An index job's stored spec records what the worker's admission resolved (``exemplar_index.layers`` as catalog
names, ``size``, ``preprocess``, ``k``, ``batch_size``), so the key below is a function of the stored spec and the
model alone: the same after a restart, without asking the worker again. The id is the sha256 of the canonical JSON
of (model sha256, dataset id, layers, preprocess, size, k); ``batch_size`` is left out (it changes how the pass
runs, not what it finds), so a finished index serves any batch size. The finished index lives at
``Store.index_path(id)``, an unfinished pass's state at ``Store.index_state_path(id)``."""

from __future__ import annotations

import hashlib
import json

from featureviz.server.store import Store
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api

__all__ = ["index_key", "index_id", "index_work", "dataset_of"]


def dataset_of(spec: pb.JobSpec) -> str:
    """The dataset id an index job reads (InvalidSpec naming ``spec.exemplar_index.dataset`` when malformed)."""
    from featureviz.server.datasets import parse_dataset_name  # here: datasets -> models -> scheduler -> here

    return parse_dataset_name(spec.exemplar_index.dataset, "spec.exemplar_index.dataset")


def index_key(model: str, spec: pb.JobSpec) -> dict:
    """The cache key of a stored index job's spec (resolved by admission)."""
    p = spec.preprocess
    return {"model": model, "dataset": dataset_of(spec), "layers": list(spec.exemplar_index.layers),
            "preprocess": {"mean": [float(v) for v in p.mean], "std": [float(v) for v in p.std],
                           "channel_order": p.channel_order or "RGB"},
            "size": [spec.size.height, spec.size.width], "k": spec.exemplar_index.k}


def index_id(model: str, spec: pb.JobSpec) -> str:
    """sha256 of the key's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(index_key(model, spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def index_work(store: Store, tenant: str, model: str, spec: pb.JobSpec, chunk_images: int) -> api.IndexWork:
    """What the worker runs for a stored index job: the set's images in its order (NOT_FOUND when the tenant no
    longer holds the set), the state and final paths, the resolved settings."""
    dataset = dataset_of(spec)
    images = store.dataset_images(tenant, dataset)
    ident = index_id(model, spec)
    p = spec.preprocess
    return api.IndexWork(index=ident, dataset=dataset, names=[image.name for image in images],
                         paths=[str(store.image_path(image.sha256)) for image in images],
                         state_path=str(store.index_state_path(ident)), final_path=str(store.index_path(ident)),
                         layers=list(spec.exemplar_index.layers), size=(spec.size.height, spec.size.width),
                         preprocess={"mean": list(p.mean), "std": list(p.std), "channel_order": p.channel_order or "RGB"},
                         k=spec.exemplar_index.k, batch_size=spec.exemplar_index.batch_size,
                         chunk_images=chunk_images)

"""Learned priors on the server side (issue 25; no torch): which datasets a job learns from, checked for its tenant,
and what the worker has learned from a set (its report, for ``Dataset.priors``).

A render job names datasets in two places: ``JobSpec.prior_dataset`` (the parameterization's colour matrix and
spectrum decay) and each ``prior:DATASET`` term of its objective (the EPLL patch prior). :func:`prior_sources`
resolves every one against the tenant's sets before any compute (NOT_FOUND ``DATASET_NOT_FOUND`` naming the field
and the set; FAILED_PRECONDITION ``DATASET_TOO_SMALL`` under ``Limits.min_prior_images``), writes the bare ids back
into the spec the job stores, and gives the worker a :class:`featureviz.worker.api.PriorSource` per set: its image
files and the folder where the worker caches what it learns (``Store.prior_dir``: from the checked id only). The
worker writes ``report-<channels>.json`` there; :func:`dataset_priors` reads it (JSON, checked) into
``Dataset.priors``."""

from __future__ import annotations

import json
import math

from featureviz.errors import FailedPrecondition
from featureviz.errors import NotFound
from featureviz.errors import echo
from featureviz.server.store import Store
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api

__all__ = ["prior_fields", "prior_sources", "dataset_priors", "REPORT_FORMAT"]

REPORT_FORMAT = "featureviz-prior-report-1"
_MAX_REPORT_BYTES = 64 * 1024


def prior_fields(spec: pb.JobSpec) -> list[tuple[str, object]]:
    """(field path, message holding ``dataset``/``prior_dataset``) for the job's prior dataset and every prior term
    of its objective, in the spec's order."""
    out: list[tuple[str, object]] = []
    if spec.prior_dataset:
        out.append(("spec.prior_dataset", spec))

    def walk(message, path: str) -> None:
        for field, value in message.ListFields():
            if field.message_type is None:
                continue
            if field.message_type.full_name == pb.PriorObjective.DESCRIPTOR.full_name:
                out.append((f"{path}.{field.name}.dataset", value))
            elif field.is_repeated:
                for i, item in enumerate(value):
                    walk(item, f"{path}.{field.name}[{i}]")
            else:
                walk(value, f"{path}.{field.name}")

    if spec.HasField("objective"):
        walk(spec.objective, "spec.objective")
    return out


def prior_sources(store: Store, tenant: str, spec: pb.JobSpec, min_images: int) -> dict:
    """Every dataset ``spec`` learns a prior from -> its PriorSource, after checking the tenant holds it and it has at
    least ``min_images`` images; the ids are written back into ``spec`` bare (``datasets/<id>`` -> ``<id>``)."""
    from featureviz.server.datasets import parse_dataset_name  # here: datasets -> ... -> scheduler -> here

    out: dict = {}
    for path, holder in prior_fields(spec):
        name = holder.prior_dataset if isinstance(holder, pb.JobSpec) else holder.dataset
        ident = parse_dataset_name(name, path)
        if isinstance(holder, pb.JobSpec):
            holder.prior_dataset = ident
        else:
            holder.dataset = ident
        if ident in out:
            continue
        try:
            dataset = store.get_dataset(tenant, ident)
        except NotFound:
            raise NotFound(f"{path}: dataset {echo(name)} not found; a prior is learned from one of your datasets "
                           "(featureviz datasets upload DIR, then its id)", reason="DATASET_NOT_FOUND") from None
        if dataset.image_count < min_images:
            raise FailedPrecondition(f"{path}: dataset {ident} has {dataset.image_count} image(s); learning a prior "
                                     f"needs at least min_prior_images = {min_images}", reason="DATASET_TOO_SMALL")
        images = store.dataset_images(tenant, ident)
        out[ident] = api.PriorSource(dataset=ident, names=[image.name for image in images],
                                     paths=[str(store.image_path(image.sha256)) for image in images],
                                     folder=str(store.prior_dir(ident)))
    return out


def dataset_priors(store: Store, dataset_id: str) -> list[pb.DatasetPrior]:
    """What the worker reported learning from the set (``report-1.json``, ``report-3.json`` in its prior folder),
    checked; a missing or damaged report is left out."""
    folder = store.prior_dir(dataset_id)
    out = []
    for channels in (1, 3):
        path = folder / f"report-{channels}.json"
        try:
            if not path.is_file() or path.stat().st_size > _MAX_REPORT_BYTES:
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            out.append(_report(data, channels))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return out


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("not a finite number")
    return float(value)


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise ValueError("not a count")
    return value


def _report(data: dict, channels: int) -> pb.DatasetPrior:
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT or data.get("channels") != channels:
        raise ValueError("not a prior report")
    out = pb.DatasetPrior(channels=channels)
    stats, patch = data.get("stats"), data.get("patch")
    if not (stats or patch):
        raise ValueError("an empty report")
    if stats:
        color = [_number(v) for row in stats["color"] for v in row]
        if len(color) != channels * channels:
            raise ValueError("colour matrix")
        out.color[:] = color
        out.mean[:] = [_number(v) for v in stats["mean"]][:channels]
        out.decay, out.alpha, out.images = _number(stats["decay"]), _number(stats["alpha"]), _count(stats["images"])
    if patch:
        out.patch_prior = True
        out.held_out_log_likelihood = _number(patch["held_out"])
        out.train_log_likelihood = _number(patch["train"])
        out.components, out.patch_size = _count(patch["components"]), _count(patch["patch"])
        out.patches, out.patch_images = _count(patch["patches"]), _count(patch["images"])
    return out

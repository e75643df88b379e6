"""The requests of the atlas calls, shared by :class:`featureviz.client.Client` and its asyncio twin: the atlas
job (``JobSpec.atlas``), ListAtlasUnits and GetAtlasUnit."""

from __future__ import annotations

from collections.abc import Sequence

from featureviz.codec import spec_to_proto
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["atlas_job_spec", "atlas_units_request", "atlas_unit_request"]


def _model(model) -> str:
    return model.sha256 if isinstance(model, pb.Model) else model


def _job(job) -> str:
    return job.id if isinstance(job, pb.Job) else job


def atlas_job_spec(model, *, layers: Sequence[str] | None = None, op_types: Sequence[str] | None = None,
                   min_depth: int | None = None, max_depth: int | None = None, channels: int | None = None,
                   dataset: str | None = None, negative: bool = False, diversity: int | None = None,
                   **options) -> pb.JobSpec:
    """The JobSpec of an atlas: the layers by name (catalog names or aliases), op type and depth range (all that
    are given apply; none: every layer with channels), the first ``channels`` channels of each (None: all), and
    the render options (``size``, ``steps``, ``seed``, ``param``...; unset: the atlas defaults). ``dataset``: a
    dataset id (or ``datasets/<id>``) joined to every unit (its exemplar index over the atlas's layers, built or
    reused); ``negative``: also render each unit's negative; ``diversity``: also a diversity set of N images."""
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(op_types, str):
        op_types = [op_types]
    atlas = {"layers": list(layers or ()), "op_types": list(op_types or ()), "min_depth": min_depth,
             "max_depth": max_depth, "channels": channels, "dataset": getattr(dataset, "id", dataset) or None,
             "negative": True if negative else None, "diversity": diversity or None}
    return spec_to_proto(_model(model), None, atlas={k: v for k, v in atlas.items() if v not in (None, [])},
                         **options)


def atlas_units_request(job, layer: str = "", page_size: int = 0, page_token: str = "") -> pb.ListAtlasUnitsRequest:
    return pb.ListAtlasUnitsRequest(job=_job(job), layer=layer or "", page_size=int(page_size or 0),
                                    page_token=page_token or "")


def atlas_unit_request(job, index: int, variant="render", image: int = 0) -> pb.GetAtlasUnitRequest:
    """``variant``: "render", "negative" or "diversity" (or a pb.AtlasVariant); ``image``: the diversity image."""
    if isinstance(variant, str):
        variant = pb.AtlasVariant.Value("ATLAS_VARIANT_" + variant.upper())
    return pb.GetAtlasUnitRequest(job=_job(job), index=int(index), variant=variant, image=int(image))

"""Exemplar matching on the server side (no torch): a job's ``match`` terms name exemplar indexes by id; each must be
one the tenant's jobs made or reused (``Store.tenant_index``: NOT_FOUND ``EXEMPLAR_INDEX_NOT_FOUND`` naming it,
whatever another tenant holds), of the job's model, with ``k`` within ``Limits.max_match_k``. What the worker then
reads (``featureviz.worker.api.MatchSource``: the index file and the set's image files in the set's order) goes with
the admission and, for a job checked again after a restart, with its submission. Whether the index covers the unit's
layer and keeps k examples is the worker's check (it needs the model's catalog and the index file)."""

from __future__ import annotations

import re

from featureviz.errors import InvalidSpec
from featureviz.errors import NotFound
from featureviz.errors import echo
from featureviz.spec import MATCH_DEFAULT_K
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api

__all__ = ["match_sources", "match_terms"]

_HEX = re.compile(r"[0-9a-f]{64}")


def match_terms(spec: pb.JobSpec):
    """(proto field path, MatchObjective) of every ``match`` term of the job's objective, read from the message itself
    (no conversion or normalization: the worker's admission does that once), parents before children."""
    if not spec.HasField("objective"):
        return
    stack = [(spec.objective, "spec.objective")]
    while stack:
        node, path = stack.pop()
        kind = node.WhichOneof("kind")
        if kind is None:
            continue
        body = getattr(node, kind)
        if kind == "match":
            yield f"{path}.match", body
            continue
        children = []
        for fd in body.DESCRIPTOR.fields:
            if fd.message_type is not pb.Objective.DESCRIPTOR:
                continue
            value = getattr(body, fd.name)
            if fd.is_repeated:
                children += [(child, f"{path}.{kind}.{fd.name}[{i}]") for i, child in enumerate(value)]
            elif body.HasField(fd.name):
                children.append((value, f"{path}.{kind}.{fd.name}"))
        stack.extend(reversed(children))


def match_sources(store, tenant: str, model: str, spec: pb.JobSpec, max_k: int) -> dict[str, api.MatchSource]:
    """index id -> MatchSource for every ``match`` term of ``spec`` (empty when there is none)."""
    out: dict[str, api.MatchSource] = {}
    for field, body in match_terms(spec):
        k = body.k if body.HasField("k") else MATCH_DEFAULT_K
        if k > max_k:
            raise InvalidSpec(f"{field}.k", f"k={k} is over the server's limit of {max_k} examples per match term "
                                            "(max_match_k)")
        ident = body.index
        found = store.tenant_index(tenant, ident) if _HEX.fullmatch(ident) else None
        if found is None:
            raise NotFound(f"{field}.index: exemplar index {echo(ident)} not found; use the id of an index "
                           "your exemplar index jobs made (ExemplarIndexResult.index)",
                           reason="EXEMPLAR_INDEX_NOT_FOUND")
        index_model, info = found
        if index_model != model:
            raise InvalidSpec(f"{field}.index", f"exemplar index {ident} was built with model {index_model}, not "
                                                f"this job's model {model}")
        if ident not in out:
            images = store.dataset_images(tenant, info.dataset)  # NOT_FOUND when the tenant dropped the set
            out[ident] = api.MatchSource(index=ident, index_path=str(store.index_path(ident)),
                                         names=[image.name for image in images],
                                         paths=[str(store.image_path(image.sha256)) for image in images])
    return out

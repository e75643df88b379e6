"""Exemplar matching on the worker (torch side): the resolver of a job's ``match`` terms.

The server resolves each term's index id for the job's tenant (``featureviz.server.matching``: NOT_FOUND for an
index the tenant's jobs did not make or reuse, the ``max_match_k`` limit) and hands the worker an
:class:`featureviz.worker.api.MatchSource` per id. Here, at admission (``featureviz.engine.validate`` calls the
resolver once per term): the index file is loaded (``Queries``' cache of loaded indexes), must be finished and of
this model, must cover the unit's layer (INVALID_ARGUMENT naming the layer and the layers it covers) and keep at
least k examples; then the unit's top-k images are decoded at the render's model input size and run through the
model truncated at the match layer once, on the device thread (``on_device``: it shares the weights with the
renders), giving the sorted targets (:func:`featureviz.engine.matching.index_targets`). Targets are cached per
(model, index, layer, channel, k, match layer, size, preprocessing), the few most recent kept.
"""

from __future__ import annotations

import collections
import threading

from featureviz.errors import FailedPrecondition
from featureviz.errors import InvalidSpec
from featureviz.errors import NotFound
from featureviz.errors import echo

__all__ = ["MatchResolver"]

_TARGETS_KEPT = 32


class MatchResolver:
    def __init__(self, queries, *, on_device=None, device=None, max_side: int = 8192, kept: int = _TARGETS_KEPT):
        self.queries = queries
        self._on_device = on_device or (lambda fn: fn())
        self.device = device
        self.max_side = max_side
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, object] = collections.OrderedDict()
        self._kept = max(1, kept)
        self.computed = 0  # targets computed with the model (tests read it: the cache is used)

    def for_job(self, sha256: str, model, sources: dict | None):
        """The ``RenderSpec.match_targets`` callable of one job: ``sources`` maps index id -> MatchSource."""
        sources = dict(sources or {})

        def resolve(term, *, layer, match_layer, size, preprocess, path):
            source = sources.get(term.index)
            if source is None:
                raise NotFound(f"{path}.index: exemplar index {echo(term.index)} was not found among this tenant's "
                               "indexes; run an exemplar index job (JobSpec.exemplar_index) and use its id",
                               reason="EXEMPLAR_INDEX_NOT_FOUND")
            p = preprocess
            key = (sha256, term.index, layer, term.channel, term.k, match_layer, tuple(size),
                   tuple(float(v) for v in p.mean), tuple(float(v) for v in p.std), p.channel_order)
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            targets = self._compute(sha256, model, source, term, layer, match_layer, tuple(size), preprocess, path)
            with self._lock:
                self._cache[key] = targets
                while len(self._cache) > self._kept:
                    self._cache.popitem(last=False)
            return targets

        return resolve

    def _compute(self, sha256, model, source, term, layer, match_layer, size, preprocess, path):
        from featureviz.engine.exemplars.index import ImageFiles
        from featureviz.engine.matching import index_targets

        index = self.queries._index(source.index_path)  # NOT_FOUND (file gone), FAILED_PRECONDITION (damaged)
        if not index.complete:
            raise FailedPrecondition(f"{path}.index: exemplar index {echo(term.index)} is not finished; wait for "
                                     "its job", reason="INDEX_UNFINISHED")
        if index.meta.get("model") != sha256:
            raise InvalidSpec(f"{path}.index", f"exemplar index {echo(term.index)} was built with another model, "
                                               "not this job's")
        if len(source.names) != len(index.names):
            raise FailedPrecondition(f"{path}.index: the set of exemplar index {echo(term.index)} changed; index "
                                     "it again", reason="INDEX_MISMATCH")
        files = ImageFiles(source.names, source.paths)

        def run():
            return index_targets(model, index, files.read, layer=layer, channel=term.channel, k=term.k,
                                 match_layer=match_layer, size=size, preprocess=preprocess, device=self.device,
                                 path=path, max_side=self.max_side, index_name=term.index)

        targets = self._on_device(run)
        self.computed += 1
        return targets

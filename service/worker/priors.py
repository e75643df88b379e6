"""The worker's learned priors (issue 25): a dataset's image statistics and EPLL patch prior, learned on first use
and cached with the set (the server store's ``prior_dir``, given in :class:`featureviz.worker.api.PriorSource`).

``stats-<channels>.json`` (``ImageStats.to_dict``) and ``patch-<channels>.npz`` (``PatchPrior.save``: no pickle)
are what later jobs load; ``report-<channels>.json`` is what the server publishes in ``Dataset.priors``. Files are
written to a temp name and renamed; a damaged file is refit. In memory: the last :data:`KEPT` results, and one lock
per (set, channels, kind) so that concurrent admissions learn a set once. :attr:`Priors.fits` counts what was
computed (not loaded) in this process."""

from __future__ import annotations

import collections
import json
import os
import threading

from featureviz.errors import InvalidSpec

__all__ = ["Priors", "FileSource", "REPORT_FORMAT", "KEPT"]

REPORT_FORMAT = "featureviz-prior-report-1"  # featureviz.server.priors reads it
KEPT = 16


class FileSource:
    """An ImageSource over the set's files (``names``, ``read(i)``), in the set's order."""

    def __init__(self, names: list[str], paths: list[str]):
        self.names, self._paths = list(names), list(paths)

    def read(self, i: int) -> bytes:
        with open(self._paths[i], "rb") as f:
            return f.read()


class Priors:
    def __init__(self, *, kept: int = KEPT, **fit):
        self._fit = fit  # fit_patch_prior's settings (components, max_patches ...): the engine's by default
        self._lock = threading.Lock()
        self._locks: dict[tuple, threading.Lock] = {}
        self._held: collections.OrderedDict[tuple, object] = collections.OrderedDict()
        self._kept = kept
        self.fits = collections.Counter()  # "stats" / "patch" -> computed in this process

    def stats(self, source, channels: int):
        """The set's ImageStats for a ``channels``-channel model (learned on first use, then cached)."""
        from featureviz.engine.priors import ImageStats
        from featureviz.engine.priors import image_statistics

        def load(path):
            with open(path, encoding="utf-8") as f:
                return ImageStats.from_dict(json.load(f))

        def fit():
            return image_statistics(FileSource(source.names, source.paths), channels=channels)

        def save(stats, path):
            _write(path, json.dumps(stats.to_dict()).encode())

        return self._get(source, channels, "stats", ".json", load, fit, save)

    def patch(self, source, channels: int):
        """The set's PatchPrior for a ``channels``-channel model (fitted on first use, then cached)."""
        from featureviz.engine.priors import PatchPrior
        from featureviz.engine.priors import fit_patch_prior

        def fit():
            return fit_patch_prior(FileSource(source.names, source.paths), channels=channels, **self._fit)

        return self._get(source, channels, "patch", ".npz", PatchPrior.load, fit, lambda prior, path: prior.save(path))

    def _get(self, source, channels: int, kind: str, suffix: str, load, fit, save):
        key = (source.dataset, channels, kind)
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
                return self._held[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one fit per set, channels and kind; the others wait for it
            with self._lock:
                if key in self._held:
                    return self._held[key]
            path = os.path.join(source.folder, f"{kind}-{channels}{suffix}")
            found = None
            if os.path.exists(path):
                try:
                    found = load(path)
                except (OSError, ValueError, InvalidSpec):
                    found = None  # damaged: learned again
            if found is None:
                found = fit()
                self.fits[kind] += 1
                os.makedirs(source.folder, exist_ok=True)
                save(found, path)
                self._report(source, channels, kind, found)
            with self._lock:
                self._held[key] = found
                while len(self._held) > self._kept:
                    self._held.popitem(last=False)
            return found

    def _report(self, source, channels: int, kind: str, value) -> None:
        """Update ``report-<channels>.json`` (what the server publishes) with what was just learned."""
        path = os.path.join(source.folder, f"report-{channels}.json")
        with self._lock:
            try:
                with open(path, encoding="utf-8") as f:
                    report = json.load(f)
                if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
                    report = {}
            except (OSError, ValueError):
                report = {}
            report |= {"format": REPORT_FORMAT, "channels": channels}
            if kind == "stats":
                report["stats"] = {"color": value.color, "mean": value.mean, "decay": value.decay,
                                   "alpha": value.alpha, "images": value.images}
            else:
                report["patch"] = {"held_out": value.held_out, "train": value.train,
                                   "components": int(value.weights.shape[0]), "patch": value.patch,
                                   "patches": value.patches, "images": value.images}
            _write(path, json.dumps(report).encode())


def _write(path: str, data: bytes) -> None:
    from featureviz.engine.priors import _write_atomic

    _write_atomic(path, data)

"""A local cache of imported models keyed by the sha256 of the file's bytes.

Directory: the ``cache_dir`` argument, else ``$FEATUREVIZ_CACHE/models``, else ``~/.cache/featureviz/models``. One
file per model, ``<sha256>.pt``: a header line ``featureviz-cache <format> <sha256 of the payload>`` and the
payload, a ``torch.save`` of the converted module and its metadata, written to a temporary name and renamed, so
readers never see half a file. The payload is checked against its digest before it is loaded: a damaged entry
(a flipped weight, a truncated file) is a miss, never a model with wrong weights. Entries from another importer
version are ignored, so a fix to the pipeline is not hidden by stale files. A file that cannot be read is a miss.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["ModelCache", "default_cache_dir", "CACHE_FORMAT"]

# Bump when the pipeline changes what it produces for the same bytes.
CACHE_FORMAT = 7  # 7: LayerInfo.layout (channels-last layers); 6: portable leaf modules (loads without onnx2torch)
_MAGIC = b"featureviz-cache"

_LOG = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    root = os.environ.get("FEATUREVIZ_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "featureviz") / "models"


class ModelCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.pt"

    def get(self, sha256: str):
        path = self.path(sha256)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            header, _, body = data.partition(b"\n")
            magic, version, digest = header.split(b" ")
            if magic != _MAGIC or int(version) != CACHE_FORMAT:
                return None  # another importer version's entry
            if hashlib.sha256(body).hexdigest().encode() != digest:
                _LOG.warning("ignoring damaged cache entry %s: its payload does not match its digest", path)
                return None
            payload = torch.load(io.BytesIO(body), weights_only=False, map_location="cpu")
        except Exception as exc:  # a stale or damaged entry is a miss, never an error
            _LOG.warning("ignoring unreadable cache entry %s: %s", path, exc)
            return None
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            return None
        return payload["model"]

    def put(self, sha256: str, model) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save({"format": CACHE_FORMAT, "model": model}, buffer)
            body = buffer.getvalue()
            header = b"%s %d %s\n" % (_MAGIC, CACHE_FORMAT, hashlib.sha256(body).hexdigest().encode())
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(header)
                    out.write(body)
                os.replace(tmp, self.path(sha256))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:  # a read-only or full disk must not fail the import (nor leave a partial file)
            _LOG.warning("cannot write the model cache in %s: %s", self.directory, exc)
        except Exception as exc:  # nor a module that this torch cannot pickle: the import works, uncached
            _LOG.warning("cannot cache model %s (%s: %s); it stays imported in memory", sha256[:12],
                         type(exc).__name__, exc)

"""A local cache of imported models keyed by the sha256 of the file's bytes.

Directory: the ``cache_dir`` argument, else ``$FEATUREVIZ_CACHE/models``, else ``~/.cache/featureviz/models``. One
file per model, ``<sha256>.pt``: a header line ``featureviz-cache <format> <HMAC of the payload>`` and the
payload, a ``torch.save`` of the converted module and its metadata, written to a temporary name and renamed, so
readers never see half a file.

Loading an entry unpickles it, which can run any code: an entry is loaded only when its HMAC-SHA256, keyed with
the cache's secret and covering the format, the model's sha256 and the payload, matches. The secret is the
file ``.key`` of the cache directory (32 random bytes, mode 0600, created on first use); a key file owned by
another user, readable or writable by others, or not a plain file disables the cache (with a warning): whoever
can write the cache files but not read the key cannot make the importer load their file, nor move an entry to
another model's name. A damaged entry (a flipped weight, a truncated file) is a miss, never a model with wrong
weights; so is an entry from another importer version, so a fix to the pipeline is not hidden by stale files,
and a file that cannot be read.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

import torch

__all__ = ["ImportCache", "default_cache_dir", "CACHE_FORMAT", "MAC_KEY_FILE"]

# Bump when the pipeline changes what it produces for the same bytes.
CACHE_FORMAT = 8  # 8: safe names and keyed entries (issue 21); 7: LayerInfo.layout; 6: portable leaf modules
MAC_KEY_FILE = ".key"  # the secret of the entries' HMAC
_KEY_BYTES = 32
_MAGIC = b"featureviz-cache"

_LOG = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    root = os.environ.get("FEATUREVIZ_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "featureviz") / "models"


class ImportCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.pt"

    def get(self, sha256: str):
        path = self.path(sha256)
        if not path.is_file():
            return None
        mac_key = self._mac_key(create=False)
        if mac_key is None:
            return None
        try:
            data = path.read_bytes()
            header, _, body = data.partition(b"\n")
            magic, version, mac = header.split(b" ")
            if magic != _MAGIC or int(version) != CACHE_FORMAT:
                return None  # another importer version's entry
            if not hmac.compare_digest(_mac(mac_key, sha256, body).encode(), mac):
                _LOG.warning("ignoring cache entry %s: its payload does not match its keyed digest (damaged or not "
                             "written by this cache)", path)
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
            buffer = io.BytesIO()
            torch.save({"format": CACHE_FORMAT, "model": model}, buffer)
            body = buffer.getvalue()
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mac_key = self._mac_key(create=True)
            if mac_key is None:
                return
            header = b"%s %d %s\n" % (_MAGIC, CACHE_FORMAT, _mac(mac_key, sha256, body).encode())
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

    def _mac_key(self, *, create: bool) -> bytes | None:
        """The cache's secret; None (the cache is off) when it is absent (and not ``create``) or not safe."""
        path = self.directory / MAC_KEY_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                return None
            return _create_mac_key(path)
        except OSError as exc:  # a symlink (ELOOP) or unreadable
            _LOG.warning("model cache disabled: its key %s cannot be opened safely (%s)", path, exc)
            return None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            mac_key = file.read(_KEY_BYTES + 1)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            _LOG.warning("model cache disabled: its key %s must be a file of this user with mode 0600 (it has mode "
                         "%o, owner %d); remove it to start a new cache", path, info.st_mode & 0o7777, info.st_uid)
            return None
        if len(mac_key) != _KEY_BYTES:
            _LOG.warning("model cache disabled: its key %s is not %d bytes; remove it to start a new cache", path,
                         _KEY_BYTES)
            return None
        return mac_key


def _create_mac_key(path: Path) -> bytes | None:
    """Write a new secret (mode 0600) unless another process just did; return the one in the file."""
    mac_key = secrets.token_bytes(_KEY_BYTES)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(mac_key)
        os.link(tmp, path)  # atomic, and fails if the key exists: every process then uses the same one
    except FileExistsError:
        return ImportCache(path.parent)._mac_key(create=False)
    finally:
        os.unlink(tmp)
    return mac_key


def _mac(mac_key: bytes, sha256: str, body: bytes) -> str:
    message = hmac.new(mac_key, b"%s %d %s\n" % (_MAGIC, CACHE_FORMAT, sha256.encode("ascii", "replace")), hashlib.sha256)
    message.update(body)
    return message.hexdigest()

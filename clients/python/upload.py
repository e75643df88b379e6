"""The upload logic shared by :meth:`Client.upload` and :meth:`AsyncClient.upload`.

An upload hashes the file, asks the server what it holds (GetUpload), and streams the rest in chunks after a
header; a broken stream (a retryable status, or the server holding more than was sent) starts again from what the
server holds, after a back-off, up to ``retries`` times. The two clients differ only in how they call and wait.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import grpc

from featureviz.codec import preprocess_to_proto
from featureviz.client.errors import RETRYABLE
from featureviz.client.errors import FeaturevizClientError
from featureviz.client.errors import from_rpc_error
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Upload", "DatasetUpload", "file_sha256", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1 << 20


def file_sha256(data: bytes | str | os.PathLike) -> tuple[str, int]:
    """-> (hex sha256, size) of bytes or a file, read in 1 MiB blocks."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.sha256(data).hexdigest(), len(data)
    digest, size = hashlib.sha256(), 0
    with open(data, "rb") as f:
        for block in iter(lambda: f.read(DEFAULT_CHUNK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class Upload:
    """State of one upload of ``source`` (bytes or a path) whose (sha256, size) is known: the requests to send
    and what a broken stream means."""

    def __init__(self, source, sha256: str, size: int, *, name: str | None = None, chunk_size: int = DEFAULT_CHUNK,
                 retries: int = 3, preprocess: dict | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.source, self.sha256, self.size = source, sha256, size
        self.chunk_size, self.retries, self.progress = chunk_size, retries, progress
        if name is None:
            name = Path(source).name if not isinstance(source, (bytes, bytearray, memoryview)) else ""
        self.header = pb.UploadHeader(sha256=sha256, size_bytes=size, display_name=name)
        if preprocess is not None:
            self.header.preprocess.CopyFrom(preprocess_to_proto(preprocess))
        self.attempts = range(retries + 1)

    def status_request(self) -> pb.GetUploadRequest:
        return pb.GetUploadRequest(sha256=self.sha256, size_bytes=self.size)

    @staticmethod
    def deduplicated(model: pb.Model) -> pb.Model:
        """The model the server already holds, marked as not sent again."""
        model.deduplicated = True
        return model

    def requests(self, offset: int) -> Iterator[pb.UploadModelRequest]:
        """The header, then the chunks from ``offset`` (what the server holds); ``progress`` after each."""
        yield pb.UploadModelRequest(header=self.header)
        total = self.size
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            view = memoryview(self.source)
            blocks = (bytes(view[i: i + self.chunk_size]) for i in range(offset, total, self.chunk_size))
        else:
            blocks = _file_blocks(self.source, offset, self.chunk_size)
        for data in blocks:
            chunk = pb.UploadChunk(write_offset=offset, data=data, finish_write=offset + len(data) >= total)
            offset += len(data)
            if self.progress is not None:  # before the yield: after the last chunk the server may answer at once
                self.progress(offset, total)
            yield pb.UploadModelRequest(chunk=chunk)

    def broken(self, err: grpc.RpcError, attempt: int) -> float:
        """Seconds to wait before resuming; raises the client error when the upload must end instead."""
        error = from_rpc_error(err)
        resumable = err.code() in RETRYABLE or error.reason == "WRITE_OFFSET_MISMATCH"
        if not resumable or attempt == self.retries:
            raise error from None
        return min(2.0, 0.2 * 2**attempt)


def _file_blocks(path, offset: int, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(chunk_size), b""):
            yield block


# ------------------------------------------------------------------------------------------------------ datasets

_TAR_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _archive_kind(head: bytes) -> int | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return pb.DATASET_SOURCE_KIND_ZIP
    if head.startswith(_TAR_MAGICS) or (len(head) >= 263 and head[257:262] == b"ustar"):
        return pb.DATASET_SOURCE_KIND_TAR
    return None


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``folder`` (links not followed, hidden files left out), by relative name."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                found.append((path.relative_to(folder).as_posix(), path))
    return found


class DatasetUpload(Upload):
    """An image set to upload: a folder or a list of image files (kind files: their bytes one after another, each
    listed in the header with its size and sha256), or a zip or tar archive (a path or bytes; the kind is read from
    its first bytes)."""

    def __init__(self, source, *, name: str | None = None, chunk_size: int = DEFAULT_CHUNK, retries: int = 3,
                 progress: Callable[[int, int], None] | None = None):
        self.chunk_size, self.retries, self.progress = chunk_size, retries, progress
        self.attempts = range(retries + 1)
        self.parts: list = []  # FILES: the paths or bytes, in stream order
        files: list[pb.DatasetFile] = []
        if isinstance(source, (bytes, bytearray, memoryview)):
            head = bytes(source[:512])
            kind = _archive_kind(head)
            if kind is None:
                raise FeaturevizClientError("INVALID_ARGUMENT", "bytes given to upload_dataset must be a zip or tar "
                                                                "archive; give a folder or image files by path")
            self.parts = [bytes(source)]
            default_name = ""
        elif not isinstance(source, (list, tuple)) and not Path(source).exists():
            raise FeaturevizClientError("INVALID_ARGUMENT", f"{source}: no such file or folder")
        elif isinstance(source, (list, tuple)) or Path(source).is_dir():
            entries = (_folder_files(Path(source)) if not isinstance(source, (list, tuple))
                       else [(Path(p).name, Path(p)) for p in source])
            if not entries:
                raise FeaturevizClientError("INVALID_ARGUMENT", f"no files to upload in {source}")
            kind = pb.DATASET_SOURCE_KIND_FILES
            for relative, path in entries:
                sha, size = file_sha256(path)
                files.append(pb.DatasetFile(name=relative, size_bytes=size, sha256=sha))
                self.parts.append(path)
            default_name = Path(source).name if not isinstance(source, (list, tuple)) else ""
        else:
            with open(source, "rb") as f:
                head = f.read(512)
            kind = _archive_kind(head)
            if kind is None:  # one image file
                kind = pb.DATASET_SOURCE_KIND_FILES
                sha, size = file_sha256(source)
                files.append(pb.DatasetFile(name=Path(source).name, size_bytes=size, sha256=sha))
            self.parts = [Path(source)]
            default_name = Path(source).name
        digest, size = hashlib.sha256(), 0
        for block in self._blocks(0, DEFAULT_CHUNK):
            digest.update(block)
            size += len(block)
        self.source, self.sha256, self.size = None, digest.hexdigest(), size
        self.header = pb.DatasetUploadHeader(sha256=self.sha256, size_bytes=size, kind=kind, files=files,
                                             display_name=default_name if name is None else name)

    def status_request(self) -> pb.GetDatasetUploadRequest:
        return pb.GetDatasetUploadRequest(sha256=self.sha256, size_bytes=self.size)

    def _blocks(self, offset: int, chunk_size: int) -> Iterator[bytes]:
        """The stream's bytes from ``offset``, in blocks of at most ``chunk_size`` (across file boundaries)."""
        pending = b""
        for part in self.parts:
            size = len(part) if isinstance(part, bytes) else os.path.getsize(part)
            if offset >= size:
                offset -= size
                continue
            if isinstance(part, bytes):
                blocks = (part[i: i + chunk_size] for i in range(offset, size, chunk_size))
            else:
                blocks = _file_blocks(part, offset, chunk_size)
            offset = 0
            for block in blocks:
                pending += block
                while len(pending) >= chunk_size:
                    yield pending[:chunk_size]
                    pending = pending[chunk_size:]
        if pending:
            yield pending

    def requests(self, offset: int) -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(header=self.header)
        total = self.size
        for data in self._blocks(offset, self.chunk_size):
            chunk = pb.UploadChunk(write_offset=offset, data=data, finish_write=offset + len(data) >= total)
            offset += len(data)
            if self.progress is not None:
                self.progress(offset, total)
            yield pb.UploadDatasetRequest(chunk=chunk)

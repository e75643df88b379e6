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
from featureviz.client.errors import from_rpc_error
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Upload", "file_sha256", "DEFAULT_CHUNK"]

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

"""ModelService: chunked, resumable, deduplicated uploads; model metadata; the paged layer catalog."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
from pathlib import Path

import grpc

from featureviz.errors import FailedPrecondition
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.errors import ModelImportError
from featureviz.errors import ResourceExhausted
from featureviz.errors import echo
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import Aborted
from featureviz.server.errors import rpc_errors
from featureviz.server.paging import next_token
from featureviz.server.paging import page_bounds
from featureviz.server.scheduler import Scheduler
from featureviz.server.slots import TenantSlots
from featureviz.server.store import Store
from featureviz.server.store import file_sha256
from featureviz.server.store import resume_offset
from featureviz.spec import check_preprocess
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["ModelServicer", "parse_model_name"]

log = logging.getLogger("featureviz.server")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_model_name(name: str, field: str = "model") -> str:
    """``"models/<sha256>"`` or ``"<sha256>"`` -> the sha256."""
    sha = name.removeprefix("models/").strip().lower()
    if not _SHA256.fullmatch(sha):
        raise InvalidSpec(field, f"expected a sha256 hex digest or 'models/<sha256>', got {echo(name)}")
    return sha


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, config: ServerConfig, store: Store, scheduler: Scheduler, auth: TenantResolver,
                 metrics=None):
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.auth = auth
        self.metrics = metrics
        self._uploading: dict[tuple[str, str], int] = {}  # (tenant, sha256) -> declared size, while receiving
        # other partial uploads being received (the DatasetService's): path -> (tenant, declared size); they count
        # in the tenant's max_partial_upload_bytes and are never dropped to make room
        self.receiving: dict[Path, tuple[str, int]] = {}
        self._streams = TenantSlots("upload streams", "max_concurrent_uploads_per_tenant", "TOO_MANY_UPLOADS",
                                    "let one finish, then retry")  # UploadModel and UploadDataset

    @rpc_errors
    async def UploadModel(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.Model:
        tenant = self.auth.tenant(context)
        with self._stream_slot(tenant):  # counted for the stream's whole lifetime
            return await self._upload(tenant, aiter(request_iterator), context)

    async def _upload(self, tenant: str, requests, context: grpc.aio.ServicerContext) -> pb.Model:
        first = await self._next(requests, None)
        if first is None or not first.HasField("header"):
            raise InvalidSpec("header", "the first message of an upload must be the header (sha256, size_bytes)")
        header = first.header
        sha = parse_model_name(header.sha256, "header.sha256")
        limit = self.config.limits.max_upload_bytes
        if not 0 < header.size_bytes <= limit:
            raise InvalidSpec("header.size_bytes", f"{header.size_bytes} bytes; a model must be 1 to {limit} bytes")
        if header.HasField("preprocess"):  # the job's rule: a model every job would refuse is never stored
            p = header.preprocess
            check_preprocess(list(p.mean), list(p.std), p.channel_order, field="header.preprocess")
        existing = await self._stored(tenant, sha)
        if existing is not None:
            existing.deduplicated = True
            self._count("deduplicated")
            return existing
        if (tenant, sha) in self._uploading:
            raise FailedPrecondition(f"an upload of {sha} is already in progress; retry when it ends",
                                     reason="UPLOAD_IN_PROGRESS")
        self._check_quota(tenant, sha, header.size_bytes, reserved=True)  # from the declared size, before any byte
        self._make_room(tenant, sha, header.size_bytes)
        self._uploading[(tenant, sha)] = header.size_bytes
        try:
            model = await self._receive(tenant, header, sha, requests, context)
        except FeaturevizError:
            self._count("rejected")
            raise
        finally:
            self._uploading.pop((tenant, sha), None)
        self._count("stored")
        return model

    def _stream_slot(self, tenant: str):
        """One of the tenant's ``max_concurrent_uploads_per_tenant`` upload streams, held until the stream ends
        (dataset uploads share them)."""
        return self._streams.hold(tenant, self.config.limits.max_concurrent_uploads_per_tenant)

    def _check_quota(self, tenant: str, sha: str, size: int, *, reserved: bool) -> None:
        """The tenant's models and their bytes stay within max_models_per_tenant and max_model_bytes_per_tenant.
        A model the tenant already holds (``sha``) is not counted twice; with ``reserved``, its other uploads in
        progress count at their declared size."""
        limits = self.config.limits
        count, held = self.store.usage(tenant, besides=sha)
        if reserved:
            others = [n for (t, s), n in self._uploading.items() if t == tenant and s != sha]
            count, held = count + len(others), held + sum(others)
        what = "models stored" + (" or being uploaded" if reserved else "")
        if count + 1 > limits.max_models_per_tenant:
            raise ResourceExhausted(f"this tenant has {count} {what}, the limit is {limits.max_models_per_tenant} "
                                    "(max_models_per_tenant); delete a model first", reason="MODEL_QUOTA")
        if held + size > limits.max_model_bytes_per_tenant:
            raise ResourceExhausted(f"this model ({size} bytes) and the tenant's {count} {what} ({held} bytes) would "
                                    f"hold {held + size} bytes, over the limit of {limits.max_model_bytes_per_tenant} "
                                    "(max_model_bytes_per_tenant); delete a model first", reason="STORAGE_QUOTA")

    async def _stored(self, tenant: str, sha: str) -> pb.Model | None:
        """The tenant's model of these bytes when it is usable: READY with its file intact. Otherwise (no model,
        or its file missing or corrupt) None, and an upload of the bytes stores (restores) the file."""
        try:
            model = self.store.get_model(tenant, sha)
        except FeaturevizError:
            return None
        if model.state != pb.MODEL_STATE_READY or not await asyncio.to_thread(self.store.file_intact, sha):
            return None
        return model

    async def _next(self, requests, committed: int | None):
        """The next message of an upload stream, None at its end; a stream silent for the idle timeout is ended
        (ABORTED, retryable: the client resumes from what the server holds)."""
        idle = self.config.upload_idle_timeout_seconds
        try:
            return await asyncio.wait_for(anext(requests), idle)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            held = "" if committed is None else f"; the server holds {committed} bytes, resume from there"
            raise Aborted(f"the upload sent nothing for {idle:g} s (upload_idle_timeout_seconds) and was "
                          f"ended{held}", reason="UPLOAD_IDLE_TIMEOUT") from None

    def _make_room(self, tenant: str, sha: str, size: int, own: Path | None = None) -> None:
        """Drop expired partial uploads (any tenant), then this tenant's oldest idle ones while its unfinished
        uploads (the ones in progress at their declared size) would hold more than max_partial_upload_bytes.
        ``own``: the partial file of this upload (default: the model upload's of ``sha``)."""
        limits = self.config.limits
        receiving = {self.store.upload_path(s, t) for t, s in self._uploading} | set(self.receiving)
        self.store.expire_partials(limits.partial_upload_ttl_seconds, keep=receiving)
        own = self.store.upload_path(sha, tenant) if own is None else own
        idle = [(path, held) for path, held in self.store.partials(tenant) if path not in receiving and path != own]
        held = size + sum(n for (t, _), n in self._uploading.items() if t == tenant) + sum(n for _, n in idle) \
            + sum(n for t, n in self.receiving.values() if t == tenant)
        for path, n in idle:  # oldest first
            if held <= limits.max_partial_upload_bytes:
                break
            path.unlink(missing_ok=True)
            held -= n
            log.info("dropped the partial upload %s of %s to make room", path.name, tenant)
        if held > limits.max_partial_upload_bytes:
            raise ResourceExhausted(f"this upload ({size} bytes) and the tenant's other uploads in progress would "
                                    f"hold {held} bytes, over the limit of {limits.max_partial_upload_bytes} "
                                    "(max_partial_upload_bytes); let them finish first",
                                    reason="PARTIAL_UPLOADS_FULL")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.uploads.labels(outcome).inc()

    async def _receive(self, tenant: str, header: pb.UploadHeader, sha: str, request_iterator,
                       context: grpc.aio.ServicerContext) -> pb.Model:
        partial = self.store.upload_path(sha, tenant)
        # a broken stream leaves `partial` for GetUpload + resume; a bad upload (or a full disk) leaves nothing
        await receive_upload(lambda committed: self._next(request_iterator, committed), partial,
                             size_bytes=header.size_bytes, sha256=sha, max_chunk=self.config.limits.max_chunk_bytes)
        known = self.store.any_model(sha)  # the same bytes, uploaded by another tenant: imported already
        if known is not None:
            model, layers = known
        else:
            model, layers = await asyncio.to_thread(self._import, partial, header, sha)  # the worker keeps it
        model.state = pb.MODEL_STATE_READY
        model.ClearField("failure_reason")
        model.ClearField("failure_message")
        model.display_name = header.display_name or model.display_name
        if header.HasField("preprocess"):
            model.input_spec.preprocess.CopyFrom(header.preprocess)
        model.create_time.GetCurrentTime()
        try:  # again at the end: uploads that ended meanwhile count now (no await from here to put_model)
            self._check_quota(tenant, sha, header.size_bytes, reserved=False)
        except ResourceExhausted:
            _discard(partial)
            raise
        with disk_full_discards(partial):
            self.store.commit_file(partial, sha)
            try:
                self.store.put_model(tenant, model, layers)
                self.store.restore_model(sha)  # other tenants' rows of these bytes, if the file was missing or corrupt
            except BaseException:
                if self.store.any_model(sha) is None:  # no row refers to the file: an upload that failed leaves nothing
                    self.store.model_path(sha).unlink(missing_ok=True)
                raise
        log.info("model %s uploaded (%d bytes, %d layers) by %s", sha[:12], header.size_bytes, len(layers.layers),
                 tenant)
        return model

    def _import(self, partial: Path, header: pb.UploadHeader, sha: str):
        try:
            return self.scheduler.worker.load_model(sha, partial.read_bytes(), limits=import_limits(self.config.limits))
        except FeaturevizError:
            _discard(partial)
            raise
        except Exception as exc:  # a converter bug must still leave nothing behind and say what failed
            _discard(partial)
            log.exception("importing %s failed", header.display_name or header.sha256)
            raise ModelImportError(f"the model could not be converted ({type(exc).__name__}: {exc})",
                                   reason="CONVERSION_FAILED") from exc

    @rpc_errors
    async def GetUpload(self, request: pb.GetUploadRequest, context) -> pb.UploadStatus:
        tenant = self.auth.tenant(context)
        sha = parse_model_name(request.sha256, "sha256")
        if await self._stored(tenant, sha) is not None:
            return pb.UploadStatus(sha256=sha, committed_bytes=request.size_bytes, model_exists=True)
        partial = self.store.upload_path(sha, tenant)
        return pb.UploadStatus(sha256=sha, committed_bytes=resume_offset(partial, request.size_bytes))

    @rpc_errors
    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.Model:
        return self.store.get_model(self.auth.tenant(context), parse_model_name(request.model))

    @rpc_errors
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        tenant = self.auth.tenant(context)
        limits = self.config.limits
        offset, limit = page_bounds(request.page_size, request.page_token, "models",
                                    default=limits.default_page_size, maximum=limits.max_page_size)
        models = self.store.list_models(tenant, offset, limit)
        return pb.ListModelsResponse(models=models, next_page_token=next_token(offset, limit, len(models), None,
                                                                               "models"))

    @rpc_errors
    async def DeleteModel(self, request: pb.DeleteModelRequest, context) -> pb.DeleteModelResponse:
        sha = parse_model_name(request.model)
        self.store.delete_model(self.auth.tenant(context), sha)
        if self.store.any_model(sha) is None:
            self.scheduler.worker.drop_model(sha)
        return pb.DeleteModelResponse()

    @rpc_errors
    async def ListLayers(self, request: pb.ListLayersRequest, context) -> pb.ListLayersResponse:
        sha = parse_model_name(request.model)
        layers = self.store.layers(self.auth.tenant(context), sha)
        needle = request.filter.lower()
        if needle:
            layers = [lay for lay in layers if needle in lay.name.lower() or needle in lay.op_type.lower()
                      or any(needle in alias.lower() for alias in lay.aliases)]
        if request.spatial_only:
            layers = [lay for lay in layers if lay.spatial]
        query = f"{sha}|{needle}|{request.spatial_only}"
        limits = self.config.limits
        offset, limit = page_bounds(request.page_size, request.page_token, query,
                                    default=limits.default_page_size, maximum=limits.max_page_size)
        page = layers[offset: offset + limit]
        return pb.ListLayersResponse(layers=page, total_size=len(layers),
                                     next_page_token=next_token(offset, limit, len(page), len(layers), query))




def import_limits(limits) -> dict:
    """The importer's limits (``featureviz.importer.ImportLimits`` keywords) from the server's published ones."""
    return dict(max_image_side=limits.max_image_side, max_nodes=limits.max_model_nodes,
                max_activation_bytes=limits.max_activation_bytes,
                import_timeout_seconds=limits.import_timeout_seconds, import_memory_bytes=limits.import_memory_bytes)


async def receive_upload(next_message, partial: Path, *, size_bytes: int, sha256: str, max_chunk: int) -> None:
    """Append a chunked upload stream to ``partial`` (resumed from what it holds) and check it against the declared
    size and sha256 (hex). ``next_message(committed)`` awaits the stream's next message (None at its end). A broken
    stream keeps the prefix for a resume (FAILED_PRECONDITION, UPLOAD_INCOMPLETE); a bad one (a second header, a
    chunk at the wrong offset or too large, more or fewer bytes than declared, another digest) or a full disk
    leaves nothing. Models and datasets are uploaded the same way."""
    committed = resume_offset(partial, size_bytes, drop=True)
    finished = False
    with disk_full_discards(partial), open(partial, "ab") as out:
        while (message := await next_message(committed)) is not None:
            if not message.HasField("chunk"):
                _discard(partial)
                raise InvalidSpec("header", "only the first message of an upload may be a header")
            chunk = message.chunk
            if chunk.write_offset != committed:
                raise FailedPrecondition(f"write_offset {chunk.write_offset} but the server holds {committed} "
                                         f"bytes; resume from {committed}", reason="WRITE_OFFSET_MISMATCH")
            if len(chunk.data) > max_chunk:
                _discard(partial)
                raise InvalidSpec("chunk.data", f"{len(chunk.data)} bytes; chunks are at most {max_chunk} bytes")
            if committed + len(chunk.data) > size_bytes:
                _discard(partial)
                raise InvalidSpec("header.size_bytes", f"received more than the declared {size_bytes} bytes",
                                  reason="SIZE_MISMATCH")
            out.write(chunk.data)
            out.flush()  # what GetUpload reports is on disk
            committed += len(chunk.data)
            if chunk.finish_write:
                finished = True
                break
    if not finished and committed < size_bytes:  # the stream broke: keep the prefix for resuming
        raise FailedPrecondition(f"the stream ended after {committed} of {size_bytes} bytes without finish_write; "
                                 f"resume from {committed}", reason="UPLOAD_INCOMPLETE")
    if committed != size_bytes:
        _discard(partial)
        raise InvalidSpec("header.size_bytes", f"declared {size_bytes} bytes but the stream ended after {committed}",
                          reason="SIZE_MISMATCH")
    digest = await asyncio.to_thread(file_sha256, partial)
    if digest != sha256:
        _discard(partial)
        raise InvalidSpec("header.sha256", f"the bytes hash to {digest}, not the declared {sha256}",
                          reason="DIGEST_MISMATCH")


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def disk_full_discards(partial: Path):
    """A full disk while storing an upload: drop what was written and answer RESOURCE_EXHAUSTED (DISK_FULL)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _discard(partial)
        raise ResourceExhausted(f"the server's disk is full ({os.strerror(exc.errno)}) while storing the upload; "
                                "nothing was kept: retry later, or ask the operator to free space",
                                reason="DISK_FULL") from None
    except ResourceExhausted:  # the database is full
        _discard(partial)
        raise

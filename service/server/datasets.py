"""DatasetService: chunked, resumable uploads of image sets (a zip, a tar, or single files), checked by
``featureviz.datasets`` (standard library only, run in a thread), stored by content; get, list, images, delete;
the dataset examples of a finished exemplar index (GetExemplars) and the images themselves (GetDatasetImage).

An upload streams like a model's (header, then chunks with write offsets; a broken stream keeps its prefix under
``uploads/dataset-<sha256>.<tenant>.part`` for GetDatasetUpload and a resume). Once the whole stream is there and
matches its size and sha256, it is unpacked into a fresh ``staging/`` folder, each image under its sha256; the
images not stored yet move to ``images/`` and the tenant's row is inserted in one step (``Store.commit_dataset``).
Whatever the outcome after the stream is whole, the partial file and the staging folder are removed: a refused or
failed upload leaves nothing.

GetExemplars and GetDatasetImage check everything the server knows (the tenant's model, set, catalog layer,
channel, k, order, the index the tenant made or reused, the box against the image's size) and leave the numbers
and the pixels to the worker (``Worker.exemplars``, ``Worker.dataset_image``: plain data, run in a thread off
the event loop); the server reads no index file and decodes no image.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
import shutil

import grpc

from featureviz.datasets import DatasetLimits
from featureviz.datasets import Report
from featureviz.datasets import Unpacked
from featureviz.datasets import check_member_name
from featureviz.datasets import unpack
from featureviz.errors import FailedPrecondition
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.errors import NotFound
from featureviz.errors import ResourceExhausted
from featureviz.errors import echo
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import rpc_errors
from featureviz.server.models import ModelServicer
from featureviz.server.models import _discard
from featureviz.server.models import disk_full_discards
from featureviz.server.models import parse_model_name
from featureviz.server.models import receive_upload
from featureviz.server.paging import next_token
from featureviz.server.paging import page_bounds
from featureviz.server.priors import dataset_priors
from featureviz.server.store import Store
from featureviz.server.store import resume_offset
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc
from featureviz.worker.api import ExemplarQuery
from featureviz.worker.api import ImageQuery

__all__ = ["DatasetServicer", "parse_dataset_name", "report_to_proto", "resolve_layer", "ORDERS",
           "DEFAULT_EXEMPLARS"]

log = logging.getLogger("featureviz.server")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = {pb.DATASET_SOURCE_KIND_ZIP: "zip", pb.DATASET_SOURCE_KIND_TAR: "tar", pb.DATASET_SOURCE_KIND_FILES: "files"}
DISPLAY_NAME_CHARS = 200
ORDERS = {pb.EXEMPLAR_ORDER_UNSPECIFIED: "max", pb.EXEMPLAR_ORDER_MAX: "max", pb.EXEMPLAR_ORDER_MEAN: "mean",
          pb.EXEMPLAR_ORDER_MIN: "min"}
DEFAULT_EXEMPLARS = 9  # GetExemplarsRequest.k = 0


def resolve_layer(layers: list[pb.Layer], name: str, field: str = "layer") -> pb.Layer:
    """The catalog entry of ``name`` (its catalog name or an alias); InvalidSpec naming it and close matches."""
    for layer in layers:
        if layer.name == name:
            return layer
    for layer in layers:
        if name in layer.aliases:
            return layer
    names = [layer.name for layer in layers]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; close: {', '.join(echo(c) for c in close)}" if close else "; list them with featureviz models layers"
    raise InvalidSpec(field, f"the model has no layer {echo(name)}{hint}", reason="UNKNOWN_LAYER")


def parse_dataset_name(name: str, field: str = "dataset") -> str:
    """``"datasets/<id>"`` or ``"<id>"`` -> the id (a sha256 hex digest)."""
    ident = name.removeprefix("datasets/").strip().lower()
    if not _SHA256.fullmatch(ident):
        raise InvalidSpec(field, f"expected a dataset id (sha256 hex digest) or 'datasets/<id>', got {echo(name)}")
    return ident


def report_to_proto(report: Report) -> pb.DatasetReport:
    out = pb.DatasetReport(images=report.images, files=report.files, skipped=report.skipped_count,
                           formats=report.formats)
    for cause, (count, names, detail) in report.skipped.items():
        out.skipped_by_cause.add(cause=cause, count=count, names=[n[:DISPLAY_NAME_CHARS] for n in names],
                                 detail=detail)
    for kind, (count, names) in report.converted.items():
        out.converted.add(kind=kind, count=count, names=[n[:DISPLAY_NAME_CHARS] for n in names])
    return out


class DatasetServicer(pb_grpc.DatasetServiceServicer):
    """Shares the model uploads' stream slots, idle timeout and partial-upload budget (``models``)."""

    def __init__(self, config: ServerConfig, store: Store, auth: TenantResolver, models: ModelServicer):
        self.config = config
        self.store = store
        self.auth = auth
        self.models = models
        self.worker = models.scheduler.worker
        self._uploading: set[tuple[str, str]] = set()  # (tenant, stream sha256) while receiving or unpacking

    # --------------------------------------------------------------------------------------------- upload

    @rpc_errors
    async def UploadDataset(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.Dataset:
        tenant = self.auth.tenant(context)
        with self.models._stream_slot(tenant):
            return await self._upload(tenant, aiter(request_iterator))

    def _check_header(self, header: pb.DatasetUploadHeader) -> str:
        limits = self.config.limits
        sha = parse_model_name(header.sha256, "header.sha256")
        if header.kind not in _KINDS:
            raise InvalidSpec("header.kind", "give the kind of the upload: zip, tar or files")
        if not 0 < header.size_bytes <= limits.max_dataset_bytes:
            raise InvalidSpec("header.size_bytes", f"{header.size_bytes} bytes; a dataset upload must be 1 to "
                                                   f"{limits.max_dataset_bytes} bytes (max_dataset_bytes)",
                              reason="DATASET_TOO_LARGE" if header.size_bytes > 0 else None)
        if header.kind != pb.DATASET_SOURCE_KIND_FILES:
            if header.files:
                raise InvalidSpec("header.files", "only an upload of kind files lists its files")
            return sha
        if not header.files:
            raise InvalidSpec("header.files", "an upload of kind files lists its files (name, size_bytes, sha256)")
        if len(header.files) > limits.max_archive_members:
            raise InvalidSpec("header.files", f"{len(header.files)} files, over {limits.max_archive_members} "
                                              "(max_archive_members); split the set", reason="TOO_MANY_MEMBERS")
        total = 0
        for index, item in enumerate(header.files):
            if not check_member_name(item.name):
                raise InvalidSpec(f"header.files[{index}].name", "empty; give the file's name")
            parse_model_name(item.sha256, f"header.files[{index}].sha256")
            if item.size_bytes < 0:
                raise InvalidSpec(f"header.files[{index}].size_bytes", f"must be >= 0, got {item.size_bytes}")
            total += item.size_bytes
        if total != header.size_bytes:
            raise InvalidSpec("header.files", f"the files add up to {total} bytes, the header declares "
                                              f"{header.size_bytes}", reason="SIZE_MISMATCH")
        return sha

    def _check_quota(self, tenant: str, besides: str = "", *, reserved: bool) -> None:
        limit = self.config.limits.max_datasets_per_tenant
        held = self.store.count_datasets(tenant, besides=besides)
        others = sum(1 for t, _ in self._uploading if t == tenant) - 1 if reserved else 0
        if held + max(others, 0) + 1 > limit:
            raise ResourceExhausted(f"this tenant has {held} datasets" + (f" and {others} being uploaded" if others
                                                                            > 0 else "") +
                                    f", the limit is {limit} (max_datasets_per_tenant); delete a dataset first",
                                    reason="DATASET_QUOTA")

    async def _upload(self, tenant: str, requests) -> pb.Dataset:
        first = await self.models._next(requests, None)
        if first is None or not first.HasField("header"):
            raise InvalidSpec("header", "the first message of an upload must be the header (sha256, size_bytes, "
                                        "kind)")
        header = first.header
        sha = self._check_header(header)
        if (tenant, sha) in self._uploading:
            raise FailedPrecondition(f"an upload of {sha} is already in progress; retry when it ends",
                                     reason="UPLOAD_IN_PROGRESS")
        self._uploading.add((tenant, sha))
        partial = self.store.dataset_upload_path(sha, tenant)
        try:
            self._check_quota(tenant, reserved=True)
            self.models._make_room(tenant, sha, header.size_bytes, own=partial)
            self.models.receiving[partial] = (tenant, header.size_bytes)
            try:
                await self._receive(header, sha, partial, requests)
            finally:
                self.models.receiving.pop(partial, None)
            try:
                return await self._store(tenant, header, sha, partial)
            finally:
                _discard(partial)
        finally:
            self._uploading.discard((tenant, sha))

    async def _receive(self, header: pb.DatasetUploadHeader, sha: str, partial, requests) -> None:
        """The stream into ``partial`` (appended from what it holds), checked against the declared size and sha256.
        A broken stream keeps the prefix; a bad one (or a full disk) leaves nothing."""
        await receive_upload(lambda committed: self.models._next(requests, committed), partial,
                             size_bytes=header.size_bytes, sha256=sha,
                             max_chunk=self.config.limits.max_chunk_bytes)

    async def _store(self, tenant: str, header: pb.DatasetUploadHeader, sha: str, partial) -> pb.Dataset:
        staging = self.store.staging_dir()
        try:
            files = [(f.name, f.size_bytes, f.sha256.lower()) for f in header.files]
            limits = DatasetLimits.from_limits(self.config.limits)
            with disk_full_discards(partial):
                unpacked = await asyncio.to_thread(unpack, partial, _KINDS[header.kind], staging, limits, files)
            ident = unpacked.id
            try:
                existing = self.store.get_dataset(tenant, ident)
            except FeaturevizError:
                existing = None
            if existing is not None:
                existing.deduplicated = True
                return existing
            self._check_quota(tenant, besides=ident, reserved=False)  # no await from here to the commit
            dataset, images = self._protos(header, ident, unpacked)
            with disk_full_discards(partial):
                self.store.commit_dataset(tenant, dataset, images, {i.sha256: i.path for i in unpacked.images})
            log.info("dataset %s uploaded (%d images, %d skipped) by %s", ident[:12], unpacked.report.images,
                     unpacked.report.skipped_count, tenant)
            return dataset
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    @staticmethod
    def _protos(header: pb.DatasetUploadHeader, ident: str, unpacked: Unpacked):
        dataset = pb.Dataset(name=f"datasets/{ident}", id=ident, display_name=header.display_name[:DISPLAY_NAME_CHARS],
                             image_count=len(unpacked.images), size_bytes=unpacked.size_bytes,
                             report=report_to_proto(unpacked.report))
        dataset.create_time.GetCurrentTime()
        images = pb.ListDatasetImagesResponse(total_size=len(unpacked.images))
        for image in unpacked.images:
            images.images.add(name=image.name, sha256=image.sha256, size_bytes=image.size, format=image.info.format,
                              width=image.info.width, height=image.info.height, converted=image.info.converted)
        return dataset, images

    # --------------------------------------------------------------------------------------------- reads

    @rpc_errors
    async def GetDatasetUpload(self, request: pb.GetDatasetUploadRequest, context) -> pb.UploadStatus:
        tenant = self.auth.tenant(context)
        sha = parse_model_name(request.sha256, "sha256")
        partial = self.store.dataset_upload_path(sha, tenant)
        return pb.UploadStatus(sha256=sha, committed_bytes=resume_offset(partial, request.size_bytes))

    @rpc_errors
    async def GetDataset(self, request: pb.GetDatasetRequest, context) -> pb.Dataset:
        dataset = self.store.get_dataset(self.auth.tenant(context), parse_dataset_name(request.dataset))
        dataset.priors.extend(dataset_priors(self.store, dataset.id))  # what jobs learned from it (issue 25)
        return dataset

    @rpc_errors
    async def ListDatasets(self, request: pb.ListDatasetsRequest, context) -> pb.ListDatasetsResponse:
        tenant = self.auth.tenant(context)
        limits = self.config.limits
        offset, limit = page_bounds(request.page_size, request.page_token, "datasets",
                                    default=limits.default_page_size, maximum=limits.max_page_size)
        datasets = self.store.list_datasets(tenant, offset, limit)
        for dataset in datasets:  # a page stays small: the names are in GetDataset
            for entry in (*dataset.report.skipped_by_cause, *dataset.report.converted):
                del entry.names[:]
            dataset.priors.extend(dataset_priors(self.store, dataset.id))
        return pb.ListDatasetsResponse(datasets=datasets, next_page_token=next_token(offset, limit, len(datasets),
                                                                                     None, "datasets"))

    @rpc_errors
    async def ListDatasetImages(self, request: pb.ListDatasetImagesRequest, context) -> pb.ListDatasetImagesResponse:
        ident = parse_dataset_name(request.dataset)
        images = self.store.dataset_images(self.auth.tenant(context), ident)
        limits = self.config.limits
        offset, limit = page_bounds(request.page_size, request.page_token, ident,
                                    default=limits.default_page_size, maximum=limits.max_page_size)
        page = images[offset: offset + limit]
        return pb.ListDatasetImagesResponse(images=page, total_size=len(images),
                                            next_page_token=next_token(offset, limit, len(page), len(images), ident))

    @rpc_errors
    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context) -> pb.DeleteDatasetResponse:
        self.store.delete_dataset(self.auth.tenant(context), parse_dataset_name(request.dataset))
        return pb.DeleteDatasetResponse()

    # --------------------------------------------------------------------------------------------- examples

    @rpc_errors
    async def GetExemplars(self, request: pb.GetExemplarsRequest, context) -> pb.GetExemplarsResponse:
        tenant = self.auth.tenant(context)
        sha = parse_model_name(request.model)
        ident = parse_dataset_name(request.dataset)
        self.store.get_model(tenant, sha)  # NOT_FOUND unless the tenant holds both
        images = self.store.dataset_images(tenant, ident)
        if request.order not in ORDERS:
            raise InvalidSpec("order", f"order {request.order} is not one of max, mean, min "
                                       "(EXEMPLAR_ORDER_MAX, _MEAN, _MIN)")
        order = ORDERS[request.order]
        layer = resolve_layer(self.store.layers(tenant, sha), request.layer)
        if layer.channels <= 0:
            raise InvalidSpec("layer", f"layer {echo(layer.name)} has no channels to rank")
        if not 0 <= request.channel < layer.channels:
            raise InvalidSpec("channel", f"channel {request.channel} is out of range: {echo(layer.name)} has "
                                         f"{layer.channels} channels (0..{layer.channels - 1})")
        limit = self.config.limits.max_exemplar_k
        if not 0 <= request.k <= limit:
            raise InvalidSpec("k", f"k must be 1..{limit} (max_exemplar_k; 0: {DEFAULT_EXEMPLARS}), got {request.k}")
        size = None
        if request.HasField("size"):
            size = (request.size.height, request.size.width)
            if min(size) <= 0:
                raise InvalidSpec("size", f"size must be positive, got {size[0]}x{size[1]}")
        found = [info for info in self.store.find_indexes(tenant, sha, ident) if layer.name in info.layers
                 and (size is None or (info.size.height, info.size.width) == size)]
        found = [info for info in found if self.store.get_index(info.index) is not None]  # its file is there
        if not found:
            at = f" at {size[0]}x{size[1]}" if size else ""
            raise NotFound(f"no finished exemplar index of model {sha[:12]} over dataset {ident[:12]} holds layer "
                           f"{echo(layer.name)}{at}; run the index job first (featureviz exemplars MODEL DATASET "
                           f"'{echo(layer.name)}:{request.channel}' --server ADDR, or CreateJob with "
                           "spec.exemplar_index)", reason="EXEMPLAR_INDEX_NOT_FOUND")
        info = found[0]
        k = request.k or min(DEFAULT_EXEMPLARS, info.k)
        if k > info.k:
            raise InvalidSpec("k", f"k {k} is over what the index keeps ({info.k}); run the index job with a larger "
                                   f"k (at most {limit}, max_exemplar_k)")
        query = ExemplarQuery(index_path=str(self.store.index_path(info.index)), model=sha, layer=layer.name,
                              channel=request.channel, order=order, k=k)
        response = await asyncio.to_thread(self.worker.exemplars, query)
        response.order = request.order or pb.EXEMPLAR_ORDER_MAX
        response.index = info.index
        by_name = {image.name: image.sha256 for image in images}
        held = set(by_name.values())
        for example in response.exemplars:
            example.image = by_name.get(example.name) or (example.name if example.name in held else "")
        return response

    @rpc_errors
    async def GetDatasetImage(self, request: pb.GetDatasetImageRequest, context) -> pb.DatasetImageData:
        tenant = self.auth.tenant(context)
        ident = parse_dataset_name(request.dataset)
        images = self.store.dataset_images(tenant, ident)
        wanted = request.image.strip()
        if not wanted:
            raise InvalidSpec("image", "give the image's sha256 or its name in the set")
        sha = wanted.lower()
        image = next((i for i in images if i.sha256 == sha), None) or next((i for i in images if i.name == wanted),
                                                                           None)
        if image is None:
            raise NotFound(f"image {echo(wanted)} is not in dataset {ident}", reason="IMAGE_NOT_FOUND")
        limits = self.config.limits
        if not 0 <= request.max_side <= limits.max_image_side:
            raise InvalidSpec("max_side", f"max_side must be 1..{limits.max_image_side} (max_image_side; 0: that), "
                                          f"got {request.max_side}")
        box = None
        if request.HasField("box"):
            b = request.box
            if b.x1 <= b.x0 or b.y1 <= b.y0:
                raise InvalidSpec("box", f"the box ({b.x0}, {b.y0}, {b.x1}, {b.y1}) is empty: x1 > x0 and y1 > y0")
            box = (max(0, b.x0), max(0, b.y0), min(image.width, b.x1), min(image.height, b.y1))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise InvalidSpec("box", f"the box ({b.x0}, {b.y0}, {b.x1}, {b.y1}) is outside the "
                                         f"{image.width}x{image.height} image")
        query = ImageQuery(path=str(self.store.image_path(image.sha256)), box=box,
                           max_side=request.max_side or limits.max_image_side,
                           max_decode_side=limits.max_dataset_image_side)
        data = await asyncio.to_thread(self.worker.dataset_image, query)
        data.name, data.sha256 = image.name[:DISPLAY_NAME_CHARS], image.sha256
        return data

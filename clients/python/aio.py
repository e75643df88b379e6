"""The asyncio twin of :class:`featureviz.client.Client` (grpc.aio): same methods, awaited or async-iterated.

    async with AsyncClient("127.0.0.1:50051") as fv:
        model = await fv.upload("model.onnx")
        job = await fv.submit(model.sha256, {"channel": {"layer": "conv1", "channel": 3}}, steps=64)
        async for event in fv.watch(job.id):
            ...
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from collections.abc import Callable

import grpc

from featureviz.client.client import MESSAGE_BYTES
from featureviz.client.client import channel_credentials
from featureviz.codec import spec_to_proto
from featureviz.client.errors import FeaturevizClientError
from featureviz.client.errors import from_rpc_error
from featureviz.client.atlas import atlas_job_spec
from featureviz.client.atlas import atlas_unit_request
from featureviz.client.atlas import atlas_units_request
from featureviz.client.exemplars import exemplars_request
from featureviz.client.exemplars import image_request
from featureviz.client.exemplars import index_job_spec
from featureviz.client.upload import DEFAULT_CHUNK
from featureviz.client.upload import DatasetUpload
from featureviz.client.upload import Upload
from featureviz.client.upload import file_sha256
from featureviz.client.watch import Reattach
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["AsyncClient"]


class AsyncClient:
    def __init__(self, address: str, *, token: str | None = None, timeout: float | None = 60.0,
                 tls: bool | str | os.PathLike | None = None, client_cert: str | os.PathLike | None = None,
                 client_key: str | os.PathLike | None = None, channel: grpc.aio.Channel | None = None):
        """``channel``: share an open channel (one per caller with its own token, as the web explorer does);
        :meth:`close` then leaves it open for its owner."""
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._owns_channel = channel is None
        if channel is None:
            options = [("grpc.max_receive_message_length", MESSAGE_BYTES),
                       ("grpc.max_send_message_length", MESSAGE_BYTES)]
            credentials = channel_credentials(tls, client_cert, client_key)
            channel = (grpc.aio.insecure_channel(address, options=options) if credentials is None
                       else grpc.aio.secure_channel(address, credentials, options=options))
        self._channel = channel
        self._models = pb_grpc.ModelServiceStub(self._channel)
        self._jobs = pb_grpc.JobServiceStub(self._channel)
        self._info = pb_grpc.InfoServiceStub(self._channel)
        self._datasets = pb_grpc.DatasetServiceStub(self._channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects (e.g. a server just started)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise FeaturevizClientError("UNAVAILABLE", f"no server answered at {self.address} within {timeout} s") \
                from None

    async def info(self) -> pb.ServerInfo:
        return await self._call(self._info.GetServerInfo, pb.GetServerInfoRequest())

    async def upload(self, source: bytes | str | os.PathLike, *, name: str | None = None,
                     chunk_size: int = DEFAULT_CHUNK, retries: int = 3, preprocess: dict | None = None,
                     progress=None) -> pb.Model:
        """As :meth:`Client.upload`: skipped when the server holds the bytes, resumed after a broken stream."""
        sha, size = await asyncio.to_thread(file_sha256, source)
        upload = Upload(source, sha, size, name=name, chunk_size=chunk_size, retries=retries, preprocess=preprocess,
                        progress=progress)
        for attempt in upload.attempts:
            status = await self._call(self._models.GetUpload, upload.status_request())
            if status.model_exists:
                return upload.deduplicated(await self.model(sha))
            try:
                return await self._models.UploadModel(_aiter(upload.requests(status.committed_bytes)),
                                                      metadata=self._metadata)
            except grpc.RpcError as err:
                await asyncio.sleep(upload.broken(err, attempt))
        raise AssertionError("unreachable")

    async def upload_status(self, sha256: str, size: int = 0) -> pb.UploadStatus:
        return await self._call(self._models.GetUpload, pb.GetUploadRequest(sha256=sha256, size_bytes=size))

    async def model(self, model: str) -> pb.Model:
        return await self._call(self._models.GetModel, pb.GetModelRequest(model=model))

    def models(self, *, page_size: int = 0) -> AsyncIterator[pb.Model]:
        return self._pages(self._models.ListModels, pb.ListModelsRequest(page_size=page_size), "models")

    async def delete_model(self, model: str) -> None:
        await self._call(self._models.DeleteModel, pb.DeleteModelRequest(model=model))

    def layers(self, model: str, *, filter: str = "", spatial_only: bool = False,
               page_size: int = 0) -> AsyncIterator[pb.Layer]:
        return self._pages(self._models.ListLayers, pb.ListLayersRequest(
            model=model, page_size=page_size, filter=filter, spatial_only=spatial_only), "layers")

    async def upload_dataset(self, source: bytes | str | os.PathLike | list, *, name: str | None = None,
                             chunk_size: int = DEFAULT_CHUNK, retries: int = 3,
                             progress: Callable[[int, int], None] | None = None) -> pb.Dataset:
        """As :meth:`Client.upload_dataset`: a folder, image files or an archive; resumed after a broken stream."""
        upload = await asyncio.to_thread(DatasetUpload, source, name=name, chunk_size=chunk_size, retries=retries,
                                         progress=progress)
        for attempt in upload.attempts:
            status = await self._call(self._datasets.GetDatasetUpload, upload.status_request())
            try:
                return await self._datasets.UploadDataset(_aiter(upload.requests(status.committed_bytes)),
                                                          metadata=self._metadata)
            except grpc.RpcError as err:
                await asyncio.sleep(upload.broken(err, attempt))
        raise AssertionError("unreachable")

    async def dataset_upload_status(self, sha256: str, size: int = 0) -> pb.UploadStatus:
        return await self._call(self._datasets.GetDatasetUpload,
                                pb.GetDatasetUploadRequest(sha256=sha256, size_bytes=size))

    async def dataset(self, dataset: str) -> pb.Dataset:
        return await self._call(self._datasets.GetDataset, pb.GetDatasetRequest(dataset=dataset))

    def datasets(self, *, page_size: int = 0) -> AsyncIterator[pb.Dataset]:
        return self._pages(self._datasets.ListDatasets, pb.ListDatasetsRequest(page_size=page_size), "datasets")

    def dataset_images(self, dataset: str, *, page_size: int = 0) -> AsyncIterator[pb.DatasetImage]:
        return self._pages(self._datasets.ListDatasetImages,
                           pb.ListDatasetImagesRequest(dataset=dataset, page_size=page_size), "images")

    async def delete_dataset(self, dataset: str) -> None:
        await self._call(self._datasets.DeleteDataset, pb.DeleteDatasetRequest(dataset=dataset))

    async def index_exemplars(self, model: str, dataset: str, layers: list[str] | None = None, *,
                              k: int | None = None, batch_size: int | None = None, size=None,
                              preprocess: dict | None = None, request_id: str | None = None, wait: bool = False,
                              timeout: float | None = None) -> pb.Job:
        spec = index_job_spec(model, dataset, layers=layers, k=k, batch_size=batch_size, size=size,
                              preprocess=preprocess)
        job = await self._call(self._jobs.CreateJob,
                               pb.CreateJobRequest(spec=spec, request_id=request_id or uuid.uuid4().hex))
        return await self.wait(job.id, timeout=timeout) if wait else job

    async def atlas(self, model, *, layers=None, op_types=None, min_depth: int | None = None,
                    max_depth: int | None = None, channels: int | None = None, dataset: str | None = None,
                    negative: bool = False, diversity: int | None = None, request_id: str | None = None,
                    wait: bool = False, timeout: float | None = None, **options) -> pb.Job:
        spec = atlas_job_spec(model, layers=layers, op_types=op_types, min_depth=min_depth, max_depth=max_depth,
                              channels=channels, dataset=dataset, negative=negative, diversity=diversity,
                              **options)
        job = await self._call(self._jobs.CreateJob,
                               pb.CreateJobRequest(spec=spec, request_id=request_id or uuid.uuid4().hex))
        return await self.wait(job.id, timeout=timeout) if wait else job

    async def atlas_progress(self, job) -> pb.AtlasResult:
        request = atlas_units_request(job, page_size=1)
        return (await self._call(self._jobs.ListAtlasUnits, request)).progress

    async def atlas_units(self, job, *, layer: str = "", page_size: int = 0) -> AsyncIterator[pb.AtlasUnit]:
        async for unit in self._pages(self._jobs.ListAtlasUnits, atlas_units_request(job, layer, page_size), "units"):
            yield unit

    async def atlas_page(self, job, *, layer: str = "", page_size: int = 0,
                         page_token: str = "") -> pb.ListAtlasUnitsResponse:
        """One page of ListAtlasUnits (its units, next_page_token and the progress)."""
        return await self._call(self._jobs.ListAtlasUnits, atlas_units_request(job, layer, page_size, page_token))

    async def atlas_unit_image(self, job, index: int, *, variant="render", image: int = 0) -> pb.AtlasUnitImage:
        return await self._call(self._jobs.GetAtlasUnit, atlas_unit_request(job, index, variant, image))

    async def exemplars(self, model: str, dataset: str, layer: str, channel: int, *, order: str = "max", k: int = 9,
                        size=None) -> pb.GetExemplarsResponse:
        return await self._call(self._datasets.GetExemplars,
                                exemplars_request(model, dataset, layer, channel, order, k, size))

    async def dataset_image(self, dataset: str, image: str, *, box=None, max_side: int = 0) -> bytes:
        return (await self._call(self._datasets.GetDatasetImage, image_request(dataset, image, box, max_side))).png

    async def _pages(self, method, request, field: str) -> AsyncIterator:
        while True:
            page = await self._call(method, request)
            for item in getattr(page, field):
                yield item
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def submit(self, model: str, objective: dict | pb.Objective | None = None, *,
                     spec: pb.JobSpec | None = None, request_id: str | None = None, **options) -> pb.Job:
        if spec is None:
            spec = spec_to_proto(model, objective, **options)
        request = pb.CreateJobRequest(spec=spec, request_id=request_id or uuid.uuid4().hex)
        return await self._call(self._jobs.CreateJob, request)

    async def job(self, job: str) -> pb.Job:
        return await self._call(self._jobs.GetJob, pb.GetJobRequest(job=job))

    def jobs(self, *, state: int = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0) -> AsyncIterator[pb.Job]:
        return self._pages(self._jobs.ListJobs, pb.ListJobsRequest(page_size=page_size, state=state), "jobs")

    async def cancel(self, job: str) -> pb.Job:
        return await self._call(self._jobs.CancelJob, pb.CancelJobRequest(job=job))

    def watch(self, job: str, *, from_seq: int = 0, previews: bool = False, timeout: float | None = None,
              reconnects: int = 5) -> AsyncIterator[pb.JobEvent]:
        """As :meth:`Client.watch`: re-attaches from the last seq after a dropped stream."""
        return self._follow(Reattach(job, from_seq=from_seq, previews=previews, timeout=timeout,
                                     reconnects=reconnects))

    async def _follow(self, state: Reattach) -> AsyncIterator[pb.JobEvent]:
        """As :meth:`Client._follow`."""
        while True:
            if state.creating():
                call = self._jobs.CreateAndWatchJob(state.create, timeout=state.remaining(), metadata=self._metadata)
            else:
                call = self._jobs.WatchJob(state.request(), timeout=state.remaining(), metadata=self._metadata)
            try:
                async for event in call:
                    done = state.seen(event)
                    yield event
                    if done:
                        return
            except grpc.RpcError as err:
                await asyncio.sleep(state.broken(err))
            finally:
                call.cancel()

    async def wait(self, job: str, *, timeout: float | None = None,
                   on_event: Callable[[pb.JobEvent], None] | None = None) -> pb.Job:
        """As :meth:`Client.wait`: watch until the job finishes; returns the finished job (with its PNG images): the
        stream's result event."""
        async for event in self.watch(job, timeout=timeout):
            if on_event is not None:
                on_event(event)
            if event.HasField("result"):  # the finished job, as GetJob would answer (no second call)
                return event.result
        raise FeaturevizClientError("UNAVAILABLE", f"the watch of job {job} ended without a result")

    def create_and_watch(self, model: str, objective: dict | pb.Objective | None = None, *,
                         spec: pb.JobSpec | None = None, request_id: str | None = None, previews: bool = False,
                         timeout: float | None = None, reconnects: int = 5, **options) -> AsyncIterator[pb.JobEvent]:
        """As :meth:`Client.create_and_watch`: one call that queues the job and streams its events, re-attached
        when the stream drops."""
        if spec is None:
            spec = spec_to_proto(model, objective, **options)
        return self._follow(Reattach("", previews=previews, timeout=timeout, reconnects=reconnects,
                                     create=pb.CreateAndWatchJobRequest(spec=spec,
                                                                        request_id=request_id or uuid.uuid4().hex,
                                                                        include_previews=previews)))

    async def run(self, model: str, objective: dict | pb.Objective | None = None, *, spec: pb.JobSpec | None = None,
                  request_id: str | None = None, timeout: float | None = None,
                  on_event: Callable[[pb.JobEvent], None] | None = None, **options) -> pb.Job:
        """As :meth:`Client.run`: queue a job and wait for it in one call; -> the finished job."""
        async for event in self.create_and_watch(model, objective, spec=spec, request_id=request_id,
                                                 timeout=timeout, **options):
            if on_event is not None:
                on_event(event)
            if event.HasField("result"):
                return event.result
        raise FeaturevizClientError("UNAVAILABLE", "the job's watch ended without a result")


async def _aiter(iterable):
    for item in iterable:
        yield item

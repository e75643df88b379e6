"""The thin synchronous client: grpcio + protobuf only (PIL optional, for :func:`to_pil`).

    with Client("127.0.0.1:50051") as fv:
        model = fv.upload("model.onnx")                       # chunked, resumable, deduplicated
        for layer in fv.layers(model.sha256, spatial_only=True):
            ...
        job = fv.submit(model.sha256, {"channel": {"layer": "conv1", "channel": 3}}, steps=64, size=96)
        for event in fv.watch(job.id):                        # snapshot, progress, ..., result
            ...
        pngs = images(fv.job(job.id))

Every failed call raises :class:`FeaturevizClientError` (converted in ``errors.from_rpc_error``).
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import grpc

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

__all__ = ["Client", "images", "to_pil", "file_sha256", "TERMINAL_STATES"]

MESSAGE_BYTES = 64 << 20
TERMINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def images(job: pb.Job) -> list[bytes]:
    """The PNG bytes of a finished job, in batch order."""
    return [image.png for image in sorted(job.result.images, key=lambda i: i.index)]


def to_pil(png: bytes):
    """PNG bytes -> PIL.Image (needs Pillow)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def channel_credentials(tls: bool | str | os.PathLike | None, client_cert=None, client_key=None):
    """grpc.ChannelCredentials, or None for plaintext. ``tls``: True (system roots) or a PEM CA file; the
    client certificate and key (PEM files) are for servers that require mTLS."""
    if not tls and client_cert is None:
        return None
    roots = Path(tls).read_bytes() if isinstance(tls, (str, os.PathLike)) else None
    chain = Path(client_cert).read_bytes() if client_cert is not None else None
    key = Path(client_key).read_bytes() if client_key is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]


class Client:
    """A featureviz server at ``address`` (``host:port``). ``token``: bearer token; ``timeout``: the
    deadline in seconds of unary calls (streams take their own); ``tls``: True or a PEM CA file for a TLS
    server, with ``client_cert``/``client_key`` PEM files when it requires client certificates."""

    def __init__(self, address: str, *, token: str | None = None, timeout: float | None = 60.0,
                 tls: bool | str | os.PathLike | None = None, client_cert: str | os.PathLike | None = None,
                 client_key: str | os.PathLike | None = None, channel: grpc.Channel | None = None):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        credentials = channel_credentials(tls, client_cert, client_key)
        if channel is None:
            channel = (grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) if credentials is None
                       else grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS))
        self._channel = channel
        self._models = pb_grpc.ModelServiceStub(self._channel)
        self._jobs = pb_grpc.JobServiceStub(self._channel)
        self._info = pb_grpc.InfoServiceStub(self._channel)
        self._datasets = pb_grpc.DatasetServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = ...):
        try:
            return method(request, timeout=self.timeout if timeout is ... else timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (e.g. a server just started)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise FeaturevizClientError("UNAVAILABLE", f"no server answered at {self.address} within {timeout} s") \
                from None

    def info(self) -> pb.ServerInfo:
        return self._call(self._info.GetServerInfo, pb.GetServerInfoRequest())

    # ------------------------------------------------------------------------------------------- models

    def upload(self, source: bytes | str | os.PathLike, *, name: str | None = None, chunk_size: int = DEFAULT_CHUNK,
               retries: int = 3, preprocess: dict | None = None,
               progress: Callable[[int, int], None] | None = None) -> pb.Model:
        """Upload an ONNX file (path or bytes). Identical bytes already on the server are not sent again
        (``Model.deduplicated``); a broken stream resumes from what the server holds, up to ``retries`` times.
        ``progress(bytes_sent_or_held, total)`` is called after each chunk."""
        upload = Upload(source, *file_sha256(source), name=name, chunk_size=chunk_size, retries=retries,
                        preprocess=preprocess, progress=progress)
        for attempt in upload.attempts:
            status = self._call(self._models.GetUpload, upload.status_request())
            if status.model_exists:
                return upload.deduplicated(self.model(upload.sha256))
            try:
                return self._models.UploadModel(upload.requests(status.committed_bytes), metadata=self._metadata)
            except grpc.RpcError as err:
                time.sleep(upload.broken(err, attempt))
        raise AssertionError("unreachable")

    def upload_status(self, sha256: str, size: int = 0) -> pb.UploadStatus:
        return self._call(self._models.GetUpload, pb.GetUploadRequest(sha256=sha256, size_bytes=size))

    def model(self, model: str) -> pb.Model:
        return self._call(self._models.GetModel, pb.GetModelRequest(model=model))

    def models(self, *, page_size: int = 0) -> Iterator[pb.Model]:
        return self._pages(self._models.ListModels, pb.ListModelsRequest(page_size=page_size), "models")

    def delete_model(self, model: str) -> None:
        self._call(self._models.DeleteModel, pb.DeleteModelRequest(model=model))

    def layers(self, model: str, *, filter: str = "", spatial_only: bool = False,
               page_size: int = 0) -> Iterator[pb.Layer]:
        """The layer catalog, fetched page by page as the iterator advances."""
        return self._pages(self._models.ListLayers, pb.ListLayersRequest(
            model=model, page_size=page_size, filter=filter, spatial_only=spatial_only), "layers")

    # ------------------------------------------------------------------------------------------- datasets

    def upload_dataset(self, source: bytes | str | os.PathLike | list, *, name: str | None = None,
                       chunk_size: int = DEFAULT_CHUNK, retries: int = 3,
                       progress: Callable[[int, int], None] | None = None) -> pb.Dataset:
        """Upload an image set: a folder (its files, by relative name), a list of image files, one image file, or
        a zip or tar archive (a path or bytes). A broken stream resumes from what the server holds, up to
        ``retries`` times; a set the tenant holds already comes back with ``deduplicated``. The answer's
        ``report`` says what was skipped and why."""
        upload = DatasetUpload(source, name=name, chunk_size=chunk_size, retries=retries, progress=progress)
        for attempt in upload.attempts:
            status = self._call(self._datasets.GetDatasetUpload, upload.status_request())
            try:
                return self._datasets.UploadDataset(upload.requests(status.committed_bytes), metadata=self._metadata)
            except grpc.RpcError as err:
                time.sleep(upload.broken(err, attempt))
        raise AssertionError("unreachable")

    def dataset_upload_status(self, sha256: str, size: int = 0) -> pb.UploadStatus:
        return self._call(self._datasets.GetDatasetUpload, pb.GetDatasetUploadRequest(sha256=sha256, size_bytes=size))

    def dataset(self, dataset: str) -> pb.Dataset:
        return self._call(self._datasets.GetDataset, pb.GetDatasetRequest(dataset=dataset))

    def datasets(self, *, page_size: int = 0) -> Iterator[pb.Dataset]:
        return self._pages(self._datasets.ListDatasets, pb.ListDatasetsRequest(page_size=page_size), "datasets")

    def dataset_images(self, dataset: str, *, page_size: int = 0) -> Iterator[pb.DatasetImage]:
        return self._pages(self._datasets.ListDatasetImages,
                           pb.ListDatasetImagesRequest(dataset=dataset, page_size=page_size), "images")

    def delete_dataset(self, dataset: str) -> None:
        self._call(self._datasets.DeleteDataset, pb.DeleteDatasetRequest(dataset=dataset))

    # ------------------------------------------------------------------------------------------- dataset examples

    def index_exemplars(self, model: str, dataset: str, layers: list[str] | None = None, *, k: int | None = None,
                        batch_size: int | None = None, size=None, preprocess: dict | None = None,
                        request_id: str | None = None, wait: bool = False, timeout: float | None = None) -> pb.Job:
        """Queue an exemplar index job (``JobSpec.exemplar_index``): one pass of the set's images through the model
        keeping every channel's top-k of ``layers`` (None: every layer with channels). Returns the job at once, or
        with ``wait`` the finished job (``job.result.exemplar_index``; ``cached`` when an identical index was
        reused). Then :meth:`exemplars` reads it."""
        spec = index_job_spec(model, dataset, layers=layers, k=k, batch_size=batch_size, size=size,
                              preprocess=preprocess)
        job = self._call(self._jobs.CreateJob,
                         pb.CreateJobRequest(spec=spec, request_id=request_id or uuid.uuid4().hex))
        return self.wait(job.id, timeout=timeout) if wait else job

    # ------------------------------------------------------------------------------------------- atlases

    def atlas(self, model, *, layers=None, op_types=None, min_depth: int | None = None, max_depth: int | None = None,
              channels: int | None = None, dataset: str | None = None, negative: bool = False,
              diversity: int | None = None, request_id: str | None = None, wait: bool = False,
              timeout: float | None = None, **options) -> pb.Job:
        """Start an atlas (``JobSpec.atlas``): one image per channel of the selected layers (by name, op type, depth
        range; none: every layer with channels), the first ``channels`` of each (None: all), with the render
        ``options`` (unset: the atlas defaults, 128 px, 256 steps, fft, standard transforms, seed 0). Returns the
        job at once, or with ``wait`` the finished one (``job.result.atlas``). Watch it with :meth:`watch` (a
        progress event per finished unit), stop it with :meth:`cancel` (what is done stays), read it with
        :meth:`atlas_units` and :meth:`atlas_unit_image`."""
        spec = atlas_job_spec(model, layers=layers, op_types=op_types, min_depth=min_depth, max_depth=max_depth,
                              channels=channels, dataset=dataset, negative=negative, diversity=diversity,
                              **options)
        job = self._call(self._jobs.CreateJob,
                         pb.CreateJobRequest(spec=spec, request_id=request_id or uuid.uuid4().hex))
        return self.wait(job.id, timeout=timeout) if wait else job

    def atlas_progress(self, job) -> pb.AtlasResult:
        """The atlas's progress per layer and in total, with its measured rate and ETA."""
        return self._call(self._jobs.ListAtlasUnits, atlas_units_request(job, page_size=1)).progress

    def atlas_units(self, job, *, layer: str = "", page_size: int = 0) -> Iterator[pb.AtlasUnit]:
        """Every unit of the atlas (or of one ``layer``), in order, done or not."""
        return self._pages(self._jobs.ListAtlasUnits, atlas_units_request(job, layer, page_size), "units")

    def atlas_page(self, job, *, layer: str = "", page_size: int = 0,
                   page_token: str = "") -> pb.ListAtlasUnitsResponse:
        """One page of ListAtlasUnits (its units, next_page_token and the progress)."""
        return self._call(self._jobs.ListAtlasUnits, atlas_units_request(job, layer, page_size, page_token))

    def atlas_unit_image(self, job, index: int, *, variant="render", image: int = 0) -> pb.AtlasUnitImage:
        """A finished unit with its PNG (``.png``); NOT_FOUND while it is not finished. ``variant``
        "negative" / "diversity" (or a ``pb.AtlasVariant``; with ``image``, the set's image) read the other renders."""
        return self._call(self._jobs.GetAtlasUnit, atlas_unit_request(job, index, variant, image))

    def exemplars(self, model: str, dataset: str, layer: str, channel: int, *, order: str = "max", k: int = 9,
                  size=None) -> pb.GetExemplarsResponse:
        """One channel's ranked dataset examples from the newest finished index holding ``layer`` (``size``: the
        index of that input size): ``order`` max (top by spatial max), mean (top by spatial mean) or min (bottom
        by spatial max). Each ``Exemplar``: image (sha256), name, value, x/y, ``box`` (model pixels),
        ``image_box`` (file pixels), ``whole``; :meth:`dataset_image` fetches the crop."""
        return self._call(self._datasets.GetExemplars,
                          exemplars_request(model, dataset, layer, channel, order, k, size))

    def dataset_image(self, dataset: str, image: str, *, box=None, max_side: int = 0) -> bytes:
        """One image of a set (its sha256 or name, or a pb.Exemplar) as PNG bytes: whole, or the crop of ``box``
        (x0, y0, x1, y1) in the file's pixels (an exemplar's ``image_box``), downscaled to ``max_side`` (0: the
        server's max_image_side)."""
        return self._call(self._datasets.GetDatasetImage, image_request(dataset, image, box, max_side)).png

    def _pages(self, method, request, field: str) -> Iterator:
        """The items of a paged List call, one page fetched at a time."""
        while True:
            page = self._call(method, request)
            yield from getattr(page, field)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    # ------------------------------------------------------------------------------------------- jobs

    def submit(self, model: str, objective: dict | pb.Objective | None = None, *, spec: pb.JobSpec | None = None,
               request_id: str | None = None, **options) -> pb.Job:
        """Queue a render; returns at once. ``options``: the job options, declared in
        :data:`featureviz.options.OPTIONS` (the README's options table; ``info().job_options``): steps, lr, size,
        batch, seed, param, decay, transforms, init_image, preprocess, preview_every / preview_max_side, exclusive
        (run alone: the same seed on the same device gives the same PNG bytes), judge (an uploaded classifier's
        sha256, or ``{"model": sha256, "preprocess": {...}}``: each result image's ``judge`` gives its rank of the
        image's class and its probability; ``featureviz.codec.judge_score_from_proto`` reads it), lr_schedule with
        lr_warmup, plateau / plateau_window (``job.result.stopped_at``). An unknown keyword is InvalidSpec naming the
        known ones. A retry with the same ``request_id`` returns the same job (one is generated when not given)."""
        if spec is None:
            spec = spec_to_proto(model, objective, **options)
        request = pb.CreateJobRequest(spec=spec, request_id=request_id or uuid.uuid4().hex)
        return self._call(self._jobs.CreateJob, request)

    def job(self, job: str) -> pb.Job:
        return self._call(self._jobs.GetJob, pb.GetJobRequest(job=job))

    def jobs(self, *, state: int = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0) -> Iterator[pb.Job]:
        return self._pages(self._jobs.ListJobs, pb.ListJobsRequest(page_size=page_size, state=state), "jobs")

    def cancel(self, job: str) -> pb.Job:
        return self._call(self._jobs.CancelJob, pb.CancelJobRequest(job=job))

    def watch(self, job: str, *, from_seq: int = 0, previews: bool = False, timeout: float | None = None,
              reconnects: int = 5) -> Iterator[pb.JobEvent]:
        """Events of a job until its result event: a snapshot first, then progress, previews (if asked),
        heartbeats. A dropped stream is re-attached from the last seq seen, up to ``reconnects`` times in a
        row. ``timeout``: deadline in seconds for the whole watch (DEADLINE_EXCEEDED after it)."""
        return self._follow(Reattach(job, from_seq=from_seq, previews=previews, timeout=timeout,
                                     reconnects=reconnects))

    def _follow(self, state: Reattach) -> Iterator[pb.JobEvent]:
        """The streams of one watch (CreateAndWatchJob first when ``state`` creates the job), until the result."""
        while True:
            if state.creating():
                stream = self._jobs.CreateAndWatchJob(state.create, timeout=state.remaining(),
                                                      metadata=self._metadata)
            else:
                stream = self._jobs.WatchJob(state.request(), timeout=state.remaining(), metadata=self._metadata)
            try:
                for event in stream:
                    done = state.seen(event)
                    yield event
                    if done:
                        return
            except grpc.RpcError as err:
                time.sleep(state.broken(err))
            finally:
                stream.cancel()  # leaving the loop early must not leave the call open (the job goes on)

    def wait(self, job: str, *, timeout: float | None = None,
             on_event: Callable[[pb.JobEvent], None] | None = None) -> pb.Job:
        """Watch until the job finishes; returns the finished job (with its PNG images): the stream's result event."""
        for event in self.watch(job, timeout=timeout):
            if on_event is not None:
                on_event(event)
            if event.HasField("result"):  # the finished job, as GetJob would answer (no second call)
                return event.result
        raise FeaturevizClientError("UNAVAILABLE", f"the watch of job {job} ended without a result")

    def create_and_watch(self, model: str, objective: dict | pb.Objective | None = None, *,
                         spec: pb.JobSpec | None = None, request_id: str | None = None, previews: bool = False,
                         timeout: float | None = None, reconnects: int = 5, **options) -> Iterator[pb.JobEvent]:
        """CreateAndWatchJob: one call that queues the job and streams its events (the snapshot first, whose
        ``id`` names the job). A dropped stream is re-attached as :meth:`watch` does; one that drops before the
        snapshot sends the call again with the same request id (one job either way). ``timeout``: for the
        whole watch."""
        if spec is None:
            spec = spec_to_proto(model, objective, **options)
        return self._follow(Reattach("", previews=previews, timeout=timeout, reconnects=reconnects,
                                     create=pb.CreateAndWatchJobRequest(spec=spec,
                                                                        request_id=request_id or uuid.uuid4().hex,
                                                                        include_previews=previews)))

    def run(self, model: str, objective: dict | pb.Objective | None = None, *, spec: pb.JobSpec | None = None,
            request_id: str | None = None, timeout: float | None = None,
            on_event: Callable[[pb.JobEvent], None] | None = None, **options) -> pb.Job:
        """Queue a job and wait for it: :meth:`submit` then :meth:`wait` in one call (CreateAndWatchJob, re-attached
        as :meth:`create_and_watch`). -> the finished job with its PNG images."""
        for event in self.create_and_watch(model, objective, spec=spec, request_id=request_id, timeout=timeout,
                                           **options):
            if on_event is not None:
                on_event(event)
            if event.HasField("result"):
                return event.result
        raise FeaturevizClientError("UNAVAILABLE", "the job's watch ended without a result")

"""The boundary between the server and a worker: plain data only (spec messages, bytes, events), no torch.

The server (``featureviz.server``) keeps the servicers, the store, the queue and the event log; a worker owns
the device and everything torch. They talk through :class:`Worker`:

    worker.start(sink)                  # events come back through sink(WorkerEvent), in order per job, or
                                        # sink([WorkerEvent, ...]): several at once, in order (one store commit)
    worker.load_model(sha256, source, limits)  # import an upload: -> (pb.Model, pb.ListLayersResponse)
    worker.admit(sha256, spec_bytes, priors)  # JobSpec -> the engine's spec, validated before any compute: Admission
                                        # (an exemplar index job: its layers, size, preprocess, k resolved)
    worker.submit(Submission(...))      # run it: it joins the next device step (an index job: IndexWork, one
                                        # batch per device round)
    worker.cancel(job_id)               # it leaves at the next step (a FINISHED event, CANCELLED)
    worker.exemplars(ExemplarQuery(...))   # one channel's ranked examples from a finished index file
    worker.dataset_image(ImageQuery(...))  # one stored image (or a crop of it) as PNG bytes
    worker.join_scores(JoinQuery(...))  # an atlas's dataset join: units' quantiles and their renders' scores
    worker.info() / worker.stop(grace)

Every argument and event is picklable plain data, so a worker can live in another process or on another
machine (issue 12 hosts workers on Ray). This module imports neither torch nor the engine.
"""

from __future__ import annotations

import concurrent.futures

from dataclasses import dataclass
from dataclasses import field

from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Submission", "Admission", "IndexWork", "PriorSource", "ExemplarQuery", "ImageQuery", "JoinQuery",
           "WorkerEvent", "WorkerConfig",
           "Worker", "STARTED", "PROGRESS", "PREVIEW", "FINISHED", "REQUEUED", "STEPS", "LOST"]

STARTED, PROGRESS, PREVIEW, FINISHED, REQUEUED, STEPS = "started", "progress", "preview", "finished", "requeued", \
    "steps"
LOST = "lost"  # the worker running the job died (a Ray actor): the server queues it again, from step 0


@dataclass
class WorkerConfig:
    """``device``: cuda, cuda:N, cpu or None (cuda when available). ``max_step_images``: the most images in one
    device step (None: the device's default, :func:`featureviz.worker.device.default_step_images`).
    ``progress_interval``: at most one progress event per job every so many seconds, plus the last step;
    ``max_progress_rate``: at most so many a second over all the jobs (each job's interval grows with the jobs).
    ``threads``: torch CPU threads. ``cache_dir``: the importer's cache. ``models_kept``: imported models held in
    memory. ``time_slice_steps`` and ``max_job_memory_bytes``: the server's Limits of those names."""

    device: str | None = None
    max_step_images: int | None = None
    progress_interval: float = 0.25
    max_progress_rate: float = 256.0  # progress events a second over all the worker's jobs (0: no bound)
    threads: int | None = None
    cache_dir: str | None = None
    models_kept: int = 4
    max_image_side: int = 4096  # an init image larger than this is refused from its header (the server passes its
    # Limits.max_image_side; the default is the engine's MAX_DECODE_SIDE)
    max_dataset_image_side: int = 8192  # an index job decodes a set's image up to this side (Limits of that name)
    time_slice_steps: int = 64  # when jobs wait, a running job yields its place after this many steps
    max_job_memory_bytes: int | None = None  # a job whose measured memory exceeds this is refused at admission
    max_atlas_units: int | None = None  # an atlas with more units is refused at admission (Limits of that name)


@dataclass
class IndexWork:
    """What an exemplar index job reads and writes, resolved by the server (plain data). ``names`` and ``paths``:
    the set's images in its order (names as in the set, each file at the server store's ``image_path``: a worker
    in another process or on another machine needs the store's folder mounted at the same path).
    ``state_path``: the unfinished pass's state (saved after each chunk of ``chunk_images``, what a rerun
    resumes); ``final_path``: the finished index (``ExemplarIndex.save``, atomic). ``layers`` (catalog names),
    ``size`` (H, W), ``preprocess`` ({mean, std, channel_order}), ``k`` and ``batch_size`` as admission resolved
    them (the job's stored spec records them)."""

    index: str
    dataset: str
    names: list[str]
    paths: list[str]
    state_path: str
    final_path: str
    layers: list[str]
    size: tuple[int, int]
    preprocess: dict
    k: int
    batch_size: int
    chunk_images: int = 256


@dataclass
class PriorSource:
    """A dataset a job learns a prior from (``JobSpec.prior_dataset``, ``prior:DATASET`` terms), resolved by the
    server for the job's tenant (plain data). ``names`` and ``paths``: its images in the set's order (files at the
    server store's ``image_path``, as :class:`IndexWork`'s); ``folder``: where the worker caches what it learns
    from the set (the store's ``prior_dir``: built from the checked dataset id, never from a client string)."""

    dataset: str
    names: list[str]
    paths: list[str]
    folder: str


@dataclass
class MatchSource:
    """An exemplar index that a job's ``match`` terms read (exemplar matching), resolved by the server for the job's
    tenant: the finished index file (``Store.index_path``) and its set's images in the set's order (names, and each
    file at the store's ``image_path``: with Ray the store's folders are mounted at the same path)."""

    index: str
    index_path: str
    names: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@dataclass
class Submission:
    """A job for the worker. ``spec`` is the serialized ``featureviz.v1.JobSpec`` as stored (defaults filled in);
    ``ticket`` names the checked engine spec :meth:`Worker.admit` prepared (checked once; the job's slot takes it),
    "" to check again (a job re-queued after a restart)."""

    job_id: str
    tenant: str
    model: str
    spec: bytes
    images: int = 1
    exclusive: bool = False
    ticket: str = ""
    index: IndexWork | None = None  # an exemplar index job (JobSpec.exemplar_index): what it reads and writes
    # an atlas unit: it takes only the room interactive jobs leave in a device step (parked as soon as one wants it)
    background: bool = False
    # the datasets the job learns priors from (dataset id -> PriorSource): read when the spec is checked again
    priors: dict = field(default_factory=dict)
    # exemplar matching: index id -> MatchSource for the spec's match terms (a job checked again needs them)
    matches: dict | None = None


@dataclass
class Admission:
    """What :meth:`Worker.admit` found: the engine defaults the job runs with, and the ticket of its engine spec.
    An exemplar index job (``kind == "exemplar_index"``, no ticket) gets what it resolved against the model:
    ``layers`` (catalog names), ``size`` (H, W), ``preprocess`` ({mean, std, channel_order}), ``k``,
    ``batch_size`` and ``channels`` (the total over the layers): the server's index key is built from them."""

    ticket: str
    steps: int = 0
    batch: int = 0
    seed: int = 0
    kind: str = "render"
    layers: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    preprocess: dict | None = None
    k: int = 0
    batch_size: int = 0
    channels: int = 0
    # an atlas job (kind "atlas", no ticket): per selected layer (catalog order) its unit count and depth
    units: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)


@dataclass
class ExemplarQuery:
    """GetExemplars for the worker: the finished index file (``Store.index_path``), the model it was built with
    (sha256: the receptive field is computed with it the first time), the layer (catalog name, checked by the
    server), the channel, ``order`` ("max" | "mean" | "min") and ``k`` (checked by the server)."""

    index_path: str
    model: str
    layer: str
    channel: int
    order: str
    k: int


@dataclass
class ImageQuery:
    """GetDatasetImage for the worker: a stored image file, ``box`` (x0, y0, x1, y1) in its pixels, end exclusive,
    already checked against its size by the server (None: the whole image), the output's ``max_side`` and the
    largest side decoded (read from the header before any pixel: ``Limits.max_dataset_image_side``)."""

    path: str
    box: tuple[int, int, int, int] | None
    max_side: int
    max_decode_side: int


@dataclass
class JoinQuery:
    """An atlas's dataset join for the worker: a finished index file, the model it was built with, one layer
    (catalog name, in the index) and its units as ``(channel, render PNG)``. The answer
    (:meth:`Worker.join_scores`): per unit ``(p50, p99, max, render_score)``: the channel's quantiles of the
    spatial max over the set, and the render's spatial max put through the model as a set's image is."""

    index_path: str
    model: str
    layer: str
    units: list[tuple[int, bytes]]


@dataclass
class WorkerEvent:
    """One event of a job (or, for ``kind == STEPS``, of the device). ``state`` is a ``pb.JobState`` for FINISHED
    (SUCCEEDED, FAILED, CANCELLED) with ``result`` and/or ``error``; ``steps`` holds (images, seconds) per device
    step since the last STEPS event."""

    kind: str
    job_id: str = ""
    progress: pb.Progress | None = None
    preview: pb.Preview | None = None
    state: int = 0
    result: pb.JobResult | None = None
    error: pb.JobError | None = None
    steps: list[tuple[int, float]] = field(default_factory=list)
    worker: str = ""  # the worker's id on STARTED and STEPS ("": the embedded worker, "local")


class Worker:
    """The interface a worker implements (see the module docstring). ``max_step_images`` is the most images the
    worker runs in one device step; the server grants it jobs up to that many images at once."""

    max_step_images: int = 1

    def start(self, sink) -> None:
        raise NotImplementedError

    def load_model(self, sha256: str, source, limits: dict | None = None) -> tuple[pb.Model, pb.ListLayersResponse]:
        """Import an uploaded model (bytes or a path) within ``limits`` (ImportLimits keywords; None: none)."""
        raise NotImplementedError

    def drop_model(self, sha256: str) -> None:
        raise NotImplementedError

    def admit(self, sha256: str, spec: bytes, priors: dict | None = None, matches: dict | None = None) -> Admission:
        """Check a job's spec before any compute. ``priors``: dataset id -> :class:`PriorSource`, every dataset the
        spec learns a prior from (checked by the server: the tenant holds each); their statistics and patch priors
        are computed here on first use (in the caller's thread, not the device loop) and cached. ``matches``: index
        id -> :class:`MatchSource` for the spec's ``match`` terms (None: no such term)."""
        raise NotImplementedError

    def admit_future(self, sha256: str, spec: bytes, priors: dict | None = None,
                     matches: dict | None = None) -> concurrent.futures.Future | None:
        """As :meth:`admit`, started without blocking: -> a future of its Admission (or of its error), or None where
        the worker answers only in the caller's thread (the caller then calls :meth:`admit` in a thread). The worker
        process answers by message, so a burst of CreateJobs holds no thread per admission in flight; the in-process
        worker answers an admission that waits for nothing at once (a done future)."""
        return None

    def submit(self, submission: Submission) -> None:
        raise NotImplementedError

    def cancel(self, job_id: str) -> None:
        raise NotImplementedError

    def exemplars(self, query: ExemplarQuery) -> pb.GetExemplarsResponse:
        """One channel's ranked examples (``featureviz.worker.queries.exemplars``): values, positions and crop boxes
        in model and file pixels, the channel's quantiles and the layer's field. The server fills the images'
        sha256 (the index knows their names)."""
        raise NotImplementedError

    def dataset_image(self, query: ImageQuery) -> pb.DatasetImageData:
        """The image (or the crop of ``query.box``) decoded and downscaled to ``query.max_side``, as PNG bytes
        with its width and height (``featureviz.worker.queries.dataset_image``)."""
        raise NotImplementedError

    def join_scores(self, query: JoinQuery) -> list[tuple[float, float, float, float]]:
        """An atlas's dataset join (``featureviz.worker.queries.Queries.join_scores``): per unit of the query
        ``(p50, p99, max, render_score)``."""
        raise NotImplementedError

    def device(self) -> pb.Device:
        raise NotImplementedError

    def info(self) -> pb.WorkerInfo:
        raise NotImplementedError

    def workers(self) -> list[pb.WorkerInfo]:
        """Every worker behind this interface (one here; one per actor for a Ray pool), with id, node and pid."""
        import os
        import socket

        info = self.info()
        info.id, info.node, info.pid, info.up = info.id or "local", info.node or socket.gethostname(), \
            info.pid or os.getpid(), True
        return [info]

    def admitting(self, count: int) -> None:
        """``count`` admissions are in flight on the server (CreateJob calls between their checks and their submit):
        jobs that arrive within moments. A worker may hold the start of a step for them (:class:`LocalWorker`: see
        :func:`featureviz.worker.planner.hold`); by default this is ignored."""

    def stop(self, grace: float) -> None:
        """Let running jobs finish for ``grace`` seconds, then stop the rest (REQUEUED events); blocking."""
        raise NotImplementedError

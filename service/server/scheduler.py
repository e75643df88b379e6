"""The scheduler: one worker thread owns the device and runs the engine, one job at a time.

- Jobs come from the store (SQLite rows). The next job is the oldest queued job of the tenant served least
  recently, so one tenant's burst does not starve the others (round robin across tenants, FIFO within
  one). On start the scheduler
  re-queues every job it finds QUEUED or RUNNING (a crash or a stop left them so): with the job's seed the
  rerun gives the same images.
- Each job has a :class:`JobLog`: events with sequence numbers, appended by the worker thread and read by
  watchers on the event loop, which are woken through ``call_soon_threadsafe`` (the loop never blocks on
  the worker). ``last_seq`` is persisted, so sequence numbers keep growing across restarts.
- Cancel sets a flag the render loop polls every step. Stopping the server lets the running job finish
  within ``grace_seconds``, else stops it and leaves it QUEUED for the next start.
- A job that raises ends FAILED with a typed :class:`featureviz.v1.JobError`; the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import threading
import time

from featureviz.client.convert import spec_from_proto
from featureviz.errors import FailedPrecondition
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.server.errors import job_error
from featureviz.server.store import TERMINAL_STATES
from featureviz.server.store import Store
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Scheduler", "JobLog", "ModelCache"]

log = logging.getLogger("featureviz.server")

DEFAULT_PREVIEW_SIDE = 128


class JobLog:
    """The events of one job. ``append`` may be called from any thread; ``waiter``/``since`` on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, start_seq: int = 0, on_seq=None):
        self._loop = loop
        self._lock = threading.Lock()
        self._events: list[pb.JobEvent] = []
        self._seq = start_seq
        self._on_seq = on_seq
        self._changed = asyncio.Event()
        self.finished = False

    @property
    def last_seq(self) -> int:
        return self._seq

    def append(self, **fields) -> pb.JobEvent:
        with self._lock:
            self._seq += 1
            event = pb.JobEvent(seq=self._seq, **fields)
            event.time.GetCurrentTime()
            self._events.append(event)
            if event.HasField("result"):
                self.finished = True
        if self._on_seq is not None:
            self._on_seq(event.seq)
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is watching any more
            pass
        return event

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def waiter(self) -> asyncio.Event:
        """An event set at the next append. Take it *before* calling ``since`` so no append is missed."""
        return self._changed

    def since(self, seq: int, *, previews: bool) -> list[pb.JobEvent]:
        with self._lock:
            return [e for e in self._events if e.seq > seq and (previews or not e.HasField("preview"))]


class ModelCache:
    """Imported models by sha256, least recently used dropped first. Loads happen outside the lock."""

    def __init__(self, store: Store, size: int):
        self._store = store
        self._size = max(1, size)
        self._models: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def put(self, sha256: str, model) -> None:
        with self._lock:
            self._models[sha256] = model
            self._models.move_to_end(sha256)
            while len(self._models) > self._size:
                self._models.popitem(last=False)

    def get(self, sha256: str):
        with self._lock:
            if sha256 in self._models:
                self._models.move_to_end(sha256)
                return self._models[sha256]
            loading = self._loading.setdefault(sha256, threading.Lock())
        with loading:  # one import per model even when several callers ask at once
            with self._lock:
                if sha256 in self._models:
                    return self._models[sha256]
            from featureviz.importer import ImportLimits
            from featureviz.importer import import_model

            data = self._store.read_model_file(sha256)  # checked against its sha256: MODEL_CORRUPT, MODEL_FILE_MISSING
            # the size limits were checked when the model was uploaded: a stored model always loads again
            model = import_model(data, cache_dir=str(self._store.root / "cache"), limits=ImportLimits.unbounded())
            self.put(sha256, model)
            return model

    def __len__(self) -> int:
        return len(self._models)

    def drop(self, sha256: str) -> None:
        with self._lock:
            self._models.pop(sha256, None)


class Scheduler:
    def __init__(self, store: Store, *, loop: asyncio.AbstractEventLoop, device: str | None = None,
                 model_cache_size: int = 4, finished_logs_kept: int = 256):
        self.store = store
        self.models = ModelCache(store, model_cache_size)
        self._loop = loop
        self._device = device
        self._cv = threading.Condition()
        self._queue: collections.deque[str] = collections.deque()  # arrival order
        self._tenant_of: dict[str, str] = {}
        self._served: dict[str, int] = {}  # tenant -> turn it was last served
        self._turn = 0
        self._logs: collections.OrderedDict[str, JobLog] = collections.OrderedDict()
        self._finished_logs_kept = finished_logs_kept
        self._running: str | None = None
        self._cancel = threading.Event()
        self._progress: dict[str, tuple[int, int, list[float]]] = {}
        self._stopping = False
        self._shutdown = threading.Event()  # stop the running job now and leave it QUEUED
        self._thread = threading.Thread(target=self._work, name="featureviz-scheduler", daemon=True)
        self.metrics = None  # a featureviz.server.metrics.Metrics, when the server exports metrics

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Re-queue what a previous run left QUEUED or RUNNING, then start the worker."""
        for row in self.store.unfinished_jobs():
            if row.state == pb.JOB_STATE_RUNNING:
                self.store.mark_queued(row.id)
                self.log(row.id).append(state=pb.JOB_STATE_QUEUED)
                log.info("re-queued job %s (was running when the server stopped)", row.id)
            self._queue.append(row.id)
            self._tenant_of[row.id] = row.tenant
        self._thread.start()

    def stop_accepting(self) -> None:
        """From now on ``stopping`` is True (new jobs are refused) and the worker starts no other job."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()

    def stop(self, grace: float) -> None:
        """Blocking: let the running job finish for ``grace`` seconds, then stop it (it stays QUEUED)."""
        self.stop_accepting()
        self._thread.join(timeout=max(0.0, grace))
        if self._thread.is_alive():
            self._shutdown.set()
            self._cancel.set()
            self._thread.join()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------------------------------------- requests

    def submit(self, job_id: str, tenant: str) -> None:
        with self._cv:
            self._queue.append(job_id)
            self._tenant_of[job_id] = tenant
            self._cv.notify()

    def _next(self) -> str:
        """Pop the oldest job of the tenant served least recently (call with the lock held)."""
        firsts: dict[str, str] = {}
        for job_id in self._queue:
            firsts.setdefault(self._tenant_of.get(job_id, ""), job_id)
        tenant = min(firsts, key=lambda t: self._served.get(t, -1))
        job_id = firsts[tenant]
        self._queue.remove(job_id)
        self._tenant_of.pop(job_id, None)
        self._turn += 1
        self._served[tenant] = self._turn
        return job_id

    def is_running(self, job_id: str) -> bool:
        """Whether the worker holds this job (from pick-up until its result event is in the log)."""
        with self._cv:
            return self._running == job_id

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def cancel(self, job_id: str, tenant: str) -> pb.Job:
        with self._cv:
            row = self.store.get_job(job_id, tenant)
            if job_id == self._running:
                self._cancel.set()
            elif job_id in self._queue:
                self._queue.remove(job_id)
                self._tenant_of.pop(job_id, None)
                self.store.finish_job(job_id, pb.JOB_STATE_CANCELLED)
                self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
                if self.metrics is not None:
                    self.metrics.jobs.labels("cancelled").inc()
            elif row.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED):
                raise FailedPrecondition(f"job {job_id} already finished ({pb.JobState.Name(row.state)}); "
                                         "nothing to cancel", reason="JOB_FINISHED")
        return self.job(job_id, tenant)

    def job(self, job_id: str, tenant: str | None, *, with_images: bool = True) -> pb.Job:
        """The stored job with the live progress of a running one and the queue position of a queued one."""
        with self._cv:  # progress before the row: a job that ends in between reads as finished, not as step 0
            progress = self._progress.get(job_id)
        row = self.store.get_job(job_id, tenant)
        job = row.to_proto(with_images=with_images)
        with self._cv:
            if job.state == pb.JOB_STATE_QUEUED and job_id in self._queue:
                job.queue_position = self._queue.index(job_id)
        if progress is not None and job.state == pb.JOB_STATE_RUNNING:
            job.step, job.steps = progress[0], progress[1]
            job.objective[:] = progress[2]
        log_ = self._logs.get(job_id)
        if log_ is not None:
            job.last_seq = max(job.last_seq, log_.last_seq)
        return job

    def log(self, job_id: str) -> JobLog:
        with self._cv:
            found = self._logs.get(job_id)
            if found is None:
                row = self.store.get_job(job_id)
                found = JobLog(self._loop, row.last_seq, on_seq=lambda seq: self.store.set_last_seq(job_id, seq))
                self._logs[job_id] = found
                self._evict_logs()
            return found

    def _evict_logs(self) -> None:
        finished = [job_id for job_id, lg in self._logs.items() if lg.finished]
        for job_id in finished[: max(0, len(finished) - self._finished_logs_kept)]:
            del self._logs[job_id]

    def validate(self, model_sha: str, spec: pb.JobSpec):
        """Everything the engine can check before compute (unknown layer, channel range ...). Blocking.
        Returns the engine's RenderSpec (with its defaults filled in)."""
        model = self.models.get(model_sha)
        render_spec = _render_spec(model, spec, self._device)
        _engine().validate(model, render_spec)
        return render_spec

    # ------------------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job_id = self._next()
                self._running = job_id
                self._cancel.clear()
            try:
                self._run(job_id)
            except Exception:  # the store itself failed: log and keep serving
                log.exception("job %s: scheduler error", job_id)
            finally:
                with self._cv:
                    self._running = None
                    self._progress.pop(job_id, None)

    def _run(self, job_id: str) -> None:
        row = self.store.get_job(job_id)
        if row.state in TERMINAL_STATES:
            return
        events = self.log(job_id)
        self.store.mark_running(job_id)
        events.append(state=pb.JOB_STATE_RUNNING)
        spec = pb.JobSpec.FromString(row.spec)
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.queue_seconds.observe(max(0.0, time.time() - row.create_time))
        outcome = self._execute(job_id, row, spec, events)
        if self.metrics is not None:
            self.metrics.jobs.labels(outcome).inc()
            self.metrics.run_seconds.observe(time.perf_counter() - started)
        log.info("job %s %s in %.1f s", job_id, outcome, time.perf_counter() - started)
        if outcome != "requeued":
            events.append(result=self.store.get_job(job_id).to_proto())

    def _execute(self, job_id: str, row, spec: pb.JobSpec, events: JobLog) -> str:
        """Run one job and store how it ended; -> outcome: succeeded, failed, cancelled or requeued."""
        try:
            model = self.models.get(row.model)
            render_spec = _render_spec(model, spec, self._device)
            result = self._render(job_id, model, render_spec, spec, events)
        except Exception as exc:
            if not isinstance(exc, FeaturevizError):
                log.exception("job %s failed", job_id)
            error = job_error(exc)
            if error.reason == "GPU_OOM":
                _empty_device_cache()
            self.store.finish_job(job_id, pb.JOB_STATE_FAILED, error=error)
            if self.metrics is not None:
                self.metrics.failures.labels(error.reason).inc()
            return "failed"
        if result.cancelled and self._shutdown.is_set():
            self.store.mark_queued(job_id)  # the next start runs it again from step 0
            events.append(state=pb.JOB_STATE_QUEUED)
            return "requeued"
        state = pb.JOB_STATE_CANCELLED if result.cancelled else pb.JOB_STATE_SUCCEEDED
        self.store.finish_job(job_id, state, result=_job_result(result))
        return "cancelled" if result.cancelled else "succeeded"

    def _render(self, job_id: str, model, render_spec, spec: pb.JobSpec, events: JobLog):
        steps = render_spec.steps
        every = spec.preview_every
        side = spec.preview_max_side or DEFAULT_PREVIEW_SIDE
        last = [time.perf_counter()]

        def progress(step: int, total: int, objective) -> None:
            now = time.perf_counter()
            values = objective.tolist()  # a CPU tensor on CUDA too (the engine copies it without a sync)
            with self._cv:
                self._progress[job_id] = (step, steps, values)
            events.append(progress=pb.Progress(step=step, steps=total, objective=values,
                                               seconds_per_step=now - last[0]))
            if self.metrics is not None:
                self.metrics.step_seconds.observe(now - last[0])
            last[0] = now

        def snapshot(step: int, images) -> None:
            previews = [_rendered(i, image, max_side=side) for i, image in enumerate(images)]
            events.append(preview=pb.Preview(step=step, images=previews))

        if every > 0:
            render_spec.snapshot_steps = tuple(range(every, steps + 1, every))
        return _engine().render(model, render_spec, progress=progress, snapshot=snapshot if every > 0 else None,
                      cancel=self._cancel.is_set)


# ------------------------------------------------------------------------------------------------ engine glue


def _engine():
    """featureviz.engine (render, validate, RenderSpec), imported on first use: torch loads only then."""
    import featureviz.engine as engine

    if not hasattr(engine, "RenderSpec"):  # the package does not re-export them (yet)
        from featureviz.engine import render as engine
    return engine


def _render_spec(model, spec: pb.JobSpec, device: str | None):
    """pb.JobSpec -> engine RenderSpec (decodes the init image, builds the Preprocess)."""
    kwargs = spec_from_proto(spec)
    if "init_image" in kwargs:
        size = kwargs.get("size") or tuple(model.input_spec.default_size)
        kwargs["init_image"] = _decode_image(kwargs["init_image"], size)
    if "preprocess" in kwargs:
        from featureviz.importer import Preprocess

        p = kwargs["preprocess"]
        try:
            kwargs["preprocess"] = Preprocess(mean=tuple(p["mean"]), std=tuple(p["std"]),
                                              channel_order=p["channel_order"])
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec.preprocess", str(exc)) from exc
    return _engine().RenderSpec(**kwargs, device=device)


def _decode_image(data: bytes, size: tuple[int, int]):
    """PNG/JPEG bytes -> float tensor (3, H, W) in [0, 1], resized to the render size (H, W)."""
    from featureviz.engine.images import decode_image

    return decode_image(data, size, field="spec.init_image")


def _png(image, max_side: int | None = None) -> tuple[bytes, int, int]:
    """(3, H, W) float tensor in [0, 1] -> PNG bytes, width, height (downscaled to ``max_side``)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    pil = Image.fromarray(array, mode="RGB")
    if max_side and max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue(), pil.size[0], pil.size[1]


def _rendered(index: int, image, *, max_side: int | None = None, start: float = 0.0, end: float = 0.0):
    png, width, height = _png(image, max_side)
    return pb.RenderedImage(index=index, png=png, width=width, height=height, objective_start=start, objective_end=end)


def _job_result(result) -> pb.JobResult:
    images = [
        _rendered(i, image, start=float(result.objective_start[i]), end=float(result.objective_end[i]))
        for i, image in enumerate(result.images)
    ]
    out = pb.JobResult(images=images, steps_done=int(result.steps_done),
                       seconds_per_step=float(result.seconds_per_step),
                       objective_description=str(getattr(result, "objective", "") or ""))
    for key, value in (result.phase_seconds or {}).items():
        out.phase_seconds[key] = float(value)
    return out


def _empty_device_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory must never fail the worker
        log.exception("emptying the CUDA cache failed")

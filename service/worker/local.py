"""The in-process worker: one device thread runs batched device steps, one output thread encodes and emits events.

Admission (``admit``) checks a job's spec once: the :class:`featureviz.engine.CheckedSpec` (objective built,
transforms parsed) is kept with the ticket, and the job's slot takes that very object (a re-queued job whose
ticket is gone is checked again).

Device thread, each round:
  0. calls queued for the device thread run first (admission's memory probes: they share the engine); then, while
     a burst of jobs arrives (the server admits more: ``admitting``; or submissions keep coming) and new jobs wait
     to join, the round may wait for them (:func:`featureviz.worker.planner.hold`: a burst starts as one step);
  1. new submissions become slots (waiting to join), cancelled jobs leave (parked ones too);
  2. :func:`featureviz.worker.planner.schedule`, a pure function of a snapshot of the worker, plans the step:
     time slicing (:func:`featureviz.worker.slices.plan`: when the granted jobs hold more than
     ``max_step_images`` images, at most that many step; a job that has taken ``time_slice_steps`` steps since it
     last waited is parked, its slot keeping its parameters, Adam moments, generators and schedule state, still
     RUNNING, and waiting jobs take its place, tenant by tenant), the joiners that memory admission lets in (else
     they wait and the others step), the next group in round-robin order (the same model, model input size and
     layout; an exclusive job is a group of its own) and its chunks of at most ``max_step_images`` images (fewer
     after an out of memory split); every active job advances one step per round whatever its group;
  3. the loop applies the plan: parks and activates, joins (a STARTED event each; the joiners of one group get
     their starting objective in one forward), steps the chunks (one per job when the group's rows are not
     independent);
  4. an error in a chunk of several slots (out of memory or anything else) splits the chunk in two and retries
     each half (out of memory also lowers the group's chunk size: :func:`featureviz.worker.planner.shrink`); a
     slot that fails alone ends FAILED (GPU_OOM for out of memory) and the others keep running;
  5. slots that are done, cancelled or diverged leave: their final objective, images and result.

Exemplar index jobs (a Submission with ``index``): an :class:`featureviz.engine.exemplars.IndexPass` each (its
decode thread pool reads the set's files ahead of the forward passes); every round, after the render group's step,
ONE index job runs ONE batch (index jobs in turn), so a render job submitted while a long pass runs starts within one
round. The pass saves its state after each chunk (``IndexWork.state_path``) and resumes from it when the job runs
again (a cancel, a stop or a killed server keep it); when done the index is saved at ``IndexWork.final_path`` and
the partial state removed. Progress: images done of the set's images. Not in the planner's time slicing or memory
planner: one batch of a forward pass in inference mode (``batch_size`` at most ``Limits.max_index_batch``); admission
refuses a pass whose decoded batches exceed ``max_job_memory_bytes`` (:meth:`LocalWorker._check_index_memory`).

Memory (featureviz.worker.device): admission measures a job's memory with a probe (CPU and CUDA) and refuses one
above ``max_job_memory_bytes`` or the device's usable memory (RESOURCE_EXHAUSTED, JOB_TOO_LARGE).

Progress is coalesced per job: at most one PROGRESS event every ``progress_interval`` seconds, plus the last
step; and at most ``max_progress_rate`` a second over all the jobs: with more jobs than the rate x the interval, each
job's interval is jobs / rate seconds (256 tiny jobs in one step sent 9 progress events each in 2.3 s, and each cost
the server, the network and every watcher ~0.3 ms of CPU: bench/RESULTS.md). ``progress_interval`` 0 (every step)
is never bounded.

PNG encoding never runs on the device thread: a small pool encodes (Pillow and torch release the GIL, so
the images of the jobs that end in one round encode side by side instead of one after another), and the output
thread emits the events in their order, each once its PNGs are ready. A result that cannot be encoded ends its
job FAILED instead of losing its FINISHED event.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
import uuid

import torch

from featureviz.engine.batch import BatchEngine
from featureviz.engine.batch import CheckedSpec
from featureviz.engine.batch import Slot
from featureviz.errors import InvalidSpec
from featureviz.errors import ResourceExhausted
from featureviz.errors import job_error
from featureviz.phases import phase
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import adapter
from featureviz.worker import api
from featureviz.worker import device as devices
from featureviz.worker import planner
from featureviz.worker.matching import MatchResolver
from featureviz.worker.models import ModelCache
from featureviz.worker.priors import Priors
from featureviz.worker.models import describe_model
from featureviz.worker.queries import Queries
from featureviz.worker.queries import dataset_image

__all__ = ["LocalWorker"]

log = logging.getLogger("featureviz.worker")
_TICKETS_KEPT = 1024
_EVENTS_PER_BATCH = 1024  # events handed to the sink at once, at most
_ENCODERS = max(1, min(4, (os.cpu_count() or 1) - 1))  # PNG encoding threads (the device thread keeps a core)
# JobSpec fields whose admission may import another model or resolve a whole model's units (and init_image: a decode):
# never admitted on the caller's thread (LocalWorker.admit_future)
_SLOW_FIELDS = ("atlas", "exemplar_index", "judge", "generator")


class _Job:
    def __init__(self, sub: api.Submission, spec: pb.JobSpec, checked: CheckedSpec, slot: Slot, group: tuple):
        self.sub, self.spec, self.checked, self.slot, self.group = sub, spec, checked, slot, group
        self.last: tuple[int, object] | None = None  # (step, values) of the latest step
        self.emitted = 0  # last step sent as a PROGRESS event
        self.emitted_at = time.perf_counter()
        self.started = False
        self.active = False  # in the device steps now (else waiting to join, or parked)
        self.ran = 0  # steps since it last became active
        self.since = 0  # the worker's tick when it last started to wait
        self.memory: tuple[float, float] | None = None  # (fixed, per image) bytes; None: unknown
        self.measured = False

    def state(self, *, joined: bool) -> planner.JobState:
        return planner.JobState(self.sub.job_id, self.sub.tenant, self.slot.batch, self.group, joined=joined,
                                active=self.active, ran=self.ran, since=self.since, memory=self.memory,
                                background=self.sub.background)


class _IndexJob:
    """A running exemplar index job: its submission and its pass."""

    def __init__(self, sub: api.Submission, run):
        self.sub, self.run = sub, run
        self.emitted = 0
        self.emitted_at = time.perf_counter()


class LocalWorker(api.Worker):
    def __init__(self, config: api.WorkerConfig, *, model_source):
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.torch_device = devices.resolve_device(config.device)
        self.max_step_images = config.max_step_images or devices.default_step_images(self.torch_device)
        self.slice_steps = max(1, int(config.time_slice_steps))
        self.interval = max(0.0, float(config.progress_interval))
        self.rate = max(0.0, float(config.max_progress_rate))
        self._device_pb = devices.describe_device(self.torch_device)
        self.models = ModelCache(model_source, size=config.models_kept, cache_dir=config.cache_dir,
                                 on_drop=self._forget)
        self.engine = BatchEngine(self.torch_device)
        self.queries = Queries(self.models, on_device=self._on_device)
        self.priors = Priors()  # the datasets' learned priors, cached with each set
        self.matching = MatchResolver(self.queries, on_device=self._on_device, device=self.torch_device,
                                      max_side=config.max_image_side)  # exemplar matching's targets
        self.memory_planner = devices.MemoryPlanner(self.torch_device)
        self._fault = devices.fault_hook()
        self._cv = threading.Condition()
        self._incoming: list[api.Submission] = []
        self._cancels: set[str] = set()
        self._forgotten: list = []
        self._tickets: collections.OrderedDict[str, tuple[str, object]] = collections.OrderedDict()
        self._jobs: dict[str, _Job] = {}  # joined (STARTED): active, or parked by time slicing
        self._waiting: list[_Job] = []  # prepared, waiting to join (their turn, or memory)
        self._indexes: dict[str, _IndexJob] = {}  # exemplar index jobs, stepped in turn (insertion order)
        self._calls: list[tuple] = []  # (function, future) to run on the device thread
        self._admitting = 0  # admissions in flight on the server (admitting): a step may wait for them (planner.hold)
        self._last_step = 0.0  # seconds of the last device step
        self._arrived_at = 0.0  # when the last submission came (perf_counter)
        self._device_done = False
        self._tick = 0  # rounds of planning: orders the waits
        self._served: dict[str, int] = {}  # tenant -> tick it last had a job activated
        self._order: collections.deque[tuple] = collections.deque()  # group keys, round robin
        self._caps: dict[tuple, int] = {}  # group key -> images per chunk after an out-of-memory split
        self._stats: list[tuple[int, float]] = []
        self._stats_at = time.perf_counter()
        self._stopping = False
        self._shutdown = False
        self._holding = False  # the device thread waits in _hold for admissions in flight
        self._out: queue.Queue = queue.Queue()
        self._encoder = concurrent.futures.ThreadPoolExecutor(_ENCODERS, thread_name_prefix="featureviz-png")
        # admit_future's admissions that wait for a memory probe (the device thread's)
        self._admitter = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="featureviz-admit")
        self._sink = None
        self._device_thread = threading.Thread(target=self._run, name="featureviz-device", daemon=True)
        self._output_thread = threading.Thread(target=self._emit_loop, name="featureviz-events", daemon=True)

    # ------------------------------------------------------------------------------------------- interface

    def start(self, sink) -> None:
        self._sink = sink
        self._output_thread.start()
        self._device_thread.start()

    def load_model(self, sha256: str, source, limits: dict | None = None) -> tuple[pb.Model, pb.ListLayersResponse]:
        size = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
        model = self.models.get(sha256, source, limits=limits)
        return describe_model(model, sha256, size)

    def drop_model(self, sha256: str) -> None:
        self.models.drop(sha256)

    def admit(self, sha256: str, spec: bytes, priors: dict | None = None,
              matches: dict | None = None) -> api.Admission:
        job_spec, model = pb.JobSpec.FromString(spec), self.models.get(sha256)
        if job_spec.HasField("atlas") or job_spec.HasField("exemplar_index"):
            return self._admit_other(job_spec, model, priors)
        return self._admitted(sha256, model, self._checked(sha256, job_spec, model, priors, matches))

    def admit_future(self, sha256: str, spec: bytes, priors: dict | None = None,
                     matches: dict | None = None) -> concurrent.futures.Future | None:
        """A render whose admission imports, fits and decodes nothing (its model held in memory; no prior, match,
        judge, generator or init image) is checked now, on the caller's thread: on a CPU the check takes ~0.07 ms
        and a hop to a thread and back ~0.1-0.2 ms more. Its memory measured already: a done future; not yet: the
        probe (on the device thread) is awaited in a thread of this worker, with the spec checked once all the
        same. Any other job: None (the caller admits in a thread: an import or a prior's fit may take seconds)."""
        if priors or matches:
            return None
        model = self.models.held_model(sha256)
        if model is None:
            return None
        job_spec = pb.JobSpec.FromString(spec)
        if job_spec.init_image or any(job_spec.HasField(name) for name in _SLOW_FIELDS):
            return None
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            checked = self._checked(sha256, job_spec, model)
            if not self._measured(model, checked):
                try:
                    return self._admitter.submit(self._admitted, sha256, model, checked)
                except RuntimeError:  # stopped: the caller's thread admits it
                    return None
            future.set_result(self._admitted(sha256, model, checked))
        except Exception as exc:  # the caller gets it, as from admit()
            future.set_exception(exc)
        return future

    def _admit_other(self, job_spec: pb.JobSpec, model, priors: dict | None) -> api.Admission:
        """An atlas's or an exemplar index's admission."""
        self._not_a_generator(model)
        if job_spec.HasField("atlas"):  # resolved against the model: its units (each checked when it is submitted)
            admission = adapter.atlas_admission(model, job_spec, max_units=self.config.max_atlas_units)
            unit = pb.JobSpec()
            unit.CopyFrom(job_spec)
            unit.ClearField("atlas")
            unit.size.height, unit.size.width = admission.size
            unit.objective.channel.layer, unit.objective.channel.channel = admission.layers[0], 0
            # a prior_dataset is learned here, on this call's thread, not by the first unit on the device thread
            adapter.checked_spec(model, unit, str(self.torch_device), max_image_side=self.config.max_image_side,
                                 priors=priors, learned=self.priors, models=self.models.get)
            return admission
        admission = adapter.index_admission(model, job_spec)  # resolved against the model before any compute
        self._check_index_memory(admission)
        return admission  # no ticket

    @staticmethod
    def _not_a_generator(model) -> None:
        if getattr(model, "generator", None) is not None:  # --- generator (issue 25): any kind of job
            raise InvalidSpec("spec.model", "this model is a generator (a latent vector in, an image out): render a "
                                            "classifier, and name the generator as spec.generator with param "
                                            "generator")

    def _checked(self, sha256: str, job_spec: pb.JobSpec, model, priors: dict | None = None,
                 matches: dict | None = None) -> CheckedSpec:
        """A render's spec checked against its model (and its judge's)."""
        self._not_a_generator(model)
        checked = adapter.checked_spec(model, job_spec, str(self.torch_device),
                                       max_image_side=self.config.max_image_side, priors=priors, learned=self.priors,
                                       models=self.models.get,
                                       match_targets=self.matching.for_job(sha256, model, matches))
        judge = adapter.judge_of(job_spec)
        if judge is not None:
            adapter.judge_check(self.models.get(judge[0]), checked)
        return checked

    def _admitted(self, sha256: str, model, checked: CheckedSpec) -> api.Admission:
        """A checked render within the device's memory: its ticket (the job's slot takes this very CheckedSpec: the
        spec is checked once)."""
        self._check_memory(model, checked)
        ticket = uuid.uuid4().hex
        with self._cv:
            self._tickets[ticket] = (sha256, checked)
            while len(self._tickets) > _TICKETS_KEPT:
                self._tickets.popitem(last=False)
        spec = checked.spec
        return api.Admission(ticket=ticket, steps=spec.steps, batch=spec.batch, seed=spec.seed)

    def submit(self, submission: api.Submission) -> None:
        with self._cv:
            if not submission.background:  # an atlas's units come from the server's own grants, not a burst
                self._arrived_at = time.perf_counter()
            self._incoming.append(submission)
            if not (self._holding and self._admitting):  # holding for admissions in flight: the last one's end wakes it
                self._cv.notify_all()

    def admitting(self, count: int) -> None:
        with self._cv:
            self._admitting = max(0, int(count))
            if not self._admitting:
                self._cv.notify_all()

    def cancel(self, job_id: str) -> None:
        with self._cv:
            self._cancels.add(job_id)
            self._cv.notify_all()

    def exemplars(self, query: api.ExemplarQuery) -> pb.GetExemplarsResponse:
        return self.queries.exemplars(query)  # in the caller's thread; the field's computation on the device thread

    def dataset_image(self, query: api.ImageQuery) -> pb.DatasetImageData:
        return dataset_image(query)

    def join_scores(self, query: api.JoinQuery) -> list[tuple[float, float, float, float]]:
        return self.queries.join_scores(query)  # the forward on the device thread

    def device(self) -> pb.Device:
        return self._device_pb

    def info(self) -> pb.WorkerInfo:
        with self._cv:
            jobs = list(self._jobs.values())
            indexes = len(self._indexes)
        active = [j for j in jobs if j.active]
        allocated = torch.cuda.memory_allocated(self.torch_device) if self.torch_device.type == "cuda" else 0
        return pb.WorkerInfo(device=self._device_pb, models=self.models.held(), active_slots=len(active) + indexes,
                             active_images=sum(j.slot.batch for j in active), max_step_images=self.max_step_images,
                             memory_allocated_bytes=int(allocated), parked_slots=len(jobs) - len(active))

    def stop(self, grace: float) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._device_thread.is_alive():
            self._device_thread.join(timeout=max(0.0, grace))
            if self._device_thread.is_alive():
                with self._cv:
                    self._shutdown = True
                    self._cv.notify_all()
                self._device_thread.join()
        self._out.put(None)
        if self._output_thread.is_alive():
            self._output_thread.join()
        self._encoder.shutdown(wait=True)
        self._admitter.shutdown(wait=False)

    # ------------------------------------------------------------------------------------------- events

    def _emit(self, event) -> None:
        """Queue an event (a WorkerEvent, or a callable making one on the output thread)."""
        self._out.put(event)

    def _emit_loop(self) -> None:
        """Hand the events to the sink in order: what is queued at once goes as one list (the server stores a list
        in one transaction), at most ``_EVENTS_PER_BATCH``."""
        while True:
            items = [self._out.get()]
            while items[-1] is not None and len(items) < _EVENTS_PER_BATCH:
                try:
                    items.append(self._out.get_nowait())
                except queue.Empty:
                    break
            events = []
            for item in items:
                if item is None:
                    break
                try:
                    event = item() if callable(item) else item
                except Exception:  # one bad event must not stop the others
                    log.exception("making a worker event failed")
                    continue
                if event is not None:
                    events.append(event)
            if events and self._sink is not None:
                try:
                    self._sink(events if len(events) > 1 else events[0])
                except Exception:
                    log.exception("emitting %d worker event(s) failed", len(events))
            if items[-1] is None:
                return

    def _finished(self, job_id: str, state: int, *, result=None, error=None) -> None:
        if result is not None:
            encoded = self._encoder.submit(_encode_result, result)

            def make():
                try:
                    return api.WorkerEvent(api.FINISHED, job_id, state=state, result=encoded.result(), error=error)
                except Exception as exc:  # the job still ends, FAILED, and says why
                    log.error("job %s: its result could not be encoded", job_id, exc_info=exc)
                    return api.WorkerEvent(api.FINISHED, job_id, state=pb.JOB_STATE_FAILED, error=job_error(exc))
            self._emit(make)
        else:
            self._emit(api.WorkerEvent(api.FINISHED, job_id, state=state, error=error))

    def _progress_of(self, job: _Job):
        def progress(step: int, total: int, values) -> None:
            job.last = (step, values)
            now = time.perf_counter()
            if step >= total or now - job.emitted_at >= self._progress_interval():
                self._send_progress(job, now)
        return progress

    def _progress_interval(self) -> float:
        """A job's progress interval now: ``progress_interval``, longer while more jobs than ``max_progress_rate`` x
        that interval are held (device thread)."""
        if not self.interval or not self.rate:
            return self.interval
        return max(self.interval, len(self._jobs) / self.rate)

    def _send_progress(self, job: _Job, now: float | None = None) -> None:
        if job.last is None or job.last[0] <= job.emitted:
            return
        now = time.perf_counter() if now is None else now
        step, values = job.last
        seconds = (now - job.emitted_at) / (step - job.emitted)
        self._emit(api.WorkerEvent(api.PROGRESS, job.sub.job_id, progress=pb.Progress(
            step=step, steps=job.slot.steps, objective=values.tolist(), seconds_per_step=seconds)))
        job.emitted, job.emitted_at = step, now

    def _snapshot_of(self, job: _Job):
        side = job.spec.preview_max_side or adapter.DEFAULT_PREVIEW_SIDE
        job_id = job.sub.job_id

        def encode(images):
            with phase("png"):
                return [adapter.rendered(i, image, max_side=side) for i, image in enumerate(images)]

        def snapshot(step: int, images) -> None:
            encoded = self._encoder.submit(encode, images)

            def make():
                return api.WorkerEvent(api.PREVIEW, job_id, preview=pb.Preview(step=step, images=encoded.result()))
            self._emit(make)
        return snapshot

    # ------------------------------------------------------------------------------------------- device thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._cancels or self._jobs or self._waiting or self._forgotten
                           or self._calls or self._indexes) and not self._stopping:
                    self._cv.wait()
                calls, self._calls = self._calls, []
            self._run_calls(calls)
            with self._cv:
                self._hold()
                if self._shutdown or (self._stopping and not self._jobs):
                    self._device_done = True  # from now on calls run on their caller's thread
                    calls, self._calls = self._calls, []
                    break
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, set()
                forgotten, self._forgotten = self._forgotten, []
            if self._stopping:
                incoming = []  # stopping: start nothing new (those jobs stay QUEUED in the store)
                self._waiting.clear()
                self._requeue_indexes()  # a pass goes back at once: it resumes from its last chunk
            for model in forgotten:
                self.engine.forget(model)
            try:
                self._round(incoming, cancels)
            except Exception:  # a bug in the loop itself: fail what is running, keep serving
                log.exception("device round failed")
                for job in list(self._jobs.values()):
                    self._fail(job, RuntimeError("internal error in the device loop"))
            self._flush_stats()
        self._run_calls(calls)
        self._requeue_indexes()
        for job in list(self._jobs.values()):  # shutdown: the rest goes back to the queue, from step 0
            self.engine.drop([job.slot])
            self._remove(job)
            self._emit(api.WorkerEvent(api.REQUEUED, job.sub.job_id))
        self._flush_stats(force=True)

    def _hold(self) -> None:
        """Before a round takes the new submissions: wait (``planner.hold``) while a burst of jobs arrives (the server
        admits more: ``admitting``; or, with none in flight, the next submission comes within
        ``planner.HOLD_GAP_SECONDS``: a burst's requests reach the server one by one), so it starts as one step. A
        lone job waits that long once for a second one. An atlas's units (background) do not count as arrivals.
        Ends early when a call for the device thread or a cancel comes, or the worker stops (call with ``_cv``
        held)."""
        if not (self._incoming or self._waiting):
            return
        recent = time.perf_counter() - self._arrived_at < planner.HOLD_GAP_SECONDS
        stepping = sum(job.slot.batch for job in self._jobs.values() if job.active)
        joining = sum(sub.images for sub in self._incoming) + sum(job.slot.batch for job in self._waiting)
        seconds = planner.hold(self._admitting + recent, joining, stepping, self._last_step)
        deadline = time.perf_counter() + seconds

        def interrupted():
            return self._calls or self._cancels or self._stopping or self._shutdown

        while not interrupted():
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            if self._admitting:
                self._holding = True  # a submission does not wake it meanwhile: the last admission's end does
                try:
                    self._cv.wait(left)
                finally:
                    self._holding = False
                continue
            # none in flight: wait for the next arrival, up to HOLD_GAP_SECONDS. A lone job too: a burst's first
            # CreateJob often ends before the second's admission begins, and starting it alone made the burst's first
            # steps partial while the rest were still being created (in-process, beside them on the GIL)
            arrived = len(self._incoming)
            if not self._cv.wait_for(lambda: self._admitting or len(self._incoming) > arrived or interrupted(),
                                     min(left, planner.HOLD_GAP_SECONDS)):
                return

    @staticmethod
    def _run_calls(calls) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller gets it
                future.set_exception(exc)

    def _on_device(self, fn):
        """Run ``fn`` on the device thread (between rounds) and return its result; inline when that thread is
        not running (not started, or stopped)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            inline = self._device_done or not self._device_thread.is_alive() \
                or threading.current_thread() is self._device_thread
            if not inline:
                self._calls.append((fn, future))
                self._cv.notify_all()
        if inline:
            return fn()
        return future.result()

    def _round(self, incoming, cancels) -> None:
        for job_id in cancels:
            self._cancel(job_id, incoming)
        for sub in incoming:
            if sub.job_id in cancels:
                continue
            if sub.index is not None:
                self._start_index(sub)
                continue
            job = self._prepare(sub)
            if job is not None:
                job.since = self._tick
                self._waiting.append(job)
        cancelled: dict[tuple, list[_Job]] = {}
        for job in self._jobs.values():
            if job.slot.is_cancelled():  # parked ones too: they leave now, not when their turn comes
                cancelled.setdefault(job.group, []).append(job)
        for jobs in cancelled.values():
            self._leave(jobs)
        step = planner.schedule(self._state())
        self._apply(step)
        group = [self._jobs[i] for i in step.members if i in self._jobs]  # a joiner may have failed its join
        if group:
            self._step_group(step, group)
        self._step_index()

    def _step_group(self, step: planner.StepPlan, group: list[_Job]) -> None:
        if len(group) > 1 and not self._independent(group):
            chunks = [[job] for job in group]
        else:
            chunks = [[self._jobs[i] for i in chunk if i in self._jobs] for chunk in step.chunks]
        for chunk in chunks:
            if chunk:
                self._step(step.group, chunk)
        for job in group:
            job.ran += 1
        leaving = [job for job in group if job.sub.job_id in self._jobs and
                   (job.slot.done or job.slot.error is not None)]
        if leaving:
            self._leave(leaving)

    # ------------------------------------------------------------------------------------------- index jobs

    def _start_index(self, sub: api.Submission) -> None:
        """A new (or re-queued) index job: its pass, resumed from the saved state of the same inputs if any."""
        from featureviz.engine.exemplars import ImageFiles
        from featureviz.engine.exemplars import IndexPass
        from featureviz.importer import Preprocess

        work = sub.index
        try:
            model = self.models.get(sub.model)
            p = work.preprocess
            holder: list[_IndexJob] = []
            run = IndexPass(model, ImageFiles(work.names, work.paths), layers=work.layers, k=work.k,
                            size=tuple(work.size), batch_size=work.batch_size, chunk_images=work.chunk_images,
                            preprocess=Preprocess(mean=tuple(p["mean"]), std=tuple(p["std"]),
                                                  channel_order=p["channel_order"]),
                            state_path=work.state_path, set_hash=work.dataset,
                            max_side=self.config.max_dataset_image_side, device=self.torch_device,
                            progress=lambda done, total: self._index_progress(holder[0], done, total))
        except Exception as exc:
            self._report_failure(sub.job_id, exc)
            return
        job = _IndexJob(sub, run)
        holder.append(job)
        job.emitted = run.done
        with self._cv:
            self._indexes[sub.job_id] = job
        self._emit(api.WorkerEvent(api.STARTED, sub.job_id))
        if run.done:  # resumed: say where it stands
            self._emit(api.WorkerEvent(api.PROGRESS, sub.job_id, progress=pb.Progress(step=run.done,
                                                                                      steps=run.total)))

    def _index_progress(self, job: _IndexJob, done: int, total: int) -> None:
        now = time.perf_counter()
        if done >= total or now - job.emitted_at >= self.interval:
            seconds = (now - job.emitted_at) / max(1, done - job.emitted)
            self._emit(api.WorkerEvent(api.PROGRESS, job.sub.job_id, progress=pb.Progress(
                step=done, steps=total, seconds_per_step=seconds)))
            job.emitted, job.emitted_at = done, now

    def _step_index(self) -> None:
        """One batch of one index job (the first in turn, which then goes to the back); its end when done."""
        with self._cv:
            if not self._indexes:
                return
            job_id = next(iter(self._indexes))
            job = self._indexes.pop(job_id)
            self._indexes[job_id] = job  # to the back: index jobs take turns
        began = time.perf_counter()
        try:
            before = job.run.done
            finished = job.run.step()
            self._stats.append((job.run.done - before, time.perf_counter() - began))
            if not finished:
                return
            index = job.run.result()
            work = job.sub.index
            index.save(work.final_path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(work.state_path)
            result = adapter.index_result(index, work)
        except Exception as exc:
            job.run.close()
            with self._cv:
                self._indexes.pop(job_id, None)
            self._report_failure(job_id, exc)
            return
        with self._cv:
            self._indexes.pop(job_id, None)
        self._emit(api.WorkerEvent(api.FINISHED, job_id, state=pb.JOB_STATE_SUCCEEDED, result=result))

    def _requeue_indexes(self) -> None:
        with self._cv:
            jobs, self._indexes = list(self._indexes.values()), {}
        for job in jobs:
            job.run.close()
            self._emit(api.WorkerEvent(api.REQUEUED, job.sub.job_id))

    def _prepare(self, sub: api.Submission) -> _Job | None:
        try:
            spec = pb.JobSpec.FromString(sub.spec)
            with self._cv:
                ticket = self._tickets.pop(sub.ticket, None) if sub.ticket else None
            model = self.models.get(sub.model)
            if ticket is not None and ticket[0] == sub.model:
                checked = ticket[1]
            else:  # re-queued after a restart, or the ticket was dropped: check again
                checked = adapter.checked_spec(model, spec, str(self.torch_device),
                                               max_image_side=self.config.max_image_side, priors=sub.priors,
                                               learned=self.priors, models=self.models.get,
                                               match_targets=self.matching.for_job(sub.model, model, sub.matches))
            job = _Job(sub, spec, checked, None, ())
            slot = Slot(model, checked, device=self.torch_device, handle=sub.job_id, exclusive=sub.exclusive,
                        progress=self._progress_of(job), snapshot=self._snapshot_of(job) if spec.preview_every > 0
                        else None)
            job.slot = slot
            job.group = planner.group_key(BatchEngine.group_key(slot), sub.job_id, sub.exclusive)
            return job
        except Exception as exc:
            self._report_failure(sub.job_id, exc)
            return None

    def _state(self) -> planner.WorkerState:
        """The planner's snapshot of this worker (device thread). The free memory is read, and the waiting jobs'
        estimates made (once per job: admission measured them already), only when a job may have to wait."""
        jobs = [*self._jobs.values(), *self._waiting]
        free = None
        if self.memory_planner.enabled and self._waiting and len(jobs) > 1:
            for job in self._waiting:
                if not job.measured:
                    job.memory, job.measured = self._estimate(job.slot.model, job.checked), True
            free = self.memory_planner.free() - self.memory_planner.headroom
        return planner.WorkerState(
            jobs=[job.state(joined=i < len(self._jobs)) for i, job in enumerate(jobs)], capacity=self.max_step_images,
            slice_steps=self.slice_steps, tick=self._tick, served=self._served, order=tuple(self._order),
            caps=dict(self._caps), free=free)

    def _apply(self, step: planner.StepPlan) -> None:
        """Carry out a plan's parking, activations and joins: the joiners' STARTED events, then one forward per
        group for their starting objective."""
        self._tick, self._served, self._order = step.tick, step.served, collections.deque(step.order)
        waiting = {job.sub.job_id: job for job in self._waiting}
        for job_id, state in step.jobs.items():
            job = self._jobs.get(job_id) or waiting[job_id]
            job.active, job.ran, job.since = state.active, state.ran, state.since
        by_group: dict[tuple, list[_Job]] = {}
        for job_id in step.join:
            job = waiting[job_id]
            self._waiting.remove(job)
            with self._cv:
                self._jobs[job_id] = job
            by_group.setdefault(job.group, []).append(job)
        for jobs in by_group.values():
            for job in jobs:
                self._emit(api.WorkerEvent(api.STARTED, job.sub.job_id))
                job.started = True
            self._guarded(jobs, self._join)

    def _join(self, jobs: list[_Job]) -> None:
        with phase("start forward"):
            self.engine.join([j.slot for j in jobs])

    @staticmethod
    def _memory_key(model, checked: CheckedSpec) -> tuple:
        generator = getattr(checked.spec, "generator", None)  # a generator's own memory (issue 25)
        return (BatchEngine.model_key(model), checked.model_size, checked.image_size, checked.spec.param,
                checked.layers, getattr(generator, "key", None))

    def _estimate(self, model, checked: CheckedSpec) -> tuple[float, float] | None:
        """(fixed, per image) bytes of a job, measured once per memory key (device thread); None when the probe
        failed (then the device step decides)."""
        try:
            return self.memory_planner.estimate(self._memory_key(model, checked),
                                                lambda n: self.engine.probe(model, checked, n),
                                                cap=self.config.max_job_memory_bytes)
        except Exception as exc:  # a probe that fails says nothing about memory: let the step decide
            log.warning("memory probe failed (%s); admitting the job without an estimate", exc)
            devices.empty_cache(self.torch_device)
            return None

    def _measured(self, model, checked: CheckedSpec) -> bool:
        """Whether admitting ``checked`` needs no memory probe (measured already, or no memory planning)."""
        return not self.memory_planner.enabled or \
            self.memory_planner.known(self._memory_key(model, checked)) is not None

    def _check_memory(self, model, checked: CheckedSpec) -> None:
        """Admission: refuse a job whose measured memory exceeds ``max_job_memory_bytes`` or what the device can
        hold (RESOURCE_EXHAUSTED, JOB_TOO_LARGE)."""
        if not self.memory_planner.enabled:
            return
        # measured once per memory key: later admissions of the same kind of job need no trip to the device thread
        # (which would wait for the round in progress: a burst of admissions then trickled in a few per round)
        estimate = self.memory_planner.known(self._memory_key(model, checked))
        if estimate is None:
            estimate = self._on_device(lambda: self._estimate(model, checked))
        if estimate is None:
            return
        render_spec = checked.spec
        need = devices.job_memory(estimate, render_spec.batch)
        limit = self.config.max_job_memory_bytes
        usable = self.memory_planner.usable
        if not (need > usable or (limit and need > limit)):
            return
        bound = (f"max_job_memory_bytes = {limit} ({_bytes(limit)})" if limit and limit <= usable else
                 f"what this {self.torch_device.type} device can hold ({_bytes(usable)}: its memory less "
                 f"{devices.HEADROOM_FRACTION:.0%} headroom)")
        height, width = checked.image_size
        fixed, per_image = estimate
        raise ResourceExhausted(f"this job needs about {_bytes(need)} ({render_spec.batch} image(s) of "
                                f"{height}x{width}: {_bytes(fixed)} fixed + {_bytes(per_image)} per image, measured "
                                f"by a probe step), more than {bound}; use fewer images "
                                "(batch), a smaller size, or split it into several jobs", reason="JOB_TOO_LARGE")

    def _check_index_memory(self, admission: api.Admission) -> None:
        """An index pass holds a few batches of decoded images (IndexPass.decoded_bytes): refused (RESOURCE_EXHAUSTED,
        JOB_TOO_LARGE) above ``max_job_memory_bytes``, before any compute."""
        from featureviz.engine.exemplars import IndexPass

        need = IndexPass.decoded_bytes(admission.batch_size, admission.size)
        limit = self.config.max_job_memory_bytes
        if limit and need > limit:
            height, width = admission.size
            raise ResourceExhausted(f"this index pass holds about {_bytes(need)} of decoded images (batches of "
                                    f"{admission.batch_size} images of {height}x{width}, a few decoded ahead), more "
                                    f"than max_job_memory_bytes = {limit} ({_bytes(limit)}); use a smaller batch_size "
                                    "or size", reason="JOB_TOO_LARGE")

    def _independent(self, group: list[_Job]) -> bool:
        try:
            return self.engine.rows_independent([job.slot for job in group])
        except Exception:
            log.exception("row-independence probe failed; running the slots one by one")
            return False

    def _step(self, key: tuple, chunk: list[_Job]) -> None:
        images = sum(job.slot.batch for job in chunk)
        began = time.perf_counter()
        try:
            with self._deterministic(key):
                self.engine.step([job.slot for job in chunk], before_model=self._fault)
        except Exception as exc:
            oom = devices.is_oom(exc)
            devices.empty_cache(self.torch_device)
            if len(chunk) == 1:
                if not oom:
                    log.warning("job %s failed in a device step: %s", chunk[0].sub.job_id, exc)
                self._fail(chunk[0], exc)
                return
            if oom:  # the group's chunks shrink until one fits: the largest size below the one that failed
                self._caps[key] = planner.shrink(self._caps.get(key), images)
                log.warning("out of memory in a step of %d images: splitting (chunks of at most %d)", images,
                            self._caps[key])
            for part in planner.halves(chunk):
                self._step(key, part)
            return
        self._last_step = time.perf_counter() - began
        self._stats.append((images, self._last_step))

    @contextlib.contextmanager
    def _deterministic(self, key: tuple):
        """Exclusive jobs on CUDA: deterministic cuDNN algorithms (same seed, same device, same bytes)."""
        if key[0] != "exclusive" or self.torch_device.type != "cuda":
            yield
            return
        backends = torch.backends.cudnn
        saved = backends.deterministic, backends.benchmark
        backends.deterministic, backends.benchmark = True, False
        try:
            yield
        finally:
            backends.deterministic, backends.benchmark = saved

    def _guarded(self, jobs: list[_Job], action) -> None:
        """Run ``action(jobs)``; on an error, run it job by job and fail the jobs that fail alone."""
        try:
            action(jobs)
        except Exception as exc:
            devices.empty_cache(self.torch_device)
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return
            for job in jobs:
                if job.sub.job_id in self._jobs:
                    self._guarded([job], action)

    def _cancel(self, job_id: str, incoming: list[api.Submission]) -> None:
        for sub in incoming:
            if sub.job_id == job_id:  # never started: it ends without images
                self._finished(job_id, pb.JOB_STATE_CANCELLED)
                return
        with self._cv:
            index_job = self._indexes.pop(job_id, None)
        if index_job is not None:  # its saved state stays: a later identical job resumes it
            index_job.run.close()
            self._finished(job_id, pb.JOB_STATE_CANCELLED)
            return
        for job in list(self._waiting):
            if job.sub.job_id == job_id:
                self._waiting.remove(job)
                self.engine.drop([job.slot])
                self._finished(job_id, pb.JOB_STATE_CANCELLED)
                return
        job = self._jobs.get(job_id)
        if job is not None:
            job.slot.cancelled = True
            job.slot.cancel = lambda: True

    def _leave(self, jobs: list[_Job]) -> None:
        """Done, cancelled or diverged jobs: their results (one forward for the group), then FINISHED events."""
        self.engine.flush()  # hands over pending progress (CUDA), which may report a divergence
        failed = [job for job in jobs if job.slot.error is not None]
        for job in failed:
            self._fail(job, job.slot.error)
        ending = [job for job in jobs if job not in failed]

        def finish(group: list[_Job]) -> None:
            with phase("end forward"):
                results = self.engine.finish([job.slot for job in group])
            for job, result in zip(group, results):
                judge = adapter.judge_of(job.spec)
                if judge is not None:  # the images are on the host already: one judge forward per job
                    try:
                        result["judge"] = adapter.judge_scores(self.models.get(judge[0]), judge[1], job.checked,
                                                               result["images"], device=self.torch_device)
                    except Exception as exc:  # the judge's failure is this job's, not the group's
                        self._remove(job)
                        self._report_failure(job.sub.job_id, exc)
                        continue
                self._send_progress(job)
                self._remove(job)
                state = pb.JOB_STATE_CANCELLED if result["cancelled"] else pb.JOB_STATE_SUCCEEDED
                self._finished(job.sub.job_id, state, result=result)

        if ending:
            self._guarded(ending, finish)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        try:
            self.engine.drop([job.slot])
        except Exception:
            log.exception("dropping job %s", job.sub.job_id)
        self._remove(job)
        self._report_failure(job.sub.job_id, exc)

    def _report_failure(self, job_id: str, exc: BaseException) -> None:
        from featureviz.errors import FeaturevizError

        if not isinstance(exc, FeaturevizError) and not devices.is_oom(exc):
            log.error("job %s failed", job_id, exc_info=exc)
        self._finished(job_id, pb.JOB_STATE_FAILED, error=job_error(exc))

    def _remove(self, job: _Job) -> None:
        with self._cv:
            self._jobs.pop(job.sub.job_id, None)
        if job.group and not any(j.group == job.group for j in self._jobs.values()):
            self._caps.pop(job.group, None)

    def _forget(self, model) -> None:
        with self._cv:
            self._forgotten.append(model)
            self._cv.notify_all()

    def _flush_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._stats and (force or now - self._stats_at >= max(self.interval, 0.05) or not self._jobs):
            stats, self._stats = self._stats, []
            self._stats_at = now
            self._emit(api.WorkerEvent(api.STEPS, steps=stats))


def _encode_result(result: dict):
    with phase("png"):
        return adapter.job_result(result)


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

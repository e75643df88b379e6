"""The scheduler: the server's queue, its grants to the worker, and the event log of every job. No torch here.

- Jobs come from the store (SQLite rows) and wait in the queue until the worker has room: the worker runs at most
  ``max_step_images`` images in one device step, so the scheduler grants it jobs while the images it holds stay within
  that (a job larger than that runs when the worker is empty). Fairness across tenants: the next job is the
  oldest queued job of the tenant that holds the fewest images on the worker, ties going to the tenant served
  least recently (FIFO within a tenant). When the worker is full, a tenant that holds less than its share
  (``max_step_images`` divided among the tenants with queued or granted jobs) still gets its next job: the worker then
  holds more than one step's images and time-slices them (:mod:`featureviz.worker.slices`: a running job yields
  its place after ``time_slice_steps`` steps, its state kept), so one tenant's long jobs cannot hold the device
  while another's wait. Fairness across models is the worker's: it steps its groups (one per model and input
  size) in turn, one device step each, so every running job advances one step per round.
- Budget: :meth:`image_steps` is a tenant's queued and granted work in images x steps, which CreateJob holds
  within ``max_image_steps_per_tenant``.
- On start the scheduler re-queues every job it finds QUEUED or RUNNING (a crash or a stop left them so).
  Exclusive jobs rerun with the same images; others may differ (their batch-mates differ).
- Each job has a :class:`JobLog`: events with sequence numbers, appended from the worker's event thread and read
  by watchers on the event loop, which are woken through ``call_soon_threadsafe``. ``last_seq`` is persisted
  before an event is published. The worker may hand over several events at once (a list): they are stored in one
  SQLite transaction and published after its commit.
- The worker sends events back (:class:`featureviz.worker.api.WorkerEvent`): STARTED, PROGRESS (coalesced per
  job by the worker), PREVIEW, FINISHED, REQUEUED (on stop), and STEPS (device step statistics for metrics).
- Stopping lets running jobs finish within ``grace_seconds``, then the worker stops them and they stay QUEUED.
- Exemplar index jobs (``JobSpec.exemplar_index``) go through the same queue, grants, events and re-queues; their
  Submission carries :class:`featureviz.worker.api.IndexWork` (:func:`featureviz.server.indexes.index_work`: the
  set's files, the state and final paths). A job whose index is finished already (another job made it meanwhile)
  ends at once, cached (:meth:`finish_cached`). An index job takes no room in the device steps (0 images: the
  worker runs one index batch per round beside them); at most ``MAX_INDEX_PASSES`` run at once, one per tenant,
  the others wait in the queue without holding up their tenant's renders; a job whose index another granted job is
  computing waits for it (and then ends cached). A finished pass is recorded for the tenant
  (``Store.record_index``), whose least recently used indexes beyond ``max_indexes_per_tenant`` go.
- Atlas jobs (``JobSpec.atlas``, :mod:`featureviz.server.atlas`) never wait in the queue: their units are granted
  one by one as *background* submissions (``Submission.background``, one image each) while the images granted
  (interactive and background) stay below ``max_step_images``. Interactive grants do not count the background
  images, so an interactive job is granted at once, and the worker's planner parks background units to give it
  their room at its next device step. Units go to the atlas of the tenant holding the fewest units, then the one
  served least recently. Before a unit is granted the unit store is asked: a stored key (another atlas or an
  earlier run rendered it) is served from there, and a key in flight for another atlas waits for that render. A
  finished unit is stored at once (``Store.put_unit``) and marked done in its atlas; a restart rebuilds each atlas
  from its units not done (the ones in flight at a kill render again: none had been stored). Cancel stops the
  units in flight and keeps what is done.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from featureviz.errors import FailedPrecondition
from featureviz.phases import phase
from featureviz.server.atlas import DIVERSITY
from featureviz.server.atlas import RENDER
from featureviz.server.atlas import UNIT_CACHED
from featureviz.server.atlas import UNIT_FAILED
from featureviz.server.atlas import UNIT_RENDERED
from featureviz.server.atlas import progress as atlas_progress
from featureviz.server.atlas import image_key
from featureviz.server.atlas import unit_job_id
from featureviz.server.atlas import variant_spec
from featureviz.server.store import TERMINAL_STATES
from featureviz.server.store import Store
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api

__all__ = ["Scheduler", "JobLog", "job_cost", "MAX_INDEX_PASSES"]

log = logging.getLogger("featureviz.server")
# exemplar index passes the worker runs at once (one per tenant): each holds a decode pool and a few batches of
# decoded images; the others wait in the queue
MAX_INDEX_PASSES = 2
# the cost counters' phase of each worker event's handling (featureviz.phases)
_EVENT_PHASES = {api.STARTED: "start", api.FINISHED: "end", api.REQUEUED: "end", api.LOST: "end"}


def _index_key(spec: pb.JobSpec) -> str:
    """A stored index job's index id ("" when its spec cannot say: the job then fails when it is granted)."""
    from featureviz.server.indexes import index_id

    try:
        return index_id(spec.model, spec)
    except Exception:
        return ""


def job_cost(spec: pb.JobSpec) -> int:
    """A job's images x steps (the stored spec has both; unset: one image, the engine's 512 steps). An exemplar
    index job costs none of this budget (a forward pass per image, bounded by the set's max_dataset_images), nor
    does an atlas (background work, bounded by max_atlas_units and max_atlases_per_tenant)."""
    if spec.HasField("exemplar_index") or spec.HasField("atlas"):
        return 0
    return (spec.batch if spec.HasField("batch") else 1) * (spec.steps if spec.HasField("steps") else 512)


class JobLog:
    """The events of one job. ``append`` may be called from any thread; ``waiter``/``since`` on the loop.

    An event is *published* (``since``, ``last_seq``, the watchers' wake-up) only once its seq is stored: ``on_seq``
    (the scheduler's) stores it and answers True, or answers False when it is part of a batch of worker events
    whose store transaction commits later; the scheduler then calls :meth:`publish` after the commit. So a watcher
    never sees a seq that a kill -9 could hand out again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, start_seq: int = 0, on_seq=None):
        self._loop = loop
        self._lock = threading.Lock()
        self._events: list[pb.JobEvent] = []
        self._seq = start_seq  # the last seq handed out
        self._visible = start_seq  # the last seq published
        self._on_seq = on_seq
        self._futures: list[asyncio.Future] = []  # the watchers waiting for the next publish (loop only)
        self.finished = False
        self.last_preview_seq = 0  # watch streams send a preview only while it is the newest (coalescing)

    @property
    def last_seq(self) -> int:
        return self._visible

    @property
    def pending(self) -> bool:
        """Whether events are logged but not yet published (their batch's transaction is committing)."""
        return self._seq > self._visible

    def append(self, **fields) -> pb.JobEvent:
        with phase("events"):
            return self._append(fields)

    def _append(self, fields) -> pb.JobEvent:
        with self._lock:
            self._seq += 1
            event = pb.JobEvent(seq=self._seq, **fields)
            if event.HasField("result"):  # the finished job as GetJob answers it from now on: this is its last seq
                event.result.last_seq = self._seq
            event.time.GetCurrentTime()
            self._events.append(event)
            if event.HasField("result"):
                self.finished = True
            elif event.HasField("preview"):
                self.last_preview_seq = event.seq
        if self._on_seq is None or self._on_seq(event.seq):
            self.publish()
        return event

    def publish(self) -> None:
        """Make every appended event visible and wake the watchers."""
        with self._lock:
            if self._visible == self._seq:
                return
            self._visible = self._seq
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is watching any more
            pass

    def _wake(self) -> None:  # on the loop
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.done():
                future.set_result(True)

    def waiter(self) -> asyncio.Future:
        """A future (on the loop) done at the next publish. Take it *before* calling ``since`` so no event is
        missed; a watcher that stops waiting cancels it. One future, no task: a wake of many watchers is cheap."""
        future = self._loop.create_future()
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(future)
        return future

    def since(self, seq: int, *, previews: bool) -> list[pb.JobEvent]:
        with self._lock:
            visible = self._visible
            return [e for e in self._events if seq < e.seq <= visible and (previews or not e.HasField("preview"))]


class _AtlasRun:
    """An unfinished atlas on the scheduler: its renders not granted yet (``pending``: (idx, layer, channel, key,
    variant): the units' renders and their variants), those in flight (unit job id -> key) and those waiting for
    another atlas's render of the same key. ``join``: (dataset, index job, index id) of its dataset join, None
    without one; ``join_state``: "waiting" (for the index job), "ready" (units are joined as they finish),
    "failed" (the index job did not succeed: the atlas ends without the join); ``join_complete``: every unit
    joined."""

    def __init__(self, job_id: str, tenant: str, model: str, spec: pb.JobSpec, pending: list, total: int,
                 done: int, order: int):
        self.job_id, self.tenant, self.model, self.spec = job_id, tenant, model, spec
        self.pending: collections.deque = collections.deque(pending)
        self.running: dict[str, str] = {}
        self.deferred: dict[str, list] = {}
        self.total, self.done, self.order = total, done, order
        self.variants_total = self.variants_done = 0
        self.cancelled = False
        self.started = False
        self.join: tuple[str, str, str] | None = None
        self.join_state = "waiting"
        self.join_complete = False
        self.priors: dict | None = None  # its prior_dataset's PriorSource for the units (read at the first grant)

    @property
    def idle(self) -> bool:
        """Nothing of it left to render."""
        return not self.pending and not self.running and not self.deferred

    @property
    def settled(self) -> bool:
        """Its dataset join is done (or there is none, or it failed, or the atlas is cancelled)."""
        return self.join is None or self.cancelled or self.join_state == "failed" or self.join_complete


class Scheduler:
    def __init__(self, store: Store, worker: api.Worker, *, loop: asyncio.AbstractEventLoop,
                 finished_logs_kept: int = 256, index_chunk_images: int = 256, max_indexes_per_tenant: int = 64):
        self.store = store
        self.index_chunk_images = index_chunk_images
        self.max_indexes_per_tenant = max_indexes_per_tenant
        self.max_match_k = 16  # Limits.max_match_k (exemplar matching; app.py sets it from the config)
        self.worker = worker
        self.max_step_images = max(1, int(worker.max_step_images))
        self._loop = loop
        self._cv = threading.Condition()
        self._queue: collections.deque[str] = collections.deque()  # arrival order
        self._tenant_of: dict[str, str] = {}
        self._images_of: dict[str, int] = {}  # job -> images (its batch)
        self._cost_of: dict[str, int] = {}  # job -> images x steps
        self._tickets: dict[str, str] = {}  # job -> the worker's admission ticket
        self._exclusive: set[str] = set()
        self._indexing: dict[str, str] = {}  # queued or granted exemplar index jobs -> their index id
        self._served: dict[str, int] = {}  # tenant -> turn it was last granted a job
        self._turn = 0
        self._granted: dict[str, str] = {}  # job -> tenant: held by the worker, until its end is logged
        self._held = 0  # images the worker holds
        # per tenant, kept with the maps above (each CreateJob and grant reads them: no walk over every job)
        self._held_of: collections.Counter[str] = collections.Counter()  # images its granted jobs hold
        self._cost_by_tenant: collections.Counter[str] = collections.Counter()  # its queued and granted cost
        self._jobs_of: collections.Counter[str] = collections.Counter()  # its jobs queued or granted (_tenant_of)
        # job -> its JobRow as read at its submit (CreateJob's insert: no read), kept until it starts or ends: its
        # grant, first watch and start read no row (nothing writes the row meanwhile but a cancel, which drops it)
        self._rows: dict[str, object] = {}
        self._logs: collections.OrderedDict[str, JobLog] = collections.OrderedDict()
        self._finished_logs_kept = finished_logs_kept
        self._evict_at = 0  # _evict_logs walks the logs when there are this many
        self._progress: dict[str, tuple[int, int, list[float]]] = {}
        self._started: dict[str, float] = {}
        self._stopping = False
        self._admitting = 0  # CreateJob admissions in flight (admissions)
        self._stopped = threading.Event()
        self.metrics = None  # a featureviz.server.metrics.Metrics, when the server exports metrics
        self._batch = threading.local()  # .logs: the logs a batch of worker events appended to (event thread)
        # atlases: unfinished runs, units in flight on the worker (unit job id -> (atlas, idx, key)), keys in
        # flight (key -> unit job id), background images granted, tenant -> turn it was last granted a unit
        self._atlases: dict[str, _AtlasRun] = {}
        self._units: dict[str, tuple[str, int, str]] = {}
        self._unit_workers: dict[str, str] = {}
        self._inflight: dict[str, str] = {}
        self._bg_held = 0
        self._bg_served: dict[str, int] = {}
        self._device_name = None
        # the dataset joins (featureviz.server.atlas): atlases wanting a join pass, run by one thread
        self._join_cv = threading.Condition()
        self._join_wanted: set[str] = set()
        self._join_stop = False
        self._join_thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Re-queue what a previous run left QUEUED or RUNNING, then start the worker and grant it jobs."""
        for row in self.store.unfinished_jobs():
            if row.state == pb.JOB_STATE_RUNNING:
                self.store.mark_queued(row.id)
                self.log(row.id).append(state=pb.JOB_STATE_QUEUED)
                log.info("re-queued job %s (was running when the server stopped)", row.id)
            spec = pb.JobSpec.FromString(row.spec)
            if spec.HasField("atlas"):
                self._add_atlas(row.id, row.tenant, row.model, spec)
                continue
            self._enqueue(row.id, row.tenant, spec)
        self._join_thread = threading.Thread(target=self._join_loop, name="atlas-join", daemon=True)
        self._join_thread.start()
        self.worker.start(self._on_event)
        with self._cv:
            self._dispatch()

    def stop_accepting(self) -> None:
        """From now on ``stopping`` is True (new jobs are refused) and no other job is granted to the worker."""
        with self._cv:
            self._stopping = True

    def stop(self, grace: float) -> None:
        """Blocking: running jobs may finish for ``grace`` seconds; then they are stopped and stay QUEUED."""
        self.stop_accepting()
        with self._join_cv:
            self._join_stop = True
            self._join_cv.notify_all()
        self.worker.stop(grace)
        with self._cv:
            self._granted.clear()
            self._held = 0
            self._held_of.clear()
            self._units.clear()
            self._inflight.clear()
            self._bg_held = 0

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------------------------------------- requests

    def admit(self, model_sha: str, spec: pb.JobSpec, priors: dict | None = None,
              matches: dict | None = None) -> api.Admission:
        """The worker converts and validates the spec before any compute (blocking; InvalidSpec with engine
        paths). The admission's ticket goes with the job to :meth:`submit`. ``priors``: the job's prior datasets
        (``featureviz.server.priors.prior_sources``), learned by the worker on first use. ``matches``: the
        MatchSources of the objective's match terms (``featureviz.server.matching``)."""
        with phase("admission"):
            if priors or matches:
                return self.worker.admit(model_sha, spec.SerializeToString(), priors=priors, matches=matches)
            return self.worker.admit(model_sha, spec.SerializeToString())

    validate = admit

    async def admit_async(self, model_sha: str, spec: pb.JobSpec, priors: dict | None = None,
                          matches: dict | None = None) -> api.Admission:
        """:meth:`admit`, awaited: a worker that answers by message (``Worker.admit_future``: the worker process)
        holds no thread while the admission is in flight, and one that answers at once (the in-process worker, for an
        admission that waits for nothing) none at all; any other admits in a thread of the loop's executor."""
        with phase("admission"):
            future = self.worker.admit_future(model_sha, spec.SerializeToString(), priors or None, matches or None)
        if future is None:
            return await asyncio.to_thread(self.admit, model_sha, spec, priors, matches)
        if future.done():  # answered at once (the in-process worker): no round trip through the loop
            return future.result()
        return await asyncio.wrap_future(future)

    def admissions(self, delta: int) -> None:
        """An admission began (+1) or ended (-1, after its submit): the worker learns how many are in flight (a step
        may wait for them: :func:`featureviz.worker.planner.hold`)."""
        with self._cv:
            self._admitting = max(0, self._admitting + delta)
            self.worker.admitting(self._admitting)

    def submit(self, job_id: str, tenant: str, admission: api.Admission | None = None, row=None) -> None:
        """Queue a stored job (``row``: its JobRow when the caller has it, saving a read)."""
        with phase("dispatch"):
            self._submit(job_id, tenant, admission, row if row is not None else self.store.get_job(job_id))

    def _submit(self, job_id: str, tenant: str, admission: api.Admission | None, row) -> None:
        with self._cv:
            self._enqueue(job_id, tenant, pb.JobSpec.FromString(row.spec),
                          admission.ticket if admission is not None else "")
            self._rows[job_id] = row  # read just now, under the lock a cancel takes too: no second read
            self._dispatch()

    def _enqueue(self, job_id: str, tenant: str, spec: pb.JobSpec, ticket: str = "") -> None:
        self._queue.append(job_id)
        if self._tenant_of.get(job_id) != tenant:
            self._jobs_of[tenant] += 1
        self._tenant_of[job_id] = tenant
        # an index job takes no room in the device steps (the worker runs one index batch per round beside them)
        self._images_of[job_id] = 0 if spec.HasField("exemplar_index") else spec.batch if spec.HasField("batch") else 1
        if spec.HasField("exemplar_index"):
            self._indexing[job_id] = _index_key(spec)
        before = self._cost_of.get(job_id)
        if before is not None:  # queued again without a release: counted once
            self._cost_by_tenant[tenant] -= before
        self._cost_of[job_id] = cost = job_cost(spec)
        self._cost_by_tenant[tenant] += cost
        if ticket:
            self._tickets[job_id] = ticket
        if spec.exclusive:
            self._exclusive.add(job_id)

    def _held_by(self, tenant: str) -> int:
        return self._held_of[tenant]

    def image_steps(self, tenant: str) -> int:
        """The tenant's queued and granted (running or parked) work: the sum of its jobs' images x steps."""
        with self._cv:
            return self._cost_by_tenant[tenant]

    def _below_share(self, tenant: str, queued_tenants) -> bool:
        """Whether the tenant holds less than its share of one device step while other tenants hold or want
        some: then it is granted a job even when the worker is full (the worker time-slices)."""
        tenants = set(queued_tenants) | set(self._granted.values())
        return len(tenants) > 1 and self._held_by(tenant) < self.max_step_images / len(tenants)

    def _dispatch(self) -> None:
        """Grant queued jobs, then atlas units in the room left (call with the lock held)."""
        self._dispatch_jobs()
        self._dispatch_units()

    def _dispatch_jobs(self) -> None:
        """Grant queued jobs to the worker while it has room, or to a tenant below its share (call with the lock
        held)."""
        with phase("dispatch"):
            self._grant()

    def _grant(self) -> None:
        while self._queue and not self._stopping:
            firsts: dict[str, str] = {}
            passes = [j for j in self._granted if j in self._indexing]
            for job_id in self._queue:
                tenant = self._tenant_of.get(job_id, "")
                if job_id in self._indexing and (len(passes) >= MAX_INDEX_PASSES or any(
                        self._granted[j] == tenant or self._indexing[j] == self._indexing[job_id] for j in passes)):
                    continue  # it waits for a pass to end (the same index: then it is cached); later renders go
                firsts.setdefault(tenant, job_id)
            if not firsts:
                return
            tenant = min(firsts, key=lambda t: (self._held_by(t), self._served.get(t, -1)))
            job_id = firsts[tenant]
            images = self._images_of.get(job_id, 1)
            if self._held and self._held + images > self.max_step_images and not self._below_share(tenant, firsts):
                return  # wait for room (the fairest job goes first, so a large job is not starved)
            self._queue.remove(job_id)
            self._turn += 1
            self._served[tenant] = self._turn
            self._granted[job_id] = tenant
            self._held += images
            self._held_of[tenant] += images
            row = self._rows.get(job_id) or self.store.get_job(job_id)
            if row.state in TERMINAL_STATES:  # finished meanwhile (a cancel raced the grant)
                self._release(job_id)
                continue
            work = None
            spec = pb.JobSpec.FromString(row.spec)
            if spec.HasField("exemplar_index"):
                work = self._index_work(job_id, tenant, row.model, spec)
                if work is None:  # ended here: cached, or its set is gone
                    continue
            priors = self._prior_sources(job_id, tenant, spec)
            if priors is None:  # its prior's set is gone: FAILED
                continue
            ticket = self._tickets.pop(job_id, "")
            matches = None
            if not ticket and work is None:  # checked again by the worker: a match term needs its sources again
                matches = self._match_sources(job_id, tenant, row.model, spec)
                if matches is False:
                    continue
            self.worker.submit(api.Submission(job_id=job_id, tenant=tenant, model=row.model, spec=row.spec,
                                              images=images, exclusive=job_id in self._exclusive,
                                              ticket=ticket, index=work, priors=priors,
                                              matches=matches or None))

    def _match_sources(self, job_id: str, tenant: str, model: str, spec: pb.JobSpec):
        """Exemplar matching: the MatchSources of a re-queued job's match terms; False when its index or set is
        gone (the job ends FAILED here, its grant released)."""
        from featureviz.server.matching import match_sources

        try:
            return match_sources(self.store, tenant, model, spec, self.max_match_k)
        except Exception as exc:  # the index or its set went: the job ends, the queue goes on
            from featureviz.errors import job_error

            log.warning("job %s cannot start: %s", job_id, exc)
            self._release(job_id)
            self.store.finish_job(job_id, pb.JOB_STATE_FAILED, error=job_error(exc))
            self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
            return False

    # ------------------------------------------------------------------------------------------- atlases

    def submit_atlas(self, job_id: str, tenant: str) -> None:
        """A new atlas job (its units are in the store): its units are granted in the room interactive jobs
        leave."""
        row = self.store.get_job(job_id)
        with self._cv:
            self._add_atlas(job_id, tenant, row.model, pb.JobSpec.FromString(row.spec))
            self._dispatch()

    def atlases(self, tenant: str) -> int:
        """The tenant's unfinished atlases."""
        with self._cv:
            return sum(1 for run in self._atlases.values() if run.tenant == tenant)

    def unfinished(self, tenant: str) -> int:
        """The tenant's jobs stored QUEUED or RUNNING, counted in memory (CreateJob's queue limit): its queued and
        granted jobs, and its atlases. Each job row a CreateJob stores unfinished is submitted here in the same
        step of the event loop, and every end releases it, so this equals the store's count (the tests compare)."""
        with self._cv:
            return self._jobs_of[tenant] + sum(1 for run in self._atlases.values() if run.tenant == tenant)

    def _add_atlas(self, job_id: str, tenant: str, model: str, spec: pb.JobSpec) -> None:
        units = [(*unit, RENDER) for unit in self.store.pending_units(job_id)]
        variants = [tuple(v) for v in self.store.pending_variants(job_id)]
        total = self.store.atlas_unit_count(job_id)
        self._turn += 1
        run = _AtlasRun(job_id, tenant, model, spec, sorted(units + variants, key=lambda p: (p[0], p[4])), total,
                        total - len(units), self._turn)
        run.variants_total = self.store.variant_counts(job_id)[0]
        run.variants_done = run.variants_total - len(variants)
        run.join = self.store.atlas_join(job_id)
        self._atlases[job_id] = run
        self._progress[job_id] = self._atlas_progress(run)
        self._update_join(run)
        self._maybe_finish(run)

    @staticmethod
    def _atlas_progress(run: _AtlasRun) -> tuple[int, int, list]:
        """The atlas job's step/steps: its renders (units and variants) done, of all."""
        return run.done + run.variants_done, run.total + run.variants_total, []

    def _maybe_finish(self, run: _AtlasRun) -> None:
        """Finish the atlas when nothing is left to render and its join is settled (call with the lock held)."""
        if run.idle and run.settled and run.job_id in self._atlases:
            self._finish_atlas(run)

    # ------------------------------------------------------------------------------------------- dataset joins

    def _update_join(self, run: _AtlasRun) -> None:
        """Read the state of the atlas's index job: ready (join the done units), failed, or still waiting (call
        with the lock held)."""
        if run.join is None or run.join_state != "waiting":
            return
        try:
            state = self.store.get_job(run.join[1]).state
        except Exception:  # the index job row is gone
            state = pb.JOB_STATE_FAILED
        if state == pb.JOB_STATE_SUCCEEDED:
            run.join_state = "ready"
            self._want_join(run.job_id)
        elif state in TERMINAL_STATES:
            run.join_state = "failed"
            log.warning("atlas %s: its exemplar index job %s did not succeed; the atlas goes on without the dataset "
                        "join", run.job_id, run.join[1])
            self._maybe_finish(run)

    def _index_job_ended(self, job_id: str) -> None:
        """An exemplar index job ended: the atlases whose join waited for it go on (call with the lock held)."""
        for atlas_id in self.store.atlases_joining(job_id):
            run = self._atlases.get(atlas_id)
            if run is not None:
                self._update_join(run)

    def _want_join(self, atlas_id: str) -> None:
        with self._join_cv:
            self._join_wanted.add(atlas_id)
            self._join_cv.notify_all()

    def _join_loop(self) -> None:
        """The join thread: one pass at a time over an atlas's done units not joined yet."""
        while True:
            with self._join_cv:
                while not self._join_wanted and not self._join_stop:
                    self._join_cv.wait()
                if self._join_stop:
                    return
                atlas_id = self._join_wanted.pop()
            try:
                self._join_pass(atlas_id)
            except Exception as exc:  # the index file is gone or damaged, the worker failed: no join for this atlas
                log.warning("atlas %s: the dataset join failed: %s", atlas_id, exc)
                with self._cv:
                    run = self._atlases.get(atlas_id)
                    if run is not None:
                        run.join_state = "failed"
                        self._maybe_finish(run)

    def _join_pass(self, atlas_id: str, chunk: int = 64) -> None:
        """Join the atlas's done units not joined yet: per layer, the worker reads the channels' quantiles from the
        index and scores the renders on the same measure (api.JoinQuery); stored per (index, render key)."""
        join = self.store.atlas_join(atlas_id)
        if join is None:
            return
        index_id = join[2]
        model = self.store.get_job(atlas_id).model
        todo: dict[str, list] = {}
        for idx, layer, channel, key in self.store.units_to_join(atlas_id, index_id):
            todo.setdefault(layer, []).append((channel, key))
        joined = 0
        for layer, units in todo.items():
            for start in range(0, len(units), chunk):
                part = [(channel, key, self.store.get_unit(key)) for channel, key in units[start:start + chunk]]
                part = [(channel, key, found[0]) for channel, key, found in part if found is not None]
                if not part:
                    continue
                scores = self.worker.join_scores(api.JoinQuery(
                    index_path=str(self.store.index_path(index_id)), model=model, layer=layer,
                    units=[(channel, png) for channel, _, png in part]))
                self.store.put_scores(index_id, [(key, *values) for (_, key, _), values in zip(part, scores)])
                joined += len(part)
        # under the lock, a worker event's transaction is committed: what is left to join now is final
        with self._cv:
            run = self._atlases.get(atlas_id)
            if run is None:
                return
            if self.store.units_to_join(atlas_id, index_id):
                if todo and not joined:  # done units without a stored render: they cannot be joined
                    raise RuntimeError("units are done but their renders are not in the store")
                self._want_join(atlas_id)  # units that finished during the pass (or committed after its read)
            elif run.idle:
                run.join_complete = True
                self._progress[atlas_id] = self._atlas_progress(run)
                self.log(atlas_id).append(progress=pb.Progress(step=run.done + run.variants_done,
                                                               steps=run.total + run.variants_total))
                self._maybe_finish(run)

    def _dispatch_units(self) -> None:
        """Grant atlas units while the granted images stay below one device step (call with the lock held)."""
        while not self._stopping and self._held + self._bg_held < self.max_step_images:
            runs = [run for run in self._atlases.values() if run.pending and not run.cancelled]
            if not runs:
                return
            held: dict[str, int] = {}
            for atlas_id, *_ in self._units.values():
                owner = self._atlases.get(atlas_id)
                if owner is not None:
                    held[owner.tenant] = held.get(owner.tenant, 0) + 1
            run = min(runs, key=lambda r: (held.get(r.tenant, 0), self._bg_served.get(r.tenant, -1), r.order))
            item = run.pending.popleft()
            idx, layer, channel, key, variant = item
            # rendered before (another atlas, an earlier run): served from the store (a diversity set is stored
            # whole in one transaction: its first image stands for the set)
            if self.store.has_unit(image_key(key, 0) if variant == DIVERSITY else key):
                self._unit_done(run, idx, UNIT_CACHED, variant)
                continue
            if key in self._inflight:  # another atlas renders it now: this one takes it from the store after
                run.deferred.setdefault(key, []).append(item)
                continue
            unit = unit_job_id(run.job_id, idx, variant)
            images = run.spec.atlas.diversity if variant == DIVERSITY else 1
            self._units[unit] = (run.job_id, idx, key, variant, images)
            self._inflight[key] = unit
            run.running[unit] = key
            self._bg_held += images
            self._turn += 1
            self._bg_served[run.tenant] = self._turn
            self.worker.submit(api.Submission(job_id=unit, tenant=run.tenant, model=run.model,
                                              spec=variant_spec(run.spec, layer, channel, variant).SerializeToString(),
                                              images=images, background=True, priors=self._unit_priors(run)))

    def _unit_priors(self, run: _AtlasRun) -> dict:
        """The PriorSource of an atlas's prior_dataset for its units' submissions (empty without one). A set that is
        gone (it cannot be deleted while the atlas runs: a restart after a store was edited) leaves it empty: each unit
        then fails at the worker's check (``adapter.checked_spec``: NOT_FOUND naming the dataset)."""
        if run.priors is None:
            from featureviz.server.priors import prior_sources

            run.priors = {}
            if run.spec.prior_dataset:
                try:
                    run.priors = prior_sources(self.store, run.tenant, run.spec, 0)
                except Exception as exc:  # noqa: BLE001 - NotFound: logged, the units fail one by one
                    log.warning("atlas %s: its prior's dataset: %s", run.job_id, exc)
        return run.priors

    def _unit_done(self, run: _AtlasRun, idx: int, state: int, variant: int = RENDER) -> None:
        """A render of ``run`` ended (a unit's or one of its variants': rendered, served from the store or failed):
        recorded, progress logged, the unit's join queued, and the atlas finished when it was the last (call with
        the lock held)."""
        if variant == RENDER:
            self.store.finish_unit(run.job_id, idx, state)
            if state != UNIT_FAILED:
                run.done += 1
        else:
            self.store.finish_variant(run.job_id, idx, variant, state)
            if state != UNIT_FAILED:
                run.variants_done += 1
        if self.metrics is not None and state != UNIT_FAILED:
            self.metrics.atlas_units.labels("rendered" if state == UNIT_RENDERED else "cached").inc()
        self._atlas_running(run)
        self._progress[run.job_id] = self._atlas_progress(run)
        step, steps, _ = self._progress[run.job_id]
        self.log(run.job_id).append(progress=pb.Progress(step=step, steps=steps))
        if variant == RENDER and state != UNIT_FAILED and run.join_state == "ready":
            self._want_join(run.job_id)
        elif run.idle and run.join_state == "ready" and not run.join_complete:
            self._want_join(run.job_id)  # the last render was a variant: the pass that completes the join
        self._maybe_finish(run)

    def _atlas_running(self, run: _AtlasRun) -> None:
        if not run.started:
            run.started = True
            self.store.mark_running(run.job_id, "local")
            self.log(run.job_id).append(state=pb.JOB_STATE_RUNNING)

    def _finish_atlas(self, run: _AtlasRun) -> None:
        """The atlas ends: SUCCEEDED when every unit is done (or failed), else CANCELLED; its result is its
        progress (call with the lock held)."""
        self._atlases.pop(run.job_id, None)
        row = self.store.get_job(run.job_id)
        state = pb.JOB_STATE_CANCELLED if run.cancelled else pb.JOB_STATE_SUCCEEDED
        result = pb.JobResult(steps_done=run.done)
        result.atlas.CopyFrom(atlas_progress(self.store, run.job_id, start_time=row.start_time, finished=True))
        self.store.finish_job(run.job_id, state, result=result)
        self._progress.pop(run.job_id, None)
        self.log(run.job_id).append(result=self.store.get_job(run.job_id).to_proto())
        if self.metrics is not None:
            self.metrics.jobs.labels("cancelled" if run.cancelled else "succeeded").inc()
        log.info("atlas %s %s: %d of %d units", run.job_id, "cancelled" if run.cancelled else "succeeded",
                 run.done, run.total)

    def _cancel_atlas(self, run: _AtlasRun) -> None:
        run.cancelled = True
        run.pending.clear()
        run.deferred.clear()
        for unit in list(run.running):
            self.worker.cancel(unit)
        if not run.running:
            self._finish_atlas(run)

    def _on_unit(self, event: api.WorkerEvent) -> None:
        """An event of an atlas unit (worker thread)."""
        unit = event.job_id
        if event.kind == api.STARTED:
            with self._cv:
                self._unit_workers[unit] = event.worker or "local"
                found = self._units.get(unit)
                run = self._atlases.get(found[0]) if found else None
                if run is not None:
                    self._atlas_running(run)
            return
        if event.kind not in (api.FINISHED, api.REQUEUED, api.LOST):
            return  # a unit's progress and previews are not logged: its atlas's progress counts units
        with self._cv:
            found = self._units.pop(unit, None)
            worker = self._unit_workers.pop(unit, "local")
            if found is None:
                return
            atlas_id, idx, key, variant, images = found
            self._bg_held -= images
            self._inflight.pop(key, None)
            run = self._atlases.get(atlas_id)
            if run is not None:
                run.running.pop(unit, None)
        state = None
        if event.kind == api.FINISHED and event.state == pb.JOB_STATE_SUCCEEDED and event.result is not None \
                and event.result.images and run is not None:
            # its share of the steps (a worker before JobResult.device_seconds: the steps' whole time)
            seconds = event.result.device_seconds or event.result.steps_done * event.result.seconds_per_step
            device = f"{worker} ({self._device()})"
            if variant == DIVERSITY:  # the set's images, all at once
                self.store.put_units([(image_key(key, i), image) for i, image in enumerate(event.result.images)],
                                     run.model, seconds, device)
            else:
                self.store.put_unit(key, run.model, event.result.images[0], seconds, device)
            state = UNIT_RENDERED
        elif event.kind == api.FINISHED and event.state == pb.JOB_STATE_FAILED:
            log.warning("atlas %s: unit %d failed: %s", atlas_id, idx, event.error.message if event.error else "")
            state = UNIT_FAILED
        with self._cv:
            for other in self._atlases.values():  # units waiting for this key: from the store now, or render it
                other.pending.extendleft(reversed(other.deferred.pop(key, [])))
            if run is not None:
                if state is not None:
                    self._unit_done(run, idx, state, variant)
                elif run.cancelled:
                    if not run.running:
                        self._finish_atlas(run)
                else:  # re-queued (stop), lost, or cancelled by no one of ours: it renders again
                    row = self.store.atlas_units(run.job_id, offset=idx, limit=1)[0]
                    run.pending.appendleft((row[0], row[1], row[3], key, variant))
            self._dispatch()

    def _device(self) -> str:
        if self._device_name is None:
            try:
                device = self.worker.device()
                self._device_name = device.name or device.kind or "?"
            except Exception:
                self._device_name = "?"
        return self._device_name

    def finish_from_store(self, job_id: str, tenant: str, key: str) -> bool:
        """End a batch-1 channel render at once, SUCCEEDED, with the stored unit render of its key (an atlas
        made it); False when the key is not stored."""
        found = self.store.get_unit(key)
        if found is None:
            return False
        png, width, height, objective, _, _, _ = found
        spec = pb.JobSpec.FromString(self.store.get_job(job_id).spec)
        result = pb.JobResult(steps_done=spec.steps, images=[pb.RenderedImage(
            index=0, png=png, width=width, height=height, objective_end=objective)])
        self.store.finish_job(job_id, pb.JOB_STATE_SUCCEEDED, result=result)
        self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
        if self.metrics is not None:
            self.metrics.atlas_units.labels("cached").inc()
            self.metrics.jobs.labels("succeeded").inc()
        return True

    def _index_work(self, job_id: str, tenant: str, model: str, spec: pb.JobSpec) -> api.IndexWork | None:
        """An index job's IndexWork; None when it ended here instead (call with the lock held): its index is
        finished already (cached), or the set cannot be read (FAILED)."""
        from featureviz.errors import job_error
        from featureviz.server.indexes import index_id
        from featureviz.server.indexes import index_work

        try:
            found = self.store.get_index(index_id(model, spec))
            if found is not None:
                self._release(job_id)
                self.finish_cached(job_id, tenant, model, found[1])
                return None
            return index_work(self.store, tenant, model, spec, self.index_chunk_images)
        except Exception as exc:  # the set went (or the store failed): the job ends, the queue goes on
            log.warning("index job %s cannot start: %s", job_id, exc)
            self._release(job_id)
            self.store.finish_job(job_id, pb.JOB_STATE_FAILED, error=job_error(exc))
            self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
            self._index_job_ended(job_id)
            return None

    def _prior_sources(self, job_id: str, tenant: str, spec: pb.JobSpec) -> dict | None:
        """The job's prior datasets for the worker (empty: none; what it reads when it checks the spec again after
        a restart); None when the job ended here instead: the tenant no longer holds a set (FAILED)."""
        from featureviz.errors import job_error
        from featureviz.server.priors import prior_fields
        from featureviz.server.priors import prior_sources

        if not prior_fields(spec):
            return {}
        try:
            return prior_sources(self.store, tenant, spec, 0)
        except Exception as exc:
            log.warning("job %s cannot start: %s", job_id, exc)
            self._release(job_id)
            self.store.finish_job(job_id, pb.JOB_STATE_FAILED, error=job_error(exc))
            self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
            return None

    def finish_cached(self, job_id: str, tenant: str, model: str, info: pb.ExemplarIndexResult) -> None:
        """End an index job at once, SUCCEEDED, with a finished index's result (``cached``): nothing computed. The
        tenant is recorded as a user of the index; watchers see the usual result event."""
        result = pb.JobResult(steps_done=info.images + info.skipped)
        result.exemplar_index.CopyFrom(info)
        result.exemplar_index.cached = True
        self.store.record_index(tenant, model, info)
        self.store.forget_indexes(tenant, self.max_indexes_per_tenant)
        self.store.finish_job(job_id, pb.JOB_STATE_SUCCEEDED, result=result)
        self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
        if self.metrics is not None:
            self.metrics.jobs.labels("succeeded").inc()
        with self._cv:
            self._index_job_ended(job_id)

    def _release(self, job_id: str) -> None:
        granted = self._granted.pop(job_id, None)
        if granted is not None:
            images = self._images_of.get(job_id, 1)
            self._held -= images
            self._held_of[granted] -= images
            if self._held_of[granted] <= 0:
                del self._held_of[granted]
        tenant = self._tenant_of.pop(job_id, None)
        if tenant is not None:
            self._jobs_of[tenant] -= 1
            if self._jobs_of[tenant] <= 0:
                del self._jobs_of[tenant]
        self._images_of.pop(job_id, None)
        cost = self._cost_of.pop(job_id, None)
        if tenant is not None and cost is not None:
            self._cost_by_tenant[tenant] -= cost
            if self._cost_by_tenant[tenant] <= 0:
                del self._cost_by_tenant[tenant]
        self._tickets.pop(job_id, None)
        self._exclusive.discard(job_id)
        self._indexing.pop(job_id, None)
        self._progress.pop(job_id, None)
        self._started.pop(job_id, None)
        self._rows.pop(job_id, None)

    def is_running(self, job_id: str) -> bool:
        """Whether the worker holds this job (from the grant until its end is in the log)."""
        with self._cv:
            return job_id in self._granted

    def is_unfinished(self, job_id: str) -> bool:
        """Whether the job is queued here or held by the worker: its end is not stored, and when it comes its
        result event follows in the log."""
        with self._cv:
            return job_id in self._granted or job_id in self._tenant_of

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def cancel(self, job_id: str, tenant: str) -> pb.Job:
        with self._cv:
            row = self.store.get_job(job_id, tenant)
            if job_id in self._atlases:  # the units in flight stop, what is done stays
                self._cancel_atlas(self._atlases[job_id])
            elif job_id in self._granted:
                self.worker.cancel(job_id)
            elif job_id in self._queue:
                self._queue.remove(job_id)
                self._release(job_id)
                self.store.finish_job(job_id, pb.JOB_STATE_CANCELLED)
                self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
                self._index_job_ended(job_id)
                if self.metrics is not None:
                    self.metrics.jobs.labels("cancelled").inc()
            elif row.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED):
                raise FailedPrecondition(f"job {job_id} already finished ({pb.JobState.Name(row.state)}); "
                                         "nothing to cancel", reason="JOB_FINISHED")
        return self.job(job_id, tenant)

    def job(self, job_id: str, tenant: str | None, *, with_images: bool = True, row=None) -> pb.Job:
        """The stored job with the live progress of a running one and the queue position of a queued one.
        ``row``: the JobRow its creation just stored (CreateJob's reply, CreateAndWatchJob's first snapshot), read
        from nowhere else; what changed since (its start) comes from the log."""
        with self._cv:  # progress before the row: a job that ends in between reads as finished, not as step 0
            progress = self._progress.get(job_id)
            row = row or self._rows.get(job_id)
        if row is None or (tenant is not None and row.tenant != tenant):
            row = self.store.get_job(job_id, tenant)  # NOT_FOUND for another tenant's job
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

    def log(self, job_id: str, row=None) -> JobLog:
        """The job's event log in memory (made from its stored last_seq when absent; ``row``: as for :meth:`job`)."""
        with self._cv:
            found = self._logs.get(job_id)
            if found is None:
                row = row or self._rows.get(job_id) or self.store.get_job(job_id)
                found = JobLog(self._loop, row.last_seq, on_seq=None)
                found._on_seq = lambda seq, found=found: self._logged(job_id, found, seq)
                self._logs[job_id] = found
                self._evict_logs()
            return found

    def _evict_logs(self) -> None:
        """Keep the newest ``finished_logs_kept`` logs of finished jobs. A walk over every log, so at most once per
        a quarter of that many new logs (a burst of jobs made no walk per job); up to that many more are kept."""
        if len(self._logs) < self._evict_at:
            return
        finished = [job_id for job_id, lg in self._logs.items() if lg.finished]
        for job_id in finished[: max(0, len(finished) - self._finished_logs_kept)]:
            del self._logs[job_id]
        self._evict_at = len(self._logs) + max(1, self._finished_logs_kept // 4)

    def _logged(self, job_id: str, log_: JobLog, seq: int) -> bool:
        """A JobLog's event got ``seq``: store it (in the batch's transaction on the event thread, then published
        after the commit: -> False; otherwise at once: -> True)."""
        self.store.set_last_seq(job_id, seq)
        batch = getattr(self._batch, "logs", None)
        if batch is None:
            return True
        batch[id(log_)] = log_
        return False

    # ------------------------------------------------------------------------------------------- worker events

    def _on_event(self, event: api.WorkerEvent | list[api.WorkerEvent]) -> None:
        """Called on the worker's event thread, in order: one event, or a list of them (what the worker had at
        once: one store transaction for all, their events published after its commit)."""
        events = event if isinstance(event, list) else [event]
        self._batch.logs = logs = {}
        try:  # the lock order everywhere: the scheduler's, then the store's
            with self._cv, self.store.transaction():
                for one in events:
                    self._handle(one)
        except Exception:  # the commit failed: what it held is logged in memory all the same
            log.exception("storing %d worker event(s)", len(events))
        finally:
            self._batch.logs = None
            for found in logs.values():
                found.publish()

    def _handle(self, event: api.WorkerEvent) -> None:
        try:
            if event.job_id and event.job_id in self._units:
                self._on_unit(event)
                return
            handler = getattr(self, f"_on_{event.kind}")
            with phase(_EVENT_PHASES.get(event.kind, "step bookkeeping")):
                handler(event)
        except Exception:  # the store itself failed: log and keep serving
            log.exception("worker event %s of job %s", event.kind, event.job_id)

    def _on_started(self, event: api.WorkerEvent) -> None:
        job_id = event.job_id
        with self._cv:
            row = self._rows.pop(job_id, None) or self.store.get_job(job_id)
        self.store.mark_running(job_id, event.worker or "local")
        with self._cv:
            self._started[job_id] = time.perf_counter()
        self.log(job_id).append(state=pb.JOB_STATE_RUNNING)
        if self.metrics is not None:
            self.metrics.queue_seconds.observe(max(0.0, time.time() - row.create_time))

    def _on_progress(self, event: api.WorkerEvent) -> None:
        p = event.progress
        with self._cv:
            before = self._progress.get(event.job_id, (0, 0, []))[0]
            self._progress[event.job_id] = (p.step, p.steps, list(p.objective))
        self.log(event.job_id).append(progress=p)
        if self.metrics is not None:
            for _ in range(max(1, p.step - before)):  # one observation per step, at the mean of the interval
                self.metrics.step_seconds.observe(p.seconds_per_step)

    def _on_preview(self, event: api.WorkerEvent) -> None:
        self.log(event.job_id).append(preview=event.preview)

    def _on_finished(self, event: api.WorkerEvent) -> None:
        job_id = event.job_id
        if event.state == pb.JOB_STATE_SUCCEEDED and event.result is not None \
                and event.result.HasField("exemplar_index"):  # recorded before the job ends: its watchers may ask
            row = self.store.get_job(job_id)
            self.store.record_index(row.tenant, row.model, event.result.exemplar_index)
            self.store.forget_indexes(row.tenant, self.max_indexes_per_tenant)
        self.store.finish_job(job_id, event.state, result=event.result,
                              error=event.error if event.state == pb.JOB_STATE_FAILED else None)
        with self._cv:
            started = self._started.get(job_id)
        outcome = {pb.JOB_STATE_SUCCEEDED: "succeeded", pb.JOB_STATE_FAILED: "failed",
                   pb.JOB_STATE_CANCELLED: "cancelled"}[event.state]
        if self.metrics is not None:
            self.metrics.jobs.labels(outcome).inc()
            if started is not None:
                self.metrics.run_seconds.observe(time.perf_counter() - started)
            if event.state == pb.JOB_STATE_FAILED:
                self.metrics.failures.labels(event.error.reason).inc()
        log.info("job %s %s%s", job_id, outcome, f" in {time.perf_counter() - started:.1f} s" if started else "")
        self.log(job_id).append(result=self.store.get_job(job_id).to_proto())
        with self._cv:
            indexing = job_id in self._indexing
            self._release(job_id)
            if indexing:
                self._index_job_ended(job_id)
            self._dispatch()

    def _on_requeued(self, event: api.WorkerEvent) -> None:
        self.store.mark_queued(event.job_id)  # the next start runs it again from step 0
        self.log(event.job_id).append(state=pb.JOB_STATE_QUEUED)
        if self.metrics is not None:
            self.metrics.jobs.labels("requeued").inc()
        with self._cv:
            self._release(event.job_id)

    def _on_lost(self, event: api.WorkerEvent) -> None:
        """The worker running the job died (a Ray actor): the job goes back to the head of the queue and runs
        again from step 0 with the same spec (seed included). The worker bounds the attempts (WORKER_LOST)."""
        job_id = event.job_id
        row = self.store.get_job(job_id)
        if self.metrics is not None:
            self.metrics.jobs.labels("lost").inc()
        with self._cv:
            self._release(job_id)
            if row.state not in TERMINAL_STATES:
                self.store.mark_queued(job_id)
                self.log(job_id).append(state=pb.JOB_STATE_QUEUED)
                self._enqueue(job_id, row.tenant, pb.JobSpec.FromString(row.spec))
                self._queue.remove(job_id)
                self._queue.appendleft(job_id)
            self._dispatch()

    def _on_steps(self, event: api.WorkerEvent) -> None:
        if self.metrics is not None:
            worker = event.worker or "local"
            for images, seconds in event.steps:
                self.metrics.batch_images.observe(images)
                self.metrics.device_step_seconds.observe(seconds)
                self.metrics.worker_steps.labels(worker).inc()
                self.metrics.worker_images.labels(worker).inc(images)

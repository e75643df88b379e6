"""What the worker's next device step is made of: a pure function of a snapshot (no torch, no threads, no clock).

vLLM's ``schedule() -> SchedulerOutput`` in small: :func:`schedule` takes a :class:`WorkerState` (the jobs the
worker holds, its round-robin order, the chunk sizes left by out-of-memory splits, the free memory) and returns a
:class:`StepPlan`:

1. time slicing (:func:`featureviz.worker.slices.plan`) chooses the jobs that step, at most ``capacity`` images
   when they do not all fit; joined jobs left out are parked (their slots keep their state), chosen ones that were
   parked, or whose slice is spent while others wait, start a new slice (``ran`` 0, their tenant served now);
2. the chosen waiting jobs join, in the order they came, while memory admission lets them: a job's estimate
   (``per image x images``, plus its fixed cost unless its group already steps) must fit ``free``; nothing held:
   it joins whatever its estimate. The first that does not fit waits, and so do the ones after it (first come,
   first served); time slicing then plans again without them, so the others keep stepping;
3. the next group (same model, model input size and layout; an exclusive job is a group of its own) in
   round-robin order steps; new groups go to the back of the order;
4. its active jobs are cut into chunks of at most ``caps.get(group, capacity)`` images (an out-of-memory error
   lowers a group's cap: :func:`shrink`; the failed chunk is retried in :func:`halves`).

The worker's device thread (:class:`featureviz.worker.local.LocalWorker`) applies the plan: it parks and activates
the slots, joins the new ones (their STARTED events, one forward per group for their starting objective), steps
the chunks (one per job where the group's rows are not independent), splits a chunk that runs out of memory, and
emits the events. Everything it decides is here, testable without a device or a thread
(``tests/service/test_service_planner.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

from featureviz.worker.slices import Entry
from featureviz.worker.slices import plan

__all__ = ["JobState", "WorkerState", "StepPlan", "schedule", "chunks", "shrink", "halves", "group_key", "hold",
           "HOLD_MIN_SECONDS", "HOLD_MAX_SECONDS", "HOLD_GAP_SECONDS"]

HOLD_MIN_SECONDS = 0.05  # a step held for admissions in flight waits at least this long (unless they end) ...
HOLD_MAX_SECONDS = 1.0  # ... and at most this long
HOLD_GAP_SECONDS = 0.02  # a burst's submissions may pause this long between two (the hold goes on)


@dataclass(frozen=True)
class JobState:
    """One job as the planner sees it. ``joined``: in the device steps (active, or parked), else waiting to join.
    ``ran``: steps since it last became active; ``since``: the tick it last started to wait (lower: longer).
    ``memory``: its (fixed, per image) bytes estimate, None when unknown (it then joins; the step decides)."""

    job_id: str
    tenant: str
    images: int
    group: Hashable
    joined: bool = False
    active: bool = False
    ran: int = 0
    since: int = 0
    memory: tuple[float, float] | None = None
    background: bool = False  # an atlas unit: it takes only the room the others leave (slices.plan)

    def entry(self) -> Entry:
        return Entry(self.job_id, self.tenant, self.images, self.active, self.ran, self.since, self.background)


@dataclass(frozen=True)
class WorkerState:
    """A snapshot of the worker. ``jobs``: the joined jobs in the order they joined, then the waiting ones in the
    order they came. ``capacity``: images per device step (``max_step_images``). ``tick``: planning rounds so far.
    ``served``: tenant -> the tick it last had a job activated. ``order``: group keys, round robin. ``caps``: group
    -> images per chunk after an out-of-memory split. ``free``: the memory a joining job may take now (free less
    the headroom); None: no memory admission."""

    jobs: Sequence[JobState]
    capacity: int
    slice_steps: int
    tick: int = 0
    served: Mapping[str, int] = field(default_factory=dict)
    order: Sequence[Hashable] = ()
    caps: Mapping[Hashable, int] = field(default_factory=dict)
    free: float | None = None


@dataclass(frozen=True)
class StepPlan:
    """What the next device step is made of. ``jobs``: every planned job's new state (by id: the joined ones and
    the joiners; the worker copies ``active``, ``ran`` and ``since``). ``join``: the waiting jobs that join now, in
    order; ``wait``: those time slicing chose that memory admission holds back. ``group``: the group that steps
    (None: none), ``members`` its active jobs, ``chunks`` them in steps of at most its cap."""

    tick: int
    served: dict[str, int]
    order: tuple
    jobs: dict[str, JobState]
    join: tuple[str, ...] = ()
    wait: tuple[str, ...] = ()
    group: Hashable | None = None
    members: tuple[str, ...] = ()
    chunks: tuple[tuple[str, ...], ...] = ()

    @property
    def parked(self) -> tuple[str, ...]:
        return tuple(job_id for job_id, job in self.jobs.items() if not job.active)


def group_key(engine_group: tuple, job_id: str, exclusive: bool) -> tuple:
    """A job's group: the engine's group key (model, model input size, layout), or a group of its own when it is
    exclusive (it never shares a device step)."""
    return ("exclusive", job_id, *engine_group) if exclusive else engine_group


def schedule(state: WorkerState) -> StepPlan:
    """The next step (see the module docstring)."""
    tick, served = state.tick, dict(state.served)
    jobs = {job.job_id: job for job in state.jobs}
    joined = [job.job_id for job in state.jobs if job.joined]
    waiting = [job.job_id for job in state.jobs if not job.joined]
    joining: list[str] = []
    blocked: set[str] = set()
    while any(i not in blocked for i in (*joined, *waiting)):
        tick += 1
        chosen = _slice(state, jobs, [i for i in (*joined, *waiting) if i not in blocked], joined, served, tick)
        candidates = [i for i in waiting if i in chosen and i not in blocked]
        for n, i in enumerate(candidates):
            if not _fits(jobs[i], jobs, joined, state.free):
                blocked.update(candidates[n:])  # first come, first served: the later ones wait behind it
                break
            waiting.remove(i)
            joined.append(i)
            joining.append(i)
            jobs[i] = _activate(dataclasses.replace(jobs[i], joined=True), served, tick)
        else:
            break  # everyone chosen joined: no need to plan again
    order, group = _next_group(state.order, [jobs[i] for i in joined])
    members = tuple(i for i in joined if jobs[i].active and jobs[i].group == group) if group is not None else ()
    return StepPlan(tick=tick, served=served, order=order, jobs={i: jobs[i] for i in joined}, join=tuple(joining),
                    wait=tuple(i for i in waiting if i in blocked), group=group, members=members,
                    chunks=chunks([(i, jobs[i].images) for i in members], state.caps.get(group, state.capacity)))


def _slice(state: WorkerState, jobs: dict[str, JobState], ids: list[str], joined: list[str], served: dict[str, int],
           tick: int) -> set[str]:
    """Time slicing over ``ids``: the chosen ones; joined jobs left out are parked, chosen ones that were parked, or
    whose slice is spent while others wait, start a new slice (``jobs`` and ``served`` are updated)."""
    contended = sum(jobs[i].images for i in ids) > state.capacity
    chosen = set(plan([jobs[i].entry() for i in ids], state.capacity, state.slice_steps, served))
    for i in joined:
        job = jobs[i]
        if i not in chosen:
            if job.active:  # parked: its slot keeps its whole state
                jobs[i] = dataclasses.replace(job, active=False, since=tick)
        elif not job.active or (contended and job.ran >= state.slice_steps):  # resumed, or a new slice
            jobs[i] = _activate(job, served, tick)
    return chosen


def _next_group(order: Sequence[Hashable], joined: list[JobState]) -> tuple[tuple, Hashable | None]:
    """(the round-robin order after this step, the group that steps): the first group in ``order`` with an active
    job, moved to the back; new groups (the joiners') join the order at the back. None when no job is active (the
    order then keeps only groups with active jobs: none)."""
    order = list(order)
    live = {job.group for job in joined if job.active}
    for job in joined:
        if job.group in live and job.group not in order:
            order.append(job.group)
    for _ in range(len(order)):
        key = order.pop(0)
        order.append(key)
        if key in live:
            return tuple(order), key
    return tuple(key for key in order if key in live), None


def _activate(job: JobState, served: dict[str, int], tick: int) -> JobState:
    served[job.tenant] = tick
    return dataclasses.replace(job, active=True, ran=0)


def _fits(job: JobState, jobs: dict[str, JobState], joined: list[str], free: float | None) -> bool:
    """Memory admission: whether the job's estimate fits ``free`` (always when nothing else is held)."""
    if free is None or not joined or job.memory is None:
        return True
    fixed, per_image = job.memory
    group_steps = any(jobs[i].group == job.group and jobs[i].active for i in joined)
    return per_image * job.images + (0.0 if group_steps else fixed) <= free


def chunks(members: Sequence[tuple[str, int]], cap: int) -> tuple[tuple[str, ...], ...]:
    """``(job id, images)`` in order, cut into runs of at most ``cap`` images (a job larger than ``cap`` alone)."""
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    images = 0
    for job_id, n in members:
        if current and images + n > cap:
            out.append(tuple(current))
            current, images = [], 0
        current.append(job_id)
        images += n
    if current:
        out.append(tuple(current))
    return tuple(out)


def shrink(cap: int | None, images: int) -> int:
    """A group's chunk cap after a step of ``images`` images ran out of memory: the largest size below the one that
    failed (``cap``: the group's cap before, None when it had none)."""
    return min(images if cap is None else cap, images - 1)


def halves(chunk: Sequence) -> tuple[Sequence, Sequence]:
    """A failed chunk of several jobs, cut in two to retry each half."""
    half = len(chunk) // 2
    return chunk[:half], chunk[half:]


def hold(admitting: int, joining: int, stepping: int, last_step: float) -> float:
    """Seconds the device thread may wait, before it plans a step, for a burst of jobs arriving: ``admitting``
    admissions in flight on the server (CreateJob calls between their checks and their submit), plus one when a
    submission came within ``HOLD_GAP_SECONDS``. The worker stops waiting once none is in flight and none came within
    ``HOLD_GAP_SECONDS`` (a burst's requests reach the server one by one). A burst of jobs then starts as one step
    instead of a partial step and the rest round by round (more, smaller steps), and the admissions get the CPU and
    the GIL meanwhile.

    Only when jobs wait to join (``joining`` images) and, with the ones arriving, they are at least a quarter of the
    images stepping now (``stepping``): a trickle of new jobs beside many running ones does not hold them. Nothing
    stepping: up to ``HOLD_MAX_SECONDS`` (the device is idle anyway); else at most one step's time (``last_step``,
    the last device step's seconds, within [HOLD_MIN_SECONDS, HOLD_MAX_SECONDS]), so running jobs keep at least half
    their pace while a burst lasts."""
    if admitting <= 0 or joining <= 0 or 4 * (admitting + joining) < stepping:
        return 0.0
    if stepping <= 0:
        return HOLD_MAX_SECONDS
    return min(HOLD_MAX_SECONDS, max(HOLD_MIN_SECONDS, last_step))

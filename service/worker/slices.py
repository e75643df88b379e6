"""Time slicing: which of the worker's jobs step next (a pure function; no torch, no threads).

The scheduler may grant the worker more images than fit one device step (a tenant that holds less than its share
gets its next job even when the worker is full, :class:`featureviz.server.scheduler.Scheduler`). The worker then
steps at most ``capacity`` images (its ``max_step_images``) and parks the rest: a parked job keeps its whole state
(parameters, Adam moments and step counts, random generators, schedule and plateau state) and stays RUNNING.

:func:`plan` picks the jobs of the next steps, vLLM ``schedule()`` style:

- everything fits: every job steps (no slicing);
- else an active job keeps stepping until it has taken ``slice_steps`` steps since it last became active;
- the free room goes to the other jobs (new, parked, or active with their slice spent) in fair order: the tenant
  holding the fewest images in the chosen set first, then the tenant served (activated) least recently, then the
  job that has waited longest (a job whose slice is spent counts as waiting from now, behind every parked job);
- the fairest job that does not fit waits for room and nothing is chosen after it (a large job is not starved by
  small ones); a job larger than ``capacity`` steps alone.

So a job waits at most ``slice_steps`` steps of the running jobs before it steps, whatever the others hold.

Background jobs (atlas units, ``Entry.background``) take only the room the others leave: the others are planned
first as if the background ones were not there, then the background ones fill what is left (the active ones first,
so a unit keeps stepping while it fits, then the fairest: the tenant holding the fewest background images, then
the one served least recently). A job that is not background therefore steps at the next plan, parking background
units as needed.
:func:`featureviz.worker.planner.schedule` calls it when it plans each device step.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Entry", "plan"]


@dataclass
class Entry:
    """One job as the planner sees it. ``ran``: steps taken since it last became active. ``since``: when it last
    started to wait (a counter: lower waited longer)."""

    job_id: str
    tenant: str
    images: int
    active: bool = False
    ran: int = 0
    since: int = 0
    background: bool = False


def plan(entries: list[Entry], capacity: int, slice_steps: int, served: dict[str, int] | None = None) -> list[str]:
    """The ids of the jobs that step next, in ``entries`` order (see the module docstring). ``served``: tenant ->
    the turn it last had a job activated (absent: never)."""
    served = served or {}
    if sum(e.images for e in entries) <= capacity:
        return [e.job_id for e in entries]
    if any(e.background for e in entries):
        front = set(plan([e for e in entries if not e.background], capacity, slice_steps, served))
        return [e.job_id for e in entries if e.job_id in front or e.job_id in _fill(entries, front, capacity, served)]
    slice_steps = max(1, slice_steps)
    chosen = {e.job_id for e in entries if e.active and e.ran < slice_steps}
    held: dict[str, int] = {}
    used = 0
    for e in entries:
        if e.job_id in chosen:
            held[e.tenant] = held.get(e.tenant, 0) + e.images
            used += e.images
    rest = [e for e in entries if e.job_id not in chosen]
    while rest:
        best = min(rest, key=lambda e: (held.get(e.tenant, 0), served.get(e.tenant, -1), e.active, e.since))
        if used and used + best.images > capacity:
            break  # the fairest job waits for room; nothing jumps ahead of it
        rest.remove(best)
        chosen.add(best.job_id)
        held[best.tenant] = held.get(best.tenant, 0) + best.images
        used += best.images
        if used >= capacity:
            break
    return [e.job_id for e in entries if e.job_id in chosen]


def _fill(entries: list[Entry], front: set[str], capacity: int, served: dict[str, int]) -> set[str]:
    """The background entries that fit the room the others (``front``) leave: active ones first, then the fairest
    (tenant holding the fewest background images, served least recently, waiting longest)."""
    used = sum(e.images for e in entries if e.job_id in front)
    rest = [e for e in entries if e.background]
    held: dict[str, int] = {}
    chosen: set[str] = set()
    while rest and used < capacity:
        best = min(rest, key=lambda e: (not e.active, held.get(e.tenant, 0), served.get(e.tenant, -1), e.since))
        rest.remove(best)
        if used + best.images > capacity:
            continue
        chosen.add(best.job_id)
        held[best.tenant] = held.get(best.tenant, 0) + best.images
        used += best.images
    return chosen

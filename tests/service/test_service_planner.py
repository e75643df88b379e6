"""The worker's step planner (featureviz.worker.planner.schedule), tested directly: no torch, no threads, no device.

What one device step is made of: which waiting jobs join (memory admission), which are parked (time slicing),
which group steps (round robin), and its chunks (the cap an out-of-memory split leaves). The worker's loop only
applies the plan; the real-server tests of test_service_fairness.py and test_service_batching.py run it.
"""

from __future__ import annotations

import dataclasses

from featureviz.worker.planner import JobState
from featureviz.worker.planner import WorkerState
from featureviz.worker.planner import chunks
from featureviz.worker.planner import group_key
from featureviz.worker.planner import halves
from featureviz.worker.planner import schedule
from featureviz.worker.planner import shrink

A, B, C = ("model-a", (32, 32), "auto"), ("model-b", (32, 32), "auto"), ("model-c", (64, 64), "auto")
MiB = 2**20


def _job(job_id, group=A, *, tenant="t", images=1, joined=False, active=None, **kw) -> JobState:
    return JobState(job_id, tenant, images, group, joined=joined, active=joined if active is None else active, **kw)


def _state(jobs, capacity=4, slice_steps=8, **kw) -> WorkerState:
    return WorkerState(jobs=jobs, capacity=capacity, slice_steps=slice_steps, **kw)


def _after(state: WorkerState, step) -> WorkerState:
    """The state the worker is in once it applied ``step`` and ran it (the members took one step each)."""
    jobs = [dataclasses.replace(job, ran=job.ran + (job.job_id in step.members)) for job in step.jobs.values()]
    waiting = [job for job in state.jobs if not job.joined and job.job_id not in step.jobs]
    return dataclasses.replace(state, jobs=jobs + waiting, tick=step.tick, served=step.served, order=step.order)


def test_waiting_jobs_join_in_order_and_their_group_steps_in_one_chunk():
    step = schedule(_state([_job("j1"), _job("j2", images=2)]))
    assert step.join == ("j1", "j2") and step.wait == ()
    assert step.group == A and step.members == ("j1", "j2") and step.chunks == (("j1", "j2"),)
    assert all(job.joined and job.active and job.ran == 0 for job in step.jobs.values())
    assert step.tick == 1 and step.served == {"t": 1} and step.order == (A,)


def test_nothing_to_do_plans_no_step_and_forgets_dead_groups():
    step = schedule(_state([], order=(A, B)))
    assert step.group is None and step.members == step.chunks == () and step.order == ()
    assert step.tick == 0


def test_groups_step_round_robin_and_new_groups_go_to_the_back():
    state = _state([_job("a1", A, joined=True), _job("b1", B, joined=True), _job("c1", C)], order=(A, B))
    seen = []
    for _ in range(6):
        step = schedule(state)
        seen.append(step.group)
        assert step.members == tuple(i for i, job in step.jobs.items() if job.group == step.group)
        state = _after(state, step)
    assert seen == [A, B, C, A, B, C]  # the joiner's group C after the groups already in the order
    assert schedule(_state([_job("a1", A, joined=True)], order=(B, A))).order == (B, A)  # B has no active job


def test_chunks_follow_the_groups_cap_after_an_out_of_memory_split():
    jobs = [_job(f"j{i}", joined=True) for i in range(4)]
    assert schedule(_state(jobs)).chunks == (("j0", "j1", "j2", "j3"),)
    cap = shrink(None, 4)  # a step of 4 images ran out of memory
    assert cap == 3 and halves(["j0", "j1", "j2", "j3"]) == (["j0", "j1"], ["j2", "j3"])
    assert schedule(_state(jobs, caps={A: cap})).chunks == (("j0", "j1", "j2"), ("j3",))
    assert schedule(_state(jobs, caps={B: 1})).chunks == (("j0", "j1", "j2", "j3"),)  # another group's cap
    assert shrink(3, 2) == 1 and shrink(2, 4) == 2  # never above the cap the group had
    assert chunks([("big", 5), ("small", 1)], 2) == (("big",), ("small",))  # a job over the cap steps alone


def test_a_joiner_waits_for_memory_and_so_do_the_ones_behind_it():
    running = _job("run", A, joined=True)
    big = _job("big", B, memory=(100 * MiB, 10 * MiB))  # a new group: its fixed cost counts
    small = _job("small", A, memory=(100 * MiB, 10 * MiB))  # would fit (its group steps: per image only)
    step = schedule(_state([running, big, small], free=50 * MiB))
    assert step.join == () and step.wait == ("big", "small")  # first come, first served
    assert step.group == A and step.members == ("run",)  # the others keep stepping
    assert schedule(_state([running, small], free=50 * MiB)).join == ("small",)
    assert schedule(_state([running, big, small], free=200 * MiB)).join == ("big", "small")
    # nothing held: the job joins whatever its estimate (it runs alone; the step decides)
    assert schedule(_state([big], free=0.0)).join == ("big",)
    # no estimate (its probe failed), or no memory admission: it joins
    assert schedule(_state([running, dataclasses.replace(big, memory=None)], free=0.0)).join == ("big",)
    assert schedule(_state([running, big, small], free=None)).join == ("big", "small")


def test_a_second_joiner_of_a_new_group_pays_no_fixed_cost_twice():
    first = _job("first", B, memory=(100 * MiB, 10 * MiB))
    second = _job("second", B, memory=(100 * MiB, 10 * MiB))
    step = schedule(_state([_job("run", A, joined=True), first, second], free=110 * MiB))
    assert step.join == ("first", "second")  # 110 MiB each alone: the second's group steps once the first joined


def test_a_job_held_back_by_memory_leaves_its_place_to_the_parked_job():
    parked_tenant = _job("mine", A, tenant="a", joined=True, ran=8)  # its slice is spent
    waiting = _job("yours", B, tenant="b", memory=(1e9, 1e9), since=1)
    state = _state([parked_tenant, waiting], capacity=1, slice_steps=8, tick=5, served={"a": 1}, free=1e6)
    step = schedule(state)
    assert step.wait == ("yours",) and step.join == ()
    assert step.group == A and step.members == ("mine",)  # planned again without it: "mine" keeps stepping
    assert step.jobs["mine"].active and step.jobs["mine"].ran == 0  # a new slice
    assert step.tick == 7  # two planning passes
    fits = schedule(dataclasses.replace(state, free=1e12))
    assert fits.join == ("yours",) and fits.parked == ("mine",) and fits.jobs["mine"].since == 6
    assert fits.group == B and fits.served == {"a": 1, "b": 6}


def test_time_slicing_parks_and_resumes_by_tenant():
    state = _state([_job("a1", tenant="a", joined=True), _job("a2", tenant="a", joined=True),
                    _job("b1", tenant="b", since=3)], capacity=2, slice_steps=2, tick=3)
    step = schedule(state)
    assert step.members == ("a1", "a2") and step.wait == () and step.join == ()  # their slice runs first
    for _ in range(2):
        state = _after(state, step)
        step = schedule(state)
    assert step.join == ("b1",) and step.parked == ("a2",)  # tenant b's turn; a keeps one job stepping
    assert step.members == ("a1", "b1") and step.chunks == (("a1", "b1"),)


def test_exclusive_jobs_are_groups_of_their_own():
    one, two = group_key(A, "x1", True), group_key(A, "x2", True)
    assert len({one, two, A}) == 3 and group_key(A, "x3", False) == A
    state = _state([_job("x1", one), _job("x2", two), _job("s1", A), _job("s2", A)])
    steps = []
    for _ in range(3):
        step = schedule(state)
        steps.append(step.members)
        state = _after(state, step)
    assert steps == [("x1",), ("x2",), ("s1", "s2")]  # never in one step with another job


def test_background_units_take_only_the_room_interactive_jobs_leave():
    units = [_job(f"u{i}", tenant="atlas", joined=True, background=True, ran=100) for i in range(4)]
    step = schedule(_state(units, capacity=4))
    assert step.members == ("u0", "u1", "u2", "u3")  # alone they fill the step
    step = schedule(_state([*units, _job("j", tenant="t", images=2)], capacity=4))
    assert step.join == ("j",) and "j" in step.members  # the interactive job steps at once...
    assert sum(1 for i in step.members if i.startswith("u")) == 2  # ...two units parked for it, state kept
    assert {i for i, job in step.jobs.items() if not job.active} == {"u2", "u3"}
    done = _after(_state([*units, _job("j", tenant="t", images=2)], capacity=4), step)
    left = dataclasses.replace(done, jobs=[job for job in done.jobs if job.job_id != "j"])
    assert set(schedule(left).members) == {"u0", "u1", "u2", "u3"}  # the job ended: the parked units resume


def test_an_interactive_job_never_waits_for_a_background_slice():
    units = [_job(f"u{i}", tenant=f"a{i % 2}", joined=True, background=True) for i in range(4)]  # ran 0: fresh slice
    step = schedule(_state([*units, _job("j", images=4)], capacity=4))
    assert step.members == ("j",) and all(not step.jobs[f"u{i}"].active for i in range(4))


def test_a_step_waits_for_a_burst_of_admissions_at_most_one_step():
    """While the server admits more jobs (CreateJob calls in flight), a step of new jobs may wait for them, so a
    burst starts as one step: never without admissions in flight or without a job to join, never for a trickle of
    new jobs beside more images running, up to HOLD_MAX_SECONDS on an idle device, else at most one step's time."""
    from featureviz.worker.planner import HOLD_MAX_SECONDS
    from featureviz.worker.planner import HOLD_MIN_SECONDS
    from featureviz.worker.planner import hold

    assert hold(admitting=0, joining=8, stepping=0, last_step=0.2) == 0.0  # nothing in flight: plan now
    assert hold(admitting=5, joining=0, stepping=8, last_step=0.2) == 0.0  # nothing new to join: running jobs go on
    assert hold(admitting=1, joining=2, stepping=64, last_step=0.2) == 0.0  # a trickle beside many running images
    assert hold(admitting=200, joining=40, stepping=0, last_step=0.01) == HOLD_MAX_SECONDS  # an idle device waits
    assert hold(admitting=200, joining=40, stepping=16, last_step=0.2) == 0.2  # one step's time
    assert hold(admitting=200, joining=40, stepping=16, last_step=0.001) == HOLD_MIN_SECONDS
    assert hold(admitting=200, joining=40, stepping=16, last_step=30.0) == HOLD_MAX_SECONDS

"""The scheduler on a real server, its worker scripted (support.fake_worker.FakeWorker): the grants' order between
tenants, a job too large for the worker, re-queue on restart (a crash and a graceful stop, the store kept), worker
loss (LOST -> queued again at the head; the pool's final WORKER_LOST), and cancel races (a cancel while the job is
granted but not started, a cancel after the worker finished it). Everything is asserted on grants, events and
states, never on time: each scripted event returns once the server has handled it."""

from __future__ import annotations

import pytest

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.errors import InvalidSpec
from featureviz.server import Limits
from support.fake_worker import CANCELLED
from support.fake_worker import FakeWorker

CHANNEL = {"channel": {"layer": "conv", "channel": 3}}
MODEL = b"any bytes: the fake worker imports nothing"


def _states(fv: Client, job_id: str) -> list[str]:
    """The job's logged state changes and its end, from its watch (seq 0 on)."""
    out = []
    for event in fv.watch(job_id, timeout=60):
        if event.HasField("state"):
            out.append(pb.JobState.Name(event.state).removeprefix("JOB_STATE_"))
        elif event.HasField("result"):
            out.append("END " + pb.JobState.Name(event.result.state).removeprefix("JOB_STATE_"))
    return out


# ------------------------------------------------------------------------------------------- fairness


def test_grants_go_to_the_tenant_holding_the_fewest_images_then_the_one_served_least_recently(serve):
    fake = FakeWorker(max_step_images=2)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as flood, Client(server.address, token="tok-calm") as calm:
        sha = flood.upload(MODEL).sha256
        calm.upload(MODEL)
        a = [flood.submit(sha, CHANNEL, steps=4).id for _ in range(4)]
        assert fake.granted() == a[:2]  # the worker is full
        b = [calm.submit(sha, CHANNEL, steps=4).id for _ in range(2)]
        # calm holds less than its share (max_step_images / 2 tenants): b1 is granted beside the full worker (it
        # time-slices); b2 would put calm at more than its share and waits, as flood's a3 and a4 do
        assert fake.granted() == [*a[:2], b[0]]
        assert calm.job(b[1]).queue_position == 2  # behind a3 and a4 in arrival order, yet it goes first
        for job_id in (a[0], a[1], b[0], a[2], b[1], a[3]):
            fake.run(job_id, steps=4)
        # FIFO would grant a1 a2 a3 a4 b1 b2; a tenant's next job goes to whoever holds the fewest images, ties to
        # the tenant served least recently
        assert fake.granted() == [a[0], a[1], b[0], a[2], b[1], a[3]]
        assert {flood.job(j).state for j in a} == {calm.job(j).state for j in b} == {pb.JOB_STATE_SUCCEEDED}


def test_between_tenants_holding_as_many_images_the_one_served_least_recently_goes_first(serve):
    fake = FakeWorker(max_step_images=3)
    server = serve(fake)
    with Client(server.address, token="tok-third") as third, Client(server.address, token="tok-flood") as flood, \
            Client(server.address, token="tok-calm") as calm:
        sha = third.upload(MODEL).sha256
        flood.upload(MODEL)
        calm.upload(MODEL)
        t1, a1, b1 = (fv.submit(sha, CHANNEL, steps=2).id for fv in (third, flood, calm))  # one image each: full
        b2 = calm.submit(sha, CHANNEL, steps=2).id
        a2 = flood.submit(sha, CHANNEL, steps=2).id
        assert fake.granted() == [t1, a1, b1]
        fake.run(t1)  # room for one: flood and calm hold one image each, flood was served before calm
        assert fake.granted() == [t1, a1, b1, a2, b2]  # b2 came first; then calm is below its share (3 / 2)


def test_a_job_larger_than_the_worker_runs_when_it_is_empty_and_nothing_jumps_ahead_of_it(serve):
    fake = FakeWorker(max_step_images=2)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        first = fv.submit(sha, CHANNEL, steps=2).id
        big = fv.submit(sha, CHANNEL, steps=2, batch=3).id  # more images than one step holds
        small = fv.submit(sha, CHANNEL, steps=2).id  # would fit beside `first`, but `big` is older
        assert fake.granted() == [first]
        fake.run(first)
        assert fake.granted() == [first, big]  # alone on an empty worker
        assert fake.wait_granted(big).images == 3
        fake.run(big)
        assert fake.granted() == [first, big, small]
        fake.run(small)
        assert fv.job(big).state == pb.JOB_STATE_SUCCEEDED and len(fv.job(big).result.images) == 3


# ------------------------------------------------------------------------------------------- restart


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "graceful-stop"])
def test_a_running_job_is_queued_again_by_the_restarted_server_and_finishes(serve, crash):
    first = FakeWorker(max_step_images=1)
    server = serve(first)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        running = fv.submit(sha, CHANNEL, steps=6, seed=7).id
        queued = fv.submit(sha, CHANNEL, steps=6, seed=8).id
        first.start_job(running)
        first.progress(running, 3)
        seen = fv.job(running).last_seq
        assert first.granted() == [running]
    if crash:
        first.crash_on_stop()  # the process dies: the store still says RUNNING
    server.stop()
    assert first.held() == ([running] if crash else [])  # a stop re-queues (REQUEUED); a crash sends nothing

    second = FakeWorker(max_step_images=1)
    server = serve(second)  # the same store
    with Client(server.address, token="tok-flood") as fv:
        again = second.wait_granted(running)
        assert second.granted() == [running]  # creation order: the job that was running goes first
        assert again.ticket == "" and again.spec == first.submissions[0].spec  # converted again, the stored spec
        assert fv.job(queued).state == pb.JOB_STATE_QUEUED
        second.run(running)
        second.run(queued)
        done = fv.job(running)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempts == 2 and done.spec.seed == 7
        # re-attaching with the seq seen before the restart: the seqs go on from the stored last one, nothing is
        # repeated (a graceful stop logged QUEUED as seen + 1 in the first server's memory)
        seqs = [e.seq for e in fv.watch(running, from_seq=seen, timeout=60)][1:]
        assert seqs == list(range(seen + (1 if crash else 2), seen + (1 if crash else 2) + len(seqs)))
        # this server's log: the restart re-queues a job the store still had RUNNING (a stop had queued it already)
        assert _states(fv, running) == ["QUEUED"] * crash + ["RUNNING", "END SUCCEEDED"]
        assert fv.job(queued).state == pb.JOB_STATE_SUCCEEDED


# ------------------------------------------------------------------------------------------- worker loss


def test_a_lost_job_is_queued_again_at_the_head_and_runs_again(serve):
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        lost = fv.submit(sha, CHANNEL, steps=3).id
        waiting = [fv.submit(sha, CHANNEL, steps=3).id for _ in range(2)]
        fake.start_job(lost)
        fake.progress(lost, 2)
        fake.lose(lost)  # its worker died (a Ray actor restarting)
        # back at the head of the queue, before the jobs that waited: granted again at once, from step 0
        assert fake.granted() == [lost, lost]
        assert fake.submissions[1].ticket == ""
        assert [fv.job(j).queue_position for j in waiting] == [0, 1]
        fake.run(lost)
        done = fv.job(lost)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempts == 2
        assert _states(fv, lost) == ["RUNNING", "QUEUED", "RUNNING", "END SUCCEEDED"]
        assert fake.granted() == [lost, lost, waiting[0]]


def test_a_job_whose_worker_died_too_often_ends_failed_worker_lost_and_frees_its_place(serve):
    """The pool counts the losses (``ray_max_attempts``, tests/service/test_service_ray.py with real actors) and
    then sends FINISHED FAILED WORKER_LOST: the server stores that error and grants the next job."""
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        doomed = fv.submit(sha, CHANNEL, steps=3).id
        nxt = fv.submit(sha, CHANNEL, steps=3).id
        for attempt in (1, 2):
            fake.wait_granted(doomed, attempt)
            fake.start_job(doomed)
            fake.lose(doomed)
        fake.wait_granted(doomed, 3)
        fake.start_job(doomed)
        fake.fail(doomed, code="ABORTED", reason="WORKER_LOST", message="the worker running this job died 3 times")
        done = fv.job(doomed)
        assert done.state == pb.JOB_STATE_FAILED and done.attempts == 3
        assert (done.error.code, done.error.reason) == ("ABORTED", "WORKER_LOST") and "3 times" in done.error.message
        assert _states(fv, doomed) == ["RUNNING", "QUEUED", "RUNNING", "QUEUED", "RUNNING", "END FAILED"]
        assert fake.granted() == [doomed, doomed, doomed, nxt]


# ------------------------------------------------------------------------------------------- cancel races


def test_a_cancel_while_granted_but_not_started_ends_it_without_running_and_frees_the_worker_when_it_says(serve):
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        granted = fv.submit(sha, CHANNEL, steps=3).id
        queued = fv.submit(sha, CHANNEL, steps=3).id
        assert fake.granted() == [granted]
        assert fv.cancel(granted).state == pb.JOB_STATE_QUEUED  # the worker holds it: the worker ends it
        assert fake.cancels == [granted]
        assert fake.granted() == [granted]  # its place is the worker's until the worker answers
        fake.finish(granted, CANCELLED)  # as the real worker does with a submission it has not started
        assert fv.job(granted).state == pb.JOB_STATE_CANCELLED
        assert _states(fv, granted) == ["END CANCELLED"]  # never RUNNING
        assert fake.granted() == [granted, queued]


def test_a_cancel_arriving_after_the_worker_finished_the_job_keeps_the_result(serve):
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        job = fv.submit(sha, CHANNEL, steps=2, batch=2).id
        fake.start_job(job)
        with fake.holding():  # the worker has finished; its FINISHED event is on its way
            fake.finish(job)
            assert fv.cancel(job).state == pb.JOB_STATE_RUNNING  # the server does not know yet
            assert fake.cancels == [job]  # the worker ignores it: the job is gone there
        done = fv.job(job)
        assert done.state == pb.JOB_STATE_SUCCEEDED and len(done.result.images) == 2
        assert _states(fv, job) == ["RUNNING", "END SUCCEEDED"]  # one end, the worker's
        with pytest.raises(FeaturevizClientError) as err:
            fv.cancel(job)
        assert (err.value.code, err.value.reason) == ("FAILED_PRECONDITION", "JOB_FINISHED")


def test_a_cancelled_queued_job_never_reaches_the_worker(serve):
    fake = FakeWorker(max_step_images=1)
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        running = fv.submit(sha, CHANNEL, steps=2).id
        queued = fv.submit(sha, CHANNEL, steps=2).id
        assert fv.cancel(queued).state == pb.JOB_STATE_CANCELLED  # the server's own: no worker involved
        fake.run(running)
        assert fake.granted() == [running] and fake.cancels == []


# ------------------------------------------------------------------------------------------- the queue limit


def test_the_queue_limit_counts_in_memory_what_the_store_holds_unfinished(serve, unfinished):
    """CreateJob's queue limit (max_queued_jobs_per_tenant) counts the tenant's unfinished jobs in memory, not with
    a query: through queueing, grants, a loss, a failure, cancels (queued and granted), ends and a restart the
    count equals the store's QUEUED and RUNNING rows, and a full queue is refused."""
    fake = FakeWorker(max_step_images=1)
    server = serve(fake, limits=Limits(max_queued_jobs_per_tenant=4))
    with Client(server.address, token="tok-flood") as fv, Client(server.address, token="tok-calm") as calm:
        sha = fv.upload(MODEL).sha256
        calm.upload(MODEL)
        jobs = [fv.submit(sha, CHANNEL, steps=3).id for _ in range(4)]
        other = calm.submit(sha, CHANNEL, steps=3).id
        assert unfinished(server, "flood") == (4, 4) and unfinished(server, "calm") == (1, 1)
        with pytest.raises(FeaturevizClientError) as err:
            fv.submit(sha, CHANNEL, steps=3)
        assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "QUEUE_FULL")
        fake.start_job(jobs[0])
        fake.lose(jobs[0])  # queued again at the head
        assert unfinished(server, "flood") == (4, 4)
        fake.wait_granted(jobs[0], 2)
        fake.start_job(jobs[0])
        fake.fail(jobs[0], code="ABORTED", reason="WORKER_LOST", message="lost")
        assert fv.job(jobs[0]).state == pb.JOB_STATE_FAILED and unfinished(server, "flood") == (3, 3)
        assert fv.cancel(jobs[3]).state == pb.JOB_STATE_CANCELLED  # queued: the server's own
        assert unfinished(server, "flood") == (2, 2)
        granted = fake.granted()[-1]
        fv.cancel(granted)  # granted: the worker ends it
        fake.finish(granted, CANCELLED)
        assert fv.job(granted).state == pb.JOB_STATE_CANCELLED
        assert unfinished(server, "flood") == (1, 1)
        left = next(j for j in jobs[1:3] if j != granted)
        fake.wait_granted(left)
        fake.start_job(left)
    server.stop()  # the running job stays unfinished in the store: the restarted server counts it again
    again = serve(FakeWorker(max_step_images=1))
    assert unfinished(again, "flood") == (1, 1) and unfinished(again, "calm") == (1, 1)
    assert (left, other) and unfinished(again, "third") == (0, 0)


# ------------------------------------------------------------------------------------------- admission


def test_a_spec_the_worker_refuses_at_admission_is_invalid_argument_naming_the_job_field_and_stores_nothing(serve):
    fake = FakeWorker()
    server = serve(fake)
    with Client(server.address, token="tok-flood") as fv:
        sha = fv.upload(MODEL).sha256
        fake.refuse_admission = InvalidSpec("objective.channel.layer", "no layer 'conv' in this model")
        with pytest.raises(FeaturevizClientError) as err:
            fv.submit(sha, CHANNEL, steps=2)
        assert err.value.code == "INVALID_ARGUMENT"
        assert err.value.field_violations[0][0] == "spec.objective.channel.layer"
        assert list(fv.jobs()) == [] and fake.granted() == []

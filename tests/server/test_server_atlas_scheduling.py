"""Atlas units on the scheduler with the scripted worker (tests/support/fake_worker.py, no torch): they take only the
room of one device step that interactive jobs leave, interactive jobs are granted at once beside them, and the
units of two tenants' atlases share the free room in turn. Assertions on grants and states, never on time."""

from __future__ import annotations

from featureviz.client import Client
from featureviz.client import pb
from support.fake_worker import FakeWorker

MODEL = b"any bytes: the fake worker imports nothing"
CHANNEL = {"channel": {"layer": "conv", "channel": 3}}


def test_units_fill_the_free_room_interactive_jobs_go_first_and_tenants_take_turns(serve, unfinished):
    fake = FakeWorker(max_step_images=2)
    server = serve(fake)
    flood, calm = Client(server.address, token="tok-flood"), Client(server.address, token="tok-calm")
    model = flood.upload(MODEL).sha256
    calm.upload(MODEL)
    a = flood.atlas(model, layers=["conv"], channels=4, size=32, steps=2)
    fake.wait_granted(f"{a.id}:1")
    assert fake.granted() == [f"{a.id}:0", f"{a.id}:1"]  # the room of one step, no more
    assert all(s.background for s in fake.submissions)
    b = calm.atlas(model, layers=["conv"], channels=4, size=32, steps=2, seed=1)
    render = calm.submit(model, CHANNEL, steps=2)  # granted at once: units never hold an interactive job back
    assert fake.wait_granted(render.id).background is False
    assert fake.granted()[2:] == [render.id]
    fake.finish(f"{a.id}:0")  # the render and a unit hold the step: nothing more
    assert fake.granted()[3:] == []
    fake.finish(render.id)  # room for one unit: calm's atlas holds none, flood's one
    fake.finish(f"{a.id}:1")
    fake.finish(f"{b.id}:0")
    fake.finish(f"{a.id}:2")
    assert fake.granted()[3:] == [f"{b.id}:0", f"{a.id}:2", f"{b.id}:1", f"{a.id}:3"]
    running = flood.job(a.id)
    assert (running.state, running.step, running.steps) == (pb.JOB_STATE_RUNNING, 3, 4)
    assert [unfinished(server, t) for t in ("flood", "calm")] == [(1, 1), (1, 1)]  # the atlases (units: no rows)
    flood.cancel(a.id)  # its unit in flight is cancelled; what is done stays
    fake.wait_cancel(f"{a.id}:3")
    fake.finish(f"{a.id}:3", pb.JOB_STATE_CANCELLED)
    done = flood.job(a.id)
    assert done.state == pb.JOB_STATE_CANCELLED and (done.result.atlas.done, done.result.atlas.units) == (3, 4)
    assert unfinished(server, "flood") == (0, 0)
    assert [u.done for u in flood.atlas_units(a.id)] == [True, True, True, False]
    fake.finish(f"{b.id}:1")
    assert fake.granted()[-1] == f"{b.id}:3" and fake.granted()[-2] == f"{b.id}:2"
    flood.close()
    calm.close()

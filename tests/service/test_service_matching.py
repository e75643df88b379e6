"""Exemplar matching (``match:LAYER:C@INDEX``, issue 25 item 4) on a real server on loopback, through the Python
client: an index job over an uploaded set gives the index id; a render job with the term runs and the targets are
computed once per (model, index, unit, k, size); refusals before any compute: another tenant's or an unknown index
(NOT_FOUND naming it), a layer the index does not cover (INVALID_ARGUMENT naming it and what the index covers), k over
the index's k or over Limits.max_match_k."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.client import pb  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from featureviz.spec import parse_objective  # noqa: E402
from support.images import noisy_png  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402

TOKENS = {"token-a": "alice", "token-b": "bob"}
UNIT = "/Relu_1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("matching")
    folder = root / "set"
    folder.mkdir()
    for i in range(8):
        (folder / f"img{i}.png").write_bytes(noisy_png(40, seed=i))
    torch.manual_seed(0)
    model_bytes = export_onnx(TinyNet())
    server = serve_in_background(ServerConfig(root / "store", tokens=TOKENS, heartbeat_seconds=0.5,
                                              grace_seconds=1.0))
    try:
        with Client(server.address, token="token-a") as alice, Client(server.address, token="token-b") as bob:
            model = alice.upload(model_bytes, name="tiny.onnx").sha256
            bob.upload(model_bytes, name="tiny.onnx")
            dataset = alice.upload_dataset(folder).id
            job = alice.index_exemplars(model, dataset, [UNIT], k=8, size=32, wait=True, timeout=120)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            yield {"server": server, "model": model, "index": job.result.exemplar_index.index}
    finally:
        server.stop()


def _match(setup, **fields):
    return {"match": {"layer": UNIT, "channel": 3, "index": setup["index"], **fields}}


def _refused(client, setup, objective) -> FeaturevizClientError:
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(setup["model"], objective, steps=2, size=32)
    return err.value


def test_a_job_with_the_term_runs_and_its_targets_are_cached(setup):
    worker = setup["server"]._server.scheduler.worker
    objective = parse_objective(f"{UNIT}:3 - 0.5*match:{UNIT}:3@{setup['index']}")
    with Client(setup["server"].address, token="token-a") as alice:
        before = worker.matching.computed
        jobs = [alice.submit(setup["model"], objective, steps=3, size=32, batch=2, seed=seed) for seed in (0, 1)]
        for job in jobs:
            done = alice.wait(job.id, timeout=120)
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
            assert len(done.result.images) == 2
            assert done.spec.objective.sum.terms[1].scale.objective.match.index == setup["index"]
    assert worker.matching.computed == before + 1  # the second job took the cached targets


def test_refusals_name_the_index_the_layer_and_k(setup):
    address = setup["server"].address
    with Client(address, token="token-a") as alice, Client(address, token="token-b") as bob:
        err = _refused(bob, setup, _match(setup))  # alice's index: bob's jobs never made it
        assert err.code == "NOT_FOUND" and err.reason == "EXEMPLAR_INDEX_NOT_FOUND"
        assert setup["index"] in err.message and "spec.objective.match.index" in err.message
        err = _refused(alice, setup, _match(setup, index="0" * 64))
        assert err.code == "NOT_FOUND" and "0" * 64 in err.message
        err = _refused(alice, setup, {"match": {"layer": "/Relu", "channel": 3, "index": setup["index"]}})
        assert err.code == "INVALID_ARGUMENT"
        assert "'/Relu' is not in exemplar index" in err.message and "covers: /Relu_1" in err.message
        assert err.field_violations[0][0] == "spec.objective.match.layer"
        err = _refused(alice, setup, _match(setup, k=9))
        assert err.code == "INVALID_ARGUMENT" and "k=9 is more than the 8 examples" in err.message
        err = _refused(alice, setup, _match(setup, k=17))
        assert err.code == "INVALID_ARGUMENT" and "max_match_k" in err.message
        assert alice.info().limits.max_match_k == 16


def test_a_job_checked_again_gets_its_index_from_the_store(setup, monkeypatch):
    """A job whose admission ticket is gone (re-queued after a restart: Scheduler.submit without an admission) is
    checked again by the worker at its grant; the scheduler resolves its match terms again for it."""
    scheduler = setup["server"]._server.scheduler
    enqueue = scheduler._enqueue
    monkeypatch.setattr(scheduler, "_enqueue", lambda job_id, tenant, spec, ticket="": enqueue(job_id, tenant, spec))
    objective = parse_objective(f"{UNIT}:3 - 0.5*match:{UNIT}:3@{setup['index']}")
    with Client(setup["server"].address, token="token-a") as alice:
        done = alice.wait(alice.submit(setup["model"], objective, steps=2, size=32, seed=7).id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error

"""The learning-rate schedule and the early stop at a plateau through a real server: the job spec carries them to
the engine, bad values are INVALID_ARGUMENT naming the field, and a job that stops early says after which step
(its last progress event and JobResult.stopped_at)."""

from __future__ import annotations

import json

import pytest

from featureviz.cli import main
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.codec import spec_to_proto

# maximise |image - 0.5|: the sigmoid of the pixel parameterization bounds it by 0.5, so at a high rate it saturates
SATURATING = {"l1": {"constant": 0.5}}


def test_a_saturating_job_stops_at_its_plateau_and_says_after_which_step(client, tiny_model):
    job = client.submit(tiny_model.sha256, SATURATING, steps=2000, lr=0.5, size=16, param="pixel",
                        transforms="none", plateau=0.01, plateau_window=8, lr_schedule="constant", lr_warmup=2)
    assert job.spec.plateau == 0.01 and job.spec.plateau_window == 8 and job.spec.lr_warmup == 2
    assert job.spec.lr_schedule == pb.LR_SCHEDULE_CONSTANT
    progress = []
    done = client.wait(job.id, timeout=120,
                       on_event=lambda e: progress.append(e.progress.step) if e.HasField("progress") else None)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    stopped = done.result.stopped_at
    assert 16 <= stopped < 2000 and done.result.steps_done == stopped
    assert progress[-1] == stopped
    assert done.result.images[0].objective_end > 0.45


def test_a_scheduled_job_runs_all_its_steps(client, tiny_model):
    job = client.submit(tiny_model.sha256, {"logit": {"index": 3}}, steps=5, size=16, lr_schedule="cosine",
                        plateau=0.5, plateau_window=8)  # a window longer than half the steps never compares
    assert job.spec.lr_schedule == pb.LR_SCHEDULE_COSINE
    done = client.wait(job.id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.result.steps_done == 5 and done.result.stopped_at == 0


@pytest.mark.parametrize("options, field, needle", [
    (dict(plateau=1.5), "spec.plateau", "[0, 1)"),
    (dict(plateau=-0.01), "spec.plateau", "[0, 1)"),
    (dict(plateau=float("inf")), "spec.plateau", "[0, 1)"),
    (dict(plateau_window=0), "spec.plateau_window", "[1, "),
    (dict(lr_warmup=11), "spec.lr_warmup", "[0, 10]"),
    (dict(lr_warmup=-3), "spec.lr_warmup", "[0, 10]"),
])
def test_bad_schedule_values_are_invalid_argument(client, tiny_model, options, field, needle):
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, {"logit": {"index": 3}}, steps=10, size=16, **options)
    assert err.value.code == "INVALID_ARGUMENT"
    assert field in str(err.value) and needle in str(err.value)


def test_an_unknown_schedule_value_is_invalid_argument(client, tiny_model):
    spec = spec_to_proto(tiny_model.sha256, {"logit": {"index": 3}}, steps=2, size=16)
    spec.lr_schedule = 42  # a value this server does not know (a newer client's)
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, spec=spec)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "spec.lr_schedule" in str(err.value) and "LR_SCHEDULE_COSINE" in str(err.value)
    with pytest.raises(Exception) as err:  # the Python client refuses a name it does not know before any call
        client.submit(tiny_model.sha256, {"logit": {"index": 3}}, lr_schedule="exponential")
    assert "spec.lr_schedule" in str(err.value) and "cosine" in str(err.value)


def test_the_cli_passes_the_schedule_to_the_server(server, capsys, tiny_onnx, tmp_path):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx)
    code = main(["render", str(model), "l1", "--steps", "2000", "--size", "16", "--param", "pixel",
                 "--transforms", "none", "--lr", "0.5", "--schedule", "linear", "--warmup", "2",
                 "--stop-at-plateau", "0.01", "--plateau-window", "8", "--out", str(tmp_path / "p.png"), "--json",
                 "--server", server.address])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert 16 <= report["stopped_at"] < 2000 and report["steps"] == report["stopped_at"]
    from featureviz.client import Client

    with Client(server.address) as fv:
        spec = fv.job(report["job"]).spec
    assert spec.lr_schedule == pb.LR_SCHEDULE_LINEAR and spec.lr_warmup == 2
    assert spec.plateau == 0.01 and spec.plateau_window == 8
    code = main(["render", str(model), "logit:1", "--steps", "4", "--size", "16", "--stop-at-plateau", "2",
                 "--out", str(tmp_path / "q.png"), "--server", server.address])
    _, err = capsys.readouterr()
    assert code == 1 and "INVALID_ARGUMENT" in err and "spec.plateau" in err

"""The client commands against a real server: models upload|list|layers|delete, jobs list|watch|cancel, and
``featureviz render MODEL.onnx ... --server ADDR`` with the local command's options and --json fields."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from featureviz.cli import main
from featureviz.client import Client
from featureviz.client import pb


@pytest.fixture()
def tiny_file(tmp_path, tiny_onnx):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_onnx)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_commands(server, capsys, tiny_file, tmp_path):
    code, out, _ = _run(capsys, "models", "upload", str(tiny_file), "--server", server.address, "--json")
    assert code == 0
    model = json.loads(out)
    assert model["state"] == "MODEL_STATE_READY" and model["display_name"] == "tiny.onnx"
    sha = model["sha256"]
    code, out, _ = _run(capsys, "models", "list", "--server", server.address)
    assert code == 0 and sha in out and "tiny.onnx" in out
    code, out, _ = _run(capsys, "models", "layers", str(tiny_file), "--server", server.address, "--spatial-only")
    assert code == 0 and "/Relu_1" in out and "/fc/Gemm" not in out
    code, out, _ = _run(capsys, "models", "layers", sha, "--server", server.address, "--json")
    assert [layer["name"] for layer in json.loads(out)][-1] == "/fc/Gemm"

    other = tmp_path / "copy.onnx"
    other.write_bytes(tiny_file.read_bytes())
    code, out, _ = _run(capsys, "models", "upload", str(other), "--server", server.address)
    assert code == 0 and "already on the server" in out
    code, out, _ = _run(capsys, "models", "delete", sha, "--server", server.address)
    assert code == 0
    code, _, err = _run(capsys, "models", "delete", sha, "--server", server.address)
    assert code == 1 and "NOT_FOUND" in err


def test_rejected_upload_exits_non_zero_with_the_code_and_reason(server, capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"garbage" * 50)
    code, out, err = _run(capsys, "models", "upload", str(bad), "--server", server.address)
    assert code == 1 and out == ""
    line = err.strip().splitlines()[-1]
    assert "featureviz models upload: error: INVALID_ARGUMENT" in err and "[" in line


def test_no_server_is_a_clear_error(capsys, tiny_file):
    code, _, err = _run(capsys, "models", "list", "--server", "127.0.0.1:1")
    assert code == 1 and "UNAVAILABLE" in err


def test_a_negated_objective_renders_through_the_server(server, capsys, tiny_file, tmp_path):
    code, out, err = _run(capsys, "render", str(tiny_file), "-/Relu_1:3", "--steps", "2", "--size", "24",
                          "--out", str(tmp_path / "neg.png"), "--json", "--exclusive", "--server", server.address)
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == 2 and report["objective"].startswith("-")
    with Client(server.address) as fv:  # --exclusive reached the job
        assert fv.job(report["job"]).spec.exclusive


def test_render_through_the_server(server, capsys, tiny_file, tmp_path):
    out_png = tmp_path / "out" / "chan.png"
    code, out, err = _run(capsys, "render", str(tiny_file), "/Relu_1:3 - 0.05*tv", "--steps", "6", "--size", "24x32",
                          "--batch", "2", "--seed", "3", "--param", "pixel", "--out", str(out_png), "--json",
                          "--server", server.address)
    assert code == 0, err
    report = json.loads(out)
    assert set(report) >= {"objective_start", "objective_end", "seconds_per_step", "files", "phase_seconds",
                           "steps", "size", "batch", "seed"}
    assert report["steps"] == 6 and report["size"] == [24, 32] and report["batch"] == 2 and report["seed"] == 3
    assert len(report["objective_start"]) == len(report["objective_end"]) == 2
    assert report["files"] == [str(tmp_path / "out" / "chan_0.png"), str(tmp_path / "out" / "chan_1.png")]
    for path in report["files"]:
        assert Image.open(path).size == (32, 24)
    with Client(server.address) as fv:  # the server ran exactly this job, with the local defaults
        job = fv.job(report["job"])
        assert job.spec.param == pb.PARAMETERIZATION_PIXEL and job.spec.seed == 3
        assert [round(v, 4) for v in job.spec.preprocess.mean] == [0.485, 0.456, 0.406]

    grid = tmp_path / "grid.png"
    code, out, err = _run(capsys, "render", str(tiny_file), "logit:2", "--steps", "2", "--size", "16", "--batch", "4",
                          "--grid", "--out", str(grid), "--server", server.address)
    assert code == 0, err
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2) and "wrote" in out

    code, _, err = _run(capsys, "render", str(tiny_file), "/Relu_1:99", "--steps", "2", "--server", server.address)
    assert code == 1 and "INVALID_ARGUMENT" in err and "spec.objective.channel.channel" in err


def test_jobs_commands(server, capsys, tiny_onnx, tmp_path):
    with Client(server.address) as fv:
        model = fv.upload(tiny_onnx)
        short = fv.submit(model.sha256, {"channel": {"layer": "/Relu", "channel": 1}}, steps=3, size=16)
        code, out, err = _run(capsys, "jobs", "watch", short.id, "--out", str(tmp_path / "w"), "--server",
                              server.address)
        assert code == 0, err
        assert Image.open(out.strip().splitlines()[-1]).size == (16, 16)
        long = fv.submit(model.sha256, {"channel": {"layer": "/Relu", "channel": 1}}, steps=10_000, size=16)
        code, out, _ = _run(capsys, "jobs", "cancel", long.id, "--server", server.address)
        # cancelled while still queued, or flagged while running; "queued" when the worker had just taken it
        # and not yet marked it running (it then stops before its first step)
        assert code == 0 and out.strip() in {f"job {long.id}: {state}" for state in ("cancelled", "running", "queued")}
        assert fv.wait(long.id, timeout=120).state == pb.JOB_STATE_CANCELLED
        code, out, _ = _run(capsys, "jobs", "list", "--server", server.address)
        assert code == 0 and short.id in out and long.id in out
        code, out, _ = _run(capsys, "jobs", "list", "--state", "cancelled", "--json", "--server", server.address)
        assert long.id in [job["id"] for job in json.loads(out)] and short.id not in out
        code, _, err = _run(capsys, "jobs", "watch", long.id, "--server", server.address)
        assert code == 1 and "CANCELLED" in err

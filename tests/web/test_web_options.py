"""The job options in the explorer, from their declaration (featureviz.options through ServerInfo.job_options):
the web API takes every option the declaration offers it (an init image as base64), api/info publishes their
choices and bounds, and the form in a real browser offers exactly the declared choices (laplacian too) and
submits a schedule."""

from __future__ import annotations

import base64
import io
from urllib.parse import quote

from PIL import Image

from featureviz import options as opts
from featureviz.v1 import featureviz_pb2 as pb


def _png(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_api_info_publishes_the_declared_options(http):
    status, info = http.json("GET", "api/info")
    assert status == 200
    assert list(info["options"]) == [option.name for option in opts.OPTIONS]
    assert info["options"]["param"]["choices"] == ["fft", "pixel", "maco", "laplacian", "generator"]
    assert info["options"]["steps"]["maximum"] == info["limits"]["max_steps"]
    assert "form" in info["options"]["lr_schedule"]["surfaces"]


def test_a_job_takes_every_option_the_web_offers(http, model, client):
    body = {"model": model.sha256, "objective": "/conv1/Conv:0", "steps": 2, "size": 16, "lr_schedule": "linear",
            "lr_warmup": 1, "plateau": 0.5, "plateau_window": 4, "exclusive": True, "init_image": _png(16),
            "preprocess": {"mean": [0.5], "std": [0.5]}, "judge": model.sha256, "preview_max_side": 32}
    assert set(body) - {"model", "objective"} <= {option.name for option in opts.offered("web")}
    status, job = http.json("POST", "api/jobs", body)
    assert status == 200, job
    assert job["spec"]["lr_schedule"] == "linear" and job["spec"]["plateau_window"] == 4
    assert job["spec"]["exclusive"] is True and job["spec"]["init_image"].startswith("<")
    stored = client.job(job["id"]).spec
    assert stored.judge.model == model.sha256 and stored.init_image == base64.b64decode(body["init_image"])
    status, error = http.json("POST", "api/jobs", {**body, "init_image": "not base64!"})
    assert status == 400 and error["error"]["field_violations"][0][0] == "spec.init_image"
    status, error = http.json("POST", "api/jobs", {**body, "lr_schedule": "exponential"})
    assert status == 400 and error["error"]["field_violations"][0][0] == "spec.lr_schedule"
    assert "constant, cosine, linear" in error["error"]["message"]


def test_the_form_offers_the_declared_choices_and_submits_a_schedule(page, model, client):
    page.goto(f"/#/models/{model.sha256}/layers/{quote('/conv2/Conv', safe='')}")
    page.wait_for_selector("#render-layer")
    for name in ("param", "transforms", "lr_schedule"):
        shown = page.eval_on_selector_all(f"select[name={name}] option", "o => o.map((x) => x.value)")
        assert shown == list(opts.BY_NAME[name].choices), name
    assert page.get_attribute("input[name=steps]", "max") == str(client.info().limits.max_steps)
    page.fill("#channel-count", "1")
    page.fill("input[name=steps]", "2")
    page.fill("input[name=size]", "16")
    page.select_option("select[name=param]", "laplacian")
    page.select_option("select[name=lr_schedule]", "cosine")
    page.click("#render-layer")
    page.wait_for_selector(".job-panel[data-state=SUCCEEDED]")
    job = client.job(page.get_attribute(".job-panel", "data-job"))
    assert job.spec.param == pb.PARAMETERIZATION_LAPLACIAN and job.spec.lr_schedule == pb.LR_SCHEDULE_COSINE

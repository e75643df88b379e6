"""``featureviz demo --explore``: the embedded server keeps running after the gallery, with the explorer open at
the URL it printed, showing the demo's real trained model and its jobs, until Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from web_support import browser_missing

pytestmark = pytest.mark.slow  # the demo's model import (~25 s on 2 cores) and a one-step quick gallery


def test_demo_explore_leaves_the_explorer_running_at_the_printed_url(tmp_path, request):
    process = subprocess.Popen([sys.executable, "-m", "featureviz", "demo", "--explore", "--quick", "--quiet",
                                "--steps", "1", "--out", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed, url = [], None
        for line in process.stderr:
            printed.append(line)
            if "the explorer stays open at " in line:
                url = line.split("the explorer stays open at ", 1)[1].split(" ", 1)[0]
                break
        assert url, "".join(printed)
        assert any(f"web explorer at {url}" in line for line in printed)  # printed before the gallery too
        base, _, fragment = url.partition("#")
        models = json.loads(urllib.request.urlopen(base + "api/models", timeout=60).read())["models"]
        assert [m["name"] for m in models] == ["efficientnet_lite0.onnx"]
        assert fragment == f"/models/{models[0]['sha256']}"
        assert models[0]["logits_channels"] == 1000
        jobs = json.loads(urllib.request.urlopen(base + "api/jobs", timeout=60).read())["jobs"]
        assert jobs and all(job["state"] == "SUCCEEDED" for job in jobs)
        if browser_missing() is None:  # and in the browser (the HTTP checks above run without one)
            page = request.getfixturevalue("browser").new_page()
            try:
                page.goto(url)
                page.wait_for_selector("#layer-table tbody tr")
                assert page.inner_text("h1") == "efficientnet_lite0.onnx"
                assert page.eval_on_selector_all(".depth-svg a rect", "r => r.length") == models[0]["layer_count"]
            finally:
                page.close()
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out.strip().endswith("index.html") and "featureviz demo: stopping" in err

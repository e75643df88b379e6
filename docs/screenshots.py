"""Take the explorer's screenshots in docs/images/ with the real browser (Debian's chromium through Playwright).

    .venv/bin/python docs/screenshots.py            # about 3 minutes on 2 CPU cores

An embedded server with its explorer on free loopback ports and a temporary store; the demo's real trained
EfficientNet-Lite0 (featureviz.zoo, with its preprocessing) is uploaded with the Python client, then every page
is driven as a user would and photographed: models, the layer catalog, a layer's channels while they render and
when done, a channel, classes, the jobs, and the sign-in dialog of a server with tokens.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

from featureviz import zoo
from featureviz.client import Client
from featureviz.client import pb
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background

OUT = Path(__file__).parent / "images"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAYER = "/_blocks.12/_swish_1/Clip"  # the demo's late layer
CHANNEL_LAYER, CHANNEL = "/_blocks.4/_swish_1/Clip", 5  # one of the demo's early channels
CLASSES = (1, 130, 323, 948)  # the demo's: goldfish, flamingo, monarch butterfly, Granny Smith apple


def shoot(page, name: str, *, full: bool = True) -> None:
    path = OUT / f"explorer-{name}.png"
    page.screenshot(path=str(path), full_page=full)
    print(f"wrote {path}", file=sys.stderr)


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(exist_ok=True)
    onnx_path = zoo.efficientnet_lite0()
    with tempfile.TemporaryDirectory() as store, tempfile.TemporaryDirectory() as store2:
        server = serve_in_background(ServerConfig(store, http_port=0))
        locked = serve_in_background(ServerConfig(store2, http_port=0, tokens={"s3cret": "alice"}))
        try:
            with Client(server.address) as fv:
                model = fv.upload(onnx_path, name="efficientnet_lite0.onnx",
                                  preprocess=dict(zoo.EFFICIENTNET_LITE0_PREPROCESS))
            sha = model.sha256
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 820}, base_url=server.http_url)
                page.set_default_timeout(600_000)

                page.goto("/")
                page.wait_for_selector(".model")
                shoot(page, "models")

                page.goto(f"/#/models/{sha}")
                page.wait_for_selector("#layer-table tbody tr")
                page.select_option("#op-filter", "Clip")
                page.fill("#channels-min", "100")
                shoot(page, "catalog", full=False)

                page.goto(f"/#/models/{sha}/layers/{quote(LAYER, safe='')}")
                page.wait_for_selector("#render-layer")
                page.fill("input[name=steps]", "160")
                page.fill("input[name=size]", "128")
                page.click("#render-layer")
                # mid-run: a few previews in
                page.wait_for_function("() => { const t = document.querySelector('.progress-text'); "
                                       "const m = t && t.textContent.match(/step (\\d+)/); return m && +m[1] >= 60; }")
                shoot(page, "layer-running", full=False)
                page.wait_for_selector(".job-panel[data-state=SUCCEEDED] pre.cli")
                page.wait_for_timeout(400)  # the progress bar's transition
                shoot(page, "layer")

                page.goto(f"/#/models/{sha}/layers/{quote(CHANNEL_LAYER, safe='')}/channels/{CHANNEL}")
                page.wait_for_selector("#render-channel")
                page.fill("input[name=steps]", "256")
                page.fill("input[name=size]", "224")
                page.click("#render-channel")
                page.wait_for_selector(".job-panel[data-state=SUCCEEDED] pre.cli")
                page.wait_for_timeout(400)
                shoot(page, "channel")

                page.goto(f"/#/models/{sha}/classes")
                page.wait_for_selector("#class-search")
                names = zoo.imagenet_class_names()
                for index in CLASSES:
                    page.fill("#class-search", names[index])
                    page.click(f".class-matches .chip[data-index='{index}']")
                page.fill("#class-search", "")
                page.fill("input[name=steps]", "192")
                page.fill("input[name=size]", "160")
                page.click("#render-classes")
                page.wait_for_selector(".job-panel[data-state=SUCCEEDED] pre.cli")
                page.wait_for_timeout(400)
                shoot(page, "classes")

                # the jobs page with one job running and one queued behind it
                page.goto(f"/#/models/{sha}/layers/{quote(CHANNEL_LAYER, safe='')}")
                page.wait_for_selector("#render-layer")
                page.fill("input[name=steps]", "2000")
                page.click("#render-layer")
                page.wait_for_selector(".job-panel[data-state=RUNNING]")
                page.goto(f"/#/models/{sha}/layers/{quote(LAYER, safe='')}/channels/3")
                page.wait_for_selector("#render-channel")
                page.click("#render-channel")
                page.wait_for_selector(".job-panel[data-state=QUEUED]")
                page.goto("/#/jobs")
                page.wait_for_selector("#job-table tr[data-state=RUNNING]")
                page.wait_for_function("() => /[1-9]\\d*\\/2000/.test(document.querySelector("
                                       "'#job-table tr[data-state=RUNNING] .progress-cell').textContent)")
                shoot(page, "jobs", full=False)
                with Client(server.address) as fv:  # (the jobs page redraws every second: cancel from here)
                    for job in fv.jobs():
                        if job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
                            fv.cancel(job.id)

                signin = browser.new_page(viewport={"width": 1280, "height": 600}, base_url=locked.http_url)
                signin.goto("/")
                signin.wait_for_selector("#login[open]")
                signin.fill("#login-token", "not-the-token")
                signin.click("#login-submit")
                signin.wait_for_selector("#login-error:has-text('Refused')")
                shoot(signin, "signin", full=False)
                browser.close()
        finally:
            server.stop()
            locked.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

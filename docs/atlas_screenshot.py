"""Take docs/atlas.png, the README's picture of the live Atlas page, with the real browser (Debian's chromium
through Playwright) and a real run of the demo model.

    .venv/bin/python docs/atlas_screenshot.py       # a few minutes on 2 CPU cores

An embedded server with its explorer on free loopback ports and a temporary store; the demo's trained
EfficientNet-Lite0 (featureviz.zoo, dynamic size, with its preprocessing) is uploaded, a small atlas (two of the
demo's layers, the first 12 channels each, 64 px, 48 steps) is started from the Atlas page's form, and the page
is photographed while the atlas runs: the first layer done, the second under way.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from featureviz import zoo
from featureviz.client import Client
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background

OUT = Path(__file__).parent / "atlas.png"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAYERS = "/_blocks.4/_swish_1/Clip,/_blocks.12/_swish_1/Clip"  # the demo's early and late layers
CHANNELS = 12


def main() -> int:
    from playwright.sync_api import sync_playwright

    onnx_path = zoo.efficientnet_lite0(dynamic_size=True)
    with tempfile.TemporaryDirectory() as store:
        server = serve_in_background(ServerConfig(store, http_port=0))
        try:
            with Client(server.address) as fv:
                model = fv.upload(onnx_path, name="efficientnet_lite0.onnx",
                                  preprocess=dict(zoo.EFFICIENTNET_LITE0_PREPROCESS))
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 860}, base_url=server.http_url)
                page.set_default_timeout(900_000)
                page.goto("/#/atlas")
                page.wait_for_selector("#atlas-form")
                page.select_option("#atlas-model", model.sha256)
                page.fill("#atlas-layers", LAYERS)
                page.fill("#atlas-channels", str(CHANNELS))
                page.fill("#atlas-size", "64")
                page.fill("#atlas-steps", "48")
                page.click("#atlas-start")
                page.wait_for_url("**/#/atlas/*")
                # the first layer done and a few of the second: the picture of an atlas under way
                page.wait_for_function("""(n) => {
                    const total = document.querySelector('.atlas-progress');
                    const imgs = [...document.querySelectorAll('#unit-grid img')];
                    return total && Number(total.dataset.done) >= n + 3
                        && imgs.length >= n && imgs.every((i) => i.complete && i.naturalWidth > 0);
                }""", arg=CHANNELS)
                page.screenshot(path=str(OUT), full_page=False)
                print(f"wrote {OUT}", file=sys.stderr)
                browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

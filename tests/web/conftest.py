"""Fixtures of the web explorer tests: a REAL featureviz server with its explorer on 127.0.0.1 (free ports, a
temporary store), real ONNX exports of a small torch network (``support.models.TinyNet``), and Debian's chromium
driven by Playwright.

The browser tests skip with the reason when /usr/bin/chromium or the playwright package is missing (`.ci/run`
installs chromium; Playwright's own browser download is never used).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("aiohttp")

from web_support import CHROMIUM  # noqa: E402
from web_support import CHROMIUM_ARGS  # noqa: E402
from web_support import Http  # noqa: E402
from web_support import browser_missing  # noqa: E402

from featureviz.client import Client  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402


@pytest.fixture(scope="session")
def net_onnx() -> bytes:
    torch.manual_seed(0)
    return export_onnx(TinyNet(classes=1000))  # ImageNet-1k's width: the classes page applies


@pytest.fixture(scope="session")
def small_onnx() -> bytes:
    """Other bytes (10 classes): what the upload test drops into the page."""
    torch.manual_seed(1)
    return export_onnx(TinyNet(classes=10))


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """A server without tokens on loopback (the default), with its explorer on a free port."""
    config = ServerConfig(tmp_path_factory.mktemp("store"), http_port=0, heartbeat_seconds=0.5, grace_seconds=2.0)
    running = serve_in_background(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model(web_server, net_onnx):
    with Client(web_server.address) as fv:
        return fv.upload(net_onnx, name="explorer-net.onnx")


@pytest.fixture()
def client(web_server):
    with Client(web_server.address, timeout=60) as fv:
        yield fv


@pytest.fixture()
def http(web_server) -> Http:
    return Http(web_server.http_url)


# ------------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    """One chromium per test module: sync Playwright keeps an event loop running in this thread while it is open, so
    it must close before tests outside tests/web that call asyncio.run (whatever order the run takes)."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, web_server):
    """A fresh browser context on the explorer; the test fails on any uncaught error in the page's scripts."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True,
                                  base_url=web_server.http_url)
    context.set_default_timeout(float(os.environ.get("FEATUREVIZ_BROWSER_TIMEOUT_MS", "60000")))
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


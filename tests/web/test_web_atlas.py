"""The atlas in the explorer and its static export, with a real server, its gateway and Debian's chromium.

The model is TinyNet with HOSTILE layer names (its two ReLU nodes renamed to an HTML payload and a path
traversal): the catalog keeps them, so they reach the pages, the manifest and the CLI text as data. The atlas is
2 layers x 2 channels at 16 px and 4 steps. The worker is the real one with a gate: after the first 2 units it
holds its device thread until the test opens it, so the page meets the atlas part way by construction (no
timing), and then shows the other units as they finish, without a reload.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from featureviz.client import Client  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from support.atlas_worker import AtlasWorker  # noqa: E402
from featureviz.worker.api import WorkerConfig  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402
from web_support import Http  # noqa: E402

TOKENS = {"alice-token": "alice", "bob-token": "bob"}
HOSTILE = ['<img src=x onerror="window.__pwned=1">', "../../x"]


class GatedWorker(AtlasWorker):
    """The real worker; once ``hold`` atlas units finished, its device thread waits for ``gate`` (or the stop)."""

    hold = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _step(self, key, chunk) -> None:
        with self._cv:
            if self.units_finished >= self.hold and not self.gate.is_set():
                self._cv.wait_for(lambda: self.gate.is_set() or self._stopping)
        super()._step(key, chunk)

    def open(self) -> None:
        with self._cv:
            self.gate.set()
            self._cv.notify_all()


def _hostile_model() -> bytes:
    model = onnx.load_from_string(export_onnx(TinyNet(classes=10)))
    relus = [node for node in model.graph.node if node.op_type == "Relu"]
    assert len(relus) == 2
    for node, name in zip(relus, HOSTILE):
        node.name = name
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def atlas_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("atlas-store")
    worker = GatedWorker(WorkerConfig(device="cpu", max_step_images=2, progress_interval=0.0),
                         model_source=lambda sha: store / "models" / sha[:2] / f"{sha}.onnx")
    config = ServerConfig(store, tokens=TOKENS, http_port=0, heartbeat_seconds=0.5, grace_seconds=0.0,
                          progress_interval=0.0, max_step_images=2)
    running = serve_in_background(config, worker=worker)
    running.worker = worker
    yield running
    worker.open()
    running.stop()


@pytest.fixture(scope="module")
def hostile(atlas_server):
    with Client(atlas_server.address, token="alice-token") as fv:
        return fv.upload(_hostile_model(), name="hostile.onnx")


@pytest.fixture(scope="module")
def atlas_page(browser, atlas_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=atlas_server.http_url,
                                  extra_http_headers={"Authorization": "Bearer alice-token"})
    context.set_default_timeout(60000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
def live_atlas(atlas_page, atlas_server, hostile):
    """Start the atlas from the page's form; the page moves to the atlas, which holds after 2 units."""
    page = atlas_page
    page.goto("/#/atlas")
    page.wait_for_selector("#atlas-form")
    page.select_option("#atlas-model", hostile.sha256)
    page.fill("#atlas-op-types", "Relu")
    page.fill("#atlas-channels", "2")
    page.fill("#atlas-size", "16")
    page.fill("#atlas-steps", "4")
    page.click("#atlas-start")
    page.wait_for_url("**/#/atlas/*")
    return page.url.split("#/atlas/")[1]


def _loaded_images(page, selector: str) -> int:
    return page.eval_on_selector_all(selector, "imgs => imgs.filter((i) => i.complete && i.naturalWidth > 0).length")


def test_the_live_atlas_page_shows_units_as_they_finish(atlas_page, atlas_server, live_atlas):
    page = atlas_page
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    # the first layer's 2 units finish, then the worker holds: the page shows them and the totals
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('#unit-grid img')];
        return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth === 16);
    }""")
    page.wait_for_function("() => document.querySelector('.atlas-total').textContent.startsWith('2 of 4 units')")
    names = page.eval_on_selector_all("#atlas-layers .layer-link", "a => a.map((x) => x.textContent)")
    assert names == HOSTILE  # as text: the payload is not markup
    assert page.evaluate("window.__pwned") is None
    assert page.eval_on_selector_all("#atlas-layers .layer-done", "s => s.map((x) => x.textContent)") == ["2/2", "0/2"]

    page.click("#atlas-layers tr[data-layer='1'] .layer-link")  # the second layer: 2 units, none done yet
    page.wait_for_selector("#unit-grid[data-layer='1'] .unit-tile")
    assert page.eval_on_selector_all("#unit-grid .unit-tile", "t => t.length") == 2
    assert page.eval_on_selector_all("#unit-grid img", "i => i.length") == 0

    atlas_server.worker.open()  # the units finish now; the page follows the job's events
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('#unit-grid[data-layer="1"] img')];
        return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth === 16);
    }""")
    page.wait_for_function("() => document.querySelector('#atlas-state').textContent === 'succeeded'")
    assert page.evaluate("window.__sameDocument") is True
    assert page.inner_text(".atlas-total").startswith("4 of 4 units")

    # a unit's page, by its permalink (the unit key): the render at full size and the command that renders it
    with Client(atlas_server.address, token="alice-token") as fv:
        units = list(fv.atlas_units(live_atlas))
    unit = units[3]
    page.click(f"#unit-grid .unit-tile[data-key='{unit.key}']")
    page.wait_for_url(f"**/#/atlas/{live_atlas}/unit/{unit.key}")
    page.wait_for_selector("#unit-cli")
    assert page.eval_on_selector(".unit-figure.render img", "i => i.complete && i.naturalWidth") == 16
    assert page.inner_text(".unit-layer") == HOSTILE[1]
    cli = page.inner_text("#unit-cli")
    assert cli.startswith("featureviz render hostile.onnx ") and "--size 16" in cli and "--steps 4" in cli
    assert " ../../x:1 --steps 4 " in cli
    assert page.inner_text("#unit-scores tr.key td") == unit.key

    # sorting: dead units last, whatever the order (without a join none is dead: index order)
    page.goto(f"/#/atlas/{live_atlas}")
    page.wait_for_selector("#unit-grid .unit-tile img")
    page.select_option("#unit-sort", "ratio")
    keys = page.eval_on_selector_all("#unit-grid .unit-tile", "t => t.map((x) => x.dataset.key)")
    assert keys == [units[0].key, units[1].key]


def test_a_tenant_never_sees_another_tenants_atlas(atlas_server, live_atlas, hostile):
    alice = Http(atlas_server.http_url, token="alice-token")
    bob = Http(atlas_server.http_url, token="bob-token")
    status, body = alice.json("GET", "api/atlases")
    assert status == 200 and [a["id"] for a in body["atlases"]] == [live_atlas]
    assert alice.call("GET", f"api/atlases/{live_atlas}/units/0.png")[0] == 200
    status, body = bob.json("GET", "api/atlases")
    assert status == 200 and body["atlases"] == []
    for path in (f"api/atlases/{live_atlas}", f"api/atlases/{live_atlas}/units", f"api/atlases/{live_atlas}/units/0",
                 f"api/atlases/{live_atlas}/units/0.png", f"api/atlases/{live_atlas}/units/0.png?variant=negative"):
        status, _, raw = bob.call("GET", path)
        assert status == 404, (path, status, raw)
        assert json.loads(raw)["error"]["code"] == "NOT_FOUND"
    assert bob.call("POST", f"api/jobs/{live_atlas}/cancel", {})[0] == 404
    status, body = bob.json("POST", "api/atlases", {"model": hostile.sha256, "channels": 1})
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"  # bob does not hold alice's model
    status, body = alice.json("GET", f"api/atlases/{live_atlas}/units/0.png?variant=sideways")
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    status, body = alice.json("POST", "api/atlases", {"model": hostile.sha256, "colour": "blue"})
    assert status == 400 and "colour" in body["error"]["message"]
    status, body = alice.json("POST", "api/atlases", {"model": hostile.sha256, "op_types": ["Softmax"]})
    assert status == 400 and "matches no layer" in body["error"]["message"]  # the server's one line, as JSON


def _export(atlas_server, job: str, out: Path):
    return subprocess.run([sys.executable, "-m", "featureviz", "atlas", "export", job, "--out", str(out), "--server",
                           atlas_server.address, "--token", "alice-token", "--quiet"],
                          capture_output=True, text=True, timeout=300)


def test_the_export_opens_from_file_with_no_request_outside_its_folder(browser, atlas_server, live_atlas, tmp_path):
    with Client(atlas_server.address, token="alice-token") as fv:
        fv.wait(live_atlas, timeout=120)
        units = list(fv.atlas_units(live_atlas))
    out = tmp_path / "site" / "deep"
    done = _export(atlas_server, live_atlas, out)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "atlas.json").read_text())
    assert [u["layer"] for u in manifest["units"]] == [HOSTILE[0]] * 2 + [HOSTILE[1]] * 2
    first = manifest["units"][0]
    assert first["key"] == units[0].key and first["seed"] == 0 and first["options"]["steps"] == 4
    assert first["device"] and first["device_seconds"] > 0 and first["files"]["render"] == "units/0.png"
    assert manifest["totals"]["units"] == 4 and manifest["model"] and manifest["exported"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["atlas.js", "atlas.json", "index.html", "static/favicon.svg", "static/js/atlas-pages.js",
                       "static/style.css", "units/0.png", "units/1.png", "units/2.png", "units/3.png"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "site" / "x").exists()

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60000)
    page = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto((out / "index.html").as_uri())
        page.wait_for_function("""() => {
            const imgs = [...document.querySelectorAll('#unit-grid img')];
            return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth === 16);
        }""")
        assert page.eval_on_selector_all("#atlas-layers .layer-link", "a => a.map((x) => x.textContent)") == HOSTILE
        assert page.inner_text(".atlas-total").startswith("4 of 4 units")
        page.click("#atlas-layers tr[data-layer='1'] .layer-link")  # the same pages as the live view
        page.wait_for_function("() => [...document.querySelectorAll('#unit-grid[data-layer=\"1\"] img')]"
                               ".filter((i) => i.complete && i.naturalWidth === 16).length === 2")
        page.click(f"#unit-grid .unit-tile[data-key='{units[2].key}']")
        page.wait_for_selector("#unit-cli")
        assert page.eval_on_selector(".unit-figure.render img", "i => i.complete && i.naturalWidth") == 16
        assert page.url.endswith(f"#/atlas/{live_atlas}/unit/{units[2].key}")
        assert page.evaluate("window.__pwned") is None
    finally:
        context.close()
    assert not errors, errors
    root = out.resolve().as_uri() + "/"
    assert requests and all(url.startswith(root) for url in requests), [u for u in requests if not u.startswith(root)]
    assert {url[len(root):].split("#")[0] for url in requests} >= {"index.html", "atlas.js", "static/js/atlas-pages.js",
                                                                   "units/0.png", "units/2.png"}

    again = _export(atlas_server, live_atlas, out)  # an earlier export is updated in place
    assert again.returncode == 0, again.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused = _export(atlas_server, live_atlas, busy)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert str(busy) in refused.stderr and "not empty" in refused.stderr
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_a_layer_of_1200_units_keeps_few_images_and_a_joined_unit_shows_its_variants(browser, tmp_path):
    """The grid's laziness on the pages an export runs (the live view runs the same code): a site written by the
    exporter's shell with a manifest of one layer of 1200 done units (one real PNG for all), some dead; its unit 0
    carries the dataset join's fields (as the join will fill them): its page shows the negative, the diversity set,
    the examples and the scores."""
    from featureviz.cli.atlas_site import write_shell
    from PIL import Image

    out = tmp_path / "big"
    (out / "units").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 40, 90)).save(out / "units" / "0.png")
    count, dead = 1200, {5, 17}
    units = [{"index": i, "layer": "big", "channel": i, "key": f"{i:064x}", "done": True, "dead": i in dead,
              "activation_ratio": (i % 7) / 7 + (0.5 if i in dead else 0), "selectivity": 0,
              "files": {"render": "units/0.png"}} for i in range(count)]
    crop = {"rank": 0, "name": "cat.jpg", "value": 2.5, "crop_url": "units/0.png"}
    units[0].update(exemplar_index="i" * 64, dataset_p50=0.5, dataset_p99=2.0, dataset_max=2.5, render_score=5.0,
                    activation_ratio=2.0, selectivity=4.0, negative_done=True, diversity_done=2,
                    files={"render": "units/0.png", "negative": "units/0.png",
                           "diversity": ["units/0.png", "units/0.png"]},
                    exemplars={"top": [crop, {**crop, "rank": 1}], "bottom": [{**crop, "name": "dog.jpg"}]})
    site = {"job": "big-atlas", "state": "JOB_STATE_SUCCEEDED", "model": "0" * 64, "model_name": "big.onnx",
            "options": {"size": [16, 16], "steps": 4, "seed": 0}, "selection": {},
            "progress": {"units": count, "done": count, "layers": [{"layer": "big", "depth": 1, "units": count,
                                                                     "done": count}]}, "units": units}
    (out / "atlas.js").write_text(f"window.FEATUREVIZ_ATLAS_SITE = {json.dumps(site)};\n")
    write_shell(out)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60000)
    page = context.new_page()
    try:
        page.goto((out / "index.html").as_uri())
        page.wait_for_function("() => document.querySelectorAll('#unit-grid img').length > 0")
        counts = page.evaluate("() => [document.querySelectorAll('.unit-tile').length, "
                               "document.querySelectorAll('#unit-grid img').length]")
        assert counts[0] < 300 and 0 < counts[1] <= counts[0]
        # scroll to the end: tiles are added a chunk at a time; images only near the screen
        most = _scroll_to_the_end(page, count)
        assert 0 < most < 400
        page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")  # the last chunk, added below
        page.wait_for_function("() => { const t = [...document.querySelectorAll('.unit-tile')]; "
                               "return !!t[t.length - 1].querySelector('img'); }")
        assert page.evaluate("() => document.querySelectorAll('#unit-grid img').length") < 400
        order = page.eval_on_selector_all(".unit-tile", "t => t.map((x) => Number(x.dataset.index))")
        assert order[:3] == [0, 1, 2] and order[-2:] == [5, 17]  # index order, dead units last
        page.select_option("#unit-sort", "ratio")
        page.wait_for_function("() => document.querySelector('.unit-tile').dataset.index === '0'")
        order = page.eval_on_selector_all(".unit-tile", "t => t.map((x) => Number(x.dataset.index))")
        assert order[:3] == [0, 6, 13] and len(order) < 400  # the best ratio first (a dead unit's is higher)
        assert _scroll_to_the_end(page, count) < 400
        order = page.eval_on_selector_all(".unit-tile", "t => t.map((x) => Number(x.dataset.index))")
        assert order[-2:] == [5, 17] and sorted(order) == list(range(count))

        # a joined unit's page: the negative and diversity renders, the examples' crops, the scores
        page.goto((out / "index.html").as_uri() + f"#/atlas/big-atlas/unit/{units[0]['key']}")
        page.wait_for_function("""() => {
            const imgs = [...document.querySelectorAll('.unit-figure img, .example img')];
            return imgs.length === 7 && imgs.every((i) => i.complete && i.naturalWidth === 16);
        }""")
        assert page.eval_on_selector_all(".unit-figure figcaption", "f => f.map((x) => x.textContent)") == [
            "render", "negative", "diversity 1", "diversity 2"]
        assert page.eval_on_selector_all(".example-row.top .name", "n => n.map((x) => x.textContent)") == [
            "cat.jpg", "cat.jpg"]
        assert page.inner_text(".example-row.bottom .name") == "dog.jpg"
        assert page.inner_text("#unit-scores tr.ratio td") == "2.000"
        assert page.inner_text("#unit-scores tr.selectivity td") == "4.00"
    finally:
        context.close()


def _scroll_to_the_end(page, count: int) -> int:
    """Scroll the grid to its end (frame by frame, as the observers answer); the most images it held at once."""
    return page.evaluate("""async (count) => {
        let most = 0;
        for (let i = 0; i < 200 && document.querySelectorAll('.unit-tile').length < count; i++) {
            window.scrollTo(0, document.body.scrollHeight);
            await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
            most = Math.max(most, document.querySelectorAll('#unit-grid img').length);
        }
        return most;
    }""", count)

"""The explorer in a real browser (Playwright driving Debian's chromium) against a real server: upload a model by
drag and drop, browse its layers, render a layer's channels as one batched job with live previews, render a
channel and download what reproduces it, render classes by name, cancel a job, be refused with a wrong token.

Renders are tiny (a few steps at 32-48 px of a small network), so the module takes well under a minute."""

from __future__ import annotations

import hashlib
import json
import shlex
from urllib.parse import quote

import pytest
from featureviz.client import Client
from featureviz.client import images
from featureviz.client import pb
from featureviz.codec import objective_from_proto
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from web_support import drop_file


def _layer_url(sha: str, layer: str) -> str:
    return f"#/models/{sha}/layers/{quote(layer, safe='')}"


def _finished_images(page, count: int, side: int) -> list[dict]:
    """Wait until `count` final images (not previews) have loaded, and return their src and size."""
    page.wait_for_function(
        """([count, side]) => {
            const imgs = [...document.querySelectorAll('.job-panel .tile img')];
            return imgs.length === count && imgs.every((img) => img.complete && img.naturalWidth === side
                && img.getAttribute('src').startsWith('api/jobs/'));
        }""", arg=[count, side])
    return page.eval_on_selector_all(".job-panel .tile img", "imgs => imgs.map((i) => ({src: i.getAttribute('src'), "
                                                             "width: i.naturalWidth, height: i.naturalHeight}))")


def test_upload_by_drag_and_drop_lists_the_model_and_delete_removes_it(page, web_server, small_onnx):
    page.goto("/")
    page.wait_for_selector("#dropzone")
    drop_file(page, "#dropzone", "dropped.onnx", small_onnx)
    page.wait_for_selector(".upload-status.done")
    assert page.inner_text(".upload-line") == "Uploaded dropped.onnx: 6 layers, ready."
    assert page.eval_on_selector(".upload-status .bar > span", "el => el.style.width") == "100%"
    sha = hashlib.sha256(small_onnx).hexdigest()
    card = page.wait_for_selector(f".model[data-sha='{sha}']")
    assert "dropped.onnx" in card.inner_text() and "10 classes" in card.inner_text()
    assert card.query_selector("a:text-is('Classes')") is None  # 10 logits are not ImageNet's
    with Client(web_server.address) as fv:
        assert fv.model(sha).display_name == "dropped.onnx"

    delete = card.query_selector("button.danger")
    delete.click()
    assert delete.inner_text() == "Really delete?"  # a second click confirms
    delete.click()
    page.wait_for_selector(f".model[data-sha='{sha}']", state="detached")
    with Client(web_server.address) as fv:
        assert sha not in [m.sha256 for m in fv.models()]


def test_catalog_lists_the_layers_filters_them_and_draws_the_depth(page, client, model):
    layers = list(client.layers(model.sha256))
    page.goto(f"/#/models/{model.sha256}")
    page.wait_for_selector("#layer-table tbody tr")
    assert page.eval_on_selector_all("#layer-table .layer-link", "a => a.map((x) => x.textContent)") == \
        [layer.name for layer in layers]
    assert page.eval_on_selector_all(".depth-svg a rect", "r => r.length") == len(layers)
    assert page.query_selector("text=ImageNet classes →") is not None  # 1000 logits

    page.select_option("#op-filter", "Relu")
    relus = [layer.name for layer in layers if layer.op_type == "Relu"]
    assert page.eval_on_selector_all("#layer-table .layer-link", "a => a.map((x) => x.textContent)") == relus
    assert page.inner_text(".filters .count") == f"{len(relus)} of {len(layers)} layers"
    dim = page.eval_on_selector_all(".depth-svg a rect", "r => r.filter((x) => x.getAttribute('opacity') < 0.5).length")
    assert dim == len(layers) - len(relus)

    page.select_option("#op-filter", "")
    page.fill("#layer-search", "conv2")
    assert page.eval_on_selector_all("#layer-table .layer-link", "a => a.map((x) => x.textContent)") == ["/conv2/Conv"]
    page.fill("#layer-search", "")
    page.fill("#channels-min", "16")
    shown = page.eval_on_selector_all("#layer-table .layer-link", "a => a.map((x) => x.textContent)")
    assert shown == [layer.name for layer in layers if layer.channels >= 16]
    page.fill("#depth-max", "2")
    shown = page.eval_on_selector_all("#layer-table .layer-link", "a => a.map((x) => x.textContent)")
    assert shown == [layer.name for layer in layers if layer.channels >= 16 and layer.depth <= 2]

    page.click(f"#layer-table .layer-link:text-is('{shown[0]}')")
    page.wait_for_selector("#render-layer")
    assert page.inner_text("h1") == shown[0]


def test_layer_renders_its_first_channels_as_one_batched_job_with_live_previews(page, client, model):
    jobs_before = len(list(client.jobs()))
    page.goto("/" + _layer_url(model.sha256, "/conv2/Conv"))
    page.wait_for_selector("#render-layer")
    page.fill("#channel-count", "4")
    page.fill("input[name=steps]", "16")
    page.fill("input[name=size]", "32")
    page.evaluate("""() => {  // every image source the tiles show, previews included
        window.seen = [];
        new MutationObserver((changes) => changes.forEach((c) => window.seen.push(c.target.getAttribute('src'))))
            .observe(document.getElementById('view'), {attributes: true, attributeFilter: ['src'], subtree: true});
    }""")
    page.click("#render-layer")
    page.wait_for_selector(".job-panel[data-state=SUCCEEDED]")
    finished = _finished_images(page, 4, 32)
    seen = page.evaluate("window.seen")
    assert any(src.startswith("data:image/png;base64,") for src in seen), "no live preview reached the page"
    assert [page.inner_text(f".tile[data-index='{i}'] figcaption") for i in range(4)] == \
        [f"channel {i}" for i in range(4)]

    job_id = page.get_attribute(".job-panel", "data-job")
    job = client.job(job_id)
    assert len(list(client.jobs())) == jobs_before + 1  # one job for the four channels
    assert job.spec.batch == 4 and job.spec.steps == 16 and job.spec.size.height == 32
    assert objective_from_proto(job.spec.objective) == {"sum": [
        {"batch": {"index": i, "objective": {"channel": {"layer": "/conv2/Conv", "channel": i}}}} for i in range(4)]}
    assert [image["src"] for image in finished] == [f"api/jobs/{job_id}/images/{i}.png" for i in range(4)]

    page.click(".tile[data-index='2'] figcaption a")  # a tile leads to its channel
    page.wait_for_selector("#render-channel")
    assert "channel 2" in page.inner_text("h1")


def test_channel_renders_a_larger_image_with_downloads_of_png_spec_and_command(page, client, model, web_server):
    page.goto("/" + _layer_url(model.sha256, "/Relu_1") + "/channels/3")
    page.wait_for_selector("#render-channel")
    page.check("#negative")  # minimises the channel through the ReLU's input
    assert json.loads(page.inner_text("#objective-text")) == \
        {"scale": {"factor": -1, "objective": {"channel": {"layer": "/Relu_1:pre", "channel": 3}}}}
    page.uncheck("#negative")
    page.fill("input[name=batch]", "3")
    page.check("#diversity")  # a diversity batch: the channel plus lucid's Gram-matrix diversity term
    assert json.loads(page.inner_text("#objective-text")) == {"sum": [
        {"channel": {"layer": "/Relu_1", "channel": 3}},
        {"scale": {"factor": 100, "objective": {"diversity": {"layer": "/Relu_1"}}}}]}
    page.uncheck("#diversity")
    page.fill("input[name=batch]", "1")
    page.fill("input[name=steps]", "8")
    page.fill("input[name=size]", "48")
    page.select_option("select[name=param]", "pixel")
    page.click("#render-channel")
    page.wait_for_selector(".job-panel[data-state=SUCCEEDED]")
    _finished_images(page, 1, 48)
    job_id = page.get_attribute(".job-panel", "data-job")
    job = client.job(job_id)
    assert objective_from_proto(job.spec.objective) == {"channel": {"layer": "/Relu_1", "channel": 3}}
    assert job.spec.param == pb.PARAMETERIZATION_PIXEL and job.spec.steps == 8

    with page.expect_download() as download:
        page.click("#download-png")
    assert open(download.value.path(), "rb").read() == images(job)[0]
    with page.expect_download() as download:
        page.click("#download-spec")
    spec = json.load(open(download.value.path()))
    assert spec["spec"]["objective"] == {"channel": {"layer": "/Relu_1", "channel": 3}}
    assert spec["spec"]["size"] == [48, 48] and spec["spec"]["param"] == "pixel" and spec["job"] == job_id
    page.wait_for_selector("pre.cli")
    command = page.inner_text("pre.cli")
    assert command == spec["cli"]
    words = shlex.split(command)
    assert words[:4] == ["featureviz", "render", "explorer-net.onnx", "/Relu_1:3"]
    assert words[words.index("--server") + 1] == web_server.address


def test_classes_page_renders_classes_by_name(page, client, model):
    page.goto(f"/#/models/{model.sha256}/classes")
    page.wait_for_selector("#class-search")
    page.fill("#class-search", "goldfish")
    page.click(".class-matches .chip[data-index='1']")
    page.fill("#class-search", "tabby")
    page.click(".class-matches .chip[data-index='281']")
    page.fill("input[name=steps]", "6")
    page.fill("input[name=size]", "32")
    page.click("#render-classes")
    page.wait_for_selector(".job-panel[data-state=SUCCEEDED]")
    _finished_images(page, 2, 32)
    assert page.inner_text(".tile[data-index='0'] figcaption") == "goldfish (1)"
    job = client.job(page.get_attribute(".job-panel", "data-job"))
    assert objective_from_proto(job.spec.objective) == {"sum": [
        {"batch": {"index": 0, "objective": {"logit": {"index": 1}}}},
        {"batch": {"index": 1, "objective": {"logit": {"index": 281}}}}]}


def test_cancel_a_running_job_from_the_jobs_page(page, client, model):
    job = client.submit(model.sha256, {"channel": {"layer": "/conv1/Conv", "channel": 0}}, steps=10_000, size=32)
    try:
        page.goto("/#/jobs")
        row = f"#job-table tr[data-job='{job.id}']"
        page.wait_for_selector(f"{row} button.cancel")
        assert "/conv1/Conv:0" in page.inner_text(row)
        page.click(f"{row} button.cancel")
        page.wait_for_selector(f"{row}[data-state=CANCELLED]")
        assert client.job(job.id).state == pb.JOB_STATE_CANCELLED
        page.click(f"{row} a")  # the job's own page shows the state and the partial images
        page.wait_for_selector(".job-panel[data-state=CANCELLED]")
    finally:
        client.cancel(job.id)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    config = ServerConfig(tmp_path_factory.mktemp("store"), tokens={"s3cret": "alice", "look": "alice"},
                          read_only={"look"}, http_port=0)
    running = serve_in_background(config)
    yield running
    running.stop()


def test_a_wrong_token_is_refused_and_the_right_one_signs_in(browser, token_server):
    context = browser.new_context(base_url=token_server.http_url)
    try:
        page = context.new_page()
        page.goto("/")
        page.wait_for_selector("#login[open]")
        page.fill("#login-token", "wrong")
        page.click("#login-submit")
        page.wait_for_selector("#login-error:has-text('Refused')")
        assert page.is_visible("#login")
        assert context.request.get("api/models").status == 401  # no cookie was set for the wrong token

        page.fill("#login-token", "s3cret")
        page.click("#login-submit")
        page.wait_for_selector("#login", state="hidden")
        page.wait_for_selector("#model-list")
        assert page.inner_text("#session .tenant") == "alice"
        assert context.request.get("api/models").status == 200
        (cookie,) = context.cookies()  # a random session id, never the token (other apps on the host see cookies)
        assert cookie["name"] == "featureviz_session" and cookie["value"] != "s3cret" and len(cookie["value"]) >= 40
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"

        page.click("#logout")
        page.wait_for_selector("#login[open]")
        assert context.request.get("api/models").status == 401
        assert context.cookies() == []
        context.add_cookies([{**cookie, "expires": -1}])  # the old session id, replayed, is revoked
        assert context.request.get("api/models").status == 401
        context.add_cookies([{**cookie, "value": "s3cret", "expires": -1}])  # and a raw token is no session
        assert context.request.get("api/models").status == 401
    finally:
        context.close()


def test_the_pages_load_nothing_from_elsewhere(page, web_server, model):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    response = page.goto(f"/#/models/{model.sha256}")
    page.wait_for_selector("#layer-table tbody tr")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert requested and all(url.startswith(web_server.http_url) for url in requested), requested

"""Dataset examples in the explorer, in a real browser against a real server: the hand-built colour model
(``support.exemplar_models``: channel 0 of ``colour_relu`` is a pixel's red level) and a set of generated images
with one red square each. With no index, the channel page offers the index job; its button runs the job (a real
JobService job) and then shows the top 9 crops in GetExemplars' order, each a loaded PNG of its box; clicking one
shows the whole image with the box drawn; a negative render shows the bottom 9; the activation ratio after a render
equals the render's objective over the best real image's spatial mean as the API gives them. The layer page shows
a row of examples and the ratio under each channel's render."""

from __future__ import annotations

import pytest
from support.exemplar_models import colour_net
from support.exemplar_models import dot_image
from support.exemplar_models import png
from web_support import Http

from featureviz.client import Client
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background

pytest.importorskip("onnx")

SIDE = 64
RED = [30, 220, 90, 180, 250, 60, 140, 200, 10, 120, 170, 240]  # each image's square: its red level
POS = [(3, 60), (50, 10), (20, 20), (63, 0), (33, 41), (8, 8), (40, 5), (12, 50), (30, 30), (55, 55), (0, 0),
       (25, 44)]
LAYER = "colour_relu"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    folder = root / "dots"
    folder.mkdir()
    for i, (red, (x, y)) in enumerate(zip(RED, POS)):
        (folder / f"dot{i:02d}.png").write_bytes(png(dot_image(SIDE, red, x, y, side=2, green=(17 * i) % 256)))
    running = serve_in_background(ServerConfig(root / "store", http_port=0, heartbeat_seconds=0.5,
                                               grace_seconds=1.0))
    with Client(running.address) as fv:
        model = fv.upload(colour_net(), name="colour.onnx")
        dataset = fv.upload_dataset(folder)
    yield {"server": running, "model": model.sha256, "dataset": dataset.id}
    running.stop()


@pytest.fixture()
def tab(browser, setup):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=setup["server"].http_url)
    context.set_default_timeout(120_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _channel_url(setup, channel: int) -> str:
    return f"/#/models/{setup['model']}/layers/{LAYER}/channels/{channel}"


def _loaded_crops(page, selector: str, count: int) -> list[dict]:
    page.wait_for_function("""([selector, count]) => {
        const imgs = [...document.querySelectorAll(selector)];
        return imgs.length === count && imgs.every((img) => img.complete && img.naturalWidth > 0);
    }""", arg=[selector, count])
    return page.eval_on_selector_all(selector, "imgs => imgs.map((i) => ({name: i.dataset.name, "
                                               "image: i.dataset.image, width: i.naturalWidth, "
                                               "height: i.naturalHeight}))")


def test_the_channel_page_indexes_the_set_and_shows_the_crops_the_api_gives(tab, setup):
    client = Client(setup["server"].address)
    tab.goto(_channel_url(setup, 0))
    tab.wait_for_selector("#dataset-select")
    assert tab.eval_on_selector("#dataset-select", "s => s.value") == setup["dataset"]
    tab.evaluate("""() => {  // every width the index job's progress bar is given
        window.widths = [];
        new MutationObserver((changes) => changes.forEach((c) => {
            if (c.target.parentElement?.id === 'index-progress') window.widths.push(c.target.style.width);
        })).observe(document.getElementById('view'), {attributes: true, attributeFilter: ['style'], subtree: true});
    }""")
    tab.click("#run-index")  # no index holds the layer yet: the button runs the index job
    crops = _loaded_crops(tab, "#examples .crops img", 9)
    assert tab.inner_text("#examples h3") == "Top 9 real images"
    jobs = [job for job in client.jobs() if job.spec.HasField("exemplar_index")]
    assert len(jobs) == 1 and jobs[0].state == 3  # SUCCEEDED
    assert list(jobs[0].spec.exemplar_index.layers) == [LAYER]
    widths = tab.evaluate("window.widths")
    assert widths and widths[-1] == "100%", widths

    answer = client.exemplars(setup["model"], setup["dataset"], LAYER, 0, k=9)
    assert [c["name"] for c in crops] == [e.name for e in answer.exemplars]
    assert {c["name"] for c in crops} >= {"dot04.png", "dot11.png", "dot01.png"}  # the reddest squares are in
    for crop, example in zip(crops, answer.exemplars):  # each crop is its box of the file
        box = example.image_box
        assert (crop["width"], crop["height"]) == (box.x1 - box.x0, box.y1 - box.y0)
        assert crop["image"] == example.image

    # a click shows the whole image with its box drawn where the API's box lies
    tab.click("#examples .example[data-rank='0'] button")
    tab.wait_for_function("() => { const i = document.getElementById('exemplar-whole'); "
                          "return i && i.complete && i.naturalWidth > 0; }")
    assert tab.eval_on_selector("#exemplar-view", "d => d.open")
    assert tab.eval_on_selector("#exemplar-whole", "i => [i.naturalWidth, i.naturalHeight]") == [SIDE, SIDE]
    top = answer.exemplars[0]
    size = answer.size
    style = tab.eval_on_selector("#exemplar-box", "b => [b.style.left, b.style.top, b.style.width, b.style.height]")
    fractions = [top.box.x0 / size.width, top.box.y0 / size.height, (top.box.x1 - top.box.x0) / size.width,
                 (top.box.y1 - top.box.y0) / size.height]
    assert [float(v.rstrip("%")) for v in style] == pytest.approx([100 * f for f in fractions], abs=1e-3)
    assert top.name in tab.inner_text("#exemplar-view")
    tab.click("#exemplar-view button:text-is('Close')")
    assert not tab.eval_on_selector("#exemplar-view", "d => d.open")

    # a negative render's side: the bottom 9
    tab.check("#negative")
    tab.wait_for_selector("#examples h3:text-is('Bottom 9 real images')")
    bottom = _loaded_crops(tab, "#examples .crops[data-order='min'] img", 9)
    assert [c["name"] for c in bottom] == [e.name for e in client.exemplars(
        setup["model"], setup["dataset"], LAYER, 0, order="min", k=9).exemplars]
    client.close()


def test_the_ratio_is_the_renders_objective_over_the_best_real_images_mean(tab, setup):
    client = Client(setup["server"].address)
    if client.exemplars(setup["model"], setup["dataset"], LAYER, 0, k=1) is None:  # pragma: no cover
        pytest.skip("needs the index of the test before")
    tab.goto(_channel_url(setup, 0))
    _loaded_crops(tab, "#examples .crops img", 9)  # the index exists: crops at once, no button
    assert tab.query_selector("#run-index") is None
    tab.fill("input[name=steps]", "8")
    tab.fill("input[name=size]", "32")
    tab.click("#render-channel")
    tab.wait_for_selector(".job-panel[data-state='SUCCEEDED']")
    ratio = tab.wait_for_selector("#channel-ratio .ratio")
    job = client.job(tab.get_attribute(".job-panel", "data-job"))
    best = client.exemplars(setup["model"], setup["dataset"], LAYER, 0, order="mean", k=1).exemplars[0].value
    expected = job.result.images[0].objective_end / best
    assert float(ratio.get_attribute("data-ratio")) == pytest.approx(expected, rel=1e-12)
    if 0.001 <= abs(expected) < 1000:  # the page's num(): two decimals in this range
        assert ratio.inner_text() == f"×{expected:.2f}"
    title = ratio.get_attribute("title")
    assert "best real image" in title and "beyond anything in the data" in title
    client.close()


def test_the_layer_page_shows_a_row_of_examples_and_the_ratio_under_each_channel(tab, setup):
    client = Client(setup["server"].address)
    tab.goto(f"/#/models/{setup['model']}/layers/{LAYER}")
    tab.wait_for_selector("#render-layer")
    tab.fill("#channel-count", "4")
    tab.fill("input[name=steps]", "6")
    tab.fill("input[name=size]", "32")
    tab.click("#render-layer")
    tab.wait_for_selector(".job-panel[data-state='SUCCEEDED']")
    job = client.job(tab.get_attribute(".job-panel", "data-job"))
    for channel in range(4):
        row = f".example-row[data-channel='{channel}']"
        crops = _loaded_crops(tab, f"{row} img", 5)
        answer = client.exemplars(setup["model"], setup["dataset"], LAYER, channel, k=5)
        assert [c["name"] for c in crops] == [e.name for e in answer.exemplars]
        ratio = tab.wait_for_selector(f"{row} .ratio")
        best = client.exemplars(setup["model"], setup["dataset"], LAYER, channel, order="mean", k=1).exemplars[0].value
        end = next(i.objective_end for i in job.result.images if i.index == channel)
        if best > 0:
            assert float(ratio.get_attribute("data-ratio")) == pytest.approx(end / best, rel=1e-12)
    client.close()


def test_the_examples_api_names_a_missing_index_and_bad_arguments(setup):
    http = Http(setup["server"].http_url)
    query = f"api/exemplars?model={setup['model']}&dataset={setup['dataset']}&layer=r3&channel=0"
    status, data = http.json("GET", query)
    assert status == 404 and data["error"]["reason"] == "EXEMPLAR_INDEX_NOT_FOUND"
    status, data = http.json("GET", query.replace("channel=0", "channel=x"))
    assert status == 400 and data["error"]["field_violations"][0][0] == "channel"
    status, data = http.json("GET", query + "&order=best")
    assert status == 400 and data["error"]["field_violations"][0][0] == "order"
    status, data = http.json("POST", "api/exemplars/index", {"model": setup["model"], "dataset": setup["dataset"],
                                                            "layers": ["no_such_layer"]})
    assert status == 400 and "no_such_layer" in data["error"]["message"]
    status, data = http.json("POST", "api/exemplars/index", {"model": setup["model"], "dataset": setup["dataset"],
                                                            "steps": 3})
    assert status == 400 and data["error"]["field_violations"][0][0] == "steps"
    status, _, raw = http.call("GET", f"api/datasets/{setup['dataset']}/images/{'0' * 64}.png")
    assert status == 404

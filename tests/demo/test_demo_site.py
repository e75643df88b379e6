"""The demo site's dataset examples (featureviz.demo.site, featureviz.demo.examples), without a model: each channel
render gets its top images' crops beside it and the render / best image ratio, in index.html, in gallery.json, and
in the real browser (Debian chromium); file names from an image set are escaped."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from featureviz.demo import DemoSettings
from featureviz.demo import PanelResult
from featureviz.demo import gallery
from featureviz.demo import write_site
from featureviz.demo.examples import ChannelExamples
from featureviz.demo.examples import Example
from featureviz.demo.examples import attach
from featureviz.demo.examples import crop_png
from featureviz.demo.examples import units_of

HOSTILE = '"><img src=x onerror=alert(1)>.png'


def _png(colour, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _results():
    panels = gallery(quick=True)
    results = [PanelResult(panel=p, pngs=[_png((40 * i, 90, 200)) for i in range(p.batch)],
                           objective_start=[0.1] * p.batch, objective_end=[2.0 + i for i in range(p.batch)],
                           seconds=1.0) for p in panels]
    photo = _png((10, 200, 30), (300, 200))
    found = {}
    for n, (layer, channel) in enumerate(units_of(panels)):
        whole = "12" in layer
        box = None if whole else (10 * n, 20, 10 * n + 67, 87)
        examples = tuple(Example(name=HOSTILE if rank == 1 else f"photo-{n}-{rank}.png", value=1.0 - 0.1 * rank,
                                 png=crop_png(photo, box), box=box, whole=whole) for rank in range(6))
        found[(layer, channel)] = ChannelExamples(
            layer=layer, channel=channel, examples=examples, best_mean=1.0 if n else 0.0,
            best_mean_name=examples[0].name, images=52,
            field="the whole image" if whole else "receptive field 67 px, stride 8 px")
    attach(results, found)
    return results, found


def test_units_are_the_channel_panels():
    from featureviz.demo import EARLY_LAYER
    from featureviz.demo import LATE_LAYER

    assert units_of(gallery(quick=True)) == [(EARLY_LAYER, 0), (EARLY_LAYER, 1), (LATE_LAYER, 4), (LATE_LAYER, 10)]
    assert len(units_of(gallery())) == 8


def test_crop_png_cuts_the_box_and_bounds_the_side():
    source = Image.new("RGB", (400, 300), (0, 0, 0))
    source.paste((255, 0, 0), (100, 50, 200, 150))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    crop = Image.open(io.BytesIO(crop_png(buf.getvalue(), (100, 50, 200, 150))))
    assert crop.size == (100, 100) and crop.getpixel((0, 0)) == (255, 0, 0) and crop.getpixel((99, 99)) == (255, 0, 0)
    whole = Image.open(io.BytesIO(crop_png(buf.getvalue(), None, max_side=160)))
    assert whole.size == (160, 120)


def test_site_shows_the_examples_beside_each_channel_render(tmp_path):
    results, found = _results()
    dataset = {"note": "photos from scikit-image", "photos": [
        {"title": "Chelsea the cat", "photo": "skimage.data.chelsea()", "credit": "Stefan van der Walt",
         "licence": "CC0"}]}
    index = write_site(tmp_path, results, DemoSettings.quick(), model={"name": "m", "sha256": "0" * 64},
                       dataset=dataset)
    page = index.read_text(encoding="utf-8")
    figures = re.findall(r"<figure[^>]*>.*?</figure>", page, flags=re.S)
    with_examples = [f for f in figures if 'class="with-examples"' in f]
    assert len(with_examples) == len(found) == 4  # the early and late panels' renders, not classes or diversity
    for figure in with_examples:
        crops = re.findall(r'<img src="([^"]+-ex\d\.png)"', figure)
        assert len(crops) == 6
        for name in crops:
            assert Image.open(tmp_path / name).format == "PNG"
        assert "render / best image:" in figure
    assert "<img src=x" not in page  # escaped, never markup
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert '<section id="dataset">' in page and "Stefan van der Walt" in page and "CC0" in page
    records = [r for r in json.loads((tmp_path / "gallery.json").read_text())["images"] if "examples" in r]
    assert len(records) == 4
    for record in records:
        ex = record["examples"]
        assert len(ex["top"]) == 6 and all((tmp_path / t["file"]).is_file() for t in ex["top"])
        if ex["best_mean"] > 0:
            assert ex["ratio"] == pytest.approx(record["objective_end"] / ex["best_mean"])
            assert re.search(rf"{ex['ratio']:.2f}x", page)
        else:
            assert ex["ratio"] is None
    assert "n/a (no image activates it)" in page  # the unit whose best mean is 0


def test_site_in_the_browser_loads_every_crop(tmp_path):
    """Debian's chromium opens the written index.html: every render and crop decodes, and the crops sit beside their
    render (to its right), not under it."""
    chromium = Path("/usr/bin/chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    if not chromium.exists():
        pytest.skip("no browser: /usr/bin/chromium is missing (apt-get install -y chromium)")
    results, _ = _results()
    index = write_site(tmp_path, results, DemoSettings.quick(), model={"name": "m"})
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox",
                                                                           "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(index.as_uri())
            page.wait_for_function("() => [...document.images].every(i => i.complete)")
            broken = page.evaluate("() => [...document.images].filter(i => !i.naturalWidth).map(i => i.src)")
            assert broken == []
            layout = page.evaluate("""() => [...document.querySelectorAll('figure.with-examples')].map(f => {
                const render = f.querySelector(':scope > img').getBoundingClientRect();
                const crops = [...f.querySelectorAll('.crops img')].map(i => i.getBoundingClientRect());
                return {n: crops.length, right: crops.every(c => c.left >= render.right - 1),
                        beside: crops.every(c => c.top < render.bottom)};
            })""")
            assert len(layout) == 4 and all(f == {"n": 6, "right": True, "beside": True} for f in layout), layout
        finally:
            browser.close()

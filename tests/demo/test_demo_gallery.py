"""The README's main job, ``featureviz demo``, in its quick mode: a real embedded gRPC server on 127.0.0.1, the real
trained EfficientNet-Lite0 uploaded through featureviz.client, every panel rendered as a job, PNGs and an
index.html written. Plus: the full gallery's objectives are valid for that model (no compute)."""

from __future__ import annotations

import html
import io
import json
import re

import pytest

from featureviz.cli import main
from featureviz.demo import EARLY_LAYER
from featureviz.demo import LATE_LAYER
from featureviz.demo import gallery
from featureviz.demo.examples import EXAMPLES_K
from featureviz.demo.images import PHOTOS
from featureviz.demo.images import VARIANTS

pytestmark = pytest.mark.slow  # one quick demo through the service: import, 4 short jobs and an index of 52 images


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-out")
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def _expected_files():
    return sorted(f"{p.key}-{i}.png" for p in gallery(quick=True) for i in range(p.batch))


def _expected_crops():
    return sorted(f"{p.key}-{i}-ex{rank}.png" for p in gallery(quick=True) if p.key in ("early", "late")
                  for i in range(p.batch) for rank in range(EXAMPLES_K))


def test_writes_every_png_and_an_index_that_shows_each(demo_out):
    files = sorted(p.name for p in demo_out.glob("*.png"))
    assert files == sorted(_expected_files() + _expected_crops())
    page = (demo_out / "index.html").read_text(encoding="utf-8")
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == files
    assert page.count("<figcaption>") == len(_expected_files())
    # every panel has its section, and the settings used are on the page
    for panel in gallery(quick=True):
        assert f'<section id="{panel.key}">' in page
    assert "embedded" in page and "EfficientNet-Lite0" in page


def test_images_are_real_distinct_renders(demo_out):
    from PIL import Image
    import numpy as np

    arrays = {}
    for name in _expected_files():
        image = Image.open(io.BytesIO((demo_out / name).read_bytes()))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
        a = np.asarray(image, dtype=np.float32)
        assert a.std() > 2.0, f"{name} is (nearly) constant: std {a.std():.2f} of 255"
        arrays[name] = a
    names = sorted(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(arrays[a] - arrays[b]).mean() > 1.0, f"{a} and {b} are the same image"


def test_gallery_json_has_values_and_class_predictions(demo_out):
    summary = json.loads((demo_out / "gallery.json").read_text())
    images = {r["file"]: r for r in summary["images"]}
    assert sorted(images) == _expected_files()
    assert summary["settings"]["steps"] == 6 and summary["model"]["sha256"]
    page = (demo_out / "index.html").read_text(encoding="utf-8")
    for record in images.values():
        assert record["objective"] in page.replace("&#x27;", "'")
        if record["panel"] in ("early", "late"):
            # channel objectives of a trained network rise even in a few steps
            assert record["objective_end"] > record["objective_start"], record
        if record["panel"] == "classes":
            predicted = record["predicted"]
            assert 0 <= predicted["class"] < 1000 and 0 < predicted["probability"] <= 1
            assert f"model says: {predicted['name']} ({predicted['class']})" in page
            assert record["objective_end"] > record["objective_start"], record


def test_each_channel_render_shows_its_dataset_examples(demo_out):
    """The embedded server indexed the scikit-image set at both channel layers; each channel render has its unit's
    top images by channel mean, cropped at the receptive field (block 4: 67 px, stride 8; block 12 sees the whole
    image), and the ratio of the render's value to the best image's."""
    from PIL import Image

    from featureviz.demo.examples import CROP_SIDE

    summary = json.loads((demo_out / "gallery.json").read_text())
    page = (demo_out / "index.html").read_text(encoding="utf-8")
    with_examples = [r for r in summary["images"] if "examples" in r]
    assert sorted(r["panel"] for r in with_examples) == ["early", "early", "late", "late"]
    for record in with_examples:
        ex = record["examples"]
        layer, channel = record["objective"].rsplit(":", 1)
        assert (ex["layer"], ex["channel"]) == (layer, int(channel))
        assert ex["images"] == len(PHOTOS) * len(VARIANTS)
        values = [t["value"] for t in ex["top"]]
        assert len(values) == EXAMPLES_K and values == sorted(values, reverse=True)
        assert ex["best_mean"] == values[0] and ex["best_mean_image"] == ex["top"][0]["image"]
        assert ex["ratio"] == record["objective_end"] / ex["best_mean"]
        assert f"{ex['ratio']:.2f}x" in page
        for top in ex["top"]:
            crop = Image.open(demo_out / top["file"])
            assert crop.format == "PNG" and max(crop.size) <= CROP_SIDE
            assert top["image"].endswith(".png") and top["image"].split("-")[0] in {p.key for p in PHOTOS}
            if record["panel"] == "early":  # a 67 px field in 224 px: a crop of at most 67/224 of the file
                assert not top["whole"] and ex["field"].startswith("receptive field 67 px, stride 8 px")
                x0, y0, x1, y1 = top["box"]
                assert 0 < x1 - x0 <= 120 and 0 < y1 - y0 <= 120
            else:
                assert top["whole"] and top["box"] is None and "whole image" in ex["field"]
    assert '<section id="dataset">' in page and "scikit-image" in page
    sources = json.loads((demo_out / "dataset.json").read_text())
    assert len(sources["images"]) == len(PHOTOS) * len(VARIANTS)
    named = {t["image"] for r in with_examples for t in r["examples"]["top"]}
    assert named <= {record["file"] for record in sources["images"]}
    for photo in PHOTOS:
        assert f"skimage.data.{photo.key}()" in page and html.escape(photo.licence) in page


def test_full_gallery_is_valid_for_the_model():
    """The full gallery's layers, channels and classes exist in the model's catalog (engine.validate: no
    compute), so `make demo` cannot fail on a renamed layer."""
    from featureviz import zoo
    from featureviz.engine import RenderSpec
    from featureviz.engine import validate
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    from featureviz.demo import DemoSettings

    model = import_model(zoo.efficientnet_lite0(), preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))
    settings = DemoSettings()
    panels = gallery(class_names=zoo.imagenet_class_names())
    assert [p.batch for p in panels] == [4, 4, 4, 4]
    for panel in panels:
        validate(model, RenderSpec(objective=panel.objective, batch=panel.batch, steps=settings.steps,
                                   size=settings.size, seed=settings.seed, param=settings.param,
                                   transforms=settings.transforms))
    assert "goldfish" in panels[2].labels[0]


def test_demo_uses_the_server_it_is_given(tmp_path):
    """``--server ADDR``: the model is uploaded to that server and every panel is one of its jobs."""
    from featureviz.client import Client
    from featureviz.client import pb
    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    out = tmp_path / "out"
    with serve_in_background(ServerConfig(tmp_path / "store")) as server, Client(server.address) as fv:
        assert main(["demo", "--quick", "--quiet", "--steps", "1", "--server", server.address, "--out", str(out)]) == 0
        models = list(fv.models())
        jobs = list(fv.jobs())
    assert len(models) == 1 and models[0].display_name == "efficientnet_lite0.onnx"
    renders = [job for job in jobs if not job.spec.HasField("exemplar_index")]
    indexes = [job for job in jobs if job.spec.HasField("exemplar_index")]
    assert len(renders) == len(gallery(quick=True))
    assert all(job.state == pb.JOB_STATE_SUCCEEDED and job.spec.steps == 1 for job in renders)
    # the dataset examples: one index job over the uploaded set at the two channel layers
    assert len(indexes) == 1 and indexes[0].state == pb.JOB_STATE_SUCCEEDED
    assert list(indexes[0].result.exemplar_index.layers) == [EARLY_LAYER, LATE_LAYER]
    assert indexes[0].result.exemplar_index.images == len(PHOTOS) * len(VARIANTS)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(_expected_files() + _expected_crops())
    assert server.address in (out / "index.html").read_text(encoding="utf-8")

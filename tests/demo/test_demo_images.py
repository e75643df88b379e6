"""The demo's image set (featureviz.demo.images): real photos bundled in the scikit-image wheel, written as PNG
files with deterministic crops and mirror images, torch-free, with each file's provenance and licence."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from importlib import metadata

from PIL import Image

from featureviz.demo.images import MAX_SIDE
from featureviz.demo.images import PHOTOS
from featureviz.demo.images import VARIANTS
from featureviz.demo.images import demo_images
from featureviz.demo.images import skimage_data_folder
from featureviz.demo.images import write_dataset

LICENCES = {"CC0", "public domain", "public domain (no known copyright restrictions)",
            "no known copyright restrictions"}


def test_every_photo_ships_in_the_wheel_not_fetched():
    """Each file is one the installed distribution itself lists (its RECORD), so nothing is downloaded."""
    folder, version = skimage_data_folder()
    shipped = {str(f).replace("\\", "/") for f in metadata.files("scikit-image") or []}
    for photo in PHOTOS:
        assert f"skimage/data/{photo.file}" in shipped, (photo.file, version)
        assert (folder / photo.file).is_file()
        assert photo.licence in LICENCES and photo.credit


def test_the_set_is_deterministic_and_a_few_dozen_distinct_rgb_pngs():
    first, second = demo_images(), demo_images()
    assert [(i.name, i.png) for i in first] == [(i.name, i.png) for i in second]
    assert len(first) == len(PHOTOS) * len(VARIANTS) >= 36
    names = [i.name for i in first]
    assert len(set(names)) == len(names) and all(n.endswith(".png") for n in names)
    assert len({hashlib.sha256(i.png).digest() for i in first}) == len(first)  # no two files alike
    for item in first:
        image = Image.open(io.BytesIO(item.png))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == item.size
        assert max(image.size) <= MAX_SIDE and min(image.size) >= 64


def test_written_folder_holds_only_the_images_and_the_provenance_names_each(tmp_path):
    images = write_dataset(tmp_path / "set", provenance_path=tmp_path / "sources.json")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(i.name for i in images)
    sources = json.loads((tmp_path / "sources.json").read_text())
    assert "scikit-image" in sources["source"]
    records = {r["file"]: r for r in sources["images"]}
    assert sorted(records) == sorted(i.name for i in images)
    for item in images:
        record = records[item.name]
        assert record["sha256"] == hashlib.sha256((tmp_path / "set" / item.name).read_bytes()).hexdigest()
        assert record["licence"] in LICENCES and record["credit"] and record["photo"].startswith("skimage.data.")
        assert record["source_file"] == f"skimage/data/{item.photo.file}"
        x0, y0, x1, y1 = record["box"]
        assert 0 <= x0 < x1 and 0 <= y0 < y1
    # the mirror image is the full image mirrored (same size, pixels reversed left to right)
    full = Image.open(tmp_path / "set" / "chelsea-full.png")
    mirror = Image.open(tmp_path / "set" / "chelsea-mirror.png")
    assert full.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes() == mirror.tobytes()


def test_the_module_imports_no_torch_numpy_or_scikit_image(tmp_path):
    code = ("import sys; from featureviz.demo.images import write_dataset; write_dataset(sys.argv[1]); "
            "loaded = {'torch', 'numpy', 'skimage', 'onnx'} & set(sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "set")], check=True, timeout=120)
    assert len(list((tmp_path / "set").iterdir())) == len(PHOTOS) * len(VARIANTS)

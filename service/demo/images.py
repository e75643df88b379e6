"""The demo's image set: real photos that ship inside the scikit-image wheel (``skimage.data``), written as a folder
of PNG files with a few deterministic crops and mirror images of each, and their provenance.

Only files bundled in the wheel are used (read from the installed package's ``data`` folder, never through
``skimage.data``'s fetchers, which download the rest of its images with pooch): nothing is downloaded at run time.
scikit-image itself is not imported. Each photo's description, credit and licence are as scikit-image documents
them in the docstring of its ``skimage.data`` function; only photos with a stated public-domain or CC0 licence (or
"no known copyright restrictions") are used.

Torch- and numpy-free: Pillow reads, crops, mirrors, downscales and encodes; the same installed files and Pillow
give the same bytes on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import pathlib
from typing import Sequence

__all__ = ["Photo", "PHOTOS", "VARIANTS", "MAX_SIDE", "DemoImage", "skimage_data_folder", "demo_images",
           "write_dataset", "provenance", "DemoImagesMissing"]

MAX_SIDE = 384  # every written image is at most this many pixels on its long side


@dataclasses.dataclass(frozen=True)
class Photo:
    key: str          # the skimage.data function that returns it
    file: str         # its file in the wheel's skimage/data folder
    title: str
    credit: str       # who took it / where scikit-image got it
    licence: str      # as scikit-image's docstring states it


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "astronaut.png", "the astronaut Eileen Collins", "NASA Great Images database",
          "public domain (no known copyright restrictions)"),
    Photo("chelsea", "chelsea.png", "Chelsea the cat", "Stefan van der Walt", "CC0"),
    Photo("coffee", "coffee.png", "a cup of coffee", "Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
    Photo("rocket", "rocket.jpg", "the launch of DSCOVR on a Falcon 9", "SpaceX", "public domain"),
    Photo("hubble_deep_field", "hubble_deep_field.jpg", "the Hubble eXtreme Deep Field", "NASA (HubbleSite)",
          "public domain"),
    Photo("camera", "camera.png", "a man with a camera (grayscale)", "Lav Varshney", "CC0"),
    Photo("coins", "coins.png", "Greek coins from Pompeii (grayscale)", "Brooklyn Museum Collection",
          "no known copyright restrictions"),
    Photo("clock", "clock_motion.png", "a motion-blurred wall clock (grayscale)", "Stefan van der Walt",
          "public domain"),
    Photo("grass", "grass.png", "grass (grayscale)", "linolafett on DeviantArt", "CC0"),
    Photo("gravel", "gravel.png", "gravel (grayscale)", "CC0Textures", "CC0"),
    Photo("brick", "brick.png", "a brick wall (grayscale)", "CC0Textures", "CC0"),
    Photo("immunohistochemistry", "ihc.png", "colonic glands, IHC staining", "Center for Microscopy And Molecular "
          "Imaging (CMMI)", "no known copyright restrictions"),
    Photo("retina", "retina.jpg", "a human retina", "Mikael Haggstrom, Wikimedia Commons", "CC0"),
)

# Each photo gives these images: (name, mirrored, crop box as fractions (x0, y0, x1, y1) of the photo, after the
# mirror). The crops are big enough to hold whole objects and small enough to show them at another scale.
VARIANTS: tuple[tuple[str, bool, tuple[float, float, float, float]], ...] = (
    ("full", False, (0.0, 0.0, 1.0, 1.0)),
    ("mirror", True, (0.0, 0.0, 1.0, 1.0)),
    ("centre", False, (0.2, 0.2, 0.8, 0.8)),
    ("corner", True, (0.0, 0.0, 0.6, 0.6)),
)


class DemoImagesMissing(RuntimeError):
    """scikit-image is not installed, or its wheel lacks a photo the demo uses."""


@dataclasses.dataclass(frozen=True)
class DemoImage:
    name: str            # the PNG's file name in the set
    png: bytes
    photo: Photo
    variant: str
    box: tuple[int, int, int, int]   # the crop in the photo's own pixels (after the mirror), end exclusive
    mirrored: bool
    size: tuple[int, int]            # (width, height) as written

    def record(self, version: str) -> dict:
        return {"file": self.name, "sha256": hashlib.sha256(self.png).hexdigest(), "width": self.size[0],
                "height": self.size[1], "photo": f"skimage.data.{self.photo.key}()",
                "source_file": f"skimage/data/{self.photo.file}", "scikit_image": version,
                "title": self.photo.title, "credit": self.photo.credit, "licence": self.photo.licence,
                "variant": self.variant, "mirrored": self.mirrored, "box": list(self.box)}


def skimage_data_folder() -> tuple[pathlib.Path, str]:
    """(the installed scikit-image's ``data`` folder, its version), found without importing scikit-image."""
    from importlib import metadata

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DemoImagesMissing("scikit-image is not installed: the demo's dataset images come from its wheel "
                                "(pip install 'featureviz[demo]')")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
    try:
        version = metadata.version("scikit-image")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return folder, version


def _load(folder: pathlib.Path, photo: Photo):
    from PIL import Image

    path = folder / photo.file
    if not path.is_file():
        raise DemoImagesMissing(f"scikit-image's wheel has no {photo.file} (skimage.data.{photo.key}) in {folder}; "
                                "the demo needs the photos bundled in the wheel")
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def demo_images(*, photos: Sequence[Photo] = PHOTOS, max_side: int = MAX_SIDE) -> list[DemoImage]:
    """Every photo in every variant, in a fixed order: ``<photo>-<variant>.png``, RGB, at most ``max_side`` on the
    long side (downscaled with Lanczos)."""
    from PIL import Image

    folder, _ = skimage_data_folder()
    out = []
    for photo in photos:
        original = _load(folder, photo)
        mirrored_image = original.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w, h = original.size
        for variant, mirrored, (fx0, fy0, fx1, fy1) in VARIANTS:
            box = (round(fx0 * w), round(fy0 * h), round(fx1 * w), round(fy1 * h))
            image = (mirrored_image if mirrored else original).crop(box)
            scale = max_side / max(image.size)
            if scale < 1:
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.LANCZOS)
            out.append(DemoImage(name=f"{photo.key}-{variant}.png", png=_png(image), photo=photo, variant=variant,
                                 box=box, mirrored=mirrored, size=image.size))
    return out


def provenance(images: Sequence[DemoImage]) -> dict:
    """The JSON-ready provenance of a set: where each file comes from, its licence, and the crop it is."""
    _, version = skimage_data_folder()
    return {"source": f"scikit-image {version}, the photos bundled in its wheel (skimage/data)",
            "licences": "as scikit-image documents each photo in its skimage.data function",
            "images": [image.record(version) for image in images]}


def write_dataset(folder: str | os.PathLike, *, provenance_path: str | os.PathLike | None = None,
                  photos: Sequence[Photo] = PHOTOS, max_side: int = MAX_SIDE) -> list[DemoImage]:
    """Write the demo's images as PNG files into ``folder`` (created; nothing else is written there, so the folder
    is the dataset as it is) and, if given, their provenance as JSON to ``provenance_path`` (outside the folder)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = demo_images(photos=photos, max_side=max_side)
    for image in images:
        (folder / image.name).write_bytes(image.png)
    if provenance_path is not None:
        pathlib.Path(provenance_path).write_text(json.dumps(provenance(images), indent=2) + "\n", encoding="utf-8")
    return images

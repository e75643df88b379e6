"""The exemplar index pass against a plain torch forward of the same truncated model (issue 23).

EfficientNet-Lite0 (featureviz.zoo, dynamic size) at 224 px over generated JPEG images (smooth random colour
fields with shapes; scikit-image is not a dependency): the index pass (file reads, JPEG decoding in 2 threads
overlapped with compute, preprocessing, top-k/bottom-k/sketch bookkeeping, a state save per chunk) against
``truncated(x)`` over the same images already decoded in memory, same batch size, in one run. Then the peak
resident memory of the pass in fresh processes at two set sizes. Writes only under a temp folder it removes.

    .venv/bin/python bench/bench_exemplars.py [--images 160] [--batch 32] [--layers few|all]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, size: int = 224, seed: int = 0) -> None:
    from PIL import Image
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.random((8, 8, 3)) * 255
        image = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(8, 48))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"{i:05d}.jpg", quality=90)


def pick_layers(model, which: str) -> list[str]:
    from featureviz.engine.exemplars import index_layers

    every = index_layers(model)
    if which == "all":
        return every
    return [every[round(i * (len(every) - 1) / 5)] for i in range(1, 6)]


def load_model():
    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    return import_model(zoo.efficientnet_lite0(dynamic_size=True), verify=False,
                        preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))


def compare(folder: Path, batch: int, which: str) -> dict:
    import torch

    from featureviz.engine.exemplars import ImageFolder
    from featureviz.engine.exemplars import build_index
    from featureviz.engine.images import decode_image
    from featureviz.engine.transforms import preprocess_map

    model = load_model()
    layers = pick_layers(model, which)
    source = ImageFolder(folder)
    truncated = model.truncate(layers)
    matrix, bias = preprocess_map(model.input_spec.preprocess, 3)
    images = [decode_image(source.read(i), (224, 224), formats=None) for i in range(len(source.names))]
    batches = [torch.stack(images[s:s + batch]) for s in range(0, len(images), batch)]

    def plain():
        with torch.inference_mode():
            for x in batches:
                truncated(torch.einsum("oc,nchw->nohw", matrix, x) + bias.view(1, -1, 1, 1))

    def index_pass(state):
        return build_index(model, source, layers=layers, k=16, size=224, batch_size=batch, chunk_images=4 * batch,
                           state_path=state)

    plain()  # warm-up
    times = {"plain": [], "index": []}
    for r in range(2):  # interleaved, best of 2
        start = time.perf_counter()
        plain()
        times["plain"].append(time.perf_counter() - start)
        state = folder.parent / f"state{r}.npz"
        start = time.perf_counter()
        index_pass(state)
        times["index"].append(time.perf_counter() - start)
        state.unlink()
    plain_s, index_s = min(times["plain"]), min(times["index"])
    channels = sum(model.layer(name).channels for name in layers)
    return {"images": len(images), "batch": batch, "layers": len(layers), "channels": channels,
            "plain_s": round(plain_s, 3), "index_s": round(index_s, 3), "ratio": round(plain_s / index_s, 3),
            "plain_img_s": round(len(images) / plain_s, 1), "index_img_s": round(len(images) / index_s, 1)}


def peak(folder: Path, batch: int, which: str) -> dict:
    """Run in a fresh process: one index pass, then the peak resident set."""
    from featureviz.engine.exemplars import ImageFolder
    from featureviz.engine.exemplars import build_index

    import threading

    model = load_model()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, high, done = rss(), [0], threading.Event()

    def sample():  # the current resident set during the pass (ru_maxrss keeps the import's own peak)
        while not done.wait(0.02):
            high[0] = max(high[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    state = folder.parent / f"peak{os.getpid()}.npz"
    build_index(model, ImageFolder(folder), layers=pick_layers(model, which), k=16, size=224, batch_size=batch,
                chunk_images=4 * batch, state_path=state)
    done.set()
    sampler.join()
    state.unlink(missing_ok=True)
    return {"images": len(ImageFolder(folder).names), "rss_before_mib": round(before / 2**20, 1),
            "peak_rss_during_pass_mib": round(high[0] / 2**20, 1),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", choices=("few", "all"), default="few")
    parser.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # child mode: a folder
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(peak(Path(args.peak), args.batch, args.layers)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench_exemplars_"))
    try:
        make_images(root / "a", args.images)
        make_images(root / "b", args.images // 2, seed=1)
        result = {"compare": compare(root / "a", args.batch, args.layers)}
        result["peak"] = [json.loads(subprocess.run(
            [sys.executable, __file__, "--peak", str(root / name), "--batch", str(args.batch), "--layers",
             args.layers], capture_output=True, text=True, check=True).stdout) for name in ("b", "a")]
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

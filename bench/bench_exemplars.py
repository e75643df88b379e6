"""The exemplar index pass against a plain torch forward of the same truncated model (issue 23).

EfficientNet-Lite0 (featureviz.zoo, dynamic size) at 224 px over generated JPEG images (smooth random colour
fields with shapes; scikit-image is not a dependency): the index pass (file reads, JPEG decoding in 2 threads
overlapped with compute, preprocessing, top-k/bottom-k/sketch bookkeeping, a state save per chunk) against
``truncated(x)`` over the same images already decoded in memory, same batch size, in one run. Then the peak
Then memory at two set sizes (default 128 and 512): each size's index pass and a plain streamed forward
(decode a batch, forward it) each in a fresh process, reporting ru_maxrss, the resident set once the model is
loaded and warm (one batch through it), the peak during the pass (sampled every 5 ms) and the pass's own growth
(peak - warm), and the index / plain ratio of the peaks. Writes only under a temp folder it removes.

    .venv/bin/python bench/bench_exemplars.py [--images 256] [--memory-sizes 128,512] [--batch 32]
        [--layers few|all] [--skip-speed] [--skip-memory] [--device cuda]
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


def compare(folder: Path, batch: int, which: str, device: str | None = None) -> dict:
    import torch

    from featureviz.engine.exemplars import ImageFolder
    from featureviz.engine.exemplars import build_index
    from featureviz.engine.images import decode_image
    from featureviz.engine.transforms import preprocess_map

    model = load_model()
    layers = pick_layers(model, which)
    source = ImageFolder(folder)
    truncated = model.truncate(layers)
    matrix, bias = preprocess_map(model.input_spec.preprocess, 3, device=device)
    if device is not None:
        truncated = truncated.to(device)
    images = [decode_image(source.read(i), (224, 224), formats=None) for i in range(len(source.names))]
    batches = [torch.stack(images[s:s + batch]) for s in range(0, len(images), batch)]

    def sync():
        if device is not None and str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def plain():  # the decoded images in host memory, copied to the device batch by batch as the pass does
        with torch.inference_mode():
            for x in batches:
                x = x.to(device) if device is not None else x
                truncated(torch.einsum("oc,nchw->nohw", matrix, x) + bias.view(1, -1, 1, 1))
        sync()

    def index_pass(state):
        index = build_index(model, source, layers=layers, k=16, size=224, batch_size=batch, chunk_images=4 * batch,
                            state_path=state, device=device)
        sync()
        return index

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
    return {"images": len(images), "batch": batch, "device": device or "cpu", "layers": len(layers),
            "channels": channels,
            "plain_s": round(plain_s, 3), "index_s": round(index_s, 3), "ratio": round(plain_s / index_s, 3),
            "plain_img_s": round(len(images) / plain_s, 1), "index_img_s": round(len(images) / index_s, 1)}


def rss_bytes() -> int:
    """The current resident set of this process (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, folder: Path, batch: int, which: str) -> dict:
    """One pass in this (fresh) process: ``index`` (build_index) or ``plain`` (decode a batch, forward it: the same
    images streamed through the same truncated model, no bookkeeping). Memory is measured three ways:
    ru_maxrss (the whole process's peak, model import included), the resident set after the model is loaded and one
    batch has gone through it (warm: weights, oneDNN primitives and the allocator's pools for one batch exist), and
    the peak resident set during the pass, sampled every 5 ms; the pass's own growth is that peak minus the warm
    figure. The peak is also split by the pass's first and second half of the images: memory that grew with the
    images seen would make the second half's peak the higher, within one process (no process-to-process noise)."""
    import threading

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

    def forward(images):
        with torch.inference_mode():
            truncated(torch.einsum("oc,nchw->nohw", matrix, torch.stack(images)) + bias.view(1, -1, 1, 1))

    def decode(i):
        return decode_image(source.read(i), (224, 224), formats=None)

    forward([decode(i) for i in range(min(batch, len(source.names)))])  # warm-up: one batch
    warm = rss_bytes()
    total = len(source.names)
    high, done, position = [warm, warm], threading.Event(), [0]

    def sample():  # high[0]: the peak while the first half of the images go through, high[1]: the second half
        while not done.wait(0.005):
            half = 0 if position[0] < total // 2 else 1
            high[half] = max(high[half], rss_bytes())

    def progress(done_images, _total):
        position[0] = done_images

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "index":
        state = folder.parent / f"peak{os.getpid()}.npz"
        index = build_index(model, source, layers=layers, k=16, size=224, batch_size=batch, chunk_images=4 * batch,
                            state_path=state, progress=progress)
        state.unlink(missing_ok=True)
        per_channel = sum(sum(a.nbytes for a in index.states[name].arrays("").values()) for name in layers)
    else:
        for s in range(0, total, batch):
            forward([decode(i) for i in range(s, min(s + batch, total))])
            progress(min(s + batch, total), total)
        per_channel = 0
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    high[1] = max(high[1], rss_bytes())
    peak = max(high)
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"mode": mode, "images": total, "seconds": round(seconds, 2), "warm_rss_mib": mib(warm),
            "peak_rss_during_pass_mib": mib(peak), "pass_growth_mib": mib(peak - warm),
            "peak_first_half_mib": mib(high[0]), "peak_second_half_mib": mib(high[1]),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "index_state_mib": mib(per_channel)}


def memory(root: Path, sizes: list[int], batch: int, which: str) -> list[dict]:
    """Each (size, mode) in a fresh process, plain and index alternating, the sets nested (the first n images)."""
    rows = []
    for n in sizes:
        folder = root / f"n{n}"
        folder.mkdir()
        for name in sorted(os.listdir(root / "all"))[:n]:
            os.link(root / "all" / name, folder / name)
        for mode in ("plain", "index"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), "--batch", str(batch),
                                  "--layers", which], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{mode} at {n} images failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The memory figures as the markdown table of bench/RESULTS.md."""
    lines = ["| images | pass | warm RSS MiB | peak RSS during pass MiB | pass growth MiB | peak 1st / 2nd half MiB | "
             "ru_maxrss MiB | index / plain (peak) | s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    plain = {r["images"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:
        ratio = (f"{r['peak_rss_during_pass_mib'] / plain[r['images']]['peak_rss_during_pass_mib']:.3f}"
                 if r["mode"] == "index" and r["images"] in plain else "")
        lines.append(f"| {r['images']} | {r['mode']} | {r['warm_rss_mib']:,} | {r['peak_rss_during_pass_mib']:,} | "
                     f"{r['pass_growth_mib']:,} | {r['peak_first_half_mib']:,} / {r['peak_second_half_mib']:,} | "
                     f"{r['ru_maxrss_mib']:,} | {ratio} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256, help="images of the speed comparison")
    parser.add_argument("--memory-sizes", default="128,512", help="set sizes of the memory runs (comma-separated)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", choices=("few", "all"), default="few")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory runs")
    parser.add_argument("--skip-memory", action="store_true", help="only the speed comparison")
    parser.add_argument("--device", default=None, help="torch device of the speed comparison (default: cpu)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)  # child mode: MODE FOLDER
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.batch, args.layers)))
        return
    sizes = [int(v) for v in args.memory_sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench_exemplars_"))
    try:
        make_images(root / "all", args.images if args.skip_memory else max(sizes + [args.images]))
        result = {}
        # memory first: a child's ru_maxrss starts from this process's own peak (Linux keeps the high-water mark
        # across fork and exec), so the children must start while this process is small (before compare() loads
        # the model and holds the decoded images)
        if not args.skip_memory:
            result["memory"] = memory(root, sizes, args.batch, args.layers)
        if not args.skip_speed:
            speed = root / "speed"
            speed.mkdir()
            for name in sorted(os.listdir(root / "all"))[:args.images]:
                os.link(root / "all" / name, speed / name)
            result["compare"] = compare(speed, args.batch, args.layers, args.device)
        print(json.dumps(result, indent=1))
        if "compare" in result:
            c = result["compare"]
            print("\n| images | batch | device | layers (channels) | plain img/s | index pass img/s | plain / index |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            print(f"| {c['images']} | {c['batch']} | {c['device']} | {c['layers']} ({c['channels']:,}) | "
                  f"{c['plain_img_s']} | {c['index_img_s']} | {c['ratio']} |")
        if "memory" in result:
            print()
            print(table(result["memory"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

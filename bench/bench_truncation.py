"""Truncation: forward + backward time of the truncated model vs the full model, and import vs cache time.

The engine optimizes an image for one layer. Running the whole network (what hook-based tools such as lucent
do) computes and stores every later layer too; ``ImportedModel.truncate`` keeps only the ancestors of the
target. Measured on the real, trained EfficientNet-Lite0 (``featureviz.zoo``) exported to ONNX and imported
through the normal pipeline, for an early, a middle and a late layer:

- ``full``: the whole converted graph runs (the logits are computed), the objective is the mean of the target
  layer, backward to the input image;
- ``truncated``: ``model.truncate([layer])``, same objective, same backward.

    .venv/bin/python bench/bench_truncation.py [--batch 8] [--size 224] [--reps 5] [--device cpu|cuda]
                                               [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch

from featureviz import zoo
from featureviz.importer import import_model


def _fwd_bwd(module, x: torch.Tensor, key: str) -> float:
    """Seconds for one forward + backward to the image of the mean of ``key``."""
    start = time.perf_counter()
    image = x.detach().clone().requires_grad_(True)
    module(image)[key].mean().backward()
    if image.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _compare_ms(full, cut, x: torch.Tensor, key: str, reps: int) -> tuple[float, float]:
    """Best-of-``reps`` ms of both, interleaved so that load from other processes hits both alike."""
    _fwd_bwd(full, x, key), _fwd_bwd(cut, x, key)  # warm-up
    full_s, cut_s = [], []
    for _ in range(reps):
        full_s.append(_fwd_bwd(full, x, key))
        cut_s.append(_fwd_bwd(cut, x, key))
    return min(full_s) * 1000, min(cut_s) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    args = parser.parse_args()

    path = zoo.efficientnet_lite0()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        model = import_model(path, cache_dir=cache)
        import_s = time.perf_counter() - start
        start = time.perf_counter()
        import_model(path, cache_dir=cache)
        cached_s = time.perf_counter() - start

    spatial = [layer for layer in model.layers if layer.spatial]
    picks = {"early": spatial[len(spatial) // 10], "middle": spatial[len(spatial) // 2],
             "late": spatial[(len(spatial) * 9) // 10]}
    device = torch.device(args.device)
    module = model.module.to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    rows = []
    for where, layer in picks.items():
        full = model.truncate([layer.name, model.logits]).to(device)
        cut = model.truncate([layer.name]).to(device)
        full_ms, cut_ms = _compare_ms(full, cut, x, layer.name, args.reps)
        nodes = (len(cut.graph.nodes), len(module.graph.nodes))
        rows.append((where, layer, full_ms, cut_ms, nodes))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"## Truncation (bench/bench_truncation.py, {datetime.date.today()})",
        "",
        f"EfficientNet-Lite0 (trained, ImageNet), ONNX opset 17 -> featureviz.importer; {device_name}; "
        f"batch {args.batch}, {args.size}x{args.size}, forward + backward to the image, best of {args.reps} (interleaved).",
        f"Import: {import_s:.2f} s first time (max rel. difference from onnxruntime "
        f"{model.check.max_rel_err:.1e}), {cached_s:.2f} s from the cache.",
        "",
        "| layer | name | shape | graph nodes kept | full ms | truncated ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for where, layer, full_ms, cut_ms, (kept, total) in rows:
        shape = "x".join(str(s) for s in layer.shape[1:])
        lines.append(f"| {where} (depth {layer.depth}/{len(model.layers)}) | `{layer.name}` | {shape} | "
                     f"{kept}/{total} | {full_ms:.1f} | {cut_ms:.1f} | {full_ms / cut_ms:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results is not None:
        with open(args.results, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()

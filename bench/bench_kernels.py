"""Benchmark the fused Triton kernels against their torch references and against the roofline floor.

For each op (spectrum_to_image, affine_resample), batch and image size: forward, backward and forward+backward
time of the Triton kernel and of the torch reference (``featureviz.kernels.reference``, the same functions the
tests use), the kernel's achieved bytes/s and FLOP/s, and its time over the roofline floor
max(bytes / measured bandwidth, FLOPs / measured TF32 matmul rate).

    .venv/bin/python bench/bench_kernels.py                          # GPU: batch 1/8/64/256, sizes 128/224/512
    .venv/bin/python bench/bench_kernels.py --results bench/RESULTS.md   # also append a section there

Without CUDA it is a smoke run: tiny sizes, the kernels through the Triton interpreter; the times are not
performance figures and are labelled so.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

from featureviz.kernels import fft_image  # noqa: E402
from featureviz.kernels import reference  # noqa: E402
from featureviz.kernels import resample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F32 = 4  # bytes


# --- timing and ceilings -------------------------------------------------------------------------------------------

def bench_ms(fn, *, reps: int) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU (L2 flushed between runs), wall clock on CPU."""
    if HAS_CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, *, reps: int) -> dict[str, float]:
    """Achievable bandwidth (a large copy: read + write) and TF32 matmul FLOP/s, measured here."""
    n_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n_bytes // F32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n_bytes / (bench_ms(lambda: dst.copy_(src), reps=reps) * 1e-3)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the kernels' tl.dot default precision
    try:
        flops = 2 * n**3 / (bench_ms(lambda: a @ b, reps=reps) * 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return {"bytes_per_s": bandwidth, "flops_per_s": flops}


# --- cost models of the fused kernels (compulsory HBM traffic; the DFT as the matmuls the kernels run) --------------

def fft_cost(batch, channels, size, direction) -> tuple[float, float]:
    """(FLOPs, bytes) of the mirror-folded DFT matmuls the kernels run, per channel (Hh = H//2+1, Wh = W//2+1):
    forward 4 (Hh x Hh) @ (Hh x Wf) and 2 (H x Wf) @ (Wf x Wh); backward 2 (H x Wh) @ (Wh x Wf) and 4 as forward.

    Forward reads the spectrum and writes the image; backward reads dL/dimage and the image and writes
    dL/dspectrum. Scale, colour and DFT matrices are small and L2-resident; the scratch band stays in L2.
    """
    h = w = size
    wf, hh, wh = w // 2 + 1, h // 2 + 1, w // 2 + 1
    flops = batch * channels * (4 * 2 * hh * hh * wf + 2 * 2 * h * wf * wh)
    spectrum = batch * channels * h * wf * 2 * F32
    image = batch * channels * h * w * F32
    return flops, (spectrum + image if direction == "forward" else spectrum + 2 * image)


def resample_cost(batch, channels, size, direction) -> tuple[float, float]:
    """(FLOPs, bytes): a gather, memory-bound. One read of the input and one write of the output per direction."""
    pixels = batch * channels * size * size
    return (40 if direction == "forward" else 60) * pixels, 2 * pixels * F32


# --- cases -----------------------------------------------------------------------------------------------------------

def fft_case(batch, size, device, gen):
    wf = size // 2 + 1
    spectrum = torch.randn(batch, 3, size, wf, 2, generator=gen).to(device).requires_grad_(True)
    scale = (1.0 / reference.rfft2_freqs(size, size).clamp(min=1.0 / size) / size).to(device)
    color = torch.randn(3, 3, generator=gen).to(device)
    impls = {
        "triton": lambda: fft_image.spectrum_to_image(spectrum, scale, color, (size, size)),
        "torch": lambda: reference.spectrum_to_image(spectrum, scale, color, (size, size)),
    }
    return spectrum, impls, fft_cost


def resample_case(batch, size, device, gen):
    image = torch.rand(batch, 3, size, size, generator=gen).to(device).requires_grad_(True)
    angle = (torch.rand(batch, generator=gen) - 0.5) * (math.pi / 9)  # +-10 degrees
    scale = 0.9 + 0.2 * torch.rand(batch, generator=gen)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = scale * torch.cos(angle), -scale * torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = scale * torch.sin(angle), scale * torch.cos(angle)
    theta[:, :, 2] = (torch.rand(batch, 2, generator=gen) - 0.5) * 0.1
    theta = theta.to(device)
    std = torch.tensor([0.229, 0.224, 0.225])
    matrix, bias = torch.diag(1 / std).to(device), (-torch.tensor([0.485, 0.456, 0.406]) / std).to(device)
    kwargs = {"border": 0.5, "matrix": matrix, "bias": bias}
    impls = {
        "triton": lambda: resample.affine_resample(image, theta, (size, size), **kwargs),
        "torch": lambda: reference.affine_resample(image, theta, (size, size), **kwargs),
    }
    return image, impls, resample_cost


def run_case(op, make, batch, size, device, ceilings, reps) -> list[dict]:
    gen = torch.Generator().manual_seed(batch * 1000 + size)
    leaf, impls, cost = make(batch, size, device, gen)
    rows = []
    for impl, forward in impls.items():
        out = forward()
        grad = torch.randn(out.shape, generator=gen).to(device)
        times = {
            "forward": bench_ms(lambda: forward(), reps=reps),
            "backward": bench_ms(lambda: torch.autograd.grad(out, leaf, grad, retain_graph=True), reps=reps),
            "full": bench_ms(lambda: torch.autograd.grad(forward(), leaf, grad), reps=reps),
        }
        for direction in ("forward", "backward", "full"):
            if direction == "full":
                flops = sum(cost(batch, 3, size, d)[0] for d in ("forward", "backward"))
                nbytes = sum(cost(batch, 3, size, d)[1] for d in ("forward", "backward"))
            else:
                flops, nbytes = cost(batch, 3, size, direction)
            floor_ms = max(nbytes / ceilings["bytes_per_s"], flops / ceilings["flops_per_s"]) * 1e3
            ms = times[direction]
            rows.append({"op": op, "impl": impl, "batch": batch, "size": size, "direction": direction, "ms": ms,
                         "GB/s": nbytes / ms * 1e-6, "TFLOP/s": flops / ms * 1e-9, "floor_ms": floor_ms,
                         "x_floor": ms / floor_ms})
        del out
    for row in rows:
        if row["impl"] == "triton":
            ref = next(r for r in rows if r["impl"] == "torch" and r["direction"] == row["direction"])
            row["speedup"] = ref["ms"] / row["ms"]
    return rows


def table(rows) -> str:
    lines = ["| op | batch | size | dir | triton ms | torch ms | speedup | triton GB/s | triton TFLOP/s | "
             "floor ms | triton / floor |", "| --- " * 11 + "|"]
    for r in rows:
        if r["impl"] != "triton":
            continue
        ref = next(x for x in rows if x["impl"] == "torch" and x["op"] == r["op"] and x["batch"] == r["batch"]
                   and x["size"] == r["size"] and x["direction"] == r["direction"])
        lines.append(f"| {r['op']} | {r['batch']} | {r['size']} | {r['direction']} | {r['ms']:.3f} | {ref['ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['GB/s']:.0f} | {r['TFLOP/s']:.2f} | {r['floor_ms']:.4f} | "
                     f"{r['x_floor']:.1f}x |")
    return "\n".join(lines)


def header(device, ceilings, smoke) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    import triton

    lines = [f"### bench_kernels.py: {name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"commit {commit.strip() or '?'}",
             f"torch {torch.__version__}, triton {triton.__version__}, precision "
             f"{os.environ.get(fft_image.PRECISION_ENV_VAR, 'tf32')}. Measured ceilings: "
             f"{ceilings['bytes_per_s'] / 1e9:.0f} GB/s (copy), {ceilings['flops_per_s'] / 1e12:.1f} TFLOP/s "
             f"(TF32 matmul)."]
    if smoke:
        lines.append("SMOKE RUN WITHOUT A GPU: the Triton column is the CPU interpreter (numpy, one program at a "
                     "time), so these times are NOT performance figures; they only show the script runs end to end.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default=None, help="comma-separated (GPU default 1,8,64,256; CPU 1,2)")
    parser.add_argument("--sizes", default=None, help="comma-separated (GPU default 128,224,512; CPU 16)")
    parser.add_argument("--ops", default="spectrum_to_image,affine_resample")
    parser.add_argument("--results", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    batches = [int(b) for b in (args.batches or ("1,8,64,256" if HAS_CUDA else "1,2")).split(",")]
    sizes = [int(s) for s in (args.sizes or ("128,224,512" if HAS_CUDA else "16")).split(",")]
    reps = 3 if HAS_CUDA else 2
    makers = {"spectrum_to_image": fft_case, "affine_resample": resample_case}
    ceilings = measure_ceilings(device, reps=reps)
    text = header(device, ceilings, smoke=not HAS_CUDA)
    print(text, flush=True)
    rows = []
    for op in args.ops.split(","):
        for size in sizes:
            for batch in batches:
                try:
                    rows += run_case(op, makers[op], batch, size, device, ceilings, reps)
                except torch.OutOfMemoryError:
                    print(f"{op} batch {batch} size {size}: out of memory, skipped", flush=True)
                    torch.cuda.empty_cache()
                print(f"done {op} batch {batch} size {size}", file=sys.stderr, flush=True)
    text += "\n\n" + table(rows) + "\n"
    print(table(rows))
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

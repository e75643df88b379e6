"""One visualization step, outside the model vs the model's own forward+backward, at the same batch and size.

A step: spectrum -> image (``spectrum_to_image``), one random affine map per image built on the device,
resample + normalization (``affine_resample``) (``--transforms composed``; or the engine's own stack, e.g.
``standard``: maps drawn on the host, a resample per random step), a frozen model, a channel objective, backward to the
spectrum, an Adam update. Three timings per (model, batch, size, kernels):

- ``model``: the frozen model alone, forward + backward to its input;
- ``outside``: everything but the model (parameterization and transforms forward + backward, Adam);
- ``step``: the whole step. The goal (issue 4) is outside < 10% of model for a ResNet-50-class model.

    .venv/bin/python bench/bench_step.py [--results bench/RESULTS.md]   # GPU: resnet18 + resnet50, 1/8/64/256

Models are torchvision ResNet-18 and ResNet-50 with random weights (the cost does not depend on the values;
nothing is downloaded). Without CUDA it is a smoke run (tiny, CPU, kernels through the interpreter).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchvision  # noqa: E402

from featureviz import kernels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench_ms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def random_theta(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """Jitter, scale 0.9-1.1 and +-10 degrees as one inverse affine map per image, drawn on the device (no sync)."""
    r = torch.rand(batch, 4, generator=generator, device=device)
    angle = (r[:, 0] - 0.5) * (math.pi / 9)
    scale = 0.9 + 0.2 * r[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = (r[:, 2:] - 0.5) * 0.1
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


class Step:
    def __init__(self, model, batch, size, device, transforms="composed"):
        self.model, self.size, self.device = model, size, device
        self.transforms = None  # composed: one random map per image, drawn on the device, one resample
        if transforms != "composed":  # the engine's named stack (standard: a resample per random step)
            from featureviz.engine.transforms import Transforms
            from featureviz.engine.transforms import parse_transforms
            from featureviz.importer import Preprocess

            self.transforms = Transforms(parse_transforms(transforms), (size, size), (size, size),
                                         Preprocess(mean=MEAN, std=STD), device=device)
            self.draws = torch.Generator().manual_seed(0)  # the engine draws on the host
        gen = torch.Generator(device=device).manual_seed(0)
        self.gen = gen
        wf = size // 2 + 1
        self.spectrum = (0.01 * torch.randn(batch, 3, size, wf, 2, generator=gen, device=device)).requires_grad_(True)
        self.scale = (1.0 / kernels.rfft2_freqs(size, size, device=device).clamp(min=1.0 / size) / size)
        self.color = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], device=device) * 2
        self.matrix = torch.diag(1 / torch.tensor(STD)).to(device)
        self.bias = (-torch.tensor(MEAN) / torch.tensor(STD)).to(device)
        self.optimizer = torch.optim.Adam([self.spectrum], lr=0.05)
        self.x = torch.rand(batch, 3, size, size, generator=gen, device=device).requires_grad_(True)

    def outside(self):
        image = kernels.spectrum_to_image(self.spectrum, self.scale, self.color, (self.size, self.size))
        if self.transforms is not None:
            return self.transforms(image, self.draws)
        theta = random_theta(image.shape[0], self.gen, self.device)
        return kernels.affine_resample(image, theta, (self.size, self.size), border=0.5, matrix=self.matrix,
                                       bias=self.bias)

    def run_outside(self):
        self.optimizer.zero_grad(set_to_none=True)
        x = self.outside()
        x.backward(torch.ones_like(x) * 1e-3)
        self.optimizer.step()

    def run_model(self):
        out = self.model(self.x)
        torch.autograd.grad(out[:, 1].sum(), self.x)

    def run_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.outside())
        (-out[:, 1].mean()).backward()
        self.optimizer.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batches", default=None, help="GPU default 1,8,64,256; CPU 1")
    parser.add_argument("--sizes", default=None, help="GPU default 128,224,512; CPU 32")
    parser.add_argument("--kernels", default="triton,torch", help="FEATUREVIZ_KERNELS values to compare")
    parser.add_argument("--transforms", default="composed",
                        help="composed (one random map per image, drawn on the device) and/or the engine's named "
                             "stacks, e.g. composed,standard (standard: a resample per random step)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    batches = [int(b) for b in (args.batches or ("1,8,64,256" if HAS_CUDA else "1")).split(",")]
    sizes = [int(s) for s in (args.sizes or ("128,224,512" if HAS_CUDA else "32")).split(",")]
    models = args.models.split(",") if HAS_CUDA or args.models != "resnet18,resnet50" else ["resnet18"]
    reps = 3

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    name = torch.cuda.get_device_name(device) if HAS_CUDA else f"CPU ({os.cpu_count()} cores)"
    text = (f"### bench_step.py: {name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"commit {commit.strip() or '?'}\n")
    if not HAS_CUDA:
        text += ("SMOKE RUN WITHOUT A GPU: CPU times, Triton through the interpreter; NOT performance figures.\n")
    text += ("\n| model | batch | size | kernels | transforms | model fwd+bwd ms | outside ms | step ms | "
             "outside / model |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    print(text, end="", flush=True)
    for model_name in models:
        model = getattr(torchvision.models, model_name)(weights=None).eval().to(device)
        model.requires_grad_(False)
        for size in sizes:
            for batch in batches:
                for mode, stack in [(m, t) for t in args.transforms.split(",") for m in args.kernels.split(",")]:
                    os.environ["FEATUREVIZ_KERNELS"] = mode
                    try:
                        step = Step(model, batch, size, device, stack)
                        model_ms = bench_ms(step.run_model, reps=reps)
                        outside_ms = bench_ms(step.run_outside, reps=reps)
                        step_ms = bench_ms(step.run_step, reps=reps)
                    except torch.OutOfMemoryError:
                        print(f"| {model_name} | {batch} | {size} | {mode} | {stack} | out of memory | | | |",
                              flush=True)
                        torch.cuda.empty_cache()
                        continue
                    line = (f"| {model_name} | {batch} | {size} | {mode} | {stack} | {model_ms:.2f} | "
                            f"{outside_ms:.2f} | {step_ms:.2f} | {outside_ms / model_ms:.1%} |\n")
                    text += line
                    print(line, end="", flush=True)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

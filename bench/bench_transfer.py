"""Transfer beyond the model's family (issue 25, item 5): which of lucent's details carry it, and why.

An other-family judge (kept outside the project) ranked lucent's details together (``lucentlike``) above both
featureviz's default and lucent; our sibling judges (EfficientNet-Lite1/-Lite2) saw no difference. This bench
renders the issue's protocol (EfficientNet-Lite0, 10 classes 1, 51, ..., 451 as ONE batch, 224 px) for a list of
variants and seeds, saves every image as a PNG, and measures the PNGs with judges and image measures that do not
share the model's family, so a run can be re-measured later from the saved images (``--renders DIR``).

Variants (``--variants``):

- the ablations of ``bench/bench_param_compare.py`` (``default``, ``relu0``, ``shared``, ``jitter0``, ``canvas``,
  ``lucentlike``, ``lucentlike-X``: all of lucent's details but X, ``A+B``), bench-only monkeypatches of the engine;
- ``prior``: the default with the learned colour matrix and spectrum (``RenderSpec.prior``) of ImageNet-like photos
  (scikit-image's bundled colour photos, the demo's crops: :func:`featureviz.demo.images.write_dataset`);
- ``patchW`` / ``patchWsS``: the default with ``- W*prior:photos`` (the EPLL patch prior fitted on the same
  photos; its patches at stride S instead of the fitted 4: S = 8 costs a quarter);
- ``engine:OPTION=VALUE[,OPTION=VALUE]``: any RenderSpec option (e.g. ``engine:jitter=...``) on the default.

Measures (``--measures``, all on every image; functions below):

- ``judges``: the sibling judges Lite1 / Lite2 (top-1 / top-5, p), as bench_quality.py;
- ``views``: the judges' mean p, and top-1 / top-5 of the averaged logits, over views the model never optimised for
  (random-resized crops of scale 0.35-1.0, flips, a 2x down/up-sample, a small Gaussian blur);
- ``shuffle``: the judges' p with the image's 4x4 and 8x8 grid of patches shuffled, against intact: texture survives
  a shuffle, global shape does not (the ratio shuffled / intact is low when the evidence is shape);
- ``centre``: the share of the judges' evidence (the drop of the target logit when a cell is greyed) from the
  central 2x2 of a 4x4 occlusion grid, and the evidence in the outer ring;
- ``spectrum``: slope and high-frequency share (:func:`featureviz.engine.quality.image_statistics`);
- ``activation``: the model's own target logit (image -> 224 px, preprocess, forward).

Usage::

    nice -n 10 .venv/bin/python bench/bench_transfer.py --out /tmp/transfer --seeds 0,1,2 --steps 256 \\
        --variants default,lucentlike,lucentlike-jitter0,lucentlike-shared,lucentlike-canvas,prior
    .venv/bin/python bench/bench_transfer.py --renders /tmp/transfer --steps 256 --measures judges,views,shuffle
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_param_compare as bpc  # noqa: E402
import bench_quality as bq  # noqa: E402
import bench_vs_lucent as bvl  # noqa: E402

CLASSES = bpc.CLASSES  # 1, 51, ..., 451
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # the colour, ImageNet-like photos of scikit-image's wheel
MEASURES = ("judges", "views", "shuffle", "centre", "spectrum", "activation")


# ----------------------------------------------------------------------------------------------------- renders


def photo_folder(root: Path) -> Path:
    """The ImageNet-like photo set (4 colour photos x 4 crops = 16 PNGs) written once under ``root``."""
    from featureviz.demo.images import PHOTOS as ALL
    from featureviz.demo.images import write_dataset

    folder = root / "photos"
    if not folder.is_dir() or len(list(folder.glob("*.png"))) < 16:
        write_dataset(folder, photos=[p for p in ALL if p.key in PHOTOS])
    return folder


_PRIORS: dict = {}


def prior_options(variant: str, root: Path) -> tuple[dict, list]:
    """RenderSpec options and extra objective terms of the prior variants (fitted once per process)."""
    from featureviz.engine.exemplars import ImageFolder
    from featureviz.engine.priors import fit_patch_prior
    from featureviz.engine.priors import image_statistics

    if variant == "prior":
        if "stats" not in _PRIORS:
            t0 = time.perf_counter()
            _PRIORS["stats"] = image_statistics(ImageFolder(photo_folder(root)))
            print(f"photo statistics in {time.perf_counter() - t0:.1f} s: decay {_PRIORS['stats'].decay:.2f}",
                  file=sys.stderr, flush=True)
        return {"prior": _PRIORS["stats"]}, []
    if variant.startswith("patch"):  # patchW or patchWsS: weight W, the patches at stride S (fitted at 4)
        weight, _, stride = variant[5:].partition("s")
        weight = float(weight)
        if "patch" not in _PRIORS:
            t0 = time.perf_counter()
            _PRIORS["patch"] = fit_patch_prior(ImageFolder(photo_folder(root)))
            p = _PRIORS["patch"]
            print(f"photo patch prior in {time.perf_counter() - t0:.1f} s: held-out {p.held_out / p.dim:.3f} "
                  "nats per value", file=sys.stderr, flush=True)
        term = {"scale": {"factor": -weight, "objective": {"prior": {"dataset": "photos"}}}}
        prior = _PRIORS["patch"] if not stride else dataclasses.replace(_PRIORS["patch"], stride=int(stride))
        return {"patch_priors": {"photos": prior}}, [term]
    if variant.startswith("engine:"):
        options = {}
        for item in variant[7:].split(","):
            key, _, value = item.partition("=")
            options[key] = json.loads(value)
        return options, []
    return {}, []


def render_variant(model, variant: str, seed: int, checkpoints, size: int, root: Path) -> dict:
    """{step: (10, 3, H, W) images} of one variant and seed, the 10 classes as one batch."""
    from featureviz.engine import RenderSpec
    from featureviz.engine import render

    terms = [{"batch": {"index": i, "objective": {"logit": {"index": k}}}} for i, k in enumerate(CLASSES)]
    options, extra = prior_options(variant, root)
    ablation = variant if not (variant in ("prior",) or variant.startswith(("patch", "engine:"))) else "default"
    snaps = {}
    with bpc.ablation(ablation) as ablated:
        spec = RenderSpec({"sum": terms + extra}, steps=max(checkpoints), size=size, batch=len(CLASSES), seed=seed,
                          device="cpu", snapshot_steps=tuple(checkpoints), **ablated, **options)
        render(model, spec, snapshot=lambda step, images: snaps.__setitem__(step, images.detach().clone()))
    return snaps


def render_dir(root: Path, variant: str, seed: int, step: int) -> Path:
    return root / variant.replace(":", "_").replace("=", "_").replace(",", "_") / f"seed{seed}" / f"step{step}"


def save_pngs(folder: Path, images: torch.Tensor) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k, array in zip(CLASSES, arrays):
        Image.fromarray(array).save(folder / f"class{k:03d}.png")


def load_pngs(folder: Path) -> tuple[torch.Tensor, list[int]]:
    from PIL import Image

    files = sorted(folder.glob("class*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    return images.float() / 255, [int(f.stem[5:]) for f in files]


def run_renders(args) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    model = bvl.load_model()
    log = root / "renders.jsonl"
    for seed in args.seeds:  # seed by seed: a run cut short has every variant for the first seeds
        for variant in args.variants:
            if all((render_dir(root, variant, seed, s) / f"class{CLASSES[-1]:03d}.png").is_file()
                   for s in args.checkpoints):
                continue
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            snaps = render_variant(model, variant, seed, args.checkpoints, args.size, root)
            seconds = time.perf_counter() - t0
            for step, images in snaps.items():
                save_pngs(render_dir(root, variant, seed, step), images)
            entry = {"variant": variant, "seed": seed, "steps": max(args.checkpoints), "seconds": seconds,
                     "s_per_step": seconds / max(args.checkpoints), "load": [load0, os.getloadavg()[0]],
                     "end": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")}
            with log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            print(json.dumps(entry), file=sys.stderr, flush=True)



# ----------------------------------------------------------------------------------------------------- measures


class Judge:
    """A classifier's logits on images in [0, 1]: resized to its input (bilinear, antialiased) and preprocessed the
    way :func:`featureviz.engine.quality.judge_images` does; forwards in chunks."""

    def __init__(self, model, chunk: int = 32):
        from featureviz.engine.transforms import preprocess_map

        spec = model.input_spec
        self.size = (spec.height or spec.default_size[0], spec.width or spec.default_size[1])
        self.matrix, self.bias = preprocess_map(spec.preprocess, spec.channels, device=torch.device("cpu"))
        self.module, self.key, self.chunk = model.truncate([model.logits]), model.logits, chunk

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for x in images.float().clamp(0, 1).split(self.chunk):
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            x = torch.einsum("oc,bchw->bohw", self.matrix, x) + self.bias.view(1, -1, 1, 1)
            out.append(self.module(x)[self.key].float().reshape(x.shape[0], -1))
        return torch.cat(out)


def _rank(logits: torch.Tensor, target: int) -> int:
    return int((logits > logits[target]).sum()) + 1


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def low_pass(images: torch.Tensor) -> torch.Tensor:
    """A 2x downsample (2x2 mean) and a bilinear upsample back: what lives above half the Nyquist band dies."""
    h, w = images.shape[-2:]
    return F.interpolate(F.avg_pool2d(images, 2), size=(h, w), mode="bilinear", align_corners=False)


def views(image: torch.Tensor, count: int, seed: int = 1234) -> dict:
    """Views of one (3, H, W) image the model never optimised for: {kind: (N, 3, h, w)}: ``flip``, ``lowpass``
    (2x down + up), ``blur`` (Gaussian, sigma 1 px) and ``crops``: ``count`` random-resized crops (area 0.35-1.0,
    aspect 3/4-4/3, flipped half the time), the same draws for every image (a paired comparison)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image.shape[-2:]
    x = image.unsqueeze(0)
    crops = []
    for _ in range(count):
        area = (0.35 + 0.65 * torch.rand((), generator=g).item()) * h * w
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=g).item())
        cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
        x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
        y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
        crop = F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear", align_corners=False,
                             antialias=True)
        crops.append(crop.flip(-1) if torch.rand((), generator=g).item() < 0.5 else crop)
    return {"flip": x.flip(-1), "lowpass": low_pass(x), "blur": gaussian_blur(x), "crops": torch.cat(crops)}


def shuffle_grid(image: torch.Tensor, grid: int, seed: int = 4321) -> torch.Tensor:
    """The (3, H, W) image with its grid x grid patches permuted (a fixed derangement-like draw for every image)."""
    c, h, w = image.shape
    ph, pw = h // grid, w // grid
    x = image[:, :ph * grid, :pw * grid]
    patches = x.reshape(c, grid, ph, grid, pw).permute(1, 3, 0, 2, 4).reshape(grid * grid, c, ph, pw)
    g = torch.Generator().manual_seed(seed + grid)
    order = torch.randperm(grid * grid, generator=g)
    while (order == torch.arange(grid * grid)).any():  # no patch stays where it was
        order = torch.randperm(grid * grid, generator=g)
    out = patches[order].reshape(grid, grid, c, ph, pw).permute(2, 0, 3, 1, 4).reshape(c, ph * grid, pw * grid)
    return F.interpolate(out.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0] \
        if (ph * grid, pw * grid) != (h, w) else out


def occlusions(image: torch.Tensor, grid: int = 4, fill: float = 0.5) -> torch.Tensor:
    """grid x grid copies of the (3, H, W) image, each with one cell (row-major) set to grey."""
    c, h, w = image.shape
    out = image.unsqueeze(0).repeat(grid * grid, 1, 1, 1)
    for i in range(grid):
        for j in range(grid):
            out[i * grid + j, :, i * h // grid:(i + 1) * h // grid, j * w // grid:(j + 1) * w // grid] = fill
    return out


def occlusion_summary(drops: torch.Tensor, grid: int) -> dict:
    """From the target logit's drop per occluded cell (row-major): the share of the positive evidence in the
    central cells (the middle half of each axis: a quarter of the area) and its centroid (x, y) as a fraction of the
    image side from the centre (positive: right / down)."""
    d = drops.clamp(min=0).view(grid, grid)
    total = float(d.sum())
    if total <= 0:
        return {"centre_share": float("nan"), "centroid_x": float("nan"), "centroid_y": float("nan")}
    lo, hi = grid // 4, grid - grid // 4
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid - 0.5
    return {"centre_share": float(d[lo:hi, lo:hi].sum()) / total,
            "centroid_x": float((d.sum(0) * centres).sum()) / total,
            "centroid_y": float((d.sum(1) * centres).sum()) / total}


def measure_images(images: torch.Tensor, classes: list[int], judges: dict, own, measures, view_count: int = 16,
                   occlusion_grid: int = 4) -> list[dict]:
    """One record per image with every requested measure (see the module docstring)."""
    from featureviz.engine.quality import image_statistics

    records = [{"class": k} for k in classes]
    if "spectrum" in measures:
        stats = image_statistics(images)
        for i, r in enumerate(records):
            r.update({"slope": stats["spectrum_slope"][i], "hf": stats["high_freq"][i],
                      "contrast": stats["contrast"][i]})
    if "activation" in measures:
        logits = own.logits(images)
        for i, (r, k) in enumerate(zip(records, classes)):
            r["lite0_logit"] = float(logits[i, k])
    for name, judge in (judges.items() if {"judges", "views", "shuffle", "centre"} & set(measures) else ()):
        intact = judge.logits(images)
        for i, (r, k) in enumerate(zip(records, classes)):
            p = intact[i].softmax(-1)
            r[f"{name}_rank"], r[f"{name}_p"], r[f"{name}_logit"] = _rank(intact[i], k), float(p[k]), float(
                intact[i, k])
            r[f"{name}_logp"] = float(intact[i].log_softmax(-1)[k])
        for i, (r, k) in enumerate(zip(records, classes)):
            if "views" in measures:
                v = views(images[i], view_count)
                batch = torch.cat(list(v.values()))
                logits = judge.logits(batch)
                probs = logits.softmax(-1)[:, k]
                start = 0
                for kind, t in v.items():
                    r[f"{name}_{kind}_p"] = float(probs[start:start + len(t)].mean())
                    start += len(t)
                r[f"{name}_views_p"] = float(probs.mean())
                r[f"{name}_views_rank"] = _rank(logits.mean(0), k)
            if "shuffle" in measures:
                shuffled = judge.logits(torch.stack([shuffle_grid(images[i], g) for g in (4, 8)]))
                for g, row in zip((4, 8), shuffled):
                    r[f"{name}_shuf{g}_p"] = float(row.softmax(-1)[k])
                    r[f"{name}_shuf{g}_logit"] = float(row[k])
                    r[f"{name}_shuf{g}_logp"] = float(row.log_softmax(-1)[k])
            if "centre" in measures:
                occluded = judge.logits(occlusions(images[i], occlusion_grid))
                summary = occlusion_summary(intact[i, k] - occluded[:, k], occlusion_grid)
                r.update({f"{name}_{key}": value for key, value in summary.items()})
    return records


def measure_folder(folder: Path, judges: dict, own, measures, view_count: int) -> list[dict]:
    """The records of one render folder, cached in it (``measures-V<count>.json``) per measure."""
    cache = folder / f"measures-v{view_count}.json"
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [m for m in measures if m not in have]
    if missing:
        images, classes = load_pngs(folder)
        for m in missing:
            have[m] = measure_images(images, classes, judges, own, [m], view_count)
        cache.write_text(json.dumps(have))
    records = [dict() for _ in have[measures[0]]]
    for m in measures:
        for r, new in zip(records, have[m]):
            r.update(new)
    return records


def collect(root: Path, step: int, measures, view_count: int, judges=None, own=None, only=None,
            seeds=None) -> dict:
    """{variant: {seed: [records]}} of every render folder under ``root`` at ``step`` (of the variants ``only``)."""
    out: dict = {}
    for folder in sorted(root.glob(f"*/seed*/step{step}")):
        if not (folder / f"class{CLASSES[-1]:03d}.png").is_file():
            continue
        if only and folder.parent.parent.name not in only:
            continue
        if seeds is not None and int(folder.parent.name[4:]) not in seeds:
            continue
        if judges is None:
            model = bvl.load_model()
            judges = {name: Judge(m) for name, m in bq.load_judges().items()}
            own = Judge(model)
        variant, seed = folder.parent.parent.name, int(folder.parent.name[4:])
        t0 = time.perf_counter()
        out.setdefault(variant, {})[seed] = measure_folder(folder, judges, own, measures, view_count)
        print(f"measured {variant} seed {seed} step {step} in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- tables


def _mse(values) -> str:
    v = np.asarray([x for x in values if not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if len(v) == 0:
        return "-"
    se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    digits = 3 if abs(v.mean()) < 10 else 1
    return f"{v.mean():+.{digits}f} ± {se:.{digits}f}"


def _flat(data: dict, variant: str) -> list[dict]:
    return [r | {"seed": s} for s, rs in sorted(data.get(variant, {}).items()) for r in rs]


def tables(data: dict, judges: list[str], measures, baseline: str = "default", keys=None) -> str:
    """Per variant: counts (top-1 / top-5 intact and over the views' averaged logits) and means ± SE; then the
    paired differences (same seed and class) against ``baseline``."""
    variants = [v for v in data if v == baseline] + sorted(v for v in data if v != baseline)
    lines = []
    cont = []
    if "activation" in measures:
        cont.append("lite0_logit")
    for j in judges:
        cont += [f"{j}_p", f"{j}_logp"]
        if "views" in measures:
            cont += [f"{j}_views_p", f"{j}_crops_p", f"{j}_lowpass_p", f"{j}_blur_p"]
        if "shuffle" in measures:
            cont += [f"{j}_shuf4_p", f"{j}_shuf8_p", f"{j}_shuf4_logp", f"{j}_shuf8_logp"]
        if "centre" in measures:
            cont += [f"{j}_centre_share", f"{j}_centroid_x", f"{j}_centroid_y"]
    if "spectrum" in measures:
        cont += ["slope", "hf", "contrast"]
    if keys:
        cont = [k for k in cont if k in keys]
    head = ["variant", "n"] + [f"{j} top-1/5" for j in judges] + \
        ([f"{j} views top-1/5" for j in judges] if "views" in measures else [])
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        rs = _flat(data, v)
        cells = [v, str(len(rs))]
        for key in ("rank", "views_rank") if "views" in measures else ("rank",):
            for j in judges:
                ranks = np.array([r[f"{j}_{key}"] for r in rs])
                cells.append(f"{int((ranks == 1).sum())} / {int((ranks <= 5).sum())}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Means ± SE over images and seeds (rows: measures; columns: variants):")
    lines.append("")
    lines += ["| measure | " + " | ".join(variants) + " |", "|" + " --- |" * (len(variants) + 1)]
    for key in cont:
        lines.append(f"| {key} | " + " | ".join(_mse([r[key] for r in _flat(data, v)]) for v in variants) + " |")
    lines.append("")
    others = [v for v in variants if v != baseline]
    if baseline in data and others:
        lines.append(f"Paired differences against {baseline} (same seed and class; mean ± SE):")
        lines.append("")
        lines += ["| measure | " + " | ".join(others) + " |", "|" + " --- |" * (len(others) + 1)]
        base = {(r["seed"], r["class"]): r for r in _flat(data, baseline)}
        for key in cont:
            cells = []
            for v in others:
                diffs = [r[key] - base[(r["seed"], r["class"])][key] for r in _flat(data, v)
                         if (r["seed"], r["class"]) in base]
                cells.append(_mse(diffs))
            lines.append(f"| Δ {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_main(args) -> int:
    torch.set_num_threads(args.threads)
    measures = [m for m in args.measures.split(",") if m]
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise SystemExit(f"unknown measures {sorted(unknown)}; known: {', '.join(MEASURES)}")
    root = Path(args.renders)
    judges = ["lite1", "lite2"] if "judges" in measures or {"views", "shuffle", "centre"} & set(measures) else []
    out = {}
    for step in args.checkpoints:
        data = collect(root, step, measures, args.view_count, only=args.only, seeds=args.seeds)
        if not data:
            continue
        out[step] = data
        print(f"\n### {step} steps\n")
        print(tables(data, judges, measures, args.baseline, args.keys))
    print(f"\n{bq.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread; "
          f"load {os.getloadavg()[0]:.1f}; "
          f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    if args.json:
        Path(args.json).write_text(json.dumps(out) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="default,lucentlike,lucentlike-jitter0,lucentlike-shared,"
                        "lucentlike-canvas,prior")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--checkpoints", default=None, help="steps saved (default 128,STEPS)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/transfer", help="render here (PNG per image; existing ones are kept)")
    parser.add_argument("--renders", default=None, help="measure the PNGs saved in this folder; render nothing")
    parser.add_argument("--measures", default=",".join(MEASURES))
    parser.add_argument("--view-count", type=int, default=16, help="random views per image (measure 'views')")
    parser.add_argument("--json", default=None, help="write every record here")
    parser.add_argument("--baseline", default="default")
    parser.add_argument("--keys", default=None, help="print only these measures' rows (e.g. lite1_views_p,slope)")
    parser.add_argument("--only", default=None, help="measure only these variants (folder names, comma-separated)")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v] if "engine:" not in args.variants else \
        [args.variants]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.checkpoints = sorted({int(s) for s in (args.checkpoints or f"128,{args.steps}").split(",")
                               if int(s) <= args.steps} | {args.steps})
    args.only = set(args.only.split(",")) if args.only else None
    args.keys = args.keys.split(",") if args.keys else None
    if args.renders is None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        run_renders(args)
        return 0
    return measure_main(args)


if __name__ == "__main__":
    sys.exit(main())

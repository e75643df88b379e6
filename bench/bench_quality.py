"""Quality of class visualizations, featureviz vs lucent: do OTHER classifiers recognise the class?

Transferability (Fel et al. 2023, MaCo): render the class visualization (the class logit) of each class on the
trained EfficientNet-Lite0 with each tool, then show the images to EfficientNet-Lite1 and -Lite2, trained apart
and at other input sizes (240 and 260 px), and count how often they name the class (top-1) or rank it among their
best five (top-5). Also per tool: the final logit on Lite0 (measured the same way outside both tools: the image
resized to 224, preprocessed, forward), the judges' mean probability of the class, colour and spectrum statistics
(:func:`featureviz.engine.quality.image_statistics`) and the wall time. Images are kept at several step counts
(``--checkpoints``) so the figures also say how fast each tool gets there.

- The same model, classes, seeds, steps, image size and batch for every tool. lucent 0.1.8 runs in its own
  environment exactly as in ``bench/bench_vs_lucent.py`` (its defaults, the model's preprocessing as its last
  transform, the converted module as an ordinary NCHW torch model); each batch of classes is one ``render_vis``
  with one ``channel("<logits>", k, batch=i)`` objective per image. featureviz renders the same batch with one
  ``batch(i, logit:k)`` term per image.
- featureviz variants (``--tools featureviz:VARIANT``): ``default`` (the engine's defaults), ``composed`` (the
  standard steps in one resample, grey beyond the pad: the default until 2026-12-01), ``laplacian`` (lucid's
  Laplacian-pyramid parameterization), ``bilateral`` (``- W*bilateral`` added to the objective), ``blur``
  (``- W*blur``), ``black`` (the composed stack with black beyond the grey pad: ``Pad(fill=0)``), ``scalewide``
  (the composed stack with random zooms 0.8..1.2 instead of 0.9..1.1), ``blackeach`` (black beyond the pad and
  ``Resample("each")``: each step its own resample, lucid's and lucent's way; the standard stack since 2026-12-01).
- Judges: the zoo's ONNX exports of Lite1 and Lite2 imported by featureviz and run by
  :func:`featureviz.engine.quality.judge_images` (the code behind ``--judge`` and ``featureviz evaluate``).

- One run: each tool renders in its own process, all at the same time with one torch thread each (so background
  load on a shared machine hits every tool alike), and the parent judges every image the same way afterwards.

Usage::

    .venv/bin/python bench/bench_quality.py                         # 20 classes x 2 seeds, 256 steps, 224 px
    .venv/bin/python bench/bench_quality.py --size 128 --steps 128 --classes 10 --seeds 0 --tools featureviz
    .venv/bin/python bench/bench_quality.py --tools lucent,featureviz,featureviz:laplacian --json q.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_lucent as bvl  # noqa: E402  (the lucent environment and the model, shared)

# 20 classes spread over ImageNet-1k: every 50th index from 1 (goldfish, ..., dogs, cats, insects, objects, food)
DEFAULT_CLASSES = tuple(range(1, 1000, 50))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def load_judges():
    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    pre = Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS)
    return {f"lite{v}": import_model(zoo.efficientnet_lite(v), preprocess=pre) for v in (1, 2)}


# ---------------------------------------------------------------------------------------------------- tools


VARIANTS = {
    "default": {},
    # the standard steps in one composed resample, grey beyond the pad (the default until 2026-12-01)
    "composed": {"transforms": "composed"},
    "laplacian": {"param": "laplacian"},
    "bilateral": {},
    "blur": {},
    # lucid's standard stack with what comes in from beyond the grey pad black (lucid's rotation, lucent's kornia)
    "black": {"transforms": None},
    # lucid's standard stack with twice its zoom range, 0.8..1.2 (judges at 240 and 260 px see the image enlarged)
    "scalewide": {"transforms": None},
    # black beyond the pad and each step its own resample, as lucid and lucent apply the stack
    "blackeach": {"transforms": None},
}


def standard_stack(*, fill: float | None = None, zoom: float = 0.1, each: bool = False) -> list[dict]:
    """lucid's standard transforms as a spec list (pad 12 grey, jitter 8, zoom 1 +- ``zoom`` in 11 steps, rotate
    -10..10 plus five zeros, jitter 4), with ``fill`` beyond the pad, resampled once or after ``each`` step."""
    pad = {"width": 12, "value": 0.5} if fill is None else {"width": 12, "value": 0.5, "fill": fill}
    return [{"pad": pad}, {"jitter": {"pixels": 8}},
            {"scale": {"factors": [1 + (i - 5) * zoom / 5 for i in range(11)]}},
            {"rotate": {"degrees": list(range(-10, 11)) + [0] * 5}}, {"jitter": {"pixels": 4}},
            *([{"resample": {"mode": "each"}}] if each else [])]


VARIANTS["black"]["transforms"] = standard_stack(fill=0.0)
VARIANTS["scalewide"]["transforms"] = standard_stack(zoom=0.2)
VARIANTS["blackeach"]["transforms"] = standard_stack(fill=0.0, each=True)


def featureviz_variant(name: str) -> dict:
    """RenderSpec options of a featureviz variant (objective terms are added by ``objective_terms``). Besides the
    named ones, a variant may be an optimizer setting: ``-``-separated tokens among a schedule name (``constant``,
    ``cosine``, ``linear``), ``lrX`` (the rate), ``warmN`` (warm-up steps), ``plateauX`` and ``windowN`` (the early
    stop), ``decayX`` (the spectrum's exponent), e.g. ``featureviz:cosine-lr0.1-warm8``."""
    if name in VARIANTS:
        return VARIANTS[name]
    options = {}
    for token in name.split("-"):
        if token in ("constant", "cosine", "linear"):
            options["lr_schedule"] = token
        elif token.startswith("lr"):
            options["lr"] = float(token[2:])
        elif token.startswith("warm"):
            options["lr_warmup"] = int(token[4:])
        elif token.startswith("plateau"):
            options["plateau"] = float(token[7:])
        elif token.startswith("window"):
            options["plateau_window"] = int(token[6:])
        elif token.startswith("decay"):
            options["decay"] = float(token[5:])
        else:
            raise SystemExit(f"unknown featureviz variant {name!r}; known: {', '.join(VARIANTS)} or an optimizer "
                             "setting such as cosine-lr0.1-warm8 or decay1.2")
    return options


def objective_terms(variant: str, weight: float) -> list[dict]:
    if variant in ("bilateral", "blur"):
        return [{"scale": {"factor": -weight, "objective": {variant: {}}}}]
    return []


def run_featureviz(model, classes, seed, args, variant) -> dict:
    from featureviz.engine import RenderSpec
    from featureviz.engine import render

    terms = [{"batch": {"index": i, "objective": {"logit": {"index": k}}}} for i, k in enumerate(classes)]
    terms += objective_terms(variant, args.weight)
    snaps = {}
    options = featureviz_variant(variant)
    spec = RenderSpec({"sum": terms}, steps=max(args.checkpoints), size=args.size, batch=len(classes), seed=seed,
                      device="cpu", snapshot_steps=tuple(args.checkpoints), **options)
    t0 = time.perf_counter()
    times = {}

    def snapshot(step, images):
        snaps[step] = images.clone()
        times[step] = time.perf_counter() - t0

    result = render(model, spec, snapshot=snapshot)
    for step in args.checkpoints:  # stopped at a plateau: the later checkpoints are the final image
        if step not in snaps:
            snaps[step], times[step] = result.images.clone(), times.get(result.steps_done, time.perf_counter() - t0)
    return {"images": snaps, "seconds": times, "stopped_at": result.stopped_at, "steps_done": result.steps_done}


def run_lucent(lucent, module, key, classes, seed, args, preprocess) -> dict:
    mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).view(1, -1, 1, 1)
    transforms = list(lucent.transform.standard_transforms) + [lambda x: (x - mean) / std]
    objective = sum(lucent.objectives.channel(key, k, batch=i) for i, k in enumerate(classes))
    torch.manual_seed(seed)
    np.random.seed(seed)  # lucent draws its transforms from numpy's global generator
    checkpoints = tuple(sorted(args.checkpoints))
    t0 = time.perf_counter()
    images = lucent.render.render_vis(
        module, objective, param_f=lambda: lucent.param.image(args.size, batch=len(classes)), transforms=transforms,
        thresholds=checkpoints, preprocess=False, progress=False, show_image=False)
    total = time.perf_counter() - t0
    snaps = {step: torch.from_numpy(img).permute(0, 3, 1, 2).contiguous() for step, img in zip(checkpoints, images)}
    # render_vis returns all thresholds at the end: apportion its time by steps (its steps all cost the same)
    times = {step: total * step / checkpoints[-1] for step in checkpoints}
    return {"images": snaps, "seconds": times}


@torch.no_grad()
def final_logits(model, trunc, images, classes) -> list[float]:
    """The target logit of Lite0 for each image, measured outside both tools: resize to 224, preprocess, forward."""
    h, w = model.input_spec.default_size
    x = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(model.input_spec.preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(model.input_spec.preprocess.std).view(1, -1, 1, 1)
    logits = trunc((x - mean) / std)[model.logits]
    return logits[torch.arange(len(classes)), torch.tensor(classes)].tolist()


# ---------------------------------------------------------------------------------------------------- figures


def figures(records: list[dict], judges: list[str]) -> dict:
    out = {"images": len(records), "activation": float(np.mean([r["activation"] for r in records])),
           "seconds_per_image": float(np.mean([r["seconds"] for r in records]))}
    for j in judges:
        ranks = np.array([r["judges"][j]["rank"] for r in records])
        out[f"{j}_top1"] = int((ranks == 1).sum())
        out[f"{j}_top5"] = int((ranks <= 5).sum())
        out[f"{j}_p"] = float(np.mean([r["judges"][j]["probability"] for r in records]))
        out[f"{j}_median_rank"] = float(np.median(ranks))
    for key in records[0]["statistics"]:
        out[key] = float(np.mean([r["statistics"][key] for r in records]))
    return out


def markdown(summary: dict) -> str:
    judges = summary["judges"]
    n = summary["figures"][0]["images"] if summary["figures"] else 0
    lines = [f"| tool | steps | " + " | ".join(f"{j} top-1 / top-5 (of {n})" for j in judges) +
             " | " + " | ".join(f"{j} p" for j in judges) +
             " | Lite0 logit | mean | contrast | saturation | slope | HF share | s / image |",
             "| --- " * (4 + 2 * len(judges) + 5) + "|"]
    for f in summary["figures"]:
        cells = [f["tool"], str(f["steps"])]
        cells += [f"{f[f'{j}_top1']} / {f[f'{j}_top5']}" for j in judges]
        cells += [f"{f[f'{j}_p']:.3f}" for j in judges]
        cells += [f"{f['activation']:.2f}", f"{f['mean']:.3f}", f"{f['contrast']:.3f}", f"{f['saturation']:.3f}",
                  f"{f['spectrum_slope']:.2f}", f"{f['high_freq']:.3f}", f"{f['seconds_per_image']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tool(tool: str, args, model, parts: Path | None = None) -> list[dict]:
    """Every (seed, chunk) render of one tool: [{"seed", "classes", "images": {step: tensor}, "seconds": {...}}].
    With ``parts``, each render is saved there as it ends and a render already saved is not run again (a run that
    was killed resumes where it stopped)."""
    out, env = [], None
    chunks = [args.classes[i:i + args.batch] for i in range(0, len(args.classes), args.batch)]
    for seed in args.seeds:
        for chunk in chunks:
            name = f"{tool.replace(':', '_')}-{args.size}px-{'_'.join(map(str, args.checkpoints))}-w{args.weight}-" \
                   f"seed{seed}-{'_'.join(map(str, chunk))}.pt"
            part = parts / name if parts is not None else None
            if part is not None and part.is_file():
                out.append(torch.load(part, weights_only=False))
                continue
            if tool == "lucent":
                env = env or make_lucent_env(model)
                lucent, key, module = env
                result = run_lucent(lucent, module, key, chunk, seed, args, model.input_spec.preprocess)
            else:
                result = run_featureviz(model, chunk, seed, args, tool.partition(":")[2] or "default")
            out.append({"seed": seed, "classes": chunk, **result})
            if part is not None:
                torch.save(out[-1], part)
            print(f"{tool}: seed {seed} classes {chunk[0]}..{chunk[-1]} in {result['seconds'][max(args.checkpoints)]:.0f} s",
                  file=sys.stderr, flush=True)
    return out


def make_lucent_env(model):
    lucent = bvl.import_lucent(bvl.ensure_lucent())
    key = bvl.lucent_layer_key(model, model.logits)
    module = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)
    return lucent, key, module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="20", help="N (the first N of the default 20 spread classes) or K,K,...")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=256, help="steps (the last checkpoint)")
    parser.add_argument("--checkpoints", default=None, help="steps at which images are judged (default: 64,128,STEPS)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=10, help="classes rendered together (both tools)")
    parser.add_argument("--tools", default="lucent,featureviz", help="lucent and/or featureviz[:variant] entries")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of the bilateral / blur penalty variants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each tool's process (default 1)")
    parser.add_argument("--json", default=None, help="write the summary and every record to this file")
    parser.add_argument("--images", default=None, help="write the final images of each tool as PNG grids here")
    parser.add_argument("--parts", default=None, help="keep each render here as it ends and reuse it: a killed run "
                        "resumes where it stopped (same arguments)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: render one tool, save to a file
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.classes = (list(DEFAULT_CLASSES[:int(args.classes)]) if "," not in args.classes and int(args.classes) <= 20
                    else [int(c) for c in args.classes.split(",")])
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.checkpoints = sorted({int(s) for s in (args.checkpoints or f"64,128,{args.steps}").split(",")
                               if int(s) <= args.steps} | {args.steps})
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if args.parts:
        Path(args.parts).mkdir(parents=True, exist_ok=True)  # before the children start: they save as they go
    model = bvl.load_model()
    if args.child:  # one tool's renders, in its own process
        tool, path = args.child.split("=", 1)
        torch.save(render_tool(tool, args, model, parts=Path(args.parts) if args.parts else None), path)
        return 0

    from featureviz.engine.quality import image_statistics
    from featureviz.engine.quality import judge_images

    # each tool renders in its own process, all at once: one run, the same background load for every tool
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="bench-quality-"))  # the renders; removed once loaded (or on a failure)
    argv = sys.argv[1:] if argv is None else list(argv)
    children = {}
    load = [os.getloadavg()[0]]
    began = time.perf_counter()
    try:
        for tool in tools:
            path = folder / f"{tool.replace(':', '_')}.pt"
            children[tool] = (subprocess.Popen([sys.executable, __file__, *argv, "--child", f"{tool}={path}"]), path)
        for tool, (child, _) in children.items():
            if child.wait() != 0:
                raise SystemExit(f"the {tool} renders failed (exit {child.returncode})")
        renders = {tool: torch.load(path, weights_only=False) for tool, (_, path) in children.items()}
    finally:
        for child, _ in children.values():
            child.kill()
        shutil.rmtree(folder, ignore_errors=True)
    load.append(os.getloadavg()[0])
    trunc = model.truncate([model.logits])
    judges = load_judges()
    records = {t: {s: [] for s in args.checkpoints} for t in tools}
    for tool, runs in renders.items():
        for run in runs:
            chunk, seed = run["classes"], run["seed"]
            for step in args.checkpoints:
                images = run["images"][step]
                verdicts = {j: judge_images(m, images, chunk) for j, m in judges.items()}
                stats = image_statistics(images)
                acts = final_logits(model, trunc, images, chunk)
                for i, k in enumerate(chunk):
                    records[tool][step].append({
                        "class": k, "seed": seed, "activation": acts[i],
                        "seconds": run["seconds"][step] / len(chunk),
                        "judges": {j: v[i].to_dict() for j, v in verdicts.items()},
                        "statistics": {s: vals[i] for s, vals in stats.items()}})
            if args.images:
                from featureviz.engine import save_images

                Path(args.images).mkdir(parents=True, exist_ok=True)
                save_images(run["images"][args.checkpoints[-1]],
                            Path(args.images) / f"{tool.replace(':', '_')}_seed{seed}_{chunk[0]}.png", as_grid=True)
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
        "load_average_1min": load, "wall_seconds": time.perf_counter() - began,
        "lucent": "torch-lucent 0.1.8, kornia 0.5.11" if "lucent" in tools else None,
        "model": "EfficientNet-Lite0 (zoo ONNX -> featureviz.importer)", "judges": list(judges),
        "classes": args.classes, "seeds": args.seeds, "size": args.size, "batch": args.batch,
        "figures": [{"tool": t, "steps": s, **figures(records[t][s], list(judges))} for t in tools
                    for s in args.checkpoints],
    }
    print(markdown(summary))
    print(f"{summary['cpu']}, {summary['cores']} cores, torch {summary['torch']} ({args.threads} thread per tool), "
          f"load {load[0]:.1f} -> {load[1]:.1f}, {summary['wall_seconds'] / 60:.0f} min", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

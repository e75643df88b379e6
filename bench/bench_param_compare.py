"""Why do lucent's images look the way they do? featureviz against lucent, one detail at a time (issue 11, item 1).

The same objectives are rendered by lucent 0.1.8 and by featureviz variants that each switch ONE detail of
featureviz's parameterization or transforms to lucid's / lucent's choice (ablations). All variants run in one
invocation, each in its own process with one torch thread, the same seeds and steps; the parent then measures
every image the same way (as ``bench/bench_quality.py`` does): mean, contrast, saturation, spectrum slope and
high-frequency share (:func:`featureviz.engine.quality.image_statistics`), the activation reached (measured
outside both tools), and for class images the transfer to EfficientNet-Lite1 and -Lite2 (top-1 / top-5 and the
judge's probability).

Objectives (one batch per seed): the class logit of 10 ImageNet classes (every 50th index from 1) plus one early,
one middle and one late channel of EfficientNet-Lite0 (those of ``bench/bench_vs_lucent.py --processes``).

The details that are equal in both tools are checked, not ablated: :func:`forward_check` renders the same
spectrum through lucent's ``fft_image`` + ``to_valid_rgb`` and featureviz's ``make_param("fft")`` and reports
the largest difference (1/f scale and its normalisation, lucid's divide-by-4, the colour decorrelation and the
sigmoid).

Variants (``--tools``). Each is featureviz's engine with ONE detail switched, by a bench-only monkeypatch of
featureviz's own functions in the variant's process (nothing in the engine changes):

- ``featureviz`` (``featureviz:default``): the engine's defaults.
- ``featureviz:relu0``: no redirected ReLU gradient at the start (``relu_warmup=0``: lucent has none; lucid and
  featureviz redirect for 16 steps). An engine option.
- ``featureviz:shared``: one transform draw for the whole batch (lucid and lucent draw once per step; featureviz
  draws per image). ``Transforms(shared=True)``.
- ``featureviz:jitter0``: lucent's jitter, shifts 0..d-1 (kornia ``translate`` by ``np.random.choice(d)``: never
  negative), instead of lucid's centred crop offsets (featureviz: -d/2..d/2).
- ``featureviz:black``: what jitter, rotation and zoom-out bring in from beyond the 12 px grey pad is black
  (lucent: kornia and ``F.pad`` fill zeros; lucid: its rotation fills zeros) instead of grey 0.5 (``Pad(fill=0)``).
- ``featureviz:chain``: the random steps as separate bilinear resamples in lucent's order (translate, scale,
  rotate, translate, then the view), each on the padded canvas, instead of one composed resample
  (``Resample("each")``). Since 2026-12-01 the engine's standard stack has both black and chain: against the
  default these two now change nothing (bench/RESULTS.md's figures for them were measured on the composed stack).
- ``featureviz:canvas``: the model sees the whole padded canvas at its own pixels (224 + 2 x 12 = 248 px), as
  lucent and lucid do at 224 px (their model takes the transformed canvas at whatever size it has), instead of
  featureviz's 224 px window of the image at its own pixels.
- ``featureviz:lucentlike``: all of the above at once (an emulation of lucent inside featureviz's engine).
- ``featureviz:A+B`` (several details at once) and ``featureviz:lucentlike-X`` (all but X): which details lucent's
  look needs together.
- ``lucent``: lucent 0.1.8 itself, as in ``bench/bench_quality.py``.

Usage::

    .venv/bin/python bench/bench_param_compare.py                       # 224 px, 128 steps, seeds 0,1, all tools
    .venv/bin/python bench/bench_param_compare.py --check               # the forward check only
    .venv/bin/python bench/bench_param_compare.py --tools lucent,featureviz --seeds 0 --steps 64
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import bench_vs_lucent as bvl  # noqa: E402

CLASSES = tuple(range(1, 500, 50))  # 10 classes: the first 10 of bench_quality's 20
CHANNELS = (("early", "/_blocks.4/_swish_1/Clip", 0), ("middle", "/_blocks.9/_swish_1/Clip", 4),
            ("late", "/_blocks.12/_swish_1/Clip", 4))
VARIANTS = ("default", "relu0", "shared", "jitter0", "black", "chain", "canvas", "lucentlike")
DEFAULT_TOOLS = ",".join(["lucent"] + [f"featureviz:{v}" for v in VARIANTS])


# ------------------------------------------------------------------------------------------ the forward check


def forward_check(size=(224, 224), batch=2, seed=0) -> dict:
    """Largest |difference| between lucent's and featureviz's FFT image for the same spectrum parameters."""
    from featureviz.engine.params import make_param

    lucent = bvl.import_lucent(bvl.ensure_lucent())
    h, w = size
    torch.manual_seed(seed)
    out = {}
    for decorrelate in (True, False):
        params, image_f = lucent.param.image(w, h=h, batch=batch, decorrelate=decorrelate)
        (spectrum,) = params
        with torch.no_grad():
            spectrum.mul_(50.0)  # far from grey: saturated colours, the sigmoid's curved part
            ours_params, ours = make_param("fft", batch, size, generator=torch.Generator(), decorrelate=decorrelate)
            ours_params[0].copy_(spectrum)
            a, b = image_f(), ours()
        out["decorrelated" if decorrelate else "plain"] = {"max_abs_diff": float((a - b).abs().max()),
                                                           "image_std": float(a.std())}
    return out


# ----------------------------------------------------------------------------------------- the ablations


def _lucent_jitter_inverse(self, u):
    """lucent's jitter: a shift of 0..d-1 pixels right and down (np.random.choice(d), kornia translate)."""
    from featureviz.engine import transforms as tf

    shift = torch.floor(u * self.pixels).clamp_(max=self.pixels - 1)
    return tf._translation(-shift)


def make_bench_transforms(*, black: bool, chain: bool, shared: bool):
    """A factory of featureviz's Transforms for the ``black`` / ``chain`` / ``shared`` ablations, through the engine's
    own options: black beyond a constant pad (``Pad(fill=0)``), each step its own resample (``Resample("each")``,
    lucent's chain), one random draw for the batch. On a stack that already has them they change nothing."""
    import dataclasses

    from featureviz.engine import transforms as tf

    one_draw = shared

    def factory(steps, image_size, model_size, preprocess, channels=3, *, device=None, shared=False):
        steps = tuple(steps)
        if black:
            steps = tuple(dataclasses.replace(s, fill=0.0) if isinstance(s, tf.Pad) and s.mode == "constant" else s
                          for s in steps)
        if chain:
            steps = (*(s for s in steps if not isinstance(s, tf.Resample)), tf.Resample("each"))
        return tf.Transforms(steps, image_size, model_size, preprocess, channels, device=device,
                             shared=shared or one_draw)

    return factory


LUCENTLIKE = frozenset({"relu0", "shared", "jitter0", "black", "chain", "canvas"})


def variant_parts(variant: str) -> set:
    """The details a variant switches: one name, ``A+B`` (several), ``lucentlike`` (all six) or ``lucentlike-X``
    (all but X: which details lucent's look needs)."""
    if variant == "lucentlike":
        return set(LUCENTLIKE)
    if variant.startswith("lucentlike-"):
        return set(LUCENTLIKE - {variant.split("-", 1)[1]})
    return set(variant.split("+"))


@contextlib.contextmanager
def ablation(variant: str):
    """Switch one detail of featureviz to lucid's / lucent's choice for the duration (see the module docstring)."""
    from featureviz.engine import batch as engine_batch
    from featureviz.engine import transforms as tf

    engine_render = importlib.import_module("featureviz.engine.render")  # the module (the package's ``render`` is
    # the function)

    parts = variant_parts(variant)
    saved = (engine_batch.Transforms, engine_batch.model_size, engine_render._model_size, tf.Jitter.inverse)
    try:
        if parts & {"shared", "black", "chain"}:
            engine_batch.Transforms = make_bench_transforms(black="black" in parts, chain="chain" in parts,
                                                            shared="shared" in parts)
        if "jitter0" in parts:
            tf.Jitter.inverse = _lucent_jitter_inverse
        if "canvas" in parts:
            pad = sum(s.width for s in tf.STANDARD_TRANSFORMS if isinstance(s, tf.Pad))
            # the checked spec's model size comes from render's copy (since "Check the spec once", 2026-12-07):
            # patching only batch's left ``canvas`` a no-op, bit-identical to the default
            engine_batch.model_size = engine_render._model_size = \
                lambda model, size: (size[0] + 2 * pad, size[1] + 2 * pad)
        yield {"relu_warmup": 0} if "relu0" in parts else {}
    finally:
        engine_batch.Transforms, engine_batch.model_size, engine_render._model_size, tf.Jitter.inverse = saved


# ----------------------------------------------------------------------------------------------- renders


def objectives(model):
    """[(kind, label, layer or None, index)]: 10 class logits, then the early, middle and late channel."""
    return [("class", f"class {k}", None, k) for k in CLASSES] + [("channel", n, l, c) for n, l, c in CHANNELS]


def run_featureviz(model, seed, args, variant) -> dict:
    from featureviz.engine import RenderSpec
    from featureviz.engine import render

    terms = []
    for i, (kind, _, layer, index) in enumerate(objectives(model)):
        obj = {"logit": {"index": index}} if kind == "class" else {"channel": {"layer": layer, "channel": index}}
        terms.append({"batch": {"index": i, "objective": obj}})
    snaps = {}
    t0 = time.perf_counter()
    with ablation(variant) as options:
        spec = RenderSpec({"sum": terms}, steps=max(args.checkpoints), size=args.size, batch=len(terms), seed=seed,
                          device="cpu", snapshot_steps=tuple(args.checkpoints), **options)
        render(model, spec, snapshot=lambda step, images: snaps.__setitem__(step, images.clone()))
    return {"images": snaps, "seconds": time.perf_counter() - t0}


def run_lucent(model, seed, args) -> dict:
    lucent, key, module = bq.make_lucent_env(model)
    pre = model.input_spec.preprocess
    mean, std = torch.tensor(pre.mean).view(1, -1, 1, 1), torch.tensor(pre.std).view(1, -1, 1, 1)
    transforms = list(lucent.transform.standard_transforms) + [lambda x: (x - mean) / std]
    objective = None
    for i, (kind, _, layer, index) in enumerate(objectives(model)):
        term = lucent.objectives.channel(key if kind == "class" else bvl.lucent_layer_key(model, layer), index,
                                         batch=i)
        objective = term if objective is None else objective + term
    torch.manual_seed(seed)
    np.random.seed(seed)  # lucent draws its transforms from numpy's global generator
    checkpoints = tuple(sorted(args.checkpoints))
    t0 = time.perf_counter()
    images = lucent.render.render_vis(
        module, objective, param_f=lambda: lucent.param.image(args.size, batch=len(objectives(model))),
        transforms=transforms, thresholds=checkpoints, preprocess=False, progress=False, show_image=False)
    snaps = {step: torch.from_numpy(img).permute(0, 3, 1, 2).contiguous() for step, img in zip(checkpoints, images)}
    return {"images": snaps, "seconds": time.perf_counter() - t0}


def child(tool: str, seed: int, args, out: Path) -> None:
    torch.set_num_threads(1)
    model = bvl.load_model()
    if tool == "lucent":
        result = run_lucent(model, seed, args)
    else:
        result = run_featureviz(model, seed, args, tool.partition(":")[2] or "default")
    torch.save({"tool": tool, "seed": seed, **result}, out)


# ------------------------------------------------------------------------------------------------ figures


@torch.no_grad()
def activations(model, images, objs) -> list[float]:
    """Each image's own objective, measured outside both tools: resize to 224, preprocess, forward."""
    h, w = model.input_spec.default_size
    x = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    pre = model.input_spec.preprocess
    x = (x - torch.tensor(pre.mean).view(1, -1, 1, 1)) / torch.tensor(pre.std).view(1, -1, 1, 1)
    layers = sorted({layer for _, _, layer, _ in objs if layer} | {model.logits})
    out = model.truncate(layers)(x)
    values = []
    for i, (kind, _, layer, index) in enumerate(objs):
        t = out[model.logits if kind == "class" else layer][i]
        values.append(float(t[index] if kind == "class" else t[index].mean()))
    return values


def summarise(results: list[dict], model, judges: dict, checkpoints) -> list[dict]:
    from featureviz.engine.quality import image_statistics
    from featureviz.engine.quality import judge_images

    objs = objectives(model)
    n_class = sum(1 for o in objs if o[0] == "class")
    records = []
    for r in results:
        for step in checkpoints:
            images = r["images"][step]
            stats = image_statistics(images)
            acts = activations(model, images, objs)
            verdicts = {j: judge_images(m, images[:n_class], list(CLASSES)) for j, m in judges.items()}
            for i, (kind, label, _, _) in enumerate(objs):
                rec = {"tool": r["tool"], "seed": r["seed"], "steps": step, "kind": kind, "label": label,
                       "activation": acts[i], **{s: v[i] for s, v in stats.items()}}
                if kind == "class":
                    for j, v in verdicts.items():
                        rec[f"{j}_rank"], rec[f"{j}_p"] = v[i].rank, v[i].probability
                records.append(rec)
    return records


def table(records: list[dict], tools: list[str], checkpoints, judges: list[str]) -> str:
    stats = ("mean", "contrast", "saturation", "spectrum_slope", "high_freq")
    head = ["tool", "steps", "classes: Lite0 logit"] + [f"{j} top-1 / top-5" for j in judges] + \
        [f"{j} p" for j in judges] + [f"classes: {s}" for s in stats] + \
        [f"{n} act" for n, _, _ in CHANNELS] + ["channels: slope", "channels: HF share"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for tool in tools:
        for step in checkpoints:
            cls = [r for r in records if r["tool"] == tool and r["steps"] == step and r["kind"] == "class"]
            chs = [r for r in records if r["tool"] == tool and r["steps"] == step and r["kind"] == "channel"]
            if not cls:
                continue
            n = len(cls)
            cells = [tool, str(step), f"{np.mean([r['activation'] for r in cls]):.2f}"]
            for j in judges:
                ranks = np.array([r[f"{j}_rank"] for r in cls])
                cells.append(f"{int((ranks == 1).sum())} / {int((ranks <= 5).sum())} (of {n})")
            cells += [f"{np.mean([r[f'{j}_p'] for r in cls]):.3f}" for j in judges]
            cells += [f"{np.mean([r[s] for r in cls]):.3f}" if s != "spectrum_slope"
                      else f"{np.mean([r[s] for r in cls]):.2f}" for s in stats]
            for name, _, _ in CHANNELS:
                cells.append(f"{np.mean([r['activation'] for r in chs if r['label'] == name]):.3f}")
            cells += [f"{np.mean([r['spectrum_slope'] for r in chs]):.2f}", f"{np.mean([r['high_freq'] for r in chs]):.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tools", default=DEFAULT_TOOLS)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--checkpoints", default=None, help="steps measured (default 64,STEPS)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--jobs", type=int, default=2, help="renders at once (one torch thread each)")
    parser.add_argument("--parts", default="bench/.param_compare_parts", help="each render is kept here; a rerun "
                        "with the same arguments reuses it")
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true", help="only the forward check of the parameterization")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # TOOL SEED OUT
    args = parser.parse_args(argv)
    args.checkpoints = sorted({int(s) for s in (args.checkpoints or f"64,{args.steps}").split(",")
                               if int(s) <= args.steps} | {args.steps})
    if args.child:
        child(args.child[0], int(args.child[1]), args, Path(args.child[2]))
        return 0
    check = forward_check()
    print("forward check, lucent fft_image + to_valid_rgb against featureviz make_param('fft'), same spectrum:",
          json.dumps(check), flush=True)
    if args.check:
        return 0
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in tools:
        name = t.partition(":")[2] or "default"
        if t != "lucent" and name not in VARIANTS and not variant_parts(name) <= LUCENTLIKE:
            raise SystemExit(f"unknown tool {t!r}; known: lucent, featureviz[:{'|'.join(VARIANTS)}]")
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = Path(args.parts)
    parts.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    jobs = [(t, s, parts / f"{t.replace(':', '_')}-{args.size}px-{'_'.join(map(str, args.checkpoints))}-seed{s}.pt")
            for s in seeds for t in tools]  # seed by seed: a run cut short still has every tool for the first seed
    began, load = time.perf_counter(), [os.getloadavg()[0]]
    running = []
    pending = [j for j in jobs if not j[2].is_file()]
    while pending or running:
        while pending and len(running) < args.jobs:
            tool, seed, out = pending.pop(0)
            cmd = [sys.executable, __file__, *argv, "--child", tool, str(seed), str(out)]
            running.append((tool, seed, time.perf_counter(), subprocess.Popen(cmd)))
        time.sleep(2)  # polling the children's exit (a wall-clock bench, not a test)
        for entry in list(running):
            tool, seed, t0, proc = entry
            if proc.poll() is not None:
                running.remove(entry)
                load.append(os.getloadavg()[0])
                print(f"{tool} seed {seed}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s, "
                      f"load {load[-1]:.1f}", file=sys.stderr, flush=True)
    results = [torch.load(out, weights_only=False) for _, _, out in jobs if out.is_file()]
    model = bvl.load_model()
    judges = bq.load_judges()
    records = summarise(results, model, judges, args.checkpoints)
    print(table(records, tools, args.checkpoints, list(judges)))
    print(f"{bq.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per render, {args.jobs} "
          f"renders at once; 1-min load {min(load):.1f}-{max(load):.1f}; {args.size} px, seeds {seeds}; "
          f"{(time.perf_counter() - began) / 60:.0f} min; "
          f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"check": check, "load": load, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""featureviz vs lucent: end-to-end wall time and final activation of one channel visualization on CPU.

Both tools get the same model, layer, channel, steps and image size:

- the model is the zoo's EfficientNet-Lite0 (ImageNet, a real trained network) exported to ONNX once and
  imported once with :func:`featureviz.importer.import_model`; featureviz renders the ``ImportedModel``,
  lucent gets a copy of its ``module`` (the onnx2torch ``GraphModule``) as a plain torch model, in the NCHW
  layout it is imported in (featureviz renders channels_last on the CPU, see featureviz.engine.layout);
- both use their defaults otherwise: an FFT image with colour decorrelation and sigmoid, Adam at lr 0.05,
  the standard transform stack, the model's preprocessing (lucent's ``preprocess=False`` plus an explicit
  ``(x - mean) / std`` transform, because its built-in one is torchvision's ImageNet normalisation), and the
  image upsampled to the model's 224 x 224 input.

The final activation of both results is measured the same way, outside either tool: the final image,
resized bilinearly to 224 x 224, preprocessed, forward through the model, mean of the target channel.

lucent 0.1.8 (its last release, 2021) needs kornia <= 0.5 and imports IPython; it is installed by this
script with ``pip install --no-deps --target .venv-bench/lucent`` (never into the project's environment)
and runs on the project's torch. Runtime patches, all outside lucent's render loop:

- ``IPython.display`` is replaced by an empty module (lucent imports it only to show images in notebooks);
- nothing else was needed with torch 2.15 and kornia 0.5.11 (``torch.fft.irfftn``, ``kornia.warp_affine``
  and ``kornia.get_rotation_matrix2d`` still work).

Runs alternate between the tools (lucent, featureviz, lucent, ...) so that background load on a shared
machine hits both alike; the medians are reported. Usage::

    .venv/bin/python bench/bench_vs_lucent.py                       # 256 steps, 128 px, 3 runs each
    .venv/bin/python bench/bench_vs_lucent.py --steps 512 --runs 5 --json bench/lucent.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
LUCENT_DIR = ROOT / ".venv-bench" / "lucent"
# lucent 0.1.8 pins kornia <= 0.4.1; 0.5.11 is the newest kornia whose API it still runs on
LUCENT_PACKAGES = ["torch-lucent==0.1.8", "kornia==0.5.11", "tqdm", "decorator"]

DEFAULT_LAYER = "/_blocks.9/_swish_1/Clip"  # catalog name of a mid-depth ReLU6 of EfficientNet-Lite0 (672 ch, 14x14)
DEFAULT_CHANNEL = 4  # alive on a grey start image (channel 12 is dead there and stays grey in lucent)


# ---------------------------------------------------------------------------------------------------------
# the two environments


def ensure_lucent(target: Path = LUCENT_DIR) -> Path:
    """Install lucent and kornia 0.5 into ``target`` (once) with the project's pip, never into its venv."""
    if not (target / "lucent" / "optvis" / "render.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               *LUCENT_PACKAGES]
        print("installing lucent:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    return target


def import_lucent(target: Path = LUCENT_DIR) -> types.SimpleNamespace:
    """Import lucent from ``target`` with the runtime patches described in the module docstring."""
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    if "IPython.display" not in sys.modules:
        ipython = types.ModuleType("IPython")
        display = types.ModuleType("IPython.display")
        ipython.display = display
        sys.modules.setdefault("IPython", ipython)
        sys.modules["IPython.display"] = display
    import kornia
    from lucent.optvis import objectives, param, render, transform

    return types.SimpleNamespace(objectives=objectives, param=param, render=render, transform=transform,
                                 versions=f"torch-lucent 0.1.8, kornia {kornia.__version__}")


def load_model():
    """The zoo's EfficientNet-Lite0 as ONNX, imported once by featureviz."""
    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    return import_model(zoo.efficientnet_lite0(), preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))


def lucent_layer_key(model, layer: str) -> str:
    """lucent's name for the module that outputs catalog layer ``layer``.

    lucent hooks every submodule and names it by joining the attribute path with "_"; onnx2torch names
    each call_module node's target after the ONNX node, so the key is that target with "." -> "_".
    """
    info = model.layer(layer)
    names = {info.name, *getattr(info, "aliases", ())}
    names |= {n.lstrip("/") for n in names}
    for node in model.module.graph.nodes:
        if node.op == "call_module" and (node.target in names or node.name in names):
            return str(node.target).replace(".", "_")
    raise SystemExit(f"layer {layer!r}: no call_module node of the converted graph produces it")


# ---------------------------------------------------------------------------------------------------------
# one run of each tool


def run_lucent(lucent, model, module, key: str, channel: int, steps: int, size: int, seed: int) -> dict:
    mean, std = model.input_spec.preprocess.mean, model.input_spec.preprocess.std
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    transforms = list(lucent.transform.standard_transforms) + [lambda x: (x - mean_t) / std_t]
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed)  # lucent draws its transforms from numpy's global generator
    t0, c0 = time.perf_counter(), time.process_time()
    images = lucent.render.render_vis(
        module, lucent.objectives.channel(key, channel), param_f=lambda: lucent.param.image(size),
        transforms=transforms, thresholds=(steps,), preprocess=False, progress=False, show_image=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    image = torch.from_numpy(images[-1]).permute(0, 3, 1, 2).contiguous()
    return {"seconds": seconds, "cpu_seconds": cpu, "image": image}


def run_featureviz(model, layer: str, channel: int, steps: int, size: int, seed: int) -> dict:
    from featureviz.engine import RenderSpec, render

    spec = RenderSpec(objective={"channel": {"layer": layer, "channel": channel}}, steps=steps, size=size,
                      seed=seed, param="fft", transforms="standard", device="cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    result = render(model, spec)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "image": result.images, "phase_seconds": dict(result.phase_seconds),
            "objective_end": float(result.objective_end[0])}


@torch.no_grad()
def final_activation(model, layer: str, channel: int, image: torch.Tensor) -> float:
    """Mean of ``channel`` of ``layer`` for ``image`` (B,3,h,w) in [0, 1]: resize, preprocess, forward."""
    spec = model.input_spec
    h, w = spec.default_size
    x = F.interpolate(image.float(), size=(h, w), mode="bilinear", align_corners=True)
    mean = torch.tensor(spec.preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(1, -1, 1, 1)
    acts = model.truncate([layer])((x - mean) / std)
    return float(acts[layer][:, channel].mean())


# ---------------------------------------------------------------------------------------------------------
# report


def _median(values):
    return statistics.median(values) if values else float("nan")


def summarize(runs: dict, args, lucent_versions: str, load: tuple[float, float]) -> dict:
    luc, fv = runs["lucent"], runs["featureviz"]
    phases = {k: _median([r["phase_seconds"][k] for r in fv]) for k in fv[0]["phase_seconds"]}
    figures = {}
    for name, rs in (("lucent", luc), ("featureviz", fv)):
        figures[name] = {"seconds": [r["seconds"] for r in rs], "cpu_seconds": [r["cpu_seconds"] for r in rs],
                         "activation": [r["activation"] for r in rs]}
    med = {name: {k: _median(v) for k, v in f.items()} for name, f in figures.items()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch threads",
        "load_average_1min": {"start": load[0], "end": load[1]},
        "lucent_versions": lucent_versions,
        "model": "EfficientNet-Lite0 (zoo ONNX -> featureviz.importer)",
        "layer": args.layer, "channel": args.channel, "steps": args.steps, "size": args.size, "runs": args.runs,
        **figures,
        "speedup_wall": med["lucent"]["seconds"] / med["featureviz"]["seconds"],
        "speedup_cpu": med["lucent"]["cpu_seconds"] / med["featureviz"]["cpu_seconds"],
        "activation_ratio": med["featureviz"]["activation"] / med["lucent"]["activation"],
        "featureviz_phase_seconds": phases,
    }


def print_report(s: dict) -> None:
    print(f"{s['model']}, layer {s['layer']} channel {s['channel']}, {s['steps']} steps, {s['size']} px, "
          f"median of {s['runs']} runs; {s['machine']}; load average {s['load_average_1min']['start']:.1f} -> "
          f"{s['load_average_1min']['end']:.1f}; {s['lucent_versions']}")
    print("| tool | wall s | s/step | CPU s | final activation | wall s of each run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("lucent", "featureviz"):
        f = s[name]
        t, c, a = _median(f["seconds"]), _median(f["cpu_seconds"]), _median(f["activation"])
        each = ", ".join(f"{x:.1f}" for x in f["seconds"])
        print(f"| {name} | {t:.1f} | {t / s['steps']:.3f} | {c:.1f} | {a:.3f} | {each} |")
    print(f"speedup lucent/featureviz: wall {s['speedup_wall']:.2f}x, CPU {s['speedup_cpu']:.2f}x; "
          f"final activation featureviz/lucent: {s['activation_ratio']:.2f}")
    total = sum(s["featureviz_phase_seconds"].values())
    print("featureviz phases (median s per run): " + ", ".join(
        f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in s["featureviz_phase_seconds"].items()))


# ---------------------------------------------------------------------------------------------------------
# whole processes: each render is a fresh interpreter, start-up (imports, model load) included


def lucent_child(argv) -> int:
    """``bench_vs_lucent.py --lucent-child MODULE.pt KEY CHANNEL STEPS SIZE SEED MEAN STD OUT.pt``: one lucent
    render in a fresh process, as a lucent user runs it: import lucent, load the torch model, render, save."""
    module_path, key, channel, steps, size, seed, mean, std, out = argv
    lucent = import_lucent(LUCENT_DIR)
    module = torch.load(module_path, weights_only=False)
    model = types.SimpleNamespace(input_spec=types.SimpleNamespace(preprocess=types.SimpleNamespace(
        mean=[float(mean)] * 3, std=[float(std)] * 3)))
    result = run_lucent(lucent, model, module, key, int(channel), int(steps), int(size), int(seed))
    torch.save(result["image"], out)
    return 0


def run_processes(args, model, layers: list[str]) -> dict:
    """Alternate whole-process renders of both tools, layer after layer within each round (so background load on a
    shared machine hits every layer and both tools alike); -> {layer: {tool: [{"seconds", "activation", "load"}]}}
    where ``load`` is the 1-minute load average when the process ended."""
    import tempfile

    from featureviz import zoo

    with tempfile.TemporaryDirectory(prefix="bench-vs-lucent-") as tmp:  # removed after, also on a failure
        return _run_processes(args, model, layers, Path(tmp), zoo)


def _run_processes(args, model, layers: list[str], folder: Path, zoo) -> dict:
    module_path = folder / "module.pt"
    # lucent loads the same converted graph featureviz caches (portable modules: torch.load needs no onnx2torch)
    torch.save(copy.deepcopy(model.module).to(memory_format=torch.contiguous_format), module_path)
    pre = model.input_spec.preprocess
    onnx_path = str(zoo.efficientnet_lite0())
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs = {layer: {"lucent": [], "featureviz": []} for layer in layers}
    for i in range(args.runs + 1):  # run 0 warms the disk cache and is not counted
        for layer in layers:
            key = lucent_layer_key(model, layer)
            for tool in ("lucent", "featureviz"):
                out = folder / f"{tool}-{i}-{layers.index(layer)}"
                if tool == "lucent":
                    cmd = [sys.executable, __file__, "--lucent-child", str(module_path), key, str(args.channel),
                           str(args.steps), str(args.size), str(args.seed + i), str(pre.mean[0]), str(pre.std[0]),
                           str(out) + ".pt"]
                else:
                    cmd = [str(Path(sys.executable).parent / "featureviz"), "render", onnx_path,
                           f"{layer}:{args.channel}", "--steps", str(args.steps), "--size", str(args.size),
                           "--seed", str(args.seed + i), "--mean", str(pre.mean[0]), "--std", str(pre.std[0]),
                           "--device", "cpu", "--out", str(out) + ".png"] + (
                               ["--threads", str(args.threads)] if args.threads else [])
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                seconds = time.perf_counter() - t0
                load = os.getloadavg()[0]
                if tool == "lucent":
                    image = torch.load(str(out) + ".pt")
                else:
                    from featureviz.engine import load_image

                    image = load_image(str(out) + ".png")[None]
                activation = final_activation(model, layer, args.channel, image)
                print(f"process run {i} {layer} {tool}: {seconds:.1f} s, activation {activation:.3f}, load "
                      f"{load:.1f}", file=sys.stderr, flush=True)
                if i > 0:
                    runs[layer][tool].append({"seconds": seconds, "activation": activation, "load": load})
    return runs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--lucent-child":
        return lucent_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", default=DEFAULT_LAYER,
                        help="catalog layer; with --processes, several comma-separated layers are timed in one run")
    parser.add_argument("--channel", type=int, default=DEFAULT_CHANNEL)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=["lucent", "featureviz"], help="run one tool only")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--curve", default=None, metavar="STEPS",
                        help="activation against steps instead of timings: the final activation of the images kept "
                             "at these steps (e.g. 16,32,64,128,256), mean over --runs seeds, per tool")
    parser.add_argument("--variants", default="default",
                        help="with --curve: featureviz variants as in bench_quality.py (default, lr0.1, "
                             "cosine-lr0.1, ...)")
    parser.add_argument("--processes", action="store_true",
                        help="time whole processes (start-up, imports and model load included): featureviz render "
                             "with the cached model against a fresh interpreter running lucent")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lucent = import_lucent(ensure_lucent())
    model = load_model()
    if args.processes:
        layers = [name.strip() for name in args.layer.split(",") if name.strip()]
        for layer in layers:
            model.layer(layer)  # fail early with the importer's message (close matches) on a typo
        return report_processes(args, run_processes(args, model, layers), lucent.versions)
    model.layer(args.layer)  # fail early with the importer's message (close matches) on a typo
    key = lucent_layer_key(model, args.layer)
    if args.curve:
        return activation_curve(args, model, lucent, key)
    # lucent runs its own copy, NCHW as a user hands it over: featureviz converts the weights of the model it renders
    # to channels_last in place (featureviz.engine.layout), and oneDNN would then run lucent's convolutions NHWC too
    lucent_module = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)

    tools = {"lucent": lambda seed, steps: run_lucent(lucent, model, lucent_module, key, args.channel, steps, args.size, seed),
             "featureviz": lambda seed, steps: run_featureviz(model, args.layer, args.channel, steps, args.size, seed)}
    if args.only:
        tools = {args.only: tools[args.only]}
    for fn in tools.values():  # warm-up: first-call allocations, thread pools, lazy imports
        fn(args.seed + 1000, 4)
    runs = {name: [] for name in ("lucent", "featureviz")}
    load_start = os.getloadavg()[0]
    for i in range(args.runs):
        for name, fn in tools.items():
            r = fn(args.seed + i, args.steps)
            r["activation"] = final_activation(model, args.layer, args.channel, r.pop("image"))
            runs[name].append(r)
            print(f"run {i} {name}: {r['seconds']:.1f} s, activation {r['activation']:.3f}", file=sys.stderr)
    if args.only:
        for r in runs[args.only]:
            print(json.dumps({k: v for k, v in r.items()}))
        return 0
    summary = summarize(runs, args, lucent.versions, (load_start, os.getloadavg()[0]))
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def activation_curve(args, model, lucent, key) -> int:
    """--curve: each tool renders --runs seeds of --steps steps, keeping the images at the checkpoints; the table
    gives the mean final activation (measured outside both tools) at each checkpoint."""
    from bench_quality import cpu_model
    from bench_quality import featureviz_variant

    from featureviz.engine import RenderSpec, render

    checkpoints = sorted({int(s) for s in args.curve.split(",")} | {args.steps})
    objective = {"channel": {"layer": args.layer, "channel": args.channel}}
    lucent_module = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)
    pre = model.input_spec.preprocess
    mean_t, std_t = torch.tensor(pre.mean).view(1, -1, 1, 1), torch.tensor(pre.std).view(1, -1, 1, 1)
    rows, stops = {}, {}
    load = [os.getloadavg()[0]]
    variants = [v for v in args.variants.split(",") if v]
    for seed in range(args.seed, args.seed + args.runs):
        import numpy as np

        torch.manual_seed(seed)
        np.random.seed(seed)
        images = lucent.render.render_vis(
            lucent_module, lucent.objectives.channel(key, args.channel), param_f=lambda: lucent.param.image(args.size),
            transforms=list(lucent.transform.standard_transforms) + [lambda x: (x - mean_t) / std_t],
            thresholds=tuple(checkpoints), preprocess=False, progress=False, show_image=False)
        rows.setdefault("lucent", []).append([final_activation(model, args.layer, args.channel, torch.from_numpy(
            image).permute(0, 3, 1, 2).contiguous()) for image in images])
        for variant in variants:
            snaps = {}
            spec = RenderSpec(objective=objective, steps=args.steps, size=args.size, seed=seed, device="cpu",
                              snapshot_steps=tuple(checkpoints), **featureviz_variant(variant))
            result = render(model, spec, snapshot=lambda step, imgs: snaps.__setitem__(step, imgs.clone()))
            rows.setdefault(f"featureviz:{variant}", []).append(
                [final_activation(model, args.layer, args.channel, snaps.get(step, result.images))
                 for step in checkpoints])
            if result.stopped_at:
                stops.setdefault(f"featureviz:{variant}", []).append(result.stopped_at)
                print(f"featureviz:{variant} seed {seed}: stopped at a plateau after step {result.stopped_at}",
                      file=sys.stderr, flush=True)
        print(f"seed {seed} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
    print(f"activation of {args.layer}:{args.channel} against steps, {args.size} px, mean of {args.runs} seeds; "
          f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; load {min(load):.1f}-{max(load):.1f}")
    print("| tool | " + " | ".join(f"{s} steps" for s in checkpoints) + " |")
    print("| --- " * (len(checkpoints) + 1) + "|")
    for tool, values in rows.items():
        means = [statistics.mean(v[i] for v in values) for i in range(len(checkpoints))]
        stopped = f" (stopped after steps {', '.join(map(str, stops[tool]))})" if tool in stops else ""
        print(f"| {tool}{stopped} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"layer": args.layer, "channel": args.channel, "size": args.size,
                                               "checkpoints": checkpoints, "rows": rows, "stops": stops,
                                               "load": load}, indent=1))
    return 0


def report_processes(args, runs: dict, versions: str) -> int:
    """One markdown row per layer: median wall time of each tool, the speed-up, the activations, the loads."""
    from bench_quality import cpu_model

    print(f"whole processes, channel {args.channel}, {args.steps} steps, {args.size} px, median of {args.runs} (run 0 "
          f"not counted); {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; {versions}")
    print("| layer (channel) | lucent s (each) | featureviz s (each) | speed-up (median) | activation lucent / "
          "featureviz | 1-min load (min-max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layer, tools in runs.items():
        med = {t: (_median([r["seconds"] for r in rs]), _median([r["activation"] for r in rs]))
               for t, rs in tools.items()}
        each = {t: ", ".join(f"{r['seconds']:.1f}" for r in rs) for t, rs in tools.items()}
        loads = [r["load"] for rs in tools.values() for r in rs]
        print(f"| `{layer}` ({args.channel}) | {med['lucent'][0]:.1f} ({each['lucent']}) | {med['featureviz'][0]:.1f} "
              f"({each['featureviz']}) | **{med['lucent'][0] / med['featureviz'][0]:.2f}x** | {med['lucent'][1]:.3f} / "
              f"{med['featureviz'][1]:.3f} | {min(loads):.1f}-{max(loads):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"channel": args.channel, "steps": args.steps, "size": args.size,
                                               "cpu": cpu_model(), "runs": runs, "versions": versions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

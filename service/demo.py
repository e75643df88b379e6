"""The demo gallery: what a real trained ImageNet classifier's units and classes look like.

The model is the zoo's EfficientNet-Lite0 (:func:`featureviz.zoo.efficientnet_lite0`, ImageNet-1k, input
(x * 255 - 127) / 128). The gallery has four panels, each one render job of a small batch:

- ``early``: channels of an early-ish layer (the expanded, depthwise-filtered ReLU6 of block 4, 240
  channels at 28 x 28): textures and repeated patterns;
- ``late``: channels of a late layer (block 12's depthwise ReLU6, 1152 channels at 7 x 7): parts and
  object-like arrangements;
- ``classes``: class logits, each image checked afterwards by classifying it with the same model;
- ``diversity``: one late channel rendered as a batch with the Gram-matrix diversity term, so the images
  show different facets of what excites it.

The channels were picked by looking at the model: units that are on for a grey start image (so any tool
gets a gradient from the first step), then kept the ones whose 192-step renders show a clear structure
(block 12 channel 4 turns into a furry face, channel 6 into eyes and animals; block 12 channel 7 barely moved
and was dropped). The classes were checked the same way: all four renders are classified as their class.

:func:`gallery` builds the panels as plain engine specs; a renderer (local engine, or the service through
:class:`featureviz.client.Client`) turns each into PNGs and objective values; :func:`write_site` writes the
PNG files and an ``index.html`` that shows every image with its objective, start and end values, the model's
prediction for class images, and the settings used.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import json
import os
import pathlib
from typing import Callable, Sequence

__all__ = [
    "DemoSettings",
    "Panel",
    "PanelResult",
    "gallery",
    "describe_objective",
    "classify_pngs",
    "write_site",
    "render_gallery",
    "local_renderer",
    "images_to_pngs",
    "EARLY_LAYER",
    "LATE_LAYER",
    "EARLY_CHANNELS",
    "LATE_CHANNELS",
    "CLASSES",
    "DIVERSITY_CHANNEL",
]

# Catalog names (featureviz.importer) of the two layers. Both are ReLU6 outputs (Clip 0..6 in ONNX) of the
# depthwise convolution inside an MBConv block: the widest, most interpretable tensors of the network (block
# outputs are linear bottlenecks).
EARLY_LAYER = "/_blocks.4/_swish_1/Clip"
LATE_LAYER = "/_blocks.12/_swish_1/Clip"
EARLY_CHANNELS = (0, 1, 4, 5)
LATE_CHANNELS = (4, 10, 14, 16)
# ImageNet-1k indices (torchvision order): animals, food and objects that look distinct from each other
CLASSES = (1, 130, 323, 948)   # goldfish, flamingo, monarch butterfly, Granny Smith apple
DIVERSITY_CHANNEL = 6
DIVERSITY_WEIGHT = 1e2  # lucid's scale for the diversity term against a channel objective


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Render settings shared by every panel. ``size`` is the rendered image side; the transform stack
    resamples it to the model's 224 x 224 input, as lucid and lucent do with their 128 px default."""

    steps: int = 192
    size: int = 128
    lr: float = 0.05
    param: str = "fft"
    transforms: str = "standard"
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A few seconds on a CPU: for tests and for trying the pipeline, not for looking at."""
        return cls(steps=6, size=64)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One render job: a batch of images with per-image objectives."""

    key: str                  # file-name stem and HTML anchor
    title: str
    note: str                 # one sentence under the title
    objective: dict           # engine objective spec for the whole batch
    labels: tuple[str, ...]   # caption of each image
    objectives: tuple[str, ...]  # each image's objective in CLI syntax
    classes: tuple[int | None, ...]  # target ImageNet class per image (class panels), else None

    @property
    def batch(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class PanelResult:
    panel: Panel
    pngs: list[bytes]
    objective_start: list[float]
    objective_end: list[float]
    seconds: float
    predictions: list[tuple[int, str, float]] | None = None  # (class index, name, probability) per image


def _per_image(objectives: Sequence[dict]) -> dict:
    """Image i of the batch maximises objectives[i]."""
    if len(objectives) == 1:
        return objectives[0]
    return {"sum": [{"batch": {"index": i, "objective": o}} for i, o in enumerate(objectives)]}


def _channel(layer: str, channel: int) -> dict:
    return {"channel": {"layer": layer, "channel": channel}}


def gallery(*, quick: bool = False, class_names: Sequence[str] | None = None) -> list[Panel]:
    """The demo's panels. ``quick`` keeps two images per panel (for tests)."""
    n = 2 if quick else None
    early, late, classes = EARLY_CHANNELS[:n], LATE_CHANNELS[:n], CLASSES[:n]
    diversity_batch = 2 if quick else 4

    def channel_panel(key, title, note, layer, channels):
        objectives = [_channel(layer, c) for c in channels]
        return Panel(key=key, title=title, note=note, objective=_per_image(objectives),
                     labels=tuple(f"channel {c}" for c in channels),
                     objectives=tuple(describe_objective(o) for o in objectives), classes=(None,) * len(channels))

    panels = [
        channel_panel("early", "Early layer: block 4", f"{EARLY_LAYER}, a ReLU6 with 240 channels at 28 x 28. "
                      "Early units respond to textures and repeated patterns.", EARLY_LAYER, early),
        channel_panel("late", "Late layer: block 12", f"{LATE_LAYER}, a ReLU6 with 1152 channels at 7 x 7. "
                      "Late units respond to parts and arrangements of objects.", LATE_LAYER, late),
    ]
    logits = [{"logit": {"index": k}} for k in classes]
    panels.append(Panel(
        key="classes", title="Classes",
        note="Each image maximises one class logit; the model's own prediction for the result is shown.",
        objective=_per_image(logits),
        labels=tuple(f"{class_names[k]} ({k})" if class_names else f"class {k}" for k in classes),
        objectives=tuple(describe_objective(o) for o in logits), classes=tuple(classes)))
    diversity = {"sum": [_channel(LATE_LAYER, DIVERSITY_CHANNEL),
                         {"scale": {"factor": DIVERSITY_WEIGHT, "objective": {"diversity": {"layer": LATE_LAYER}}}}]}
    panels.append(Panel(
        key="diversity", title=f"Diversity: block 12, channel {DIVERSITY_CHANNEL}",
        note=f"One channel rendered as a batch of {diversity_batch} with a Gram-matrix diversity term "
             f"(weight {DIVERSITY_WEIGHT:g}), so each image shows another facet of what excites it.",
        objective=diversity, labels=tuple(f"image {i + 1}" for i in range(diversity_batch)),
        objectives=(describe_objective(diversity),) * diversity_batch, classes=(None,) * diversity_batch))
    return panels


def describe_objective(spec: dict) -> str:
    """A spec in the command line's objective syntax (``/_blocks.4/_swish_1/Clip:5``, ``logit:1``), for captions."""
    from featureviz.spec import format_objective

    return format_objective(spec)


# ---------------------------------------------------------------------------------------------------------
# classification of the class images, by the original ONNX file on onnxruntime (an independent runtime)


def classify_pngs(onnx_path: str | os.PathLike, pngs: Sequence[bytes], *, mean: Sequence[float],
                  std: Sequence[float], class_names: Sequence[str]) -> list[tuple[int, str, float]]:
    """Top-1 (index, name, probability) of each PNG: resized bilinearly to the model's input, ``(x - mean) /
    std``, run by onnxruntime on ``onnx_path``."""
    import numpy as np
    import onnxruntime
    from PIL import Image

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    h, w = inp.shape[2], inp.shape[3]
    batch = []
    for png in pngs:
        image = Image.open(io.BytesIO(png)).convert("RGB").resize((w, h), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32) / 255.0
        batch.append(((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1))
    logits = session.run(None, {inp.name: np.stack(batch)})[0]
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return [(int(k), class_names[int(k)], float(probs[i, k])) for i, k in enumerate(top)]


# ---------------------------------------------------------------------------------------------------------
# the static site

_CSS = """
:root { --fg: #1d232b; --muted: #5d6875; --line: #e3e7ec; --ok: #1f7a3d; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: #f6f7f9; }
header, main, footer { max-width: 1100px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 28px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 2px; }
p.lead, p.note { color: var(--muted); margin: 0 0 12px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, monospace; overflow-wrap: anywhere; }
table.settings { border-collapse: collapse; margin: 12px 0 0; background: #fff; border: 1px solid var(--line); }
table.settings td { padding: 4px 12px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.settings td:first-child { color: var(--muted); white-space: nowrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
figure img { display: block; width: 100%; aspect-ratio: 1; object-fit: cover; background: #ddd; }
figcaption { padding: 8px 10px 10px; font-size: 13.5px; }
figcaption .label { font-weight: 600; }
figcaption .values { color: var(--muted); font-variant-numeric: tabular-nums; }
.ok { color: var(--ok); } .bad { color: var(--bad); }
footer { color: var(--muted); font-size: 13px; padding: 30px 20px 40px; }
"""


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.4g}"


def _figure(result: PanelResult, i: int, src: str) -> str:
    panel, esc = result.panel, html.escape
    lines = [f'<span class="label">{esc(panel.labels[i])}</span>',
             f"<code>{esc(panel.objectives[i])}</code>",
             f'<span class="values">objective {_fmt(result.objective_start[i])} &rarr; '
             f"{_fmt(result.objective_end[i])}</span>"]
    if result.predictions is not None and panel.classes[i] is not None:
        k, name, p = result.predictions[i]
        hit = k == panel.classes[i]
        lines.append(f'<span class="{"ok" if hit else "bad"}">model says: {esc(name)} ({k}), p = {p:.2f}</span>')
    caption = "<br>".join(lines)
    alt = esc(f"{panel.title}: {panel.labels[i]}")
    return f'<figure><img src="{esc(src)}" alt="{alt}" loading="lazy"><figcaption>{caption}</figcaption></figure>'


def write_site(out_dir: str | os.PathLike, results: Sequence[PanelResult], settings: DemoSettings, *,
               model: dict, extra: dict | None = None) -> pathlib.Path:
    """Write ``<panel>-<i>.png`` for every image, an ``index.html`` showing them and ``gallery.json`` with the
    same figures for programs; returns the page's path.

    ``model`` describes the model (``name``, ``sha256``, ``input`` ...), ``extra`` adds rows to the settings
    table (server address, device, wall time ...).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    sections, records = [], []
    for result in results:
        panel = result.panel
        figures = []
        for i, png in enumerate(result.pngs):
            name = f"{panel.key}-{i}.png"
            (out / name).write_bytes(png)
            figures.append(_figure(result, i, name))
            record = {"file": name, "panel": panel.key, "label": panel.labels[i], "objective": panel.objectives[i],
                      "objective_start": result.objective_start[i], "objective_end": result.objective_end[i]}
            if panel.classes[i] is not None:
                record["target_class"] = panel.classes[i]
                if result.predictions is not None:
                    k, name_k, p = result.predictions[i]
                    record["predicted"] = {"class": k, "name": name_k, "probability": p}
            records.append(record)
        sections.append(f'<section id="{esc(panel.key)}"><h2>{esc(panel.title)}</h2>'
                        f'<p class="note">{esc(panel.note)} Rendered in {result.seconds:.1f} s.</p>'
                        f'<div class="grid">{"".join(figures)}</div></section>')
    rows = {**{k: v for k, v in model.items()}, **dataclasses.asdict(settings), **(extra or {})}
    table = "".join(f"<tr><td>{esc(str(k))}</td><td><code>{esc(str(v))}</code></td></tr>" for k, v in rows.items())
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>featureviz demo: {esc(str(model.get("name", "model")))}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>Feature visualization of {esc(str(model.get("name", "a model")))}</h1>
<p class="lead">Images optimised to excite one channel, one class or one channel many ways, rendered by
featureviz. Values are the objective at the first and the last step.</p>
<table class="settings">{table}</table>
</header>
<main>
{"".join(sections)}
</main>
<footer>Generated by <code>featureviz demo</code> on {when}.
Method: Olah, Mordvintsev and Schubert, <em>Feature Visualization</em>, Distill 2017.</footer>
</body>
</html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    summary = {"model": model, "settings": dataclasses.asdict(settings), **(extra or {}), "images": records}
    (out / "gallery.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return index


# ---------------------------------------------------------------------------------------------------------
# rendering the gallery

Renderer = Callable[[Panel, DemoSettings], PanelResult]


def render_gallery(panels: Sequence[Panel], renderer: Renderer, settings: DemoSettings, *,
                   on_panel: Callable[[PanelResult], None] | None = None) -> list[PanelResult]:
    """Render every panel with ``renderer`` (local engine or the service), in order."""
    results = []
    for panel in panels:
        result = renderer(panel, settings)
        results.append(result)
        if on_panel is not None:
            on_panel(result)
    return results


def images_to_pngs(images) -> list[bytes]:
    """(B, 3, H, W) float tensor in [0, 1] -> one PNG per image."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    pngs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs


def local_renderer(model, *, device: str | None = None) -> Renderer:
    """Render panels in this process with :func:`featureviz.engine.render` on ``model`` (an ImportedModel)."""
    from featureviz.engine import RenderSpec, render

    def run(panel: Panel, settings: DemoSettings) -> PanelResult:
        spec = RenderSpec(objective=panel.objective, steps=settings.steps, lr=settings.lr, size=settings.size,
                          batch=panel.batch, seed=settings.seed, param=settings.param,
                          transforms=settings.transforms, device=device)
        result = render(model, spec)
        return PanelResult(panel=panel, pngs=images_to_pngs(result.images),
                           objective_start=[float(v) for v in result.objective_start],
                           objective_end=[float(v) for v in result.objective_end],
                           seconds=result.seconds_per_step * result.steps_done)

    return run

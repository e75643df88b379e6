"""The demo's static site: the PNG files, ``index.html`` with every image, its objective and values, and
``gallery.json``."""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os
import pathlib
from typing import Sequence

from featureviz.demo.plan import DemoSettings
from featureviz.demo.plan import PanelResult


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
figure.with-examples { grid-column: span 2; display: grid; grid-template-columns: 1fr 1fr; }
figure.with-examples > img { grid-row: 1; }
figure.with-examples > figcaption { grid-column: 1 / span 2; }
.examples { grid-row: 1; padding: 8px; display: flex; flex-direction: column; gap: 4px; font-size: 12.5px;
            color: var(--muted); border-left: 1px solid var(--line); }
.crops { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.crops img { display: block; width: 100%; aspect-ratio: 1; object-fit: contain; background: #eceef1; border-radius: 3px; }
.ratio { color: var(--fg); font-weight: 600; font-variant-numeric: tabular-nums; }
table.sources { border-collapse: collapse; background: #fff; border: 1px solid var(--line); font-size: 13.5px; }
table.sources td, table.sources th { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; }
@media (max-width: 560px) { figure.with-examples { grid-column: span 1; } }
"""


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.4g}"


def _examples_block(examples, render_value: float, crops: Sequence[str]) -> str:
    """The crops of a channel's top images beside its render, and the render / best image ratio."""
    esc = html.escape
    ratio = examples.ratio(render_value)
    ratio_text = (f"{ratio:.2f}x" if ratio is not None else "n/a (no image activates it)")
    images = "".join(
        f'<img src="{esc(src)}" alt="{esc(f"example {rank + 1}: {example.name}")}" '
        f'title="{esc(f"{example.name}: channel mean {_fmt(example.value)}")}" loading="lazy">'
        for rank, (example, src) in enumerate(zip(examples.examples, crops)))
    return (f'<div class="examples"><span>top {len(crops)} of {examples.images} images by channel mean; crops: '
            f'{esc(examples.field)}</span><div class="crops">{images}</div>'
            f'<span>render / best image: <span class="ratio">{esc(ratio_text)}</span></span>'
            f'<span>best image: {esc(examples.best_mean_name)}, {_fmt(examples.best_mean)}</span></div>')


def _figure(result: PanelResult, i: int, src: str, crops: Sequence[str] | None = None) -> str:
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
    examples = result.examples[i] if result.examples else None
    if examples is not None and crops is not None:
        block = _examples_block(examples, result.objective_end[i], crops)
        return (f'<figure class="with-examples"><img src="{esc(src)}" alt="{alt}" loading="lazy">{block}'
                f"<figcaption>{caption}</figcaption></figure>")
    return f'<figure><img src="{esc(src)}" alt="{alt}" loading="lazy"><figcaption>{caption}</figcaption></figure>'


def _dataset_section(dataset: dict) -> str:
    """Where the dataset examples come from: the set, how it was indexed, each photo's credit and licence."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(str(p['title']))}</td><td><code>{esc(str(p['photo']))}</code></td>"
                   f"<td>{esc(str(p['credit']))}</td><td>{esc(str(p['licence']))}</td></tr>"
                   for p in dataset.get("photos", []))
    return (f'<section id="dataset"><h2>Dataset examples</h2><p class="note">{esc(str(dataset.get("note", "")))}</p>'
            '<table class="sources"><tr><th>photo</th><th>from</th><th>credit</th><th>licence</th></tr>'
            f"{rows}</table></section>")


def write_site(out_dir: str | os.PathLike, results: Sequence[PanelResult], settings: DemoSettings, *,
               model: dict, extra: dict | None = None, dataset: dict | None = None) -> pathlib.Path:
    """Write ``<panel>-<i>.png`` for every image, an ``index.html`` showing them and ``gallery.json`` with the
    same figures for programs; returns the page's path.

    ``model`` describes the model (``name``, ``sha256``, ``input`` ...), ``extra`` adds rows to the settings
    table (server address, device, wall time ...). A channel render whose result has examples
    (``PanelResult.examples``) shows its unit's top dataset images beside it (``<panel>-<i>-ex<rank>.png``) with
    the render / best image ratio; ``dataset`` (``note``, ``photos``: title, photo, credit, licence) adds a
    section saying where those images come from.
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
            examples = result.examples[i] if result.examples else None
            crops = None
            if examples is not None:
                crops = []
                for rank, example in enumerate(examples.examples):
                    crops.append(f"{panel.key}-{i}-ex{rank}.png")
                    (out / crops[-1]).write_bytes(example.png)
            figures.append(_figure(result, i, name, crops))
            record = {"file": name, "panel": panel.key, "label": panel.labels[i], "objective": panel.objectives[i],
                      "objective_start": result.objective_start[i], "objective_end": result.objective_end[i]}
            if panel.classes[i] is not None:
                record["target_class"] = panel.classes[i]
                if result.predictions is not None:
                    k, name_k, p = result.predictions[i]
                    record["predicted"] = {"class": k, "name": name_k, "probability": p}
            if examples is not None:
                record["examples"] = {
                    "layer": examples.layer, "channel": examples.channel, "field": examples.field,
                    "images": examples.images, "best_mean": examples.best_mean,
                    "best_mean_image": examples.best_mean_name,
                    "ratio": examples.ratio(result.objective_end[i]),
                    "top": [e.record(f) for e, f in zip(examples.examples, crops)]}
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
featureviz. Values are the objective at the first and the last step. Beside a channel's render, when the demo indexed
its image set: the real images that excite the channel most, and the render's value over the best image's.</p>
<table class="settings">{table}</table>
</header>
<main>
{"".join(sections)}
{_dataset_section(dataset) if dataset else ""}
</main>
<footer>Generated by <code>featureviz demo</code> on {when}.
Method: Olah, Mordvintsev and Schubert, <em>Feature Visualization</em>, Distill 2017.</footer>
</body>
</html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    summary = {"model": model, "settings": dataclasses.asdict(settings), **(extra or {}), "images": records}
    if dataset:
        summary["dataset"] = dataset
    (out / "gallery.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return index

"""An atlas as a static site (``featureviz atlas export ATLAS --out DIR``; the local ``featureviz atlas MODEL --out
DIR`` writes one too): the explorer's own atlas pages (``featureviz/web/static/js/atlas-pages.js``, the same file
the live explorer runs) with a static source, the manifest ``atlas.json`` and the same data as ``atlas.js`` (a
classic script that sets ``window.FEATUREVIZ_ATLAS_SITE``: fetch() of a JSON file fails from file://), and the
images. It opens from file:// or any static host; every URL in it is relative and inside DIR.

Every name written comes from our own ids: ``units/<index>.png``, ``units/<index>-negative.png``,
``units/<index>-diversity-<k>.png``, ``units/<index>-top-<rank>.png`` / ``-bottom-<rank>.png`` (the dataset
examples' receptive-field crops). Layer names (hostile: they come from the model) are data in the manifest only,
written JSON-escaped (ASCII), and the pages put them into text nodes.

A DIR that is not empty and holds no ``atlas.json`` is refused; an earlier export is updated in place (its unit
images that the new one does not write are removed)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path

__all__ = ["MANIFEST", "SCRIPT", "check_out", "export_site", "write_shell"]

MANIFEST = "atlas.json"
SCRIPT = "atlas.js"
EXAMPLES = 6  # dataset examples per unit, top and bottom each
_OURS = re.compile(r"\d{1,9}(-negative|-diversity-\d{1,4}|-(top|bottom)-\d{1,4})?\.png")
_STATIC = ("style.css", "favicon.svg", "js/atlas-pages.js")

_INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>featureviz atlas</title>
  <link rel="icon" href="static/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="static/style.css">
  <script src="atlas.js"></script>
  <script src="static/js/atlas-pages.js"></script>
</head>
<body>
  <header class="topbar">
    <a class="brand" href="#"><img src="static/favicon.svg" alt="" width="22" height="22">
      featureviz <span>atlas</span></a>
  </header>
  <main id="view" aria-live="polite"></main>
</body>
</html>
"""


def check_out(out: Path) -> None:
    """Refuse (one line naming DIR) a path that is a file, or a non-empty folder that is not an earlier export."""
    from featureviz.errors import InvalidSpec

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise InvalidSpec("--out", f"{str(out)[:200]!r} is not empty and holds no earlier atlas export "
                                   f"({MANIFEST}); give a new or empty folder")


def _static_root() -> Path:
    import featureviz.web

    return Path(featureviz.web.__file__).parent / "static"


def export_site(fv, job_id: str, out: Path, log=lambda text: None) -> dict:
    """Write the site of atlas ``job_id`` (read through the client ``fv``) into ``out``; returns the manifest."""
    from featureviz.client import FeaturevizClientError
    from featureviz.client import pb
    from featureviz.errors import InvalidSpec
    from featureviz.web.payloads import CROP_SIDE
    from featureviz.web.payloads import atlas_options_json
    from featureviz.web.payloads import atlas_progress_json
    from featureviz.web.payloads import atlas_unit_cli
    from featureviz.web.payloads import atlas_unit_json

    check_out(out)
    job = fv.job(job_id)
    if not job.spec.HasField("atlas"):
        raise InvalidSpec("ATLAS", f"job {job.id} is not an atlas")
    spec = job.spec
    sha = spec.model.removeprefix("models/")
    try:
        model_name = fv.model(sha).display_name
    except FeaturevizClientError:
        model_name = ""
    model_file = Path(model_name).name if model_name.lower().endswith(".onnx") else f"{sha[:12]}.onnx"
    options = atlas_options_json(spec)
    dataset = spec.atlas.dataset
    units_dir = out / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()

    def write(name: str, data: bytes) -> str:
        (units_dir / name).write_bytes(data)
        written.add(name)
        return f"units/{name}"

    entries = []
    progress = None
    for unit in fv.atlas_units(job.id):
        entry = atlas_unit_json(unit)
        entry.update(seed=options["render"].get("seed", 0), options=options["render"],
                     cli=atlas_unit_cli(spec, unit, model_file=model_file))
        if unit.done:
            i = unit.index
            files = {"render": write(f"{i}.png", fv.atlas_unit_image(job.id, i).png)}
            entry["image"] = files["render"]
            if unit.negative_done:
                files["negative"] = write(f"{i}-negative.png", fv.atlas_unit_image(
                    job.id, i, variant=pb.ATLAS_VARIANT_NEGATIVE).png)
            if unit.diversity_done:
                files["diversity"] = [write(f"{i}-diversity-{k}.png", fv.atlas_unit_image(
                    job.id, i, variant=pb.ATLAS_VARIANT_DIVERSITY, image=k).png) for k in range(unit.diversity_done)]
            entry["files"] = files
            if unit.exemplar_index and dataset:
                entry["exemplars"] = _examples(fv, sha, dataset, unit, write, CROP_SIDE)
        entries.append(entry)
    progress = fv.atlas_progress(job.id)
    for stale in units_dir.iterdir():  # an earlier export's images that this one does not hold
        if stale.name not in written and _OURS.fullmatch(stale.name):
            stale.unlink()
    manifest = {
        "format": "featureviz-atlas/1", "job": job.id, "model": sha, "model_name": model_name,
        "state": pb.JobState.Name(job.state), "dataset": dataset,
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "created": job.create_time.ToJsonString() if job.HasField("create_time") else None,
        "finished": job.end_time.ToJsonString() if job.HasField("end_time") else None,
        "options": options["render"], "selection": options["atlas"],
        "progress": atlas_progress_json(progress),
        "totals": {"units": progress.units, "done": progress.done, "rendered": progress.rendered,
                   "cached": progress.cached, "failed": progress.failed,
                   "device_seconds": progress.device_seconds,
                   "devices": sorted({e["device"] for e in entries if e.get("device")})},
        "units": entries,
    }
    text = json.dumps(manifest, indent=1, ensure_ascii=True, allow_nan=False)
    _write_text(out / MANIFEST, text)
    # a script, not a fetch: file:// pages cannot fetch(); "</" cannot end a script element in a .js file, and
    # ensure_ascii leaves no U+2028/2029 raw
    _write_text(out / SCRIPT, f"window.FEATUREVIZ_ATLAS_SITE = {text};\n")
    write_shell(out)
    log(f"atlas {job.id}: the site is in {out} (open {out / 'index.html'})")
    return manifest


def write_shell(out: Path) -> None:
    """The site's page and the explorer's files it runs (the same atlas-pages.js and style.css as the explorer)."""
    _write_text(out / "index.html", _INDEX_HTML)
    for name in _STATIC:
        target = out / "static" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_static_root() / name, target)


def _examples(fv, model: str, dataset: str, unit, write, side: int) -> dict:
    """The unit's dataset examples, top and bottom, each with its receptive-field crop written beside it."""
    out = {}
    for title, order in (("top", "max"), ("bottom", "min")):
        response = fv.exemplars(model, dataset, unit.layer, unit.channel, order=order, k=EXAMPLES)
        items = []
        for e in response.exemplars:
            box = None
            if e.HasField("image_box") and not e.whole:
                box = [e.image_box.x0, e.image_box.y0, e.image_box.x1, e.image_box.y1]
            png = fv.dataset_image(dataset, e.image, box=box, max_side=side)
            items.append({"rank": e.rank, "name": e.name, "image": e.image, "value": e.value, "box": box,
                          "crop_url": write(f"{unit.index}-{title}-{e.rank}.png", png)})
        out[title] = items
    return out


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)

"""The JSON the explorer's pages read: featureviz.v1 messages -> plain dicts, and the spec to reproduce a job.

Image bytes never travel inside these dicts: a finished image is a relative URL
(``api/jobs/<id>/images/<index>.png``), a streamed preview a small ``data:`` URL. Specs are the engine's
spec dicts (``featureviz.codec.spec_from_proto``, the one proto <-> spec conversion), so what a
page shows, what ``spec.json`` holds and what the CLI takes are the same objects.
"""

from __future__ import annotations

import base64
import json
import math
import shlex

from google.protobuf import json_format

from featureviz.client.exemplars import ORDERS
from featureviz.codec import spec_from_proto
from featureviz.errors import InvalidSpec
from featureviz.options import OPTIONS
from featureviz.options import offered
from featureviz.spec import format_objective
from featureviz.spec import normalize_objective
from featureviz.spec import parse_objective
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["json_text", "finite", "model_json", "layer_json", "dataset_json", "exemplars_json", "job_json",
           "event_json", "spec_json", "objective_text", "image_labels", "objective_summary", "cli_command",
           "state_name", "STATES"]

STATES = {value: name.removeprefix("JOB_STATE_") for name, value in pb.JobState.items()}
_MODEL_STATES = {value: name.removeprefix("MODEL_STATE_") for name, value in pb.ModelState.items()}


def finite(value):
    """``value`` with every non-finite float (NaN, +-Infinity: not JSON) replaced by None, in lists and dicts too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def json_text(value, *, indent: int | None = None) -> str:
    """The one JSON encoder of the explorer's responses and events: strict JSON (RFC 8259), non-finite numbers as
    null, so a stored NaN (a model's preprocessing, a diverged objective) never breaks a page's JSON.parse."""
    return json.dumps(finite(value), allow_nan=False, indent=indent)


def state_name(value: int) -> str:
    return STATES.get(value, "UNSPECIFIED")


def _time(stamp) -> str | None:
    return stamp.ToJsonString() if stamp.seconds or stamp.nanos else None


def model_json(model: pb.Model) -> dict:
    spec = model.input_spec
    pre = spec.preprocess
    return {
        "sha256": model.sha256,
        "name": model.display_name or model.sha256[:12],
        "display_name": model.display_name,
        "size_bytes": model.size_bytes,
        "state": _MODEL_STATES.get(model.state, "UNSPECIFIED"),
        "layer_count": model.layer_count,
        "logits_layer": model.logits_layer,
        "input": {"name": spec.name, "layout": spec.layout, "channels": spec.channels,
                  "height": spec.height or None, "width": spec.width or None,
                  "default_size": [spec.default_height, spec.default_width],
                  "preprocess": {"mean": list(pre.mean), "std": list(pre.std),
                                 "channel_order": pre.channel_order or "RGB"}},
        "check": {"max_rel_err": model.check.max_rel_err, "max_rel_err_batch": model.check.max_rel_err_batch,
                  "tolerance": model.check.tolerance, "passed": model.check.passed},
        "failure": {"reason": model.failure_reason, "message": model.failure_message} if model.failure_reason else None,
        "create_time": _time(model.create_time),
        "deduplicated": model.deduplicated,
    }


def layer_json(layer: pb.Layer) -> dict:
    return {"name": layer.name, "aliases": list(layer.aliases), "op_type": layer.op_type, "shape": list(layer.shape),
            "channels": layer.channels, "spatial": layer.spatial, "depth": layer.depth, "is_logits": layer.is_logits,
            "pre_activation_of": layer.pre_activation_of, "layout": layer.layout}


def dataset_json(dataset: pb.Dataset) -> dict:
    """A set and its upload's report: images, files, skipped per cause (count, up to 10 names, the first problem in
    words), converted kinds (count, names), formats."""
    report = dataset.report
    return {
        "id": dataset.id, "name": dataset.display_name or dataset.id[:12], "display_name": dataset.display_name,
        "image_count": dataset.image_count, "size_bytes": dataset.size_bytes,
        "create_time": _time(dataset.create_time), "deduplicated": dataset.deduplicated,
        "report": {"images": report.images, "files": report.files, "skipped": report.skipped,
                   "skipped_by_cause": [{"cause": s.cause, "count": s.count, "names": list(s.names),
                                         "detail": s.detail} for s in report.skipped_by_cause],
                   "converted": [{"kind": c.kind, "count": c.count, "names": list(c.names)} for c in report.converted],
                   "formats": dict(sorted(report.formats.items()))},
    }


_ORDERS = {value: name for name, value in ORDERS.items()}  # the client's names of ExemplarOrder (unset: max)
CROP_SIDE = 160  # a crop's PNG side at most (the page shows them small)
WHOLE_SIDE = 640  # the whole image's, when a crop is clicked


def _box(box: pb.CropBox) -> list[int]:
    return [box.x0, box.y0, box.x1, box.y1]


def exemplars_json(response: pb.GetExemplarsResponse, dataset: str) -> dict:
    """GetExemplars -> the page's examples: each with its crop's URL (the receptive field in the file's pixels, or
    the whole image for a unit that sees all of it), its whole image's URL and its box as fractions of the image
    (the index stretched every image to ``size``, so the box in model pixels over the size is where it lies)."""
    height, width = response.size.height or 1, response.size.width or 1
    base = f"api/datasets/{dataset}/images"
    out = []
    for e in response.exemplars:
        crop = e.HasField("image_box") and not e.whole
        item = {"rank": e.rank, "image": e.image, "name": e.name, "value": e.value,
                "x": e.x if e.HasField("x") else None, "y": e.y if e.HasField("y") else None,
                "box": _box(e.box) if e.HasField("box") else None,
                "image_box": _box(e.image_box) if e.HasField("image_box") else None, "whole": e.whole,
                "image_url": f"{base}/{e.image}.png?max_side={WHOLE_SIDE}",
                "crop_url": f"{base}/{e.image}.png?max_side={CROP_SIDE}"
                            + (f"&box={','.join(str(v) for v in _box(e.image_box))}" if crop else "")}
        if e.HasField("box") and not e.whole:
            item["fraction"] = [e.box.x0 / width, e.box.y0 / height, e.box.x1 / width, e.box.y1 / height]
        out.append(item)
    return {"layer": response.layer, "channel": response.channel, "order": _ORDERS.get(response.order, "max"),
            "index": response.index, "size": [response.size.height, response.size.width], "images": response.images,
            "p50": response.p50, "p99": response.p99, "max": response.max, "field_size": response.field_size,
            "field_stride": response.field_stride, "whole": response.whole, "exemplars": out}


def spec_json(spec: pb.JobSpec) -> dict:
    """A job's spec as the engine's keyword arguments (``RenderSpec``), plus the model's sha256."""
    out = {"model": spec.model.removeprefix("models/")}
    if spec.HasField("exemplar_index"):  # an index job: no objective, no render options
        out["exemplar_index"] = json_format.MessageToDict(spec.exemplar_index, preserving_proto_field_name=True)
        if spec.HasField("size"):
            out["size"] = [spec.size.height, spec.size.width]
        out["objective"] = None
        return out
    listed = spec.objective.WhichOneof("kind") is None  # ListJobs leaves the objective out (objective_text has it)
    if listed:
        whole, spec = spec, pb.JobSpec()
        spec.CopyFrom(whole)
        spec.objective.tv.SetInParent()  # a stand-in, so the one conversion reads the other fields
    try:
        out.update(spec_from_proto(spec))
    except InvalidSpec:  # a stored job's spec was admitted, so this is an older or foreign spec: show what is there
        out["objective"] = None
    if listed:
        out["objective"] = None
    if "size" in out:
        out["size"] = list(out["size"])
    if "init_image" in out:
        out["init_image"] = f"<{len(out['init_image'])} bytes of PNG/JPEG, not included>"
    for option in OPTIONS:  # the job's own options (previews, running alone), when set
        if not option.engine and option.type in ("int", "bool") and getattr(spec, option.name):
            out[option.name] = getattr(spec, option.name)
    return out


def objective_text(objective: dict | None) -> str:
    """The command-line text of an objective when the text syntax says the same, else its JSON."""
    if objective is None:
        return ""
    try:
        text = format_objective(objective)
        if "{" not in text and parse_objective(text) == normalize_objective(objective):  # no half-JSON texts
            return text
    except (InvalidSpec, KeyError, TypeError, ValueError):
        pass
    return json.dumps(objective, separators=(",", ":"))


def image_labels(objective: dict | None, batch: int) -> list[str]:
    """What each image of a batch shows: the text of its own objective for a sum of per-image (``batch``) terms,
    else ``image i`` (or the objective's text for a single image)."""
    per_image = _per_image(objective)
    if per_image is not None and len(per_image) == batch:
        return [objective_text(term) for term in per_image]
    if batch == 1:
        return [objective_text(objective)]
    return [f"image {i}" for i in range(batch)]


def objective_summary(objective: dict | None) -> str:
    """One short line: ``LAYER channels 0-7, one per image`` for a layer page's batch, the per-image objectives
    joined for other per-image sums, else the objective's text."""
    per_image = _per_image(objective)
    if per_image is None:
        return objective_text(objective)
    channels = [term.get("channel") for term in per_image]
    if all(channels) and len({c["layer"] for c in channels}) == 1:
        numbers = [c["channel"] for c in channels]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))) and len(numbers) > 1:
            return f"{channels[0]['layer']} channels {numbers[0]}–{numbers[-1]}, one per image"
    return " | ".join(objective_text(term) for term in per_image)


def _per_image(objective: dict | None) -> list[dict] | None:
    """The per-image objectives of ``{"sum": [{"batch": {"index": i, "objective": ...}}, ...]}`` with indices
    0..n-1 in order, else None."""
    if not objective or "sum" not in objective:
        return None
    terms = objective["sum"]
    if not all(isinstance(t, dict) and "batch" in t for t in terms):
        return None
    if [t["batch"].get("index") for t in terms] != list(range(len(terms))):
        return None
    return [t["batch"]["objective"] for t in terms]


def _rendered(image: pb.RenderedImage, url: str | None) -> dict:
    out = {"index": image.index, "width": image.width, "height": image.height,
           "objective_start": image.objective_start, "objective_end": image.objective_end}
    if url is not None:
        out["url"] = url
    else:
        out["src"] = "data:image/png;base64," + base64.b64encode(image.png).decode("ascii")
    return out


def job_json(job: pb.Job) -> dict:
    spec = spec_json(job.spec)
    out = {
        "id": job.id, "state": state_name(job.state), "step": job.step, "steps": job.steps,
        "objective": list(job.objective), "queue_position": job.queue_position, "attempts": job.attempts,
        "last_seq": job.last_seq, "create_time": _time(job.create_time), "start_time": _time(job.start_time),
        "end_time": _time(job.end_time), "spec": spec, "objective_text": objective_text(spec.get("objective")),
        "summary": objective_summary(spec.get("objective")),
        "image_labels": image_labels(spec.get("objective"), spec.get("batch") or 1),
    }
    if spec.get("objective") is None:  # ListJobs: the server sends the objective as capped text only
        out["objective_text"] = out["summary"] = job.objective_text
    if job.HasField("result"):
        result = job.result
        out["result"] = {
            "steps_done": result.steps_done, "seconds_per_step": result.seconds_per_step,
            "objective_description": result.objective_description,
            "images": [_rendered(image, f"api/jobs/{job.id}/images/{image.index}.png")
                       for image in sorted(result.images, key=lambda i: i.index)],
        }
        if result.HasField("exemplar_index"):
            out["result"]["exemplar_index"] = json_format.MessageToDict(result.exemplar_index,
                                                                        preserving_proto_field_name=True)
    if job.error.code:
        out["error"] = {"code": job.error.code, "reason": job.error.reason, "message": job.error.message,
                        "field": job.error.field}
    return out


def event_json(event: pb.JobEvent) -> tuple[str, dict]:
    """A JobEvent -> (SSE event name, data). Names: snapshot, state, progress, preview, heartbeat, result."""
    kind = event.WhichOneof("event") or "heartbeat"
    if kind in ("snapshot", "result"):
        return kind, job_json(getattr(event, kind))
    if kind == "state":
        return kind, {"state": state_name(event.state)}
    if kind == "progress":
        p = event.progress
        return kind, {"step": p.step, "steps": p.steps, "objective": list(p.objective),
                      "seconds_per_step": p.seconds_per_step}
    if kind == "preview":
        return kind, {"step": event.preview.step,
                      "images": [_rendered(image, None) for image in event.preview.images]}
    return "heartbeat", {}


def cli_command(spec: dict, *, model_file: str, server: str | None = None, tls: bool = False,
                out: str = "featureviz.png") -> str:
    """The ``featureviz render`` command line that runs ``spec`` (a :func:`spec_json` dict) again: with
    ``server`` on that server, else locally; the same seed gives the same images on the same device."""
    args = ["featureviz", "render", model_file, objective_text(spec.get("objective"))]
    for option in offered("render"):  # every option the command line takes as a flag of its own (the declaration)
        value = spec.get(option.name)
        if value is None or value is False or option.type not in ("int", "float", "bool", "choice", "size", "dataset"):
            continue
        if option.type == "dataset" and not server:  # a server's dataset (--prior): no local equivalent by id
            continue
        if option.type == "bool":
            args.append(option.flag)
        elif option.type == "size":
            height, width = (value, value) if isinstance(value, int) else value
            args += [option.flag, str(height) if height == width else f"{height}x{width}"]
        else:
            args += [option.flag, repr(value) if isinstance(value, float) else str(value)]
    pre = spec.get("preprocess")
    if pre:  # the preprocessing the job ran with (the model's, recorded on the job): the CLI defaults to ImageNet's
        args += ["--mean", ",".join(repr(float(v)) for v in pre["mean"]),
                 "--std", ",".join(repr(float(v)) for v in pre["std"])]
        if pre.get("channel_order") == "BGR":
            args.append("--bgr")
    if spec.get("init_image"):
        args += ["--init", "INIT.png"]
    generator = spec.get("generator")
    if generator:  # --- generator (issue 25): the generator's file, as the model's, is the user's to name
        args += ["--generator", "GENERATOR.onnx"]
        if isinstance(generator, dict) and generator.get("latent_l2"):
            args += ["--latent-l2", repr(float(generator["latent_l2"]))]
    if spec.get("batch", 1) > 1:
        args.append("--grid")
    args += ["--out", out]
    if server:
        args += ["--server", server]
        if tls:
            args += ["--tls-ca", "CA.pem"]
    return shlex.join(args)


# ------------------------------------------------------------------------------------------------- atlases
# The atlas pages (static/js/atlas-pages.js) read these dicts from the gateway (api/atlases/...) and from an
# exported site's manifest (featureviz atlas export): one shape, so both show the same pages. Image paths are
# relative and built from our own ids (job id, unit index); a layer name is data only.

ATLAS_VARIANTS = {"render": pb.ATLAS_VARIANT_RENDER, "negative": pb.ATLAS_VARIANT_NEGATIVE,
                  "diversity": pb.ATLAS_VARIANT_DIVERSITY}
_JOIN = ("exemplar_index", "dataset_p50", "dataset_p99", "dataset_max", "render_score", "activation_ratio",
         "selectivity", "dead", "negative_done", "diversity_done")


def atlas_unit_json(unit: pb.AtlasUnit) -> dict:
    """One unit: where it sits (layer, channel, index), its key (the permalink), its render's record and the
    dataset join's scores (zero / empty until joined)."""
    out = {"index": unit.index, "layer": unit.layer, "channel": unit.channel, "key": unit.key, "done": unit.done,
           "cached": unit.cached, "objective": unit.objective, "device_seconds": unit.device_seconds,
           "device": unit.device, "width": unit.width, "height": unit.height}
    out.update({name: getattr(unit, name) for name in _JOIN})
    return finite(out)


def atlas_progress_json(progress: pb.AtlasResult) -> dict:
    """Progress per layer and in total, the measured rate and the ETA."""
    return finite({"units": progress.units, "done": progress.done, "rendered": progress.rendered,
                   "cached": progress.cached, "failed": progress.failed, "device_seconds": progress.device_seconds,
                   "units_per_hour": progress.units_per_hour, "eta_seconds": progress.eta_seconds,
                   "layers": [{"layer": layer.layer, "depth": layer.depth, "units": layer.units, "done": layer.done}
                              for layer in progress.layers]})


def atlas_options_json(spec: pb.JobSpec) -> dict:
    """An atlas job's selection and render options (the server wrote the atlas defaults into its spec)."""
    atlas = json_format.MessageToDict(spec.atlas, preserving_proto_field_name=True)
    render = unit_spec(spec, "LAYER", 0)
    render.pop("objective", None)
    render.pop("model", None)
    return finite({"atlas": atlas, "render": render})


def unit_spec(spec: pb.JobSpec, layer: str, channel: int) -> dict:
    """The spec of one unit of an atlas job as a batch-1 channel render (:func:`spec_json`'s shape)."""
    single = pb.JobSpec()
    single.CopyFrom(spec)
    single.ClearField("atlas")
    single.objective.channel.layer = layer
    single.objective.channel.channel = channel
    return spec_json(single)


def atlas_unit_cli(spec: pb.JobSpec, unit: pb.AtlasUnit, *, model_file: str, server: str | None = None,
                   tls: bool = False) -> str:
    """The ``featureviz render`` command that renders this unit again (the same key: the same image)."""
    return cli_command(unit_spec(spec, unit.layer, unit.channel), model_file=model_file, server=server, tls=tls,
                       out=f"unit-{unit.index}.png")

"""JobSpec <-> engine: the one conversion of a job's spec into a RenderSpec (init image decoded, Preprocess built),
and of a render's images into PNG messages."""

from __future__ import annotations

from featureviz.client.convert import spec_from_proto
from featureviz.errors import InvalidSpec
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["render_spec", "rendered", "job_result", "DEFAULT_PREVIEW_SIDE"]

DEFAULT_PREVIEW_SIDE = 128


def render_spec(model, spec: pb.JobSpec, device: str | None, *, max_image_side: int = 4096):
    """pb.JobSpec -> the engine's RenderSpec, validated against ``model`` (InvalidSpec with engine paths)."""
    from featureviz.engine import RenderSpec
    from featureviz.engine import validate
    from featureviz.engine.images import decode_image
    from featureviz.importer import Preprocess

    kwargs = spec_from_proto(spec)
    kwargs.pop("exclusive", None)
    if "init_image" in kwargs:
        size = kwargs.get("size") or tuple(model.input_spec.default_size)
        kwargs["init_image"] = decode_image(kwargs["init_image"], size, field="spec.init_image",
                                            max_side=max_image_side)
    if "preprocess" in kwargs:
        p = kwargs["preprocess"]
        try:
            kwargs["preprocess"] = Preprocess(mean=tuple(p["mean"]), std=tuple(p["std"]),
                                              channel_order=p["channel_order"])
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec.preprocess", str(exc)) from exc
    result = RenderSpec(**kwargs, device=device)
    if spec.preview_every > 0:
        result.snapshot_steps = tuple(range(spec.preview_every, result.steps + 1, spec.preview_every))
    validate(model, result)
    return result


def rendered(index: int, image, *, max_side: int | None = None, start: float = 0.0,
             end: float = 0.0) -> pb.RenderedImage:
    """(3, H, W) float tensor in [0, 1] -> a RenderedImage with PNG bytes (downscaled to ``max_side``)."""
    from featureviz.engine.images import png_bytes

    png = png_bytes(image, max_side=max_side)
    height, width = image.shape[-2:]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        width, height = _png_size(png, width, height)
    return pb.RenderedImage(index=index, png=png, width=int(width), height=int(height), objective_start=start,
                            objective_end=end)


def _png_size(png: bytes, width: int, height: int) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR), the truth after a downscale."""
    if len(png) >= 24 and png[12:16] == b"IHDR":
        return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return width, height


def job_result(result: dict) -> pb.JobResult:
    """A render's result (BatchEngine.finish's dict) -> JobResult with PNG bytes."""
    images = [rendered(i, image, start=float(result["objective_start"][i]), end=float(result["objective_end"][i]))
              for i, image in enumerate(result["images"])]
    out = pb.JobResult(images=images, steps_done=int(result["steps_done"]),
                       seconds_per_step=float(result["seconds_per_step"]),
                       objective_description=str(result.get("objective", "") or ""))
    for key, value in (result.get("phase_seconds") or {}).items():
        out.phase_seconds[key] = float(value)
    return out

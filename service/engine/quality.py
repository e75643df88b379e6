"""Quality figures of rendered images: colour and spectrum statistics, and a judge model's verdict on class images.

- :func:`image_statistics`: per image, the mean value, the contrast (standard deviation of the luminance), the
  saturation (mean HSV saturation), the spectrum slope (log-log slope of the radially averaged power spectrum of
  the luminance; natural photographs are near -2, flat noise 0) and the high-frequency share (the part of the
  power above a quarter cycle per pixel: adversarial-looking texture raises it).
- Transferability (Fel et al. 2023, MaCo): a class visualization is good when *another* classifier, trained
  independently, also sees the class in it. :func:`class_targets` reads the class each image of an objective
  aims at; :func:`judge_images` runs a judge model (an :class:`~featureviz.importer.ImportedModel` with logits)
  on the images and reports the rank (1 = the judge's top class) and the probability of that class.

Torch only: no onnx, no importer code.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

import torch
import torch.nn.functional as F

from featureviz.engine import objectives as objs
from featureviz.errors import InvalidSpec

__all__ = ["STATISTICS", "image_statistics", "class_targets", "JudgeScore", "judge_images", "summarize_scores",
           "evaluate_classes"]

STATISTICS = ("mean", "contrast", "saturation", "spectrum_slope", "high_freq")
LUMA = (0.299, 0.587, 0.114)
HIGH_FREQ = 0.25  # cycles per pixel: the upper half of the band up to Nyquist (0.5)
_SLOPE_BANDS = 12


@torch.no_grad()
def image_statistics(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-image statistics of ``images`` (B, 3, H, W) in [0, 1]: :data:`STATISTICS` -> list of B floats."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    luma = torch.einsum("c,bchw->bhw", torch.tensor(LUMA), images)
    high, low = images.amax(1), images.amin(1)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-6), torch.zeros_like(high)).mean((1, 2))
    # power spectrum of the windowed luminance (the window keeps the image border from adding a cross of power)
    window = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    centred = (luma - luma.mean((1, 2), keepdim=True)) * window
    power = torch.fft.fft2(centred).abs().square()
    f = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2)
    lowest = 2.0 / min(h, w)
    edges = torch.logspace(math.log10(lowest), math.log10(0.5), _SLOPE_BANDS + 1)
    centres, masks = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (f >= lo) & (f < hi)
        if mask.any():
            centres.append(math.log(math.sqrt(lo * hi)))
            masks.append(mask)
    x = torch.tensor(centres, dtype=torch.float64)
    slopes, shares = [], []
    for i in range(b):
        y = torch.stack([power[i][m].mean() for m in masks]).double().clamp_min(1e-30).log()
        xc = x - x.mean()
        slopes.append(float((xc * (y - y.mean())).sum() / xc.square().sum()) if len(x) > 1 else float("nan"))
        total = power[i][f > 0].sum()
        shares.append(float(power[i][f > HIGH_FREQ].sum() / total) if total > 0 else 0.0)
    return {
        "mean": images.mean((1, 2, 3)).tolist(),
        "contrast": luma.std((1, 2)).tolist(),
        "saturation": saturation.tolist(),
        "spectrum_slope": slopes,
        "high_freq": shares,
    }


def class_targets(objective, batch: int) -> list[int | None]:
    """The class each image of a render aims at: image i's target is k when the objective raises the logit or
    probability of class k, and of no other class, for image i (``logit:K``, ``prob:K``, per-image terms,
    weighted sums); None when it aims at none or at several (an interpolation between classes)."""
    objective = objs.build(objective)
    found: list[dict[int, float]] = [{} for _ in range(batch)]
    stack = [(objective, 1.0, None)]  # node, weight, image it is restricted to (None: all)
    while stack:
        node, weight, image = stack.pop()
        if isinstance(node, (objs.Logit, objs.Prob)):
            for i in (range(batch) if image is None else [image]):
                found[i][node.index] = found[i].get(node.index, 0.0) + weight
        elif isinstance(node, objs.Sum):
            stack.extend((term, weight, image) for term in node.terms)
        elif isinstance(node, objs.Scale):
            stack.append((node.objective, weight * node.factor, image))
        elif isinstance(node, objs.Batch):
            if image is None or image == node.index:
                stack.append((node.objective, weight, node.index))
        elif isinstance(node, objs.Interpolate):  # image i: (1 - t_i) a + t_i b
            for i in (range(batch) if image is None else [image]):
                t = i / max(batch - 1, 1)
                stack.extend([(node.a, weight * (1 - t), i), (node.b, weight * t, i)])
    targets = []
    for weights in found:
        raised = [k for k, v in weights.items() if v > 0]
        targets.append(raised[0] if len(raised) == 1 else None)
    return targets


@dataclass
class JudgeScore:
    """The judge's verdict on one image: ``rank`` of ``target`` among its classes (1 = its top class) and its
    ``probability``; ``top``: the judge's best classes as (class, probability), best first."""

    target: int | None
    rank: int | None
    probability: float | None
    top: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["top"] = [[k, p] for k, p in self.top]
        return out


@torch.no_grad()
def judge_images(judge, images: torch.Tensor, targets: list[int | None], *, preprocess=None, device=None,
                 top: int = 5) -> list[JudgeScore]:
    """Run ``judge`` (an ImportedModel with logits) on ``images`` (B, 3, H, W) in [0, 1] and score ``targets``.

    Each image is resized to the judge's input size (bilinear with antialiasing; the judge's default size when
    its input size is dynamic) and preprocessed with ``preprocess`` (default: the judge's own).
    """
    if not getattr(judge, "logits", None):
        raise InvalidSpec("judge", "the judge model has no logits output: it must be a classifier")
    n_classes = judge.layer(judge.logits).channels
    for i, target in enumerate(targets):
        if target is not None and not 0 <= target < n_classes:
            raise InvalidSpec("judge", f"image {i} aims at class {target}, but the judge has {n_classes} classes "
                                       f"(0..{n_classes - 1})")
    from featureviz.engine.transforms import preprocess_map

    device = torch.device(device or "cpu")
    spec = judge.input_spec
    height, width = spec.height or spec.default_size[0], spec.width or spec.default_size[1]
    x = images.detach().float().to(device).clamp(0, 1)
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    matrix, bias = preprocess_map(preprocess or spec.preprocess, spec.channels, device=device)
    x = torch.einsum("oc,bchw->bohw", matrix, x) + bias.view(1, -1, 1, 1)
    module = judge.truncate([judge.logits]).to(device)
    logits = module(x)[judge.logits].float().reshape(x.shape[0], -1)
    probs = logits.softmax(-1).cpu()
    best_p, best_k = probs.topk(min(top, probs.shape[1]), dim=1)
    scores = []
    for i, target in enumerate(targets):
        best = [(int(k), float(p)) for k, p in zip(best_k[i], best_p[i])]
        if target is None:
            scores.append(JudgeScore(None, None, None, best))
            continue
        p = probs[i, target]
        rank = int((probs[i] > p).sum()) + 1
        scores.append(JudgeScore(int(target), rank, float(p), best))
    return scores


def summarize_scores(scores: list[JudgeScore]) -> dict:
    """``{"images", "top1", "top5", "mean_probability", "median_rank"}`` over the scores with a target."""
    ranked = [s for s in scores if s.rank is not None]
    if not ranked:
        return {"images": 0, "top1": 0, "top5": 0, "mean_probability": None, "median_rank": None}
    ranks = sorted(s.rank for s in ranked)
    mid = len(ranks) // 2
    median = ranks[mid] if len(ranks) % 2 else (ranks[mid - 1] + ranks[mid]) / 2
    return {"images": len(ranked), "top1": sum(r == 1 for r in ranks), "top5": sum(r <= 5 for r in ranks),
            "mean_probability": sum(s.probability for s in ranked) / len(ranked), "median_rank": median}


def evaluate_classes(model, judges: dict, classes: list[int], seeds: list[int], *, objective: str = "logit",
                     steps: int = 512, size=None, batch: int = 8, progress=None, **render_options) -> dict:
    """Render the class visualization of each of ``classes`` for each of ``seeds`` on ``model`` and judge them.

    ``judges``: ``{name: ImportedModel}`` classifiers with the same classes (each with its own preprocessing).
    Classes are rendered ``batch`` at a time (image i of a render maximises its own class; transforms are drawn per
    image). ``render_options`` go to :class:`~featureviz.engine.RenderSpec` (lr, param, decay, device, ...).
    ``progress(done, total)`` after each render. Returns ``{"records": [per image: class, seed, activation (the
    final logit or probability on ``model``), judges {name: score}, statistics], "summary": {"judges": {name:
    top-1/top-5 counts...}, "statistics": means, "activation": mean}, "seconds", "images": (N, 3, H, W)}``.
    """
    import time

    from featureviz.engine.render import RenderSpec
    from featureviz.engine.render import render

    if objective not in ("logit", "prob"):
        raise InvalidSpec("objective", f"must be 'logit' or 'prob', got {objective!r}")
    if not classes or not seeds:
        raise InvalidSpec("classes", "give at least one class and one seed")
    began = time.perf_counter()
    chunks = [classes[i:i + batch] for i in range(0, len(classes), max(1, batch))]
    images, records = [], []
    total, done = len(classes) * len(seeds), 0
    for seed in seeds:
        for chunk in chunks:
            terms = [{"batch": {"index": i, "objective": {objective: {"index": k}}}} for i, k in enumerate(chunk)]
            spec = RenderSpec({"sum": terms} if len(terms) > 1 else {objective: {"index": chunk[0]}}, steps=steps,
                              size=size, batch=len(chunk), seed=seed, **render_options)
            result = render(model, spec)
            images.append(result.images)
            records.extend({"class": k, "seed": seed, "activation": float(result.objective_end[i])}
                           for i, k in enumerate(chunk))
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    images = torch.cat(images)
    targets = [r["class"] for r in records]
    summary = {"judges": {}}
    for name, judge in judges.items():
        scores = judge_images(judge, images, targets, device=render_options.get("device"))
        for record, score in zip(records, scores):
            record.setdefault("judges", {})[name] = score.to_dict()
        summary["judges"][name] = summarize_scores(scores)
    stats = image_statistics(images)
    for i, record in enumerate(records):
        record["statistics"] = {k: v[i] for k, v in stats.items()}
    summary["statistics"] = {k: sum(v) / len(v) for k, v in stats.items()}
    summary["activation"] = sum(r["activation"] for r in records) / len(records)
    return {"records": records, "summary": summary, "seconds": time.perf_counter() - began, "images": images,
            "steps": steps, "classes": list(classes), "seeds": list(seeds), "objective": objective}

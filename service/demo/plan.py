"""The demo's gallery plan: which layers, channels and classes of EfficientNet-Lite0 it shows, the render
settings, and rendering the panels with a renderer (the local engine or the service). The package docstring
says why these units."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

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
    units: tuple[tuple[str, int] | None, ...] = ()  # (layer, channel) of each channel render, else None: the
                                                    # units whose dataset examples the site shows beside the render

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
    examples: list | None = None  # per image: its unit's featureviz.demo.examples.ChannelExamples, or None


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
                     objectives=tuple(describe_objective(o) for o in objectives), classes=(None,) * len(channels),
                     units=tuple((layer, c) for c in channels))

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


def local_renderer(model, *, device: str | None = None) -> Renderer:
    """Render panels in this process with :func:`featureviz.engine.render` on ``model`` (an ImportedModel)."""
    from featureviz.engine import RenderSpec, render
    from featureviz.engine.images import png_bytes

    def run(panel: Panel, settings: DemoSettings) -> PanelResult:
        spec = RenderSpec(objective=panel.objective, steps=settings.steps, lr=settings.lr, size=settings.size,
                          batch=panel.batch, seed=settings.seed, param=settings.param,
                          transforms=settings.transforms, device=device)
        result = render(model, spec)
        return PanelResult(panel=panel, pngs=[png_bytes(image) for image in result.images],
                           objective_start=[float(v) for v in result.objective_start],
                           objective_end=[float(v) for v in result.objective_end],
                           seconds=result.seconds_per_step * result.steps_done)

    return run

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

:func:`gallery` (``plan.py``) builds the panels as plain engine specs; a renderer (local engine, or the service through
:class:`featureviz.client.Client`) turns each into PNGs and objective values; :func:`write_site` (``site.py``) writes the
PNG files and an ``index.html`` that shows every image with its objective, start and end values, the model's
prediction for class images, and the settings used.

Dataset examples: ``images.py`` writes real photos bundled in scikit-image's wheel as an image set (torch-free,
deterministic, with each photo's credit and licence); ``examples.py`` gets each channel render's top images from an
index of that set (the server's index job and GetExemplars, or the engine in this process) as crops at the unit's
receptive field, with the render / best image ratio, and the site shows them beside the render.
"""

from __future__ import annotations

from featureviz.demo.plan import DemoSettings
from featureviz.demo.plan import Panel
from featureviz.demo.plan import PanelResult
from featureviz.demo.plan import gallery
from featureviz.demo.plan import describe_objective
from featureviz.demo.plan import render_gallery
from featureviz.demo.plan import local_renderer
from featureviz.demo.plan import Renderer
from featureviz.demo.plan import EARLY_LAYER
from featureviz.demo.plan import LATE_LAYER
from featureviz.demo.plan import EARLY_CHANNELS
from featureviz.demo.plan import LATE_CHANNELS
from featureviz.demo.plan import CLASSES
from featureviz.demo.plan import DIVERSITY_CHANNEL
from featureviz.demo.plan import DIVERSITY_WEIGHT
from featureviz.demo.classify import classify_pngs
from featureviz.demo.site import write_site

__all__ = [
    "DemoSettings",
    "Panel",
    "PanelResult",
    "gallery",
    "describe_objective",
    "render_gallery",
    "local_renderer",
    "Renderer",
    "EARLY_LAYER",
    "LATE_LAYER",
    "EARLY_CHANNELS",
    "LATE_CHANNELS",
    "CLASSES",
    "DIVERSITY_CHANNEL",
    "DIVERSITY_WEIGHT",
    "classify_pngs",
    "write_site",
]

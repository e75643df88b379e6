"""The demo's check of its class images: classified by the original ONNX file on onnxruntime, an independent
runtime."""

from __future__ import annotations

import os
from typing import Sequence


def classify_pngs(onnx_path: str | os.PathLike, pngs: Sequence[bytes], *, mean: Sequence[float],
                  std: Sequence[float], class_names: Sequence[str]) -> list[tuple[int, str, float]]:
    """Top-1 (index, name, probability) of each PNG: resized bilinearly to the model's input, ``(x - mean) /
    std``, run by onnxruntime on ``onnx_path``."""
    import numpy as np
    import onnxruntime

    from featureviz.engine.images import decode_image  # the one image codec

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    h, w = inp.shape[2], inp.shape[3]
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    batch = [(decode_image(png, (h, w), field="image", resample="bilinear").numpy() - mean) / std for png in pngs]
    logits = session.run(None, {inp.name: np.stack(batch)})[0]
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return [(int(k), class_names[int(k)], float(probs[i, k])) for i, k in enumerate(top)]

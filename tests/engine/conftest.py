"""Engine test fixtures: the real trained EfficientNet-Lite0 (featureviz.zoo), imported once per session through
the importer, exactly as a user's upload would be."""

import pytest

# layers of EfficientNet-Lite0 used across the tests (catalog names of the zoo's ONNX export)
MID = "/_blocks.4/_swish/Clip"  # 240 channels, 28 x 28 at 224 (ReLU6 output)
MID_PRE = "/_blocks.4/_expand_conv/Conv"  # its pre-activation (BatchNorm folded into the conv)
EARLY = "/_blocks.2/_swish/Clip"  # 144 channels, 56 x 56 at 224


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with dynamic height and width (same trained weights), so tests can render small images."""
    pytest.importorskip("torch")
    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    path = zoo.efficientnet_lite0(dynamic_size=True)
    return import_model(path, preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))


@pytest.fixture(scope="session")
def classify(lite0):
    """``classify(images (B,3,H,W) in [0,1]) -> (B, 1000) logits`` of the model at the images' own size."""
    import torch

    from featureviz.engine.transforms import Transforms

    full = lite0.truncate([lite0.logits])

    def run(images):
        plain = Transforms((), tuple(images.shape[-2:]), tuple(images.shape[-2:]), lite0.input_spec.preprocess)
        with torch.no_grad():
            return full(plain(images))[lite0.logits]

    return run

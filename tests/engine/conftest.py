"""Engine test fixtures: the real trained EfficientNet-Lite0 (featureviz.zoo), imported once per session through
the importer, exactly as a user's upload would be."""

import pytest


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

"""Class visualizations of the real trained EfficientNet-Lite0 are classified as their class by that model.

One render per objective kind optimises three classes at once: image i maximises class CLASSES[i] (a per-image
``batch`` objective), so the batch costs one run.
"""

import pytest
import torch

from featureviz.engine import RenderSpec
from featureviz.engine import render

CLASSES = (1, 130, 949)  # goldfish, flamingo, strawberry
SIZE = 112
STEPS = 32


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_class_visualizations_are_classified_as_their_class(lite0, classify, kind):
    from featureviz.zoo import imagenet_class_names

    objective = {"sum": [{"batch": {"index": i, "objective": {kind: {"index": k}}}} for i, k in enumerate(CLASSES)]}
    result = render(lite0, RenderSpec(objective=objective, steps=STEPS, size=SIZE, batch=len(CLASSES), seed=0))
    probs = torch.softmax(classify(result.images), dim=-1)
    top1 = probs.argmax(-1).tolist()
    names = imagenet_class_names()
    report = ", ".join(f"{names[k]}: top-1 {names[t]!r} p={probs[i, k]:.3f}" for i, (k, t) in
                       enumerate(zip(CLASSES, top1)))
    print(f"{kind} ({STEPS} steps, {SIZE} px): {report}")
    assert top1 == list(CLASSES), report

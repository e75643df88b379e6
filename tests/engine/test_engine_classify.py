"""Class visualizations of the real trained EfficientNet-Lite0 are classified as their class by that model.

One render per objective kind optimises three classes at once: image i maximises class CLASSES[i] (a per-image
``batch`` objective), so the batch costs one run.
"""

import pytest
import torch

from featureviz.engine import RenderSpec
from featureviz.engine import render

CLASSES = (1, 130, 949)  # goldfish, flamingo, strawberry
# (steps, size, transforms). A probability is far more sensitive to geometry than a logit: optimised with the
# standard 12 px grey pad, the picture shrinks to 112/136 of the model's view and its class probability drops when
# the model sees it full frame. So the prob run uses the standard stack without the pad (jitter, scale, rotate),
# and the model then classifies the image exactly as it is.
NO_PAD = [{"jitter": {"pixels": 8}}, {"scale": {"factors": [1 + (i - 5) / 50 for i in range(11)]}},
          {"rotate": {"degrees": list(range(-10, 11)) + [0] * 5}}, {"jitter": {"pixels": 4}}]
BUDGET = {"logit": (32, 112, "standard"), "prob": (48, 112, NO_PAD)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_class_visualizations_are_classified_as_their_class(lite0, classify, kind, seed=0):
    from featureviz.zoo import imagenet_class_names

    steps, size, transforms = BUDGET[kind]
    objective = {"sum": [{"batch": {"index": i, "objective": {kind: {"index": k}}}} for i, k in enumerate(CLASSES)]}
    result = render(lite0, RenderSpec(objective=objective, steps=steps, size=size, transforms=transforms,
                                      batch=len(CLASSES), seed=seed))
    probs = torch.softmax(classify(result.images), dim=-1)
    top1 = probs.argmax(-1).tolist()
    names = imagenet_class_names()
    report = ", ".join(f"{names[k]}: top-1 {names[t]!r} p={probs[i, k]:.3f}" for i, (k, t) in
                       enumerate(zip(CLASSES, top1)))
    print(f"{kind} ({steps} steps, {size} px): {report}")
    if kind == "logit":  # seeds 0-5, one thread: all 18 images top-1 with p >= 0.999 (composed and each stacks)
        assert top1 == list(CLASSES), report
        return
    # prob: seeds 0-5, one thread, with two random streams of the transforms (before and after the batched
    # step's host-drawn maps): 31 of 36 images top-1, at least 2 of 3 in every run, mean target probability of a
    # run 0.62-1.00; one image in a run may land on a neighbouring class (flamingo -> greenhouse or spoonbill)
    assert sum(t == k for t, k in zip(top1, CLASSES)) >= 2, report
    assert float(torch.stack([probs[i, k] for i, k in enumerate(CLASSES)]).mean()) >= 0.4, report

"""Receptive fields through a saturating activation: ReLU6 (ONNX Clip 0..6, EfficientNet-Lite's activation). The
positive copy's activations grow past the clip bound, so a clip kept as it is gives no gradient at all and the unit
was measured as seeing the whole image (the demo's block 4 units); the copy makes it an identity."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from featureviz.engine.exemplars import receptive_field  # noqa: E402
from featureviz.importer import import_model  # noqa: E402
from tests.support.exemplar_models import colour_net  # noqa: E402


def _clipped() -> bytes:
    """colour_net with its ReLUs r1..r3 replaced by Clip 0..6."""
    from onnx import helper
    from onnx import numpy_helper

    model = onnx.load_from_string(colour_net())
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                              numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    for i, node in enumerate(graph.node):
        if node.name in ("r1", "r2", "r3"):
            new = helper.make_node("Clip", [node.input[0], "lo", "hi"], list(node.output), name=node.name)
            graph.node.remove(node)
            graph.node.insert(i, new)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_field_through_relu6_is_the_conv_stacks():
    model = import_model(_clipped(), verify=False)
    fields = [receptive_field(model, name, (64, 64)) for name in ("r1", "r2", "r3")]
    assert [(f.whole, f.size, f.stride, f.offset) for f in fields] == [
        (False, (3, 3), (2, 2), (1, 1)), (False, (7, 7), (4, 4), (3, 3)), (False, (15, 15), (8, 8), (7, 7))]
    assert fields[2].crop_box((3, 2)) == (17, 9, 32, 24)

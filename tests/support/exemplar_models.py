"""Hand-built ONNX models and generated images for the exemplar tests, where the right answers are known exactly.

``colour_net()``: input ``image`` (N, 3, H, W) in [0, 1] (identity preprocessing), then
- ``colour`` (Conv 1x1, 3 -> 4, then ``colour_relu``): channel 0 = R, 1 = G, 2 = B, 3 = (1 - R): a red dot's
  value is its red level, at its pixel;
- ``c1``, ``c2``, ``c3``: three 3x3 stride-2 convs with padding 1, positive weights, each followed by a ReLU
  (``r1``, ``r2``, ``r3``): at ``r3`` the receptive field is 15 pixels with stride 8 (offset 7);
- ``pool``: GlobalAveragePool (N, 4, 1, 1) and ``flat``: Flatten (N, 4): the whole image.
Imports onnx, numpy and PIL."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["colour_net", "dot_image", "png"]


def colour_net() -> bytes:
    import onnx
    from onnx import TensorProto
    from onnx import helper
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    w0 = np.zeros((4, 3, 1, 1), np.float32)
    w0[0, 0] = w0[1, 1] = w0[2, 2] = 1.0
    w0[3, 0] = -1.0
    b0 = np.array([0, 0, 0, 1], np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(b0, "b0")]
    nodes = [helper.make_node("Conv", ["image", "w0", "b0"], ["colour_pre"], name="colour"),
             helper.make_node("Relu", ["colour_pre"], ["colour_out"], name="colour_relu")]
    prev = "colour_out"
    for i in (1, 2, 3):
        w = (rng.random((4, 4, 3, 3)) * 0.5 + 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}_out"], name=f"c{i}", kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}_out"], [f"r{i}_out"], name=f"r{i}"))
        prev = f"r{i}_out"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pool_out"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool_out"], ["flat_out"], name="flat", axis=1))
    graph = helper.make_graph(
        nodes, "colour_net",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("flat_out", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def dot_image(size: int, red: int, x: int, y: int, *, green: int = 0, side: int = 1) -> np.ndarray:
    """(size, size, 3) uint8: black with a uniform green level, and a ``side`` x ``side`` red square of level ``red``
    whose top-left pixel is (x, y)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 1] = green
    image[y:y + side, x:x + side, 0] = red
    return image


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

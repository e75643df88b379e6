"""Import errors a user can act on (issue 8, items 13 and 17): one line naming the cause, before any big allocation.

Each case runs through ``featureviz inspect`` (one line on stderr, exit status 1, no traceback) and through
``import_model`` (the reason code the server maps to INVALID_ARGUMENT; tests/service/test_service_import_limits.py
sends them over gRPC).
"""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest
from importer_models import tiny_conv_model
from onnx import TensorProto
from onnx import helper

from featureviz.errors import ModelImportError
from featureviz.importer import ImportLimits
from featureviz.importer import import_model


def _inspect(path, tmp_path):
    env = dict(os.environ, FEATUREVIZ_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "featureviz.cli", "inspect", str(path)], capture_output=True,
                          text=True, env=env, timeout=300)


def _one_line_refusal(path, tmp_path) -> str:
    result = _inspect(path, tmp_path)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _refused(source, reason: str, **kwargs) -> str:
    with pytest.raises(ModelImportError) as info:
        import_model(source, use_cache=False, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


def huge_input_model(side: int = 40000) -> onnx.ModelProto:
    """A one-Conv model that declares a fixed 1x3xSIDExSIDE input (the check would allocate 19 GB at 40000)."""
    model = tiny_conv_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_value = side
        dims[3].dim_value = side
    return model


def many_nodes_model(count: int) -> onnx.ModelProto:
    """The one-Conv model followed by a chain of ``count`` Relu nodes."""
    model = tiny_conv_model()
    previous = "y"
    for i in range(count):
        model.graph.node.append(helper.make_node("Relu", [previous], [f"r{i}"], name=f"relu{i}"))
        previous = f"r{i}"
    model.graph.output[0].name = previous
    return model


def test_external_data_outside_the_folder_is_one_line(tmp_path):
    folder = tmp_path / "deep" / "er"
    folder.mkdir(parents=True)
    onnx.save_model(tiny_conv_model(), str(folder / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../../etc/passwd"
    path = folder / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    line = _one_line_refusal(path, tmp_path)
    assert "'../../../../etc/passwd'" in line and "outside the model's folder" in line
    assert "outside the model's folder" in _refused(path, "EXTERNAL_DATA")


def test_graph_without_nodes_is_one_line(tmp_path):
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "empty.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    line = _one_line_refusal(path, tmp_path)
    assert "has no nodes" in line and "KeyError" not in line
    assert "has no nodes" in _refused(path, "INVALID_MODEL")


def test_unknown_opset_is_named_as_such(tmp_path):
    model = tiny_conv_model()
    model.opset_import[0].version = 99
    path = tmp_path / "opset99.onnx"
    path.write_bytes(model.SerializeToString())
    line = _one_line_refusal(path, tmp_path)
    assert "opset 99" in line and "newer than the newest opset known here" in line and "converter" not in line
    _refused(path, "INVALID_MODEL")


def test_fixed_input_above_the_largest_side_is_refused_before_any_allocation(tmp_path):
    path = tmp_path / "huge.onnx"
    path.write_bytes(huge_input_model().SerializeToString())
    line = _one_line_refusal(path, tmp_path)  # the command would die allocating 19 GB without the check
    assert "fixed height of 40000" in line and "1024" in line and "max_image_side" in line
    message = _refused(path, "MODEL_TOO_LARGE", limits=ImportLimits(max_image_side=2048))
    assert "above the largest image side 2048" in message


def test_activation_estimate_above_the_limit_is_refused():
    # 512 x 512 is within the side limit; its one conv output (4 x 512 x 512 floats) is 4 MiB
    message = _refused(huge_input_model(512).SerializeToString(), "MODEL_TOO_LARGE",
                       limits=ImportLimits(max_activation_bytes=1 << 20))
    assert "activations of one 512x512 image" in message and "max_activation_bytes" in message
    assert import_model(huge_input_model(512).SerializeToString(), use_cache=False, verify=False,
                        limits=ImportLimits(max_activation_bytes=8 << 20)).layers


def test_node_limit_is_enforced(tmp_path):
    path = tmp_path / "long.onnx"
    path.write_bytes(many_nodes_model(30).SerializeToString())
    message = _refused(path, "MODEL_TOO_LARGE", limits=ImportLimits(max_nodes=25))
    assert "31 nodes" in message and "limit of 25" in message and "max_model_nodes" in message
    assert import_model(path, use_cache=False, limits=ImportLimits(max_nodes=31)).check.passed
    # the default limit refuses a graph of 100,000 nodes at once (no conversion, no checker pass)
    big = tmp_path / "big.onnx"
    big.write_bytes(many_nodes_model(100_000).SerializeToString())
    line = _one_line_refusal(big, tmp_path)
    assert "100001 nodes" in line and "20000" in line


def test_unsupported_op_names_op_node_opset_and_what_to_do():
    node = helper.make_node("Hardmax", ["y"], ["z"], name="argmaxish", axis=1)
    message = _refused(tiny_conv_model(extra_node=node).SerializeToString(), "UNSUPPORTED_OP")
    assert "Hardmax" in message and "'argmaxish'" in message and "opset 13" in message
    assert "re-export the model with another opset" in message and "open an issue" in message
    assert "KeyError" not in message

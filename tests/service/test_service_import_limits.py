"""Uploads the importer refuses (issue 8, items 13 and 17) answer INVALID_ARGUMENT with one clear line and a
reason, over a real server on loopback; the import limits are published in ServerInfo.limits."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from featureviz.client import FeaturevizClientError
from featureviz.client import from_rpc_error


def _conv_model(side: int = 8, relus: int = 0, opset: int = 13):
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y0"], name="conv", pads=[1, 1, 1, 1])]
    for i in range(relus):
        nodes.append(helper.make_node("Relu", [f"y{i}"], [f"y{i + 1}"], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])],
                              [helper.make_tensor_value_info(f"y{relus}", TensorProto.FLOAT, [1, 4, side, side])],
                              initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _refused(client, data: bytes, reason: str) -> FeaturevizClientError:
    try:
        client.upload(data)
    except grpc.RpcError as err:
        error = from_rpc_error(err)
    except FeaturevizClientError as err:
        error = err
    else:
        raise AssertionError("the upload was accepted")
    assert error.code == "INVALID_ARGUMENT" and error.reason == reason, error
    assert "\n" not in error.message and "Traceback" not in error.message and len(error.message) < 400
    return error


def _leftovers(server, data: bytes) -> list[str]:
    sha = hashlib.sha256(data).hexdigest()
    store = server.config.store_dir
    return [str(p) for p in (store / "uploads").iterdir()] + [str(p) for p in (store / "models").rglob(f"{sha}*")]


def test_limits_are_published(client, server):
    limits = client.info().limits
    assert limits.max_model_nodes == server.config.limits.max_model_nodes > 0
    assert limits.max_activation_bytes == server.config.limits.max_activation_bytes > 0


def test_fixed_input_above_the_largest_side_is_refused(client, server):
    data = _conv_model(side=40000).SerializeToString()
    error = _refused(client, data, "MODEL_TOO_LARGE")
    assert "40000" in error.message and str(server.config.limits.max_image_side) in error.message
    assert _leftovers(server, data) == []


def test_too_many_nodes_are_refused(client, server):
    limit = server.config.limits.max_model_nodes
    data = _conv_model(relus=limit).SerializeToString()
    error = _refused(client, data, "MODEL_TOO_LARGE")
    assert f"{limit + 1} nodes" in error.message and "max_model_nodes" in error.message


@pytest.mark.parametrize("case", ["empty", "opset99"])
def test_graphs_that_cannot_be_models_are_invalid_argument(client, case):
    if case == "empty":
        graph = helper.make_graph([], "e", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])])
        data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
        assert "has no nodes" in _refused(client, data, "INVALID_MODEL").message
    else:
        data = _conv_model(opset=99).SerializeToString()
        assert "opset 99" in _refused(client, data, "INVALID_MODEL").message

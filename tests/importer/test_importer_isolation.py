"""Issue 21 item 1, defence in depth: the server imports an upload in a separate, limited process. A child that
crashes or hits its memory limit fails that upload in one line; the server stays up and the next upload works.
What comes back from the child is data: a graph with a name that is not a safe identifier is refused."""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import from_rpc_error
from featureviz.client import pb
from featureviz.errors import ModelImportError
from featureviz.importer.isolated import FAULT_ENV
from featureviz.importer.isolated import Isolation
from featureviz.importer.isolated import _parse_result
from featureviz.importer.isolated import import_isolated
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background


def _conv(seed: int, relu: str = "relu") -> bytes:
    weight = numpy_helper.from_array(np.random.default_rng(seed).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name=relu)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _refusal(client, data: bytes):
    try:
        client.upload(data)
    except grpc.RpcError as err:
        return from_rpc_error(err)
    except FeaturevizClientError as err:
        return err
    raise AssertionError("the upload was accepted")


@pytest.mark.parametrize("fault, reason", [("crash", "IMPORT_CRASHED"), ("memory", "MODEL_TOO_LARGE")])
def test_a_failing_import_process_fails_the_upload_and_the_server_stays_up(tmp_path, monkeypatch, fault, reason):
    monkeypatch.setenv("FEATUREVIZ_CACHE", str(tmp_path / "cache"))
    with serve_in_background(ServerConfig(tmp_path / "store")) as server:
        with Client(server.address, timeout=120) as client:
            monkeypatch.setenv(FAULT_ENV, fault)  # read by the import process only: SIGSEGV / allocate past RLIMIT_AS
            error = _refusal(client, _conv(0))
            assert error.code == "INVALID_ARGUMENT" and error.reason == reason, error
            assert "\n" not in error.message and "Traceback" not in error.message, error.message
            monkeypatch.delenv(FAULT_ENV)
            model = client.upload(_conv(0))  # the same bytes: nothing of the failed upload was kept
            assert model.state == pb.MODEL_STATE_READY
            assert client.info().limits.max_model_nodes > 0


def test_an_import_past_its_time_limit_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang")
    with pytest.raises(ModelImportError) as refused:
        import_isolated(_conv(1), cache_dir=tmp_path / "cache", isolation=Isolation(timeout_seconds=3))
    assert refused.value.reason == "IMPORT_TIMEOUT" and "3 s" in refused.value.message


def test_the_servers_published_import_bounds_reach_the_import_process(tmp_path, monkeypatch):
    """Limits.import_timeout_seconds is the isolation's time limit over a real server (published, named in the
    refusal); the name limit the server publishes is the importer's."""
    from featureviz.importer.names import MAX_NAME_CHARS
    from featureviz.server import Limits

    monkeypatch.setenv("FEATUREVIZ_CACHE", str(tmp_path / "cache"))
    with serve_in_background(ServerConfig(tmp_path / "store", limits=Limits(import_timeout_seconds=3))) as server:
        with Client(server.address, timeout=120) as client:
            assert client.info().limits.import_timeout_seconds == 3
            assert client.info().limits.max_model_name_chars == MAX_NAME_CHARS
            monkeypatch.setenv(FAULT_ENV, "hang")
            error = _refusal(client, _conv(3))
            assert error.reason == "IMPORT_TIMEOUT" and "3 s" in error.message, error
            monkeypatch.delenv(FAULT_ENV)
            assert client.info().device.kind  # the server is still up


def test_the_childs_answer_is_checked_not_trusted(tmp_path, monkeypatch):
    """A child that answers a graph whose names are not safe identifiers (as a compromised one could) is refused
    before anything converts it."""
    canary = tmp_path / "canary"
    hostile = _conv(2, relu=f'r", open("{canary}", "w"), "')
    report = {"spec": {}, "check": {}, "timings": {}, "names": {"original": {}, "nodes": {}},
              "model_bytes": len(hostile)}
    out = json.dumps(report).encode() + b"\n" + hostile
    with pytest.raises(ModelImportError) as refused:
        _parse_result(0, out, b"", Isolation())
    assert "safe identifier" in refused.value.message
    assert not canary.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the uid drop needs root")
def test_a_server_running_as_root_imports_as_nobody_who_cannot_write_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    with serve_in_background(ServerConfig(store)) as server:
        with Client(server.address, timeout=120) as client:
            database = store / "featureviz.sqlite3"
            assert database.is_file()
            for target in (store / "probe", database):
                monkeypatch.setenv(FAULT_ENV, f"write:{target}")
                error = _refusal(client, _conv(3))
                assert error.reason == "FAULT_WRITE_DENIED" and "Permission denied" in error.message, error
            assert not (store / "probe").exists()
            monkeypatch.delenv(FAULT_ENV)
            assert client.upload(_conv(3)).state == pb.MODEL_STATE_READY

"""What the disk can do to a real server: a stored model file damaged or lost (found on import, restored by an
upload of the same bytes), a damaged import-cache entry (never used)."""

from __future__ import annotations

import shutil

import onnx
import pytest
from onnx import numpy_helper

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import images
from featureviz.client import pb
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 5}}


def _conv_weights(onnx_bytes: bytes) -> bytes:
    """The raw float32 bytes of the model's first convolution weights (as they sit in the file)."""
    model = onnx.load_from_string(onnx_bytes)
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    return numpy_helper.to_array(tensor).astype("<f4").tobytes()


def _zero(path, needle: bytes) -> None:
    data = path.read_bytes()
    offset = data.index(needle)
    path.write_bytes(data[:offset] + bytes(len(needle)) + data[offset + len(needle):])


def _model_file(store, sha: str):
    return store / "models" / sha[:2] / f"{sha}.onnx"


def _render(fv: Client, sha: str) -> pb.Job:
    return fv.wait(fv.submit(sha, CHANNEL, steps=3, size=32, seed=1).id, timeout=120)


def test_a_corrupt_model_file_is_refused_until_an_upload_restores_it(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        sha = fv.upload(tiny_onnx).sha256
        reference = _render(fv, sha)
    _zero(_model_file(store, sha), _conv_weights(tiny_onnx))  # still a valid ONNX file, with wrong weights
    shutil.rmtree(store / "cache")
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        for _ in range(2):  # unusable, and it stays so
            with pytest.raises(FeaturevizClientError) as err:
                fv.submit(sha, CHANNEL, steps=3, size=32, seed=1)
            assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "MODEL_CORRUPT"
            assert "corrupt" in err.value.message and "upload" in err.value.message
            model = fv.model(sha)
            assert model.state == pb.MODEL_STATE_FAILED and model.failure_reason == "MODEL_CORRUPT"
        assert not fv.upload_status(sha, len(tiny_onnx)).model_exists  # the client will send the bytes
        restored = fv.upload(tiny_onnx)
        assert not restored.deduplicated and restored.state == pb.MODEL_STATE_READY and not restored.failure_reason
        assert _model_file(store, sha).read_bytes() == tiny_onnx
        assert fv.model(sha).state == pb.MODEL_STATE_READY
        done = _render(fv, sha)
        assert done.state == pb.JOB_STATE_SUCCEEDED and images(done) == images(reference)


def test_a_missing_model_file_is_restored_by_an_upload_for_every_tenant(tmp_path, tiny_onnx):
    config = ServerConfig(tmp_path / "store", tokens={"tok-a": "alice", "tok-b": "bob"})
    with serve_in_background(config) as server:
        with Client(server.address, token="tok-a") as alice, Client(server.address, token="tok-b") as bob:
            sha = alice.upload(tiny_onnx).sha256
            bob.upload(tiny_onnx)
    _model_file(config.store_dir, sha).unlink()
    with serve_in_background(config) as server:
        with Client(server.address, token="tok-a") as alice, Client(server.address, token="tok-b") as bob:
            with pytest.raises(FeaturevizClientError) as err:
                alice.submit(sha, CHANNEL, steps=3, size=32)
            assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "MODEL_FILE_MISSING"
            assert {alice.model(sha).failure_reason, bob.model(sha).failure_reason} == {"MODEL_FILE_MISSING"}
            restored = bob.upload(tiny_onnx)  # bob holds the bytes: his upload restores the shared file
            assert not restored.deduplicated and restored.state == pb.MODEL_STATE_READY
            assert _model_file(config.store_dir, sha).read_bytes() == tiny_onnx
            assert alice.model(sha).state == pb.MODEL_STATE_READY
            assert _render(alice, sha).state == pb.JOB_STATE_SUCCEEDED
            assert alice.upload(tiny_onnx).deduplicated  # intact again: nothing is sent


def test_a_damaged_import_cache_entry_is_never_used(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        sha = fv.upload(tiny_onnx).sha256
        reference = _render(fv, sha)
    entry = store / "cache" / f"{sha}.pt"
    _zero(entry, _conv_weights(tiny_onnx))  # the cached module's weights, zeroed in place
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        done = _render(fv, sha)
        assert done.state == pb.JOB_STATE_SUCCEEDED and images(done) == images(reference)
    assert _conv_weights(tiny_onnx) in entry.read_bytes()  # the import rewrote the entry

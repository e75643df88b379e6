"""Issue 21 item 1, the import cache: an entry is a pickle, and loading one runs code, so a cache file written by
anyone but this cache (who holds its key) is never loaded; it is a miss and the model is imported again."""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import numpy as np
import pytest
import torch
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from featureviz.importer import import_model
from featureviz.importer.cache import CACHE_FORMAT
from featureviz.importer.cache import MAC_KEY_FILE
from featureviz.importer.cache import ImportCache


class _Canary:
    """Unpickling it opens (creates) the canary file: what a tampered entry could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _conv(seed: int) -> bytes:
    weight = numpy_helper.from_array(np.random.default_rng(seed).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _forged_entry(body_object) -> bytes:
    """An entry as someone without the key can write it: the format's header and the payload's plain sha256."""
    buffer = io.BytesIO()
    torch.save({"format": CACHE_FORMAT, "model": body_object}, buffer)
    body = buffer.getvalue()
    return b"featureviz-cache %d %s\n" % (CACHE_FORMAT, hashlib.sha256(body).hexdigest().encode()) + body


def test_a_forged_cache_entry_is_never_loaded(tmp_path):
    cache, canary = tmp_path / "cache", tmp_path / "canary"
    data = _conv(0)
    first = import_model(data, cache_dir=cache)
    entry = cache / f"{first.sha256}.pt"
    assert entry.is_file() and "cache" in import_model(data, cache_dir=cache).timings  # a real hit first

    entry.write_bytes(_forged_entry(_Canary(str(canary))))
    again = import_model(data, cache_dir=cache)
    assert not canary.exists(), "the forged cache entry was unpickled"
    assert "cache" not in again.timings and again.layer("relu").op_type == "Relu"  # imported again
    assert "cache" in import_model(data, cache_dir=cache).timings  # and its entry rewritten
    assert (cache / MAC_KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_an_entry_moved_to_another_models_name_is_a_miss(tmp_path):
    cache = tmp_path / "cache"
    a, b = _conv(0), _conv(1)
    sha_a = import_model(a, cache_dir=cache).sha256
    sha_b = import_model(b, cache_dir=cache).sha256
    shutil.copy(cache / f"{sha_b}.pt", cache / f"{sha_a}.pt")
    assert ImportCache(cache).get(sha_a) is None
    assert import_model(a, cache_dir=cache).sha256 == sha_a


def test_a_key_others_can_read_turns_the_cache_off(tmp_path, caplog):
    if os.name != "posix":
        pytest.skip("file modes")
    cache = tmp_path / "cache"
    data = _conv(0)
    sha = import_model(data, cache_dir=cache).sha256
    (cache / MAC_KEY_FILE).chmod(0o644)
    assert ImportCache(cache).get(sha) is None
    assert "mode 0600" in caplog.text
    assert "cache" not in import_model(data, cache_dir=cache).timings

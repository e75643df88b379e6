"""Files that cannot be imported are refused with a ModelImportError whose reason and message name the problem."""

from __future__ import annotations

import onnx
import pytest
from importer_models import tiny_conv_model
from onnx import helper

from featureviz.errors import ModelImportError
from featureviz.importer import import_model


def _refused(source, reason: str) -> str:
    with pytest.raises(ModelImportError) as info:
        import_model(source, use_cache=False)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


def test_tiny_model_imports():
    model = import_model(tiny_conv_model().SerializeToString(), use_cache=False)
    assert [layer.name for layer in model.layers] == ["conv"]
    assert model.layer("y").name == "conv"  # the tensor name resolves too


def test_corrupt_bytes_are_not_onnx():
    message = _refused(b"\x00\xffthis is not a model\x17" * 50, "NOT_ONNX")
    assert "not an ONNX file" in message
    assert "not an ONNX file" in _refused(b"", "NOT_ONNX")


def test_truncated_file_is_refused(exported):
    data = exported("nhwc_legacy_op16").read_bytes()
    message = _refused(data[: len(data) // 2], "NOT_ONNX")
    assert "truncated" in message


def test_missing_path():
    assert "no such ONNX file" in _refused("/nonexistent/model.onnx", "NOT_ONNX")


def test_external_data_is_refused_with_its_file_name(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(tiny_conv_model(), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    # uploaded as bytes, the weights cannot be found
    message = _refused(path.read_bytes(), "EXTERNAL_DATA")
    assert "'weights.bin'" in message and "not part of the upload" in message
    # by path, with the file beside it, it imports
    assert import_model(path, use_cache=False).check.passed
    # by path, with the file gone, the missing file is named
    (tmp_path / "weights.bin").unlink()
    assert "'weights.bin'" in _refused(path, "EXTERNAL_DATA")


def test_custom_domain_op_is_refused():
    node = helper.make_node("FancyAct", ["y"], ["z"], name="fancy", domain="com.example")
    message = _refused(tiny_conv_model(extra_node=node, extra_opsets={"com.example": 1}).SerializeToString(),
                       "CUSTOM_DOMAIN")
    assert "FancyAct" in message and "com.example" in message


def test_op_without_converter_is_named():
    node = helper.make_node("Hardmax", ["y"], ["z"], name="argmaxish", axis=1)
    message = _refused(tiny_conv_model(extra_node=node).SerializeToString(), "UNSUPPORTED_OP")
    assert "Hardmax" in message and "argmaxish" in message


def test_two_channel_input_is_reported():
    message = _refused(tiny_conv_model(channels=2).SerializeToString(), "UNSUPPORTED_INPUT")
    assert "2 channels" in message


def test_checker_failure_is_invalid_model():
    model = tiny_conv_model()
    model.graph.node[0].input[1] = "nowhere"  # an input no node or initializer provides
    message = _refused(model.SerializeToString(), "INVALID_MODEL")
    assert "nowhere" in message


def test_verification_refuses_above_tolerance_with_the_figure(exported):
    with pytest.raises(ModelImportError) as info:
        import_model(exported("resnet18_legacy_op11"), tolerance=1e-12, use_cache=False)
    assert info.value.reason == "VERIFICATION_FAILED"
    assert "above the tolerance 1e-12" in str(info.value)


def test_model_local_functions_are_inlined():
    # exporters may wrap blocks in model-local functions of their own domain
    body = [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Neg", ["r"], ["b"])]
    function = helper.make_function("local.blocks", "ReluNeg", ["a"], ["b"], body,
                                    opset_imports=[helper.make_opsetid("", 13)])
    node = helper.make_node("ReluNeg", ["y"], ["z"], name="block", domain="local.blocks")
    model = tiny_conv_model(extra_node=node, extra_opsets={"local.blocks": 1})
    model.functions.append(function)
    imported = import_model(model.SerializeToString(), use_cache=False)
    assert imported.check.passed
    assert {"Relu", "Neg"} <= {layer.op_type for layer in imported.layers}


def test_a_model_this_torch_cannot_pickle_is_imported_uncached(tmp_path, caplog):
    """A torch version whose pickler refuses a converted module (torch 2.11 and string annotations in an FX
    graph's globals did, on a GPU machine) must cost the cache entry, not the import."""
    import torch

    from featureviz.importer.cache import ImportCache

    class Unpicklable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hook = lambda x: x  # a lambda: pickle refuses it

    cache = ImportCache(tmp_path)
    with caplog.at_level("WARNING"):
        cache.put("ab" * 32, Unpicklable())
    assert cache.get("ab" * 32) is None and not list(tmp_path.iterdir())  # no entry, no partial file
    assert "cannot cache model abababababab" in caplog.text

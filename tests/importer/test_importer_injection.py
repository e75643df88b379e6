"""Issue 21 item 1: no string of an uploaded ONNX file becomes code.

Each model puts an injection payload into every string field of a small Conv -> Relu file (node, input, output,
intermediate and initializer names, graph name, doc strings, metadata, producer, model domain; variants with a
custom opset domain and a string attribute value). A real subprocess imports them all in an empty working
directory; the payloads try to create a canary file there. Asserted: no file appears, and each model imports
with the file's names as its catalog names and aliases (also from the cache, and as truncation keys), or is
refused in one line naming the problem. The issue's exact reproduction runs through ``featureviz inspect``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

CANARY = "CANARY"
ISSUE_NAME = 'r", open("pwned", "w"), "'

PAYLOADS = [
    ISSUE_NAME,
    f'r", open("{CANARY}", "w"), "',
    f"r', open('{CANARY}', 'w'), '",
    f'x"); open("{CANARY}", "w"); ("',
    f'__import__("os").system("touch {CANARY}")',
    f'a"\nimport os; os.system("touch {CANARY}")\n"',
    f'\\", open("{CANARY}", "w"), "\\',
    f'{{open("{CANARY}", "w")}}',
    f'f"{{open(\'{CANARY}\', \'w\')}}"',
    f'a.b", open("{CANARY}", "w"), "c.d',
    f"self.__class__.__init__.__globals__['__builtins__']['open']('{CANARY}', 'w')",
    f'x = open("{CANARY}", "w")',
    f'input_1=open("{CANARY}", "w")',
    "class", "def", "lambda", "None", "self", "forward", "input_1", "initializers", "torch", "n0", "v1", "g0",
    ".", "..", "/", "a..b", ".leading.dot", "trailing/", "%s%r{0}", "\t \r\n",
    "ℝelu_ünïcode_名前", "\u202e\u200bdir", "😀",
    "x" * 3000,
]
TOO_LONG = "y" * 5000
_CHILD = Path(__file__).with_name("injection_child.py")


def conv_relu(p: str, *, extra_domain: str | None = None, auto_pad: str | None = None, gelu: bool = False
              ) -> onnx.ModelProto:
    """Conv -> Relu, 16x16, with ``p`` in every string field (tagged where names must be unique). ``gelu``: a
    Gelu of opset 20 instead of the Relu, which the clean-up rewrites into nodes named after it."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w" + p)
    bias = numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "b" + p)
    conv_attrs = {"auto_pad": auto_pad} if auto_pad is not None else {"pads": [1, 1, 1, 1]}
    conv = helper.make_node("Conv", [p, "w" + p, "b" + p], ["pre" + p], name="conv" + p, doc_string=p, **conv_attrs)
    relu = helper.make_node("Gelu" if gelu else "Relu", ["pre" + p], ["out" + p], name=p, doc_string=p)
    inputs = [helper.make_tensor_value_info(p, TensorProto.FLOAT, [1, 3, 16, 16])]
    outputs = [helper.make_tensor_value_info("out" + p, TensorProto.FLOAT, [1, 4, 16, 16])]
    graph = helper.make_graph([conv, relu], p, inputs, outputs, [weight, bias], doc_string=p)
    opsets = [helper.make_opsetid("", 20 if gelu else 13)] + ([helper.make_opsetid(extra_domain, 1)] if extra_domain
                                                              else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name=p, doc_string=p, domain=p)
    helper.set_model_props(model, {p: p, "k" + p: "v"})
    return model


def _cases() -> list[dict]:
    cases = [{"payload": p, "model": conv_relu(p), "expect": "import"} for p in PAYLOADS]
    for p in PAYLOADS[:3] + [PAYLOADS[9], "class"]:
        cases.append({"payload": p, "model": conv_relu(p, gelu=True), "expect": "import", "gelu": True})
    for p in PAYLOADS[:3]:
        cases.append({"payload": p, "model": conv_relu(p, extra_domain=p), "expect": "either"})
        cases.append({"payload": p, "model": conv_relu(p, auto_pad=p), "expect": "refuse"})
    cases.append({"payload": TOO_LONG, "model": conv_relu(TOO_LONG), "expect": "refuse"})
    return cases


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_no_string_field_becomes_code(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    cases = _cases()
    for i, case in enumerate(cases):
        (models / f"{i}.onnx").write_bytes(case["model"].SerializeToString())
    before = _files(work)
    env = dict(os.environ, FEATUREVIZ_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, str(_CHILD), str(models), str(len(cases))], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(work) == before, f"the import created files: {_files(work) - before}"
    assert not list(tmp_path.rglob(CANARY)) and not list(tmp_path.rglob("pwned"))
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    for case, outcome in zip(cases, outcomes):
        p, shown = case["payload"], repr(case["payload"][:60])
        if "error" in outcome:
            assert case["expect"] in ("refuse", "either"), f"{shown} refused: {outcome['error']}"
            assert "\n" not in outcome["error"] and "Traceback" not in outcome["error"], outcome["error"]
            if p is TOO_LONG:
                assert outcome["reason"] == "INVALID_MODEL" and "4096" in outcome["error"], outcome
            continue
        assert case["expect"] in ("import", "either"), f"{shown} imported, expected a refusal"
        assert outcome["input"] == p, shown
        # every name of the file resolves to its layer, from a fresh import and from the cache
        for resolved in (outcome["resolved"], outcome["cached"]):
            assert resolved[p] == resolved["out" + p] == p, shown
            if case.get("gelu"):  # rewritten: the Gelu's last node keeps its name, the others are named after it
                assert resolved[p + "/featureviz/t"] == p + "/featureviz/t", shown
                continue
            assert resolved["conv" + p] == resolved["pre" + p] == resolved[p + ":pre"] == "conv" + p, shown
            module = ("conv" + p).replace(".", "/").lstrip("/")
            assert resolved[module] == "conv" + p, shown
        assert outcome["logits"] == p, shown
        if not case.get("gelu"):
            assert outcome["truncated"] == sorted([p, p + ":pre", "out" + p]), shown


def _issue_model(path: Path) -> bytes:
    data = conv_relu("x").SerializeToString()
    model = onnx.load_from_string(data)
    model.graph.node[1].name = ISSUE_NAME  # the issue's reproduction: Conv -> Relu named r", open("pwned", "w"), "
    data = model.SerializeToString()
    path.write_bytes(data)
    return data


def test_issue_reproduction_featureviz_inspect(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    _issue_model(work / "model.onnx")
    env = dict(os.environ, FEATUREVIZ_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "featureviz.cli", "inspect", "model.onnx", "--json"], cwd=work,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _files(work) == {"model.onnx"}, "pwned appeared"
    doc = json.loads(result.stdout)
    relu = next(layer for layer in doc["layers"] if layer["op_type"] == "Relu")
    assert relu["name"] == ISSUE_NAME and doc["logits"] == ISSUE_NAME
    conv = next(layer for layer in doc["layers"] if layer["op_type"] == "Conv")
    assert conv["pre_activation_of"] == ISSUE_NAME and ISSUE_NAME + ":pre" in conv["aliases"]


def test_issue_reproduction_server_upload(tmp_path, monkeypatch):
    from featureviz.client import Client
    from featureviz.client import pb
    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    work = tmp_path / "cwd"
    work.mkdir()
    data = _issue_model(tmp_path / "model.onnx")
    monkeypatch.chdir(work)  # the server's working directory: where pwned would appear
    monkeypatch.setenv("FEATUREVIZ_CACHE", str(tmp_path / "cache"))
    with serve_in_background(ServerConfig(tmp_path / "store", progress_interval=0.0)) as server:
        with Client(server.address, timeout=120) as client:
            model = client.upload(data, name="model.onnx")
            assert model.state == pb.MODEL_STATE_READY
            layers = {layer.name: layer for layer in client.layers(model.sha256)}
            assert ISSUE_NAME in layers and layers[ISSUE_NAME].op_type == "Relu"
            assert model.logits_layer == ISSUE_NAME
            objective = {"channel": {"layer": ISSUE_NAME, "channel": 1}}
            job = client.wait(client.submit(model.sha256, objective, steps=3, size=16).id, timeout=120)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job
            pre = client.wait(client.submit(model.sha256, {"channel": {"layer": ISSUE_NAME + ":pre", "channel": 0}},
                                            steps=3, size=16).id, timeout=120)
            assert pre.state == pb.JOB_STATE_SUCCEEDED, pre
    assert _files(work) == set(), "pwned appeared"


def test_inspect_text_escapes_control_characters(tmp_path):
    """A terminal escape or newline in a name must not reach the terminal raw (it could rewrite the screen)."""
    name = "\x1b[2J\x1b[31mrelu\rok\nfake row"
    model = conv_relu("x")
    model.graph.node[1].name = name
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    env = dict(os.environ, FEATUREVIZ_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "featureviz.cli", "inspect", str(path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "fake row" not in result.stdout.splitlines()
    assert "\\x1b[2J\\x1b[31mrelu\\rok\\nfake row" in result.stdout


def test_a_refusal_quotes_a_long_name_short(tmp_path):
    """Names from the file in an error are echoed: ASCII, cut at 100 characters, one line."""
    from featureviz.errors import ModelImportError
    from featureviz.importer import import_model

    name = "\n" + "z" * 4000
    model = conv_relu(name)
    del model.graph.node[0].attribute[:]
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2  # 2 channels: refused, naming the input
    try:
        import_model(model.SerializeToString(), use_cache=False)
    except ModelImportError as exc:
        assert exc.reason in ("UNSUPPORTED_INPUT", "INVALID_MODEL"), exc
        assert len(exc.message) < 400 and "\n" not in exc.message and "(4001 characters)" in exc.message
    else:
        raise AssertionError("a 2-channel input was accepted")

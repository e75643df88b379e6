"""``featureviz inspect``: text and JSON output, one-line errors and exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _inspect(*args, tmp_path):
    env = dict(os.environ, FEATUREVIZ_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "featureviz.cli", "inspect", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_inspect_json(exported, tmp_path):
    result = _inspect(exported("nhwc_legacy_op16"), "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["input"]["layout"] == "NHWC" and doc["input"]["channels"] == 3
    assert doc["check"]["max_rel_err"] < 1e-4 and doc["check"]["passed"]
    assert {"name", "op_type", "shape", "channels"} <= set(doc["layers"][0])
    assert doc["logits"] in {layer["name"] for layer in doc["layers"]}


def test_inspect_text(exported, tmp_path):
    result = _inspect(exported("gray_legacy_op15_dynhw"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max relative difference" in result.stdout and "logits" in result.stdout
    assert "pre-activation of" in result.stdout


def test_inspect_refuses_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf \xff\xfe" * 10)
    result = _inspect(bad, tmp_path=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an ONNX file" in lines[0] and "Traceback" not in result.stderr

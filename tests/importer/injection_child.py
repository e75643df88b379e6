"""The subprocess of test_importer_injection.py: imports MODELS/0.onnx .. MODELS/N-1.onnx in the current (empty)
working directory and prints one JSON line: per model, the import's outcome.

    python injection_child.py MODELS N
"""

import json
import sys
from pathlib import Path

import torch

from featureviz.errors import ModelImportError
from featureviz.importer import import_model

__all__ = []


def resolve_all(model, names):
    out = {}
    for name in names:
        try:
            out[name] = model.layer(name).name
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def outcome(path: Path) -> dict:
    try:
        model = import_model(path)
    except ModelImportError as exc:
        return {"error": str(exc), "reason": exc.reason}
    layers = [layer.name for layer in model.layers]
    names = {n for layer in model.layers for n in (layer.name, *layer.aliases)}
    p = model.input_spec.name
    wanted = names | {p, "out" + p, "conv" + p, "pre" + p, p + ":pre", ("conv" + p).replace(".", "/").lstrip("/"),
                      p + "/featureviz/t"}
    x = torch.rand(1, 3, 16, 16)
    keys = [key for key in (p, p + ":pre", "out" + p) if key in names]
    got = model.truncate(keys)(x)
    cached = import_model(path)
    return {"input": p, "layers": layers, "resolved": resolve_all(model, wanted), "logits": model.logits,
            "cached": resolve_all(cached, wanted), "from_cache": "cache" in cached.timings,
            "truncated": sorted(got)}


def main() -> None:
    folder, count = Path(sys.argv[1]), int(sys.argv[2])
    print(json.dumps([outcome(folder / f"{i}.onnx") for i in range(count)]))


if __name__ == "__main__":
    main()

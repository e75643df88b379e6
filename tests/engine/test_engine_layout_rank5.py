"""A model with a 5-D buffer (timm's Swin keeps its attention masks so) renders: torch refuses channels_last for
5-D tensors, so the layout probe falls back to NCHW instead of failing the render."""

from __future__ import annotations

import torch
from torch import nn

from featureviz.engine import layout


class WithRank5Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mask", torch.zeros(1, 2, 1, 3, 3))

    def forward(self, x):
        return self.conv(x) + self.mask.sum()


def test_rank5_buffer_falls_back_to_contiguous():
    module = WithRank5Buffer().eval()
    probe = torch.rand(2, 3, 8, 8)
    assert layout.prepare(module, "channels_last", torch.device("cpu"), lambda: probe) == "contiguous"
    assert module.conv.weight.is_contiguous()
    with torch.no_grad():
        assert module(probe).shape == (2, 4, 8, 8)

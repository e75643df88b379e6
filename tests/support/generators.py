"""Small generators (a latent vector in, an image out) exported to ONNX as a user would (torch's exporter, dynamic
batch, opset 17): the ``generator`` parameterization's tests upload them. Random-init weights unless said: the tests
that use them check the plumbing (shapes, ranges, refusals, batching), where what the generator learned does not
matter; ``bench/train_generator.py`` trains a real one. Imports torch."""

from __future__ import annotations

import io

import torch

__all__ = ["TinyGenerator", "export_generator"]


class TinyGenerator(torch.nn.Module):
    """DCGAN-like decoder: Linear(latent -> 16x4x4), two ConvTranspose 2x up-samplings, a 3x3 conv to ``channels``,
    then ``last`` (``tanh``, ``sigmoid``, ``none``, ``clip``), weights scaled so that the image depends on the latent; ``latent_4d``: the input is (N, Z, 1, 1);
    ``round``: a torch.round in the middle (not differentiable)."""

    def __init__(self, latent: int = 16, channels: int = 3, last: str = "tanh", *, latent_4d: bool = False,
                 round: bool = False, side: int = 16):
        super().__init__()
        self.latent, self.latent_4d, self.last, self.round = latent, latent_4d, last, round
        self.start = side // 4
        self.fc = torch.nn.Linear(latent, 16 * self.start * self.start)
        self.up1 = torch.nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1)
        self.up2 = torch.nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.out = torch.nn.Conv2d(8, channels, 3, padding=1)
        with torch.no_grad():  # torch's default init makes a nearly constant image: weights x3, no biases, so the
            for p in self.parameters():  # image varies with the latent (per-pixel std ~0.4 over latents, tanh)
                p.mul_(3.0) if p.dim() > 1 else p.zero_()

    def forward(self, z):
        if self.latent_4d:
            z = z.flatten(1)
        x = torch.relu(self.fc(z)).reshape(-1, 16, self.start, self.start)
        x = torch.relu(self.up1(x))
        if self.round:
            x = torch.round(x)
        x = self.out(torch.relu(self.up2(x)))
        if self.last == "tanh":
            return torch.tanh(x)
        if self.last == "sigmoid":
            return torch.sigmoid(x)
        if self.last == "clip":
            return torch.clamp(x, -2.0, 2.0)
        return x


def export_generator(module: torch.nn.Module) -> bytes:
    """The generator's ONNX bytes: input ``latent`` (N, Z) or (N, Z, 1, 1) with a dynamic batch, output ``image``."""
    module.eval()
    shape = (1, module.latent, 1, 1) if getattr(module, "latent_4d", False) else (1, module.latent)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.onnx.export(module, example, buffer, input_names=["latent"], output_names=["image"],
                      dynamic_axes={"latent": {0: "batch"}, "image": {0: "batch"}}, opset_version=17, dynamo=False)
    return buffer.getvalue()

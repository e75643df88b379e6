"""Train a small generator on real photos and export it to ONNX: a parameterization for ``param generator``.

No pretrained GAN installs offline, so this trains one here: a variational autoencoder (Kingma and Welling 2014) on
random 32x32 patches of the real photos shipped with scikit-image (``skimage.data``: astronaut, coffee, cat, rocket,
...), each photo downscaled by 1/8 to 1/2 first so patches hold edges and textures at several scales. Only the
decoder is exported: a latent vector (N, Z) in, an RGB image (N, 3, 32, 32) out, ending in Sigmoid (range [0, 1]),
the DCGAN-like layout of upconvGAN (Nguyen et al. 2016) at a small scale. Minutes on a CPU.

    .venv/bin/python bench/train_generator.py [--latent 64] [--steps 3000] [--out /tmp/featureviz_generator.onnx]

Prints the reconstruction error on held-out patches and the KL term as it trains; writes the ONNX file and a grid of
samples from the prior (z ~ N(0, 1)) next to it (``*_samples.png``).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
          "retina", "cat", "motorcycle_left", "motorcycle_right")
SIDE = 32


def photos() -> list[torch.Tensor]:
    """The skimage photos as (3, H, W) float tensors in [0, 1] (those that ship with the package)."""
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download (pooch) is skipped offline
            continue
        t = torch.as_tensor(image).float() / 255.0
        if t.dim() == 2:
            t = t.unsqueeze(-1).expand(-1, -1, 3)
        out.append(t[..., :3].permute(2, 0, 1).contiguous())
    if not out:
        raise SystemExit("no skimage photo available")
    return out


SCALES = (0.125, 0.1875, 0.25, 0.375, 0.5)


def pyramid(images) -> list[torch.Tensor]:
    """Each photo downscaled (antialiased) by each of SCALES, once."""
    out = []
    for image in images:
        h, w = image.shape[-2:]
        for scale in SCALES:
            size = (max(SIDE, int(h * scale)), max(SIDE, int(w * scale)))
            out.append(F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return out


def patches(images, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random SIDE x SIDE patches, each from a random photo at a random scale of :func:`pyramid`."""
    out = []
    for _ in range(count):
        small = images[int(torch.randint(len(images), (1,), generator=generator))]
        size = small.shape[-2:]
        y = int(torch.randint(size[0] - SIDE + 1, (1,), generator=generator))
        x = int(torch.randint(size[1] - SIDE + 1, (1,), generator=generator))
        patch = small[:, y: y + SIDE, x: x + SIDE]
        if bool(torch.rand(1, generator=generator) < 0.5):
            patch = patch.flip(-1)
        out.append(patch)
    return torch.stack(out).clamp(0, 1)


class Decoder(torch.nn.Module):
    """z (N, Z) -> (N, 3, 32, 32) in [0, 1]: Linear to 64x4x4, three 2x ConvTranspose up-samplings, a 3x3 conv."""

    def __init__(self, latent: int):
        super().__init__()
        self.latent = latent
        self.fc = torch.nn.Linear(latent, 64 * 4 * 4)
        self.net = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(64, 48, 4, 2, 1), torch.nn.BatchNorm2d(48), torch.nn.LeakyReLU(0.2),
            torch.nn.ConvTranspose2d(48, 32, 4, 2, 1), torch.nn.BatchNorm2d(32), torch.nn.LeakyReLU(0.2),
            torch.nn.ConvTranspose2d(32, 16, 4, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(16, 3, 3, padding=1), torch.nn.Sigmoid())

    def forward(self, z):
        return self.net(F.leaky_relu(self.fc(z), 0.2).reshape(-1, 64, 4, 4))


class Encoder(torch.nn.Module):
    def __init__(self, latent: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 4, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(16, 32, 4, 2, 1), torch.nn.BatchNorm2d(32), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(32, 64, 4, 2, 1), torch.nn.BatchNorm2d(64), torch.nn.LeakyReLU(0.2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 2 * latent))

    def forward(self, x):
        return self.net(x).chunk(2, dim=1)


def export(decoder: Decoder) -> bytes:
    decoder.eval()
    buffer = io.BytesIO()
    torch.onnx.export(decoder, torch.zeros(1, decoder.latent), buffer, input_names=["latent"], output_names=["image"],
                      dynamic_axes={"latent": {0: "batch"}, "image": {0: "batch"}}, opset_version=17, dynamo=False)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patches", type=int, default=10000, help="training patches drawn once")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (per value of the image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=0, help="stop training after this long (0: never)")
    parser.add_argument("--out", default="/tmp/featureviz_generator.onnx")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    draw = torch.Generator().manual_seed(args.seed)
    images = pyramid(photos())
    train = patches(images, args.patches, draw)
    held = patches(images, 512, draw)
    print(f"{len(images) // len(SCALES)} photos at {len(SCALES)} scales, {len(train)} training patches, {len(held)} held out, {SIDE}x{SIDE}")
    encoder, decoder = Encoder(args.latent), Decoder(args.latent)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    start = time.perf_counter()
    values = 3 * SIDE * SIDE
    for step in range(1, args.steps + 1):
        encoder.train(), decoder.train()
        x = train[torch.randint(len(train), (args.batch,), generator=draw)]
        mu, logvar = encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.mse_loss(decoder(z), x, reduction="sum") / args.batch
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / args.batch
        loss = recon / (2 * 0.01) + args.beta * kl  # Gaussian likelihood with sigma 0.1 per value
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out_of_time = args.max_seconds and time.perf_counter() - start > args.max_seconds
        if step % 250 == 0 or step == args.steps or out_of_time:
            encoder.eval(), decoder.eval()
            with torch.no_grad():
                mu, _ = encoder(held)
                held_mse = float(F.mse_loss(decoder(mu), held))
            print(f"step {step}: train MSE {float(recon) / values:.4f}, KL {float(kl):.1f} nats, held-out MSE "
                  f"{held_mse:.4f} (predicting the mean: {float(held.var(0).mean()):.4f}), "
                  f"{time.perf_counter() - start:.0f} s")
        if out_of_time:
            print(f"stopped after {step} steps (--max-seconds {args.max_seconds:g})")
            break
    out = Path(args.out)
    out.write_bytes(export(decoder))
    from featureviz.engine import save_images

    with torch.no_grad():
        samples = decoder(torch.randn(16, args.latent, generator=draw))
    save_images(samples, out.with_name(out.stem + "_samples.png"), as_grid=True)
    print(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_name(out.stem + '_samples.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

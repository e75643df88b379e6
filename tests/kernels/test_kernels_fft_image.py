"""spectrum_to_image: the float64 reference pins the map, the Triton kernel matches it forward and backward.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at small
sizes; on a GPU the same cases run compiled.
"""

import math
import os

import pytest
import torch

from featureviz.kernels import fft_image
from featureviz.kernels import reference


def _tolerance(device: torch.device) -> float:
    """Relative (to max |ref|) tolerance of the fp32 kernel against float64.

    fp32 accumulation (the interpreter; "ieee" or "tf32x3" on a GPU): each output is a sum of H * (W//2+1)
    products rounded at 2^-24; errors of about 4e-7 are observed at 67x66, so 1e-5 leaves a 25x margin and
    still catches any wrong term (a single missing or mis-weighted bin moves the result by >1e-3).
    TF32 (the GPU default): operands keep 10 mantissa bits, about 2e-4 forward and 1.4e-3 on the gradient at
    224 (shared/reference/kernels.md), hence 5e-3.
    """
    if device.type == "cuda" and os.environ.get(fft_image.PRECISION_ENV_VAR, "tf32") == "tf32":
        return 5e-3
    return 1e-5


def _inputs(batch, channels, out_channels, height, width, *, seed, device, color=True):
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.randn(batch, channels, height, width // 2 + 1, 2, generator=gen)
    # the lucid 1/f scale (floored at one cycle per image), with a random gain so that no two bins match
    freqs = reference.rfft2_freqs(height, width).clamp(min=1.0 / max(height, width))
    scale = (1.0 / freqs) * torch.rand(height, width // 2 + 1, generator=gen) / math.sqrt(height * width)
    mix = torch.randn(out_channels, channels, generator=gen) if color else None
    return spectrum.to(device), scale.to(device), None if mix is None else mix.to(device)


def _explicit_map(spectrum, scale, color, size):
    """The documented definition, term by term: t = 1/sqrt(HW) sum_kl c_l Re(X[k,l] e^{2 pi i (kh/H + lw/W)})."""
    height, width = size
    x = torch.complex(spectrum[..., 0], spectrum[..., 1]) * scale
    k = torch.arange(height, dtype=torch.float64)
    l_ = torch.arange(width // 2 + 1, dtype=torch.float64)
    weight = torch.full_like(l_, 2.0)
    weight[0] = 1.0
    if width % 2 == 0:
        weight[-1] = 1.0
    eh = torch.exp(2j * math.pi * k[:, None] * k[None, :] / height)                            # (h, k)
    ew = torch.exp(2j * math.pi * l_[:, None] * torch.arange(width)[None, :] / width) * weight[:, None]  # (l, w)
    t = torch.einsum("hk,bckl,lw->bchw", eh, x, ew).real / math.sqrt(height * width)
    return torch.einsum("oc,bchw->bohw", color, t) if color is not None else t


@pytest.mark.parametrize("height, width", [(6, 8), (7, 5), (5, 9)])
def test_reference_is_the_documented_map(height, width):
    """Non-Hermitian half spectra included: the Triton kernel implements this definition, not cuFFT's."""
    spectrum, scale, color = _inputs(2, 3, 3, height, width, seed=height * 100 + width, device="cpu")
    args = (spectrum.double(), scale.double(), color.double(), (height, width))
    got = reference.spectrum_to_image(*args, sigmoid=False)
    torch.testing.assert_close(got, _explicit_map(*args), rtol=0, atol=1e-12)


@pytest.mark.parametrize("height, width", [(4, 6), (5, 5)])
def test_reference_gradcheck(height, width):
    spectrum, scale, color = _inputs(2, 3, 3, height, width, seed=7, device="cpu")
    spectrum, scale, color = (t.double().requires_grad_(True) for t in (spectrum, scale, color))
    assert torch.autograd.gradcheck(lambda s, sc, c: reference.spectrum_to_image(s, sc, c, (height, width)),
                                    (spectrum, scale, color), fast_mode=True)


# (batch, C, Co, H, W, sigmoid, color, rows): even and odd H and W, batch 1 and several, identity and grey->RGB
# colour, both forward band heights, and sizes spanning several tiles in every direction (H > 64 rows or > 16 rows,
# W//2+1 > 32 columns, W > 64).
CASES = [
    (1, 3, 3, 16, 16, True, True, 64),
    (3, 3, 3, 9, 13, True, True, 16),
    (2, 3, 3, 12, 7, False, False, 64),
    (2, 1, 3, 35, 20, True, True, 16),
    (1, 3, 3, 67, 66, True, True, 64),
    (2, 3, 3, 2, 1, True, True, 16),  # degenerate sizes: no mirror rows or columns at all
    (1, 3, 3, 1, 4, False, True, 64),
]


@pytest.mark.parametrize("batch, channels, out_channels, height, width, sigmoid, color, rows", CASES)
def test_kernel_matches_float64_reference(batch, channels, out_channels, height, width, sigmoid, color, rows,
                                          kernel_device, assert_close, monkeypatch):
    monkeypatch.setattr(fft_image, "_forward_config", lambda *args: fft_image.FORWARD_CONFIGS[rows])
    spectrum, scale, mix = _inputs(batch, channels, out_channels, height, width, seed=height * width + batch,
                                   device=kernel_device, color=color)
    spectrum.requires_grad_(True)
    scale.requires_grad_(True)
    image = fft_image.spectrum_to_image(spectrum, scale, mix, (height, width), sigmoid=sigmoid)
    grad_image = torch.randn(image.shape, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    grad_spectrum, grad_scale = torch.autograd.grad(image, (spectrum, scale), grad_image)

    ref_in = [t.detach().cpu().double().requires_grad_(True) for t in (spectrum, scale)]
    ref_mix = None if mix is None else mix.cpu().double()
    ref = reference.spectrum_to_image(*ref_in, ref_mix, (height, width), sigmoid=sigmoid)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_image.cpu().double())

    tol = _tolerance(spectrum.device)
    assert image.dtype == torch.float32 and image.shape == (batch, out_channels, height, width)
    assert_close(image, ref, tol, "image")
    assert_close(grad_spectrum, ref_grads[0], tol, "d spectrum")
    assert_close(grad_scale, ref_grads[1], tol, "d scale")


def test_kernel_without_scale_gradient(kernel_device, assert_close):
    spectrum, scale, mix = _inputs(2, 3, 3, 10, 11, seed=3, device=kernel_device)
    spectrum.requires_grad_(True)
    image = fft_image.spectrum_to_image(spectrum, scale, mix, (10, 11))
    image.square().sum().backward()
    ref_spectrum = spectrum.detach().cpu().double().requires_grad_(True)
    ref = reference.spectrum_to_image(ref_spectrum, scale.cpu().double(), mix.cpu().double(), (10, 11))
    ref.square().sum().backward()
    assert scale.grad is None
    assert_close(spectrum.grad, ref_spectrum.grad, _tolerance(spectrum.device), "d spectrum")


def test_kernel_broadcasts_a_shared_scale(kernel_device, assert_close):
    spectrum, _, mix = _inputs(1, 3, 3, 8, 8, seed=5, device=kernel_device)
    gain = torch.full((1, 1, 1, 1), 0.3, device=kernel_device, requires_grad=True)
    image = fft_image.spectrum_to_image(spectrum, gain, mix, (8, 8))
    (grad_gain,) = torch.autograd.grad(image.sum(), gain)
    ref_gain = gain.detach().cpu().double().requires_grad_(True)
    ref = reference.spectrum_to_image(spectrum.cpu().double(), ref_gain, mix.cpu().double(), (8, 8))
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_gain)
    assert_close(image, ref, _tolerance(spectrum.device), "image")
    assert_close(grad_gain, ref_grad, _tolerance(spectrum.device), "d gain")


def test_kernel_rejects_a_spectrum_of_the_wrong_width(kernel_device):
    spectrum, scale, mix = _inputs(1, 3, 3, 8, 8, seed=0, device=kernel_device)
    with pytest.raises(ValueError, match=r"W//2\+1=6"):
        fft_image.spectrum_to_image(spectrum, scale, mix, (8, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", sorted(fft_image.FORWARD_CONFIGS))
def test_kernel_at_224_on_gpu(rows, assert_close, monkeypatch):
    """The production size, compiled: tiles, masks and TF32 on real hardware, both forward band heights."""
    monkeypatch.setattr(fft_image, "_forward_config", lambda *args: fft_image.FORWARD_CONFIGS[rows])
    spectrum, scale, mix = _inputs(4, 3, 3, 224, 224, seed=224, device="cuda")
    spectrum.requires_grad_(True)
    image = fft_image.spectrum_to_image(spectrum, scale, mix, (224, 224))
    grad_image = torch.randn_like(image)
    (grad_spectrum,) = torch.autograd.grad(image, spectrum, grad_image)
    ref_spectrum = spectrum.detach().cpu().double().requires_grad_(True)
    ref = reference.spectrum_to_image(ref_spectrum, scale.cpu().double(), mix.cpu().double(), (224, 224))
    (ref_grad,) = torch.autograd.grad(ref, ref_spectrum, grad_image.cpu().double())
    assert_close(image, ref, _tolerance(spectrum.device), "image")
    assert_close(grad_spectrum, ref_grad, _tolerance(spectrum.device), "d spectrum")

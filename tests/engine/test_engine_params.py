"""Parameterizations: published constants, FFT scaling, init-from-image round trips, MaCo, seeds."""

import numpy as np
import pytest
import torch

from featureviz.engine.params import MAX_NORM_SVD_SQRT
from featureviz.engine.params import color_matrix
from featureviz.engine.params import fft_scale
from featureviz.engine.params import make_param
from featureviz.errors import InvalidSpec


def test_colour_matrix_is_the_published_one():
    # lucid optvis/param/color.py: color_correlation_svd_sqrt and max_norm_svd_sqrt
    published = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
    max_norm = np.max(np.linalg.norm(published, axis=0))
    assert max_norm == pytest.approx(0.4619524, abs=1e-6)
    assert MAX_NORM_SVD_SQRT == pytest.approx(max_norm, abs=1e-7)
    np.testing.assert_allclose(color_matrix().numpy(), published / 0.4619524, rtol=1e-6)
    assert torch.linalg.norm(color_matrix(), dim=0).max().item() == pytest.approx(1.0, abs=1e-6)


def lucid_scale(h, w, decay):
    """lucid fft_image: 1 / max(freqs, 1/max(w, h)) ** decay_power; the image is irfft2(...) / 4."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + 1 + w % 2]  # lucid rfft2d_freqs
    fx = fx[: w // 2 + 1]
    freqs = np.sqrt(fx * fx + fy * fy)
    return 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay


@pytest.mark.parametrize("h, w, decay", [(8, 8, 1.0), (7, 10, 1.0), (16, 9, 1.5), (224, 224, 1.0)])
def test_fft_scale_matches_lucid(h, w, decay):
    np.testing.assert_allclose(fft_scale(h, w, decay).numpy(), lucid_scale(h, w, decay) / 4, rtol=1e-5)


def test_fft_scale_published_numbers():
    s = fft_scale(8, 8, 1.0) * 4  # without lucid's /4
    assert s[0, 0].item() == pytest.approx(8.0)  # DC: floor 1/max(w, h)
    assert s[0, 1].item() == pytest.approx(8.0)  # |f| = 1/8
    assert s[0, 4].item() == pytest.approx(2.0)  # |f| = 1/2 (Nyquist)
    assert s[4, 4].item() == pytest.approx(1 / np.sqrt(0.5), rel=1e-6)


def lucid_fft_image(spectrum: np.ndarray, h: int, w: int, decorrelate: bool) -> np.ndarray:
    """lucid's whole FFT parameterization in numpy, written from lucid's source (param/spatial.py fft_image,
    param/color.py to_valid_rgb): scale * sqrt(w * h), numpy's unnormalised inverse DFT (1 / (h * w)), / 4,
    then t_flat @ (C / max_norm).T per pixel and the sigmoid. ``spectrum``: (B, 3, h, w//2+1, 2)."""
    scale = lucid_scale(h, w, 1.0) * np.sqrt(w * h)
    t = np.fft.irfft2(scale * (spectrum[..., 0] + 1j * spectrum[..., 1]), s=(h, w)) / 4.0
    if decorrelate:
        published = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
        c = published / np.max(np.linalg.norm(published, axis=0))
        t = np.einsum("bchw,oc->bohw", t, c)  # lucid: tf.matmul(t_flat, C.T), t_flat rows are pixels
    return 1.0 / (1.0 + np.exp(-t))


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (224, 224)])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_fft_image_is_lucids_forward(size, decorrelate):
    # the same spectrum through make_param("fft") and lucid's formula: 1/f scale and its normalisation, the
    # divide-by-4, the colour matrix (and which way round it is applied) and the sigmoid, all at once; the
    # spectrum is large so that colours saturate (the sigmoid's curved part) and a wrong matrix shows
    h, w = size
    params, image_fn = make_param("fft", 2, size, generator=torch.Generator(), decorrelate=decorrelate)
    spectrum = np.random.default_rng(0).normal(scale=2.0, size=tuple(params[0].shape))
    with torch.no_grad():
        params[0].copy_(torch.from_numpy(spectrum))
        ours = image_fn().double().numpy()
    want = lucid_fft_image(spectrum, h, w, decorrelate)
    assert want.std() > 0.1  # far from grey: the check sees the colour matrix and the sigmoid
    np.testing.assert_allclose(ours, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind", ["pixel", "fft"])
@pytest.mark.parametrize("size", [(16, 16), (15, 22)])
def test_init_from_image_renders_back(kind, size):
    target = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    params, image_fn = make_param(kind, 2, size, generator=torch.Generator(), init=target)
    with torch.no_grad():
        out = image_fn()
    torch.testing.assert_close(out, target, atol=2e-5, rtol=0)
    assert all(p.requires_grad for p in params)


def test_maco_keeps_the_magnitude_and_optimises_the_phase():
    params, image_fn = make_param("maco", 2, (32, 32), generator=torch.Generator().manual_seed(0))
    (phase,) = params
    assert phase.shape == (2, 3, 32, 17)
    image = image_fn()
    assert image.shape == (2, 3, 32, 32) and 0 < image.min() and image.max() < 1
    image.mean().backward()
    assert phase.grad is not None and phase.grad.abs().sum() > 0
    # started from an image, it keeps that image's phase: strongly correlated with it
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.nn.functional.avg_pool2d(target, 3, 1, 1)  # some structure
    _, image_fn = make_param("maco", 1, (32, 32), generator=torch.Generator(), init=target)
    with torch.no_grad():
        out = image_fn()
    corr = torch.corrcoef(torch.stack([out.flatten(), target.flatten()]))[0, 1]
    assert corr > 0.5


@pytest.mark.parametrize("kind", ["pixel", "fft", "maco"])
def test_seed_decides_the_initial_image(kind):
    def first(seed):
        _, fn = make_param(kind, 2, (12, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return fn()
    a, b, c = first(5), first(5), first(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image of a batch has its own start
    if kind != "maco":  # lucid's start: grey plus a little noise
        assert (a - 0.5).abs().max() < 0.1


def test_bad_arguments():
    with pytest.raises(InvalidSpec, match="unknown parameterization"):
        make_param("cppn", 1, (8, 8), generator=torch.Generator())
    with pytest.raises(InvalidSpec) as err:
        make_param("fft", 2, (8, 8), generator=torch.Generator(), init=torch.rand(3, 9, 8))
    assert err.value.field == "init_image"


def test_params_share_their_constants_per_size_and_decay_and_the_public_ones_stay_fresh():
    from featureviz.kernels import spectrum_to_image

    size = (12, 20)
    color_matrix().mul_(0.0)  # the public functions give fresh tensors: writing to one changes no render
    fft_scale(*size, 1.0).mul_(0.0)
    made = {}
    for decay in (1.0, 1.5, None, 2.0):
        params, image_fn = make_param("fft", 1, size, generator=torch.Generator().manual_seed(1), decay=decay)
        with torch.no_grad():
            ours = image_fn()
            want = spectrum_to_image(params[0], fft_scale(*size, 1.0 if decay is None else decay), color_matrix(),
                                     size, sigmoid=True)
        torch.testing.assert_close(ours, want, rtol=0, atol=0)  # each decay its own scale
        made[decay] = ours
    assert torch.equal(made[1.0], made[None]) and not torch.equal(made[1.0], made[1.5])

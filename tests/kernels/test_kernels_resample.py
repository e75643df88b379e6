"""affine_resample: the float64 reference pins the map, the Triton kernel matches it forward and backward.

Only the image gradient is checked: theta, matrix and bias are constants of a render step (the kernel does
not produce their gradients, and the dispatcher refuses to run it when they require one).
"""

import math

import pytest
import torch

from featureviz.kernels import reference
from featureviz.kernels import resample

# fp32 kernel vs float64: source coordinates are computed in fp32, so a tap weight is off by about
# 2^-24 * W (1e-6 at these sizes); with inputs in [0, 1] and colour maps of unit size that bounds the output
# and gradient errors near 1e-5 relative to max|ref| (2e-6 observed). A wrong tap or weight is off by >1e-2.
# There is no tl.dot here, so TF32 does not enter and the same bound holds on a GPU.
TOL = 2e-5


def _theta(batch, *, gen, scale=(0.8, 1.25), degrees=15.0, shift=0.2):
    """Random rotate / scale / translate, as the standard transforms compose them (inverse map, normalized)."""
    s = torch.empty(batch).uniform_(*scale, generator=gen)
    a = torch.empty(batch).uniform_(-degrees, degrees, generator=gen) * math.pi / 180
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * torch.cos(a), -s * torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = s * torch.sin(a), s * torch.cos(a)
    theta[:, :, 2] = torch.empty(batch, 2).uniform_(-shift, shift, generator=gen)
    return theta


def _run_both(image, theta, size, *, border, matrix, bias, device):
    """Kernel output and image gradient, and the float64 reference's, for one random output gradient."""
    image = image.to(device).requires_grad_(True)
    colour = {"matrix": matrix, "bias": bias}
    colour = {k: None if v is None else v.to(device) for k, v in colour.items()}
    out = resample.affine_resample(image, theta.to(device), size, border=border, **colour)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(device)
    (grad_image,) = torch.autograd.grad(out, image, grad_out)

    ref_image = image.detach().cpu().double().requires_grad_(True)
    ref_colour = {k: None if v is None else v.cpu().double() for k, v in colour.items()}
    ref = reference.affine_resample(ref_image, theta.double(), size, border=border, **ref_colour)
    (ref_grad,) = torch.autograd.grad(ref, ref_image, grad_out.cpu().double())
    return out, grad_image, ref, ref_grad


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    theta = _theta(2, gen=gen).double()
    matrix = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: reference.affine_resample(x, theta, (4, 7), border=0.3, matrix=matrix), (image,))


def test_reference_border_is_constant_outside():
    image = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    far = torch.tensor([[[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)  # samples 2 image-widths right
    out = reference.affine_resample(image, far, (4, 4), border=0.25)
    assert torch.equal(out, torch.full_like(out, 0.25))


# (batch, C, Co, H, W, Ho, Wo, transform): even/odd sizes, batch 1 and several, same size, down- and upsampling
# (the backward's candidate window grows with the zoom), grey -> RGB, no colour map.
CASES = [
    (1, 3, 3, 16, 16, 16, 16, {}),
    (3, 3, 3, 9, 13, 9, 13, {}),
    (2, 3, 3, 23, 18, 11, 9, {"scale": (0.9, 1.1)}),
    (2, 1, 3, 8, 9, 17, 14, {"degrees": 40.0}),
    (2, 3, 3, 12, 12, 12, 12, {"scale": (0.3, 0.5), "shift": 0.6}),
]


@pytest.mark.parametrize("batch, channels, out_channels, height, width, out_h, out_w, transform", CASES)
def test_kernel_matches_float64_reference(batch, channels, out_channels, height, width, out_h, out_w, transform,
                                          kernel_device, assert_close):
    gen = torch.Generator().manual_seed(batch * 1000 + height * width + out_h)
    image = torch.rand(batch, channels, height, width, generator=gen)
    theta = _theta(batch, gen=gen, **transform)
    matrix = torch.randn(out_channels, channels, generator=gen)
    bias = torch.randn(out_channels, generator=gen)
    out, grad_image, ref, ref_grad = _run_both(image, theta, (out_h, out_w), border=0.4, matrix=matrix, bias=bias,
                                               device=kernel_device)
    assert out.dtype == torch.float32 and out.shape == (batch, out_channels, out_h, out_w)
    assert_close(out, ref, TOL, "output")
    assert_close(grad_image, ref_grad, TOL, "d image")


def test_kernel_identity_map_without_colour_returns_the_image(kernel_device):
    image = torch.rand(2, 3, 7, 10, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=kernel_device).expand(2, 2, 3)
    out = resample.affine_resample(image, identity, (7, 10))
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, theta", [
    ("outside", [[1.0, 0.0, 5.0], [0.0, 1.0, -4.0]]),     # every sample beyond the border
    ("singular", [[0.5, 0.0, 0.1], [0.0, 0.0, 0.2]]),      # det = 0: one row sampled everywhere
    ("mirror", [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),      # det < 0
])
def test_kernel_degenerate_maps(name, theta, kernel_device, assert_close):
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 8, 7, generator=gen)
    theta = torch.tensor([theta])
    out, grad_image, ref, ref_grad = _run_both(image, theta, (6, 9), border=0.5, matrix=None, bias=None,
                                               device=kernel_device)
    assert_close(out, ref, TOL, f"{name} output")
    if name == "outside":
        assert torch.equal(grad_image, torch.zeros_like(grad_image))
    else:
        assert_close(grad_image, ref_grad, TOL, f"{name} d image")


def test_kernel_backward_is_deterministic(kernel_device):
    gen = torch.Generator().manual_seed(9)
    image = torch.rand(2, 3, 12, 12, generator=gen).to(kernel_device).requires_grad_(True)
    theta = _theta(2, gen=gen).to(kernel_device)
    grads = []
    for _ in range(2):
        out = resample.affine_resample(image, theta, (10, 10))
        grads.append(torch.autograd.grad(out.square().sum(), image)[0])
    assert torch.equal(grads[0], grads[1])


def test_kernel_rejects_a_theta_of_the_wrong_batch(kernel_device):
    image = torch.rand(2, 3, 4, 4, device=kernel_device)
    with pytest.raises(ValueError, match=r"theta must be \(2, 2, 3\)"):
        resample.affine_resample(image, torch.zeros(3, 2, 3, device=kernel_device), (4, 4))


@pytest.mark.gpu
def test_kernel_at_224_on_gpu(assert_close):
    gen = torch.Generator().manual_seed(224)
    image = torch.rand(8, 3, 256, 256, generator=gen)
    theta = _theta(8, gen=gen)
    matrix = torch.diag(torch.tensor([1 / 0.229, 1 / 0.224, 1 / 0.225])).flip(0)   # BGR + 1/std
    bias = -torch.tensor([0.406, 0.456, 0.485]) / torch.tensor([0.225, 0.224, 0.229])
    out, grad_image, ref, ref_grad = _run_both(image, theta, (224, 224), border=0.5, matrix=matrix, bias=bias,
                                               device="cuda")
    assert_close(out, ref, 1e-4, "output")
    assert_close(grad_image, ref_grad, 1e-4, "d image")


@pytest.mark.parametrize("size", [(7, 9), (16, 16), (1, 5)])
def test_reference_grid_is_torchs_affine_grid(size):
    theta = _theta(5, gen=torch.Generator().manual_seed(4)).double()
    want = torch.nn.functional.affine_grid(theta, [5, 3, *size], align_corners=False)
    torch.testing.assert_close(reference.affine_grid(theta, size), want, atol=1e-12, rtol=0)


def test_nearest_resample_moves_whole_pixels_exactly_with_the_border():
    from featureviz.kernels import nearest_resample

    img = torch.rand(3, 2, 6, 7, generator=torch.Generator().manual_seed(1))
    shifts = [(2, -1), (0, 0), (-3, 2)]  # (x, y) pixels the picture moves
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    for i, (dx, dy) in enumerate(shifts):  # output -> input, normalised: x_in = x_out - 2 dx / W
        theta[i, 0, 2], theta[i, 1, 2] = -2 * dx / 7, -2 * dy / 6
    out = nearest_resample(img, theta, (6, 7), border=0.25)
    for i, (dx, dy) in enumerate(shifts):
        want = torch.full_like(img[i], 0.25)
        src = img[i][:, max(0, -dy):6 - max(0, dy), max(0, -dx):7 - max(0, dx)]
        want[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
        assert torch.equal(out[i], want)


def _grid_nearest(image, theta, size, border, matrix, bias):
    """torch's own nearest resample, written out (the grid path the slices replace)."""
    grid = torch.nn.functional.affine_grid(theta, [image.shape[0], image.shape[1], *size], align_corners=False)
    out = torch.nn.functional.grid_sample(image - border, grid, mode="nearest", padding_mode="zeros",
                                          align_corners=False) + border
    return torch.einsum("oc,bchw->bohw", matrix, out) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("in_size,out_size", [((30, 26), (30, 26)), ((30, 26), (22, 20)), ((12, 14), (18, 16))])
def test_whole_pixel_translations_are_slices_with_torchs_numbers(in_size, out_size):
    """Nearest resamples of whole-pixel translations at the input's pixel size (the jitters and the view of the
    standard stack) take the slicing path on a CPU: the numbers of torch's grid_sample, forward and gradient,
    including windows that leave the image (border) and offsets with float noise."""
    gen = torch.Generator().manual_seed(7)
    (h, w), (oh, ow) = in_size, out_size
    image = torch.rand(4, 3, h, w, generator=gen, dtype=torch.float64).requires_grad_(True)
    offsets = [(0, 0), (3, -2), (-h, 5), (-4, w - 1)]  # (dy, dx): the second-last and last reach past the image
    theta = torch.zeros(4, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = ow / w, oh / h
    for i, (dy, dx) in enumerate(offsets):  # pixel offset -> normalised translation, with float noise
        theta[i, 0, 2] = (2 * dx - w + ow) / w + 1e-7 * (i - 1)
        theta[i, 1, 2] = (2 * dy - h + oh) / h - 1e-7 * i
    assert reference.whole_pixel_shifts(theta, (h, w), out_size) == offsets
    matrix = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    grad = torch.randn(4, 3, oh, ow, generator=gen, dtype=torch.float64)
    out = reference.affine_resample(image, theta, out_size, border=0.3, matrix=matrix, bias=bias, mode="nearest")
    want = _grid_nearest(image, theta, out_size, 0.3, matrix, bias)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(out, image, grad)[0], torch.autograd.grad(want, image, grad)[0],
                               atol=1e-12, rtol=0)


def test_maps_that_are_not_whole_pixel_translations_keep_the_grid():
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).repeat(3, 1, 1)
    assert reference.whole_pixel_shifts(theta, (10, 10), (10, 10)) == [(0, 0)] * 3
    half = theta.clone()
    half[1, 0, 2] = 0.06  # 0.3 px at 10 px
    turned = theta.clone()
    turned[2, 0, 1] = 0.01
    zoomed = theta * 1.1
    for t in (half, turned, zoomed):
        assert reference.whole_pixel_shifts(t, (10, 10), (10, 10)) is None
    image = torch.rand(3, 2, 10, 10, generator=torch.Generator().manual_seed(2))
    eye, zero = torch.eye(2), torch.zeros(2)
    torch.testing.assert_close(reference.affine_resample(image, half, (10, 10), border=0.1, mode="nearest"),
                               _grid_nearest(image, half, (10, 10), 0.1, eye, zero), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_reference_samples_one_image_the_same_way_on_any_thread_count(mode):
    """One CPU image on several threads is sampled as a batch of one-channel images: the same numbers."""
    image = torch.rand(1, 3, 20, 17, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    theta = _theta(1, gen=torch.Generator().manual_seed(5))
    grad = torch.randn(1, 3, 15, 16, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = reference.affine_resample(image, theta, (15, 16), border=0.2, mode=mode)
            results.append((out, *torch.autograd.grad(out, image, grad)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

"""FEATUREVIZ_KERNELS dispatch, its error messages, and a short render with the Triton kernels vs the references."""

import warnings

import pytest
import torch

import featureviz.kernels as kernels
from featureviz.kernels import _dispatch
from featureviz.kernels import fft_image
from featureviz.kernels import reference
from featureviz.kernels import resample


def _spectrum_args(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    spectrum = torch.randn(2, 3, 6, 4, 2, generator=gen).to(device, dtype)
    scale = torch.rand(6, 4, generator=gen).to(device, dtype)
    color = torch.randn(3, 3, generator=gen).to(device, dtype)
    return spectrum, scale, color, (6, 7)


def _resample_args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 6, 6, generator=gen).to(device)
    theta = torch.tensor([[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]).expand(2, 2, 3).contiguous().to(device)
    return image, theta, (5, 5)


def test_unknown_mode_names_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"FEATUREVIZ_KERNELS='cuda' is not one of auto, torch, triton"):
        kernels.spectrum_to_image(*_spectrum_args())


@pytest.mark.parametrize("mode", ["auto", "torch", ""])
def test_cpu_tensors_use_the_reference_unless_triton_is_asked_for(monkeypatch, mode):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", mode)
    args = _spectrum_args()
    spectrum = args[0].requires_grad_(True)
    image = kernels.spectrum_to_image(*args)
    assert "SpectrumToImageFunction" not in type(image.grad_fn).__name__
    assert torch.equal(image, reference.spectrum_to_image(*args))
    image, theta, size = _resample_args()
    assert torch.equal(kernels.affine_resample(image, theta, size), reference.affine_resample(image, theta, size))
    assert spectrum.requires_grad


def test_triton_mode_runs_the_kernels(monkeypatch, assert_close):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "triton")
    spectrum, scale, color, size = _spectrum_args()
    spectrum.requires_grad_(True)
    image = kernels.spectrum_to_image(spectrum, scale, color, size)
    assert type(image.grad_fn).__name__ == "SpectrumToImageFunctionBackward"
    assert_close(image, reference.spectrum_to_image(spectrum.double(), scale.double(), color.double(), size), 1e-5,
                 "image")
    out = kernels.affine_resample(*_resample_args(), matrix=torch.eye(3), bias=torch.zeros(3))
    assert out.shape == (2, 3, 5, 5)


def test_triton_mode_refuses_what_the_kernel_does_not_cover(monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "triton")
    with pytest.raises(ValueError, match="does not support inputs other than float32"):
        kernels.spectrum_to_image(*_spectrum_args(dtype=torch.float64))
    spectrum, scale, color, size = _spectrum_args()
    with pytest.raises(ValueError, match="does not support a gradient for color"):
        kernels.spectrum_to_image(spectrum, scale, color.requires_grad_(True), size)
    with pytest.raises(ValueError, match="does not support a scale per image or channel"):
        kernels.spectrum_to_image(spectrum, scale.expand(2, 3, 6, 4), color.detach(), size)
    image, theta, size = _resample_args()
    with pytest.raises(ValueError, match="does not support a gradient for theta"):
        kernels.affine_resample(image, theta.requires_grad_(True), size)


def test_auto_mode_gives_constants_their_gradient_through_the_reference(monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "auto")
    spectrum, scale, color, size = _spectrum_args(device="cuda" if torch.cuda.is_available() else "cpu")
    color.requires_grad_(True)
    kernels.spectrum_to_image(spectrum, scale, color, size).sum().backward()
    assert color.grad is not None and color.grad.abs().sum() > 0


def test_unknown_dot_precision_is_refused(monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "triton")
    monkeypatch.setenv("FEATUREVIZ_KERNELS_PRECISION", "bf16")
    with pytest.raises(ValueError, match="FEATUREVIZ_KERNELS_PRECISION='bf16' is not one of tf32, tf32x3, ieee"):
        kernels.spectrum_to_image(*_spectrum_args())


def test_a_gpu_compiled_kernel_on_cpu_tensors_says_how_to_enable_the_interpreter():
    from triton.runtime.jit import JITFunction

    compiled = JITFunction(fft_image._spectrum_to_image_forward_kernel.fn)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment before"):
        _dispatch.require_runnable(compiled, torch.zeros(1))


@pytest.mark.gpu
def test_auto_mode_uses_triton_on_cuda(monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "auto")
    spectrum, scale, color, size = _spectrum_args(device="cuda")
    spectrum.requires_grad_(True)
    assert type(kernels.spectrum_to_image(spectrum, scale, color, size).grad_fn).__name__ == \
        "SpectrumToImageFunctionBackward"


@pytest.mark.gpu
def test_auto_mode_renders_large_spectrum_batches_with_cufft_and_triton_mode_keeps_the_kernel(monkeypatch):
    spectrum, scale, color, size = _spectrum_args(device="cuda")
    large = spectrum.repeat(kernels.SPECTRUM_TRITON_MAX_BATCH, 1, 1, 1, 1).requires_grad_(True)
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "auto")
    assert type(kernels.spectrum_to_image(large, scale, color, size).grad_fn).__name__ != \
        "SpectrumToImageFunctionBackward"
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "triton")
    assert type(kernels.spectrum_to_image(large, scale, color, size).grad_fn).__name__ == \
        "SpectrumToImageFunctionBackward"


def test_a_kernel_measured_slower_is_skipped_by_auto_only(monkeypatch):
    pytest.importorskip("triton")
    cuda_like = torch.zeros(1, device="meta")  # use_triton reads only the devices
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "auto")
    assert _dispatch.use_triton("op", (cuda_like,), None) is True
    assert _dispatch.use_triton("op", (cuda_like,), None, slower=True) is False
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "triton")
    assert _dispatch.use_triton("op", (cuda_like,), None, slower=True) is True


# --- end to end: a short render with the Triton kernels matches the references -----------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    importer = pytest.importorskip("featureviz.importer", reason="featureviz.importer is not importable")
    from support.models import TinyNet
    from support.models import export_onnx

    torch.manual_seed(0)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        data = export_onnx(TinyNet(), size=24, dynamic_axes={"image": {0: "batch"}})  # a fixed 24x24 input
    return importer.import_model(data, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.mark.slow  # ~10 s on 2 cores: the interpreter runs one step of both kernels, forward and backward
@pytest.mark.parametrize("transforms", ["standard", "composed"])  # a resample per random step / one resample
def test_a_render_step_with_triton_matches_torch(tiny_model, monkeypatch, first_step, close_in_norm, transforms):
    try:
        from featureviz.engine.render import RenderSpec
    except ImportError as exc:
        pytest.skip(f"featureviz.engine.render is not importable yet: {exc}")
    layer = "/Relu_1"  # TinyNet's last spatial layer (16 channels)

    def spec():
        return RenderSpec(objective={"channel": {"layer": layer, "channel": 3}}, size=24, batch=2, seed=5,
                          param="fft", transforms=transforms, device="cpu")

    calls = {"fft": 0, "resample": 0}
    for module, name, key in ((fft_image, "spectrum_to_image_forward", "fft"),
                              (resample, "affine_resample_forward", "resample")):
        launcher = getattr(module, name)

        def counted(*args, _launcher=launcher, _key=key, **kwargs):
            calls[_key] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    monkeypatch.setenv("FEATUREVIZ_KERNELS", "torch")
    expected_values, expected_grads = first_step(tiny_model, spec())
    assert calls == {"fft": 0, "resample": 0}
    monkeypatch.setenv("FEATUREVIZ_KERNELS", "triton")
    values, grads = first_step(tiny_model, spec())
    assert calls["fft"] >= 1 and calls["resample"] >= 1, calls

    # One step, compared where the two paths must agree: the objective with the step's random transforms
    # (the forward of both kernels) and the gradient on the spectrum (both backwards). The kernels differ from
    # the references by ~1e-6 relative; a wrong kernel is off by O(1). No Adam steps are compared: rounding
    # decides their trajectories (tests/conftest.py).
    torch.testing.assert_close(values, expected_values, rtol=1e-4, atol=1e-6)
    close_in_norm(grads, expected_grads, rtol=1e-4)

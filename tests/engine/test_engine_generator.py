"""The generator parameterization (issue 25): an imported generator's latent is optimised instead of pixels.

The generators are ``support.generators.TinyGenerator`` with random-init weights (no training): these tests check
what the importer reads of the graph, the refusals, the mapping of the output range to [0, 1], the latent penalty and
the batching, none of which depends on what the generator learned. A trained one is bench/train_generator.py's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import render  # noqa: E402
from featureviz.engine import validate  # noqa: E402
from featureviz.engine.batch import BatchEngine  # noqa: E402
from featureviz.engine.batch import Slot  # noqa: E402
from featureviz.engine.params import render_group  # noqa: E402
from featureviz.errors import InvalidSpec  # noqa: E402
from featureviz.errors import ModelImportError  # noqa: E402
from featureviz.importer import import_model  # noqa: E402
from support.generators import TinyGenerator  # noqa: E402
from support.generators import export_generator  # noqa: E402
from support.models import TinyNet  # noqa: E402
from support.models import export_onnx  # noqa: E402

OBJECTIVE = {"channel": {"layer": "/Relu", "channel": 1}}


def _generator(**kwargs):
    torch.manual_seed(0)
    return import_model(export_generator(TinyGenerator(**kwargs)), use_cache=False)


@pytest.fixture(scope="module")
def tanh_gen():
    return _generator()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return import_model(export_onnx(TinyNet()), use_cache=False)


def test_the_importer_reads_the_latent_the_image_and_the_range_from_the_graph(tanh_gen):
    info = tanh_gen.generator
    assert (info.latent, info.channels, info.height, info.width) == (16, 3, 16, 16)
    assert (info.low, info.high, info.last_op) == (-1.0, 1.0, "Tanh")
    assert tanh_gen.input_spec.latent == 16 and tanh_gen.input_spec.layout == "NC"
    grey = _generator(channels=1, last="sigmoid", latent_4d=True, latent=8)
    assert (grey.generator.latent, grey.generator.channels, grey.generator.low, grey.generator.high) == (8, 1, 0.0, 1.0)
    assert grey.input_spec.layout == "NCHW" and grey.input_spec.shape(2) == (2, 8, 1, 1)
    clip = _generator(last="clip")
    assert (clip.generator.low, clip.generator.high, clip.generator.last_op) == (-2.0, 2.0, "Clip")


@pytest.mark.parametrize("kwargs, reason, words", [
    ({"round": True}, "NOT_DIFFERENTIABLE", "(Round)"),
    ({"last": "none"}, "UNSUPPORTED_GENERATOR", "last op is 'Conv'"),
    ({"channels": 2}, "UNSUPPORTED_GENERATOR", "1 or 3 channels"),
])
def test_an_unusable_generator_is_refused_with_one_line_naming_why(kwargs, reason, words):
    with pytest.raises(ModelImportError) as err:
        _generator(**kwargs)
    assert err.value.reason == reason and words in str(err.value) and "\n" not in str(err.value)


def test_a_generator_job_raises_its_objective_and_its_image_is_the_generators_output_in_range(model, tanh_gen):
    # measured over seeds 0..9 x 2 images (10 steps, lr 0.5): starts 0.009 to 0.039, gains 0.049 to 0.084, ends
    # 2.3x to 10x the start; the bounds: a gain above 0.025 and an end above 1.5x the start
    for seed in range(2):
        result = render(model, RenderSpec(objective=OBJECTIVE, steps=10, lr=0.5, size=16, batch=2, seed=seed,
                                          param="generator", generator=tanh_gen))
        for start, end in zip(result.objective_start, result.objective_end):
            assert end - start > 0.025 and end > 1.5 * start, (seed, start, end)
        assert result.images.shape == (2, 3, 16, 16)
        assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0
    # the image is the generator's output at the slot's latent, mapped from [-1, 1] to [0, 1]
    slot = Slot(model, RenderSpec(objective=OBJECTIVE, size=16, batch=2, param="generator", generator=tanh_gen),
                device=torch.device("cpu"))
    (latent,) = slot.params
    with torch.no_grad():
        assert torch.allclose(slot.image_fn(), (tanh_gen.module(latent) + 1) / 2, atol=1e-6)


def test_the_image_is_resized_to_the_render_size_and_grey_is_repeated_to_rgb(model):
    grey = _generator(channels=1, last="sigmoid")
    grey_model_spec = RenderSpec(objective=OBJECTIVE, size=24, param="generator", generator=grey)
    with pytest.raises(InvalidSpec) as err:  # a 1-channel generator for a 3-channel model
        validate(model, grey_model_spec)
    assert err.value.field == "generator" and "1-channel images; the model takes 3-channel" in str(err.value)
    from featureviz.engine.params import make_param

    _, image_fn = make_param("generator", 2, (24, 20), generator=torch.Generator().manual_seed(0),
                             image_generator=grey)
    image = image_fn()
    assert image.shape == (2, 3, 24, 20) and torch.equal(image[:, 0], image[:, 1])


def test_the_latent_penalty_is_subtracted_and_shrinks_the_latent(model, tanh_gen):
    spec = dict(objective=OBJECTIVE, steps=1, size=16, seed=4, param="generator", generator=tanh_gen)
    plain = render(model, RenderSpec(**spec))
    penalised = render(model, RenderSpec(**spec, latent_l2=0.5))
    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(4))  # the slot's start: the same seed's draw
    expected = plain.objective_start[0] - 0.5 * float(z.pow(2).sum())
    assert penalised.objective_start[0] == pytest.approx(expected, rel=1e-5)
    slot = Slot(model, RenderSpec(**{**spec, "steps": 8}, latent_l2=5.0, lr=0.25), device=torch.device("cpu"))
    start = float(slot.params[0].norm())
    engine = BatchEngine("cpu")
    engine.join([slot])
    for _ in range(8):
        engine.step([slot])
    assert float(slot.params[0].norm()) < 0.5 * start


def test_slots_of_one_generator_render_in_one_forward_of_it(model, tanh_gen):
    specs = [RenderSpec(objective=OBJECTIVE, size=16, batch=b, seed=s, param="generator", generator=tanh_gen)
             for b, s in ((2, 0), (1, 1))]
    slots = [Slot(model, spec, device=torch.device("cpu")) for spec in specs]
    calls = []
    hook = tanh_gen.module.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            together = render_group([s.image_fn for s in slots])
        assert calls == [(3, 16)]  # one forward for both slots' three latents
        with torch.no_grad():
            alone = torch.cat([s.image_fn() for s in slots])
        assert torch.allclose(together, alone, atol=1e-5)
        calls.clear()
        engine = BatchEngine("cpu")
        engine.join(slots)
        calls.clear()
        engine.step(slots)
        assert calls == [(3, 16)]  # one device step: one forward of the generator
    finally:
        hook.remove()


def test_a_generator_is_refused_as_the_rendered_model_and_with_another_param(model, tanh_gen):
    with pytest.raises(InvalidSpec) as err:
        validate(model, RenderSpec(objective=OBJECTIVE, param="fft", generator=tanh_gen))
    assert err.value.field == "generator"
    with pytest.raises(InvalidSpec) as err:
        validate(model, RenderSpec(objective=OBJECTIVE, param="generator"))
    assert err.value.field == "generator"
    with pytest.raises(InvalidSpec) as err:
        validate(model, RenderSpec(objective=OBJECTIVE, param="generator", generator=model))  # a classifier
    assert err.value.field == "generator" and "not a generator" in str(err.value)


def test_a_grey_generator_drives_a_grey_model():
    import io

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.rand(1, 1, 16, 16), buffer, input_names=["image"], output_names=["out"],
                      dynamic_axes={"image": {0: "batch", 2: "h", 3: "w"}}, opset_version=17, dynamo=False)
    grey_model = import_model(buffer.getvalue(), use_cache=False)
    assert grey_model.input_spec.channels == 1
    grey = _generator(channels=1, last="sigmoid")
    layer = grey_model.layers[-1].name
    result = render(grey_model, RenderSpec(objective={"channel": {"layer": layer, "channel": 0}}, steps=3, size=16,
                                           param="generator", generator=grey))
    assert result.images.shape == (1, 3, 16, 16) and torch.equal(result.images[:, 0], result.images[:, 2])

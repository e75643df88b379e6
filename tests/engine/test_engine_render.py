"""The render loop on the real trained EfficientNet-Lite0: every objective kind rises, seeds, callbacks,
validation, negative optimisation through a pre-activation, dead units, diversity."""

import threading

import pytest
import torch

from featureviz.engine import RenderSpec
from featureviz.engine import render
from featureviz.engine import validate
from featureviz.engine.transforms import Transforms
from featureviz.errors import Diverged
from featureviz.errors import InvalidSpec

# layers of EfficientNet-Lite0 (catalog names of the zoo's ONNX export)
MID = "/_blocks.4/_swish/Clip"  # 240 channels, 28 x 28 at 224 (a ReLU6 output)
MID_PRE = "/_blocks.4/_expand_conv/Conv"  # its pre-activation (BatchNorm folded into the conv)
SIZE = 64  # the dynamic-size export takes the 64 x 64 image as it is: fast on two CPU cores
VECTOR = torch.randn(240, generator=torch.Generator().manual_seed(0)).tolist()


def chan(layer, c):
    return {"channel": {"layer": layer, "channel": c}}


KINDS = {
    "neuron": ({"neuron": {"layer": MID, "channel": 5}}, 2),
    "neuron_at": ({"neuron": {"layer": MID, "channel": 5, "x": 1, "y": 2}}, 2),
    "channel": (chan(MID, 5), 2),
    "layer": ({"layer": {"layer": MID}}, 2),
    "logit": ({"logit": {"index": 1}}, 1),
    "prob": ({"prob": {"index": 1}}, 1),  # harder than a logit: 96 px, 24 steps (see OVERRIDES)
    "direction": ({"direction": {"layer": MID, "vector": VECTOR}}, 2),
    "direction_cossim": ({"direction": {"layer": MID, "vector": VECTOR, "cossim_pow": 1.0}}, 2),
    "neuron_direction": ({"neuron_direction": {"layer": MID, "vector": VECTOR}}, 2),
    "interpolate": ({"interpolate": {"a": chan(MID, 5), "b": chan(MID, 9)}}, 3),
    "diversity": ({"diversity": {"layer": MID}}, 3),
    # alignment pulls images together: start from three different images (from grey they are already alike)
    "alignment": ({"alignment": {"layer": MID}}, 3),
    "sum": ({"sum": [chan(MID, 5), {"scale": {"factor": -0.5, "objective": chan(MID, 9)}}]}, 2),
    "batch": ({"batch": {"index": 1, "objective": chan(MID, 5)}}, 2),
    "l1": ({"l1": {"constant": 0.5}}, 2),
    "l2": ({"l2": {"constant": 0.5}}, 2),
    "tv": ({"tv": {}}, 2),
    "blur": ({"blur": {}}, 2),
}
OVERRIDES = {"prob": dict(size=96, steps=24)}  # at 64 px the standard pad leaves ~47 px of picture: too little


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in OVERRIDES else k for k in KINDS])
def test_each_objective_kind_increases(lite0, kind):
    objective, batch = KINDS[kind]
    init = None
    if kind == "alignment":
        init = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    options = dict(steps=8, size=SIZE, batch=batch, seed=1, init_image=init) | OVERRIDES.get(kind, {})
    result = render(lite0, RenderSpec(objective=objective, **options))
    start, end = torch.tensor(result.objective_start), torch.tensor(result.objective_end)
    print(f"{kind}: {start.tolist()} -> {end.tolist()}")
    assert result.steps_done == options["steps"] and not result.cancelled
    assert result.images.shape == (batch, 3, options["size"], options["size"])
    assert 0 <= result.images.min() and result.images.max() <= 1
    if kind == "batch":  # only image 1 is optimised for; image 0's value is 0 throughout
        assert start[0] == 0 and end[0] == 0 and end[1] > start[1] + 1e-3
        return
    assert (end > start + 1e-4 * (1 + start.abs())).all(), (start, end)


def test_same_seed_same_images_and_other_seed_other_images(lite0):
    spec = dict(objective=chan(MID, 7), steps=3, size=SIZE, batch=2)
    a = render(lite0, RenderSpec(seed=3, **spec))
    b = render(lite0, RenderSpec(seed=3, **spec))
    c = render(lite0, RenderSpec(seed=4, **spec))
    assert torch.equal(a.images, b.images) and a.objective_end == b.objective_end
    assert not torch.equal(a.images, c.images)


def test_negative_optimisation_through_the_pre_activation(lite0):
    # a channel of the ReLU6 output cannot go below 0; minimised through its input (the conv before the clip)
    # it reaches a negative mean
    c = _start_channel(lite0, MID_PRE, lambda m: (m > 0.05) & (m < 0.3), batch=2)
    assert lite0.layer(MID_PRE).pre_activation_of == MID
    result = render(lite0, RenderSpec(objective={"scale": {"factor": -1.0, "objective": chan(MID_PRE, c)}},
                                      steps=16, size=SIZE, batch=2))
    print(f"pre-activation channel {c}: mean {[-v for v in result.objective_start]} -> "
          f"{[-v for v in result.objective_end]}")
    start = [-v for v in result.objective_start]
    end = [-v for v in result.objective_end]
    assert all(s > 0 for s in start), start
    assert all(e < 0 for e in end), end
    pre_alias = MID + ":pre"  # the catalog's alias of a clip's input
    assert lite0.layer(pre_alias).name == MID_PRE


def test_a_dead_relu_at_the_start_does_not_leave_a_grey_image(lite0):
    c = _channel_where(lite0, MID_PRE, lambda m: m < -1.0, reduce="max")
    # grey beyond the pad (the composed stack): the standard stack's black border, brought in by the random steps,
    # can wake the channel by itself, and the test needs an input that stays grey unless the image moves
    spec = dict(objective=chan(MID, c), steps=12, size=SIZE, batch=2, seed=0, transforms="composed")
    plain = render(lite0, RenderSpec(relu_warmup=0, **spec))
    warm = render(lite0, RenderSpec(**spec))  # default: 16 steps of lucid's redirected gradient
    assert max(plain.objective_start) < 1e-2  # dead on the grey start
    assert plain.objective_end == plain.objective_start  # no gradient: nothing moves
    assert plain.images.std() < 0.01  # grey
    assert min(warm.objective_end) > 0.5
    assert warm.images.std() > 0.03


def _start_channel(model, layer, test, batch):
    """The first channel of ``layer`` whose mean passes ``test`` on every start image of a render (seed 0): its own
    initial image in its own geometry (the image at its pixels, the noise of the initial spectrum included), not a
    grey stand-in."""
    from featureviz.engine.params import make_param
    from featureviz.engine.transforms import STANDARD_TRANSFORMS

    _, image_fn = make_param("fft", batch, (SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    plain = Transforms(STANDARD_TRANSFORMS, (SIZE, SIZE), (SIZE, SIZE), model.input_spec.preprocess).centred()
    with torch.no_grad():
        z = model.truncate([layer])(plain(image_fn()))[layer].mean(dim=(2, 3))
    return int(torch.nonzero(test(z).all(0))[0])


def _channel_where(model, layer, test, reduce="mean"):
    """The first channel of ``layer`` whose activation on a grey image passes ``test``."""
    plain = Transforms((), (SIZE, SIZE), (SIZE, SIZE), model.input_spec.preprocess)
    with torch.no_grad():
        z = model.truncate([layer])(plain(torch.full((1, 3, SIZE, SIZE), 0.5)))[layer][0]
    stat = z.amax(dim=(1, 2)) if reduce == "max" else z.mean(dim=(1, 2))
    return int(torch.nonzero(test(stat))[0])


def gram_cosine(model, layer, images):
    """Mean pairwise cosine similarity of the Gram matrices of ``layer`` for a batch (lower = more diverse)."""
    plain = Transforms((), tuple(images.shape[-2:]), tuple(images.shape[-2:]), model.input_spec.preprocess)
    with torch.no_grad():
        z = model.truncate([layer])(plain(images))[layer].flatten(2)
    grams = torch.nn.functional.normalize(torch.bmm(z, z.transpose(1, 2)).flatten(1), dim=-1)
    sim = grams @ grams.T
    n = len(images)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


@pytest.mark.slow
def test_diversity_term_makes_the_batch_more_diverse(lite0):
    target = chan(MID, 5)
    spec = dict(steps=16, size=SIZE, batch=4, seed=2)
    alone = render(lite0, RenderSpec(objective=target, **spec))
    diverse = render(lite0, RenderSpec(objective={"sum": [target, {"scale": {"factor": 10.0, "objective": {
        "diversity": {"layer": MID}}}}]}, **spec))
    without, with_ = gram_cosine(lite0, MID, alone.images), gram_cosine(lite0, MID, diverse.images)
    print(f"Gram cosine without diversity {without:.4f}, with {with_:.4f}")
    assert with_ < without - 0.02


def test_callbacks_snapshots_cancel_and_phases(lite0):
    seen, snaps = [], {}
    stop = threading.Event()

    def progress(step, total, values):
        seen.append((step, total, tuple(values.shape)))
        if step == 3:
            stop.set()

    result = render(lite0, RenderSpec(objective=chan(MID, 3), steps=10, size=SIZE, batch=2, snapshot_steps=(0, 2, 5)),
                    progress=progress, snapshot=lambda step, images: snaps.setdefault(step, images), cancel=stop)
    assert result.cancelled and result.steps_done == 3
    assert seen == [(1, 10, (2,)), (2, 10, (2,)), (3, 10, (2,))]
    assert sorted(snaps) == [0, 2] and snaps[2].shape == (2, 3, SIZE, SIZE)
    assert set(result.phase_seconds) == {"param", "transforms", "model", "optimizer"}
    assert all(v >= 0 for v in result.phase_seconds.values())  # measured, not asserted to be any size


@pytest.mark.gpu
def test_cuda_progress_comes_for_every_step_in_order_as_cpu_values(lite0):
    seen = []
    stop = threading.Event()

    def progress(step, total, values):
        seen.append((step, total, values.device.type, tuple(values.shape)))
        if step == 5:
            stop.set()

    result = render(lite0, RenderSpec(objective=chan(MID, 3), steps=12, size=SIZE, batch=2, device="cuda"),
                    progress=progress, cancel=stop)
    # handed over one step late: the step-5 callback comes after step 6 was queued, so the cancel lands at 6
    assert result.cancelled and result.steps_done == 6
    assert seen == [(k, 12, "cpu", (2,)) for k in range(1, 7)]


def test_init_image_is_the_start(lite0):
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    result = render(lite0, RenderSpec(objective=chan(MID, 3), steps=1, lr=1e-6, size=SIZE, init_image=image,
                                      transforms="none"))
    torch.testing.assert_close(result.images[0], image, atol=1e-3, rtol=0)


def test_regularizers_alone_need_no_model_layer(lite0):
    noise = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = render(lite0, RenderSpec(objective={"scale": {"factor": -1.0, "objective": {"tv": {}}}}, steps=3,
                                      size=16, param="pixel", transforms="none", init_image=noise))
    assert result.objective_end[0] > result.objective_start[0]


@pytest.mark.parametrize("param", ["pixel", "maco"])
def test_other_parameterizations_render(lite0, param):
    result = render(lite0, RenderSpec(objective=chan(MID, 5), steps=6, size=SIZE, param=param, batch=2))
    assert all(e > s for s, e in zip(result.objective_start, result.objective_end))


@pytest.mark.parametrize("changes, field, needle", [
    (dict(objective=chan("nope", 1)), "objective.channel.layer", "nope"),
    (dict(objective=chan(MID, 240)), "objective.channel.channel", "240 channels"),
    (dict(objective={"logit": {"index": 1000}}), "objective.logit.index", "1000 classes"),
    (dict(objective={"neuron": {"layer": MID, "channel": 1, "x": 8, "y": 0}}), "objective.neuron.x", "wide"),
    (dict(objective={"neuron": {"layer": "/_fc/Gemm", "channel": 1, "x": 0, "y": 0}}),
     "objective.neuron.x", "no spatial"),
    (dict(objective={"direction": {"layer": MID, "vector": [1.0, 2.0]}}), "objective.direction.vector", "240"),
    (dict(objective={"diversity": {"layer": MID}}, batch=1), "objective.diversity", "batch >= 2"),
    (dict(objective={"batch": {"index": 2, "objective": chan(MID, 1)}}, batch=2), "objective.batch.index", "batch"),
    (dict(steps=0), "steps", "[1, "),
    (dict(lr=-1.0), "lr", "> 0"),
    (dict(param="cppn"), "param", "fft"),
    (dict(size=4), "size", "[8, "),
    (dict(transforms="wobbly"), "transforms", "standard"),
    (dict(init_image=torch.zeros(3, 10, 10)), "init_image", "(3, 64, 64)"),
    (dict(snapshot_steps=(20,)), "snapshot_steps[0]", "[0, 10]"),
])
def test_validate_names_the_field(lite0, changes, field, needle):
    spec = dict(objective=chan(MID, 1), steps=10, size=SIZE, batch=2)
    spec.update(changes)
    with pytest.raises(InvalidSpec) as err:
        validate(lite0, RenderSpec(**spec))
    assert err.value.field == field
    assert needle in str(err.value)


@pytest.mark.parametrize("param", ["fft", "pixel"])
def test_a_diverging_render_stops_at_the_first_non_finite_step(lite0, param):
    seen = []
    with pytest.raises(Diverged) as err:
        render(lite0, RenderSpec(objective=chan(MID, 3), steps=20, lr=1e308, size=SIZE, param=param),
               progress=lambda step, total, values: seen.append(step))
    assert err.value.reason == "DIVERGED" and err.value.field == "lr"
    step = err.value.step
    assert 1 <= step < 20 and seen == list(range(1, step))  # every finite step was reported, none after
    assert f"at step {step}" in str(err.value) and "lower learning rate" in str(err.value)

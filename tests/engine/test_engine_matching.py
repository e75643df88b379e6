"""Exemplar matching (VITAL; issue 25 item 4) in the engine: the ``match`` term's text, JSON and proto forms; its
targets from a real exemplar index (the unit's top-k images run through the model once); the loss is zero when
the render IS an exemplar and positive otherwise; its gradient against finite differences (float64); a render
with the term runs, and unresolved or wrong terms are refused before any compute."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from featureviz import spec as specs  # noqa: E402
from featureviz.codec import objective_from_proto  # noqa: E402
from featureviz.codec import objective_to_proto  # noqa: E402
from featureviz.engine import objectives as O  # noqa: E402
from featureviz.engine.exemplars import ImageFolder  # noqa: E402
from featureviz.engine.exemplars import build_index  # noqa: E402
from featureviz.engine.images import decode_image  # noqa: E402
from featureviz.engine.matching import MatchTargets  # noqa: E402
from featureviz.engine.matching import index_targets  # noqa: E402
from featureviz.engine.matching import resample_sorted  # noqa: E402
from featureviz.engine.render import RenderSpec  # noqa: E402
from featureviz.engine.render import render  # noqa: E402
from featureviz.engine.render import validate  # noqa: E402
from featureviz.errors import InvalidSpec  # noqa: E402
from tests.support.images import noisy_png  # noqa: E402
from tests.support.models import TinyNet  # noqa: E402
from tests.support.models import export_onnx  # noqa: E402

UNIT = "/Relu_1"
SIZE = (32, 32)


@pytest.fixture(scope="module")
def model():
    from featureviz.importer import import_model

    torch.manual_seed(0)
    return import_model(export_onnx(TinyNet()), use_cache=False)


@pytest.fixture(scope="module")
def indexed(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    for i in range(10):
        (folder / f"img{i:02d}.png").write_bytes(noisy_png(40, seed=i))
    source = ImageFolder(folder)
    index = build_index(model, source, layers=[UNIT], k=8, size=SIZE, batch_size=5, workers=1)
    return index, source


def _targets(model, indexed, k, match_layer=UNIT):
    index, source = indexed
    return index_targets(model, index, source.read, layer=UNIT, channel=3, k=k, match_layer=match_layer,
                         size=SIZE)


def _acts(model, layer, images):
    from featureviz.engine.transforms import preprocess_map

    matrix, bias = preprocess_map(model.input_spec.preprocess, 3)
    x = torch.einsum("oc,nchw->nohw", matrix, images) + bias.view(1, -1, 1, 1)
    with torch.no_grad():
        return O.Activations(model.truncate([layer])(x), images)


def test_text_json_and_proto_forms():
    spec = specs.parse_objective("/Relu_1:3 - 0.5*match:/Relu_1:3@ab12cd")
    term = spec["sum"][1]["scale"]["objective"]
    assert term == {"match": {"layer": "/Relu_1", "channel": 3, "index": "ab12cd", "k": 8, "match_layer": None}}
    assert specs.format_objective(spec) == "/Relu_1:3 - 0.5*match:/Relu_1:3@ab12cd"
    wide = specs.normalize_objective({"match": {"layer": "a", "channel": 1, "index": "ix", "k": 3,
                                                "match_layer": "b"}})
    assert specs.parse_objective(specs.format_objective(wide)) == wide  # non-default fields: the JSON form
    assert specs.normalize_objective(objective_from_proto(objective_to_proto(spec))) == spec
    assert objective_to_proto(wide).match.match_layer == "b" and objective_to_proto(wide).match.k == 3
    for bad in ("match:/Relu_1@ix", "match:/Relu_1:3", "match:/Relu_1:3@../etc"):
        with pytest.raises(InvalidSpec):
            specs.parse_objective(bad)
    with pytest.raises(InvalidSpec, match="k"):
        specs.normalize_objective({"match": {"layer": "a", "channel": 1, "index": "ix", "k": 0}})
    assert specs.format_objective({"channel": {"layer": "match", "channel": 1}}) == "'match':1"


def test_resample_sorted_is_the_quantile_map():
    values = torch.arange(12, dtype=torch.float64).reshape(1, 12)
    assert torch.equal(resample_sorted(values, 12), values)
    torch.testing.assert_close(resample_sorted(values, 4), torch.tensor([[1.0, 4.0, 7.0, 10.0]], dtype=torch.float64))


def test_loss_is_zero_at_an_exemplar_and_positive_elsewhere(model, indexed):
    index, source = indexed
    targets = _targets(model, indexed, k=1)
    top = index.exemplars(UNIT, 3, "max", 1)[0]
    assert targets.images == [top.name] and targets.channels == 16
    term = O.Match(UNIT, 3, "ix", k=1, targets=targets)
    exemplar = decode_image(source.read(top.image), SIZE)[None]
    other = decode_image(source.read(index.exemplars(UNIT, 3, "min", 1)[0].image), SIZE)[None]
    values = term(_acts(model, UNIT, torch.cat([exemplar, other, torch.full_like(exemplar, 0.5)])))
    assert values[0].item() < 1e-10
    assert values[1].item() > 1e-7 and values[2].item() > 1e-7  # noise images: close, but not the same
    # k = 4: four images' values resampled to one image's count; the exemplars themselves are closer than grey
    term4 = O.Match(UNIT, 3, "ix", k=4, targets=_targets(model, indexed, k=4))
    assert term4.targets.examples == 4 and term4.targets.values.shape == (16, 4 * 16 * 16)
    close, grey = term4(_acts(model, UNIT, torch.cat([exemplar, torch.full_like(exemplar, 0.5)])))
    assert 0 < close.item() < grey.item()


def test_gradient_matches_finite_differences(model):
    layer = "/conv2/Conv"  # the pre-activation: no ties at zero in the sort
    import copy

    module = copy.deepcopy(model.truncate([layer])).double()  # a copy: the model's weights stay float32
    torch.manual_seed(1)
    targets = MatchTargets(torch.randn(16, 7, dtype=torch.float64))
    targets.values = targets.values.double()
    term = O.Match("/Relu_1", 0, "ix", k=1, match_layer=layer, targets=targets)

    def loss(x):
        return term(O.Activations(module(x), None))

    x = torch.rand(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-6)


def test_a_render_with_the_term_runs_and_resolution_is_checked(model, indexed):
    index, source = indexed
    asked = []

    def resolver(term, *, layer, match_layer, size, preprocess, path):
        asked.append((term.index, layer, match_layer, size, path))
        if term.index != "ix":
            from featureviz.errors import NotFound
            raise NotFound(f"{path}.index: no exemplar index {term.index}", reason="EXEMPLAR_INDEX_NOT_FOUND")
        return index_targets(model, index, source.read, layer=layer, channel=term.channel, k=term.k,
                             match_layer=match_layer, size=size, path=path)

    objective = specs.parse_objective(f"{UNIT}:3 - 0.5*match:{UNIT}:3@ix")
    result = render(model, RenderSpec(objective, steps=3, size=32, batch=2, match_targets=resolver,
                                      transforms="none"))
    assert result.steps_done == 3 and all(v == v for v in result.objective_end)
    assert asked == [("ix", UNIT, UNIT, (32, 32), "objective.sum[1].scale.objective.match")]
    with pytest.raises(InvalidSpec, match="no exemplar index is available"):
        validate(model, RenderSpec(objective, steps=1, size=32))
    from featureviz.errors import NotFound
    with pytest.raises(NotFound, match="no exemplar index zz"):
        validate(model, RenderSpec(specs.parse_objective(f"match:{UNIT}:3@zz"), steps=1, size=32,
                                   match_targets=resolver))
    with pytest.raises(InvalidSpec, match="covers: /Relu_1") as err:
        validate(model, RenderSpec(specs.parse_objective("match:/Relu:3@ix"), steps=1, size=32, match_targets=resolver))
    assert err.value.field == "objective.match.layer"
    with pytest.raises(InvalidSpec, match="k=9 is more than the 8") as err:
        validate(model, RenderSpec({"match": {"layer": UNIT, "channel": 3, "index": "ix", "k": 9}}, steps=1,
                                   size=32, match_targets=resolver))
    assert err.value.field == "objective.match.k"
    with pytest.raises(InvalidSpec) as err:
        validate(model, RenderSpec({"match": {"layer": UNIT, "channel": 3, "index": "ix", "match_layer": "nope"}},
                                   steps=1, size=32, match_targets=resolver))
    assert err.value.field == "objective.match.match_layer"

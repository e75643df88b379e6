"""The objective text syntax and structural validation (featureviz.spec, torch-free)."""

import pytest

from featureviz.errors import InvalidSpec
from featureviz.spec import MAX_DEPTH
from featureviz.spec import format_objective
from featureviz.spec import normalize_objective
from featureviz.spec import objective_layers
from featureviz.spec import parse_objective


def chan(layer, c):
    return {"channel": {"layer": layer, "channel": c}}


def scale(f, obj):
    return {"scale": {"factor": f, "objective": obj}}


@pytest.mark.parametrize("text, want", [
    ("mixed4a:97", chan("mixed4a", 97)),
    ("/_blocks.9/_swish/Clip:12", chan("/_blocks.9/_swish/Clip", 12)),
    ("conv1:3@4,5", {"neuron": {"layer": "conv1", "channel": 3, "x": 4, "y": 5}}),
    ("blocks/ln:3@0", {"neuron": {"layer": "blocks/ln", "channel": 3, "x": 0, "y": None}}),
    ("  conv1  ", {"layer": {"layer": "conv1"}}),
    ("logit:207", {"logit": {"index": 207}}),
    ("prob:1", {"prob": {"index": 1}}),
    ("-a:1", scale(-1.0, chan("a", 1))),
    ("a:1 + 0.5*b:2", {"sum": [chan("a", 1), scale(0.5, chan("b", 2))]}),
    ("a:1 - b:2 / 4", {"sum": [chan("a", 1), scale(-0.25, chan("b", 2))]}),
    ("(a:1 + b:2) * 2", {"sum": [scale(2.0, chan("a", 1)), scale(2.0, chan("b", 2))]}),
    ("'conv1/Relu:0':5", chan("conv1/Relu:0", 5)),
    ('"my layer":0', chan("my layer", 0)),
    (r"'it\'s':0", chan("it's", 0)),
    ("'logit':3", chan("logit", 3)),
    ("layer-1:0", chan("layer-1", 0)),
    ("diversity:x/y", {"diversity": {"layer": "x/y"}}),
    ("a:0 - 0.05*l1 - 0.25*tv - 0.1*blur", {"sum": [chan("a", 0), scale(-0.05, {"l1": {"constant": 0.5}}),
                                                  scale(-0.25, {"tv": {}}), scale(-0.1, {"blur": {}})]}),
    ('{"direction": {"layer": "a", "vector": [1, 0]}}',
     {"direction": {"layer": "a", "vector": [1.0, 0.0], "cossim_pow": 0.0}}),
])
def test_parse(text, want):
    assert parse_objective(text) == want


@pytest.mark.parametrize("text", ["a:1", "a:1@2,3", "-a:1", "a:1 + 0.5*b:2", "'c:0':1 - 2*logit:3", "prob:4",
                                  "diversity:a", "l1:0.3 + tv + blur + l2", "'a b':1"])
def test_format_parses_back(text):
    spec = parse_objective(text)
    assert parse_objective(format_objective(spec)) == spec


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("a:", "channel index"),
    ("a:1@", "the column X (or a token index)"),
    ("a:1@2,", "the row Y"),
    ("a:1 * b:2", "cannot be multiplied"),
    ("3", "number cannot be added"),
    ("logit", "logit:K"),
    ("a:1 +", "expected an objective"),
    ("'abc", "unterminated"),
    ("a:1 / b:2", "divided by a number"),
    ("a:1 / 0", "division by zero"),
    ("a:x", "channel index"),
    ('{"nope": {}}', "unknown objective kind"),
])
def test_parse_errors_name_the_problem(text, needle):
    with pytest.raises(InvalidSpec) as err:
        parse_objective(text)
    assert needle in str(err.value)
    assert err.value.field == "objective" or err.value.field.startswith("objective")


def test_normalize_fills_defaults_and_checks_types():
    assert normalize_objective({"neuron": {"layer": "a", "channel": 1}}) == {
        "neuron": {"layer": "a", "channel": 1, "x": None, "y": None}}
    assert normalize_objective({"alignment": {"layer": "a"}}) == {"alignment": {"layer": "a", "decay": 2.0}}
    cases = [
        ({"channel": {"layer": "a", "channel": -1}}, "objective.channel.channel"),
        ({"channel": {"layer": "a", "channel": True}}, "objective.channel.channel"),
        ({"channel": {"layer": "", "channel": 1}}, "objective.channel.layer"),
        ({"channel": {"layer": "a"}}, "objective.channel.channel"),
        ({"channel": {"layer": "a", "channel": 1, "extra": 2}}, "objective.channel.extra"),
        ({"neuron": {"layer": "a", "channel": 1, "y": 2}}, "objective.neuron.x"),  # x alone is a token index
        ({"sum": [chan("a", 1), {"scale": {"factor": "2", "objective": chan("a", 1)}}]},
         "objective.sum[1].scale.factor"),
        ({"sum": []}, "objective.sum"),
        ({"direction": {"layer": "a", "vector": [0, 0]}}, "objective.direction.vector"),
        ({"scale": {"factor": float("nan"), "objective": chan("a", 1)}}, "objective.scale.factor"),
        ({"channel": {"layer": "a", "channel": 1}, "layer": {"layer": "a"}}, "objective"),
    ]
    for spec, field in cases:
        with pytest.raises(InvalidSpec) as err:
            normalize_objective(spec)
        assert err.value.field == field, (spec, err.value)


def test_deep_nesting_is_refused_but_long_sums_are_fine():
    deep = chan("a", 1)
    for _ in range(MAX_DEPTH + 2):
        deep = {"scale": {"factor": 1.0, "objective": deep}}
    with pytest.raises(InvalidSpec, match="nested deeper"):
        normalize_objective(deep)
    wide = {"sum": [chan("a", i) for i in range(5000)]}
    assert len(normalize_objective(wide)["sum"]) == 5000
    assert objective_layers(wide) == ["a"]


def test_objective_layers_in_first_use_order():
    spec = parse_objective("b:1 + a:2 - 3*b:0 + logit:3 + tv")
    assert objective_layers(spec) == ["b", "a"]

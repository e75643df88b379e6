"""Each objective kind is declared once (featureviz.spec.KINDS): a toy kind declared here, with its engine class,
is parsed, formatted, validated, walked, built and checked against a model with no other change; the
declarations agree with the proto, the one other place a kind is written."""

import pytest
import torch

from featureviz import spec as specs
from featureviz.codec import objective_to_proto
from featureviz.engine import objectives as O
from featureviz.engine.render import RenderSpec
from featureviz.engine.render import validate
from featureviz.errors import InvalidSpec
from featureviz.spec import Field
from featureviz.spec import Keyword
from featureviz.spec import Kind
from featureviz.v1 import featureviz_pb2 as pb


class Peak(O._LayerObjective):
    """The toy kind: mean |z| ** power over the layer."""

    kind = "peak"

    def __init__(self, layer, power=2.0):
        super().__init__(layer)
        self.power = power

    def __call__(self, acts):
        return acts[self.layer].abs().pow(self.power).flatten(1).mean(-1)


PEAK = Kind("peak", {"layer": Field(specs.LAYER), "power": Field(specs.POSITIVE, 2.0)}, Peak, Keyword("layer"))


@pytest.fixture
def peak(monkeypatch):
    monkeypatch.setitem(specs.KINDS, "peak", PEAK)  # the one declaration; removed after the test


def test_parser_and_formatter_derive_the_toy_kind(peak):
    spec = specs.parse_objective("a:1 - 0.5*peak:z")
    assert spec == {"sum": [{"channel": {"layer": "a", "channel": 1}},
                            {"scale": {"factor": -0.5, "objective": {"peak": {"layer": "z", "power": 2.0}}}}]}
    assert specs.format_objective(spec) == "a:1 - 0.5*peak:z"
    assert specs.parse_objective(specs.format_objective(spec)) == spec
    odd = specs.normalize_objective({"peak": {"layer": "z", "power": 3}})
    assert specs.format_objective(odd) == '{"peak":{"layer":"z","power":3.0}}'  # a non-default field: JSON
    assert specs.parse_objective(specs.format_objective(odd)) == odd
    assert specs.format_objective({"channel": {"layer": "peak", "channel": 1}}) == "'peak':1"  # now a keyword
    with pytest.raises(InvalidSpec, match="peak needs an argument: peak:LAYER"):
        specs.parse_objective("peak")
    assert "peak:LAYER" in specs.keyword_forms()  # the usage text of render --help


def test_validation_derives_the_toy_kind(peak):
    assert specs.normalize_objective({"peak": {"layer": "z"}}) == {"peak": {"layer": "z", "power": 2.0}}
    for bad, field in [({"peak": {"layer": "z", "power": -1}}, "objective.peak.power"),
                       ({"peak": {"layer": "z", "powr": 1}}, "objective.peak.powr"),
                       ({"peak": {"power": 1}}, "objective.peak.layer"),
                       ({"sum": [{"tv": {}}, {"peak": {"layer": 3}}]}, "objective.sum[1].peak.layer")]:
        with pytest.raises(InvalidSpec) as err:
            specs.normalize_objective(bad)
        assert err.value.field == field


def test_walk_build_and_layers_derive_the_toy_kind(peak):
    spec = specs.parse_objective("peak:z + 2*(a:0 + peak:y)")
    assert specs.objective_layers(spec) == ["z", "a", "y"]
    assert [kind.name for kind, _, _ in specs.walk_spec(spec)] == ["sum", "peak", "scale", "channel", "scale", "peak"]
    objective = O.build(spec)
    assert [type(node).__name__ for node in O.walk(objective)] == ["Sum", "Peak", "Scale", "Channel", "Scale", "Peak"]
    assert objective.layers == ("z", "a", "y")
    assert objective.spec() == spec and str(objective) == "peak:z + 2*a:0 + 2*peak:y"
    z = torch.randn(2, 3, 4, 4)
    acts = O.Activations({"z": z, "y": z, "a": z}, torch.rand(2, 3, 8, 8))
    torch.testing.assert_close(O.build({"peak": {"layer": "z"}})(acts), z.pow(2).mean((1, 2, 3)))


def test_model_checks_derive_the_toy_kind(peak, lite0):
    layer = next(info.name for info in lite0.layers if info.spatial)
    validate(lite0, RenderSpec(objective={"peak": {"layer": layer}}, steps=1, size=64))
    with pytest.raises(InvalidSpec, match="unknown layer") as err:
        validate(lite0, RenderSpec(objective={"sum": [{"tv": {}}, {"peak": {"layer": "nope"}}]}, steps=1, size=64))
    assert err.value.field == "objective.sum[1].peak.layer"


def test_the_proto_is_the_one_other_place(peak):
    with pytest.raises(InvalidSpec, match="peak"):  # not in the proto yet: the client says so
        objective_to_proto({"peak": {"layer": "z"}})


_PROTO_TYPES = {"layer": "string", "channel": "int32", "class": "int32", "image": "int32",
                "x": "int32", "y": "int32", "number": "double", "nonneg": "double", "positive": "double",
                "vector": "repeated double", "dataset": "string", "objective": "Objective", "objectives": "repeated Objective"}
_PROTO_TYPES.update({"index": "string", "match_k": "int32", "match_layer": "string"})  # exemplar matching


def _proto_type(fd):
    name = fd.message_type.name if fd.message_type else {fd.TYPE_STRING: "string", fd.TYPE_INT32: "int32",
                                                         fd.TYPE_DOUBLE: "double"}[fd.type]
    return ("repeated " if fd.is_repeated else "") + name


def test_every_declared_kind_matches_its_proto_message():
    oneof = {fd.name: fd.message_type for fd in pb.Objective.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert set(oneof) == set(specs.KINDS)
    for name, kind in specs.KINDS.items():
        fields = {fd.name: fd for fd in oneof[name].fields}
        assert list(fields) == list(kind.fields), name
        for field_name, field in kind.fields.items():
            fd = fields[field_name]
            assert _proto_type(fd) == _PROTO_TYPES[field.type.name], (name, field_name)
            if field.default is not specs.REQUIRED and not fd.is_repeated:  # a default: unset is told from 0
                assert fd.has_presence, (name, field_name)
        assert isinstance(O.engine_class(kind)(**{k: _example(f) for k, f in kind.fields.items()}), O.Objective)


def _example(field):
    leaf = O.Channel("z", 0)
    return {"objective": leaf, "objectives": [leaf], "layer": "z", "vector": [1.0]}.get(field.type.name, 1)

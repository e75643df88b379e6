"""The committed generated code matches featureviz.proto, and the one proto <-> spec-dict converter is exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from featureviz.codec import OBJECTIVE_KINDS
from featureviz.codec import objective_from_proto
from featureviz.codec import objective_to_proto
from featureviz.codec import spec_from_proto
from featureviz.codec import spec_to_proto
from featureviz.errors import InvalidSpec
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1.generate import GENERATED
from featureviz.v1.generate import PROTO_ROOT
from featureviz.v1.generate import generate


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    fresh = {path.name: path.read_bytes() for path in generate(tmp_path)}
    committed_dir = PROTO_ROOT / "featureviz" / "v1"
    stale = [name for name in GENERATED if (committed_dir / name).read_bytes() != fresh[name]]
    assert not stale, f"{stale} are out of date with featureviz.proto: run `make proto` and commit the result"


def test_generated_imports_use_the_package_path():
    text = (Path(pb.__file__).parent / "featureviz_pb2_grpc.py").read_text()
    assert "from featureviz.v1 import featureviz_pb2" in text


# every kind of docs/ARCHITECTURE.md, nested through the algebra
ALL_KINDS = {"sum": [
    {"neuron": {"layer": "conv1", "channel": 2, "x": 3, "y": 4}},
    {"neuron": {"layer": "conv1", "channel": 2}},
    {"channel": {"layer": "a/b:0", "channel": 7}},
    {"layer": {"layer": "mixed4a"}},
    {"logit": {"index": 281}},
    {"prob": {"index": 0}},
    {"direction": {"layer": "conv2", "vector": [0.5, -1.0, 2.0], "cossim_pow": 1.5}},
    {"neuron_direction": {"layer": "conv2", "vector": [1.0, 0.0], "x": 1, "y": 0}},
    {"interpolate": {"a": {"channel": {"layer": "c", "channel": 1}}, "b": {"channel": {"layer": "c", "channel": 2}}}},
    {"diversity": {"layer": "conv2"}},
    {"alignment": {"layer": "conv2", "decay": 2.0}},
    {"l1": {"constant": 0.5}},
    {"l2": {}},
    {"tv": {}},
    {"blur": {}},
    {"bilateral": {"sigma_space": 1.5, "sigma_color": 0.05}},
    {"prior": {"dataset": "3fa9c0-leaves"}},
    {"match": {"layer": "conv2", "channel": 1, "index": "ab" * 32, "k": 4, "match_layer": "conv1"}},
    {"scale": {"factor": -0.25, "objective": {"tv": {}}}},
    {"batch": {"index": 1, "objective": {"layer": {"layer": "x"}}}},
]}


def test_objective_round_trip_covers_every_kind():
    used = set()

    def kinds(spec):
        ((kind, body),) = spec.items()
        used.add(kind)
        children = body if kind == "sum" else [v for v in body.values() if isinstance(v, dict)]
        for child in children:
            kinds(child)

    kinds(ALL_KINDS)
    assert used == set(OBJECTIVE_KINDS)
    message = objective_to_proto(ALL_KINDS)
    assert objective_from_proto(pb.Objective.FromString(message.SerializeToString())) == ALL_KINDS


def test_unset_optionals_are_left_to_the_engine():
    spec = spec_from_proto(spec_to_proto("m", {"neuron": {"layer": "l", "channel": 0, "x": None, "y": None}}))
    assert spec == {"objective": {"neuron": {"layer": "l", "channel": 0}}}
    full = spec_from_proto(spec_to_proto("m", {"tv": {}}, steps=9, lr=0.1, size=(32, 48), batch=2, seed=3,
                                         param="maco", decay=1.4, transforms="none", init_image=b"png",
                                         preprocess={"mean": [0.5], "std": [0.25], "channel_order": "BGR"}))
    assert full == {"objective": {"tv": {}}, "steps": 9, "lr": 0.1, "size": (32, 48), "batch": 2, "seed": 3,
                    "param": "maco", "decay": 1.4, "transforms": "none", "init_image": b"png",
                    "preprocess": {"mean": [0.5], "std": [0.25], "channel_order": "BGR"}}


@pytest.mark.parametrize("message, field", [
    (pb.Objective(), "spec.objective"),
    (pb.Objective(sum=pb.SumObjective()), "spec.objective.sum.terms"),
    (pb.Objective(sum=pb.SumObjective(terms=[pb.Objective(tv=pb.TotalVariationObjective()), pb.Objective()])),
     "spec.objective.sum.terms[1]"),
    (pb.Objective(direction=pb.DirectionObjective(layer="l")), "spec.objective.direction.vector"),
    (pb.Objective(scale=pb.ScaleObjective(factor=2)), "spec.objective.scale.objective"),
    (pb.Objective(neuron=pb.NeuronObjective(layer="l", channel=1, y=2)), "spec.objective.neuron.x"),  # x alone: token
])
def test_structural_errors_name_the_proto_field(message, field):
    with pytest.raises(InvalidSpec) as err:
        objective_from_proto(message)
    assert err.value.field == field


@pytest.mark.parametrize("spec, field", [
    ({"channel": {"layer": "l", "channel": 1}, "tv": {}}, "objective"),
    ({"bogus": {}}, "objective"),
    ({"channel": {"layer": "l", "chanel": 1}}, "objective.channel.chanel"),
    ({"scale": {"objective": {"tv": {}}}}, "objective.scale.factor"),
])
def test_dict_errors_name_the_field(spec, field):
    with pytest.raises(InvalidSpec) as err:
        objective_to_proto(spec)
    assert err.value.field == field


def test_bad_enum_names_are_rejected():
    with pytest.raises(InvalidSpec, match="unknown value 'cppn'"):
        spec_to_proto("m", {"tv": {}}, param="cppn")


def test_every_transform_stack_has_its_enum_value():
    from featureviz.codec import TRANSFORM_NAMES

    for name in ("standard", "composed", "none"):
        assert spec_from_proto(spec_to_proto("m", {"tv": {}}, transforms=name))["transforms"] == name
    assert sorted(TRANSFORM_NAMES.values()) == ["composed", "none", "standard"]

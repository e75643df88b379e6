"""Every job option is declared once (featureviz.options.OPTIONS): the declaration agrees with the proto's JobSpec
(every field declared, in order, types agree), with the engine's RenderSpec (defaults, choices) and with the
engine's own range checks (the fixed bounds it declares); the codec maps every option both ways."""

import dataclasses

import pytest

from featureviz import options as opts
from featureviz.codec import spec_from_proto
from featureviz.codec import spec_to_proto
from featureviz.engine.params import PARAMS
from featureviz.engine.render import RenderSpec
from featureviz.engine.render import validate
from featureviz.engine.schedule import SCHEDULES
from featureviz.engine.transforms import TRANSFORMS
from featureviz.errors import InvalidSpec
from featureviz.v1 import featureviz_pb2 as pb

# RenderSpec fields that are the engine's own (the Python API), not job options
ENGINE_ONLY = {"objective", "snapshot_steps", "device", "relu_warmup", "profile", "memory_format", "prior",
               "patch_priors"}
# a valid value of each option's type, for the round trip
SAMPLES = {"int": 3, "float": 0.25, "bool": True, "size": (24, 32), "image": b"\x89PNG...",
           "preprocess": {"mean": [0.5], "std": [0.25], "channel_order": "BGR"}, "judge": "b" * 64}


def test_every_jobspec_field_is_declared_in_order_with_its_type():
    fields = [f for f in pb.JobSpec.DESCRIPTOR.fields if f.name not in ("model", "objective")]
    assert [f.name for f in fields] == [option.name for option in opts.OPTIONS]
    for field, option in zip(fields, opts.OPTIONS):
        proto_type = field.message_type.name if field.message_type else (
            "enum" if field.enum_type else {field.TYPE_INT32: "int32", field.TYPE_INT64: "int64", field.TYPE_DOUBLE:
                                            "double", field.TYPE_BOOL: "bool", field.TYPE_BYTES: "bytes"}[field.type])
        assert proto_type in opts.PROTO_TYPES[option.type], option.name
        assert set(option.surfaces) <= set(opts.SURFACES) and option.help, option.name


def test_engine_options_are_renderspec_fields_with_the_declared_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(RenderSpec) if f.name != "objective"}
    engine = {option.name: option.default for option in opts.OPTIONS if option.engine}
    assert set(defaults) - set(engine) == ENGINE_ONLY - {"objective"}
    assert {name: defaults[name] for name in engine} == engine
    assert not {option.name for option in opts.OPTIONS if not option.engine} & set(defaults)


def test_enum_choices_are_the_engines_names():
    assert set(opts.BY_NAME["param"].choices) == set(PARAMS)
    assert set(opts.BY_NAME["transforms"].choices) == set(TRANSFORMS)
    assert set(opts.BY_NAME["lr_schedule"].choices) == set(SCHEDULES)
    assert opts.enum_prefix(pb.LrSchedule.DESCRIPTOR) == "LR_SCHEDULE_"
    assert opts.BY_NAME["param"].enum_value("laplacian") == pb.PARAMETERIZATION_LAPLACIAN


def _outside(option):
    """Values just outside the option's fixed bounds, and one at each bound."""
    step = 1 if option.type == "int" else 1e-3
    bad, good = [], []
    if option.minimum is not None:
        bad.append(option.minimum - step)
        good.append(option.minimum)
    if option.maximum is not None:
        bad.append(option.maximum + step)
        good.append(option.maximum)
    if option.below is not None:
        bad.append(option.below)
        good.append(option.below - step)
    return bad, good


@pytest.mark.parametrize("option", [o for o in opts.OPTIONS if o.engine and not (o.min_limit or o.max_limit)
                                    and (o.minimum is not None or o.maximum is not None or o.below is not None)],
                         ids=lambda o: o.name)
def test_the_engine_checks_the_declared_fixed_bounds(lite0, option):
    base = dict(objective={"tv": {}}, steps=8, size=8)
    bad, good = _outside(option)
    for value in bad:
        with pytest.raises(InvalidSpec) as err:
            validate(lite0, RenderSpec(**base, **{option.name: value}))
        assert err.value.field == option.name, value
    for value in good:
        if option.name == "plateau_window" and value > 8:
            base["steps"] = 2 * value
        validate(lite0, RenderSpec(**base, **{option.name: value}))


def test_every_option_round_trips_through_the_codec():
    given = {}
    for option in opts.OPTIONS:
        given[option.name] = option.choices[-1] if option.choices else SAMPLES[option.type]
    message = pb.JobSpec.FromString(spec_to_proto("m", {"tv": {}}, **given).SerializeToString())
    back = spec_from_proto(message)
    engine = {name: value for name, value in given.items() if opts.BY_NAME[name].engine}
    assert back == {"objective": {"tv": {}}, **engine, "preprocess": {**given["preprocess"]}}
    assert message.exclusive and message.preview_every == 3 and message.judge.model == "b" * 64
    assert message.param == pb.PARAMETERIZATION_LAPLACIAN and message.lr_schedule == pb.LR_SCHEDULE_LINEAR


@pytest.mark.parametrize("options, field, needle", [
    ({"stepz": 3}, "spec", "unknown job option 'stepz'; known: steps, lr, size"),
    ({"steps": "5"}, "spec.steps", "must be an integer"),
    ({"lr": True}, "spec.lr", "must be a number"),
    ({"param": "cppn"}, "spec.param", "known: fft, pixel, maco, laplacian"),
    ({"size": [1, 2, 3]}, "spec.size", "integer or [height, width]"),
    ({"steps": 2**40}, "spec.steps", "out of range"),
])
def test_bad_options_name_the_field(options, field, needle):
    with pytest.raises(InvalidSpec) as err:
        spec_to_proto("m", {"tv": {}}, **options)
    assert err.value.field == field and needle in str(err.value)


def test_an_unknown_enum_number_names_the_field():
    message = pb.JobSpec(transforms=7)
    message.objective.tv.SetInParent()
    with pytest.raises(InvalidSpec) as err:
        spec_from_proto(message)
    assert err.value.field == "spec.transforms" and "TRANSFORMS_STANDARD" in str(err.value)

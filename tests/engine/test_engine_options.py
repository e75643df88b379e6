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
               "patch_priors", "latent_l2"}  # latent_l2: a part of the generator option (JobSpec.generator.latent_l2)
ENGINE_ONLY |= {"match_targets"}  # exemplar matching: the resolver of the objective's match terms
# a valid value of each option's type, for the round trip
SAMPLES = {"int": 3, "float": 0.25, "bool": True, "size": (24, 32), "image": b"\x89PNG...",
           "preprocess": {"mean": [0.5], "std": [0.25], "channel_order": "BGR"}, "judge": "b" * 64,
           "exemplar_index": {"dataset": "d" * 64, "layers": ["conv1"], "k": 3, "batch_size": 4},
           "atlas": {"op_types": ["Conv"], "min_depth": 1, "channels": 2}, "dataset": "e" * 64,
           "generator": {"model": "c" * 64, "latent_l2": 0.25}}


def test_every_jobspec_field_is_declared_in_order_with_its_type():
    fields = [f for f in pb.JobSpec.DESCRIPTOR.fields if f.name not in ("model", "objective")]
    assert [f.name for f in fields] == [option.name for option in opts.OPTIONS]
    for field, option in zip(fields, opts.OPTIONS):
        proto_type = field.message_type.name if field.message_type else (
            "enum" if field.enum_type else {field.TYPE_INT32: "int32", field.TYPE_INT64: "int64", field.TYPE_DOUBLE:
                                            "double", field.TYPE_BOOL: "bool", field.TYPE_BYTES: "bytes",
                                            field.TYPE_STRING: "string"}[field.type])
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
    assert message.param == pb.PARAMETERIZATION_GENERATOR and message.lr_schedule == pb.LR_SCHEDULE_LINEAR
    assert message.exemplar_index == pb.ExemplarIndexSpec(dataset="d" * 64, layers=["conv1"], k=3, batch_size=4)
    assert message.atlas == pb.AtlasSpec(op_types=["Conv"], min_depth=1, channels=2)
    assert message.prior_dataset == "e" * 64
    assert message.generator == pb.GeneratorSpec(model="c" * 64, latent_l2=0.25)


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


# ------------------------------------------------------------------------------------------------ job kinds


def _index_spec(**fields) -> pb.JobSpec:
    spec = pb.JobSpec(model="m")
    spec.exemplar_index.dataset = "d" * 64
    for name, value in fields.items():
        if name == "objective":
            spec.objective.tv.SetInParent()
        elif name == "size":
            spec.size.height = spec.size.width = value
        else:
            setattr(spec, name, value)
    return spec


def test_every_option_declares_its_job_kinds():
    assert opts.KINDS == ("render", "exemplar_index", "atlas")
    for option in opts.OPTIONS:
        assert option.kinds and set(option.kinds) <= set(opts.KINDS), option.name
    every = {o.name for o in opts.OPTIONS if set(o.kinds) == set(opts.KINDS)}
    assert every == {"size", "preprocess"}
    assert opts.BY_NAME["exemplar_index"].kinds == ("exemplar_index",) and opts.BY_NAME["atlas"].kinds == ("atlas",)
    assert opts.BY_NAME["steps"].kinds == ("render", "atlas")
    assert opts.BY_NAME["transforms"].kinds == ("render", "atlas")
    # the render options a unit takes (a learned prior and a generator too); no objective, batch, init image,
    # previews, judge, plateau or exclusive
    atlas = {o.name for o in opts.OPTIONS if "atlas" in o.kinds}
    assert atlas == {"steps", "lr", "size", "seed", "param", "decay", "transforms", "preprocess", "lr_schedule",
                     "lr_warmup", "prior_dataset", "generator", "atlas"}
    assert set(opts.ATLAS_DEFAULTS) <= atlas
    parts = opts.BY_NAME["exemplar_index"].parts
    assert [(p.name, p.max_limit, p.path) for p in parts] == [("k", "max_exemplar_k", "spec.exemplar_index.k"), (
        "batch_size", "max_index_batch", "spec.exemplar_index.batch_size")]
    for part in parts:  # each part is a field of ExemplarIndexSpec with its declared type
        assert part.field.containing_type.name == "ExemplarIndexSpec" and part.field.type == part.field.TYPE_INT32


@pytest.mark.parametrize("fields, field", [
    ({"steps": 10}, "spec.steps"), ({"lr": 0.1}, "spec.lr"), ({"param": pb.PARAMETERIZATION_PIXEL}, "spec.param"),
    ({"transforms": pb.TRANSFORMS_COMPOSED}, "spec.transforms"), ({"preview_every": 2}, "spec.preview_every"),
    ({"exclusive": True}, "spec.exclusive"), ({"objective": True}, "spec.objective"),
])
def test_a_render_option_on_an_index_job_is_refused_naming_it(fields, field):
    with pytest.raises(InvalidSpec) as err:
        opts.check_kind(_index_spec(**fields))
    assert err.value.field == field
    assert opts.check_kind(_index_spec(size=32)) == "exemplar_index"


def test_a_render_needs_an_objective():
    with pytest.raises(InvalidSpec) as err:
        opts.check_kind(pb.JobSpec(model="m", steps=3))
    assert err.value.field == "spec.objective" and "exemplar_index" in str(err.value)


def test_index_parts_are_checked_against_the_published_limits():
    from featureviz.server.config import Limits

    limits = Limits(max_exemplar_k=20, max_index_batch=8)
    spec = _index_spec()
    spec.exemplar_index.k, spec.exemplar_index.batch_size = 20, 8
    opts.check_limits(spec, limits)
    for part, value, limit in (("k", 21, "max_exemplar_k"), ("k", 0, "max_exemplar_k"),
                               ("batch_size", 9, "max_index_batch")):
        bad = _index_spec()
        setattr(bad.exemplar_index, part, value)
        with pytest.raises(InvalidSpec) as err:
            opts.check_limits(bad, limits)
        assert err.value.field == f"spec.exemplar_index.{part}" and limit in str(err.value)


def test_the_published_options_carry_their_kinds():
    published = {o.name: o for o in opts.job_options()}
    assert list(published["size"].kinds) == ["render", "exemplar_index", "atlas"]
    assert list(published["steps"].kinds) == ["render", "atlas"] and list(published["batch"].kinds) == ["render"]
    assert published["exemplar_index"].type == "exemplar_index"

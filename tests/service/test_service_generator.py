"""param generator over gRPC (issue 25): a real server, an uploaded generator (random-init TinyGenerator: the
plumbing does not depend on what it learned; see tests/engine/test_engine_generator.py), jobs that optimise its
latents, and the refusals: one line each with its status (an upload refused for an op without a gradient or an
unbounded output is the importer's: tests/engine/test_engine_generator.py)."""

from __future__ import annotations

import asyncio
import io
import json
import math

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from featureviz.client import AsyncClient  # noqa: E402
from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from featureviz.server.config import Limits  # noqa: E402
from featureviz.v1 import featureviz_pb2 as pb  # noqa: E402
from support.generators import TinyGenerator  # noqa: E402
from support.generators import export_generator  # noqa: E402

OBJECTIVE = {"channel": {"layer": "/Relu", "channel": 1}}
LATENT_LIMIT = 32


def _gen(**kwargs) -> bytes:
    torch.manual_seed(0)
    return export_generator(TinyGenerator(**kwargs))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(tmp_path_factory.mktemp("store"), heartbeat_seconds=0.5, grace_seconds=2.0,
                          progress_interval=0.0, limits=Limits(max_latent_size=LATENT_LIMIT))
    running = serve_in_background(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def generator(server):
    with Client(server.address, timeout=120) as fv:
        return fv.upload(_gen(), name="gen.onnx")


def test_an_uploaded_generator_is_marked_with_what_its_graph_says(client, generator, tiny_model):
    info = generator.generator
    assert (info.latent_size, info.channels, info.height, info.width) == (16, 3, 16, 16)
    assert (info.output_min, info.output_max, info.last_op) == (-1.0, 1.0, "Tanh")
    assert client.model(generator.sha256).generator == info
    assert not tiny_model.HasField("generator")
    assert client.info().limits.max_latent_size == LATENT_LIMIT


def test_generator_jobs_raise_their_objective_through_both_clients(client, server, generator, tiny_model):
    options = dict(steps=10, lr=0.5, size=16, param="generator")
    jobs = [client.submit(tiny_model.sha256, OBJECTIVE, seed=0, batch=2, generator=generator.sha256, **options),
            client.submit(tiny_model.sha256, OBJECTIVE, seed=1, **options,
                          generator={"model": generator.sha256, "latent_l2": 0.001})]

    async def submit_async():
        async with AsyncClient(server.address, timeout=60) as fv:
            job = await fv.submit(tiny_model.sha256, OBJECTIVE, seed=2, generator=generator.sha256, **options)
            return await fv.wait(job.id, timeout=300)

    done = [client.wait(job.id, timeout=300) for job in jobs] + [asyncio.run(submit_async())]
    for job in done:
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job.spec.param == pb.PARAMETERIZATION_GENERATOR and job.spec.generator.model == generator.sha256
        for image in job.result.images:
            gain = image.objective_end - image.objective_start
            if job.spec.generator.HasField("latent_l2"):  # the objective less the penalty: it rises too
                assert gain > 0, (job.spec.seed, image)
            else:  # the engine test's bounds (measured over 10 seeds): a gain above 0.025 and an end above 1.5x
                assert gain > 0.025 and image.objective_end > 1.5 * image.objective_start, (job.spec.seed, image)
            png = Image.open(io.BytesIO(image.png))
            assert png.size == (16, 16) and png.mode == "RGB"
    assert len(done[0].result.images) == 2 and done[1].spec.generator.latent_l2 == 0.001


def test_refusals_name_the_problem_with_the_right_status(client, generator, tiny_model):
    def refused(call):
        with pytest.raises(FeaturevizClientError) as err:
            call()
        assert "\n" not in str(err.value)
        return err.value

    submit = lambda gen, **kw: client.submit(tiny_model.sha256, OBJECTIVE, steps=1, size=16, param="generator",  # noqa
                                            generator=gen, **kw)
    err = refused(lambda: submit("0" * 64))  # a generator the tenant does not hold
    assert err.code == "NOT_FOUND" and "spec.generator.model" in str(err)
    big = client.upload(_gen(latent=64), name="big.onnx")
    err = refused(lambda: submit(big.sha256))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "LATENT_TOO_LARGE")
    assert f"max_latent_size = {LATENT_LIMIT}" in str(err) and "64 values" in str(err)
    grey = client.upload(_gen(channels=1, last="sigmoid"), name="grey.onnx")
    err = refused(lambda: submit(grey.sha256))  # not an image of the model's channel count
    assert err.code == "INVALID_ARGUMENT" and "1-channel images; the model takes 3-channel" in str(err)
    err = refused(lambda: submit(tiny_model.sha256))  # a classifier is no generator
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "NOT_A_GENERATOR")
    err = refused(lambda: client.submit(generator.sha256, OBJECTIVE, steps=1))  # a generator is not rendered
    assert err.code == "INVALID_ARGUMENT" and "is a generator" in str(err)
    err = refused(lambda: client.submit(generator.sha256, None, atlas={}))  # nor made an atlas of
    assert err.code == "INVALID_ARGUMENT" and "is a generator" in str(err)
    err = refused(lambda: client.submit(tiny_model.sha256, OBJECTIVE, steps=1, generator=generator.sha256))
    assert err.code == "INVALID_ARGUMENT" and "set param generator" in str(err)
    # the server is still up, and the refused uploads left nothing behind
    assert {m.sha256 for m in client.models()} == {tiny_model.sha256, generator.sha256, big.sha256, grey.sha256}


def test_the_render_command_takes_a_generator_locally_and_through_the_server(server, capsys, tmp_path, tiny_onnx,
                                                                              generator):
    from featureviz.cli import main

    model_file, gen_file = tmp_path / "tiny.onnx", tmp_path / "gen.onnx"
    model_file.write_bytes(tiny_onnx)
    gen_file.write_bytes(_gen())  # the bytes of the uploaded generator: the server finds them by their sha256
    common = ["render", str(model_file), "/Relu:1", "--param", "generator", "--generator", str(gen_file),
              "--steps", "10", "--lr", "0.5", "--size", "16", "--json"]
    for where in ([], ["--server", server.address, "--latent-l2", "0.001"]):
        out_file = tmp_path / f"out{len(where)}.png"
        code = main([*common, "--out", str(out_file), *where])
        out, err = capsys.readouterr()
        assert code == 0, err
        result = json.loads(out)
        assert result["objective_end"][0] - result["objective_start"][0] > 0.0, result
        assert Image.open(out_file).size == (16, 16)
    with Client(server.address) as fv:
        assert fv.job(result["job"]).spec.generator == pb.GeneratorSpec(model=generator.sha256, latent_l2=0.001)
    code = main(["render", str(model_file), "/Relu:1", "--generator", str(gen_file), "--steps", "1", "--size", "16"])
    _, err = capsys.readouterr()
    assert code != 0 and "set param generator" in err and len(err.strip().splitlines()) == 1


def test_an_atlas_optimises_each_units_latents(client, server, generator, tiny_model, tmp_path, tiny_onnx, capsys):
    """param generator on an atlas: every unit is a render through the generator (16 px images; that it raises the
    objective is the render test's); the generator and its latent penalty are part of each unit's key (the same atlas with fft, or with
    another penalty, renders its own units; the same again is served from the store); ``featureviz atlas
    --generator`` sends it, and --latent-l2 without a generator is refused with one line."""
    from featureviz.cli import main

    common = dict(layers=["/Relu"], channels=2, steps=10, lr=0.5, size=16, seed=0)

    def finished(**options):
        job = client.atlas(tiny_model.sha256, wait=True, timeout=300, **common, **options)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        units = list(client.atlas_units(job.id))
        assert len(units) == 2 and all(unit.done for unit in units)
        return job, units

    job, units = finished(param="generator", generator=generator.sha256)
    assert job.spec.generator.model == generator.sha256 and not any(unit.cached for unit in units)
    for unit in units:
        assert math.isfinite(unit.objective) and (unit.width, unit.height) == (16, 16), unit
        assert Image.open(io.BytesIO(client.atlas_unit_image(job.id, unit.index).png)).size == (16, 16)
    _, fft_units = finished(param="fft")
    _, penalised = finished(param="generator", generator={"model": generator.sha256, "latent_l2": 0.001})
    keys = [u.key for u in units]
    assert not set(keys) & {u.key for u in fft_units} and not set(keys) & {u.key for u in penalised}
    _, again = finished(param="generator", generator=generator.sha256)
    assert all(unit.cached for unit in again) and [u.key for u in again] == keys

    model_file, gen_file = tmp_path / "tiny.onnx", tmp_path / "gen.onnx"
    model_file.write_bytes(tiny_onnx)
    gen_file.write_bytes(_gen())
    common_cli = ["atlas", str(model_file), "--layers", "/Relu", "--channels", "1", "--steps", "2", "--size", "16",
                  "--server", server.address, "--quiet"]
    assert main([*common_cli, "--param", "generator", "--generator", str(gen_file), "--latent-l2", "0.01",
                 "--out", str(tmp_path / "site")]) == 0, capsys.readouterr().err
    newest = next(j for j in client.jobs() if j.spec.HasField("atlas"))
    assert newest.spec.generator == pb.GeneratorSpec(model=generator.sha256, latent_l2=0.01)
    assert newest.state == pb.JOB_STATE_SUCCEEDED
    for argv, needle in ((common_cli + ["--latent-l2", "0.01"], "--latent-l2"),
                         (common_cli[:2] + ["extra"] + common_cli[2:], "one MODEL only")):
        assert main([*argv, "--out", str(tmp_path / "other")]) != 0
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_a_generator_in_use_is_not_deleted(client, generator, tiny_model):
    """DeleteModel refuses a generator that a queued or running job reads (MODEL_IN_USE, naming the jobs): a render
    and an atlas, which reads it for every unit; once they end it can go (here: the refusal only, the module's
    generator stays)."""
    options = dict(steps=10_000, lr=0.5, size=16, param="generator", generator=generator.sha256)
    render = client.submit(tiny_model.sha256, OBJECTIVE, seed=5, **options)
    atlas = client.atlas(tiny_model.sha256, layers=["/Relu"], channels=1, **options)
    try:
        with pytest.raises(FeaturevizClientError) as err:
            client.delete_model(generator.sha256)
        assert (err.value.code, err.value.reason) == ("FAILED_PRECONDITION", "MODEL_IN_USE"), err.value
        assert render.id in str(err.value) and atlas.id in str(err.value) and "\n" not in str(err.value)
    finally:
        for job in (render, atlas):
            client.cancel(job.id)
    assert all(client.wait(job.id, timeout=120).state == pb.JOB_STATE_CANCELLED for job in (render, atlas))
    assert client.model(generator.sha256).sha256 == generator.sha256

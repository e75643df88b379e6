"""The job options on a real server: ServerInfo.job_options is the declaration (featureviz.options) with this
server's bounds, both Python clients take the same option keywords (every declared one, nothing else), and the
server's range checks, derived from the declaration, name the field and the limit."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from featureviz import options as opts
from featureviz.client import AsyncClient
from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.errors import InvalidSpec
from featureviz.server.config import Limits
from featureviz.v1 import featureviz_pb2 as pb

LOGIT = {"logit": {"index": 1}}


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_server_info_publishes_every_option_with_its_bounds(client):
    info = client.info()
    published = {option.name: option for option in info.job_options}
    assert list(published) == [option.name for option in opts.OPTIONS]
    assert list(published["param"].choices) == ["fft", "pixel", "maco", "laplacian", "generator"]
    assert list(published["lr_schedule"].choices) == ["constant", "cosine", "linear"]
    assert published["steps"].maximum == info.limits.max_steps and published["steps"].max_limit == "max_steps"
    assert (published["lr"].minimum, published["lr"].maximum) == (info.limits.min_lr, info.limits.max_lr)
    assert published["size"].maximum == info.limits.max_image_side and published["plateau"].below == 1
    assert published["steps"].default == "512" and not published["size"].HasField("default")
    assert "node" in published["lr_schedule"].surfaces and published["lr_schedule"].flag == "--schedule"
    assert list(published["size"].kinds) == ["render", "exemplar_index", "atlas"]
    assert list(published["lr"].kinds) == ["render", "atlas"] and list(published["batch"].kinds) == ["render"]
    assert list(published["exemplar_index"].kinds) == ["exemplar_index"]


@pytest.fixture(scope="module")
def prior_set(server, tmp_path_factory):
    """8 small PNGs (the fewest a prior takes), uploaded: a prior_dataset."""
    from support.images import noisy_png

    folder = tmp_path_factory.mktemp("prior-set")
    for i in range(8):
        (folder / f"n{i}.png").write_bytes(noisy_png(40, i))
    with Client(server.address) as fv:
        return fv.upload_dataset(folder).id


def _every_option(tiny_model, prior_set) -> dict:
    """A valid value of every declared option."""
    values = {"steps": 2, "lr": 0.1, "size": 16, "batch": 1, "seed": 5, "param": "pixel", "decay": 1.0,
              "transforms": "none", "init_image": _png(16), "preprocess": {"mean": [0.5], "std": [0.25]},
              "preview_every": 1, "preview_max_side": 16, "exclusive": True, "judge": tiny_model.sha256,
              "lr_schedule": "cosine", "lr_warmup": 1, "plateau": 0.5, "plateau_window": 4,
              "prior_dataset": f"datasets/{prior_set}"}
    # a new option gets a value here; generator goes with param generator, which starts from no init image: both
    # clients submit it in tests/service/test_service_generator.py
    assert set(values) | {"generator"} == {o.name for o in opts.OPTIONS if "render" in o.kinds}
    return values


def test_both_clients_take_every_declared_option_and_nothing_else(client, server, tiny_model, prior_set):
    values = _every_option(tiny_model, prior_set)
    sync_job = client.wait(client.submit(tiny_model.sha256, LOGIT, **values).id, timeout=120)

    async def submit_async():
        async with AsyncClient(server.address, timeout=60) as fv:
            job = await fv.submit(tiny_model.sha256, LOGIT, **values)
            with pytest.raises(InvalidSpec, match="unknown job option 'stepz'; known: steps, lr, size"):
                await fv.submit(tiny_model.sha256, LOGIT, stepz=3)
            return await fv.wait(job.id, timeout=120)

    async_job = asyncio.run(submit_async())
    for job in (sync_job, async_job):
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job.spec.lr_schedule == pb.LR_SCHEDULE_COSINE and job.spec.exclusive and job.spec.plateau_window == 4
        assert job.spec.prior_dataset == prior_set  # stored by its bare id
    assert sync_job.spec == async_job.spec
    with pytest.raises(InvalidSpec, match="unknown job option 'stepz'; known: steps, lr, size"):
        client.submit(tiny_model.sha256, LOGIT, stepz=3)


@pytest.mark.parametrize("options, field, needles", [
    ({"steps": 0}, "spec.steps", ["1 to 10000", "max_steps"]),
    ({"lr": 0.0}, "spec.lr", ["1e-06 to 10", "min_lr, max_lr"]),
    ({"batch": Limits().max_images_per_job + 1}, "spec.batch", ["1 to 64", "max_images_per_job"]),
    ({"size": (4, 16)}, "spec.size", ["8 to 1024", "min_image_side, max_image_side"]),
    ({"preview_max_side": -1}, "spec.preview_max_side", [">= 0"]),
])
def test_the_server_checks_the_declared_limits_naming_the_field(client, tiny_model, options, field, needles):
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, LOGIT, **options)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.field_violations[0][0] == field, err.value.field_violations
    for needle in needles:
        assert needle in err.value.message

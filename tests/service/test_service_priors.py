"""Learned priors over gRPC (issue 25), on a real server on loopback with the tiny model: ``prior_dataset`` puts a
set's colour matrix and spectrum decay into the fft parameterization (measured on the image after ONE step, where
Adam's first move is +-lr on every coefficient, so the image's statistics are the parameterization's, not the
model's); the ``prior:DATASET`` term raises the patch log-likelihood; the fit is reported by GetDataset and the CLI,
and cached with the set (a second job does not refit); a set the tenant does not hold is NOT_FOUND, one under
``min_prior_images`` is FAILED_PRECONDITION. The sets are real PNG files of Gaussian fields with a known spectrum
and colour covariance (tests/support/natural.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.client import pb  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from featureviz.spec import parse_objective  # noqa: E402
from support.images import noisy_png  # noqa: E402
from support.natural import power_law_image  # noqa: E402
from support.natural import write_pngs  # noqa: E402

TOKENS = {"token-a": "alice", "token-b": "bob"}
LOGIT = {"logit": {"index": 1}}
SIDE = 64
# STEEP: independent channels, a steep spectrum (amplitude decay 1.6); FLAT: strongly correlated channels, a
# shallow spectrum (0.5). ImageNet's defaults sit between them (correlated channels, decay 1).
STEEP = (1.6, np.diag([0.12, 0.10, 0.08]))
FLAT = (0.5, np.array([[0.10, 0.02, 0.00], [0.10, 0.00, 0.02], [0.10, -0.02, 0.00]]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_onnx):
    root = tmp_path_factory.mktemp("priors")
    folders = {}
    for name, (decay, mixing), count in (("steep", STEEP, 8), ("flat", FLAT, 8), ("small", STEEP, 3)):
        folder = root / name
        folder.mkdir()
        folders[name] = write_pngs(folder, [power_law_image(SIDE, decay, mixing, 10 * count + s)
                                            for s in range(count)])
    config = ServerConfig(root / "store", tokens=TOKENS, heartbeat_seconds=0.5, grace_seconds=1.0, metrics_port=0,
                          progress_interval=0.0)
    server = serve_in_background(config)
    with Client(server.address, token="token-a") as alice, Client(server.address, token="token-b") as bob:
        model = alice.upload(tiny_onnx, name="tiny.onnx").sha256
        bob.upload(tiny_onnx, name="tiny.onnx")
        sets = {name: alice.upload_dataset(folder).id for name, folder in folders.items()}
        yield {"server": server, "model": model, "sets": sets, "worker": server._server.scheduler.worker,
               "tiny_onnx": tiny_onnx}
    server.stop()


@pytest.fixture()
def alice(setup):
    with Client(setup["server"].address, token="token-a", timeout=120) as fv:
        yield fv


@pytest.fixture()
def bob(setup):
    with Client(setup["server"].address, token="token-b", timeout=120) as fv:
        yield fv


def _images(job) -> list[torch.Tensor]:
    out = []
    for image in job.result.images:
        array = np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.float64) / 255
        out.append(torch.from_numpy(array).permute(2, 0, 1))
    return out


def _statistics(job) -> tuple[float, float]:
    """(mean correlation between the colour channels, fitted amplitude decay of the spectrum) over the images."""
    from featureviz.engine.priors import spectrum_decay

    corr, decay = [], []
    for image in _images(job):
        c = torch.corrcoef(image.reshape(3, -1))
        corr.append(float((c[0, 1] + c[0, 2] + c[1, 2]) / 3))
        decay.append(spectrum_decay(image))
    return float(np.mean(corr)), float(np.mean(decay))


def _first_step(fv, model, **options):
    """One Adam step of an fft render from seed 0, no transforms: the image is the parameterization's."""
    job = fv.submit(model, LOGIT, steps=1, lr=0.5, size=SIDE, batch=2, seed=0, param="fft", transforms="none",
                    **options)
    job = fv.wait(job.id, timeout=120)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


def test_prior_dataset_moves_the_first_step_statistics_toward_each_set(setup, alice):
    """The same seed and step, three priors: the default (ImageNet's matrix, 1/f), the steep independent set and the
    flat correlated one. Each learned prior moves the image's channel correlation and spectrum decay toward its
    set's, away from the default. Both prior jobs are queued together (they share the queue; a device step groups
    slots by prior, see docs/ARCHITECTURE.md)."""
    model, sets = setup["model"], setup["sets"]
    default = _statistics(_first_step(alice, model))
    jobs = [alice.submit(model, LOGIT, steps=1, lr=0.5, size=SIDE, batch=2, seed=0, param="fft", transforms="none",
                         prior_dataset=sets[name]) for name in ("steep", "flat")]
    steep, flat = (_statistics(alice.wait(job.id, timeout=120)) for job in jobs)
    assert steep[0] < default[0] - CORRELATION_MARGIN, (steep, default)  # independent channels
    assert flat[0] > steep[0] + CORRELATION_MARGIN, (flat, steep)
    assert steep[1] > default[1] + DECAY_MARGIN, (steep, default)  # steeper
    assert flat[1] < default[1] - DECAY_MARGIN, (flat, default)  # flatter
    job = alice.job(jobs[0].id)
    assert job.spec.prior_dataset == sets["steep"]


# measured (tiny model, 64 px, seed 0, one step of lr 0.5, 2 images): mean channel correlation default 0.89, steep
# -0.34, flat 0.96; fitted spectrum decay default 1.47, steep 2.70, flat 0.60; the margins are about half of the
# smallest gap each assert needs
CORRELATION_MARGIN = 0.6
DECAY_MARGIN = 0.4


def _shared_steps(server) -> float:
    """Device steps so far that carried more than one image (featureviz_batch_images: count - the le=1 bucket)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("featureviz_batch_images")}
    return values["featureviz_batch_images_count"] - values['featureviz_batch_images_bucket{le="1.0"}']


def test_jobs_with_different_priors_share_device_steps(setup, alice):
    """A device step groups slots by model and size, not by prior: each prior's parameterization renders its own
    slots (ImageFn.render_key holds the prior's key), then one forward and backward of the model takes them all.
    A long job with one prior and a short one with another (one image each) run in the same steps."""
    model, sets, server = setup["model"], setup["sets"], setup["server"]
    before = _shared_steps(server)
    long = alice.submit(model, LOGIT, steps=10_000, size=32, param="fft", prior_dataset=sets["steep"])
    for event in alice.watch(long.id, timeout=120):  # it runs
        if event.HasField("progress") and event.progress.step >= 2:
            break
    short = alice.wait(alice.submit(model, LOGIT, steps=6, size=32, param="laplacian",
                                    prior_dataset=sets["flat"]).id, timeout=120)
    assert short.state == pb.JOB_STATE_SUCCEEDED, short.error
    assert alice.job(long.id).state == pb.JOB_STATE_RUNNING
    alice.cancel(long.id)
    assert alice.wait(long.id, timeout=120).state == pb.JOB_STATE_CANCELLED
    assert _shared_steps(server) > before  # steps of two images: the two jobs together


PRIOR_GAIN = 1.0


def test_prior_term_raises_the_patch_likelihood_and_is_reported_and_cached(setup, alice, capsys):
    """``-prior:SET`` alone: the objective (minus the patch prior's NLL) rises; the fit is reported by GetDataset and
    ``featureviz datasets show``; a second job loads it (no refit) and the set's files hold it."""
    model, ident, worker = setup["model"], setup["sets"]["steep"], setup["worker"]
    before = worker.priors.fits["patch"]
    job = alice.wait(alice.submit(model, parse_objective(f"-prior:{ident}"), steps=4, lr=0.05, size=32, batch=2,
                                  param="pixel", transforms="none", init_image=noisy_png(32, 1)).id, timeout=300)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    for image in job.result.images:  # from noise: the log-likelihood rises a long way in 4 steps
        assert image.objective_start < 0 and image.objective_end - image.objective_start > PRIOR_GAIN
    assert worker.priors.fits["patch"] == before + 1
    (prior,) = [p for p in alice.dataset(ident).priors if p.channels == 3]
    assert prior.patch_prior and prior.components == 8 and prior.patch_size == 8 and prior.patch_images == 8
    assert np.isfinite(prior.held_out_log_likelihood) and prior.patches > 1000
    listed = {d.id: d for d in alice.datasets()}[ident]
    assert [p.held_out_log_likelihood for p in listed.priors if p.channels == 3] == [prior.held_out_log_likelihood]
    assert prior.images == 8 and len(prior.color) == 9 and prior.decay > 1.2  # the statistics too (prior_dataset)
    again = alice.wait(alice.submit(model, parse_objective(f"/Relu:2 - 0.1*prior:{ident}"), steps=2, size=32,
                                    transforms="none").id, timeout=300)
    assert again.state == pb.JOB_STATE_SUCCEEDED, again.error
    assert worker.priors.fits["patch"] == before + 1  # cached: not fitted again
    from featureviz.cli import main

    address = setup["server"].address
    assert main(["datasets", "show", ident, "--server", address, "--token", "token-a"]) == 0
    out = capsys.readouterr().out
    assert f"held-out log-likelihood {prior.held_out_log_likelihood:.2f}" in out and "8 components" in out


def test_a_set_the_tenant_does_not_hold_is_not_found(setup, bob):
    model, ident = setup["model"], setup["sets"]["steep"]
    for options, objective, field in (({"prior_dataset": ident}, LOGIT, "spec.prior_dataset"),
                                      ({}, parse_objective(f"logit:1 - prior:{ident}"), "spec.objective")):
        with pytest.raises(FeaturevizClientError) as err:
            bob.submit(model, objective, steps=1, size=32, **options)
        assert err.value.code == "NOT_FOUND" and err.value.reason == "DATASET_NOT_FOUND", err.value
        assert field in err.value.message and ident in err.value.message
    assert bob.info().limits.min_prior_images == 8


def test_a_set_under_the_minimum_is_refused_with_one_line(setup, alice):
    model, ident = setup["model"], setup["sets"]["small"]
    with pytest.raises(FeaturevizClientError) as err:
        alice.submit(model, LOGIT, steps=1, size=32, prior_dataset=ident)
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "DATASET_TOO_SMALL"
    assert "min_prior_images = 8" in err.value.message and "3 image" in err.value.message
    assert "\n" not in err.value.message


def test_the_command_line_takes_prior_on_a_server_and_refuses_it_locally(setup, tiny_onnx, tmp_path, capsys):
    """``featureviz render --server ... --prior DATASET`` runs the job with it; ``--prior`` without a server, and
    ``--prior-images`` with one, are refused with one line each."""
    import json

    from featureviz.cli import main

    model_file = tmp_path / "tiny.onnx"
    model_file.write_bytes(tiny_onnx)
    ident, address = setup["sets"]["steep"], setup["server"].address
    common = ["render", str(model_file), "logit:1", "--steps", "1", "--size", "32", "--out", str(tmp_path / "r.png")]
    assert main([*common, "--server", address, "--token", "token-a", "--prior", ident, "--json"]) == 0
    job = json.loads(capsys.readouterr().out)["job"]
    with Client(address, token="token-a") as fv:
        assert fv.job(job).spec.prior_dataset == ident
    assert main([*common, "--prior", ident]) == 2
    assert "--prior DATASET names a server's dataset" in capsys.readouterr().err
    assert main([*common, "--server", address, "--token", "token-a", "--prior-images", str(tmp_path)]) == 2
    assert "--prior DATASET" in capsys.readouterr().err


def test_the_cache_lives_with_the_set_and_goes_with_it(setup, alice, tmp_path):
    """The learned files are in the store's folder of the set (named by its id); DeleteDataset waits for a running
    job that learns from the set (DATASET_IN_USE), then removes them with the set."""
    model, server = setup["model"], setup["server"]
    folder = write_pngs(tmp_path / "gone", [power_law_image(SIDE, 1.0, np.eye(3) * 0.1, 500 + s) for s in range(8)])
    ident = alice.upload_dataset(folder).id
    cache = server._server.store.prior_dir(ident)
    long = alice.submit(model, LOGIT, steps=10_000, size=32, prior_dataset=ident)
    assert (cache / "stats-3.json").is_file() and (cache / "report-3.json").is_file()
    assert cache.parent.name == "priors" and cache.name == ident
    with pytest.raises(FeaturevizClientError) as err:
        alice.delete_dataset(ident)
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "DATASET_IN_USE"
    alice.cancel(long.id)
    assert alice.wait(long.id, timeout=120).state == pb.JOB_STATE_CANCELLED
    alice.delete_dataset(ident)
    assert not cache.exists()


def _unit_statistics(fv, job, units) -> tuple[float, float]:
    """(mean channel correlation, mean fitted spectrum decay) of an atlas's unit renders."""
    from featureviz.engine.priors import spectrum_decay

    corr, decay = [], []
    for unit in units:
        png = fv.atlas_unit_image(job.id, unit.index).png
        image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255)
        image = image.permute(2, 0, 1)
        c = torch.corrcoef(image.reshape(3, -1))
        corr.append(float((c[0, 1] + c[0, 2] + c[1, 2]) / 3))
        decay.append(spectrum_decay(image))
    return float(np.mean(corr)), float(np.mean(decay))


def test_an_atlas_learns_its_units_prior_from_a_set(setup, alice, bob, tmp_path, capsys):
    """``prior_dataset`` on an atlas: every unit's fft parameterization takes the set's statistics (one step, as in
    the render test: the units' images move toward the steep set's); the units' keys name the set (the same atlas
    without the prior renders its own units, the same prior again is served from the store); the set cannot be
    deleted while the atlas runs; another tenant's set is NOT_FOUND; ``featureviz atlas --prior`` sends it."""
    from featureviz.cli import main

    model, sets = setup["model"], setup["sets"]
    common = dict(layers=["/Relu_1"], channels=3, steps=1, lr=0.5, size=SIDE, seed=0, param="fft",
                  transforms="none")

    def finished(**options):
        job = alice.atlas(model, wait=True, timeout=120, **common, **options)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        units = list(alice.atlas_units(job.id))
        assert len(units) == 3 and all(unit.done for unit in units)
        return job, units

    plain, plain_units = finished()
    steep, steep_units = finished(prior_dataset=sets["steep"])
    assert steep.spec.prior_dataset == sets["steep"]
    assert not any(unit.cached for unit in steep_units)  # not the plain atlas's renders
    assert not {u.key for u in plain_units} & {u.key for u in steep_units}
    default_stats, steep_stats = _unit_statistics(alice, plain, plain_units), _unit_statistics(alice, steep,
                                                                                              steep_units)
    assert steep_stats[0] < default_stats[0] - CORRELATION_MARGIN, (steep_stats, default_stats)
    assert steep_stats[1] > default_stats[1] + DECAY_MARGIN, (steep_stats, default_stats)
    again, again_units = finished(prior_dataset=sets["steep"])
    assert all(unit.cached for unit in again_units) and [u.key for u in again_units] == [u.key for u in steep_units]

    long = alice.atlas(model, **{**common, "steps": 10_000}, prior_dataset=sets["flat"])
    with pytest.raises(FeaturevizClientError) as err:
        alice.delete_dataset(sets["flat"])
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "DATASET_IN_USE", err.value
    assert long.id in err.value.message
    alice.cancel(long.id)
    assert alice.wait(long.id, timeout=120).state == pb.JOB_STATE_CANCELLED

    with pytest.raises(FeaturevizClientError) as err:
        bob.atlas(model, **common, prior_dataset=sets["steep"])
    assert err.value.code == "NOT_FOUND" and err.value.reason == "DATASET_NOT_FOUND", err.value

    model_file = tmp_path / "tiny.onnx"
    model_file.write_bytes(setup["tiny_onnx"])
    out = tmp_path / "site"
    assert main(["atlas", str(model_file), "--layers", "/Relu_1", "--channels", "1", "--steps", "1", "--size", "32",
                 "--server", setup["server"].address, "--token", "token-a", "--prior", sets["steep"], "--quiet",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    newest = next(job for job in alice.jobs() if job.spec.HasField("atlas"))
    assert newest.spec.prior_dataset == sets["steep"] and newest.state == pb.JOB_STATE_SUCCEEDED


def test_a_prior_without_its_source_is_not_found_never_imagenets(setup, tiny_onnx, tmp_path):
    """The worker's check of a spec naming a prior_dataset whose PriorSource it was not given (an atlas unit after
    its set went): NOT_FOUND naming the set, not a render with ImageNet's statistics under a key that names it."""
    from featureviz.errors import NotFound
    from featureviz.importer import import_model
    from featureviz.worker import adapter
    from featureviz.worker.priors import Priors

    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_onnx)
    spec = pb.JobSpec(steps=1, size=pb.ImageSize(height=32, width=32), prior_dataset="ab" * 32)
    spec.objective.channel.layer, spec.objective.channel.channel = "/Relu_1", 0
    for priors in ({}, None):
        with pytest.raises(NotFound) as err:
            adapter.checked_spec(import_model(path), spec, "cpu", priors=priors, learned=Priors())
        assert "spec.prior_dataset" in str(err.value) and "abab" in str(err.value)

"""Learned priors (featureviz.engine.priors, issue 25): colour and spectrum statistics of an image set, the EPLL patch
prior, the `prior` objective kind, and renders that use them. Image sets are real PNG files of synthetic images with
known statistics (tests/support/natural.py): Gaussian fields with a power-law spectrum and a known colour covariance,
and dead-leaves images (occluding discs: a standard model of natural image statistics)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from featureviz import spec as specs  # noqa: E402
from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import render  # noqa: E402
from featureviz.engine import validate  # noqa: E402
from featureviz.engine import objectives as O  # noqa: E402
from featureviz.engine.exemplars import ImageFolder  # noqa: E402
from featureviz.engine.params import make_param  # noqa: E402
from featureviz.engine.priors import MIN_IMAGES  # noqa: E402
from featureviz.engine.priors import FolderPriors  # noqa: E402
from featureviz.engine.priors import ImageStats  # noqa: E402
from featureviz.engine.priors import PatchPrior  # noqa: E402
from featureviz.engine.priors import fit_patch_prior  # noqa: E402
from featureviz.engine.priors import image_statistics  # noqa: E402
from featureviz.engine.priors import spectrum_decay  # noqa: E402
from featureviz.errors import FailedPrecondition  # noqa: E402
from featureviz.errors import InvalidSpec  # noqa: E402
from featureviz.errors import NotFound  # noqa: E402
from tests.support.natural import dead_leaves  # noqa: E402
from tests.support.natural import png  # noqa: E402
from tests.support.natural import power_law_image  # noqa: E402
from tests.support.natural import write_pngs  # noqa: E402

MIXING = np.array([[0.12, 0.02, 0.00], [0.10, -0.03, 0.02], [0.08, 0.00, -0.04]])


def _normalized(cov):
    return cov / np.trace(cov)


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    """12 dead-leaves images (96 px) as PNG files."""
    return write_pngs(tmp_path_factory.mktemp("leaves"), [dead_leaves(96, seed, discs=300) for seed in range(12)])


@pytest.fixture(scope="module")
def small_prior(leaves):
    """A small 3-channel patch prior (4 components) fitted on the leaves: seconds."""
    return fit_patch_prior(ImageFolder(leaves), components=4, max_patches=4000, patches_per_image=400, iterations=15)


# ------------------------------------------------------------------------------------------- colour and spectrum


@pytest.mark.parametrize("decay", [0.7, 1.0, 1.4])
def test_colour_matrix_and_spectrum_decay_are_recovered(tmp_path, decay):
    folder = write_pngs(tmp_path, [power_law_image(128, decay, MIXING, seed) for seed in range(MIN_IMAGES)])
    stats = image_statistics(ImageFolder(folder))
    color = np.array(stats.color)
    # the square root of the covariance: C C^T is the covariance up to the normalization (largest column norm 1)
    np.testing.assert_allclose(_normalized(color @ color.T), _normalized(MIXING @ MIXING.T), atol=0.02)
    assert np.linalg.norm(color, axis=0).max() == pytest.approx(1.0)
    assert np.all(np.linalg.norm(color, axis=0)[:-1] >= np.linalg.norm(color, axis=0)[1:])  # eigenvalues decreasing
    assert abs(stats.decay - decay) < 0.05  # the fitted amplitude decay (power slope / 2)
    assert stats.images == MIN_IMAGES and stats.spectrum_images == MIN_IMAGES
    assert np.allclose(stats.mean, 0.5, atol=0.05)


def test_a_set_of_28_pixel_images_has_a_spectrum(tmp_path):
    """MNIST-sized images (28x28) enter the spectrum (MIN_SPECTRUM_SIDE 16): a steep and a shallow set are told
    apart (a small crop's window blurs the slope, so only the order and a rough level are asserted)."""
    decays = {}
    for decay in (0.5, 1.5):
        folder = write_pngs(tmp_path / str(decay), [power_law_image(28, decay, MIXING, seed)
                                                    for seed in range(MIN_IMAGES)])
        stats = image_statistics(ImageFolder(folder), channels=1)
        assert stats.spectrum_images == MIN_IMAGES
        decays[decay] = stats.decay
    assert decays[1.5] > decays[0.5] + 0.5, decays


def test_grey_images_and_the_one_channel_case(tmp_path):
    grey = [np.repeat(power_law_image(64, 1.0, np.eye(3) * 0.1, seed)[..., :1], 3, -1) for seed in range(MIN_IMAGES)]
    folder = write_pngs(tmp_path, grey)
    rgb = image_statistics(ImageFolder(folder))
    color = np.array(rgb.color)
    np.testing.assert_allclose(color[:, 0], np.full(3, 1 / np.sqrt(3)), atol=1e-3)  # one direction: luminance
    assert np.abs(color[:, 1:]).max() < 1e-3
    one = image_statistics(ImageFolder(folder), channels=1)
    assert one.channels == 1 and one.color == [[1.0]]
    matrix = one.rgb_color()
    np.testing.assert_allclose(matrix.numpy(), np.pad(np.full((3, 1), 1 / np.sqrt(3)), ((0, 0), (0, 2))), atol=1e-6)
    # a render's initial image through the grey matrix is grey, and a start image is reachable (pseudo-inverse)
    _, image_fn = make_param("fft", 2, (32, 32), generator=torch.Generator().manual_seed(0), prior=one)
    image = image_fn()
    assert torch.allclose(image[:, 0], image[:, 1]) and torch.allclose(image[:, 1], image[:, 2])
    start = torch.full((3, 32, 32), 0.3)
    _, image_fn = make_param("pixel", 1, (32, 32), generator=torch.Generator().manual_seed(0), prior=one, init=start)
    assert torch.allclose(image_fn()[0], start, atol=1e-4)


def test_too_few_images_is_refused_with_one_line(tmp_path):
    write_pngs(tmp_path, [dead_leaves(48, seed, discs=50) for seed in range(MIN_IMAGES - 1)])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(png(dead_leaves(48, 99, discs=10))[:100])
    for fit in (image_statistics, fit_patch_prior):
        with pytest.raises(FailedPrecondition) as err:
            fit(ImageFolder(tmp_path))
        assert err.value.reason == "DATASET_TOO_SMALL"
        assert "\n" not in str(err.value) and f"has {MIN_IMAGES - 1} decodable images" in str(err.value)
        assert f"at least {MIN_IMAGES}" in str(err.value)


def test_stats_are_plain_data_and_a_bad_dict_is_refused(leaves):
    stats = image_statistics(ImageFolder(leaves))
    again = ImageStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats and again.key() == stats.key()
    for bad in ({"channels": 2}, stats.to_dict() | {"color": [[1, 0], [0, 1]]},
                stats.to_dict() | {"decay": float("nan")}, stats.to_dict() | {"color": [[0] * 3] * 3},
                stats.to_dict() | {"decay": "1"}, "text"):
        with pytest.raises(InvalidSpec):
            ImageStats.from_dict(bad)


# ------------------------------------------------------------------------------------------- the patch prior


def test_patch_prior_scores_natural_patches_above_noise(small_prior):
    assert small_prior.images == 12 and small_prior.patches == 4000 and small_prior.components == 4
    train = small_prior.train
    assert np.isfinite(small_prior.held_out) and small_prior.held_out > train - 0.05 * abs(train)
    held_out = torch.stack([torch.from_numpy(dead_leaves(96, seed, discs=300)).permute(2, 0, 1).float()
                            for seed in range(100, 104)])
    generator = torch.Generator().manual_seed(0)
    # noise with the natural images' own mean and standard deviation per channel
    mean, std = held_out.mean((2, 3), keepdim=True), held_out.std((2, 3), keepdim=True)
    noise = (mean + std * torch.randn(held_out.shape, generator=generator)).clamp(0, 1)
    natural, noisy = small_prior.nll(held_out), small_prior.nll(noise)
    assert natural.shape == (4,)
    assert natural.max() + 1.0 < noisy.min()  # nats per value: a wide margin (measured: about -3 against +40)


def test_patch_prior_gradient_matches_finite_differences(small_prior):
    image = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    image.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: small_prior.nll(x), (image,), eps=1e-6, atol=1e-6, rtol=1e-4)
    grey = PatchPrior.from_dict(small_prior.to_dict() | {"channels": 1, "covs": small_prior.covs[:, :64, :64].tolist()})
    assert torch.autograd.gradcheck(lambda x: grey.nll(x), (image,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_patch_prior_is_deterministic_and_saves_without_pickle(leaves, small_prior, tmp_path):
    again = fit_patch_prior(ImageFolder(leaves), components=4, max_patches=4000, patches_per_image=400, iterations=15)
    assert torch.equal(again.weights, small_prior.weights) and torch.equal(again.covs, small_prior.covs)
    path = tmp_path / "prior.npz"
    small_prior.save(path)
    loaded = PatchPrior.load(path)
    assert torch.equal(loaded.covs, small_prior.covs) and loaded.held_out == small_prior.held_out
    from_json = PatchPrior.from_dict(json.loads(json.dumps(small_prior.to_dict())))
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(from_json.nll(image), small_prior.nll(image))
    # a pickled object array, a damaged file, a covariance that is not positive definite: refused, nothing run
    np.savez(tmp_path / "pickled.npz", weights=np.array([object()]), covs=np.zeros(1), meta=np.zeros(1, np.uint8))
    (tmp_path / "damaged.npz").write_bytes(path.read_bytes()[:200])
    for bad in ("pickled.npz", "damaged.npz"):
        with pytest.raises(InvalidSpec, match="not a readable patch prior"):
            PatchPrior.load(tmp_path / bad)
    with pytest.raises(InvalidSpec, match="positive definite"):
        PatchPrior.from_dict(small_prior.to_dict() | {"covs": (-small_prior.covs).tolist()})


# ------------------------------------------------------------------------------------------- the objective kind


def test_prior_kind_is_declared_once_and_parses(small_prior):
    spec = specs.parse_objective("L:3 - 0.1*prior:3fa9c0-data.v2")
    assert spec["sum"][1] == {"scale": {"factor": -0.1, "objective": {"prior": {"dataset": "3fa9c0-data.v2"}}}}
    assert specs.format_objective(spec) == "L:3 - 0.1*prior:3fa9c0-data.v2"
    assert specs.parse_objective("-prior:'leaves'") == {"scale": {"factor": -1.0, "objective":
                                                                  {"prior": {"dataset": "leaves"}}}}
    for bad in ("../etc", "a/b", ".hidden", "x" * 129, "a b", ""):
        with pytest.raises(InvalidSpec) as err:
            specs.normalize_objective({"prior": {"dataset": bad}})
        assert err.value.field == "objective.prior.dataset"
    objective = O.build(spec)
    assert objective.needs_image and objective.layers == ("L",)


def test_prior_terms_resolve_by_name_only(lite0, small_prior):
    layer = next(info.name for info in lite0.layers if info.spatial)
    base = dict(objective=specs.parse_objective(f"'{layer}':1 - 0.1*prior:leaves"), steps=1, size=32)
    with pytest.raises(InvalidSpec) as err:  # no resolver
        validate(lite0, RenderSpec(**base))
    assert err.value.field == "objective.sum[1].scale.objective.prior.dataset"
    with pytest.raises(NotFound, match="no image set named 'leaves'.*known: other"):
        validate(lite0, RenderSpec(**base, patch_priors={"other": small_prior}))
    checked = validate(lite0, RenderSpec(**base, patch_priors={"leaves": small_prior}))
    (node,) = [n for n in O.walk(checked.objective) if isinstance(n, O.PatchPrior)]
    assert node.prior is small_prior


def test_folder_priors_resolve_names_not_paths(leaves, tmp_path):
    priors = FolderPriors({"leaves": leaves}, cache_dir=tmp_path, components=2, max_patches=2000,
                          patches_per_image=200, iterations=3)
    for name in ("../leaves", str(leaves), "other"):
        with pytest.raises(NotFound):
            priors(name)
    fitted = priors("leaves")
    assert fitted.components == 2 and len(list((tmp_path / "priors").glob("*.npz"))) == 1
    again = FolderPriors({"leaves": leaves}, cache_dir=tmp_path, components=2, max_patches=2000,
                         patches_per_image=200, iterations=3)("leaves")  # read from the cache
    assert torch.equal(again.covs, fitted.covs)


# ------------------------------------------------------------------------------------------- renders


def test_patch_prior_render_lowers_the_nll(lite0, small_prior):
    """The prior alone (no model objective) in a batched render from noise: each image's NLL falls a long way."""
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = render(lite0, RenderSpec(objective=specs.parse_objective("-prior:leaves"), steps=24, size=32, batch=2,
                                      init_image=noise, patch_priors={"leaves": small_prior}))
    # measured: -218 -> -112 and -213 -> -112 nats per value in 24 steps
    assert all(start < -10 and end - start > 0.25 * abs(start)
               for start, end in zip(result.objective_start, result.objective_end))


def _mean_correlation(images):
    out = []
    for image in images.double():
        c = torch.corrcoef(image.reshape(3, -1))
        out.append(float((c[0, 1] + c[0, 2] + c[1, 2]) / 3))
    return np.array(out)


def test_learned_statistics_move_a_render_toward_the_data(lite0, tmp_path):
    """Data with independent colour channels and a steep spectrum (decay 1.6): a render with the learned matrix and
    decay has less correlated channels and a steeper spectrum than with ImageNet's (the data's: 0 and 1.6)."""
    folder = write_pngs(tmp_path, [power_law_image(96, 1.6, np.diag([0.12, 0.10, 0.08]), 100 + s)
                                   for s in range(MIN_IMAGES)])
    stats = image_statistics(ImageFolder(folder))
    layer = next(info.name for info in lite0.layers if info.spatial and info.depth > 12)
    results = {}
    for name, prior in (("default", None), ("learned", stats)):
        result = render(lite0, RenderSpec(objective={"channel": {"layer": layer, "channel": 3}}, steps=40, size=48,
                                          batch=3, prior=prior))
        results[name] = (_mean_correlation(result.images), np.array([spectrum_decay(i) for i in result.images]))
    (corr_default, decay_default), (corr_learned, decay_learned) = results["default"], results["learned"]
    assert corr_learned.mean() + CORRELATION_MARGIN < corr_default.mean()
    assert decay_learned.mean() > decay_default.mean() + DECAY_MARGIN


# measured over seeds 0 to 2 (3 images each, this layer, 40 steps, 48 px): the mean channel correlation falls from
# 0.84 to -0.34, 0.83 to -0.26 and 0.85 to -0.24 (the data's: 0), the render's spectrum decay rises from 1.02 to
# 1.46, 0.85 to 1.31 and 0.98 to 1.39 (the data's: 1.6); the margins are about half of the smallest gap
CORRELATION_MARGIN = 0.4
DECAY_MARGIN = 0.25


# ------------------------------------------------------------------------------------------- the command line


def test_render_prior_images_on_the_command_line(lite0, leaves, tmp_path, monkeypatch, capsys):
    from featureviz import zoo
    from featureviz.cli import main

    import featureviz.cli.render

    monkeypatch.setattr(featureviz.cli.render, "prior_cache_dir", lambda: tmp_path / "cache")
    model = str(zoo.efficientnet_lite0(dynamic_size=True))
    argv = ["render", model, "/_blocks.4/_swish/Clip:5 - 0.5*prior:leaves", "--prior-images", f"leaves={leaves}",
            "--steps", "3", "--size", "32", "--out", str(tmp_path / "p.png"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["objective"] == "/_blocks.4/_swish/Clip:5 - 0.5*prior:leaves" and report["steps"] == 3
    cached = sorted(p.suffix for p in (tmp_path / "cache" / "priors").iterdir())
    assert cached == [".json", ".npz"]  # the statistics and the patch prior, fitted once
    assert main([*argv[:2], "-prior:other", *argv[3:]]) == 1
    assert "no image set named 'other' for a prior; known: leaves" in capsys.readouterr().err
    assert main([*argv, "--server", "127.0.0.1:1"]) == 2
    assert "--prior-images applies to a local render" in capsys.readouterr().err


def test_the_laplacian_pyramid_takes_the_learned_decay():
    """The same unit-variance levels through the pyramid without a prior, with a steep (1.6) and a shallow (0.5)
    set's statistics: the image's spectrum decay follows the set's (the levels are weighted 2^(n (d - 1)))."""
    def decay_of(prior):
        generator = torch.Generator().manual_seed(0)
        params, image_fn = make_param("laplacian", 2, (64, 64), generator=generator, sigmoid=False, prior=prior,
                                      decorrelate=False)
        with torch.no_grad():
            for level in params:
                level.copy_(torch.randn(level.shape, generator=generator))
            return np.mean([spectrum_decay(image) for image in image_fn()])

    def stats(decay):
        return ImageStats(channels=3, color=np.eye(3).tolist(), mean=[0.5] * 3, decay=decay, alpha=2 * decay)

    default, steep, flat = decay_of(None), decay_of(stats(1.6)), decay_of(stats(0.5))
    assert steep > default + 0.3 and flat < default - 0.3, (flat, default, steep)

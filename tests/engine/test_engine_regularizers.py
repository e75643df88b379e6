"""lucid's Laplacian-pyramid parameterization and the bilateral-filter penalty: definitions, specs, proto, render."""

import pytest
import torch
import torch.nn.functional as F

from featureviz.codec import objective_from_proto
from featureviz.codec import objective_to_proto
from featureviz.codec import spec_from_proto
from featureviz.codec import spec_to_proto
from featureviz.engine.objectives import Activations
from featureviz.engine.objectives import Bilateral
from featureviz.engine.objectives import bilateral_filter
from featureviz.engine.objectives import build
from featureviz.engine.params import LAPLACIAN_LEVELS
from featureviz.engine.params import color_matrix
from featureviz.engine.params import make_param
from featureviz.spec import format_objective
from featureviz.spec import parse_objective

MID = "/_blocks.4/_swish/Clip"


def test_laplacian_pyramid_levels_and_image():
    params, image_fn = make_param("laplacian", 2, (20, 17), generator=torch.Generator().manual_seed(0))
    assert LAPLACIAN_LEVELS == 4
    assert [tuple(p.shape) for p in params] == [(2, 3, 20, 17), (2, 3, 10, 8), (2, 3, 5, 4), (2, 3, 2, 2)]
    with torch.no_grad():
        want = params[0] + sum(F.interpolate(p, size=(20, 17), mode="bilinear", align_corners=False)
                               for p in params[1:])
        want = torch.sigmoid(torch.einsum("oc,bchw->bohw", color_matrix(), want))
        torch.testing.assert_close(image_fn(), want)
    image_fn().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # every level is optimised


def test_laplacian_pyramids_of_one_size_render_as_one_group():
    """The batched engine renders parameterizations of one render_key in one call (params.render_group)."""
    from featureviz.engine.params import render_group

    a = make_param("laplacian", 2, (20, 17), generator=torch.Generator().manual_seed(0))[1]
    b = make_param("laplacian", 1, (20, 17), generator=torch.Generator().manual_seed(1))[1]
    other = make_param("laplacian", 1, (20, 16), generator=torch.Generator())[1]
    assert a.render_key == b.render_key != other.render_key
    with torch.no_grad():
        torch.testing.assert_close(render_group([a, b]), torch.cat([a(), b()]))


def test_laplacian_pyramid_starts_from_an_image():
    target = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    params, image_fn = make_param("laplacian", 1, (16, 12), generator=torch.Generator(), init=target)
    with torch.no_grad():
        torch.testing.assert_close(image_fn(), target, atol=2e-5, rtol=0)
    assert all(p.abs().sum() == 0 for p in params[1:])


def test_bilateral_filter_keeps_edges_and_smooths_noise():
    g = torch.Generator().manual_seed(0)
    edge = torch.zeros(1, 3, 24, 24)
    edge[..., 12:] = 0.8
    noisy = edge + 0.02 * torch.randn(edge.shape, generator=g)
    smooth = bilateral_filter(noisy, 1.0, 0.1)
    assert (smooth - edge).abs().mean() < 0.5 * (noisy - edge).abs().mean()  # the noise is smoothed
    assert (smooth[..., 11] - edge[..., 11]).abs().max() < 0.05  # the edge is kept: no bleeding across it
    blurred = F.avg_pool2d(F.pad(noisy, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert (blurred[..., 11] - edge[..., 11]).abs().max() > 0.2  # a plain blur bleeds
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(bilateral_filter(flat, 2.0, 0.05), flat)


def test_bilateral_penalty_pulls_towards_the_filtered_image():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    objective = Bilateral(1.0, 0.1)
    value = objective(Activations({}, x))
    smooth = bilateral_filter(x.detach(), 1.0, 0.1)
    torch.testing.assert_close(value, 0.5 * (x.detach() - smooth).pow(2).flatten(1).mean(-1))
    value.sum().backward()
    torch.testing.assert_close(x.grad, (x.detach() - smooth) / (3 * 12 * 12))


def test_bilateral_spec_text_and_proto():
    spec = parse_objective("logit:3 - 0.1*bilateral")
    assert spec["sum"][1]["scale"]["objective"] == {"bilateral": {"sigma_space": 1.0, "sigma_color": 0.1}}
    assert format_objective(spec) == "logit:3 - 0.1*bilateral"
    custom = {"bilateral": {"sigma_space": 2.0, "sigma_color": 0.05}}
    assert isinstance(build(custom), Bilateral) and build(custom).spec() == custom
    assert objective_from_proto(objective_to_proto(custom)) == custom
    assert objective_from_proto(objective_to_proto({"bilateral": {}})) == {"bilateral": {}}
    job = spec_to_proto("a" * 64, {"logit": {"index": 1}}, param="laplacian")
    assert spec_from_proto(job)["param"] == "laplacian"


@pytest.mark.parametrize("param, objective", [("laplacian", f"{MID}:5"), ("fft", f"{MID}:5 - 0.5*bilateral")])
def test_render_with_the_new_options(lite0, param, objective):
    from featureviz.engine import RenderSpec
    from featureviz.engine import render

    result = render(lite0, RenderSpec(parse_objective(objective), steps=6, size=48, param=param, device="cpu"))
    assert result.images.shape == (1, 3, 48, 48)
    assert result.objective_end[0] > result.objective_start[0]

"""Objectives as values: formulas on known activations, algebra, specs, flat sums."""

import pytest
import torch

from featureviz.engine import objectives as O
from featureviz.engine.objectives import Activations
from featureviz.engine.objectives import build
from featureviz.spec import parse_objective

G = torch.Generator().manual_seed(0)
Z = torch.randn(3, 4, 5, 6, generator=G)  # (B, C, H, W)
LOGITS = torch.randn(3, 10, generator=G)
IMAGE = torch.rand(3, 3, 8, 8, generator=G)


def acts():
    return Activations({"z": Z, "fc": LOGITS}, IMAGE, logits="fc")


def value(spec):
    return build(spec)(acts())


def test_leaf_formulas():
    close = torch.testing.assert_close
    close(value({"neuron": {"layer": "z", "channel": 2}}), Z[:, 2, 2, 3])  # centre: y = 5 // 2, x = 6 // 2
    close(value({"neuron": {"layer": "z", "channel": 2, "x": 1, "y": 4}}), Z[:, 2, 4, 1])
    close(value({"channel": {"layer": "z", "channel": 1}}), Z[:, 1].mean((1, 2)))
    close(value({"layer": {"layer": "z"}}), Z.pow(2).mean((1, 2, 3)))
    close(value({"logit": {"index": 7}}), LOGITS[:, 7])
    close(value({"prob": {"index": 7}}), torch.softmax(LOGITS, -1)[:, 7])
    v = torch.tensor([1.0, -2.0, 0.5, 0.0])
    close(value({"direction": {"layer": "z", "vector": v.tolist()}}), torch.einsum("bchw,c->b", Z, v) / 30)
    close(value({"neuron_direction": {"layer": "z", "vector": v.tolist(), "x": 0, "y": 0}}), Z[:, :, 0, 0] @ v)
    close(value({"l1": {"constant": 0.5}}), (IMAGE - 0.5).abs().mean((1, 2, 3)))
    close(value({"tv": {}}), (IMAGE[..., 1:] - IMAGE[..., :-1]).abs().mean((1, 2, 3))
          + (IMAGE[..., 1:, :] - IMAGE[..., :-1, :]).abs().mean((1, 2, 3)))


@pytest.mark.parametrize("shape", [(3, 4, 30), (4, 64, 9), (2, 1, 5)])  # P > C, B P < C, one channel
def test_gram_routes_agree_with_explicit_normalised_grams_in_value_and_gradient(shape):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    z[-1] = 0.0  # an all-zero image: cosine 0, finite gradient
    explicit = torch.nn.functional.normalize(torch.bmm(z, z.transpose(1, 2)).flatten(1), dim=-1, eps=1e-10)
    expected = explicit @ explicit.T
    weights = torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64)
    grads = {}
    for route in ("gram", "kernel"):
        zz = z.clone().requires_grad_(True)
        got = O.gram_cosines(zz, route)
        torch.testing.assert_close(got, expected)
        (got * weights).sum().backward()
        assert torch.isfinite(zz.grad).all()
        grads[route] = zz.grad
    reference = z.clone().requires_grad_(True)
    ref = torch.nn.functional.normalize(torch.bmm(reference, reference.transpose(1, 2)).flatten(1), dim=-1, eps=1e-10)
    ((ref @ ref.T) * weights).sum().backward()
    torch.testing.assert_close(grads["gram"], reference.grad)
    torch.testing.assert_close(grads["kernel"], reference.grad)


def test_direction_cosine_power_follows_lucid():
    v = torch.tensor([1.0, 0.0, 0.0, 0.0])
    got = value({"direction": {"layer": "z", "vector": v.tolist(), "cossim_pow": 2.0}})
    flat = Z.permute(0, 2, 3, 1).reshape(3, -1, 4)
    dot = flat @ v
    cos = dot / (1e-4 + flat.norm(dim=-1)) / (1e-4 + v.norm())
    torch.testing.assert_close(got, (dot * cos.clamp(min=0.1) ** 2).mean(-1))


def test_diversity_is_minus_lucid_gram_similarity():
    got = value({"diversity": {"layer": "z"}})
    # lucid: grams over channels, l2-normalised; sum_{i != j} <G_i, G_j> / N; featureviz maximises its negation
    flat = Z.flatten(2)
    grams = torch.nn.functional.normalize(torch.bmm(flat, flat.transpose(1, 2)).flatten(1), dim=-1)
    lucid = sum((grams[i] * grams[j]).sum() for i in range(3) for j in range(3) if i != j) / 3
    torch.testing.assert_close(got.sum(), -lucid)
    same = Activations({"z": Z[:1].expand(3, -1, -1, -1)}, IMAGE)
    torch.testing.assert_close(O.Diversity("z")(same), torch.full((3,), -2 / 3))


def test_alignment_splits_lucid_pairs():
    got = value({"alignment": {"layer": "z", "decay": 2.0}})
    lucid = torch.zeros(())
    for d in (1, 2):
        for i in range(3 - d):
            lucid -= (Z[i] - Z[i + d]).pow(2).mean() / 2 ** d
    torch.testing.assert_close(got.sum(), lucid)


def test_interpolate_and_batch():
    a, b = {"channel": {"layer": "z", "channel": 0}}, {"channel": {"layer": "z", "channel": 3}}
    got = value({"interpolate": {"a": a, "b": b}})
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(got, (1 - t) * value(a) + t * value(b))
    got = value({"batch": {"index": 1, "objective": a}})
    torch.testing.assert_close(got, torch.tensor([0.0, value(a)[1].item(), 0.0]))


def test_blur_pulls_towards_the_blurred_image_only():
    image = IMAGE.clone().requires_grad_(True)
    v = O.Blur()(Activations({}, image))
    v.sum().backward()
    assert (v > 0).all()
    flat = torch.full_like(IMAGE, 0.3)
    assert torch.allclose(O.Blur()(Activations({}, flat)), torch.zeros(3))


def test_algebra_matches_arithmetic():
    a = O.Channel("z", 0)
    b = O.Neuron("z", 1)
    c = O.Logit(3)
    expr = a + 2 * b - c / 4 - (-a) * 0.5
    want = a(acts()) + 2 * b(acts()) - c(acts()) / 4 + 0.5 * a(acts())
    torch.testing.assert_close(expr(acts()), want)
    assert isinstance(expr, O.Sum) and len(expr.terms) == 4  # flat
    assert str(-a) == "-z:0"
    assert sum([a, b]).spec() == {"sum": [a.spec(), b.spec()]}
    assert isinstance(3 * (2 * a), O.Scale) and (3 * (2 * a)).factor == 6.0


def test_long_sums_stay_flat():
    terms = [O.Channel("z", i % 4) for i in range(20000)]
    total = terms[0]
    for term in terms[1:]:
        total = total + term  # would recurse 20000 deep if sums nested
    assert isinstance(total, O.Sum) and len(total.terms) == 20000
    torch.testing.assert_close(total(acts()), 5000 * sum(O.Channel("z", i)(acts()) for i in range(4)),
                               rtol=1e-4, atol=1e-3)
    assert len(O.Objective.sum(terms).terms) == 20000
    assert len(build(total.spec()).terms) == 20000


@pytest.mark.parametrize("text", ["z:1", "z:2@0,1", "-z:1 + 0.5*logit:3", "prob:2 - 0.05*l1 - tv - blur",
                                  "diversity:z + alignment:z"])
def test_spec_round_trip(text):
    spec = parse_objective(text)
    obj = build(spec)
    assert obj.spec() == spec
    assert build(obj.spec())(acts()).shape == (3,)


def test_layers_and_image_needs():
    obj = build(parse_objective("z:1 + logit:2 - 0.1*tv"))
    assert obj.layers == ("z", None)
    assert obj.needs_image
    assert not build(parse_objective("z:1")).needs_image

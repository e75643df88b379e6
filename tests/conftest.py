"""Shared test configuration.

- Tests marked ``gpu`` are skipped cleanly when CUDA is absent.
- Without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
  ``triton.jit`` decorates anything, so it is set here, before any featureviz module is imported.
- ``tests/`` is on ``sys.path`` (whatever the import mode): the shared harnesses live in ``tests/support/``
  (``from support.serve import ServeProcess``, ``support.fake_worker``, ``support.models``, ``support.certs``).
"""

import os
import sys
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # client-only environment
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def first_step():
    """``first_step(model, spec) -> (values, grads)``: the render loop's step 0, run by ``render`` itself.

    Comparing two numerically different paths (layouts, kernels, batch-mates) after several Adam steps tests
    chaos: Adam's first updates move each coefficient by about +-lr whatever its gradient's size, so rounding-level
    differences in near-zero gradients flip updates and the trajectories part. What two such paths must agree on
    is the step itself: the objective values (forward, with the step's random transforms) and the gradient
    with respect to the image parameters. This runs one step through the real loop and captures both at the
    optimizer, which is told not to move anything.
    """
    def run(model, spec, **kwargs):
        import torch

        from featureviz.engine import render
        from featureviz.engine.adam import Adam

        captured = {}

        def capture(self, closure=None):
            captured.setdefault("grads", [p.grad.detach().clone() for group in self.param_groups
                                          for p in group["params"] if p.grad is not None])

        values = []
        spec.steps = 1
        with pytest.MonkeyPatch.context() as patch:
            for optimizer in (Adam, torch.optim.Adam):  # the engine's on the CPU, torch's fused one on CUDA
                patch.setattr(optimizer, "step", capture)
            render(model, spec, progress=lambda step, total, v: values.append(v.clone()), **kwargs)
        return values[0], captured["grads"]

    return run


def assert_close_in_norm(got, expected, rtol):
    """``|got - expected| <= rtol * |expected|`` in the L2 norm over all tensors: robust to the isolated elements
    that rounding moves across a ReLU's or a clip's kink, strict about anything systematic."""
    import torch

    got = torch.cat([torch.view_as_real(g).flatten() if g.is_complex() else g.flatten() for g in got])
    expected = torch.cat([torch.view_as_real(e).flatten() if e.is_complex() else e.flatten() for e in expected])
    error, scale = (got - expected).norm().item(), expected.norm().item()
    assert scale > 0 and error <= rtol * scale, f"relative L2 error {error / max(scale, 1e-30):.3g} > {rtol}"


@pytest.fixture()
def close_in_norm():
    return assert_close_in_norm


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A folder with a test CA and the server and client certificates it signed (``support.certs.make_certs``):
    ``ca.pem``, ``server.pem``/``server.key``, ``client.pem``/``client.key``, for 127.0.0.1 and localhost."""
    from support.certs import make_certs
    from support.certs import openssl_missing

    reason = openssl_missing()
    if reason:
        pytest.skip(reason)
    return make_certs(tmp_path_factory.mktemp("certs"))

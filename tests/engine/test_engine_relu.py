"""lucid's redirected ReLU gradient: ordinary where anything gets through, redirected for a fully dead image."""

import pytest
import torch
from torch import nn

from featureviz.engine.relu import redirected_relu_grad


@pytest.mark.parametrize("module, low, high", [(nn.ReLU(), 0.0, None), (nn.ReLU6(), 0.0, 6.0),
                                               (nn.Hardtanh(-1.0, 1.0), -1.0, 1.0)])
def test_redirect_only_for_images_whose_gradient_is_blocked(module, low, high):
    x = torch.tensor([[[-2.0, -1.5, 0.5]],  # image 0: one unit on, the ordinary gradient passes
                      [[-2.0, -3.0, -1.5]]])  # image 1: all off, nothing would pass
    grad = torch.tensor([[[-1.0, 1.0, -1.0]], [[-1.0, 1.0, -1.0]]])  # dL/dy; < 0 pushes y up under descent
    outer = nn.Sequential(module)
    xr = x.clone().requires_grad_(True)
    with redirected_relu_grad(outer) as patched:
        y = outer(xr)
    assert patched == 1 and "forward" not in vars(module)  # restored on exit
    torch.testing.assert_close(y, torch.clamp(x, low, high))
    y.backward(grad)
    ordinary = grad * ((x > low) & (x < (high if high is not None else float("inf"))))
    torch.testing.assert_close(xr.grad[0], ordinary[0])
    # dead image: pass what pushes the unit back up (grad < 0), block what pushes it further down
    torch.testing.assert_close(xr.grad[1], torch.tensor([[-1.0, 0.0, -1.0]]))


def test_disabled_is_the_plain_module():
    relu = nn.ReLU()
    with redirected_relu_grad(relu, enabled=False) as patched:
        assert patched == 0 and "forward" not in vars(relu)

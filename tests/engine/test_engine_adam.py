"""The engine's Adam: torch.optim.Adam's update, without importing torch._dynamo.

Every comparison is of ONE update from the same parameters, the same moments and the same gradients (never a
trajectory over several steps, where rounding differences could grow)."""

import pytest
import torch

from featureviz.engine.adam import Adam
from featureviz.engine.batch import BatchEngine
from featureviz.engine.batch import Slot

MID = "/_blocks.4/_swish/Clip"


def _torch_step(params, grads, lr, state=None):
    """One torch.optim.Adam update of copies of ``params`` (from ``state``: {index: (step, exp_avg, exp_avg_sq)})."""
    theirs = [p.detach().clone().requires_grad_() for p in params]
    reference = torch.optim.Adam(theirs, lr=lr, foreach=False)
    for i, q in enumerate(theirs):
        if state and i in state:
            step, avg, sq = state[i]
            reference.state[q] = {"step": torch.tensor(float(step)), "exp_avg": avg.clone(),
                                  "exp_avg_sq": sq.clone()}
        q.grad = None if grads[i] is None else grads[i].clone()
    reference.step()
    return [q.detach() for q in theirs]


@pytest.mark.parametrize("foreach", [False, True])
def test_each_single_update_is_torch_adams(foreach):
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 5, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]
    adam = Adam(ours, lr=0.05, foreach=foreach)
    for step in range(4):  # at step counts 1..4, each update compared alone from the same state
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        if step == 2:
            grads[1] = None  # a parameter without a gradient is skipped (no step counted)
        before = {i: (adam.state[p]["step"], adam.state[p]["exp_avg"], adam.state[p]["exp_avg_sq"])
                  for i, p in enumerate(ours) if p in adam.state}
        want = _torch_step(ours, grads, 0.05, before)
        for p, grad in zip(ours, grads):
            p.grad = None if grad is None else grad.clone()
        adam.step()
        for p, q in zip(ours, want):
            torch.testing.assert_close(p.detach(), q, atol=1e-7, rtol=1e-6)
    assert adam.state[ours[1]]["step"] == 3 and adam.state[ours[0]]["step"] == 4


def test_a_parameter_joining_later_has_its_own_bias_correction():
    first, late = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    adam = Adam([first], lr=0.1)
    first.grad = torch.ones(2)
    adam.step()
    adam.param_groups[0]["params"].append(late)
    first.grad, late.grad = torch.ones(2), torch.ones(2)
    adam.step()
    torch.testing.assert_close(late.detach(), torch.full((2,), -0.1))  # its first step: exactly -lr * sign(g)
    assert adam.state[first]["step"] == 2 and adam.state[late]["step"] == 1


def test_the_batched_engines_first_update_is_torch_adams(lite0, monkeypatch):
    """One step of the batched engine on the real model, two slots with their own learning rates: the update each
    parameter gets is torch.optim.Adam's on the gradients that step computed."""
    from featureviz.engine import RenderSpec

    cpu = torch.device("cpu")
    slots = [Slot(lite0, RenderSpec(objective={"channel": {"layer": MID, "channel": 5}}, size=64, batch=2, seed=1,
                                    lr=0.05), device=cpu),
             Slot(lite0, RenderSpec(objective={"logit": {"index": 7}}, size=64, seed=2, lr=0.02), device=cpu)]
    engine = BatchEngine(cpu)
    engine.join(slots)
    before = {id(p): p.detach().clone() for s in slots for p in s.params}
    grads = {}
    real_step = Adam.step

    def capture_then_step(self):
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                grads[id(p)] = p.grad.detach().clone()
        real_step(self)

    monkeypatch.setattr(Adam, "step", capture_then_step)
    engine.step(slots)
    monkeypatch.undo()
    for slot in slots:
        assert all(id(p) in grads and grads[id(p)].abs().max() > 0 for p in slot.params)
        want = _torch_step([before[id(p)] for p in slot.params], [grads[id(p)] for p in slot.params], slot.lr)
        for p, q in zip(slot.params, want):
            assert not torch.equal(p.detach(), before[id(p)])  # it moved
            torch.testing.assert_close(p.detach(), q, atol=1e-7, rtol=1e-6)

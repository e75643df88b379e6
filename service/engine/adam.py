"""Adam for the render loop, without ``torch.optim``.

The update is ``torch.optim.Adam``'s (Kingma and Ba 2015, with torch's defaults: betas (0.9, 0.999), eps 1e-8, no
weight decay), written with the same tensor operations in the same order. Why not ``torch.optim.Adam`` itself:
building any ``torch.optim`` optimizer imports ``torch._dynamo`` (``Optimizer.add_param_group`` is wrapped in
``torch._disable_dynamo``), about 1 s of a command-line render's start-up on our CPUs, for nothing a render uses.

Each parameter keeps its own moments and step count (a slot that joins a batched step later has its own bias
correction); ``param_groups[0]["params"]`` and ``state`` are the two attributes the batched engine reads, as on a
torch optimizer. With ``foreach`` the parameters that share a step count are updated with one multi-tensor
call each. The batched engine uses it on the CPU; on CUDA it keeps torch's fused Adam (one kernel per step, and
the import cost does not matter to a server).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Adam"]


class Adam:
    def __init__(self, params, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 foreach: bool = False):
        self.param_groups = [{"params": list(params), "lr": float(lr)}]
        self.betas, self.eps, self.foreach = betas, eps, foreach
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2) = group["lr"], self.betas
        by_step: dict[int, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p)}
            state["step"] += 1
            by_step.setdefault(state["step"], []).append(p)
        for step, params in by_step.items():
            bias_correction1 = 1 - beta1 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
            grads = [p.grad for p in params]
            avgs = [self.state[p]["exp_avg"] for p in params]
            sqs = [self.state[p]["exp_avg_sq"] for p in params]
            if self.foreach:
                torch._foreach_lerp_(avgs, grads, 1 - beta1)
                torch._foreach_mul_(sqs, beta2)
                torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
                denom = torch._foreach_sqrt(sqs)
                torch._foreach_div_(denom, bias_correction2_sqrt)
                torch._foreach_add_(denom, self.eps)
                torch._foreach_addcdiv_(params, avgs, denom, -step_size)
                continue
            for p, grad, avg, sq in zip(params, grads, avgs, sqs):
                avg.lerp_(grad, 1 - beta1)
                sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                p.addcdiv_(avg, denom, value=-step_size)

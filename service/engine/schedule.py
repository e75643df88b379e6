"""Learning-rate schedules and the early stop at a plateau of the objective.

The learning rate of update ``t`` (0-based: the first Adam step is ``t = 0``) of a render of ``T`` steps with base
rate ``lr`` and ``W`` warm-up steps::

    t < W:        lr * (t + 1) / W                          (linear warm-up; W = 0: none)
    otherwise, with u = (t - W) / (T - W)  (0 at the end of the warm-up, (T-W-1)/(T-W) at the last step):
    constant:     lr
    cosine:       lr * (1 + cos(pi * u)) / 2
    linear:       lr * (1 - u)

The schedule runs over the render's ``steps``, so a decayed schedule at N steps is a different render from the
first N steps of a longer one.

:class:`Plateau` stops a render when its objective stops rising: after each step it keeps the objective of that
step (the mean over the batch's images, with the step's random transforms), and once it has ``2 * window`` of
them it compares the mean of the last ``window`` with the mean of the ``window`` before: when the relative gain
``(recent - before) / |before|`` is below ``threshold`` the render stops after that step.
"""

from __future__ import annotations

import collections
import math

__all__ = ["SCHEDULES", "lr_at", "Plateau", "DEFAULT_PLATEAU_WINDOW"]

SCHEDULES = ("constant", "cosine", "linear")
DEFAULT_PLATEAU_WINDOW = 32


def lr_at(schedule: str, lr: float, t: int, steps: int, warmup: int = 0) -> float:
    """The learning rate of update ``t`` (0-based) of ``steps`` (the formula in the module's docstring)."""
    if warmup > 0 and t < warmup:
        return lr * (t + 1) / warmup
    if schedule == "constant":
        return lr
    u = (t - warmup) / max(steps - warmup, 1)
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * u)) / 2
    if schedule == "linear":
        return lr * (1 - u)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


class Plateau:
    """Whether the objective has stopped rising (see the module's docstring). ``threshold`` 0 never stops."""

    def __init__(self, threshold: float, window: int = DEFAULT_PLATEAU_WINDOW):
        self.threshold = float(threshold)
        self.window = int(window)
        self.values: collections.deque[float] = collections.deque(maxlen=2 * self.window)
        self.gain: float | None = None  # the latest relative gain, once there are 2 * window values

    def add(self, value: float) -> bool:
        """Record a step's objective; True when the render should stop after this step."""
        if self.threshold <= 0:
            return False
        self.values.append(float(value))
        if len(self.values) < 2 * self.window:
            return False
        values = list(self.values)
        before = sum(values[: self.window]) / self.window
        recent = sum(values[self.window:]) / self.window
        self.gain = (recent - before) / max(abs(before), 1e-12)
        return self.gain < self.threshold

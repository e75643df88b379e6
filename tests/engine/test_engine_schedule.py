"""Learning-rate schedules and the early stop at a plateau (featureviz.engine.schedule), in the engine's render.

The objectives read only the image (no model forward): a render of them takes milliseconds."""

import math

import pytest
import torch

from featureviz.engine import RenderSpec
from featureviz.engine import render
from featureviz.engine import validate
from featureviz.engine import batch as batch_module
from featureviz.engine.schedule import Plateau
from featureviz.engine.schedule import lr_at
from featureviz.errors import InvalidSpec

# maximise |image - 0.5|: the sigmoid of the pixel parameterization bounds it by 0.5, so at a high rate it saturates
SATURATING = {"l1": {"constant": 0.5}}


@pytest.mark.parametrize("schedule, t, steps, warmup, want", [
    ("constant", 0, 100, 0, 0.1),
    ("constant", 99, 100, 0, 0.1),
    ("constant", 0, 100, 4, 0.1 * 1 / 4),
    ("constant", 3, 100, 4, 0.1),
    ("cosine", 0, 100, 0, 0.1),
    ("cosine", 50, 100, 0, 0.05),  # halfway: (1 + cos(pi/2)) / 2
    ("cosine", 25, 100, 0, 0.1 * (1 + math.cos(math.pi / 4)) / 2),
    ("cosine", 99, 100, 0, 0.1 * (1 + math.cos(math.pi * 0.99)) / 2),
    ("cosine", 1, 100, 10, 0.1 * 2 / 10),  # in the warm-up
    ("cosine", 10, 100, 10, 0.1),  # the warm-up's end: the decay starts at lr
    ("cosine", 55, 100, 10, 0.05),  # halfway through the 90 steps after the warm-up
    ("linear", 0, 100, 0, 0.1),
    ("linear", 75, 100, 0, 0.025),
    ("linear", 20, 40, 8, 0.1 * (1 - 12 / 32)),
])
def test_lr_at_follows_the_formula(schedule, t, steps, warmup, want):
    assert lr_at(schedule, 0.1, t, steps, warmup) == pytest.approx(want, rel=1e-12)


def test_the_engine_steps_with_the_scheduled_rate(monkeypatch, lite0):
    """The rate the optimizer holds at each of a render's steps is lr_at's (observed on the engine's own Adam)."""
    seen = []
    step = batch_module.Adam.step

    def observed(self):
        seen.append(self.param_groups[0]["lr"])
        return step(self)

    monkeypatch.setattr(batch_module.Adam, "step", observed)
    spec = RenderSpec(objective=SATURATING, steps=12, lr=0.2, size=8, param="pixel", transforms="none",
                      lr_schedule="cosine", lr_warmup=3, device="cpu")
    result = render(lite0, spec)
    assert result.steps_done == 12 and result.stopped_at == 0
    assert seen == pytest.approx([lr_at("cosine", 0.2, t, 12, 3) for t in range(12)], rel=1e-12)
    seen.clear()
    render(lite0, RenderSpec(objective=SATURATING, steps=5, lr=0.2, size=8, param="pixel", transforms="none",
                             device="cpu"))
    assert seen == [0.2] * 5  # the default: constant


def test_plateau_compares_the_last_window_with_the_one_before():
    plateau = Plateau(0.1, window=2)
    # means 1.0 then 1.5: +50%, no stop; then 1.5 -> 1.6 (+6.7%): stop
    assert [plateau.add(v) for v in (1.0, 1.0, 1.5, 1.5)] == [False, False, False, False]
    assert plateau.gain == pytest.approx(0.5)
    assert plateau.add(1.6) is False  # means (1.0, 1.5) -> (1.5, 1.6): 1.25 -> 1.55, +24%
    assert plateau.add(1.6) is True  # (1.5, 1.5) -> (1.6, 1.6): +6.7%
    assert plateau.gain == pytest.approx(0.1 / 1.5)
    never = Plateau(0.0, window=2)
    assert not any(never.add(1.0) for _ in range(10))
    falling = Plateau(0.01, window=1)  # a falling objective has a negative gain: it stops
    assert [falling.add(v) for v in (-1.0, -2.0)] == [False, True]


def test_a_saturating_objective_stops_at_its_plateau_and_says_when(lite0):
    steps_seen = []
    spec = RenderSpec(objective=SATURATING, steps=2000, lr=0.5, size=8, param="pixel", transforms="none",
                      plateau=0.01, plateau_window=8, device="cpu")
    result = render(lite0, spec, progress=lambda step, total, values: steps_seen.append(step))
    assert 16 <= result.stopped_at < 2000
    assert result.steps_done == result.stopped_at
    assert steps_seen == list(range(1, result.stopped_at + 1))  # progress ends at the step it stopped after
    assert result.objective_end[0] > 0.45  # saturated near its bound 0.5


def test_a_rising_objective_runs_all_its_steps(lite0):
    spec = RenderSpec(objective=SATURATING, steps=40, lr=0.002, size=8, param="pixel", transforms="none",
                      plateau=0.01, plateau_window=8, device="cpu")
    result = render(lite0, spec)
    assert result.stopped_at == 0 and result.steps_done == 40
    assert result.objective_end[0] > 2 * result.objective_start[0]


@pytest.mark.parametrize("changes, field, needle", [
    (dict(lr_schedule="exponential"), "lr_schedule", "cosine"),
    (dict(lr_warmup=-1), "lr_warmup", "[0, 10]"),
    (dict(lr_warmup=11), "lr_warmup", "[0, 10]"),
    (dict(plateau=-0.1), "plateau", "[0, 1)"),
    (dict(plateau=1.0), "plateau", "[0, 1)"),
    (dict(plateau=float("nan")), "plateau", "[0, 1)"),
    (dict(plateau="0.1"), "plateau", "[0, 1)"),
    (dict(plateau_window=0), "plateau_window", "[1, "),
])
def test_bad_schedule_options_name_the_field(lite0, changes, field, needle):
    with pytest.raises(InvalidSpec) as err:
        validate(lite0, RenderSpec(objective=SATURATING, steps=10, size=8, **changes))
    assert err.value.field == field
    assert needle in str(err.value)


def test_slots_with_and_without_a_schedule_share_a_step_with_their_own_rates(lite0):
    """Batched: a scheduled slot has its own Adam (its rate moves); a constant one keeps the shared one."""
    engine = batch_module.BatchEngine("cpu")
    specs = [RenderSpec(objective=SATURATING, steps=6, lr=0.1, size=8, param="pixel", transforms="none", seed=s,
                        **extra) for s, extra in ((0, {}), (1, {"lr_schedule": "linear"}))]
    slots = [batch_module.Slot(lite0, s, device=torch.device("cpu")) for s in specs]
    engine.join(slots)
    for t in range(6):
        engine.step(slots)
        rates = {key: opt.param_groups[0]["lr"] for key, opt in engine._optimizers.items()}
        assert rates[0.1] == 0.1
        assert rates[slots[1].optimizer_key] == pytest.approx(lr_at("linear", 0.1, t, 6))
    results = engine.finish(slots)
    assert [r["steps_done"] for r in results] == [6, 6] and not engine._optimizers

"""Parking (the worker's time slicing, featureviz.worker.slices): a slot left out of some device steps while other
slots of the same engine step (sharing its Adam) resumes exactly where it stopped, so its images are the bytes of
an uninterrupted run: its parameters, Adam moments and step counts, generators and schedule live in the slot."""

import pytest
import torch

from featureviz.engine import RenderSpec
from featureviz.engine.batch import BatchEngine
from featureviz.engine.batch import Slot

MID = "/_blocks.4/_swish/Clip"
CPU = torch.device("cpu")
STEPS = 8


def _spec(channel: int, seed: int, **extra) -> RenderSpec:
    return RenderSpec(objective={"channel": {"layer": MID, "channel": channel}}, steps=STEPS, size=32, seed=seed,
                      **extra)


@pytest.mark.parametrize("extra", [{}, {"lr_schedule": "cosine", "lr_warmup": 2}], ids=["constant", "cosine"])
def test_a_parked_slot_resumes_with_the_bytes_of_an_uninterrupted_run(lite0, extra):
    engine = BatchEngine(CPU)
    straight = Slot(lite0, _spec(5, 1, **extra), device=CPU)
    engine.join([straight])
    for _ in range(STEPS):
        engine.step([straight])
    expected = engine.finish([straight])[0]

    engine = BatchEngine(CPU)
    parked = Slot(lite0, _spec(5, 1, **extra), device=CPU)
    other = Slot(lite0, _spec(9, 2, **extra), device=CPU)  # same rate: the same Adam holds both slots' parameters
    engine.join([parked])
    engine.join([other])
    for step in range(STEPS):
        engine.step([parked])
        if step in (1, 4):  # parked while the other takes three steps
            for _ in range(3):
                engine.step([other])
    got = engine.finish([parked])[0]
    assert got["steps_done"] == STEPS and other.steps_done == 6
    assert torch.equal(got["images"], expected["images"])
    assert got["objective_end"] == expected["objective_end"]

"""What the render benchmarks share (``bench_generator``, ``bench_matching``, ``bench_priors``, ``bench_priors_data``):
the timing options, the demo model, and the cost per step of several variants taken in one run.

The cost: each variant's ``seconds_per_step`` over ``rounds`` rounds, the variants alternating within a round so that
a change in the machine's load falls on all of them; the median of each, and its ratio to the first variant's."""
from __future__ import annotations

import statistics

import torch

__all__ = ["add_timing_options", "apply_threads", "demo_model", "step_costs", "print_threads"]


def add_timing_options(parser, *, time_steps: int = 8) -> None:
    parser.add_argument("--time-steps", type=int, default=time_steps, help="steps of each timed render")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each variant once per round)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def demo_model(**import_options):
    """EfficientNet-Lite0 (the demo model) at any input size, with its preprocessing."""
    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    return import_model(zoo.efficientnet_lite0(dynamic_size=True),
                        preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS), **import_options)


def step_costs(run, variants, *, rounds: int, heading: str, digits: int = 3) -> dict:
    """``run(name, value)`` renders one variant and returns its result; prints the markdown table of the medians of
    ``seconds_per_step`` and their ratio to the first variant's; returns {name: median}."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, value in variants.items():
            times[name].append(run(name, value).seconds_per_step)
    medians = {name: statistics.median(values) for name, values in times.items()}
    first = next(iter(variants))
    print(f"\n| {heading}, median of {rounds} | s/step | vs {first} |\n| --- | --- | --- |")
    for name, median in medians.items():
        print(f"| {name} | {median:.{digits}f} | {median / medians[first]:.2f}x |")
    return medians


def print_threads() -> None:
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}")

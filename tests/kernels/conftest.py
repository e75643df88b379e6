"""Helpers for the kernel tests: a verbose closeness check against float64 references."""

import pytest
import torch


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected|, listing the worst entries if not (NaN/inf fail too).

    Errors are measured relative to the largest reference value: the kernels' errors are accumulation
    errors of sums whose size is set by the largest terms, not by each output entry.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: {int((~torch.isfinite(actual)).sum())} non-finite entries"
    ref = expected.abs().max().item() or 1.0
    err = (actual - expected).abs()
    if err.max().item() <= tol * ref:
        return
    worst = torch.topk(err.flatten(), k=min(5, err.numel())).indices
    rows = [f"  at {tuple(int(i) for i in torch.unravel_index(idx, err.shape))}: "
            f"got {actual.flatten()[idx].item():.8g}, want {expected.flatten()[idx].item():.8g}" for idx in worst]
    raise AssertionError(f"{what}: max error {err.max().item():.3g} > {tol:.1g} * max|ref| ({ref:.3g}); "
                         f"{int((err > tol * ref).sum())} of {err.numel()} entries off\n" + "\n".join(rows))


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def kernel_device():
    """CUDA when present (the compiled kernels), else CPU (the Triton interpreter, TRITON_INTERPRET=1)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

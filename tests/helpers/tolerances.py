"""Tolerances of a computation in a given dtype against a float64 reference."""

from __future__ import annotations

import torch

# dtype → (rtol, atol) for values and gradients against the naive computation.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` keyword arguments of ``torch.testing.assert_close`` for results computed in ``dtype``."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare in float64 with the tolerance of ``dtype``."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol)

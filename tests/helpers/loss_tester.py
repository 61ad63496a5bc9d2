"""Checks every loss goes through: the module equals its functional form, value and gradient equal a naive float64
reference (in each dtype of :data:`tests.helpers.tolerances.TOLERANCES`), and per-sample tensor hyperparameters equal
the scalar hyperparameter applied sample by sample."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.hyperparameters import set_hyperparameter
from tests.helpers.tolerances import tolerance


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().to(dtype)
    return value


def with_hyperparameters(module: nn.Module, values: Mapping[str, float | Tensor]) -> nn.Module:
    """Set each named hyperparameter (scalar or per-sample tensor) of ``module``; return ``module``."""
    for name, value in values.items():
        set_hyperparameter(module, name, value)
    return module


def assert_module_equals_functional(
    module: Callable[..., Tensor], functional: Callable[..., Tensor], *inputs: Any, **module_kwargs: Any
) -> None:
    """``module(*inputs, **module_kwargs)`` equals ``functional(*inputs)``, the functional form with bound settings."""
    torch.testing.assert_close(module(*inputs, **module_kwargs), functional(*inputs))


def assert_value_and_gradient(
    loss: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    x: Tensor,
    *rest: Any,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
) -> Tensor:
    """``loss`` and its gradient in ``x`` (computed in ``dtype``) against ``reference`` computed in float64.

    The floating inputs are cast to ``dtype``; the reference sees those same (rounded) values in float64, so only the
    arithmetic of ``loss`` is measured. Tolerances default to the dtype table's; both or neither of ``rtol``/``atol``.

    Returns:
        The loss value, for further checks.
    """
    if (rtol is None) != (atol is None):
        raise ValueError("pass both rtol and atol, or neither (the dtype table's are used then).")
    tol = tolerance(dtype) if rtol is None else {"rtol": rtol, "atol": atol}
    low = _cast(x, dtype).requires_grad_(True)
    low_rest = [_cast(r, dtype) for r in rest]
    out = loss(low, *low_rest)
    (grad,) = torch.autograd.grad(out.sum(), low)
    high = low.detach().to(torch.float64).requires_grad_(True)
    high_rest = [_cast(r, torch.float64) for r in low_rest]
    expected = reference(high, *high_rest)
    (grad_ref,) = torch.autograd.grad(expected.sum(), high)
    torch.testing.assert_close(out.detach().to(torch.float64), expected.detach(), **tol)  # type: ignore[arg-type]
    assert grad.dtype == low.dtype, f"the gradient is {grad.dtype}, the input {low.dtype}"
    torch.testing.assert_close(grad.to(torch.float64), grad_ref, **tol)  # type: ignore[arg-type]
    return out


def assert_per_sample_equals_scalar_loop(
    factory: Callable[[], nn.Module],
    hyperparameters: Mapping[str, Tensor],
    *inputs: Any,
    shared: Collection[int] = (),
    **tolerances: float,
) -> None:
    """A per-sample tensor hyperparameter equals the scalar value applied to each sample alone, then averaged.

    ``factory()`` builds a loss whose reduction is the mean over samples; ``inputs`` are split along dim 0 except the
    positions in ``shared`` (passed whole to each single-sample call, e.g. class means).
    """
    batched = with_hyperparameters(factory(), hyperparameters)
    n = next(len(v) for v in hyperparameters.values())
    singles = []
    for i in range(n):
        module = with_hyperparameters(factory(), {k: float(v[i]) for k, v in hyperparameters.items()})
        row = [x if j in shared else x[i : i + 1] for j, x in enumerate(inputs)]
        singles.append(module(*row))
    torch.testing.assert_close(batched(*inputs), torch.stack(singles).mean(), **tolerances)  # type: ignore[arg-type]

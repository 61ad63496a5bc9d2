"""Argument and tensor checks with errors that say what was wrong, what was expected and how to fix it.

Configuration checks (:func:`check_choice`, :func:`check_number`, :func:`check_int`) raise at once. Tensor checks
split in two: types, dtypes and shapes raise at once (:func:`check_tensor`, :func:`check_same_shape`, the dtype and
shape part of :func:`check_targets`), while checks that read tensor values (ranges, finiteness) are queued on a
:class:`DeferredChecks` and read together with one host synchronisation, so that a loss call costs one
device-to-host copy however many tensors it checks. Every public functional takes ``validate_args``: ``True`` runs
the value checks, ``False`` skips them (shapes, dtypes and Python numbers are always checked);
:func:`start_checks` opens the checks of one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_losses.utilities.numerics import NumItems, compute_dtype

__all__ = [
    "DeferredChecks",
    "NumItems",
    "check_choice",
    "check_hyperparameter",
    "check_int",
    "check_labels",
    "check_num_items",
    "check_reduction",
    "check_same_shape",
    "check_targets",
    "check_tensor",
    "finite_error",
    "finite_flag",
    "interval_text",
    "start_checks",
]


def check_tensor(value: object, name: str, *, floating: bool = True) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is a tensor (a floating-point one when ``floating``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}. Pass a tensor.")
    if floating and not value.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor, got dtype {value.dtype}. Cast it first, e.g. `{name}.float()`."
        )


def finite_flag(tensor: Tensor) -> Tensor:
    """A 0-d bool tensor, True when every value of ``tensor`` is finite; one reduction, no temporary, no sync.

    NaN and infinities survive a sum (``inf - inf`` is NaN), so the sum is finite exactly when every value is, short
    of an overflow of the float32 accumulator (values near 1e38), which :func:`finite_error` then rules out.
    """
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    return torch.isfinite(tensor.detach().sum(dtype=compute_dtype(tensor.dtype)))


def finite_error(tensor: Tensor, name: str) -> ValueError | None:
    """The error for non-finite values in ``tensor`` (``None`` when the exact check finds none)."""
    bad = ~torch.isfinite(tensor.detach())
    count = int(bad.sum())
    if count == 0:
        return None
    return ValueError(
        f"`{name}` holds {count} non-finite values (NaN or inf) of {tensor.numel()}. Pass finite values, or "
        "validate_args=False to skip this check (non-finite values then propagate to the loss)."
    )


class DeferredChecks:
    """Value checks collected as 0-d bool tensors and read with a single host synchronisation.

    Checks that depend only on Python values or shapes raise at once; those that read tensor values (ranges,
    finiteness) are queued with :meth:`require` and evaluated together by :meth:`run`, so a loss call costs one
    device-to-host copy however many of its tensors it checks.

    Example:
        >>> checks = DeferredChecks()
        >>> x = torch.tensor([1.0, float("nan")])
        >>> checks.require_finite(x, "x")
        >>> checks.run()
        Traceback (most recent call last):
        ...
        ValueError: `x` holds 1 non-finite values (NaN or inf) of 2. Pass finite values, or validate_args=False to \
skip this check (non-finite values then propagate to the loss).
    """

    def __init__(self) -> None:
        self._flags: list[Tensor] = []
        self._errors: list[Callable[[], Exception | None]] = []

    def require(self, ok: Tensor | bool, error: Callable[[], Exception | None]) -> None:
        """Queue the check ``ok`` (a bool or a 0-d / 1-element bool tensor); ``error()`` builds the exception."""
        if isinstance(ok, bool):
            if not ok:
                exc = error()
                if exc is not None:
                    raise exc
            return
        self._flags.append(ok.reshape(()))
        self._errors.append(error)

    def require_finite(self, tensor: Tensor, name: str) -> None:
        """Queue the check that every value of ``tensor`` is finite."""
        self.require(finite_flag(tensor), lambda: finite_error(tensor, name))

    def run(self) -> None:
        """Evaluate every queued check (one synchronisation) and raise the first failure."""
        if not self._flags:
            return
        device = self._flags[0].device
        values = torch.stack([f.to(device) for f in self._flags]).tolist()
        errors = self._errors
        self._flags, self._errors = [], []
        for ok, error in zip(values, errors):
            if not ok:
                exc = error()
                if exc is not None:
                    raise exc


def _bound_text(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    """The admissible range in words: ``must be > 0 and finite``, ``must lie in [0, 1]``, ``must be finite``."""
    if low is not None and high is not None:
        left, right = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        return f"must lie in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"must be {'>=' if low_inclusive else '>'} {low:g} and finite"
    if high is not None:
        return f"must be {'<=' if high_inclusive else '<'} {high:g} and finite"
    return "must be finite"


def check_hyperparameter(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    checks: DeferredChecks | None = None,
    validate: bool = True,
) -> None:
    """Check a hyperparameter given as a Python number or a real tensor: finite and within the bounds.

    A Python number is checked at once. A tensor's values are checked when ``validate`` is true: queued on
    ``checks`` when given (one synchronisation for the whole call), at once otherwise.

    Raises:
        TypeError: For a value that is neither a real number nor a real (non-bool) tensor.
        ValueError: For a non-finite value or one outside the bounds, with the admissible interval.
    """
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"`{name}` must be a real number or a real tensor, got a tensor of dtype {value.dtype}.")
        if not validate:
            return
        v = value.detach()
        ok = torch.isfinite(v) if v.is_floating_point() else torch.ones_like(v, dtype=torch.bool)
        if low is not None:
            ok = ok & ((v >= low) if low_inclusive else (v > low))
        if high is not None:
            ok = ok & ((v <= high) if high_inclusive else (v < high))

        def error() -> Exception:
            shown = v.flatten()[:8].tolist()
            interval = _bound_text(low, high, low_inclusive, high_inclusive)
            return ValueError(f"`{name}` {interval}, got {shown}. Pass values in that range.")

        flag = ok.all()
        if checks is not None:
            checks.require(flag, error)
        elif not bool(flag):
            raise error()
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a real number or a tensor, got {type(value).__name__} ({value!r}). Pass a float."
        )
    fine = math.isfinite(value)
    if fine and low is not None:
        fine = value >= low if low_inclusive else value > low
    if fine and high is not None:
        fine = value <= high if high_inclusive else value < high
    if not fine:
        interval = _bound_text(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"`{name}` {interval}, got {value!r}. Pass a value in that range.")


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise a ValueError naming both tensors when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_targets(
    target: Tensor,
    num_classes: int,
    batch: int,
    name: str = "target",
    *,
    checks: DeferredChecks | None = None,
    validate: bool = True,
) -> None:
    """Check that ``target`` holds ``batch`` integer class indices in ``[0, num_classes)``.

    The dtype and shape are always checked; the range when ``validate`` (queued on ``checks`` when given).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"`{name}` must be a tensor of class indices, got {type(target).__name__}.")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"`{name}` must be a 1-D integer tensor of {batch} class indices, got dtype {target.dtype}. "
            "Pass integer labels (torch.long), not probabilities, booleans or one-hot rows."
        )
    if target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(
            f"`{name}` must be a 1-D integer tensor of {batch} class indices, got dtype {target.dtype} and shape "
            f"{tuple(target.shape)}."
        )
    if not validate or not target.numel():
        return

    def error() -> Exception:
        return ValueError(
            f"`{name}` holds class indices outside [0, {num_classes}): "
            f"min {int(target.min())}, max {int(target.max())}. Pass labels in 0 .. {num_classes - 1}."
        )

    ok = ((target >= 0) & (target < num_classes)).all()
    if checks is not None:
        checks.require(ok, error)
    elif not bool(ok):
        raise error()


def check_labels(
    labels: Tensor,
    size: int,
    ignore_index: int,
    checks: DeferredChecks,
    name: str = "labels",
    *,
    kind: str = "token ids",
    hint: str = "Mask prompt and padding positions with ignore_index.",
) -> None:
    """Queue on ``checks`` the check that every entry of ``labels`` but ``ignore_index`` lies in ``[0, size)``.

    Example:
        >>> checks = DeferredChecks()
        >>> check_labels(torch.tensor([[1, -100, 7]]), 5, -100, checks)
        >>> checks.run()
        Traceback (most recent call last):
        ...
        ValueError: `labels` holds token ids outside [0, 5) that are not ignore_index=-100: [7]. Mask prompt and \
padding positions with ignore_index.
    """
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= size))

    def error() -> Exception:
        return ValueError(
            f"`{name}` holds {kind} outside [0, {size}) that are not ignore_index={ignore_index}: "
            f"{labels[outside][:8].tolist()}. {hint}"
        )

    checks.require(~outside.any(), error)


def check_int(value: object, name: str, *, low: int | None = None) -> None:
    """Raise a TypeError unless ``value`` is an ``int`` (not a bool), a ValueError when it is below ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} ({value!r}).")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value}.")


def check_num_items(num_items_in_batch: object, checks: DeferredChecks | None = None, validate: bool = True) -> None:
    """Check ``num_items_in_batch``: ``None``, or a positive finite scalar (number or one-element tensor).

    A tensor's value is checked when ``validate`` (queued on ``checks`` when given).
    """
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, Tensor) and num_items_in_batch.numel() != 1:
        raise ValueError(
            "`num_items_in_batch` must be a scalar (the number of items of the whole batch), got a tensor of shape "
            f"{tuple(num_items_in_batch.shape)}."
        )
    check_hyperparameter(
        num_items_in_batch, "num_items_in_batch", low=0.0, low_inclusive=False, checks=checks, validate=validate
    )


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> check_choice("optimizer", "lion", ("sgd", "adamw"))
        Traceback (most recent call last):
            ...
        ValueError: `optimizer` must be one of 'sgd', 'adamw'; got 'lion'.
    """
    options = tuple(choices)
    if value not in options:
        shown = ", ".join(repr(c) for c in options)
        raise ValueError(f"`{name}` must be one of {shown}; got {value!r}.")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``value`` is a finite real number in the given interval.

    Example:
        >>> check_number("lr", -1.0, low=0.0, low_inclusive=False)
        Traceback (most recent call last):
            ...
        ValueError: `lr` must lie in (0, inf); got -1.0.
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "an int" if integer else "a real number"
        raise TypeError(f"`{name}` must be {expected}; got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        interval = interval_text(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"`{name}` must lie in {interval}; got {value!r}.")


def interval_text(
    low: float | None, high: float | None, low_inclusive: bool = True, high_inclusive: bool = True
) -> str:
    """A range in interval notation: ``(0, inf)``, ``[0, 1)``; a missing bound is infinite (and open).

    Example:
        >>> interval_text(0.0, None, low_inclusive=False)
        '(0, inf)'
    """
    left = "[" if low is not None and low_inclusive else "("
    right = "]" if high is not None and high_inclusive else ")"
    return f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"


def start_checks(validate_args: bool, *named: tuple[Tensor, str]) -> DeferredChecks:
    """Open the value checks of one call: the finiteness of each ``(tensor, name)`` is queued when ``validate_args``.

    Example:
        >>> checks = start_checks(True, (torch.tensor([1.0, float("inf")]), "logits"))
        >>> checks.run()
        Traceback (most recent call last):
        ...
        ValueError: `logits` holds 1 non-finite values (NaN or inf) of 2. Pass finite values, or validate_args=False \
to skip this check (non-finite values then propagate to the loss).
    """
    checks = DeferredChecks()
    if validate_args:
        for tensor, name in named:
            checks.require_finite(tensor, name)
    return checks


def check_reduction(
    reduction: object, allowed: Iterable[str] = ("mean", "sum", "none"), num_items_in_batch: object = None
) -> None:
    """Raise a ValueError unless ``reduction`` is one of ``allowed``, or when ``num_items_in_batch`` is given without
    ``reduction="mean"`` (it divides the summed loss). The value of a tensor ``num_items_in_batch`` is not read.

    Example:
        >>> check_reduction("sum", num_items_in_batch=8)
        Traceback (most recent call last):
            ...
        ValueError: `num_items_in_batch` divides the summed loss, so it needs reduction='mean', got 'sum'. Pass \
reduction='mean' or drop num_items_in_batch.
    """
    check_choice("reduction", reduction, allowed)
    check_num_items(num_items_in_batch, validate=False)
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            f"`num_items_in_batch` divides the summed loss, so it needs reduction='mean', got {reduction!r}. "
            "Pass reduction='mean' or drop num_items_in_batch."
        )

"""Configuration checks with errors that say what was wrong, what was expected and how to fix it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_number"]


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
        left = "[" if low is not None and low_inclusive else "("
        right = "]" if high is not None and high_inclusive else ")"
        interval = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        raise ValueError(f"`{name}` must lie in {interval}; got {value!r}.")

r"""Shared numerics of every loss family: float32 compute under any autocast, hyperparameters as tensors, reductions
and the KL divergence from log-probabilities.

* **Precision.** Losses compute in float32 whatever the input precision (float64 inputs stay float64):
  :func:`compute_dtype` names that dtype, :func:`as_float32` upcasts half-precision tensors, and
  :func:`autocast_disabled` switches autocast off on a tensor's device so a bf16 / fp16 autocast region does not
  round the log-softmax, KL or logsumexp back down. :func:`autocast_dtype` reads the dtype autocast would cast a
  matrix product to (for code that does its own matrix products in chunks).
* **Hyperparameters** are Python numbers or tensors (a scalar, one value per sample, or one value per position),
  so schedules, Population Based Training and Self-Tuning Networks can drive them: :func:`hyperparameter_tensor`
  checks the range and returns a tensor laid out to broadcast against the data; :func:`expand_hyperparameter`
  broadcasts one to the shape of the targets.
* **Reductions.** :func:`reduce_loss` (``"none"`` / ``"sum"`` / ``"mean"`` / ``"batchmean"``, optionally masked) and
  :func:`divide_by_items` (the mean over the items of a whole optimizer step, ``num_items_in_batch``). The mean of
  an empty batch is 0 (with a zero gradient), never NaN.
* **KL.** :func:`kl_from_log_probs`: :math:`\mathrm{KL}(p \,\|\, q) = \sum_j p_j (\log p_j - \log q_j)` from
  finite log-probabilities.

Example:
    >>> import torch
    >>> x = torch.randn(4, 3, dtype=torch.bfloat16)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), autocast_disabled(x):
    ...     (z,) = as_float32(x)
    ...     log_p = torch.log_softmax(z, dim=-1)
    >>> log_p.dtype
    torch.float32
    >>> float(kl_from_log_probs(log_p, log_p).abs().max())
    0.0
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_losses.utilities.checks import DeferredChecks

__all__ = [
    "NumItems",
    "Reduction",
    "as_float32",
    "autocast_disabled",
    "autocast_dtype",
    "compute_dtype",
    "divide_by_items",
    "expand_hyperparameter",
    "flatten_per_sample",
    "hyperparameter_tensor",
    "kl_from_log_probs",
    "reduce_loss",
]

NumItems = int | float | Tensor | None
"""Type of ``num_items_in_batch``: the number of items (tokens, sequences) the mean of a whole batch runs over."""

Reduction = Literal["mean", "batchmean", "sum", "none"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


# --------------------------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in for inputs of ``dtype``: float64 for float64, float32 for everything else.

    Example:
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64), compute_dtype(torch.long)
        (torch.float32, torch.float64, torch.float32)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_float32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Floating tensors in their compute dtype (:func:`compute_dtype`): half, bfloat16 (and any other floating dtype
    but float64) become float32, float32 and float64 tensors are returned as they are, non-floating ones are kept.

    Example:
        >>> [t.dtype for t in as_float32(torch.zeros(1, dtype=torch.half), torch.zeros(1, dtype=torch.float64))]
        [torch.float32, torch.float64]
    """
    return tuple(t.float() if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def autocast_disabled(tensor: Tensor) -> AbstractContextManager[None]:
    """Disable autocast on ``tensor``'s device for the enclosed computation (the float32 guard of every loss).

    Inside, operations run in the dtype of their inputs: upcast them first (:func:`as_float32`).
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast casts matrix products to on the device type ``device``, or ``None`` when it is off.

    Example:
        >>> autocast_dtype("cpu") is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype("cpu")
        torch.bfloat16
    """
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Hyperparameters as tensors
# --------------------------------------------------------------------------------------------------------------------
def hyperparameter_tensor(
    value: float | Tensor,
    like: Tensor,
    name: str,
    *,
    positive: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    dtype: torch.dtype | None = None,
    keep_tensor_dtype: bool = False,
    layout: Literal["sample", "row", "position", "any"] = "sample",
    lead_shape: torch.Size | tuple[int, ...] | None = None,
    validate: bool = True,
    checks: DeferredChecks | None = None,
) -> Tensor:
    """Check a scalar, per-sample or per-row hyperparameter and turn it into a tensor on ``like``'s device.

    The value must be finite and within the bounds (``positive``: ``> 0``; otherwise ``low`` / ``high`` with their
    inclusive flags). A Python number is checked at once; a tensor's values when ``validate`` (queued on ``checks``
    when given, so a whole call costs one host synchronisation). A tensor keeps its autograd graph.

    Args:
        value: A Python number or a real tensor.
        like: The data the hyperparameter applies to (its device, and its dtype unless ``dtype`` is given).
        name: The argument's name, for error messages.
        positive: Require ``value > 0`` (shorthand for ``low=0, low_inclusive=False``).
        low, high, low_inclusive, high_inclusive: Bounds of the admissible interval.
        dtype: The dtype of the result; default ``like.dtype``.
        keep_tensor_dtype: Keep the dtype of a floating-point tensor ``value`` (numbers and integer tensors get
            ``dtype``), e.g. so that a float64 hyperparameter is not rounded.
        layout: How a non-scalar value is laid out. ``"sample"``: one value per sample, shape ``(N,)`` with ``N =
            like.shape[0]``, reshaped to ``(N, 1, ..., 1)`` to broadcast against ``like``. ``"row"``: one value per
            sample (repeated over its positions) or one value per position (shape ``lead_shape``), flattened to
            one value per row of ``lead_shape``. ``"position"``: a scalar, one value per sample or one value per
            position, broadcast to ``lead_shape`` (:func:`expand_hyperparameter`). ``"any"``: returned as given.
        lead_shape: The shape of the rows (``"row"``) or positions (``"position"``); default ``like.shape[:-1]``.
        validate: Check a tensor's values.
        checks: Where to queue a tensor's value checks.

    Returns:
        The value laid out as ``layout`` says (a 0-d tensor for a scalar, except with ``"position"``).

    Raises:
        TypeError: For a value that is neither a real number nor a real (non-bool) tensor.
        ValueError: For a non-finite or out-of-range value, or a shape that fits none of the layouts.

    Example:
        >>> x = torch.zeros(3, 5)
        >>> tuple(hyperparameter_tensor(torch.tensor([1.0, 2.0, 3.0]), x, "temperature", positive=True).shape)
        (3, 1)
        >>> hyperparameter_tensor(-1.0, x, "temperature", positive=True)
        Traceback (most recent call last):
            ...
        ValueError: `temperature` must be > 0 and finite, got -1.0. Pass a value in that range.
    """
    from lightning_losses.utilities.checks import check_hyperparameter  # checks imports this module

    if positive:
        low, low_inclusive = 0.0, False
    check_hyperparameter(
        value,
        name,
        low=low,
        high=high,
        low_inclusive=low_inclusive,
        high_inclusive=high_inclusive,
        checks=checks,
        validate=validate,
    )
    target = like.dtype if dtype is None else dtype
    if keep_tensor_dtype and isinstance(value, Tensor) and value.is_floating_point():
        t = value.to(like.device)
    elif isinstance(value, Tensor):
        t = value.to(device=like.device, dtype=target)
    else:
        t = torch.tensor(float(value), device=like.device, dtype=target)
    if layout == "position":
        return expand_hyperparameter(t, torch.Size(lead_shape if lead_shape is not None else like.shape[:-1]), name)
    if t.ndim == 0 or layout == "any":
        return t
    if layout == "row":
        shape = torch.Size(lead_shape if lead_shape is not None else like.shape[:-1])
        if t.shape == shape:
            return t.reshape(-1)
        if t.ndim == 1 and len(shape) >= 1 and t.shape[0] == shape[0]:
            return t.repeat_interleave(math.prod(shape[1:]))
        raise ValueError(
            f"`{name}` must be a number, a 0-d tensor, one value per sample (shape ({shape[0]},)) or one value per "
            f"token (shape {tuple(shape)}), got shape {tuple(t.shape)}."
        )
    if t.ndim == 1 and like.ndim >= 1 and t.shape[0] == like.shape[0]:
        return t.reshape(-1, *([1] * (like.ndim - 1)))
    expected = f"({like.shape[0]},)" if like.ndim else "()"
    raise ValueError(
        f"`{name}` must be a scalar or have one value per sample (shape {expected}), got shape {tuple(t.shape)}."
    )


def expand_hyperparameter(value: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Broadcast a scalar, per-sample ``(N,)`` or per-position hyperparameter tensor to ``shape`` (the targets').

    Example:
        >>> tuple(expand_hyperparameter(torch.tensor([1.0, 2.0]), torch.Size([2, 3]), "tau").shape)
        (2, 3)
    """
    if value.ndim == 0:
        return value.expand(shape)
    if value.shape == shape:
        return value
    if value.ndim == 1 and len(shape) >= 1 and value.shape[0] == shape[0]:
        return value.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    raise ValueError(
        f"`{name}` must be a scalar, one value per sample (shape ({shape[0] if len(shape) else 1},)) or one value "
        f"per position (shape {tuple(shape)}), got shape {tuple(value.shape)}."
    )


def flatten_per_sample(value: Tensor) -> Tensor:
    """A hyperparameter laid out as ``(N, 1, ...)`` (:func:`hyperparameter_tensor`) back as ``(N,)``; a scalar stays."""
    return value if value.ndim == 0 else value.reshape(value.shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------------------------------
def divide_by_items(total: Tensor, local_count: Tensor | int | float, num_items_in_batch: NumItems) -> Tensor:
    """``total / max(local_count, 1)`` when ``num_items_in_batch`` is ``None``, else ``total / num_items_in_batch``.

    The division keeps ``total``'s dtype and gradient; a tensor ``num_items_in_batch`` carries no gradient.

    Example:
        >>> float(divide_by_items(torch.tensor(6.0), 0, None)), float(divide_by_items(torch.tensor(6.0), 2, 4))
        (6.0, 1.5)
    """
    if num_items_in_batch is None:
        if isinstance(local_count, Tensor):
            return total / local_count.to(total.dtype).clamp_min(1.0)
        return total / max(float(local_count), 1.0)
    if isinstance(num_items_in_batch, Tensor):
        return total / num_items_in_batch.detach().reshape(()).to(device=total.device, dtype=total.dtype)
    return total / float(num_items_in_batch)


def reduce_loss(
    values: Tensor,
    reduction: str,
    *,
    mask: Tensor | None = None,
    count: Tensor | int | float | None = None,
    num_items_in_batch: NumItems = None,
) -> Tensor:
    """Reduce per-item loss values: ``"none"`` (as they are), ``"sum"``, or ``"mean"`` / ``"batchmean"``.

    ``mask`` (``values``' shape, 0 / 1) multiplies the values first, for every reduction. The mean divides the sum
    by ``count`` (default: ``mask.sum()`` when masked, else the number of values; at least 1, so an empty batch
    gives 0 with a zero gradient) or by ``num_items_in_batch`` when given (:func:`divide_by_items`). ``"batchmean"``
    is the mean of per-sample values (the name ``torch.nn.functional.kl_div`` uses).

    Example:
        >>> v = torch.tensor([1.0, 2.0, 3.0])
        >>> float(reduce_loss(v, "mean")), float(reduce_loss(v, "mean", mask=torch.tensor([1.0, 1.0, 0.0])))
        (2.0, 1.5)
        >>> float(reduce_loss(torch.zeros(0), "batchmean"))
        0.0
    """
    if mask is not None:
        values = values * mask
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction in ("mean", "batchmean"):
        if count is None:
            count = values.numel() if mask is None else mask.sum()
        return divide_by_items(total, count, num_items_in_batch)
    raise ValueError(f"`reduction` must be one of 'mean', 'batchmean', 'sum', 'none'; got {reduction!r}.")


# --------------------------------------------------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------------------------------------------------
def kl_from_log_probs(log_p: Tensor, log_q: Tensor, dim: int | None = -1) -> Tensor:
    r""":math:`\mathrm{KL}(p \,\|\, q) = \sum_j p_j (\log p_j - \log q_j)` from finite log-probabilities.

    Summed over ``dim`` (the last dimension by default; ``None``: every element).

    Example:
        >>> log_p = torch.log(torch.tensor([0.5, 0.5]))
        >>> log_q = torch.log(torch.tensor([0.25, 0.75]))
        >>> round(float(kl_from_log_probs(log_p, log_q)), 4)
        0.1438
    """
    terms = log_p.exp() * (log_p - log_q)
    return terms.sum() if dim is None else terms.sum(dim=dim)

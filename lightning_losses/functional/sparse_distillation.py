r"""Distillation from a teacher's top-k log-probabilities: the sparse (offline) form of the generalized JSD.

A stored teacher keeps, per token, only its ``k`` most likely entries :math:`\mathcal{K}` and their log-probabilities
:math:`\log p^t_j` (:func:`topk_teacher_log_probs`; written to disk by
:func:`lightning_losses.data.teacher_logits.precompute_teacher_logits`). Dropping the other ``V - k`` entries, or
renormalising the kept ones, changes the divergence; here the rest of the vocabulary is kept as **one extra bucket**
on both sides, so both distributions stay normalised over the same ``k + 1`` events:

.. math::

    \tilde p^t = \big(p^t_{j_1}, \dots, p^t_{j_k},\; r^t\big), \quad r^t = 1 - \sum_{j \in \mathcal{K}} p^t_j,
    \qquad
    \tilde p^s = \big(p^s_{j_1}, \dots, p^s_{j_k},\; r^s\big), \quad
    \log r^s = \operatorname{logsumexp}_{j \notin \mathcal{K}} \log p^s_j,

with :math:`p^s = \operatorname{softmax}(z^s / T)` over the whole vocabulary (the student's tail mass is computed
exactly, in log space, not as ``1 - Σ``). The divergence is then the generalized JSD of
:func:`~lightning_losses.functional.generalized_jsd_loss` (TRL's convention) over the ``k + 1`` buckets:
:math:`\beta = 0` forward :math:`\mathrm{KL}(\tilde p^t \| \tilde p^s)`, :math:`\beta = 1` reverse
:math:`\mathrm{KL}(\tilde p^s \| \tilde p^t)`, otherwise
:math:`\beta\,\mathrm{KL}(\tilde p^t \| m) + (1-\beta)\,\mathrm{KL}(\tilde p^s \| m)` with
:math:`m = \beta \tilde p^t + (1-\beta)\tilde p^s`.

Properties (tested): with ``k = V`` there is no tail and the loss equals the full-vocabulary loss; by the
data-processing inequality the bucketed KL is a lower bound of the full KL that grows with ``k``; forward KL's
gradient with respect to the student logits is :math:`(p^s - q)/T` where :math:`q` spreads the teacher's tail mass
over the student's tail in proportion to :math:`p^s`. When the stored ``Σ p^t`` exceeds one (rounding of float16
values) the tail is 0 and the kept entries are renormalised; a tail of 0 is floored at the smallest positive float32
(so the reverse KL stays finite).

Offline teacher logits were requested from TRL (huggingface/trl issues #2255 and #3055); TRL's dense loss is
``generalized_jsd_loss`` in ``trl/experimental/gkd/gkd_trainer.py``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.functional.distillation import (
    _jsd_hyperparameters,
    _token_labels_validation,
    _token_value_checks,
    jsd_from_log_probs,
    masked_token_mean,
)
from lightning_losses.utilities.checks import (
    DeferredChecks,
    NumItems,
    check_hyperparameter,
    check_int,
    check_reduction,
    check_tensor,
    start_checks,
)
from lightning_losses.utilities.numerics import as_float32, autocast_disabled

__all__ = ["TopKLogProbs", "sparse_generalized_jsd_loss", "topk_teacher_log_probs"]

MeanReduction = Literal["mean", "sum", "none"]


class TopKLogProbs(NamedTuple):
    """A teacher's top-k log-probabilities per token: ``log_probs`` ``(..., k)`` (floating) and ``indices``
    ``(..., k)`` (integer vocabulary ids, distinct along the last dimension)."""

    log_probs: Tensor
    indices: Tensor


def topk_teacher_log_probs(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopKLogProbs:
    r"""The ``k`` largest entries of :math:`\log \operatorname{softmax}(z^t / T)` per token, in float32 (float64 for
    float64 logits), largest first.

    Args:
        teacher_logits: Logits ``(..., V)``.
        k: Number of entries to keep, ``1 <= k <= V``.
        temperature: ``T > 0`` applied before the softmax.

    Example:
        >>> z = torch.tensor([[0.0, 2.0, 1.0]])
        >>> top = topk_teacher_log_probs(z, 2)
        >>> top.indices.tolist(), bool(torch.allclose(top.log_probs, z.log_softmax(-1)[:, [1, 2]]))
        ([[1, 2]], True)
    """
    check_tensor(teacher_logits, "teacher_logits")
    check_int(k, "k", low=1)
    if k > teacher_logits.shape[-1]:
        raise ValueError(f"`k` must be at most the vocabulary size {teacher_logits.shape[-1]}, got {k}.")
    check_hyperparameter(temperature, "temperature", low=0.0, low_inclusive=False)
    with torch.no_grad(), autocast_disabled(teacher_logits):
        (logits,) = as_float32(teacher_logits)
        log_p = F.log_softmax(logits / temperature, dim=-1)
        values, indices = log_p.topk(k, dim=-1)
    return TopKLogProbs(values, indices)


def _sparse_arg_validation(
    student_logits: Tensor,
    teacher_log_probs: Tensor,
    teacher_indices: Tensor,
    beta: float | Tensor,
    labels: Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: NumItems,
    validate_args: bool,
) -> DeferredChecks:
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_log_probs, "teacher_log_probs")
    check_tensor(teacher_indices, "teacher_indices", floating=False)
    if teacher_indices.is_floating_point() or teacher_indices.is_complex() or teacher_indices.dtype == torch.bool:
        raise TypeError(f"`teacher_indices` must be an integer tensor, got dtype {teacher_indices.dtype}.")
    if student_logits.ndim not in (2, 3):
        raise ValueError(f"`student_logits` must have shape (B, T, V) or (N, V), got {tuple(student_logits.shape)}.")
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if teacher_log_probs.shape != teacher_indices.shape:
        raise ValueError(
            f"`teacher_log_probs` and `teacher_indices` must have the same shape (..., k), got "
            f"{tuple(teacher_log_probs.shape)} and {tuple(teacher_indices.shape)}."
        )
    if tuple(teacher_log_probs.shape[:-1]) != lead:
        raise ValueError(
            f"The teacher's top-k tensors must have shape {(*lead, 'k')} (the student logits' shape with the "
            f"vocabulary replaced by k), got {tuple(teacher_log_probs.shape)}. Slice the stored teacher positions "
            "as you slice the student's logits (e.g. both [:, :-1] for next-token prediction)."
        )
    k = teacher_log_probs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"The teacher keeps k={k} entries per token; expected 1 <= k <= V={vocab}.")
    _token_labels_validation(labels, lead)
    check_int(ignore_index, "ignore_index")
    check_reduction(reduction, ("mean", "sum", "none"), num_items_in_batch)
    checks = start_checks(validate_args, (student_logits, "student_logits"))
    _token_value_checks(checks, beta, num_items_in_batch, labels, vocab, ignore_index, validate_args)
    if validate_args:
        idx = teacher_indices
        checks.require(
            ~((idx < 0) | (idx >= vocab)).any(),
            lambda: ValueError(f"`teacher_indices` holds ids outside the student's vocabulary [0, {vocab})."),
        )
        if k > 1:
            ordered = idx.sort(dim=-1).values
            checks.require(
                ~(ordered[..., 1:] == ordered[..., :-1]).any(),
                lambda: ValueError(
                    "`teacher_indices` repeats an id within a token's top-k: each token needs k distinct ids "
                    "(as `torch.topk` returns)."
                ),
            )
        lp = teacher_log_probs
        checks.require(
            ~(torch.isnan(lp) | (lp > 1e-3)).any(),
            lambda: ValueError(
                "`teacher_log_probs` must be log-probabilities (<= 0, not NaN); got values above 0. Pass "
                "log_softmax outputs (`topk_teacher_log_probs`), not raw logits."
            ),
        )
    return checks


def _bucket_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``Σ p (log p - log q)`` over the last dimension, with ``0 · log 0 = 0`` (``log_p`` may hold ``-inf``)."""
    present = log_p > float("-inf")
    safe_p = torch.where(present, log_p, torch.zeros_like(log_p))
    terms = torch.where(present, safe_p.exp() * (safe_p - log_q), torch.zeros_like(log_p))
    return terms.sum(dim=-1)


def _buckets(
    student_logits: Tensor, teacher_log_probs: Tensor, teacher_indices: Tensor, temperature: Tensor
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the ``k`` kept entries, plus the tail bucket when ``k < V``."""
    vocab, k = student_logits.shape[-1], teacher_log_probs.shape[-1]
    log_ps_full = F.log_softmax(student_logits / temperature, dim=-1)
    index = teacher_indices.long()
    log_ps = log_ps_full.gather(-1, index)
    log_pt = teacher_log_probs.to(log_ps.dtype)
    if k == vocab:  # no tail: the kept entries are the whole vocabulary
        return log_ps, log_pt - torch.logsumexp(log_pt, dim=-1, keepdim=True)
    tail_s = log_ps_full.scatter(-1, index, float("-inf")).logsumexp(dim=-1, keepdim=True)
    kept = torch.logsumexp(log_pt, dim=-1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    tail_t = torch.log((-torch.expm1(kept.clamp(max=0.0))).clamp(min=tiny))
    log_pt = torch.cat([log_pt, tail_t], dim=-1)
    log_pt = log_pt - torch.logsumexp(log_pt, dim=-1, keepdim=True)  # renormalises only when Σ p^t > 1
    return torch.cat([log_ps, tail_s], dim=-1), log_pt


def sparse_generalized_jsd_loss(
    student_logits: Tensor,
    teacher_log_probs: Tensor,
    teacher_indices: Tensor,
    beta: float | Tensor = 0.5,
    temperature: float | Tensor = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: MeanReduction = "mean",
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Generalized JSD between the student and a teacher known only by its top-k log-probabilities per token.

    Over the ``k + 1`` buckets of the module docstring (the ``k`` kept ids and the rest of the vocabulary):

    .. math::

        \mathrm{JSD}_\beta(\tilde p^t, \tilde p^s) =
        \begin{cases}
            \mathrm{KL}(\tilde p^t \,\|\, \tilde p^s) & \beta = 0\\
            \beta\, \mathrm{KL}(\tilde p^t \,\|\, m) + (1-\beta)\, \mathrm{KL}(\tilde p^s \,\|\, m) & 0 < \beta < 1\\
            \mathrm{KL}(\tilde p^s \,\|\, \tilde p^t) & \beta = 1
        \end{cases}

    averaged over the tokens whose label is not ``ignore_index``. With ``k = V`` it equals
    :func:`~lightning_losses.functional.generalized_jsd_loss` on the full logits. The temperature divides the
    student's logits only: the teacher's log-probabilities must have been computed at the same temperature
    (``topk_teacher_log_probs(teacher_logits, k, temperature=T)``). No :math:`T^2` factor (TRL's convention).

    Args:
        student_logits: Student logits ``(B, T, V)`` or ``(N, V)`` (any floating dtype; computed in float32).
        teacher_log_probs: The teacher's top-k log-probabilities ``(B, T, k)`` or ``(N, k)`` (float16 or float32).
        teacher_indices: Their vocabulary ids, same shape, integer (int32 or int64), distinct per token.
        beta: Mixture weight in ``[0, 1]``, scalar or per-sample.
        temperature: ``T > 0`` for the student, scalar or per-sample.
        labels: Optional integer labels of shape ``student_logits.shape[:-1]``; ``ignore_index`` masks a token.
        ignore_index: Label of masked tokens.
        reduction: ``"mean"`` over counted tokens (0 when none), ``"sum"`` or ``"none"`` (per token, 0 where masked).
        num_items_in_batch: With ``"mean"``, the divisor instead of this call's count (see
            :func:`~lightning_losses.functional.generalized_jsd_loss`).
        validate_args: Also check values (finite logits, ids in range and distinct, log-probabilities <= 0, labels in
            range): one host synchronisation.

    Returns:
        The loss in float32 (float64 for float64 student logits).

    Example:
        >>> import torch
        >>> from lightning_losses.functional import generalized_jsd_loss
        >>> s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
        >>> top = topk_teacher_log_probs(t, k=11)
        >>> full = generalized_jsd_loss(s, t, beta=0.5)
        >>> bool(torch.allclose(sparse_generalized_jsd_loss(s, *top, beta=0.5), full, atol=1e-6))
        True
        >>> low = sparse_generalized_jsd_loss(s, *topk_teacher_log_probs(t, k=2), beta=0.0)
        >>> bool(low <= generalized_jsd_loss(s, t, beta=0.0))   # fewer buckets: a lower bound of the full KL
        True
    """
    checks = _sparse_arg_validation(
        student_logits,
        teacher_log_probs,
        teacher_indices,
        beta,
        labels,
        ignore_index,
        reduction,
        num_items_in_batch,
        validate_args,
    )
    (student,) = as_float32(student_logits)
    with autocast_disabled(student):
        temp, beta = _jsd_hyperparameters(temperature, beta, student, checks, validate_args)
        log_ps, log_pt = _buckets(student, teacher_log_probs.detach(), teacher_indices, temp)
        per_token = jsd_from_log_probs(log_ps, log_pt, beta, kl=_bucket_kl)
        return masked_token_mean(per_token, labels, ignore_index, reduction, num_items_in_batch)

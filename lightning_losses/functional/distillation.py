r"""Knowledge distillation: logit, feature and token-level losses as pure tensor functions.

Every function computes in float32 (float64 inputs stay float64) with autocast disabled inside, so a student
trained under bf16/fp16 autocast still gets a float32 loss. Hyperparameters (temperature, alpha, beta) accept
Python numbers or tensors, either scalar or with one value per sample (shape ``(N,)``), so schedules, Population
Based Training and Self-Tuning Networks can drive them.

Bad input raises a ``TypeError`` (not a tensor, not floating-point) or a ``ValueError`` (shape, range, name) that
names the argument. ``validate_args=True`` (the default) also checks the values of tensors: finite logits and
features, targets and labels within the classes, tensor hyperparameters finite and within their range. These checks
are read with one host synchronisation per call; ``validate_args=False`` skips them (shapes, dtypes and Python
numbers are always checked).

Functions:
    * :func:`kd_loss` — Hinton's KD, :math:`T^2\,\mathrm{KL}(p^t_T \,\|\, p^s_T)`.
    * :func:`dkd_loss`, :func:`dkd_components` — decoupled KD (TCKD and NCKD).
    * :func:`binary_kl_loss` — the logit-level loss of dual-head KD (log-cosh form).
    * :func:`nd_loss` — the norm-and-direction loss on embeddings.
    * :func:`generalized_jsd_loss` — token-level generalized Jensen-Shannon divergence for language models.
    * :func:`project_conflicting_gradient` — gradient alignment of dual-head KD.
    * :func:`standardize_logits` — the per-sample z-score of logit standardisation (an option of KD and DKD).
    * :func:`pld_loss` — Plackett-Luce distillation, a list-wise loss replacing cross-entropy + KD.
    * :func:`dist_loss` — DIST's inter- and intra-class Pearson-correlation relations.
    * :func:`margin_mse_loss` — Margin-MSE for ranking students (score margins of positive and negative documents).
    * :func:`multi_teacher_kd_loss`, :func:`multi_teacher_kd_losses`, :func:`teacher_entropies`,
      :func:`entropy_balance_step`, :func:`loss_balance_step` — multi-teacher KD with MTARD's entropy-balanced
      temperatures and normalised loss balance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.utilities.checks import (
    DeferredChecks,
    NumItems,
    check_hyperparameter,
    check_int,
    check_labels,
    check_num_items,
    check_reduction,
    check_same_shape,
    check_targets,
    check_tensor,
    finite_error,
    finite_flag,
    start_checks,
)
from lightning_losses.utilities.numerics import (
    as_float32,
    autocast_disabled,
    flatten_per_sample,
    hyperparameter_tensor,
    kl_from_log_probs,
    reduce_loss,
)

__all__ = [
    "binary_kl_loss",
    "dist_loss",
    "dkd_components",
    "dkd_loss",
    "entropy_balance_step",
    "generalized_jsd_loss",
    "kd_loss",
    "loss_balance_step",
    "margin_mse_loss",
    "multi_teacher_kd_loss",
    "multi_teacher_kd_losses",
    "nd_loss",
    "pld_loss",
    "project_conflicting_gradient",
    "standardize_logits",
    "teacher_entropies",
]

SampleReduction = Literal["batchmean", "sum", "none"]
MeanReduction = Literal["mean", "sum", "none"]

_SAMPLE_REDUCTIONS = ("batchmean", "sum", "none")
_MEAN_REDUCTIONS = ("mean", "sum", "none")
_VOCAB_MISMATCH = ("error", "slice")


# --------------------------------------------------------------------------------------------------------------------
# Shared checks and helpers
# --------------------------------------------------------------------------------------------------------------------
def _logits_pair_validation(student: Tensor, teacher: Tensor, *, two_dim: bool = True) -> None:
    """Check a (student, teacher) pair of logits: floating, same class count, same shape, 2-D when required."""
    check_tensor(student, "student_logits")
    check_tensor(teacher, "teacher_logits")
    if two_dim and student.ndim != 2:
        raise ValueError(
            f"`student_logits` must be 2-D of shape (N, C), got shape {tuple(student.shape)}. "
            "Flatten extra dimensions first, e.g. `logits.flatten(0, -2)`."
        )
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            "`student_logits` and `teacher_logits` must predict the same classes: the student has "
            f"{student.shape[-1]} classes, the teacher {teacher.shape[-1]}. Give both models the same output layer "
            "size."
        )
    check_same_shape(student, teacher, "student_logits", "teacher_logits")


def _pair_checks(student_logits: Tensor, teacher_logits: Tensor, reduction: str, validate_args: bool) -> DeferredChecks:
    """Check a pair of ``(N, C)`` logits and a per-sample ``reduction``; open the value checks (finite logits)."""
    _logits_pair_validation(student_logits, teacher_logits)
    check_reduction(reduction, _SAMPLE_REDUCTIONS)
    return start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))


def _targeted_pair_checks(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, reduction: str, validate_args: bool
) -> DeferredChecks:
    """:func:`_pair_checks`, and ``target`` class indices ``(N,)`` in ``[0, C)``."""
    checks = _pair_checks(student_logits, teacher_logits, reduction, validate_args)
    check_targets(target, student_logits.shape[1], student_logits.shape[0], checks=checks, validate=validate_args)
    return checks


def _require_finite_logits(checks: DeferredChecks, per_sample: Tensor, student: Tensor, teacher: Tensor) -> None:
    """Queue the finiteness of both logits through the per-sample loss computed from them.

    A non-finite logit makes its sample's loss non-finite (an infinite or NaN logit turns its row's log-softmax
    into NaN or infinity, which no product with a probability brings back to a finite number), so one reduction of
    the ``(N,)`` loss stands for two passes over the ``(N, C)`` logits. Only when it fails are the logits read, to
    name the culprit with :func:`~lightning_losses.utilities.checks.finite_error` (nothing is raised when both are
    finite and the loss overflowed by itself, as before).
    """

    def error() -> Exception | None:
        return finite_error(student, "student_logits") or finite_error(teacher, "teacher_logits")

    checks.require(finite_flag(per_sample), error)


def _checked_temperature(
    temperature: float | Tensor, like: Tensor, checks: DeferredChecks, validate_args: bool
) -> Tensor:
    """``temperature > 0`` as a tensor like ``like`` (a number checked at once, a tensor's values queued on ``checks``
    when ``validate_args``); then every check queued on ``checks`` is run, in one host synchronisation."""
    temp = hyperparameter_tensor(temperature, like, "temperature", positive=True, validate=validate_args, checks=checks)
    checks.run()
    return temp


def _log_softmax_pair(student: Tensor, teacher: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    return F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1)


_STANDARDIZATION_EPS = 1e-7


def standardize_logits(logits: Tensor, eps: float = _STANDARDIZATION_EPS, *, validate_args: bool = True) -> Tensor:
    r"""Z-score each row of logits over the classes: the pre-process of logit standardisation (Sun et al., 2024).

    .. math::

        \mathcal{Z}(z)_c = \frac{z_c - \bar z}{\epsilon + \sigma(z)}, \qquad
        \bar z = \frac1C \sum_c z_c,\quad \sigma(z) = \sqrt{\tfrac{1}{C-1} \textstyle\sum_c (z_c - \bar z)^2}

    This is the ``normalize`` of the official code (sunshangquan/logit-standardization-KD,
    ``mdistiller/distillers/KD.py``): the unbiased standard deviation (``Tensor.std``) and :math:`\epsilon = 10^{-7}`
    added to it. The variance is clamped at the smallest normal number before the square root, so a row of equal
    logits maps to zeros with a finite (zero) gradient instead of NaN; for any other row the value is the official
    one. Invariant to :math:`z \mapsto a z + b` per row for :math:`a > 0` (up to :math:`\epsilon`).

    Args:
        logits: Logits ``(..., C)`` with ``C >= 2``.
        eps: Added to the standard deviation (default ``1e-7``, as the official code).
        validate_args: Check that the logits are finite.

    Returns:
        The standardised logits, same shape and dtype.

    Raises:
        TypeError: When ``logits`` is not a floating-point tensor.
        ValueError: With fewer than 2 classes, or non-finite logits.

    Example:
        >>> import torch
        >>> z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> [round(v, 4) for v in z[0].tolist()]
        [-1.0, 0.0, 1.0]
    """
    check_tensor(logits, "logits")
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"Logit standardisation needs at least 2 classes (a standard deviation over the last dimension), got "
            f"logits of shape {tuple(logits.shape)}. Turn `logit_standardization` off for a single output."
        )
    start_checks(validate_args, (logits, "logits")).run()
    centred = logits - logits.mean(dim=-1, keepdim=True)
    variance = centred.pow(2).sum(dim=-1, keepdim=True) / (logits.shape[-1] - 1)
    std = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    return centred / (eps + std)


# --------------------------------------------------------------------------------------------------------------------
# Vanilla KD
# --------------------------------------------------------------------------------------------------------------------
def _kd_arg_validation(student_logits: Tensor, teacher_logits: Tensor, reduction: str) -> None:
    _logits_pair_validation(student_logits, teacher_logits)
    check_reduction(reduction, _SAMPLE_REDUCTIONS)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    reduction: SampleReduction = "batchmean",
    *,
    logit_standardization: bool = False,
    validate_args: bool = True,
) -> Tensor:
    r"""Knowledge distillation loss of Hinton et al.: the temperature-softened KL divergence, scaled by :math:`T^2`.

    .. math::

        \ell_i = T_i^2 \sum_{c=1}^{C} p^t_{ic} \left(\log p^t_{ic} - \log p^s_{ic}\right),
        \qquad p^t_i = \operatorname{softmax}(z^t_i / T_i),\ p^s_i = \operatorname{softmax}(z^s_i / T_i).

    The :math:`T^2` factor keeps the gradient magnitude roughly independent of :math:`T`. ``"batchmean"`` sums
    over classes and averages over samples (a plain mean over ``N·C`` elements would be wrong).

    Args:
        student_logits: Student logits ``(N, C)``.
        teacher_logits: Teacher logits ``(N, C)`` (detach them unless the teacher is trained too).
        temperature: ``T > 0``: a number, a scalar tensor, or one value per sample ``(N,)`` (each sample is then
            scaled by its own :math:`T_i^2`).
        reduction: ``"batchmean"`` (mean over samples; 0 for an empty batch), ``"sum"`` or ``"none"``
            (per-sample ``(N,)``).
        logit_standardization: Z-score the student's and the teacher's logits per sample
            (:func:`standardize_logits`) before dividing by ``temperature`` (then the *base* temperature), as in
            "Logit Standardization in Knowledge Distillation" (Sun et al., CVPR 2024). The official code
            (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``) keeps the :math:`T^2` factor,
            and so does this function; its CIFAR-100 setting is ``temperature=2`` with a KD weight of 9 beside
            cross-entropy of weight 1. The loss is then invariant to a positive affine map :math:`a z + b` of
            either model's logits per sample. Off by default (plain KD).
        validate_args: Check that the logits are finite and a tensor ``temperature`` is finite and positive.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Raises:
        TypeError: When the logits are not floating-point tensors.
        ValueError: On mismatched shapes or class counts, non-2-D logits, a non-finite or non-positive
            ``temperature``, non-finite logits, a bad ``reduction`` or standardisation of fewer than 2 classes.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kd_loss(z, z))
        0.0
        >>> round(float(kd_loss(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), temperature=1.0)), 4)
        0.6031
    """
    _kd_arg_validation(student_logits, teacher_logits, reduction)
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        # A number is checked here; a tensor's values after the loss, in the same single synchronisation.
        temp = hyperparameter_tensor(temperature, student, "temperature", positive=True, validate=False)
        if logit_standardization:
            student = standardize_logits(student, validate_args=False)
            teacher = standardize_logits(teacher, validate_args=False)
        log_ps, log_pt = _log_softmax_pair(student, teacher, temp)
        per_sample = kl_from_log_probs(log_pt, log_ps) * flatten_per_sample(temp) ** 2
        if validate_args:
            checks = DeferredChecks()
            _require_finite_logits(checks, per_sample, student_logits, teacher_logits)
            check_hyperparameter(temperature, "temperature", low=0.0, low_inclusive=False, checks=checks)
            checks.run()
        return reduce_loss(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Decoupled KD
# --------------------------------------------------------------------------------------------------------------------
def _dkd_arg_validation(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, reduction: str, validate_args: bool
) -> DeferredChecks:
    checks = _targeted_pair_checks(student_logits, teacher_logits, target, reduction, validate_args)
    if student_logits.shape[1] < 2:
        raise ValueError(
            f"`student_logits` must have at least 2 classes for DKD (a target and a non-target part), got "
            f"{student_logits.shape[1]}."
        )
    return checks


def _binary_and_nontarget_log_probs(scaled: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``log p_target`` (N,), ``log(1 - p_target)`` (N,) and the non-target log-softmax (N, C).

    The non-target log-softmax excludes the target class exactly; its target entry is filled with 0 (it is
    never used) so no infinity enters the graph.
    """
    log_all = torch.logsumexp(scaled, dim=-1)
    log_rest = torch.logsumexp(scaled.masked_fill(target_mask, -math.inf), dim=-1)
    log_target = (scaled.masked_fill(~target_mask, 0.0)).sum(dim=-1) - log_all
    log_nontarget = (scaled - log_rest.unsqueeze(-1)).masked_fill(target_mask, 0.0)
    return log_target, log_rest - log_all, log_nontarget


def dkd_components(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor = 4.0,
    reduction: SampleReduction = "batchmean",
    *,
    logit_standardization: bool = False,
    validate_args: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""The two parts of decoupled KD: target-class (TCKD) and non-target-class (NCKD) distillation.

    With :math:`b = [p_y, 1 - p_y]` the binary target/rest split and :math:`\hat p` the softmax over the
    non-target classes only (both at temperature :math:`T`):

    .. math::

        \mathrm{TCKD}_i = T_i^2\, \mathrm{KL}(b^t_i \,\|\, b^s_i), \qquad
        \mathrm{NCKD}_i = T_i^2\, \mathrm{KL}(\hat p^t_i \,\|\, \hat p^s_i).

    This follows the official DKD code (megvii-research/mdistiller, ``distillers/DKD.py``): both parts carry
    :math:`T^2` and are summed over classes and averaged over the batch. The official code removes the target
    class from the NCKD softmax by subtracting 1000 from its scaled logit; here it is excluded exactly, which
    gives the same numbers (``exp(-1000)`` is 0 in float32 and float64) without infinities in the graph. At
    :math:`T = 1` the decomposition :math:`\mathrm{KL}(p^t\|p^s) = \mathrm{TCKD} + (1 - p^t_y)\,\mathrm{NCKD}`
    holds per sample.

    Args:
        student_logits: Student logits ``(N, C)`` with ``C >= 2``.
        teacher_logits: Teacher logits ``(N, C)``.
        target: Integer class indices ``(N,)`` in ``[0, C)``.
        temperature: ``T > 0``, scalar or per-sample ``(N,)``.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"`` (per-sample), applied to both parts.
        logit_standardization: Z-score both models' logits per sample first (:func:`standardize_logits`), as the
            official logit-standardisation code does for DKD (``mdistiller/distillers/DKD.py`` there).
        validate_args: Check that the logits are finite, ``target`` lies in ``[0, C)`` and a tensor
            ``temperature`` is finite and positive.

    Returns:
        ``(tckd, nckd)``.

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[3.0, 1.0, 0.0]])
        >>> tckd, nckd = dkd_components(s, t, torch.tensor([0]), temperature=1.0)
        >>> bool(tckd > 0) and bool(nckd > 0)
        True
    """
    checks = _dkd_arg_validation(student_logits, teacher_logits, target, reduction, validate_args)
    tckd, nckd = _dkd_per_sample(
        student_logits, teacher_logits, target, temperature, checks, validate_args, logit_standardization
    )
    return reduce_loss(tckd, reduction), reduce_loss(nckd, reduction)


def _dkd_per_sample(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    checks: DeferredChecks,
    validate_args: bool,
    standardize: bool = False,
) -> tuple[Tensor, Tensor]:
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = _checked_temperature(temperature, student, checks, validate_args)
        if standardize:
            student = standardize_logits(student, validate_args=False)
            teacher = standardize_logits(teacher, validate_args=False)
        mask = F.one_hot(target, student.shape[1]).bool()
        s_tgt, s_rest, s_nt = _binary_and_nontarget_log_probs(student / temp, mask)
        t_tgt, t_rest, t_nt = _binary_and_nontarget_log_probs(teacher / temp, mask)
        tckd = t_tgt.exp() * (t_tgt - s_tgt) + t_rest.exp() * (t_rest - s_rest)
        nckd = (t_nt.exp().masked_fill(mask, 0.0) * (t_nt - s_nt)).sum(dim=-1)
        scale = flatten_per_sample(temp) ** 2
        return tckd * scale, nckd * scale


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor = 8.0,
    temperature: float | Tensor = 4.0,
    reduction: SampleReduction = "batchmean",
    *,
    logit_standardization: bool = False,
    validate_args: bool = True,
) -> Tensor:
    r"""Decoupled knowledge distillation: :math:`\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}`.

    .. math::

        \ell_i = \alpha_i\, T_i^2\, \mathrm{KL}(b^t_i \,\|\, b^s_i) + \beta_i\, T_i^2\,
        \mathrm{KL}(\hat p^t_i \,\|\, \hat p^s_i)

    See :func:`dkd_components` for the parts and what is followed from the official code. The cross-entropy
    term and the linear warm-up of the official method are not included (the loss module and the mixin add them).

    Args:
        student_logits: Student logits ``(N, C)``.
        teacher_logits: Teacher logits ``(N, C)``.
        target: Integer class indices ``(N,)``.
        alpha: TCKD weight (default 1), scalar or per-sample.
        beta: NCKD weight (default 8), scalar or per-sample.
        temperature: ``T > 0`` (default 4), scalar or per-sample.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.
        logit_standardization: Z-score both models' logits per sample before the temperature
            (:func:`standardize_logits`; Sun et al., CVPR 2024, official ``mdistiller/distillers/DKD.py`` of
            sunshangquan/logit-standardization-KD, which keeps the :math:`T^2` factors). Off by default.
        validate_args: Check the values of the tensors (finite logits, ``target`` in ``[0, C)``, tensor
            hyperparameters finite and in range).

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
        >>> float(dkd_loss(z, z, torch.tensor([0, 2])))
        0.0
    """
    checks = _dkd_arg_validation(student_logits, teacher_logits, target, reduction, validate_args)
    check_hyperparameter(alpha, "alpha", low=0.0, checks=checks, validate=validate_args)
    check_hyperparameter(beta, "beta", low=0.0, checks=checks, validate=validate_args)
    tckd, nckd = _dkd_per_sample(
        student_logits, teacher_logits, target, temperature, checks, validate_args, logit_standardization
    )
    with autocast_disabled(tckd):
        a = hyperparameter_tensor(alpha, tckd, "alpha", validate=False)
        b = hyperparameter_tensor(beta, tckd, "beta", validate=False)
        return reduce_loss(a * tckd + b * nckd, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Dual-head KD: binary KL on logits
# --------------------------------------------------------------------------------------------------------------------
def _log_cosh(x: Tensor) -> Tensor:
    """``log(cosh(x))`` without overflow: ``|x| + softplus(-2|x|) - log 2``."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


def binary_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 2.0,
    reduction: SampleReduction = "batchmean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Logit-level loss of dual-head KD (DHKD's ``BinaryKLNorm``), in its log-cosh form.

    Each logit difference :math:`d = \sigma((z^s - z^t)/\tau)` is pushed towards :math:`\tfrac12` by
    :math:`\mathrm{KL}(\mathrm{Bern}(\tfrac12)\,\|\,\mathrm{Bern}(d))`, which equals exactly
    :math:`\log\cosh\big((z^s - z^t)/(2\tau)\big)`:

    .. math::

        \ell_i = \tau_i^2 \sum_{c=1}^{C} \log\cosh\!\left(\frac{z^s_{ic} - z^t_{ic}}{2\tau_i}\right),
        \qquad \log\cosh x = |x| + \operatorname{softplus}(-2|x|) - \log 2 .

    The form needs no clamp (the official code clamps :math:`d` to :math:`[10^{-8}, 1 - 10^{-8}]`) and stays
    finite for any logit gap. ``"batchmean"`` divides the sum over samples and classes by ``N`` as the official
    code does.

    Args:
        student_logits: Logits of the student's auxiliary head ``(N, C)``.
        teacher_logits: Teacher logits ``(N, C)``.
        temperature: ``τ > 0`` (default 2), scalar or per-sample.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"`` (per-sample).
        validate_args: Check that the logits are finite and a tensor ``temperature`` is finite and positive.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])
        >>> float(binary_kl_loss(s, t))
        0.0
        >>> round(float(binary_kl_loss(torch.tensor([[4.0]]), torch.tensor([[0.0]]), temperature=1.0)), 4)
        1.325
    """
    checks = _pair_checks(student_logits, teacher_logits, reduction, validate_args)
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = _checked_temperature(temperature, student, checks, validate_args)
        per_sample = _log_cosh((student - teacher) / (2.0 * temp)).sum(dim=-1) * flatten_per_sample(temp) ** 2
        return reduce_loss(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# ND: norm and direction of embeddings
# --------------------------------------------------------------------------------------------------------------------
def _nd_arg_validation(
    student_features: Tensor,
    teacher_features: Tensor,
    class_means: Tensor,
    target: Tensor,
    reduction: str,
    validate_args: bool,
) -> None:
    check_tensor(student_features, "student_features")
    check_tensor(teacher_features, "teacher_features")
    check_tensor(class_means, "class_means")
    if student_features.ndim != 2:
        raise ValueError(
            f"`student_features` must be 2-D of shape (B, D), got shape {tuple(student_features.shape)}. "
            "Pool and flatten the embedding first."
        )
    check_same_shape(student_features, teacher_features, "student_features", "teacher_features")
    if class_means.ndim != 2 or class_means.shape[1] != student_features.shape[1]:
        raise ValueError(
            f"`class_means` must have shape (num_classes, {student_features.shape[1]}) to match the features' width, "
            f"got {tuple(class_means.shape)}. Project the student features to the teacher's width "
            "(FeatureProjector) and compute the means from the teacher's embeddings."
        )
    check_reduction(reduction, _MEAN_REDUCTIONS)
    checks = start_checks(
        validate_args,
        (student_features, "student_features"),
        (teacher_features, "teacher_features"),
        (class_means, "class_means"),
    )
    check_targets(target, class_means.shape[0], student_features.shape[0], checks=checks, validate=validate_args)
    checks.run()


def nd_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    class_means: Tensor,
    target: Tensor,
    reduction: MeanReduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Norm-and-direction (ND) loss: align student embeddings with the teacher's class means and enlarge their norm.

    .. math::

        \ell_i = 1 - \frac{\langle f^s_i,\ c_{y_i} / \lVert c_{y_i} \rVert \rangle}
        {\max(\lVert f^s_i \rVert, \lVert f^t_i \rVert)}

    When :math:`\lVert f^s_i\rVert \ge \lVert f^t_i\rVert` the term is :math:`1 - \cos\theta_i`; otherwise it
    also pushes the student's norm up. This is the official ND code (WangYZ1608/Knowledge-Distillation-via-ND,
    ``DirectNormLoss``), vectorised; on a tie of norms the student's norm is used, like Python's ``max`` there.
    The loss weight :math:`\lambda` is applied by :class:`~lightning_losses.losses.NDLoss`.

    Args:
        student_features: Student embeddings ``(B, D)``, projected to the teacher's width ``D``.
        teacher_features: Teacher embeddings ``(B, D)``.
        class_means: Teacher class means ``(K, D)`` (mean teacher embedding of each class).
        target: Integer class indices ``(B,)`` in ``[0, K)``.
        reduction: ``"mean"`` (:math:`\frac1B\sum_i`; 0 for an empty batch), ``"sum"`` or ``"none"`` (per-sample).
        validate_args: Check that the features and class means are finite and ``target`` lies in ``[0, K)``.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> f_s, f_t = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> float(nd_loss(f_s, f_t, means, torch.tensor([0])))
        0.0
        >>> round(float(nd_loss(f_s, f_t, means, torch.tensor([1]))), 4)
        1.0
    """
    _nd_arg_validation(student_features, teacher_features, class_means, target, reduction, validate_args)
    fs, ft, means = as_float32(student_features, teacher_features, class_means)
    dtype = torch.promote_types(torch.promote_types(fs.dtype, ft.dtype), means.dtype)
    fs, ft, means = fs.to(dtype), ft.to(dtype), means.to(dtype)
    with autocast_disabled(fs):
        direction = F.normalize(means, dim=1)[target]
        norm_s, norm_t = fs.norm(dim=1), ft.norm(dim=1)
        largest = torch.where(norm_s >= norm_t, norm_s, norm_t).clamp_min(torch.finfo(dtype).tiny)
        per_sample = 1.0 - (fs * direction).sum(dim=1) / largest
        if reduction == "mean":
            return reduce_loss(per_sample, "batchmean")
        return reduce_loss(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Token-level generalized JSD
# --------------------------------------------------------------------------------------------------------------------
def _jsd_arg_validation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float | Tensor,
    labels: Tensor | None,
    ignore_index: int,
    reduction: str,
    vocab_mismatch: str,
    num_items_in_batch: NumItems,
    validate_args: bool,
) -> tuple[Tensor, Tensor, DeferredChecks]:
    """Validate the JSD arguments; return the logits (sliced to the shared vocabulary when asked to) and the
    value checks still to run."""
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    if student_logits.ndim not in (2, 3):
        raise ValueError(f"`student_logits` must have shape (B, T, V) or (N, V), got {tuple(student_logits.shape)}.")
    if not isinstance(vocab_mismatch, str) or vocab_mismatch not in _VOCAB_MISMATCH:
        raise ValueError(f"`vocab_mismatch` must be one of {_VOCAB_MISMATCH}, got {vocab_mismatch!r}.")
    check_int(ignore_index, "ignore_index")
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_s != v_t and student_logits.ndim == teacher_logits.ndim:
        if vocab_mismatch == "error":
            raise ValueError(
                "Vocabulary size mismatch between `student_logits` and `teacher_logits`: the student's logits have "
                f"{v_s} entries, the teacher's {v_t}. "
                "Use models that share a tokenizer; when the extra entries are only padding rows of the embedding "
                "matrix, pass vocab_mismatch='slice' to compare the first "
                f"{min(v_s, v_t)} entries."
            )
        shared = min(v_s, v_t)
        student_logits, teacher_logits = student_logits[..., :shared], teacher_logits[..., :shared]
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _token_labels_validation(labels, tuple(student_logits.shape[:-1]))
    check_reduction(reduction, _MEAN_REDUCTIONS, num_items_in_batch)
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    _token_value_checks(checks, beta, num_items_in_batch, labels, student_logits.shape[-1], ignore_index, validate_args)
    return student_logits, teacher_logits, checks


def _token_labels_validation(labels: Tensor | None, lead: tuple[int, ...]) -> None:
    """Check optional token labels: an integer tensor of shape ``lead``, the logits' shape without the vocabulary."""
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor of token ids or None, got {type(labels).__name__}.")
    bad_dtype = labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
    if bad_dtype or tuple(labels.shape) != lead:
        raise ValueError(
            f"`labels` must be an integer tensor of shape {lead} (the logits' shape without the vocabulary), "
            f"got dtype {labels.dtype} and shape {tuple(labels.shape)}."
        )


def _token_value_checks(
    checks: DeferredChecks,
    beta: float | Tensor,
    num_items_in_batch: NumItems,
    labels: Tensor | None,
    vocab: int,
    ignore_index: int,
    validate_args: bool,
) -> None:
    """Check ``beta`` in ``[0, 1]`` and ``num_items_in_batch`` (a number at once, a tensor's values queued on
    ``checks`` when ``validate_args``), and queue the labels' range over a vocabulary of ``vocab`` entries."""
    check_hyperparameter(beta, "beta", low=0.0, high=1.0, checks=checks, validate=validate_args)
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    if validate_args and labels is not None:
        check_labels(labels, vocab, ignore_index, checks)


def _jsd_hyperparameters(
    temperature: float | Tensor, beta: float | Tensor, like: Tensor, checks: DeferredChecks, validate_args: bool
) -> tuple[Tensor, float | Tensor]:
    """The temperature of :func:`_checked_temperature` (which runs the queued checks) and ``beta``, a tensor like
    ``like`` when given as one."""
    if isinstance(beta, Tensor):
        beta = hyperparameter_tensor(beta, like, "beta", validate=False)
    return _checked_temperature(temperature, like, checks, validate_args), beta


KLFromLogProbs = Callable[[Tensor, Tensor], Tensor]


def _jsd_mixture(log_ps: Tensor, log_pt: Tensor, beta: Tensor, kl: KLFromLogProbs = kl_from_log_probs) -> Tensor:
    """``β·KL(p_t || m) + (1-β)·KL(p_s || m)`` with ``m = β p_t + (1-β) p_s``, for ``0 < β < 1``."""
    log_m = torch.logaddexp(log_pt + torch.log(beta), log_ps + torch.log1p(-beta))
    b = beta.squeeze(-1) if beta.ndim else beta
    return b * kl(log_pt, log_m) + (1.0 - b) * kl(log_ps, log_m)


def jsd_from_log_probs(
    log_ps: Tensor, log_pt: Tensor, beta: float | Tensor, kl: KLFromLogProbs = kl_from_log_probs
) -> Tensor:
    r"""Per-position generalized JSD of student and teacher log-probabilities over the last dimension.

    :math:`\beta = 0` is :math:`KL(p_t \| p_s)`, :math:`\beta = 1` is :math:`KL(p_s \| p_t)`; in between
    :math:`\beta KL(p_t \| m) + (1 - \beta) KL(p_s \| m)` with :math:`m = \beta p_t + (1 - \beta) p_s`. A tensor
    ``beta`` (broadcast over the positions, trailing size 1) may mix the three cases. ``kl`` computes
    :math:`KL(p \| q)` from log-probabilities (the sparse losses pass one that allows :math:`\log 0`).

    Example:
        >>> log_p = torch.log_softmax(torch.tensor([[1.0, 0.0, -1.0]]), dim=-1)
        >>> bool(jsd_from_log_probs(log_p, log_p, 0.5).abs().max() < 1e-6)
        True
    """
    if isinstance(beta, Tensor):
        return _jsd_tensor_beta(log_ps, log_pt, beta, kl)
    if beta == 0:
        return kl(log_pt, log_ps)
    if beta == 1:
        return kl(log_ps, log_pt)
    return _jsd_mixture(log_ps, log_pt, torch.tensor(float(beta), dtype=log_ps.dtype), kl)


def masked_token_mean(
    per_token: Tensor,
    labels: Tensor | None,
    ignore_index: int,
    reduction: MeanReduction,
    num_items_in_batch: Tensor | float | None,
) -> Tensor:
    """Reduce per-token values over the tokens whose label is not ``ignore_index`` (every token without labels)."""
    if labels is None:
        count = per_token.new_tensor(float(per_token.numel()))
    else:
        mask = labels != ignore_index
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
        count = mask.sum().to(per_token.dtype)
    return reduce_loss(per_token, reduction, count=count, num_items_in_batch=num_items_in_batch)


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float | Tensor = 0.5,
    temperature: float | Tensor = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: MeanReduction = "mean",
    vocab_mismatch: Literal["error", "slice"] = "error",
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Token-level generalized Jensen-Shannon divergence between a student and a teacher language model.

    With :math:`p^s = \operatorname{softmax}(z^s/T)`, :math:`p^t = \operatorname{softmax}(z^t/T)` per token and
    the mixture :math:`m = \beta p^t + (1-\beta) p^s` (computed in log space with ``logaddexp``):

    .. math::

        \mathrm{JSD}_\beta =
        \begin{cases}
            \mathrm{KL}(p^t \,\|\, p^s) & \beta = 0 \ \text{(forward KL)}\\
            \beta\, \mathrm{KL}(p^t \,\|\, m) + (1-\beta)\, \mathrm{KL}(p^s \,\|\, m) & 0 < \beta < 1\\
            \mathrm{KL}(p^s \,\|\, p^t) & \beta = 1 \ \text{(reverse KL)}
        \end{cases}

    This is the convention of TRL's ``GKDTrainer.generalized_jsd_loss`` (β weights the teacher in the mixture; the
    endpoints are the two KL divergences, handled explicitly, so the loss is not continuous at β = 0 and 1). No
    :math:`T^2` factor is applied. Tokens whose label equals ``ignore_index`` are masked out.

    Args:
        student_logits: Student logits ``(B, T, V)`` or ``(N, V)``.
        teacher_logits: Teacher logits of the same shape.
        beta: Mixture weight in ``[0, 1]``, scalar or per-sample (one value per row of the first dimension).
        temperature: ``T > 0``, scalar or per-sample.
        labels: Optional integer labels of shape ``logits.shape[:-1]``; positions equal to ``ignore_index``
            are excluded.
        ignore_index: Label value of masked tokens (default -100).
        reduction: ``"mean"`` (sum over unmasked tokens divided by their number, as TRL's ``"batchmean"`` with
            labels; without labels the mean over all tokens, where TRL divides by the batch size; 0 with zero
            gradient when every token is masked), ``"sum"``, or ``"none"`` (per-token ``logits.shape[:-1]``, 0 at
            masked tokens).
        vocab_mismatch: ``"error"`` (default) raises when the vocabulary sizes differ; ``"slice"`` compares the
            shared leading part of the vocabulary (for padded embedding matrices).
        num_items_in_batch: With ``reduction="mean"``, the number of counted tokens of the whole batch that this
            call is part of (all micro-batches of an optimizer step on all ranks, divided by whatever factor the
            gradients are later divided by). ``None`` (default) divides by this call's counted tokens; otherwise

            .. math:: \mathcal{L} = \frac{1}{n_{\text{items}}} \sum_{(b,k)\,\text{counted}} \mathrm{JSD}_{\beta,bk},

            so that the losses of the micro-batches, summed, equal the token mean of the whole batch (the
            normalisation of TRL's ``num_items_in_batch``). A positive finite number or one-element tensor.
        validate_args: Check the values of the tensors: finite logits, labels in ``[0, V)`` (or ``ignore_index``),
            a tensor ``beta`` in ``[0, 1]``, a tensor ``temperature`` > 0 and a tensor ``num_items_in_batch`` > 0
            (one host synchronisation). ``False`` skips these checks.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Raises:
        TypeError: When the logits are not floating-point tensors or ``labels`` is not a tensor.
        ValueError: On a vocabulary mismatch (naming both sizes), bad shapes, labels outside the vocabulary,
            non-finite logits, ``beta`` outside ``[0, 1]``, ``temperature <= 0``, a bad ``reduction`` or
            ``num_items_in_batch``.

    Example:
        >>> import torch
        >>> s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
        >>> bool(torch.allclose(generalized_jsd_loss(s, t, beta=0.5), generalized_jsd_loss(t, s, beta=0.5)))
        True
        >>> labels = torch.full((2, 3), -100)
        >>> float(generalized_jsd_loss(s, t, labels=labels))
        0.0
    """
    student_logits, teacher_logits, checks = _jsd_arg_validation(
        student_logits,
        teacher_logits,
        beta,
        labels,
        ignore_index,
        reduction,
        vocab_mismatch,
        num_items_in_batch,
        validate_args,
    )
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp, beta = _jsd_hyperparameters(temperature, beta, student, checks, validate_args)
        log_ps, log_pt = _log_softmax_pair(student, teacher, temp)
        per_token = jsd_from_log_probs(log_ps, log_pt, beta)
        return masked_token_mean(per_token, labels, ignore_index, reduction, num_items_in_batch)


def _jsd_tensor_beta(log_ps: Tensor, log_pt: Tensor, beta: Tensor, kl: KLFromLogProbs = kl_from_log_probs) -> Tensor:
    """Per-token JSD for a tensor ``beta`` that may hold endpoint values; only the needed branches are computed."""
    token_beta = beta.squeeze(-1) if beta.ndim else beta
    is_forward, is_reverse = token_beta == 0, token_beta == 1
    interior = ~(is_forward | is_reverse)
    out = torch.zeros(log_ps.shape[:-1], dtype=log_ps.dtype, device=log_ps.device)
    if bool(interior.any()):
        safe = torch.where(beta > 0, beta, torch.full_like(beta, 0.5))
        safe = torch.where(safe < 1, safe, torch.full_like(safe, 0.5))
        out = torch.where(interior, _jsd_mixture(log_ps, log_pt, safe, kl), out)
    if bool(is_forward.any()):
        out = torch.where(is_forward, kl(log_pt, log_ps), out)
    if bool(is_reverse.any()):
        out = torch.where(is_reverse, kl(log_ps, log_pt), out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Gradient alignment
# --------------------------------------------------------------------------------------------------------------------
def project_conflicting_gradient(gradient: Tensor, reference: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""Remove from ``gradient`` its component against ``reference`` when the two conflict (PCGrad-like).

    Dual-head KD's optional gradient alignment projects an auxiliary loss's gradient onto the normal plane of the
    cross-entropy gradient when their dot product is negative:

    .. math::

        g' = \begin{cases} g - \dfrac{\langle g, r\rangle}{\lVert r\rVert^2}\, r & \langle g, r\rangle < 0 \\
        g & \text{otherwise} \end{cases}

    The dot product is taken over all elements, in float32 (float64 kept); the result has ``gradient``'s dtype.
    No host synchronisation is needed (the choice is made with ``torch.where``).

    Args:
        gradient: The gradient to align (any shape).
        reference: The reference gradient, same shape.
        validate_args: Check that both are finite (one host synchronisation); ``False`` skips it.

    Returns:
        The projected gradient, same shape and dtype as ``gradient``.

    Example:
        >>> import torch
        >>> project_conflicting_gradient(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]))
        tensor([1., 0.])
        >>> project_conflicting_gradient(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))
        tensor([1., 1.])
    """
    check_tensor(gradient, "gradient")
    check_tensor(reference, "reference")
    check_same_shape(gradient, reference, "gradient", "reference")
    start_checks(validate_args, (gradient, "gradient"), (reference, "reference")).run()
    g, r = as_float32(gradient, reference)
    dtype = torch.promote_types(g.dtype, r.dtype)
    g, r = g.to(dtype), r.to(dtype)
    with autocast_disabled(g):
        dot = (g * r).sum()
        norm_sq = (r * r).sum().clamp_min(torch.finfo(dtype).tiny)
        coefficient = torch.where(dot < 0, dot / norm_sq, torch.zeros_like(dot))
        return (g - coefficient * r).to(gradient.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Plackett-Luce distillation (PLD)
# --------------------------------------------------------------------------------------------------------------------
def _teacher_optimal_permutation(teacher: Tensor, target: Tensor) -> Tensor:
    """Class indices ``(N, C)``: the target first, then the other classes by descending teacher logit.

    Ties among teacher logits keep the class order (a stable sort).
    """
    keys = teacher.detach().scatter(1, target.unsqueeze(1), math.inf)
    return torch.sort(keys, dim=1, descending=True, stable=True).indices


def pld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor = 1.0,
    reduction: SampleReduction = "batchmean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Plackett-Luce distillation (PLD): a teacher-weighted list-wise ranking loss that replaces CE + KD.

    The teacher-optimal permutation :math:`\pi^*` puts the true label :math:`y` first and the other classes after it
    in descending teacher logit. The student's (unsoftened) logits :math:`s` are the Plackett-Luce worths, and each
    choice :math:`k` of :math:`\pi^*` is weighted by the teacher's probability of the class chosen there,
    :math:`q_c = \operatorname{softmax}(t / \tau)_c`:

    .. math::

        \ell_i = \sum_{k=1}^{C} q_{i,\pi^*_k} \left( \log \sum_{l=k}^{C} e^{s_{i,\pi^*_l}} - s_{i,\pi^*_k} \right)

    The first term is :math:`q_y` times the cross-entropy, so one loss stands for CE + KD (no separate CE weight).
    The loss is convex in :math:`s` and invariant to adding a constant to either model's logits of a sample. With a
    teacher whose arg-max is the label, the weights are non-increasing along :math:`\pi^*`, and among all
    orderings of given student logit values the one that follows :math:`\pi^*` has the lowest loss.

    Source: "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (Bassam, Zhu, Bian; arXiv:2506.12542),
    Sec. 4 and the code of its Appendix C (``plackett_luce_loss``; no official repository is stored, so this follows
    the paper). The paper's code sorts ascending and puts the label last, summing with a forward ``logcumsumexp``;
    here the equivalent descending order and a suffix log-sum-exp are used. Ties among teacher logits are broken by
    class index. The paper reports :math:`\tau = 1` as best on ImageNet (its default) and uses
    :math:`\tau = 4` on CIFAR-100.

    Args:
        student_logits: Student logits ``(N, C)``.
        teacher_logits: Teacher logits ``(N, C)``.
        target: Integer class indices ``(N,)`` in ``[0, C)``.
        temperature: Teacher temperature :math:`\tau > 0` of the weights only, scalar or per-sample ``(N,)``.
        reduction: ``"batchmean"`` (mean over samples), ``"sum"`` or ``"none"`` (per-sample ``(N,)``).
        validate_args: Check that the logits are finite, ``target`` lies in ``[0, C)`` and a tensor
            ``temperature`` is finite and positive.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Raises:
        TypeError: When the logits are not floating-point tensors or ``target`` is not a tensor.
        ValueError: On mismatched shapes, non-2-D logits, targets outside ``[0, C)``, a non-positive
            ``temperature``, non-finite logits or a bad ``reduction``.

    Example:
        >>> import torch
        >>> s, t, y = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[2.0, 1.0, -1.0]]), torch.tensor([0])
        >>> bool(pld_loss(s, t, y) < pld_loss(s.flip(-1), t, y))  # the student agreeing with the ranking wins
        True
        >>> bool(torch.isclose(pld_loss(s + 5.0, t - 2.0, y), pld_loss(s, t, y)))  # translation invariance
        True
    """
    checks = _targeted_pair_checks(student_logits, teacher_logits, target, reduction, validate_args)
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = _checked_temperature(temperature, teacher, checks, validate_args)
        order = _teacher_optimal_permutation(teacher, target)
        ranked = student.gather(1, order)
        remaining = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
        weights = F.softmax(teacher / temp, dim=-1).gather(1, order)
        per_sample = (weights * (remaining - ranked)).sum(dim=-1)
        return reduce_loss(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# DIST: inter- and intra-class Pearson relations
# --------------------------------------------------------------------------------------------------------------------
_DIST_EPS = 1e-8


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: cosine of the centred rows, with ``eps``
    added to the product of the norms (the official code's form)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float | Tensor = 1.0,
    gamma: float | Tensor = 1.0,
    temperature: float | Tensor = 1.0,
    reduction: SampleReduction = "batchmean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""DIST: distillation from a stronger teacher by inter- and intra-class relations (Huang et al., NeurIPS 2022).

    With :math:`P^s = \operatorname{softmax}(Z^s/\tau)` and :math:`P^t` the teacher's, both ``(N, C)``, and
    :math:`\rho` the Pearson correlation:

    .. math::

        \mathcal{L} = \beta\, \tau^2 \Big(1 - \frac1N \sum_i \rho(P^s_{i,:}, P^t_{i,:})\Big)
        + \gamma\, \tau^2 \Big(1 - \frac1C \sum_c \rho(P^s_{:,c}, P^t_{:,c})\Big)

    The inter-class relation compares each sample's class probabilities, the intra-class relation each class's
    probabilities across the batch. This is the official code (hunto/DIST_KD, ``classification/lib/models/losses/
    dist_kd.py``, also torchdistill's ``DISTLoss``): :math:`\rho(a, b) = \langle \tilde a, \tilde b\rangle /
    (\lVert\tilde a\rVert\,\lVert\tilde b\rVert + 10^{-8})` of the centred vectors, both terms scaled by
    :math:`\tau^2`. Its defaults are :math:`\beta = \gamma = \tau = 1` (ImageNet); the CIFAR-100 setting is
    :math:`\beta = \gamma = 2, \tau = 4`. Adding a constant to a sample's logits leaves the loss unchanged (the
    softmax is); the intra-class term needs more than one sample (with ``N = 1`` each class's centred vector is 0 and
    the term is :math:`\gamma\tau^2`, as in the official code).

    The intra-class term belongs to the whole batch. ``reduction="none"`` returns per-sample values whose mean is
    the loss: :math:`\ell_i = \beta_i \tau_i^2 (1 - \rho_i) + \gamma\, \overline{\tau^2}\, (1 - \bar\rho_{intra})`
    (the intra-class term repeated), with :math:`\overline{\tau^2}` the batch mean of :math:`\tau_i^2` (just
    :math:`\tau^2` for a scalar temperature).

    Args:
        student_logits: Student logits ``(N, C)``.
        teacher_logits: Teacher logits ``(N, C)``.
        beta: Inter-class weight ``>= 0``, scalar or per-sample ``(N,)``.
        gamma: Intra-class weight ``>= 0``, a scalar (the term is a batch statistic).
        temperature: :math:`\tau > 0`, scalar or per-sample ``(N,)``.
        reduction: ``"batchmean"`` (the official loss), ``"sum"`` or ``"none"`` (per-sample values, see above).
        validate_args: Check that the logits are finite and tensor hyperparameters are finite and in range.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Raises:
        TypeError: When the logits are not floating-point tensors.
        ValueError: On mismatched shapes, non-2-D logits, a negative ``beta`` or ``gamma``, a ``gamma`` with more
            than one value, a non-positive ``temperature``, non-finite logits or a bad ``reduction``.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 5)
        >>> bool(dist_loss(z, z) < 1e-5)  # 0 up to the 1e-8 of the correlations' denominators
        True
        >>> bool(torch.isclose(dist_loss(z + torch.randn(4, 1), z), dist_loss(z, z), atol=1e-6))  # shift invariance
        True
    """
    checks = _pair_checks(student_logits, teacher_logits, reduction, validate_args)
    if isinstance(gamma, Tensor) and gamma.numel() != 1:
        raise ValueError(
            f"`gamma` weights the intra-class relation, a statistic of the whole batch, so it must be a scalar; got "
            f"shape {tuple(gamma.shape)}. Pass one value (per-sample weights apply to `beta`)."
        )
    check_hyperparameter(beta, "beta", low=0.0, checks=checks, validate=validate_args)
    check_hyperparameter(gamma, "gamma", low=0.0, checks=checks, validate=validate_args)
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = _checked_temperature(temperature, student, checks, validate_args)
        p_s, p_t = F.softmax(student / temp, dim=-1), F.softmax(teacher / temp, dim=-1)
        scale = flatten_per_sample(temp) ** 2
        inter = scale * (1.0 - _pearson_rows(p_s, p_t, _DIST_EPS))
        intra_scale = scale.mean() if scale.ndim else scale
        intra = intra_scale * (1.0 - _pearson_rows(p_s.transpose(0, 1), p_t.transpose(0, 1), _DIST_EPS).mean())
        b = hyperparameter_tensor(beta, inter, "beta", validate=False)
        g = hyperparameter_tensor(gamma, inter, "gamma", validate=False).reshape(())
        return reduce_loss(b * inter + g * intra, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Margin-MSE for ranking students
# --------------------------------------------------------------------------------------------------------------------
def _margin_mse_arg_validation(
    student_positive: Tensor,
    student_negative: Tensor,
    teacher_positive: Tensor,
    teacher_negative: Tensor,
    reduction: str,
) -> None:
    named = (
        (student_positive, "student_positive"),
        (student_negative, "student_negative"),
        (teacher_positive, "teacher_positive"),
        (teacher_negative, "teacher_negative"),
    )
    for tensor, name in named:
        check_tensor(tensor, name)
    if student_positive.ndim != 1:
        raise ValueError(
            f"`student_positive` must hold one score per query, shape (N,), got shape {tuple(student_positive.shape)}."
            " Squeeze a trailing score dimension first, e.g. `scores.squeeze(-1)`."
        )
    n = student_positive.shape[0]
    if student_negative.ndim not in (1, 2) or student_negative.shape[0] != n:
        raise ValueError(
            f"`student_negative` must have shape ({n},) (one negative per query) or ({n}, M) (M negatives per query), "
            f"got shape {tuple(student_negative.shape)}."
        )
    check_same_shape(student_positive, teacher_positive, "student_positive", "teacher_positive")
    check_same_shape(student_negative, teacher_negative, "student_negative", "teacher_negative")
    check_reduction(reduction, _MEAN_REDUCTIONS)


def margin_mse_loss(
    student_positive: Tensor,
    student_negative: Tensor,
    teacher_positive: Tensor,
    teacher_negative: Tensor,
    reduction: MeanReduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Margin-MSE: match the student's score margin between a relevant and a non-relevant document to the teacher's.

    .. math::

        \ell_{i} = \frac{1}{M} \sum_{m=1}^{M} \Big( \big(s^s(q_i, d^+_i) - s^s(q_i, d^-_{im})\big)
        - \big(s^t(q_i, d^+_i) - s^t(q_i, d^-_{im})\big) \Big)^2

    Only margins are compared, so the teacher's and the student's scores may live on different scales' offsets
    (cross-architecture distillation): adding a per-query constant to either model's scores changes nothing. This is
    the official ``MSMarginLoss`` (sebastian-hofstaetter/matchmaker, ``matchmaker/losses/msmargin.py``; Hofstätter et
    al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation", 2020): the mean
    of the squared margin differences. Several negatives per query (``(N, M)``) are averaged per query, so
    ``"mean"`` is the mean over all ``N·M`` margins, the official value.

    Args:
        student_positive: Student scores of the positive documents ``(N,)``.
        student_negative: Student scores of the negative documents ``(N,)`` or ``(N, M)``.
        teacher_positive: Teacher scores, same shape as ``student_positive``.
        teacher_negative: Teacher scores, same shape as ``student_negative``.
        reduction: ``"mean"`` (over queries; 0 for an empty batch), ``"sum"`` or ``"none"`` (per query ``(N,)``).
        validate_args: Check that the scores are finite.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Raises:
        TypeError: When a score tensor is not floating-point.
        ValueError: On bad or mismatched shapes, non-finite scores or a bad ``reduction``.

    Example:
        >>> import torch
        >>> sp, sn = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
        >>> float(margin_mse_loss(sp, sn, sp + 10.0, sn + 10.0))  # same margins, other scale offset
        0.0
        >>> float(margin_mse_loss(sp, sn, sp, sn - 1.0))  # the teacher's margins are 1 larger
        1.0
    """
    _margin_mse_arg_validation(student_positive, student_negative, teacher_positive, teacher_negative, reduction)
    start_checks(
        validate_args,
        (student_positive, "student_positive"),
        (student_negative, "student_negative"),
        (teacher_positive, "teacher_positive"),
        (teacher_negative, "teacher_negative"),
    ).run()
    sp, sn, tp, tn = as_float32(student_positive, student_negative, teacher_positive, teacher_negative)
    with autocast_disabled(sp):
        if sn.ndim == 2:
            sp, tp = sp.unsqueeze(-1), tp.unsqueeze(-1)
        squared = ((sp - sn) - (tp - tn)).pow(2)
        per_query = squared.mean(dim=-1) if squared.ndim == 2 else squared
        return reduce_loss(per_query, "batchmean" if reduction == "mean" else reduction)


# --------------------------------------------------------------------------------------------------------------------
# Multi-teacher KD with MTARD's entropy-based temperature balance and normalised loss balance
# --------------------------------------------------------------------------------------------------------------------
def _multi_teacher_validation(student_logits: Tensor, teacher_logits: Tensor) -> None:
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    if teacher_logits.ndim != 3:
        raise ValueError(
            f"`teacher_logits` must be the teachers' logits stacked as (K, N, C), got shape "
            f"{tuple(teacher_logits.shape)}. Stack them with `torch.stack([t(x) for t in teachers])`."
        )
    if student_logits.ndim == 2:
        expected = tuple(teacher_logits.shape[1:])
    elif student_logits.ndim == 3:
        expected = tuple(teacher_logits.shape)
    else:
        expected = None
    if expected is None or tuple(student_logits.shape) != expected:
        raise ValueError(
            f"`student_logits` must have shape (N, C) = {tuple(teacher_logits.shape[1:])} (one student output for "
            f"every teacher) or (K, N, C) = {tuple(teacher_logits.shape)} (one per teacher, e.g. on the natural and "
            f"the adversarial inputs), got {tuple(student_logits.shape)}."
        )


def _per_teacher(value: float | Tensor, like: Tensor, name: str, num_teachers: int, **bounds: Any) -> Tensor:
    """A number, a scalar tensor or one value per teacher ``(K,)`` as a tensor of shape ``()`` or ``(K,)``."""
    t = hyperparameter_tensor(value, like, name, layout="any", **bounds)
    if t.ndim != 0 and tuple(t.shape) != (num_teachers,):
        raise ValueError(
            f"`{name}` must be a number or hold one value per teacher, shape ({num_teachers},), got shape "
            f"{tuple(t.shape)}."
        )
    return t


def _tempered_teachers(teacher: Tensor, temperatures: float | Tensor, validate: bool, checks: DeferredChecks) -> Tensor:
    """Log-softmax of stacked teacher logits ``(K, N, C)``, each teacher at its own temperature."""
    temps = _per_teacher(
        temperatures, teacher, "temperatures", teacher.shape[0], positive=True, validate=validate, checks=checks
    )
    checks.run()
    temps = temps.reshape(-1, 1, 1) if temps.ndim else temps
    return F.log_softmax(teacher / temps, dim=-1)


def multi_teacher_kd_losses(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: float | Tensor = 1.0,
    reduction: SampleReduction = "batchmean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Each teacher's KD term of multi-teacher distillation as in MTARD: :math:`\mathrm{KL}(p^{t_k}_{\tau_k} \,\|\,
    p^s)` per teacher.

    .. math::

        L_k = \frac1N \sum_i \mathrm{KL}\big(\operatorname{softmax}(t_{k,i}/\tau_k) \,\big\|\,
        \operatorname{softmax}(s_{k,i})\big)

    As in the official MTARD code (zhaoshiji123/MTARD, ``mtard/mtard_resnet18_cifar10.py``; the balanced extension
    zhaoshiji123/MTARD-extension, ``resnet18_mtard_cifar10.py``) the temperature softens the teacher only and no
    :math:`\tau^2` factor is applied. The official code averages the elementwise KL over samples *and classes* and
    adds ``1e-5`` inside the teacher's logarithm; here the KL is exact and summed over classes (``batchmean``), a
    factor :math:`C` that the normalised loss balance (ratios) does not see.

    Args:
        student_logits: Student logits ``(N, C)`` shared by the teachers, or ``(K, N, C)``: one per teacher (MTARD's
            student sees natural inputs for the clean teacher and adversarial inputs for the robust one).
        teacher_logits: The teachers' logits stacked ``(K, N, C)``.
        temperatures: Teacher temperatures :math:`\tau_k > 0`: a number or one per teacher ``(K,)``.
        reduction: ``"batchmean"`` (``(K,)``: one loss per teacher), ``"sum"`` (``(K,)``) or ``"none"``
            (``(K, N)``).
        validate_args: Check that the logits and the temperatures are finite (temperatures positive).

    Returns:
        The per-teacher losses, in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> t = torch.randn(2, 4, 5)
        >>> tuple(multi_teacher_kd_losses(torch.randn(4, 5), t, torch.tensor([1.0, 2.0])).shape)
        (2,)
    """
    _multi_teacher_validation(student_logits, teacher_logits)
    check_reduction(reduction, _SAMPLE_REDUCTIONS)
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(teacher):
        log_pt = _tempered_teachers(teacher, temperatures, validate_args, checks)
        per_sample = kl_from_log_probs(log_pt, F.log_softmax(student, dim=-1))
        if reduction == "none":
            return per_sample
        total = per_sample.sum(dim=-1)
        return total if reduction == "sum" else total / max(per_sample.shape[-1], 1)


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: float | Tensor = 1.0,
    teacher_weights: Tensor | None = None,
    reduction: SampleReduction = "batchmean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Weighted multi-teacher KD, :math:`\sum_k w_k L_k` with per-teacher temperatures (MTARD's total loss).

    .. math::

        \ell_i = \sum_{k=1}^{K} w_k\, \mathrm{KL}\big(\operatorname{softmax}(t_{k,i}/\tau_k) \,\big\|\,
        \operatorname{softmax}(s_{k,i})\big)

    See :func:`multi_teacher_kd_losses` for the terms; :func:`entropy_balance_step` and :func:`loss_balance_step`
    give MTARD's updates of :math:`\tau` and :math:`w` (the
    :class:`~lightning_losses.losses.BalancedMultiTeacherKDLoss` module applies them at every training step).

    Args:
        student_logits: Student logits ``(N, C)`` or ``(K, N, C)``.
        teacher_logits: Stacked teacher logits ``(K, N, C)``.
        temperatures: :math:`\tau_k > 0`, a number or ``(K,)``.
        teacher_weights: :math:`w_k \ge 0`, ``(K,)``; uniform :math:`1/K` when ``None``. Used as given (not
            renormalised).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"`` (per-sample ``(N,)``).
        validate_args: Check the values of the tensors.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> t = torch.randn(3, 4, 5)
        >>> s = t.clone()
        >>> round(float(multi_teacher_kd_loss(s, t)), 6)  # every teacher matched
        0.0
    """
    per_sample = multi_teacher_kd_losses(
        student_logits, teacher_logits, temperatures, reduction="none", validate_args=validate_args
    )
    k = per_sample.shape[0]
    with autocast_disabled(per_sample):
        if teacher_weights is None:
            weights = per_sample.new_full((k,), 1.0 / k)
        else:
            weights = _per_teacher(teacher_weights, per_sample, "teacher_weights", k, low=0.0, validate=validate_args)
            weights = weights.expand(k) if weights.ndim == 0 else weights
        return reduce_loss((weights.unsqueeze(-1) * per_sample).sum(dim=0), reduction)


def teacher_entropies(
    teacher_logits: Tensor, temperatures: float | Tensor = 1.0, *, validate_args: bool = True
) -> Tensor:
    r"""The mean Shannon entropy of each teacher's softened predictions, :math:`\bar H_k = \frac1N \sum_i
    H(\operatorname{softmax}(t_{k,i}/\tau_k))`, for MTARD's entropy-based balance.

    Args:
        teacher_logits: Stacked teacher logits ``(K, N, C)``.
        temperatures: :math:`\tau_k > 0`, a number or ``(K,)``.
        validate_args: Check that the logits are finite and the temperatures finite and positive.

    Returns:
        ``(K,)`` entropies in nats, without gradient.

    Example:
        >>> import torch
        >>> h = teacher_entropies(torch.zeros(2, 3, 4))  # uniform predictions: log 4
        >>> [round(v, 4) for v in h.tolist()]
        [1.3863, 1.3863]
    """
    _multi_teacher_validation(teacher_logits[0] if teacher_logits.ndim == 3 else teacher_logits, teacher_logits)
    checks = start_checks(validate_args, (teacher_logits, "teacher_logits"))
    (teacher,) = as_float32(teacher_logits.detach())
    with torch.no_grad(), autocast_disabled(teacher):
        log_p = _tempered_teachers(teacher, temperatures, validate_args, checks)
        return -(log_p.exp() * log_p).sum(dim=-1).mean(dim=-1)


def entropy_balance_step(
    entropies: Tensor,
    temperatures: Tensor,
    step_size: float | Tensor = 0.001,
    min_temperature: float | Tensor = 1.0,
    max_temperature: float | Tensor = 10.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""One step of MTARD's Entropy-Based Balance: move each teacher's temperature against its entropy's excess.

    .. math::

        \tau_k \leftarrow \operatorname{clip}\big(\tau_k - \eta\, \operatorname{sign}(\bar H_k - \tfrac1K
        \textstyle\sum_j \bar H_j),\ \tau_{min},\ \tau_{max}\big)

    A teacher more uncertain than the others is sharpened (lower :math:`\tau`), a more confident one is softened, so
    the teachers' information entropies meet. For two teachers this is the official rule
    :math:`\tau_a \leftarrow \tau_a - \eta\,\operatorname{sign}(H_a/H_b - 1)` (zhaoshiji123/MTARD-extension,
    ``resnet18_mtard_cifar10.py``: :math:`\eta = 0.001`, :math:`\tau \in [1, 10]`, starting at 1, :math:`\eta`
    divided by 10 at each learning-rate decay).

    Args:
        entropies: ``(K,)`` mean entropies (:func:`teacher_entropies`).
        temperatures: ``(K,)`` current temperatures.
        step_size: :math:`\eta \ge 0`.
        min_temperature: :math:`\tau_{min} > 0`.
        max_temperature: :math:`\tau_{max} \ge \tau_{min}`.
        validate_args: Check that the entropies and temperatures are finite, the temperatures positive.

    Returns:
        The new temperatures ``(K,)`` (no gradient).

    Example:
        >>> import torch
        >>> new = entropy_balance_step(torch.tensor([0.5, 1.5]), torch.tensor([2.0, 2.0]), step_size=0.1)
        >>> [round(v, 4) for v in new.tolist()]  # the confident teacher is softened, the uncertain one sharpened
        [2.1, 1.9]
    """
    check_tensor(entropies, "entropies")
    check_tensor(temperatures, "temperatures")
    if entropies.ndim != 1 or temperatures.shape != entropies.shape:
        raise ValueError(
            f"`entropies` and `temperatures` must both have shape (K,), one value per teacher; got "
            f"{tuple(entropies.shape)} and {tuple(temperatures.shape)}."
        )
    checks = start_checks(validate_args, (entropies, "entropies"))
    check_hyperparameter(
        temperatures, "temperatures", low=0.0, low_inclusive=False, checks=checks, validate=validate_args
    )
    checks.run()
    with torch.no_grad():
        eta = hyperparameter_tensor(step_size, temperatures, "step_size", low=0.0)
        low = hyperparameter_tensor(min_temperature, temperatures, "min_temperature", positive=True)
        high = hyperparameter_tensor(max_temperature, temperatures, "max_temperature", positive=True)
        if bool(high < low):
            raise ValueError(
                f"`max_temperature` ({float(high)}) must be >= `min_temperature` ({float(low)}). Swap them."
            )
        excess = entropies.to(temperatures.dtype) - entropies.to(temperatures.dtype).mean()
        return torch.minimum(torch.maximum(temperatures - eta * torch.sign(excess), low), high)


def loss_balance_step(
    losses: Tensor,
    initial_losses: Tensor,
    weights: Tensor,
    step_size: float | Tensor = 0.025,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""One step of MTARD's Normalization Loss Balance: give more weight to the teacher whose loss fell least.

    With the relative losses :math:`\hat L_k = L_k / L_k^{(0)}` (:math:`L_k^{(0)}` the loss at the first step):

    .. math::

        w_k \leftarrow w_k - \eta \Big(w_k - \frac{\hat L_k}{\sum_j \hat L_j}\Big), \qquad
        w \leftarrow \frac{\max(w, 0)}{\sum_j \max(w_j, 0)}

    This is the official update (zhaoshiji123/MTARD-extension, ``resnet18_mtard_cifar10.py``: :math:`\eta =
    0.025`, weights starting at :math:`1/K`, :math:`\eta` divided by 10 at each learning-rate decay; for two
    teachers the conference code's :math:`w_{nat} \leftarrow w_{nat} - \eta(w_{nat} - \hat L_{nat} / (\hat L_{nat}
    + \hat L_{adv}))`, :math:`w_{adv} = 1 - w_{nat}` is the same). An initial loss of 0 is clamped to the smallest
    normal number.

    Args:
        losses: ``(K,)`` current per-teacher losses.
        initial_losses: ``(K,)`` the losses of the first step.
        weights: ``(K,)`` current weights (non-negative, summing to 1).
        step_size: :math:`\eta \in [0, 1]`.
        validate_args: Check that the losses are finite and non-negative and the weights finite and non-negative.

    Returns:
        The new weights ``(K,)`` (no gradient).

    Example:
        >>> import torch
        >>> w = loss_balance_step(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), torch.tensor([0.5, 0.5]), 1.0)
        >>> w.tolist()  # the second teacher's loss went up, the first one's down
        [0.25, 0.75]
    """
    for tensor, name in ((losses, "losses"), (initial_losses, "initial_losses"), (weights, "weights")):
        check_tensor(tensor, name)
    if losses.ndim != 1 or initial_losses.shape != losses.shape or weights.shape != losses.shape:
        raise ValueError(
            f"`losses`, `initial_losses` and `weights` must all have shape (K,), one value per teacher; got "
            f"{tuple(losses.shape)}, {tuple(initial_losses.shape)} and {tuple(weights.shape)}."
        )
    checks = start_checks(validate_args)
    for tensor, name in ((losses, "losses"), (initial_losses, "initial_losses"), (weights, "weights")):
        check_hyperparameter(tensor, name, low=0.0, checks=checks, validate=validate_args)
    checks.run()
    with torch.no_grad():
        eta = hyperparameter_tensor(step_size, weights, "step_size", low=0.0, high=1.0)
        initial = initial_losses.to(weights.dtype)
        relative = losses.to(weights.dtype) / initial.clamp_min(torch.finfo(weights.dtype).tiny)
        target = relative / relative.sum().clamp_min(torch.finfo(weights.dtype).tiny)
        updated = (weights - eta * (weights - target)).clamp_min(0.0)
        return updated / updated.sum().clamp_min(torch.finfo(weights.dtype).tiny)

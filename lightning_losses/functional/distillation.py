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
"""

from __future__ import annotations

import math
from typing import Literal

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
    "dkd_components",
    "dkd_loss",
    "generalized_jsd_loss",
    "kd_loss",
    "nd_loss",
    "project_conflicting_gradient",
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


def _log_softmax_pair(student: Tensor, teacher: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    return F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1)


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
        validate_args: Check that the logits are finite and a tensor ``temperature`` is finite and positive.

    Returns:
        The loss, in float32 (float64 for float64 inputs).

    Raises:
        TypeError: When the logits are not floating-point tensors.
        ValueError: On mismatched shapes or class counts, non-2-D logits, a non-finite or non-positive
            ``temperature``, non-finite logits or a bad ``reduction``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kd_loss(z, z))
        0.0
        >>> round(float(kd_loss(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), temperature=1.0)), 4)
        0.6031
    """
    _kd_arg_validation(student_logits, teacher_logits, reduction)
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = hyperparameter_tensor(
            temperature, student, "temperature", positive=True, validate=validate_args, checks=checks
        )
        checks.run()
        log_ps, log_pt = _log_softmax_pair(student, teacher, temp)
        per_sample = kl_from_log_probs(log_pt, log_ps) * flatten_per_sample(temp) ** 2
        return reduce_loss(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Decoupled KD
# --------------------------------------------------------------------------------------------------------------------
def _dkd_arg_validation(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, reduction: str, validate_args: bool
) -> DeferredChecks:
    _logits_pair_validation(student_logits, teacher_logits)
    if student_logits.shape[1] < 2:
        raise ValueError(
            f"`student_logits` must have at least 2 classes for DKD (a target and a non-target part), got "
            f"{student_logits.shape[1]}."
        )
    check_reduction(reduction, _SAMPLE_REDUCTIONS)
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    check_targets(target, student_logits.shape[1], student_logits.shape[0], checks=checks, validate=validate_args)
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
    tckd, nckd = _dkd_per_sample(student_logits, teacher_logits, target, temperature, checks, validate_args)
    return reduce_loss(tckd, reduction), reduce_loss(nckd, reduction)


def _dkd_per_sample(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    checks: DeferredChecks,
    validate_args: bool,
) -> tuple[Tensor, Tensor]:
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = hyperparameter_tensor(
            temperature, student, "temperature", positive=True, validate=validate_args, checks=checks
        )
        checks.run()
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
    tckd, nckd = _dkd_per_sample(student_logits, teacher_logits, target, temperature, checks, validate_args)
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
    _logits_pair_validation(student_logits, teacher_logits)
    check_reduction(reduction, _SAMPLE_REDUCTIONS)
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    student, teacher = as_float32(student_logits, teacher_logits)
    with autocast_disabled(student):
        temp = hyperparameter_tensor(
            temperature, student, "temperature", positive=True, validate=validate_args, checks=checks
        )
        checks.run()
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
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"`labels` must be a tensor of token ids or None, got {type(labels).__name__}.")
        bad_dtype = labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
        if bad_dtype or labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"`labels` must be an integer tensor of shape {tuple(student_logits.shape[:-1])} (the logits' shape "
                f"without the vocabulary), got dtype {labels.dtype} and shape {tuple(labels.shape)}."
            )
    check_reduction(reduction, _MEAN_REDUCTIONS, num_items_in_batch)
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    if not isinstance(beta, Tensor):
        check_hyperparameter(beta, "beta", low=0.0, high=1.0)
    else:
        check_hyperparameter(beta, "beta", low=0.0, high=1.0, checks=checks, validate=validate_args)
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    if validate_args and labels is not None:
        check_labels(labels, student_logits.shape[-1], ignore_index, checks)
    return student_logits, teacher_logits, checks


def _jsd_mixture(log_ps: Tensor, log_pt: Tensor, beta: Tensor) -> Tensor:
    """``β·KL(p_t || m) + (1-β)·KL(p_s || m)`` with ``m = β p_t + (1-β) p_s``, for ``0 < β < 1``."""
    log_m = torch.logaddexp(log_pt + torch.log(beta), log_ps + torch.log1p(-beta))
    b = beta.squeeze(-1) if beta.ndim else beta
    return b * kl_from_log_probs(log_pt, log_m) + (1.0 - b) * kl_from_log_probs(log_ps, log_m)


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
        temp = hyperparameter_tensor(
            temperature, student, "temperature", positive=True, validate=validate_args, checks=checks
        )
        beta_t = hyperparameter_tensor(beta, student, "beta", validate=False) if isinstance(beta, Tensor) else None
        checks.run()
        log_ps, log_pt = _log_softmax_pair(student, teacher, temp)
        if beta_t is not None:
            per_token = _jsd_tensor_beta(log_ps, log_pt, beta_t)
        elif beta == 0:
            per_token = kl_from_log_probs(log_pt, log_ps)
        elif beta == 1:
            per_token = kl_from_log_probs(log_ps, log_pt)
        else:
            per_token = _jsd_mixture(log_ps, log_pt, torch.tensor(float(beta), dtype=student.dtype))
        if labels is None:
            count = per_token.new_tensor(float(per_token.numel()))
        else:
            mask = labels != ignore_index
            per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
            count = mask.sum().to(per_token.dtype)
        return reduce_loss(per_token, reduction, count=count, num_items_in_batch=num_items_in_batch)


def _jsd_tensor_beta(log_ps: Tensor, log_pt: Tensor, beta: Tensor) -> Tensor:
    """Per-token JSD for a tensor ``beta`` that may hold endpoint values; only the needed branches are computed."""
    token_beta = beta.squeeze(-1) if beta.ndim else beta
    is_forward, is_reverse = token_beta == 0, token_beta == 1
    interior = ~(is_forward | is_reverse)
    out = torch.zeros(log_ps.shape[:-1], dtype=log_ps.dtype, device=log_ps.device)
    if bool(interior.any()):
        safe = torch.where(beta > 0, beta, torch.full_like(beta, 0.5))
        safe = torch.where(safe < 1, safe, torch.full_like(safe, 0.5))
        out = torch.where(interior, _jsd_mixture(log_ps, log_pt, safe), out)
    if bool(is_forward.any()):
        out = torch.where(is_forward, kl_from_log_probs(log_pt, log_ps), out)
    if bool(is_reverse.any()):
        out = torch.where(is_reverse, kl_from_log_probs(log_ps, log_pt), out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Gradient alignment
# --------------------------------------------------------------------------------------------------------------------
def project_conflicting_gradient(gradient: Tensor, reference: Tensor) -> Tensor:
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
    g, r = as_float32(gradient, reference)
    dtype = torch.promote_types(g.dtype, r.dtype)
    g, r = g.to(dtype), r.to(dtype)
    with autocast_disabled(g):
        dot = (g * r).sum()
        norm_sq = (r * r).sum().clamp_min(torch.finfo(dtype).tiny)
        coefficient = torch.where(dot < 0, dot / norm_sq, torch.zeros_like(dot))
        return (g - coefficient * r).to(gradient.dtype)

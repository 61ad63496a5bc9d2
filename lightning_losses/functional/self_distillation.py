r"""Ground-truth-weighted self-distillation (Borup & Andersen, "Even your teacher needs guidance", NeurIPS 2021).

Each generation of self-distillation trains a fresh copy of the architecture on the mixed target

.. math::
    \tilde y_i = \xi\,\mathrm{onehot}(y_i) + (1 - \xi)\,p^{t}_i, \qquad p^{t}_i = \mathrm{softmax}(z^{t}_i / T),

the previous generation's predictions :math:`p^t` weighted against the ground truth by :math:`\xi \in [0, 1]`
(the paper's and the official code's ``alpha``: ``alpha = 1`` trains on the labels only, ``alpha = 0`` on the
teacher only). Two criteria are offered:

* ``"mse"`` (the paper's weighted squared error, and what the official ``self_distiller.py`` trains):
  :math:`\xi\,\|p^s - e_y\|^2 + (1 - \xi)\,\|p^s - p^t\|^2` on the student's probabilities :math:`p^s`. It equals
  :math:`\|p^s - \tilde y\|^2 + \xi(1 - \xi)\|e_y - p^t\|^2`: the squared error to the mixed target plus a constant,
  so both forms have the same gradient.
* ``"ce"``: the cross-entropy :math:`-\sum_c \tilde y_c \log p^s_c` to the mixed target (the usual deep-learning
  form, equal to :math:`\xi\,\mathrm{CE}(z^s, y) + (1-\xi)\,H(p^t, p^s)`).

The official code reduces the squared error with ``F.mse_loss`` (a mean over samples *and* classes); here it is a
sum over classes and a mean over samples (``"batchmean"``), i.e. ``C`` times the official value.

:func:`optimal_ground_truth_weight` gives the weight that minimises the squared error of a generation to a reference
target. In the paper's kernel-ridge setting a generation's fit is affine in :math:`\xi`,
:math:`f^{(\xi)} = \xi f^{(1)} + (1 - \xi) f^{(0)}` (:math:`f^{(1)}` fitted to the labels, :math:`f^{(0)}` to the
teacher), so the optimum has the closed form of a projection onto the line through the two extreme fits; for
networks the same formula applied to the two extreme students' outputs estimates it with two trainings instead of
a grid search.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.utilities.checks import (
    DeferredChecks,
    check_choice,
    check_reduction,
    check_targets,
    check_tensor,
    start_checks,
)
from lightning_losses.utilities.numerics import (
    as_float32,
    autocast_disabled,
    compute_dtype,
    hyperparameter_tensor,
    reduce_loss,
)

__all__ = ["optimal_ground_truth_weight", "self_distillation_loss", "self_distillation_target"]

Criterion = Literal["mse", "ce"]
Reduction = Literal["batchmean", "sum", "none"]


def _check_logits(student_logits: object, teacher_logits: object) -> None:
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    assert isinstance(student_logits, Tensor) and isinstance(teacher_logits, Tensor)
    if student_logits.ndim != 2 or student_logits.shape[1] < 2:
        raise ValueError(
            f"`student_logits` must have shape (N, C) with C >= 2 classes, got {tuple(student_logits.shape)}."
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"`teacher_logits` must have the student's shape {tuple(student_logits.shape)}, got "
            f"{tuple(teacher_logits.shape)}: student and teacher must share the label space."
        )


def _mixture_parts(
    like: Tensor,
    teacher: Tensor,
    target: Tensor,
    xi: float | Tensor,
    temperature: float | Tensor,
    checks: DeferredChecks,
    validate_args: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``ξ`` (per sample), the tempered teacher probabilities and the one-hot targets, in ``like``'s compute dtype."""
    dtype = compute_dtype(like.dtype)
    xi_t = hyperparameter_tensor(
        xi, like, "xi", low=0.0, high=1.0, dtype=dtype, layout="sample", checks=checks, validate=validate_args
    )
    t = hyperparameter_tensor(
        temperature,
        like,
        "temperature",
        positive=True,
        dtype=dtype,
        layout="sample",
        checks=checks,
        validate=validate_args,
    )
    checks.run()
    with autocast_disabled(like):
        teacher_probs = torch.softmax(teacher.to(dtype) / t, dim=-1)
        onehot = F.one_hot(target, teacher.shape[1]).to(dtype)
    return xi_t, teacher_probs, onehot


def self_distillation_target(
    teacher_logits: Tensor,
    target: Tensor,
    xi: float | Tensor,
    temperature: float | Tensor = 1.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""The mixed target :math:`\xi\,\mathrm{onehot}(y) + (1 - \xi)\,\mathrm{softmax}(z^t / T)` (no gradient).

    Args:
        teacher_logits: ``(N, C)`` logits of the previous generation.
        target: ``(N,)`` class indices.
        xi: Weight of the ground truth in ``[0, 1]``: a number, a 0-d tensor or one per sample.
        temperature: ``T > 0`` of the teacher's softmax (1 in the paper).
        validate_args: Check that the logits are finite, the targets in ``[0, C)`` and tensor ``xi`` /
            ``temperature`` in range (one host synchronisation).

    Returns:
        ``(N, C)`` float32 rows summing to one.

    Example:
        >>> t = self_distillation_target(torch.zeros(1, 4), torch.tensor([2]), xi=0.5)
        >>> [round(v, 3) for v in t[0].tolist()]
        [0.125, 0.125, 0.625, 0.125]
    """
    _check_logits(teacher_logits, teacher_logits)
    checks = start_checks(validate_args, (teacher_logits, "teacher_logits"))
    check_targets(target, teacher_logits.shape[1], teacher_logits.shape[0], checks=checks, validate=validate_args)
    (z,) = as_float32(teacher_logits.detach())
    xi_t, teacher_probs, onehot = _mixture_parts(z, z, target, xi, temperature, checks, validate_args)
    return (xi_t * onehot + (1.0 - xi_t) * teacher_probs).detach()


def self_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    xi: float | Tensor = 0.5,
    temperature: float | Tensor = 1.0,
    criterion: Criterion = "mse",
    reduction: Reduction = "batchmean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Self-distillation loss on the ground-truth-weighted target of Borup & Andersen (2021).

    With :math:`\tilde y = \xi\,e_y + (1 - \xi)\,\mathrm{softmax}(z^t/T)` and :math:`p^s = \mathrm{softmax}(z^s)`:

    .. math::
        \ell^{\text{mse}}_i = \xi_i\,\|p^s_i - e_{y_i}\|_2^2 + (1 - \xi_i)\,\|p^s_i - p^t_i\|_2^2, \qquad
        \ell^{\text{ce}}_i = -\sum_c \tilde y_{ic} \log p^s_{ic},

    averaged over the samples (``"batchmean"``). The teacher receives no gradient. ``xi = 1`` is plain training on
    the labels (squared error or cross-entropy), ``xi = 0`` pure self-distillation.

    Source: Borup & Andersen, NeurIPS 2021; official code ``Kennethborup/self_distillation``, ``self_distiller.py``
    (``training_step``: ``alpha * mse(softmax(pred), onehot) + (1 - alpha) * mse(softmax(pred),
    softmax(teacher))``). The official code averages over classes too (``F.mse_loss``): this value is ``C`` times
    it. The paper's :math:`\ell_2` penalty on the weights is left to the optimizer's weight decay.

    Args:
        student_logits: ``(N, C)`` logits of the generation being trained.
        teacher_logits: ``(N, C)`` logits of the previous generation (detached here).
        target: ``(N,)`` class indices.
        xi: Ground-truth weight in ``[0, 1]`` (the paper's α): a number, a 0-d tensor or one value per sample.
        temperature: ``T > 0`` of the teacher's softmax (1 in the paper and the official code).
        criterion: ``"mse"`` (paper, official code) or ``"ce"`` (cross-entropy to the mixed target).
        reduction: ``"batchmean"`` (mean over samples; 0 for an empty batch), ``"sum"`` or ``"none"`` (``(N,)``).
        validate_args: Check that the logits are finite, the targets in ``[0, C)`` and tensor ``xi`` /
            ``temperature`` in range (one host synchronisation). Shapes and dtypes are always checked.

    Returns:
        The float32 loss, a scalar or ``(N,)``.

    Example:
        >>> s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> ce = self_distillation_loss(s, t, y, xi=1.0, criterion="ce")
        >>> bool(torch.isclose(ce, torch.nn.functional.cross_entropy(s, y)))
        True
    """
    _check_logits(student_logits, teacher_logits)
    check_choice("criterion", criterion, ("mse", "ce"))
    check_reduction(reduction, ("batchmean", "sum", "none"))
    checks = start_checks(validate_args, (student_logits, "student_logits"), (teacher_logits, "teacher_logits"))
    n, c = student_logits.shape
    check_targets(target, c, n, checks=checks, validate=validate_args)
    s, z = as_float32(student_logits, teacher_logits.detach())
    xi_t, teacher_probs, onehot = _mixture_parts(s, z, target, xi, temperature, checks, validate_args)
    with autocast_disabled(s):
        s = s.to(teacher_probs.dtype)
        if criterion == "mse":
            probs = torch.softmax(s, dim=-1)
            labels_term = (probs - onehot).pow(2).sum(-1)
            teacher_term = (probs - teacher_probs).pow(2).sum(-1)
            w = xi_t.reshape(-1) if xi_t.ndim else xi_t
            per_sample = w * labels_term + (1.0 - w) * teacher_term
        else:
            mixed = xi_t * onehot + (1.0 - xi_t) * teacher_probs
            per_sample = -(mixed * torch.log_softmax(s, dim=-1)).sum(-1)
    return reduce_loss(per_sample, reduction, count=n)


def optimal_ground_truth_weight(
    label_fit: Tensor,
    teacher_fit: Tensor,
    reference: Tensor,
    *,
    clip: bool = True,
    validate_args: bool = True,
) -> Tensor:
    r"""The ground-truth weight :math:`\xi^\star` minimising the squared error of a generation to ``reference``.

    A generation's predictions are taken as affine in :math:`\xi` (exact for the kernel ridge regression of the
    paper, where :math:`f_t = K(K + \lambda I)^{-1}(\xi y + (1 - \xi) f_{t-1})`):
    :math:`f^{(\xi)} = \xi f^{(1)} + (1 - \xi) f^{(0)}` with :math:`f^{(1)}` the fit to the labels only
    (``label_fit``) and :math:`f^{(0)}` the fit to the teacher only (``teacher_fit``). Then

    .. math::
        \xi^\star = \operatorname*{arg\,min}_\xi \|g - f^{(\xi)}\|_2^2
        = \frac{\langle f^{(1)} - f^{(0)},\ g - f^{(0)}\rangle}{\|f^{(1)} - f^{(0)}\|_2^2},

    clipped to ``[0, 1]`` by default (the paper's range of the weight). With two identical fits every weight is as
    good and 1 (the labels) is returned. For networks, pass the two extreme students' probabilities on held-out
    data and the held-out labels: two trainings instead of a grid search over :math:`\xi`.

    Args:
        label_fit: Predictions of the model trained with ``xi = 1``: ``(N,)`` or ``(N, C)`` (probabilities).
        teacher_fit: Predictions of the model trained with ``xi = 0``, same shape.
        reference: The target :math:`g`: the same shape as the fits, or ``(N,)`` integer class indices when the
            fits are ``(N, C)`` (then one-hot rows).
        clip: Clip the result to ``[0, 1]``.
        validate_args: Check that the tensors are finite and the class indices in range.

    Returns:
        A 0-d float64 tensor.

    Example:
        >>> f1, f0 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> float(optimal_ground_truth_weight(f1, f0, torch.tensor([0.75, 0.25])))
        0.75
    """
    check_tensor(label_fit, "label_fit")
    check_tensor(teacher_fit, "teacher_fit")
    if label_fit.shape != teacher_fit.shape or label_fit.ndim not in (1, 2):
        raise ValueError(
            "`label_fit` and `teacher_fit` must have the same shape (N,) or (N, C), got "
            f"{tuple(label_fit.shape)} and {tuple(teacher_fit.shape)}."
        )
    if not isinstance(clip, bool):
        raise TypeError(f"`clip` must be a bool, got {type(clip).__name__}.")
    check_tensor(reference, "reference", floating=False)
    checks = start_checks(validate_args, (label_fit, "label_fit"), (teacher_fit, "teacher_fit"))
    if reference.is_floating_point():
        if reference.shape != label_fit.shape:
            raise ValueError(
                f"`reference` must have the fits' shape {tuple(label_fit.shape)} (or be (N,) class indices for (N, C) "
                f"fits), got {tuple(reference.shape)}."
            )
        if validate_args:
            checks.require_finite(reference, "reference")
    else:
        if label_fit.ndim != 2:
            raise ValueError(
                f"Class indices as `reference` need (N, C) fits (probabilities), got fits of shape "
                f"{tuple(label_fit.shape)}. Pass a floating-point reference of the fits' shape."
            )
        check_targets(
            reference, label_fit.shape[1], label_fit.shape[0], "reference", checks=checks, validate=validate_args
        )
    checks.run()
    if reference.is_floating_point():
        g = reference.detach().double()
    else:
        g = F.one_hot(reference, label_fit.shape[1]).double()
    f1, f0 = label_fit.detach().double(), teacher_fit.detach().double()
    direction = f1 - f0
    denominator = direction.pow(2).sum()
    if float(denominator) == 0.0:
        return torch.ones((), dtype=torch.float64, device=f1.device)
    xi = (direction * (g - f0)).sum() / denominator
    return xi.clamp(0.0, 1.0) if clip else xi

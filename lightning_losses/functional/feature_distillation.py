r"""Feature distillation: hint regression, attention transfer, relational and contrastive losses on features.

Pure tensor functions (no state): the learned parts (the FitNet regressor, CRD's embedding heads and memory bank)
live in :mod:`lightning_losses.nn.distillation` and :mod:`lightning_losses.losses.feature_distillation`. Every
function computes in float32 (float64 inputs stay float64) with autocast disabled inside. Bad input raises a
``TypeError`` (not a floating tensor) or a ``ValueError`` (shape, range) naming the argument; ``validate_args=True``
(the default) also checks that the tensors are finite and indices in range, with one host synchronisation.

Functions:
    * :func:`fitnet_loss` — FitNets' hint loss, the mean squared error between regressed student and teacher hints.
    * :func:`attention_map`, :func:`attention_transfer_loss` — attention transfer (Zagoruyko & Komodakis).
    * :func:`rkd_distance_loss`, :func:`rkd_angle_loss`, :func:`rkd_loss` — relational KD (Park et al.).
    * :func:`crd_nce_loss`, :func:`crd_loss` — contrastive representation distillation (Tian et al.).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.utilities.checks import (
    check_hyperparameter,
    check_reduction,
    check_same_shape,
    check_tensor,
    start_checks,
)
from lightning_losses.utilities.numerics import as_float32, autocast_disabled, reduce_loss

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "crd_loss",
    "crd_nce_loss",
    "fitnet_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
]

MeanReduction = Literal["mean", "sum", "none"]
_MEAN_REDUCTIONS = ("mean", "sum", "none")
_CRD_EPS = 1e-7  # the official ContrastLoss's eps


def _same_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    upcast = as_float32(*tensors)
    dtype = upcast[0].dtype
    for t in upcast[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in upcast)


def _reduce_samples(per_sample: Tensor, reduction: str) -> Tensor:
    return reduce_loss(per_sample, "batchmean" if reduction == "mean" else reduction)


# --------------------------------------------------------------------------------------------------------------------
# FitNet
# --------------------------------------------------------------------------------------------------------------------
def fitnet_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    reduction: MeanReduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""FitNets' hint loss: the mean squared error between the regressed student hint and the teacher hint.

    .. math::

        \ell_i = \frac{1}{D} \sum_{d=1}^{D} \big(r(f^s_i)_d - f^t_{i,d}\big)^2

    with :math:`r` the regressor (apply it first, e.g. :class:`~lightning_losses.nn.HintRegressor`) and :math:`D`
    the number of elements of one sample's hint. ``"mean"`` is ``F.mse_loss(r(f_s), f_t)``, the hint loss of the
    official code reused by torchdistill (``FitNetLoss``) and RepDistiller (``HintLoss``). The FitNets paper writes
    :math:`\tfrac12\lVert\cdot\rVert^2` summed over the hint and trains in two stages (hints first); the common
    one-stage form used with cross-entropy, as in RepDistiller (weight 100), is followed here.

    Args:
        student_features: Regressed student hints ``(N, ...)``.
        teacher_features: Teacher hints of the same shape.
        reduction: ``"mean"`` (over samples of the per-sample mean, i.e. over all elements), ``"sum"`` (over
            samples) or ``"none"`` (per-sample ``(N,)``).
        validate_args: Check that the features are finite.

    Example:
        >>> import torch
        >>> f = torch.randn(4, 3, 5, 5)
        >>> float(fitnet_loss(f, f))
        0.0
        >>> s, t = torch.randn(4, 8), torch.randn(4, 8)
        >>> bool(torch.isclose(fitnet_loss(s, t), torch.nn.functional.mse_loss(s, t)))
        True
    """
    check_tensor(student_features, "student_features")
    check_tensor(teacher_features, "teacher_features")
    if student_features.ndim < 2:
        raise ValueError(
            f"`student_features` must have a batch dimension, shape (N, ...), got {tuple(student_features.shape)}."
        )
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"`student_features` (after the regressor) and `teacher_features` must have the same shape, got "
            f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}. Map the student hint to the "
            "teacher's with a regressor (HintRegressor(student_channels, teacher_channels)) and pool or "
            "interpolate to the teacher's spatial size."
        )
    check_reduction(reduction, _MEAN_REDUCTIONS)
    start_checks(validate_args, (student_features, "student_features"), (teacher_features, "teacher_features")).run()
    fs, ft = _same_dtype(student_features, teacher_features)
    with autocast_disabled(fs):
        per_sample = (fs - ft).pow(2).flatten(1).mean(dim=1)
        return _reduce_samples(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Attention transfer
# --------------------------------------------------------------------------------------------------------------------
def _attention_validation(features: Tensor, name: str, p: float) -> None:
    check_tensor(features, name)
    if features.ndim < 3:
        raise ValueError(
            f"`{name}` must be a feature map (N, C, H, W) (or (N, C, L)), got shape {tuple(features.shape)}. "
            "Capture a convolutional layer's output, not a pooled embedding."
        )
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"`p` must be a positive number, got {p!r}. The official attention transfer uses p = 2.")


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    r"""The normalised spatial attention map of a feature map: channel mean of :math:`|A|^p`, L2-normalised.

    .. math::

        Q = \frac{q}{\lVert q \rVert_2}, \qquad q_{hw} = \frac{1}{C} \sum_{c=1}^{C} |A_{c,h,w}|^p

    The official ``at`` (szagoruyko/attention-transfer, ``utils.py``: ``F.normalize(x.pow(2).mean(1).view(N, -1))``)
    with :math:`p = 2`; the absolute value is the paper's definition and equals the official code for even
    :math:`p`.

    Args:
        features: Feature map ``(N, C, *spatial)``.
        p: Power ``p > 0`` (default 2).

    Returns:
        ``(N, prod(spatial))`` attention maps of unit L2 norm (zero where the map is zero), float32.

    Example:
        >>> import torch
        >>> q = attention_map(torch.randn(2, 8, 4, 4))
        >>> tuple(q.shape), torch.allclose(q.norm(dim=1), torch.ones(2))
        ((2, 16), True)
    """
    _attention_validation(features, "features", p)
    (x,) = as_float32(features)
    with autocast_disabled(x):
        q = x.abs().pow(p).mean(dim=1).flatten(1)
        return F.normalize(q, p=2.0, dim=1)


def attention_transfer_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    p: float = 2.0,
    reduction: MeanReduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Attention transfer between one pair of feature maps: the mean squared difference of their attention maps.

    .. math::

        \ell_i = \frac{1}{HW} \sum_{h,w} \big(Q^s_{i,hw} - Q^t_{i,hw}\big)^2

    with :math:`Q` of :func:`attention_map`. ``"mean"`` is the official ``at_loss``
    (``(at(x) - at(y)).pow(2).mean()``, szagoruyko/attention-transfer); the official total adds
    :math:`\tfrac{\beta}{2}\sum_{\text{groups}}` of it to the cross-entropy with :math:`\beta = 1000`, as
    :class:`~lightning_losses.losses.AttentionTransferLoss` does. The channel counts may differ; the spatial sizes
    must match.

    Args:
        student_features: Student feature map ``(N, C_s, *spatial)``.
        teacher_features: Teacher feature map ``(N, C_t, *spatial)``.
        p: Power of the attention map (default 2).
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (per-sample ``(N,)``).
        validate_args: Check that the features are finite.

    Example:
        >>> import torch
        >>> s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 8, 8)
        >>> loss = attention_transfer_loss(s, t)
        >>> bool(loss > 0), float(attention_transfer_loss(t, t))
        (True, 0.0)
    """
    _attention_validation(student_features, "student_features", p)
    _attention_validation(teacher_features, "teacher_features", p)
    if student_features.shape[0] != teacher_features.shape[0] or (
        student_features.shape[2:] != teacher_features.shape[2:]
    ):
        raise ValueError(
            "`student_features` and `teacher_features` must share the batch size and spatial size (the channels may "
            f"differ), got {tuple(student_features.shape)} and {tuple(teacher_features.shape)}. Pool the larger map "
            "first, e.g. `F.adaptive_avg_pool2d(student_map, teacher_map.shape[-2:])`."
        )
    check_reduction(reduction, _MEAN_REDUCTIONS)
    start_checks(validate_args, (student_features, "student_features"), (teacher_features, "teacher_features")).run()
    qs, qt = _same_dtype(attention_map(student_features, p), attention_map(teacher_features, p))
    with autocast_disabled(qs):
        per_sample = (qs - qt).pow(2).mean(dim=1)
        return _reduce_samples(per_sample, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Relational KD
# --------------------------------------------------------------------------------------------------------------------
def _embeddings_validation(student: Tensor, teacher: Tensor, validate_args: bool) -> tuple[Tensor, Tensor]:
    check_tensor(student, "student_embeddings")
    check_tensor(teacher, "teacher_embeddings")
    if student.ndim < 2 or teacher.ndim < 2:
        raise ValueError(
            "`student_embeddings` and `teacher_embeddings` must have shape (N, D) (extra dimensions are flattened), "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"`student_embeddings` and `teacher_embeddings` must hold the same samples, got batch sizes "
            f"{student.shape[0]} and {teacher.shape[0]}."
        )
    if student.shape[0] < 2:
        raise ValueError(
            f"Relational KD compares samples with each other and needs a batch of at least 2, got {student.shape[0]}."
        )
    start_checks(validate_args, (student, "student_embeddings"), (teacher, "teacher_embeddings")).run()
    es, et = _same_dtype(student.flatten(1), teacher.flatten(1))
    return es, et


def _pairwise_distances(e: Tensor) -> Tensor:
    """The official ``pdist`` (Gram form, clamped at 1e-12 before the square root, zero diagonal)."""
    squared = e.pow(2).sum(dim=1)
    d2 = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(eye, torch.zeros_like(d2), d2.sqrt())


def _mean_normalised_distances(e: Tensor) -> Tensor:
    d = _pairwise_distances(e)
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp_min(1)
    return d / mean.clamp_min(torch.finfo(d.dtype).tiny)


def rkd_distance_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""RKD's distance-wise loss: Huber loss between the mean-normalised pairwise distances of the two embeddings.

    .. math::

        \mathcal{L}_D = \frac{1}{N^2} \sum_{i,j} \ell_\delta\!\left(\frac{\lVert f^s_i - f^s_j\rVert}{\mu_s},
        \frac{\lVert f^t_i - f^t_j\rVert}{\mu_t}\right)

    with :math:`\mu` the mean of the positive distances in the batch and :math:`\ell_\delta` the Huber (smooth L1)
    loss with :math:`\delta = 1`. Official ``RkdDistance`` (lenscloth/RKD, ``metric/loss.py``). Invariant to
    rotations, translations and scalings of either embedding; the widths may differ.

    Example:
        >>> import torch
        >>> e = torch.randn(6, 4)
        >>> float(rkd_distance_loss(3.0 * e + 1.0, e)) < 1e-10
        True
    """
    es, et = _embeddings_validation(student_embeddings, teacher_embeddings, validate_args)
    with autocast_disabled(es):
        ds = _mean_normalised_distances(es)
        dt = _mean_normalised_distances(et.detach())
        return F.smooth_l1_loss(ds, dt, reduction="mean")


def _angles(e: Tensor) -> Tensor:
    difference = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2.0, dim=2)  # [i, j] = unit(e_j - e_i)
    return torch.bmm(difference, difference.transpose(1, 2)).flatten()


def rkd_angle_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""RKD's angle-wise loss: Huber loss between the cosines of the angles every triplet of samples forms.

    .. math::

        \mathcal{L}_A = \frac{1}{N^3} \sum_{i,j,k} \ell_\delta\big(\langle e^s_{ij}, e^s_{ik}\rangle,
        \langle e^t_{ij}, e^t_{ik}\rangle\big), \qquad e_{ij} = \frac{f_j - f_i}{\lVert f_j - f_i\rVert}

    (:math:`e_{ii} = 0`). Official ``RKdAngle`` (lenscloth/RKD, ``metric/loss.py``). Memory
    :math:`O(N^2 D + N^3)`. Invariant to rotations, translations and scalings of either embedding.

    Example:
        >>> import torch
        >>> e = torch.randn(5, 3)
        >>> rotation, _ = torch.linalg.qr(torch.randn(3, 3))
        >>> float(rkd_angle_loss(2.0 * e @ rotation, e)) < 1e-10
        True
    """
    es, et = _embeddings_validation(student_embeddings, teacher_embeddings, validate_args)
    with autocast_disabled(es):
        return F.smooth_l1_loss(_angles(es), _angles(et.detach()), reduction="mean")


def rkd_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    distance_weight: float | Tensor = 25.0,
    angle_weight: float | Tensor = 50.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Relational knowledge distillation: :math:`\lambda_D\,\mathcal{L}_D + \lambda_A\,\mathcal{L}_A`.

    See :func:`rkd_distance_loss` and :func:`rkd_angle_loss`. The defaults :math:`\lambda_D = 25`,
    :math:`\lambda_A = 50` are the paper's classification setting (also RepDistiller's ``RKDLoss``); the official
    metric-learning script (lenscloth/RKD ``run_distill.py``) takes them as ``--dist_ratio`` / ``--angle_ratio``.

    Example:
        >>> import torch
        >>> s, t = torch.randn(8, 4), torch.randn(8, 6)
        >>> expected = 25 * rkd_distance_loss(s, t) + 50 * rkd_angle_loss(s, t)
        >>> bool(torch.isclose(rkd_loss(s, t), expected))
        True
    """
    check_hyperparameter(distance_weight, "distance_weight", low=0.0, validate=validate_args)
    check_hyperparameter(angle_weight, "angle_weight", low=0.0, validate=validate_args)
    distance = rkd_distance_loss(student_embeddings, teacher_embeddings, validate_args=validate_args)
    angle = rkd_angle_loss(student_embeddings, teacher_embeddings, validate_args=False)
    wd = torch.as_tensor(distance_weight, dtype=distance.dtype, device=distance.device)
    wa = torch.as_tensor(angle_weight, dtype=angle.dtype, device=angle.device)
    return wd * distance + wa * angle


# --------------------------------------------------------------------------------------------------------------------
# CRD
# --------------------------------------------------------------------------------------------------------------------
def crd_nce_loss(
    log_scores: Tensor, num_samples: int, reduction: MeanReduction = "mean", *, validate_args: bool = True
) -> Tensor:
    r"""CRD's NCE objective on one side: the positive against :math:`K` negatives drawn uniformly from the data.

    .. math::

        \ell_i = -\log\frac{P_{i0}}{P_{i0} + K/N + \epsilon} - \sum_{k=1}^{K} \log\frac{K/N}{P_{ik} + K/N + \epsilon}

    with :math:`P = \exp(\text{log\_scores})` the normalised critic scores (positive first), :math:`N` the number of
    samples of the data set and :math:`\epsilon = 10^{-7}`. Official ``ContrastLoss`` (HobbitLong/RepDistiller,
    ``crd/criterion.py``, Eq. 18 of the paper), computed from log-scores with ``logaddexp``.

    Args:
        log_scores: ``(B, K + 1)`` log of the normalised scores :math:`\langle v, m\rangle / \tau - \log Z`, the
            positive in column 0.
        num_samples: Size :math:`N` of the data set (of the memory bank).
        reduction: ``"mean"`` (over anchors, the official ``/ bsz``), ``"sum"`` or ``"none"`` (per anchor).
        validate_args: Check that the scores are finite.

    Example:
        >>> import torch
        >>> scores = torch.full((2, 5), -4.0)
        >>> scores[:, 0] = 0.0  # the positive scores higher than the negatives
        >>> bool(crd_nce_loss(scores, 100) < crd_nce_loss(scores.flip(1), 100))
        True
    """
    check_tensor(log_scores, "log_scores")
    if log_scores.ndim != 2 or log_scores.shape[1] < 2:
        raise ValueError(
            f"`log_scores` must have shape (B, K + 1) with the positive first and K >= 1 negatives, got "
            f"{tuple(log_scores.shape)}."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer (the size of the data set), got {num_samples!r}.")
    check_reduction(reduction, _MEAN_REDUCTIONS)
    start_checks(validate_args, (log_scores, "log_scores")).run()
    (x,) = as_float32(log_scores)
    with autocast_disabled(x):
        negatives = x.shape[1] - 1
        noise = negatives / float(num_samples)
        log_denominator = torch.logaddexp(x, x.new_tensor(math.log(noise + _CRD_EPS)))
        positive = x[:, 0] - log_denominator[:, 0]
        negative = (math.log(noise) - log_denominator[:, 1:]).sum(dim=1)
        return _reduce_samples(-(positive + negative), reduction)


def _crd_side_scores(anchor: Tensor, rows: Tensor, temperature: Tensor) -> Tensor:
    return torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature


def crd_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    student_memory_rows: Tensor,
    teacher_memory_rows: Tensor,
    num_samples: int,
    temperature: float | Tensor = 0.07,
    student_log_normalizer: float | Tensor = 0.0,
    teacher_log_normalizer: float | Tensor = 0.0,
    reduction: MeanReduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Contrastive representation distillation: NCE with each network's embedding as anchor against the other's memory.

    .. math::

        \mathcal{L} = \mathrm{NCE}\big(\langle m^t_{\cdot}, v^s\rangle/\tau - \log Z_s\big)
        + \mathrm{NCE}\big(\langle m^s_{\cdot}, v^t\rangle/\tau - \log Z_t\big)

    with :func:`crd_nce_loss`, :math:`v` the L2-normalised embeddings, :math:`m_{\cdot}` the ``K + 1`` memory rows of
    each sample (its own first, then the negatives) and :math:`Z` the normalisation constants. The official
    ``CRDLoss`` with ``ContrastMemory`` (HobbitLong/RepDistiller, ``crd/criterion.py``, ``crd/memory.py``): the student
    anchor is scored against the teacher memory and the teacher anchor against the student memory; the memory rows
    carry no gradient. :class:`~lightning_losses.losses.CRDLoss` holds the embedding heads, the memory bank and
    :math:`Z`, draws the negatives and updates the memory.

    Args:
        student_embeddings: ``(B, D)`` student embeddings (unit norm in the official code).
        teacher_embeddings: ``(B, D)`` teacher embeddings.
        student_memory_rows: ``(B, K + 1, D)`` rows of the student memory, each sample's own row first.
        teacher_memory_rows: ``(B, K + 1, D)`` rows of the teacher memory.
        num_samples: Size of the data set.
        temperature: ``τ > 0`` (official 0.07).
        student_log_normalizer: :math:`\log Z_s` for the student-anchored scores.
        teacher_log_normalizer: :math:`\log Z_t` for the teacher-anchored scores.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per anchor).
        validate_args: Check that the tensors are finite and ``temperature`` positive.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> vs, vt = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
        >>> ms, mt = F.normalize(torch.randn(3, 5, 8), dim=2), F.normalize(torch.randn(3, 5, 8), dim=2)
        >>> loss = crd_loss(vs, vt, ms, mt, num_samples=100)
        >>> tuple(loss.shape), bool(loss > 0)
        ((), True)
    """
    for value, name in (
        (student_embeddings, "student_embeddings"),
        (teacher_embeddings, "teacher_embeddings"),
        (student_memory_rows, "student_memory_rows"),
        (teacher_memory_rows, "teacher_memory_rows"),
    ):
        check_tensor(value, name)
    if student_embeddings.ndim != 2:
        raise ValueError(f"`student_embeddings` must have shape (B, D), got {tuple(student_embeddings.shape)}.")
    check_same_shape(student_embeddings, teacher_embeddings, "student_embeddings", "teacher_embeddings")
    batch, dim = student_embeddings.shape
    for rows, name in ((student_memory_rows, "student_memory_rows"), (teacher_memory_rows, "teacher_memory_rows")):
        if rows.ndim != 3 or rows.shape[0] != batch or rows.shape[2] != dim or rows.shape[1] < 2:
            raise ValueError(
                f"`{name}` must have shape (B={batch}, K + 1, D={dim}) with K >= 1, got {tuple(rows.shape)}."
            )
    check_same_shape(student_memory_rows, teacher_memory_rows, "student_memory_rows", "teacher_memory_rows")
    checks = start_checks(
        validate_args,
        (student_embeddings, "student_embeddings"),
        (teacher_embeddings, "teacher_embeddings"),
        (student_memory_rows, "student_memory_rows"),
        (teacher_memory_rows, "teacher_memory_rows"),
    )
    check_hyperparameter(
        temperature, "temperature", low=0.0, low_inclusive=False, checks=checks, validate=validate_args
    )
    check_hyperparameter(student_log_normalizer, "student_log_normalizer", checks=checks, validate=validate_args)
    check_hyperparameter(teacher_log_normalizer, "teacher_log_normalizer", checks=checks, validate=validate_args)
    checks.run()
    vs, vt, ms, mt = _same_dtype(student_embeddings, teacher_embeddings, student_memory_rows, teacher_memory_rows)
    with autocast_disabled(vs):
        tau = torch.as_tensor(temperature, dtype=vs.dtype, device=vs.device)
        log_zs = torch.as_tensor(student_log_normalizer, dtype=vs.dtype, device=vs.device)
        log_zt = torch.as_tensor(teacher_log_normalizer, dtype=vs.dtype, device=vs.device)
        student_side = _crd_side_scores(vs, mt.detach(), tau) - log_zs
        teacher_side = _crd_side_scores(vt, ms.detach(), tau) - log_zt
        return crd_nce_loss(student_side, num_samples, reduction, validate_args=False) + crd_nce_loss(
            teacher_side, num_samples, reduction, validate_args=False
        )

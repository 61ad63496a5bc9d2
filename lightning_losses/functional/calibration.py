"""Calibration: binned calibration errors, proper scores and train-time calibration losses (pure tensor math).

Every metric takes ``probs`` of shape ``(N, C)`` (multiclass) or ``(N,)`` (binary: the probability of the positive
class) and integer ``target`` of shape ``(N,)``. Pass ``input_type="logits"`` to give logits instead (softmax for
``(N, C)``, sigmoid for ``(N,)``); the choice is explicit, and inputs that contradict it are rejected when that is
detectable. A binary input is turned into the two-column form ``[1 - p, p]``, so the top-label confidence of a
binary problem is ``max(p, 1 - p)`` (never below 0.5), as in the multiclass case.

Equal-width binning puts a confidence ``s`` in bin ``min(floor(s * n_bins), n_bins - 1)``: the bins are
``[0, 1/M), [1/M, 2/M), ..., [(M-1)/M, 1]``, so a confidence of exactly 1.0 lands in the last bin. The binned
statistics (:func:`calibration_bins`) are per-bin sums, which is what makes the streaming metrics of
:mod:`lightning_losses.metrics.calibration` constant-memory and exactly equal to these functions.

Argument checks (as torchmetrics): shapes, dtypes and settings are always checked, without reading tensor values.
``validate_args=True`` (the default) also checks the values: targets inside ``[0, C)``, predictions finite,
probabilities in ``[0, 1]`` with rows summing to 1 (to a tolerance that follows the input dtype: ``1e-3``, or
``2 * eps`` of bfloat16 / float16). ``validate_args=False`` skips those passes (and their device synchronisation).

Empty input: the metrics return 0; the losses return a zero that is connected to the graph (a process whose batch
is empty still takes part in the gradient all-reduce), never NaN.

The batch-level penalties (:func:`mmce_loss`, :func:`mdca_loss`, :func:`dca_loss`) take ``sync_dist``: ``True``
gathers what they need from every process (with gradient, any per-rank batch size) when a process group is
initialised, so a run on ``W`` processes computes the penalty of the concatenated global batch, and DDP's averaged
gradient equals the single-process gradient of that penalty. The functions default to the local batch
(``sync_dist=False``); the loss modules default to ``sync_dist=True``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.utilities.checks import (
    DeferredChecks,
    check_choice,
    check_hyperparameter,
    check_int,
    check_targets,
    finite_error,
)
from lightning_losses.utilities.distributed import all_gather_rows, all_reduce, rank_and_world_size
from lightning_losses.utilities.numerics import as_float32, hyperparameter_tensor

__all__ = [
    "adaptive_focal_loss",
    "average_calibration_error",
    "brier_score",
    "calibration_bins",
    "calibration_error_from_bins",
    "classwise_calibration_error",
    "conformal_class_scores",
    "conformal_quantile",
    "conformal_scores",
    "dca_loss",
    "debiased_calibration_error",
    "expected_calibration_error",
    "focal_loss",
    "ks_calibration_error",
    "label_smoothing_loss",
    "mdca_loss",
    "mmce_loss",
    "negative_log_likelihood",
    "prediction_sets",
    "smooth_calibration_error",
    "to_probabilities",
]

InputType = Literal["probs", "logits"]
Norm = Literal["l1", "l2", "max"]
Binning = Literal["uniform", "quantile"]

_SUM_TOL = 1e-3


def _sum_tolerance(dtype: torch.dtype) -> float:
    """Tolerance of a probability row's sum: ``1e-3``, or twice the machine epsilon of a half-precision input."""
    return max(_SUM_TOL, 2 * torch.finfo(dtype).eps)


def _check_predictions(x: object, label: str) -> None:
    """Type, dtype and shape of multiclass ``(N, C)`` or binary ``(N,)`` predictions (``label`` names them)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{label} must be a floating-point tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{label} must be a floating-point tensor, got dtype {x.dtype}.")
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] < 2):
        raise ValueError(
            f"{label} must have shape (N, C) with C >= 2, or (N,) for a binary problem, got {tuple(x.shape)}."
        )


def to_probabilities(
    probs: Tensor, input_type: InputType = "probs", validate_args: bool = True, *, validate: bool | None = None
) -> Tensor:
    """Validate predictions and return class probabilities of shape ``(N, C)`` in float32 (or float64).

    Args:
        probs: ``(N, C)`` multiclass or ``(N,)`` binary predictions (probabilities or logits).
        input_type: ``"probs"`` or ``"logits"``.
        validate_args: Check values (finite, in range, rows summing to 1, logits that are probabilities). Shapes
            and dtypes are always checked; ``False`` saves the passes over the ``N × C`` values (streaming metrics
            with ``validate_args=False``).
        validate: Deprecated name of ``validate_args`` (warns).

    Raises:
        ValueError: On a wrong shape, non-finite values, probabilities outside [0, 1] or rows not summing to 1,
            or logits that are in fact probabilities.

    Example:
        >>> to_probabilities(torch.tensor([0.2, 0.9]))
        tensor([[0.8000, 0.2000],
                [0.1000, 0.9000]])
    """
    if validate is not None:
        warnings.warn(
            "to_probabilities(validate=...) is deprecated: pass validate_args=... instead.", DeprecationWarning, 2
        )
        validate_args = validate
    if not isinstance(validate_args, bool):
        raise TypeError(f"`validate_args` must be True or False, got {validate_args!r}.")
    validate = validate_args
    if input_type not in ("probs", "logits"):
        raise ValueError(f"`input_type` must be 'probs' or 'logits', got {input_type!r}.")
    _check_predictions(probs, "`probs` (the predictions)")
    tol = _sum_tolerance(probs.dtype)
    (x,) = as_float32(probs)
    if not validate:
        if input_type == "logits":
            if x.ndim == 1:
                p = torch.sigmoid(x)
                return torch.stack([1 - p, p], dim=1)
            return torch.softmax(x, dim=1)
        return torch.stack([1 - x, x], dim=1) if x.ndim == 1 else x
    if x.numel():
        low, high = (float(v) for v in torch.aminmax(x))  # one pass: NaN and inf show up in the extremes
    else:
        low, high = 0.0, 1.0
    if not (math.isfinite(low) and math.isfinite(high)):
        error = finite_error(x, "probs")
        if error is not None:
            raise error
    if input_type == "logits":
        if x.ndim == 1:
            p = torch.sigmoid(x)
            return torch.stack([1 - p, p], dim=1)
        if x.numel() and low >= 0 and high <= 1 and bool(((x.sum(dim=1) - 1).abs() < tol).all()):
            raise ValueError(
                "`probs` with `input_type='logits'`: every row lies in [0, 1] and sums to 1, these look like "
                "probabilities. Pass input_type='probs' (or pass the logits themselves)."
            )
        return torch.softmax(x, dim=1)
    _check_probability_range(low, high)
    if x.ndim == 1:
        return torch.stack([1 - x, x], dim=1)
    _check_rows_sum_to_one(x, tol)
    return x


def _check_probability_range(low: float, high: float) -> None:
    """Probabilities in ``[0, 1]``, given the smallest and largest value (finite: checked before)."""
    if low < 0 or high > 1:
        raise ValueError(
            f"`probs` with `input_type='probs'` lie outside [0, 1] (min {low:.4g}, max {high:.4g}). "
            "These look like logits: pass input_type='logits'."
        )


def _check_rows_sum_to_one(x: Tensor, tol: float) -> None:
    """Rows of ``(N, C)`` probabilities sum to 1 within ``tol`` (one pass over the values)."""
    if x.numel():
        deviation = float((x.sum(dim=1) - 1).abs().max())
        if deviation > tol:
            raise ValueError(
                f"`probs` with `input_type='probs'`: rows do not sum to 1 (largest deviation {deviation:.3g}). Pass "
                "normalised probabilities, or input_type='logits' for unnormalised scores."
            )


def _prepare(probs: Tensor, target: Tensor, input_type: InputType, validate: bool = True) -> Tensor:
    p = to_probabilities(probs, input_type, validate)
    check_targets(target, p.shape[1], p.shape[0], validate=validate)
    return p


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")


def _check_options(n_bins: int, norm: str = "l1", binning: str = "uniform") -> None:
    _check_bins(n_bins)
    check_choice("norm", norm, ("l1", "l2", "max"))
    check_choice("binning", binning, ("uniform", "quantile"))


def _bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    return (confidence * n_bins).floor().long().clamp_(0, n_bins - 1)


def _binned_sums(confidence: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin ``(count, sum of confidences, sum of correct)`` in float64 over the last dimension."""
    idx = _bin_index(confidence, n_bins)
    shape = (*confidence.shape[:-1], n_bins)
    dev = confidence.device
    count = torch.zeros(shape, dtype=torch.float64, device=dev).scatter_add_(
        -1, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    conf = torch.zeros(shape, dtype=torch.float64, device=dev).scatter_add_(-1, idx, confidence.double())
    acc = torch.zeros(shape, dtype=torch.float64, device=dev).scatter_add_(-1, idx, correct.double())
    return count, conf, acc


# Intra-op threads up to which numpy's argmax (SIMD-vectorised, one thread) beats torch's CPU argmax (a scalar loop,
# split over threads): about 3.5x faster on one thread, 1.2x on two; torch's is used from three threads on.
_NUMPY_ARGMAX_MAX_THREADS = 2


def _top_label(p: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence and prediction of ``(N, C)`` probabilities, exactly ``p.max(dim=1)``.

    The prediction is the index of the first maximum of each row (NaN counts as the maximum, as in ``torch.max``)
    and the confidence the value there. On CPU, with few intra-op threads, numpy's vectorised argmax finds the
    index and a gather reads the value; elsewhere ``torch.max`` gives both.
    """
    if (
        p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.float64)
        and p.ndim == 2
        and p.numel()
        and not p.is_neg()
        and torch.get_num_threads() <= _NUMPY_ARGMAX_MAX_THREADS
    ):
        prediction = torch.from_numpy(np.argmax(p.detach().numpy(), axis=1)).long()
        return p.gather(1, prediction[:, None]).squeeze(1), prediction
    confidence, prediction = p.max(dim=1)
    return confidence, prediction


def _top_label_bins(confidence: Tensor, prediction: Tensor, target: Tensor, n_bins: int) -> Tensor:
    """Per-bin sums of top-label predictions: rows ``(count, sum of confidences, sum of correct)``, float64
    ``(3, n_bins)``.

    The same bins and sums as :func:`_binned_sums` of ``(confidence, prediction == target)``, bit for bit. On CPU
    (float32 / float64 confidences) numpy does the ``O(N)`` work with fewer, cheaper calls: ``bincount`` adds the
    float64 confidences in sample order, as ``scatter_add_`` does, and the count and the number of correct
    predictions come from one ``bincount`` of ``2 * bin + correct`` (integers, exact). Elsewhere (e.g. CUDA)
    :func:`_binned_sums` itself.
    """
    if (
        confidence.device.type != "cpu"
        or target.device.type != "cpu"
        or confidence.dtype not in (torch.float32, torch.float64)
        or confidence.is_neg()
    ):
        return torch.stack(_binned_sums(confidence, (prediction == target).to(confidence.dtype), n_bins))
    conf = confidence.detach().numpy()
    # Clipped in floating point first (fmax maps NaN to 0), so the cast is defined; truncation = floor on [0, M - 1].
    scaled = conf * n_bins
    np.fmax(scaled, 0, out=scaled)
    np.fmin(scaled, n_bins - 1, out=scaled)
    idx = scaled.astype(np.int64)
    key = idx * 2
    key += prediction.numpy() == target.numpy()
    split = np.bincount(key, minlength=2 * n_bins)
    out = np.empty((3, n_bins), dtype=np.float64)
    np.add(split[0::2], split[1::2], out=out[0])
    out[1] = np.bincount(idx, weights=conf, minlength=n_bins)
    out[2] = split[1::2]
    return torch.from_numpy(out)


def _top_label_bin_sums(p: Tensor, target: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, confidence_sum, correct_sum)`` of the top-label bins of prepared ``(N, C)`` probabilities."""
    count, conf, acc = _top_label_bins(*_top_label(p), target, n_bins)
    return count, conf, acc


def _check_top_label_inputs(
    p: Tensor, confidence: Tensor, target: Tensor, validate: bool, input_dtype: torch.dtype
) -> None:
    """The checks of :func:`_prepare` on ``(N, C)`` probabilities whose row maxima ``confidence`` are known.

    ``input_dtype`` is the dtype the predictions were given in (it sets the tolerance of the row sums).

    The largest value is the largest row maximum, so only the smallest value and the row sums read the ``N × C``
    values again (two passes, rather than three with ``aminmax``); the errors and their order are those of
    :func:`to_probabilities` followed by :func:`~lightning_losses.utilities.checks.check_targets`.
    """
    if not isinstance(validate, bool):
        raise TypeError(f"`validate_args` must be True or False, got {validate!r}.")
    if validate and p.numel():
        low, high = float(p.amin()), float(confidence.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            error = finite_error(p, "probs")
            if error is not None:
                raise error
        _check_probability_range(low, high)
        _check_rows_sum_to_one(p, _sum_tolerance(input_dtype))
    check_targets(target, p.shape[1], p.shape[0], validate=validate)


def calibration_bins(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    input_type: InputType = "probs",
    classwise: bool = False,
    validate_args: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-width bin statistics: per-bin sample count, sum of confidences and sum of correct predictions.

    Top-label (default): the confidence is the maximum probability and "correct" means argmax equals the target.
    ``classwise=True``: one row per class ``k``, the confidence is ``p_k`` and "correct" means ``target == k``.

    Returns:
        ``(count, confidence_sum, correct_sum)``, float64, each of shape ``(n_bins,)`` or ``(C, n_bins)``.

    Example:
        >>> count, conf, acc = calibration_bins(torch.tensor([[0.1, 0.9], [0.0, 1.0]]), torch.tensor([1, 0]), 2)
        >>> count.tolist(), conf.tolist(), acc.tolist()
        ([0.0, 2.0], [0.0, 1.899999976158142], [0.0, 1.0])
    """
    _check_bins(n_bins)
    p = _prepare(probs, target, input_type, validate_args)
    if classwise:
        onehot = F.one_hot(target, p.shape[1]).to(p.dtype)
        return _binned_sums(p.t(), onehot.t(), n_bins)
    return _top_label_bin_sums(p, target, n_bins)


def calibration_error_from_bins(
    count: Tensor, conf_sum: Tensor, acc_sum: Tensor, norm: Norm = "l1", validate_args: bool = True
) -> Tensor:
    r"""Calibration error from per-bin sums (last dimension = bins), as in :func:`expected_calibration_error`.

    .. math::
        \mathrm{ECE} = \sum_b \frac{n_b}{N}\,\Big\lvert \frac{A_b}{n_b} - \frac{S_b}{n_b} \Big\rvert

    with :math:`n_b` = ``count``, :math:`S_b` = ``conf_sum`` (sum of confidences) and :math:`A_b` = ``acc_sum``
    (number of correct predictions) of bin ``b``. Empty bins contribute nothing. Returns float64 (one value per
    leading row).

    Args:
        count, conf_sum, acc_sum: Per-bin sums of the same shape (:func:`calibration_bins`).
        norm: ``"l1"``, ``"l2"`` or ``"max"``.
        validate_args: Check the values: finite, ``count >= 0`` and ``0 <= conf_sum, acc_sum <= count`` (to a
            relative tolerance of ``1e-6``). ``False`` skips that pass.

    Example:
        >>> count, conf, acc = torch.tensor([2.0, 0.0]), torch.tensor([1.8, 0.0]), torch.tensor([1.0, 0.0])
        >>> round(float(calibration_error_from_bins(count, conf, acc)), 4)
        0.4
    """
    check_choice("norm", norm, ("l1", "l2", "max"))
    for name, t in (("count", count), ("conf_sum", conf_sum), ("acc_sum", acc_sum)):
        if not isinstance(t, Tensor) or t.ndim == 0:
            raise ValueError(f"`{name}` must be a tensor of per-bin sums (bins in the last dimension), got {t!r}.")
    if not count.shape == conf_sum.shape == acc_sum.shape:
        raise ValueError(
            "`count`, `conf_sum` and `acc_sum` must have the same shape, got "
            f"{tuple(count.shape)}, {tuple(conf_sum.shape)} and {tuple(acc_sum.shape)}."
        )
    if validate_args:
        _check_bin_values(count, conf_sum, acc_sum)
    total = count.sum(dim=-1, keepdim=True).clamp_min(1)
    safe = count.clamp_min(1)
    gap = (acc_sum / safe - conf_sum / safe).abs()
    weight = count / total
    if norm == "l1":
        return (weight * gap).sum(dim=-1)
    if norm == "l2":
        return (weight * gap**2).sum(dim=-1).sqrt()
    if norm == "max":
        return torch.where(count > 0, gap, torch.zeros_like(gap)).amax(dim=-1)


def _check_bin_values(count: Tensor, conf_sum: Tensor, acc_sum: Tensor) -> None:
    """Value checks of per-bin sums (finite; ``0 <= sums <= count``)."""
    for name, t in (("count", count), ("conf_sum", conf_sum), ("acc_sum", acc_sum)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` holds non-finite values (NaN or inf). Per-bin sums must be finite.")
    c = count.double()
    if bool((c < 0).any()):
        raise ValueError(f"`count` must be >= 0 in every bin, got a minimum of {float(c.min()):.4g}.")
    slack = 1e-6 * c.clamp_min(1)
    for name, t in (("conf_sum", conf_sum), ("acc_sum", acc_sum)):
        d = t.double()
        if bool(((d < -slack) | (d > c + slack)).any()):
            raise ValueError(
                f"`{name}` must lie in [0, count] in every bin (a sum of values in [0, 1] over the bin's samples). "
                "Pass (count, conf_sum, acc_sum) in that order, as calibration_bins returns them."
            )


def _equal_mass_error(confidence: Tensor, correct: Tensor, n_bins: int, norm: Norm) -> Tensor:
    order = confidence.argsort(stable=True)
    conf_sorted, correct_sorted = confidence[order].double(), correct[order].double()
    n = confidence.shape[0]
    chunks = min(n_bins, max(n, 1))
    count = torch.zeros(chunks, dtype=torch.float64, device=confidence.device)
    conf_sum, acc_sum = torch.zeros_like(count), torch.zeros_like(count)
    for b, (c, a) in enumerate(zip(conf_sorted.tensor_split(chunks), correct_sorted.tensor_split(chunks))):
        count[b], conf_sum[b], acc_sum[b] = c.numel(), c.sum(), a.sum()
    return calibration_error_from_bins(count, conf_sum, acc_sum, norm, validate_args=False)


def expected_calibration_error(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    norm: Norm = "l1",
    binning: Binning = "uniform",
    input_type: InputType = "probs",
    validate_args: bool = True,
) -> Tensor:
    r"""Top-label expected calibration error (ECE) with equal-width or equal-mass bins.

    .. math::
        \mathrm{ECE}_{\ell_1} = \sum_{b} \frac{n_b}{N}\,\lvert \mathrm{acc}_b - \mathrm{conf}_b \rvert,\quad
        \mathrm{ECE}_{\ell_2} = \Big(\sum_{b} \frac{n_b}{N}(\mathrm{acc}_b - \mathrm{conf}_b)^2\Big)^{1/2},\quad
        \mathrm{MCE} = \max_{b:\,n_b>0} \lvert \mathrm{acc}_b - \mathrm{conf}_b \rvert

    Args:
        probs: ``(N, C)`` or binary ``(N,)`` probabilities (or logits with ``input_type="logits"``).
        target: ``(N,)`` integer class indices.
        n_bins: Number of bins.
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).
        binning: ``"uniform"`` (equal-width bins) or ``"quantile"`` (equal-mass bins: the sorted confidences are
            split into ``n_bins`` groups whose sizes differ by at most one; ties may straddle two bins).
        input_type: ``"probs"`` or ``"logits"``.

    Returns:
        A float32 scalar (float64 when the input is float64).

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
        >>> round(float(expected_calibration_error(probs, torch.tensor([0, 1, 1, 1]), n_bins=5)), 4)
        0.35
    """
    _check_options(n_bins, norm, binning)
    p = _prepare(probs, target, input_type, validate_args)
    out_dtype = p.dtype
    confidence, prediction = _top_label(p)
    correct = (prediction == target).to(p.dtype)
    if binning == "uniform":
        err = calibration_error_from_bins(*_binned_sums(confidence, correct, n_bins), norm=norm, validate_args=False)
    elif binning == "quantile":
        err = _equal_mass_error(confidence, correct, n_bins, norm)
    else:
        raise ValueError(f"`binning` must be 'uniform' or 'quantile', got {binning!r}.")
    return err.to(out_dtype)


def classwise_calibration_error(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    norm: Norm = "l1",
    binning: Binning = "uniform",
    input_type: InputType = "probs",
    validate_args: bool = True,
) -> Tensor:
    r"""Classwise ECE: the calibration error of every one-vs-rest problem ``(p_k, 1[y = k])``, averaged over classes.

    .. math::
        \mathrm{cwECE} = \frac{1}{C}\sum_{k=1}^{C}\sum_{b}\frac{n_{k,b}}{N}\,
        \lvert \bar{y}_{k,b} - \bar{p}_{k,b} \rvert

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> round(float(classwise_calibration_error(probs, torch.tensor([0, 1]), n_bins=10)), 4)
        0.15
    """
    _check_options(n_bins, norm, binning)
    p = _prepare(probs, target, input_type, validate_args)
    onehot = F.one_hot(target, p.shape[1]).to(p.dtype)
    if binning == "uniform":
        per_class = calibration_error_from_bins(
            *_binned_sums(p.t(), onehot.t(), n_bins), norm=norm, validate_args=False
        )
    elif binning == "quantile":
        per_class = torch.stack([_equal_mass_error(p[:, k], onehot[:, k], n_bins, norm) for k in range(p.shape[1])])
    else:
        raise ValueError(f"`binning` must be 'uniform' or 'quantile', got {binning!r}.")
    return per_class.mean().to(p.dtype)


def average_calibration_error(
    probs: Tensor, target: Tensor, n_bins: int = 15, input_type: InputType = "probs", validate_args: bool = True
) -> Tensor:
    r"""Average calibration error (ACE): the unweighted mean gap over the non-empty equal-width bins.

    .. math::
        \mathrm{ACE} = \frac{1}{\lvert\{b: n_b > 0\}\rvert}\sum_{b:\,n_b>0}\lvert \mathrm{acc}_b - \mathrm{conf}_b\rvert

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
        >>> round(float(average_calibration_error(probs, torch.tensor([0, 1, 1, 1]), n_bins=5)), 4)
        0.35
    """
    _check_bins(n_bins)
    p = _prepare(probs, target, input_type, validate_args)
    return _ace_from_bins(*_top_label_bin_sums(p, target, n_bins)).to(p.dtype)


def _ace_from_bins(count: Tensor, conf_sum: Tensor, acc_sum: Tensor) -> Tensor:
    filled = count > 0
    gap = (acc_sum - conf_sum).abs() / count.clamp_min(1)
    return gap[filled].sum() / filled.sum().clamp_min(1)


def debiased_calibration_error(
    probs: Tensor,
    target: Tensor,
    n_bins: int = 15,
    input_type: InputType = "probs",
    squared: bool = False,
    validate_args: bool = True,
) -> Tensor:
    r"""Debiased l2 calibration error (Kumar et al., 2019) with equal-width bins.

    The plug-in squared error over-estimates with few samples per bin; subtracting each bin's sampling variance of
    the accuracy removes that bias:

    .. math::
        \widehat{\mathrm{CE}}^2 = \sum_b \frac{n_b}{N}\Big[(\bar{y}_b - \bar{s}_b)^2
        - \frac{\bar{y}_b(1 - \bar{y}_b)}{n_b - 1}\Big]

    (bins with one sample keep the plug-in term). The squared estimate may be negative; the unsquared value is
    ``sqrt(max(estimate, 0))``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
        >>> round(float(debiased_calibration_error(probs, torch.tensor([0, 1, 1, 1]), 10, squared=True)), 4)
        0.035
    """
    _check_bins(n_bins)
    p = _prepare(probs, target, input_type, validate_args)
    return _debiased_from_bins(*_top_label_bin_sums(p, target, n_bins), squared=squared).to(p.dtype)


def _debiased_from_bins(count: Tensor, conf_sum: Tensor, acc_sum: Tensor, squared: bool) -> Tensor:
    total = count.sum().clamp_min(1)
    safe = count.clamp_min(1)
    acc, conf = acc_sum / safe, conf_sum / safe
    variance = torch.where(count > 1, acc * (1 - acc) / (count - 1).clamp_min(1), torch.zeros_like(acc))
    estimate = (count / total * ((acc - conf) ** 2 - variance)).sum()
    return estimate if squared else estimate.clamp_min(0).sqrt()


def ks_calibration_error(
    probs: Tensor, target: Tensor, input_type: InputType = "probs", validate_args: bool = True
) -> Tensor:
    r"""Kolmogorov-Smirnov calibration error (Gupta et al., 2021): binning-free, top-label.

    Sort the samples by confidence ``s``; with correctness ``c`` (tied confidences form one step):

    .. math::
        \mathrm{KS} = \max_i \Big\lvert \frac{1}{N}\sum_{j \le i} (c_j - s_j) \Big\rvert

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
        >>> round(float(ks_calibration_error(probs, torch.tensor([0, 1]))), 4)
        0.4
    """
    p = _prepare(probs, target, input_type, validate_args)
    confidence, prediction = _top_label(p)
    if confidence.numel() == 0:
        return confidence.new_zeros(())
    return _ks_from_samples(confidence, (prediction == target).to(p.dtype)).to(p.dtype)


def _ks_from_samples(confidence: Tensor, correct: Tensor) -> Tensor:
    """KS error in float64; tied confidences are one step of the curve (evaluated at the end of each tie group)."""
    if confidence.numel() == 0:
        return confidence.new_zeros((), dtype=torch.float64)
    order = confidence.argsort(stable=True)
    sorted_conf = confidence[order]
    curve = (correct.double()[order] - sorted_conf.double()).cumsum(0) / confidence.numel()
    group_end = torch.ones_like(sorted_conf, dtype=torch.bool)
    group_end[:-1] = sorted_conf[1:] != sorted_conf[:-1]
    return curve[group_end].abs().max()


def brier_score(probs: Tensor, target: Tensor, input_type: InputType = "probs", validate_args: bool = True) -> Tensor:
    r"""Brier score: mean squared distance between the predicted distribution and the one-hot target.

    .. math::
        \mathrm{BS} = \frac{1}{N}\sum_i \sum_k (p_{ik} - \mathbb{1}[y_i = k])^2

    For a binary ``(N,)`` input the score is the usual ``mean((p - y)^2)`` (half the two-column sum).

    Example:
        >>> round(float(brier_score(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 0]))), 4)
        0.25
    """
    p = _prepare(probs, target, input_type, validate_args)
    per_sample = ((p - F.one_hot(target, p.shape[1]).to(p.dtype)) ** 2).sum(dim=1)
    if probs.ndim == 1:
        per_sample = per_sample / 2
    return per_sample.mean() if per_sample.numel() else per_sample.new_zeros(())


def negative_log_likelihood(
    probs: Tensor, target: Tensor, input_type: InputType = "probs", eps: float = 0.0, validate_args: bool = True
) -> Tensor:
    r"""Mean negative log-likelihood of the target class, :math:`-\frac{1}{N}\sum_i \log p_{i,y_i}`.

    From logits it is computed with ``log_softmax`` (or ``logsigmoid``) in float32; from probabilities
    ``eps`` clamps them away from 0 (a zero probability on the target gives ``inf`` when ``eps=0``).

    Example:
        >>> round(float(negative_log_likelihood(torch.tensor([[0.0, 0.0]]), torch.tensor([1]), "logits")), 4)
        0.6931
    """
    check_hyperparameter(eps, "eps", low=0.0, high=1.0)
    if input_type == "logits":
        to_probabilities(probs, "logits", validate_args)  # validation only
        (x,) = as_float32(probs)
        logp = torch.stack([F.logsigmoid(-x), F.logsigmoid(x)], dim=1) if x.ndim == 1 else F.log_softmax(x, dim=1)
        check_targets(target, logp.shape[1], logp.shape[0], validate=validate_args)
    else:
        p = _prepare(probs, target, input_type, validate_args)
        logp = p.clamp_min(eps).log() if eps > 0 else p.log()
    picked = -logp.gather(1, target[:, None]).squeeze(1)
    return picked.mean() if picked.numel() else picked.new_zeros(())


# --------------------------------------------------------------------------- train-time calibration losses


def _check_loss_inputs(logits: Tensor, target: Tensor) -> None:
    """Types and shapes of ``(N, C)`` logits and ``(N,)`` targets (no value read)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"`logits` must be a floating-point tensor of shape (N, C), got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise ValueError(f"`logits` must be a floating-point tensor of shape (N, C), got dtype {logits.dtype}.")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"`logits` must have shape (N, C), got {tuple(logits.shape)}.")
    check_targets(target, logits.shape[1], logits.shape[0], validate=False)


def _logits_and_target(
    logits: Tensor, target: Tensor, validate_args: bool = True, checks: DeferredChecks | None = None
) -> Tensor:
    """Check ``(N, C)`` logits and ``(N,)`` targets; with ``validate_args`` also the values: targets in range and
    finite logits, after the checks already queued on ``checks`` (one synchronisation for all)."""
    _check_loss_inputs(logits, target)
    checks = checks if checks is not None else DeferredChecks()
    if validate_args:
        check_targets(target, logits.shape[1], logits.shape[0], checks=checks)
        checks.require_finite(logits, "logits")
    checks.run()
    (x,) = as_float32(logits)
    return x


def _empty_loss(x: Tensor) -> Tensor:
    """A zero connected to the graph of ``x`` (an empty batch still takes part in a gradient all-reduce)."""
    return x.sum() * 0.0


def _hyper(
    value: float | Tensor,
    like: Tensor,
    name: str,
    checks: DeferredChecks,
    validate: bool,
    *,
    low: float = 0.0,
    high: float | None = None,
) -> Tensor:
    """A hyperparameter in ``[low, high]`` as a scalar or per-sample tensor; a tensor's values queued on ``checks``."""
    return hyperparameter_tensor(value, like, name, low=low, high=high, checks=checks, validate=validate)


def _focal(x: Tensor, target: Tensor, g: Tensor) -> Tensor:
    logp = F.log_softmax(x, dim=1).gather(1, target[:, None]).squeeze(1)
    # (1 - p)^gamma with the convention 0^0 = 1 (gamma = 0 gives cross-entropy even at p = 1).
    one_minus_p = (-torch.expm1(logp)).clamp_min(0)
    weight = torch.where(g == 0, torch.ones_like(one_minus_p), one_minus_p.pow(g))
    loss = -(weight * logp)
    return loss.mean() if loss.numel() else _empty_loss(x)


def focal_loss(logits: Tensor, target: Tensor, gamma: float | Tensor = 3.0, validate_args: bool = True) -> Tensor:
    r"""Focal loss (Lin et al., 2017), shown by Mukhoti et al. (2020) to improve calibration.

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_i (1 - p_{i,y_i})^{\gamma_i}\,\log p_{i,y_i}

    Args:
        logits: ``(N, C)`` logits.
        target: ``(N,)`` class indices.
        gamma: Focusing parameter ``>= 0``: a number or a tensor (scalar or one value per sample).
            ``gamma = 0`` is cross-entropy.
        validate_args: Check the values (targets in range, finite logits, tensor ``gamma``); see the module
            docstring.

    Example:
        >>> logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> bool(torch.isclose(focal_loss(logits, target, 0.0), F.cross_entropy(logits, target)))
        True
    """
    _check_loss_inputs(logits, target)
    checks = DeferredChecks()
    g = _hyper(gamma, logits[:, 0], "gamma", checks, validate_args)
    x = _logits_and_target(logits, target, validate_args, checks)
    return _focal(x, target, g.to(x.dtype))


def adaptive_focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma_low: float | Tensor = 5.0,
    gamma_high: float | Tensor = 3.0,
    threshold: float | Tensor = 0.2,
    validate_args: bool = True,
) -> Tensor:
    r"""Sample-dependent focal loss FLSD (Mukhoti et al., 2020): ``gamma_low`` where ``p_y < threshold`` else
    ``gamma_high`` (the paper's FLSD-53 is 5 / 3 / 0.2). The choice uses the detached probability.

    .. math::
        \gamma_i = \begin{cases}\gamma_{\mathrm{low}} & p_{i,y_i} < t\\ \gamma_{\mathrm{high}} & \text{otherwise}
        \end{cases},\qquad \mathcal{L} = \mathrm{focal}(z, y; \gamma_i)

    Example:
        >>> logits, target = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([1, 1])
        >>> manual = focal_loss(logits, target, torch.tensor([5.0, 3.0]))
        >>> bool(torch.isclose(adaptive_focal_loss(logits, target), manual))
        True
    """
    _check_loss_inputs(logits, target)
    checks, like = DeferredChecks(), logits[:, 0]
    low = _hyper(gamma_low, like, "gamma_low", checks, validate_args)
    high = _hyper(gamma_high, like, "gamma_high", checks, validate_args)
    t = _hyper(threshold, like, "threshold", checks, validate_args, high=1.0)
    x = _logits_and_target(logits, target, validate_args, checks)
    return _adaptive_focal(x, target, low.to(x.dtype), high.to(x.dtype), t.to(x.dtype))


def _adaptive_focal(x: Tensor, target: Tensor, low: Tensor, high: Tensor, t: Tensor) -> Tensor:
    with torch.no_grad():
        p_true = F.softmax(x, dim=1).gather(1, target[:, None]).squeeze(1)
        gamma = torch.where(p_true < t, low, high).expand_as(p_true)
    return _focal(x, target, gamma)


def label_smoothing_loss(
    logits: Tensor, target: Tensor, smoothing: float | Tensor = 0.1, validate_args: bool = True
) -> Tensor:
    r"""Cross-entropy against the smoothed target ``(1 - ε)·onehot + ε/C`` (Szegedy et al., 2016).

    .. math::
        \mathcal{L} = \frac{1}{N}\sum_i \Big[-(1-\varepsilon_i)\log p_{i,y_i}
        - \frac{\varepsilon_i}{C}\sum_k \log p_{ik}\Big]

    Args:
        smoothing: ``ε`` in ``[0, 1]``: a number or a tensor (scalar or per-sample).

    Example:
        >>> logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> ref = F.cross_entropy(logits, target, label_smoothing=0.2)
        >>> bool(torch.isclose(label_smoothing_loss(logits, target, 0.2), ref))
        True
    """
    _check_loss_inputs(logits, target)
    checks = DeferredChecks()
    eps = _hyper(smoothing, logits[:, 0], "smoothing", checks, validate_args, high=1.0)
    x = _logits_and_target(logits, target, validate_args, checks)
    return _label_smoothing(x, target, eps.to(x.dtype))


def _label_smoothing(x: Tensor, target: Tensor, eps: Tensor) -> Tensor:
    logp = F.log_softmax(x, dim=1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    loss = (1 - eps) * nll + eps * uniform
    return loss.mean() if loss.numel() else _empty_loss(x)


# ----------------------------------------------------------------- batch-level penalties, optionally global


def _world_size(sync_dist: bool) -> int:
    return rank_and_world_size()[1] if sync_dist else 1


def _check_bandwidth(bandwidth: float | Tensor, checks: DeferredChecks, validate: bool) -> None:
    if isinstance(bandwidth, Tensor) and bandwidth.ndim != 0:
        raise ValueError(f"`bandwidth` must be a positive scalar, got a tensor of shape {tuple(bandwidth.shape)}.")
    check_hyperparameter(bandwidth, "bandwidth", low=0.0, low_inclusive=False, checks=checks, validate=validate)


def mmce_loss(
    logits: Tensor,
    target: Tensor,
    bandwidth: float | Tensor = 0.4,
    sync_dist: bool = False,
    validate_args: bool = True,
) -> Tensor:
    r"""Maximum mean calibration error (Kumar et al., 2018) with a Laplacian kernel on the top-label confidences.

    .. math::
        \mathrm{MMCE}^2 = \frac{1}{N^2}\sum_{i,j}(c_i - r_i)(c_j - r_j)\,
        \exp\!\Big(-\frac{\lvert r_i - r_j\rvert}{h}\Big),\qquad \mathcal{L} = \sqrt{\mathrm{MMCE}^2}

    with ``r_i`` the top-label confidence and ``c_i = 1`` when the prediction is correct (the unweighted
    estimator). Add it to cross-entropy with a weight (:class:`~lightning_losses.losses.MMCELoss` does).

    Args:
        logits: ``(N, C)`` logits.
        target: ``(N,)`` class indices.
        bandwidth: Kernel width ``h > 0``.
        sync_dist: Compute over the global batch: every process's ``(r_i, c_i)`` are gathered (with gradient,
            padded to the largest local batch) when a process group is initialised. Collective: call it on
            every process.
        validate_args: Check the values (targets in range, finite logits).

    Returns:
        The penalty; ``0`` (connected to the graph) for an empty (global) batch.

    Example:
        >>> float(mmce_loss(torch.tensor([[10.0, -10.0]]), torch.tensor([0]))) < 1e-4
        True
    """
    checks = DeferredChecks()
    _check_bandwidth(bandwidth, checks, validate_args)
    x = _logits_and_target(logits, target, validate_args, checks)
    return _mmce(x, target, bandwidth, sync_dist)


def _mmce(x: Tensor, target: Tensor, bandwidth: float | Tensor, sync_dist: bool) -> Tensor:
    p = F.softmax(x, dim=1)
    r, prediction = p.max(dim=1)
    c = (prediction == target).to(p.dtype)
    if _world_size(sync_dist) > 1:
        both = all_gather_rows(torch.stack([r, c], dim=1), grad=True)
        r, c = both[:, 0], both[:, 1]
    if r.shape[0] == 0:
        return _empty_loss(x)
    h = torch.as_tensor(bandwidth, dtype=p.dtype, device=p.device)
    kernel = torch.exp(-(r[:, None] - r[None, :]).abs() / h)
    d = c - r
    n = r.shape[0]
    mmce2 = (d[:, None] * d[None, :] * kernel).sum() / n**2
    return (mmce2.clamp_min(0) + 1e-12).sqrt()


def mdca_loss(logits: Tensor, target: Tensor, sync_dist: bool = False, validate_args: bool = True) -> Tensor:
    r"""Multi-class difference in confidence and accuracy (Hebbalaguppe et al., 2022).

    .. math::
        \mathcal{L}_{\mathrm{MDCA}} = \frac{1}{C}\sum_{k=1}^{C}\Big\lvert\frac{1}{N}\sum_i p_{ik}
        - \frac{1}{N}\sum_i \mathbb{1}[y_i = k]\Big\rvert

    ``sync_dist=True`` sums the per-class sums and ``N`` over the processes (with gradient), so the penalty is
    the global batch's; ``0`` (connected to the graph) for an empty (global) batch.

    Example:
        >>> float(mdca_loss(torch.zeros(2, 2), torch.tensor([0, 1])))
        0.0
    """
    x = _logits_and_target(logits, target, validate_args)
    return _mdca(x, target, sync_dist)


def _mdca(x: Tensor, target: Tensor, sync_dist: bool) -> Tensor:
    p = F.softmax(x, dim=1)
    c = p.shape[1]
    sums = torch.cat([p.sum(dim=0), F.one_hot(target, c).to(p.dtype).sum(dim=0), p.new_full((1,), float(p.shape[0]))])
    if _world_size(sync_dist) > 1:
        sums = all_reduce(sums, grad=True)
    # an empty (global) batch has zero sums: the clamp gives a zero connected to the graph, without a sync
    return ((sums[:c] - sums[c : 2 * c]) / sums[-1].clamp_min(1)).abs().mean()


def dca_loss(logits: Tensor, target: Tensor, sync_dist: bool = False, validate_args: bool = True) -> Tensor:
    r"""Difference between confidence and accuracy (Liang et al., 2020), the batch-level calibration penalty.

    .. math::
        \mathcal{L}_{\mathrm{DCA}} = \Big\lvert \frac{1}{N}\sum_i \mathbb{1}[\hat{y}_i = y_i]
        - \frac{1}{N}\sum_i \max_k p_{ik} \Big\rvert

    ``sync_dist=True`` sums the accuracy, confidence and ``N`` over the processes (with gradient); ``0``
    (connected to the graph) for an empty (global) batch.

    Example:
        >>> round(float(dca_loss(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]))), 4)
        0.0
    """
    x = _logits_and_target(logits, target, validate_args)
    return _dca(x, target, sync_dist)


def _dca(x: Tensor, target: Tensor, sync_dist: bool) -> Tensor:
    p = F.softmax(x, dim=1)
    r, prediction = p.max(dim=1)
    sums = torch.stack([(prediction == target).to(p.dtype).sum(), r.sum(), p.new_tensor(float(p.shape[0]))])
    if _world_size(sync_dist) > 1:
        sums = all_reduce(sums, grad=True)
    return ((sums[0] - sums[1]) / sums[2].clamp_min(1)).abs()


# --------------------------------------------------------------------------- smooth ECE (kernel-smoothed)

_SMECE_IMAGES = 4  # reflections 2m, |m| <= 4: exact to float64 for every bandwidth <= 1


def _reflected_kernel(t: Tensor, f: Tensor, sigma: float) -> Tensor:
    """Reflected Gaussian kernel on ``[0, 1]``, ``K(t_j, f_i)`` of shape ``(len(t), len(f))`` (float64).

    :math:`K_\\sigma(t, f) = \\sum_{m} \\varphi_\\sigma(t - f - 2m) + \\varphi_\\sigma(t + f - 2m)`: the Gaussian
    reflected at 0 and 1 infinitely often, so that :math:`\\int_0^1 K_\\sigma(t, f)\\,dt = 1` for every ``f``.
    """
    out = torch.zeros(t.shape[0], f.shape[0], dtype=torch.float64, device=t.device)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    reach = 12.0 * sigma  # images farther than 12σ from [0, 1] weigh below exp(-72): left out
    for m in range(-_SMECE_IMAGES, _SMECE_IMAGES + 1):
        if 2 * abs(m) - 1 <= reach:  # |t - f - 2m| >= 2|m| - 1
            out += torch.exp(-0.5 * ((t[:, None] - f[None, :] - 2 * m) / sigma) ** 2)
        if min(abs(2 * m), abs(2 * m - 2)) <= reach:  # t + f - 2m lies within that distance of 0
            out += torch.exp(-0.5 * ((t[:, None] + f[None, :] - 2 * m) / sigma) ** 2)
    return out * norm


def _trapezoid(values: Tensor) -> Tensor:
    """Trapezoid rule on the uniform grid ``j / (G - 1)`` of ``[0, 1]`` (last dimension)."""
    g = values.shape[-1]
    return (values.sum(-1) - 0.5 * (values[..., 0] + values[..., -1])) / (g - 1)


def _smooth_ece_samples(confidence: Tensor, residual: Tensor, sigma: float, grid_size: int) -> Tensor:
    """smECE_σ of the samples themselves: ``∫ |(1/n) Σ_i K_σ(t, f_i) r_i| dt`` by the trapezoid rule."""
    t = torch.linspace(0, 1, grid_size, dtype=torch.float64, device=confidence.device)
    f, r = confidence.double(), residual.double()
    total = torch.zeros(grid_size, dtype=torch.float64, device=confidence.device)
    chunk = max(1, 2**22 // grid_size)  # at most 4M kernel values (32 MB) at a time
    for start in range(0, f.shape[0], chunk):
        total += _reflected_kernel(t, f[start : start + chunk], sigma) @ r[start : start + chunk]
    return _trapezoid((total / max(f.shape[0], 1)).abs())


def _smooth_ece_grid(weights: Tensor, count: float, sigma: float) -> Tensor:
    """smECE_σ of residual masses ``weights`` sitting on the grid ``k / (G - 1)``, by FFT convolution.

    ``S(t_j) = Σ_k w_k K_σ(t_j, g_k)``: the reflected kernel is a circular convolution of period 2 (``2(G - 1)``
    grid steps) of the Gaussian periodised with period 2, applied to ``w`` plus its mirror image ``w_k`` at
    ``-k``. Cost ``O(G log G)`` per bandwidth.
    """
    g = weights.shape[0]
    length = 2 * (g - 1)
    h = 1.0 / (g - 1)
    mass = torch.zeros(length, dtype=torch.float64, device=weights.device)
    mass[:g] += weights
    mirror = (-torch.arange(g, device=weights.device)) % length
    mass.index_add_(0, mirror, weights.double())
    d = torch.arange(length, dtype=torch.float64, device=weights.device) * h
    kernel = torch.zeros(length, dtype=torch.float64, device=weights.device)
    for m in range(-_SMECE_IMAGES - 1, _SMECE_IMAGES + 2):
        kernel += torch.exp(-0.5 * ((d - 2 * m) / sigma) ** 2)
    kernel = kernel / (sigma * math.sqrt(2 * math.pi))
    smoothed = torch.fft.irfft(torch.fft.rfft(mass) * torch.fft.rfft(kernel), n=length)[:g]
    return _trapezoid((smoothed / max(count, 1.0)).abs())


def _grid_weights(confidence: Tensor, residual: Tensor, grid_size: int) -> Tensor:
    """Residuals split between the two nearest grid points ``k / (G - 1)`` by linear interpolation (float64)."""
    x = confidence.double().clamp(0, 1) * (grid_size - 1)
    low = x.floor().long().clamp_(0, grid_size - 2)
    frac = x - low
    r = residual.double()
    w = torch.zeros(grid_size, dtype=torch.float64, device=confidence.device)
    w.index_add_(0, low, (1 - frac) * r)
    w.index_add_(0, low + 1, frac * r)
    return w


def _fixed_point_bandwidth(
    smece: Callable[[float], Tensor], min_bandwidth: float, upper: float, tol: float = 1e-7
) -> tuple[Tensor, float]:
    """The bandwidth σ* with ``smECE_σ* = σ*``; returns ``(smECE_σ*, σ*)``, σ* clipped below at ``min_bandwidth``.

    ``g(σ) = smECE_σ - σ`` is continuous and decreasing with slope at most -1, and ``smECE_σ <= upper`` (the mean
    absolute residual, as ``∫ K_σ(t, f) dt = 1``), so σ* lies in ``[min_bandwidth, upper]`` and
    ``|σ - σ*| <= |g(σ)|``. The bracket is found by halving σ from ``upper`` (the cost of an evaluation grows as
    ``1/σ``, so the small σ are tried last), then closed by the Illinois variant of regula falsi until
    ``|g| < tol``.
    """
    hi = min(1.0, upper)
    if hi <= min_bandwidth:
        return smece(min_bandwidth), min_bandwidth
    value = smece(hi)
    g_hi = float(value) - hi
    if g_hi >= 0:
        return value, hi
    lo = hi
    while True:
        lo = max(lo / 2, min_bandwidth)
        value = smece(lo)
        g_lo = float(value) - lo
        if g_lo > 0:
            break
        if lo <= min_bandwidth:
            return value, min_bandwidth
        hi, g_hi = lo, g_lo
    sigma, side = lo, 0
    for _ in range(100):
        sigma = (lo * g_hi - hi * g_lo) / (g_hi - g_lo)
        value = smece(sigma)
        g = float(value) - sigma
        if abs(g) < tol or hi - lo < tol:
            break
        if g > 0:
            lo, g_lo = sigma, g
            if side == 1:
                g_hi /= 2
            side = 1
        else:
            hi, g_hi = sigma, g
            if side == -1:
                g_lo /= 2
            side = -1
    return value, sigma


def _smece_grid_size(sigma: float, grid_size: int) -> int:
    return max(grid_size, math.ceil(10.0 / sigma) + 1)


def smooth_calibration_error(
    probs: Tensor,
    target: Tensor,
    bandwidth: float | None = None,
    input_type: InputType = "probs",
    grid_size: int = 1001,
    min_bandwidth: float = 1e-3,
    return_bandwidth: bool = False,
    validate_args: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Smooth ECE (Błasiok & Nakkiran, 2023): the top-label calibration error of a kernel-smoothed reliability
    diagram, with the bandwidth chosen as the fixed point of the paper.

    With the top-label confidence :math:`f_i`, the correctness :math:`y_i` and the reflected Gaussian kernel
    :math:`K_\sigma(t, f) = \sum_{m\in\mathbb{Z}} \varphi_\sigma(t - f - 2m) + \varphi_\sigma(t + f - 2m)` on
    :math:`[0, 1]`,

    .. math::
        \mathrm{smECE}_\sigma = \int_0^1 \Big\lvert \frac{1}{n}\sum_{i=1}^n K_\sigma(t, f_i)\,(y_i - f_i)
        \Big\rvert\,dt,\qquad \mathrm{smECE} = \mathrm{smECE}_{\sigma^*}\ \text{ where }\
        \mathrm{smECE}_{\sigma^*} = \sigma^*

    (the smoothed residual :math:`\hat r_\sigma(t)` weighted by the smoothed density :math:`\hat\delta_\sigma(t)`;
    :math:`\sigma \mapsto \mathrm{smECE}_\sigma - \sigma` is decreasing, so σ* is found by bisection). The
    integral over ``t`` is the trapezoid rule on ``max(grid_size, 10 / σ + 1)`` points; the samples themselves
    are not discretised (cost ``O(n · grid)`` per bisection step; the streaming
    :class:`~lightning_losses.metrics.SmoothCalibrationError` is ``O(G log G)`` on a histogram).

    Source: the paper's definition and ``relplot/metrics.py`` (``smECE``) of apple/ml-calibration. relplot
    discretises the samples onto a grid, truncates the kernel at ``±0.5`` and stops the bandwidth search after 10
    halvings (σ to ``2^-10``); here the kernel is reflected exactly and σ* is found to ``1e-6``, so values agree
    with relplot to about its discretisation. A binary ``(N,)`` input is taken as ``[1 - p, p]`` (top-label
    confidence ``max(p, 1 - p)``, as every metric of this module), where relplot uses ``p`` and the label.

    Args:
        probs: ``(N, C)`` or binary ``(N,)`` probabilities (or logits with ``input_type="logits"``).
        target: ``(N,)`` integer class indices.
        bandwidth: A fixed σ instead of the fixed point.
        input_type: ``"probs"`` or ``"logits"``.
        grid_size: Minimum number of points of the ``t`` integral.
        min_bandwidth: Lower end of the bandwidth search (relplot's ``eps``): a fixed point below it returns
            ``smECE`` at this bandwidth.
        return_bandwidth: Also return the bandwidth used.
        validate_args: Check the values (see the module docstring).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> conf = 0.5 + 0.5 * torch.rand(1000, generator=g)
        >>> target = torch.bernoulli(conf, generator=g).long()  # calibrated: P(correct) = confidence
        >>> probs = torch.stack([conf, 1 - conf], dim=1)
        >>> float(smooth_calibration_error(probs, 1 - target)) < 0.03
        True
        >>> float(smooth_calibration_error(probs ** 0.25 / (probs ** 0.25).sum(1, keepdim=True), 1 - target)) > 0.1
        True
    """
    if bandwidth is not None:
        check_hyperparameter(bandwidth, "bandwidth", low=0.0, high=1.0, low_inclusive=False)
    check_int(grid_size, "grid_size", low=3)
    check_hyperparameter(min_bandwidth, "min_bandwidth", low=0.0, high=1.0, low_inclusive=False)
    p = _prepare(probs, target, input_type, validate_args)
    confidence, prediction = _top_label(p)
    residual = (prediction == target).double() - confidence.double()
    if confidence.numel() == 0:
        zero = confidence.new_zeros(())
        return (zero, zero.clone()) if return_bandwidth else zero

    def smece(sigma: float) -> Tensor:
        return _smooth_ece_samples(confidence, residual, sigma, _smece_grid_size(sigma, grid_size))

    if bandwidth is None:
        value, sigma = _fixed_point_bandwidth(smece, float(min_bandwidth), float(residual.abs().mean()))
    else:
        sigma = float(bandwidth)
        value = smece(sigma)
    value = value.to(p.dtype)
    return (value, torch.tensor(sigma, dtype=p.dtype)) if return_bandwidth else value


# --------------------------------------------------------------------------- conformal prediction sets

ConformalMethod = Literal["thr", "aps", "raps"]


def _check_conformal_options(method: str, lam: float, k_reg: int) -> None:
    check_choice("method", method, ("thr", "aps", "raps"))
    check_hyperparameter(lam, "lam", low=0.0)
    check_int(k_reg, "k_reg", low=0)


def _uniforms(n: int, randomized: bool, u: Tensor | None, generator: torch.Generator | None, like: Tensor) -> Tensor:
    if not randomized:
        if u is not None:
            raise ValueError("`u` is given but randomized=False: pass randomized=True to use it, or drop `u`.")
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if u is None:
        return torch.rand(n, generator=generator, dtype=like.dtype).to(like.device)
    if not isinstance(u, Tensor) or u.shape != (n,) or not u.is_floating_point():
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"`u` must be a floating-point tensor of shape (N,) = ({n},) of uniforms in [0, 1], got {got}")
    if bool(((u < 0) | (u > 1)).any()):
        raise ValueError("`u` must hold uniform draws in [0, 1].")
    return u.to(like)


def conformal_class_scores(
    probs: Tensor,
    method: ConformalMethod = "aps",
    randomized: bool = True,
    u: Tensor | None = None,
    lam: float = 0.01,
    k_reg: int = 5,
    input_type: InputType = "probs",
    generator: torch.Generator | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Conformity score of every class, ``(N, C)``: class ``k`` enters the prediction set when its score is at most
    the calibrated threshold (:func:`conformal_quantile`).

    With :math:`\pi_{(1)} \ge \pi_{(2)} \ge \dots` the sorted probabilities of a sample, :math:`o(k)` the rank of
    class ``k`` (1-based) and :math:`u \sim U[0, 1]` one draw per sample (shared by its classes, so every set is a
    prefix of the ranking and ``y`` is in the set exactly when its own score is below the threshold):

    .. math::
        s_{\mathrm{THR}}(x, k) = 1 - \pi_k(x),\qquad
        s_{\mathrm{RAPS}}(x, k, u) = \sum_{j < o(k)} \big(\pi_{(j)} + \lambda\,\mathbb{1}[j > k_{reg}]\big)
        + u\,\big(\pi_{(o(k))} + \lambda\,\mathbb{1}[o(k) > k_{reg}]\big)

    APS is RAPS with :math:`\lambda = 0`; ``randomized=False`` takes :math:`u = 1` (the cumulative mass up to and
    including ``k``). THR (also called LAC) has no randomised form (its score is continuous already).

    Source: Angelopoulos et al., "Uncertainty sets for image classifiers using conformal prediction" (ICLR 2021),
    aangelopoulos/conformal_classification ``conformal.py`` (``get_tau``/``giq`` for the scores, ``gcq`` for the
    sets, which draws the randomisation at test time as the removal of the last class with the probability that
    makes it equal in law to the shared ``u`` above). The official non-randomised sets add the first class that
    crosses the threshold (never empty, more than ``1 - α`` coverage); here the set is exactly the classes whose
    score is below it, which keeps the guarantee two-sided for continuous scores.

    Args:
        probs: ``(N, C)`` probabilities (or logits with ``input_type="logits"``).
        method: ``"thr"``, ``"aps"`` or ``"raps"``.
        randomized: Randomised scores (APS, RAPS).
        u: ``(N,)`` uniforms to use instead of drawing them (``randomized=True`` only).
        lam, k_reg: RAPS penalty and the rank from which it applies (the paper's :math:`\lambda`, :math:`k_{reg}`).
        generator: Random generator of the uniforms.
        validate_args: Check the values of ``probs``.

    Example:
        >>> probs = torch.tensor([[0.6, 0.3, 0.1]])
        >>> conformal_class_scores(probs, "aps", randomized=False)
        tensor([[0.6000, 0.9000, 1.0000]])
        >>> conformal_class_scores(probs, "thr")
        tensor([[0.4000, 0.7000, 0.9000]])
    """
    _check_conformal_options(method, lam, k_reg)
    p = to_probabilities(probs, input_type, validate_args)
    if probs.ndim != 2:
        raise ValueError(f"`probs` must have shape (N, C) for prediction sets, got {tuple(probs.shape)}.")
    if method == "thr":
        if u is not None:
            raise ValueError("`u` is given but method='thr' has no randomisation: drop `u`.")
        return 1 - p
    n, c = p.shape
    uu = _uniforms(n, randomized, u, generator, p)
    ordered, order = p.sort(dim=1, descending=True, stable=True)
    if method == "raps":
        penalty = lam * (torch.arange(c, device=p.device) >= k_reg).to(p.dtype)
        ordered = ordered + penalty
    before = ordered.cumsum(dim=1) - ordered
    sorted_scores = before + uu[:, None] * ordered
    return torch.empty_like(sorted_scores).scatter_(1, order, sorted_scores)


def conformal_scores(
    probs: Tensor,
    target: Tensor,
    method: ConformalMethod = "aps",
    randomized: bool = True,
    u: Tensor | None = None,
    lam: float = 0.01,
    k_reg: int = 5,
    input_type: InputType = "probs",
    generator: torch.Generator | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Conformity scores of the true classes, ``(N,)``: :func:`conformal_class_scores` read at ``target``.

    .. math::
        E_i = s(x_i, y_i, u_i)

    Example:
        >>> conformal_scores(torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([1]), "aps", randomized=False)
        tensor([0.9000])
    """
    scores = conformal_class_scores(probs, method, randomized, u, lam, k_reg, input_type, generator, validate_args)
    check_targets(target, scores.shape[1], scores.shape[0], validate=validate_args)
    return scores.gather(1, target[:, None]).squeeze(1)


def conformal_quantile(scores: Tensor, alpha: float, validate_args: bool = True) -> Tensor:
    r"""The split-conformal threshold: the :math:`\lceil (n+1)(1-\alpha) \rceil`-th smallest calibration score.

    .. math::
        \hat q = E_{(\lceil (n+1)(1-\alpha) \rceil)},\qquad \hat q = +\infty \ \text{ if }\
        \lceil (n+1)(1-\alpha) \rceil > n

    (the empirical quantile at level :math:`\lceil (n+1)(1-\alpha)\rceil / n`). For exchangeable calibration and
    test samples, :math:`P(y \in \mathcal{C}(x)) \ge 1 - \alpha`, and at most :math:`1 - \alpha + 1/(n+1)` when the
    scores have no ties (Angelopoulos & Bates, "A gentle introduction to conformal prediction", Thm. 1 and
    Thm. D.1). The official conformal_classification code takes ``np.quantile(E, 1 - alpha, "higher")``, i.e. the
    level :math:`1-\alpha` without the finite-sample correction, which under-covers slightly for small ``n``.

    Args:
        scores: ``(n,)`` calibration scores (:func:`conformal_scores`).
        alpha: Miscoverage level in ``(0, 1)``.
        validate_args: Check that the scores are not NaN.

    Example:
        >>> conformal_quantile(torch.arange(1.0, 10.0), alpha=0.2)  # ceil(10 * 0.8) = 8th smallest
        tensor(8.)
        >>> conformal_quantile(torch.arange(1.0, 10.0), alpha=0.05)  # ceil(10 * 0.95) = 10 > 9
        tensor(inf)
    """
    check_hyperparameter(alpha, "alpha", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.ndim != 1:
        got = f"shape {tuple(scores.shape)}, dtype {scores.dtype}" if isinstance(scores, Tensor) else type(scores)
        raise ValueError(f"`scores` must be a 1-d floating-point tensor of calibration scores, got {got}.")
    n = scores.shape[0]
    if n == 0:
        raise ValueError("`scores` is empty: the conformal threshold needs at least one calibration score.")
    if validate_args and bool(torch.isnan(scores).any()):
        raise ValueError("`scores` holds NaN values; compute them from finite probabilities.")
    rank = math.ceil((n + 1) * (1 - float(alpha)) - 1e-9)
    if rank > n:
        return scores.new_tensor(float("inf"))
    return scores.sort().values[max(rank, 1) - 1]


def prediction_sets(
    probs: Tensor,
    threshold: float | Tensor,
    method: ConformalMethod = "aps",
    randomized: bool = True,
    u: Tensor | None = None,
    lam: float = 0.01,
    k_reg: int = 5,
    input_type: InputType = "probs",
    generator: torch.Generator | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Conformal prediction sets as a boolean ``(N, C)`` mask: :math:`\mathcal{C}(x) = \{k : s(x, k, u) \le \hat q\}`.

    ``threshold`` is :math:`\hat q` from :func:`conformal_quantile` on calibration scores of the same ``method``,
    ``randomized``, ``lam`` and ``k_reg``; the scores are those of :func:`conformal_class_scores` (whose docstring
    gives the formulas and the source). A randomised set may be empty.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = 3 * torch.randn(2000, 5, generator=g)
        >>> y = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
        >>> q = conformal_quantile(conformal_scores(logits[:1000], y[:1000], input_type="logits", generator=g), 0.1)
        >>> sets = prediction_sets(logits[1000:], q, input_type="logits", generator=g)
        >>> coverage = sets.gather(1, y[1000:, None]).float().mean()
        >>> bool(0.87 < coverage < 0.93), sets.dtype
        (True, torch.bool)
    """
    if isinstance(threshold, Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"`threshold` must be a scalar, got shape {tuple(threshold.shape)}.")
        q = float(threshold)
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"`threshold` must be a number or a scalar tensor, got {type(threshold).__name__}.")
        q = float(threshold)
    if math.isnan(q):
        raise ValueError("`threshold` is NaN: fit it with conformal_quantile on finite calibration scores.")
    scores = conformal_class_scores(probs, method, randomized, u, lam, k_reg, input_type, generator, validate_args)
    return scores <= q

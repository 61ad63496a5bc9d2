"""Streaming calibration metrics (torchmetrics ``Metric`` classes) with the functions of
:mod:`lightning_losses.functional.calibration` as their twins.

Equal-width binned metrics keep only per-bin sums (``count``, ``confidence_sum``, ``correct_sum``; float64,
summed across processes): their memory is constant in the number of samples and their value equals the
all-samples function. Equal-mass binning and the KS error need every sample's confidence; those metrics keep two
floats per sample (``memory_per_sample_bytes``), a cost that grows with the data set and is gathered across
processes at ``compute``.

Every metric takes ``validate_args`` (default ``True``, as in torchmetrics): each batch's values are checked
(finite, probabilities in ``[0, 1]`` with rows summing to 1 to a dtype-dependent tolerance, targets in ``[0, C)``);
``False`` skips those passes and checks shapes and dtypes only. bfloat16 / float16 predictions are accepted and
accumulated in float32 / float64. A metric that saw no sample computes 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_losses.functional.calibration import (
    Binning,
    InputType,
    Norm,
    _ace_from_bins,
    _binned_sums,
    _check_bins,
    _check_top_label_inputs,
    _debiased_from_bins,
    _equal_mass_error,
    _fixed_point_bandwidth,
    _grid_weights,
    _ks_from_samples,
    _prepare,
    _smooth_ece_grid,
    _top_label,
    _top_label_bins,
    calibration_error_from_bins,
    to_probabilities,
)
from lightning_losses.utilities.checks import check_choice, check_hyperparameter, check_int
from lightning_losses.utilities.numerics import as_float32

__all__ = [
    "AverageCalibrationError",
    "BrierScore",
    "CalibrationError",
    "ClasswiseCalibrationError",
    "DebiasedCalibrationError",
    "KSCalibrationError",
    "NegativeLogLikelihood",
    "PredictionSetCoverage",
    "PredictionSetSize",
    "SmoothCalibrationError",
]


class _SummedMetric(Metric):
    """A calibration metric whose states are float64 sums, added across processes."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def _add_sums(self, shape: tuple[int, ...], *names: str) -> None:
        """Add the zero float64 states ``names`` of ``shape``, summed across processes."""
        for name in names:
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")


class _BinSumsMetric(_SummedMetric):
    """Per-bin sums ``(count, confidence_sum, correct_sum)`` of equal-width bins (bins in the last dimension)."""

    count: Tensor
    confidence_sum: Tensor
    correct_sum: Tensor

    def _add_bin_sums(self, *shape: int) -> None:
        self._add_sums(shape, "count", "confidence_sum", "correct_sum")

    def _bin_sums(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.count, self.confidence_sum, self.correct_sum


class _BinnedMetric(_BinSumsMetric):
    """Per-bin sums of top-label confidence and correctness (equal-width), or the samples (equal-mass)."""

    confidences: list[Tensor]
    corrects: list[Tensor]

    def __init__(
        self,
        n_bins: int = 15,
        binning: Binning = "uniform",
        input_type: InputType = "probs",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_bins(n_bins)
        check_choice("binning", binning, ("uniform", "quantile"))
        check_choice("input_type", input_type, ("probs", "logits"))
        self.n_bins, self.binning, self.input_type = n_bins, binning, input_type
        self.validate_args = validate_args
        if binning == "uniform":
            self._add_bin_sums(n_bins)
        else:
            self.add_state("confidences", [], dist_reduce_fx="cat")
            self.add_state("corrects", [], dist_reduce_fx="cat")

    @property
    def memory_per_sample_bytes(self) -> int:
        """State bytes added per sample: 0 for equal-width bins, 8 (two float32) for equal-mass bins."""
        return 0 if self.binning == "uniform" else 8

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predictions ``(N, C)`` / ``(N,)`` and targets ``(N,)``.

        One pass finds each row's maximum and its index (:func:`_top_label`); with ``validate_args`` two more read
        the values (the smallest value and the row sums; the largest value is the largest row maximum). The
        per-bin sums then cost ``O(N)``.
        """
        if self.input_type == "probs" and isinstance(preds, Tensor) and preds.ndim == 2:
            p = to_probabilities(preds, "probs", validate_args=False)  # type, dtype and shape checks only
            confidence, prediction = _top_label(p)
            _check_top_label_inputs(p, confidence, target, self.validate_args, preds.dtype)
        else:
            p = _prepare(preds, target, self.input_type, self.validate_args)
            confidence, prediction = _top_label(p)
        if self.binning == "uniform":
            sums = _top_label_bins(confidence, prediction, target, self.n_bins)
            self.count.add_(sums[0])  # in place: no module attribute assignment per update
            self.confidence_sum.add_(sums[1])
            self.correct_sum.add_(sums[2])
        else:
            self.confidences.append(confidence.float())
            self.corrects.append((prediction == target).float())

    def bins(self) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(count, confidence_sum, correct_sum)`` per equal-width bin (for reliability diagrams)."""
        if self.binning != "uniform":
            raise ValueError("bins() needs binning='uniform'; equal-mass bins are formed only at compute().")
        return self._bin_sums()


class CalibrationError(_BinnedMetric):
    r"""Top-label expected calibration error, streaming; twin of
    :func:`~lightning_losses.functional.expected_calibration_error`.

    .. math::
        \mathrm{ECE} = \sum_b \frac{n_b}{N}\lvert\mathrm{acc}_b - \mathrm{conf}_b\rvert

    Args:
        n_bins: Number of bins.
        norm: ``"l1"`` (ECE), ``"l2"`` or ``"max"`` (MCE).
        binning: ``"uniform"`` (constant memory) or ``"quantile"`` (equal mass; keeps 8 bytes per sample).
        input_type: ``"probs"`` or ``"logits"``.
        validate_args: Check every batch's values (finite, in range, normalised); ``False`` skips those passes
            over the ``N × C`` values (shapes are still checked).

    Example:
        >>> from lightning_losses.functional.calibration import expected_calibration_error
        >>> probs, target = torch.softmax(torch.randn(100, 5), 1), torch.randint(0, 5, (100,))
        >>> metric = CalibrationError(n_bins=10)
        >>> for i in range(0, 100, 30):
        ...     metric.update(probs[i : i + 30], target[i : i + 30])
        >>> bool(torch.isclose(metric.compute(), expected_calibration_error(probs, target, n_bins=10)))
        True
    """

    def __init__(
        self,
        n_bins: int = 15,
        norm: Norm = "l1",
        binning: Binning = "uniform",
        input_type: InputType = "probs",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(n_bins, binning, input_type, validate_args, **kwargs)
        check_choice("norm", norm, ("l1", "l2", "max"))
        self.norm: Norm = norm

    def compute(self) -> Tensor:
        if self.binning == "uniform":
            return calibration_error_from_bins(*self._bin_sums(), self.norm, validate_args=False).float()
        conf, correct = dim_zero_cat(self.confidences), dim_zero_cat(self.corrects)
        return _equal_mass_error(conf, correct, self.n_bins, self.norm).float()


class AverageCalibrationError(_BinnedMetric):
    r"""Average calibration error (unweighted mean gap over non-empty equal-width bins), streaming; twin of
    :func:`~lightning_losses.functional.average_calibration_error`.

    Example:
        >>> m = AverageCalibrationError(n_bins=5)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]), torch.tensor([0, 1, 1, 1]))
        >>> round(float(m.compute()), 4)
        0.35
    """

    def __init__(
        self, n_bins: int = 15, input_type: InputType = "probs", validate_args: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(n_bins, "uniform", input_type, validate_args, **kwargs)

    def compute(self) -> Tensor:
        return _ace_from_bins(*self._bin_sums()).float()


class DebiasedCalibrationError(_BinnedMetric):
    r"""Debiased l2 calibration error (Kumar et al., 2019), streaming; twin of
    :func:`~lightning_losses.functional.debiased_calibration_error`.

    .. math::
        \widehat{\mathrm{CE}}^2 = \sum_b \frac{n_b}{N}\Big[(\bar{y}_b - \bar{s}_b)^2
        - \frac{\bar{y}_b(1 - \bar{y}_b)}{n_b - 1}\Big]

    Example:
        >>> m = DebiasedCalibrationError(n_bins=10, squared=True)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]]), torch.tensor([0, 1, 1, 1]))
        >>> round(float(m.compute()), 4)
        0.035
    """

    def __init__(
        self,
        n_bins: int = 15,
        input_type: InputType = "probs",
        squared: bool = False,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(n_bins, "uniform", input_type, validate_args, **kwargs)
        if not isinstance(squared, bool):
            raise TypeError(f"`squared` must be a bool, got {type(squared).__name__}.")
        self.squared = squared

    def compute(self) -> Tensor:
        return _debiased_from_bins(*self._bin_sums(), self.squared).float()


class KSCalibrationError(_BinnedMetric):
    r"""Kolmogorov-Smirnov calibration error; keeps every sample's confidence (8 bytes per sample).

    .. math::
        \mathrm{KS} = \max_i \Big\lvert \frac{1}{N}\sum_{j \le i} (c_j - s_j) \Big\rvert \quad(\text{sorted by } s)

    Example:
        >>> m = KSCalibrationError()
        >>> m.update(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 1]))
        >>> round(float(m.compute()), 4)
        0.4
    """

    def __init__(self, input_type: InputType = "probs", validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(1, "quantile", input_type, validate_args, **kwargs)

    def compute(self) -> Tensor:
        conf, correct = dim_zero_cat(self.confidences), dim_zero_cat(self.corrects)
        return _ks_from_samples(conf, correct).float()


class ClasswiseCalibrationError(_BinSumsMetric):
    r"""Classwise ECE (one-vs-rest ECE averaged over classes), streaming with ``(C, n_bins)`` per-bin sums; twin of
    :func:`~lightning_losses.functional.classwise_calibration_error`.

    Args:
        num_classes: Number of classes ``C`` (2 for binary ``(N,)`` inputs).
        n_bins: Number of bins per class.
        norm: ``"l1"``, ``"l2"`` or ``"max"``.
        input_type: ``"probs"`` or ``"logits"``.

    Example:
        >>> m = ClasswiseCalibrationError(num_classes=2, n_bins=10)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1]))
        >>> round(float(m.compute()), 4)
        0.15
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        norm: Norm = "l1",
        input_type: InputType = "probs",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_bins(n_bins)
        self.validate_args = validate_args
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        check_choice("norm", norm, ("l1", "l2", "max"))
        check_choice("input_type", input_type, ("probs", "logits"))
        self.num_classes, self.n_bins, self.norm, self.input_type = num_classes, n_bins, norm, input_type
        self._add_bin_sums(num_classes, n_bins)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predictions and targets."""
        p = _prepare(preds, target, self.input_type, self.validate_args)
        if p.shape[1] != self.num_classes:
            raise ValueError(f"Expected predictions for {self.num_classes} classes, got {p.shape[1]}.")
        onehot = F.one_hot(target, self.num_classes).to(p.dtype)
        count, conf, acc = _binned_sums(p.t(), onehot.t(), self.n_bins)
        self.count += count
        self.confidence_sum += conf
        self.correct_sum += acc

    def compute(self) -> Tensor:
        per_class = calibration_error_from_bins(*self._bin_sums(), self.norm, validate_args=False)
        return per_class.mean().float()


class _MeanScore(_SummedMetric):
    total: Tensor
    n: Tensor

    def __init__(self, input_type: InputType = "probs", validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("input_type", input_type, ("probs", "logits"))
        self.input_type, self.validate_args = input_type, validate_args
        self._add_sums((), "total", "n")

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predictions and targets."""
        scores = self._scores(preds, target)
        self.total += scores.double().sum()
        self.n += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.n.clamp_min(1)).float()


class BrierScore(_MeanScore):
    r"""Brier score, streaming; twin of :func:`~lightning_losses.functional.brier_score`.

    .. math::
        \mathrm{BS} = \frac{1}{N}\sum_i \sum_k (p_{ik} - \mathbb{1}[y_i = k])^2

    Example:
        >>> m = BrierScore()
        >>> m.update(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 0]))
        >>> round(float(m.compute()), 4)
        0.25
    """

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        p = _prepare(preds, target, self.input_type, self.validate_args)
        per_sample = ((p - F.one_hot(target, p.shape[1]).to(p.dtype)) ** 2).sum(dim=1)
        return per_sample / 2 if preds.ndim == 1 else per_sample


class NegativeLogLikelihood(_MeanScore):
    r"""Mean negative log-likelihood of the target class, streaming; twin of
    :func:`~lightning_losses.functional.negative_log_likelihood`.

    Example:
        >>> m = NegativeLogLikelihood(input_type="logits")
        >>> m.update(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
        >>> round(float(m.compute()), 4)
        0.6931
    """

    def __init__(
        self, input_type: InputType = "probs", eps: float = 0.0, validate_args: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(input_type, validate_args, **kwargs)
        check_hyperparameter(eps, "eps", low=0.0, high=1.0)
        self.eps = eps

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        if self.input_type == "logits":
            _prepare(preds, target, "logits", self.validate_args)
            (x,) = as_float32(preds)
            logp = torch.stack([F.logsigmoid(-x), F.logsigmoid(x)], 1) if x.ndim == 1 else F.log_softmax(x, 1)
        else:
            p = _prepare(preds, target, "probs", self.validate_args)
            logp = p.clamp_min(self.eps).log() if self.eps > 0 else p.log()
        return -logp.gather(1, target[:, None]).squeeze(1)


class SmoothCalibrationError(_SummedMetric):
    r"""Smooth ECE (Błasiok & Nakkiran, 2023), streaming on a fine histogram; twin of
    :func:`~lightning_losses.functional.smooth_calibration_error`.

    .. math::
        \mathrm{smECE}_\sigma = \int_0^1 \Big\lvert \frac{1}{n}\sum_i K_\sigma(t, f_i)\,(y_i - f_i)\Big\rvert\,dt,
        \qquad \mathrm{smECE} = \mathrm{smECE}_{\sigma^*},\ \mathrm{smECE}_{\sigma^*} = \sigma^*

    ``update`` adds each sample's residual :math:`y_i - f_i` (correctness minus top-label confidence) to the two
    nearest points of the grid :math:`g_k = k / (G - 1)` by linear interpolation (relplot's
    ``smooth_round_to_grid``); ``compute`` smooths that grid with the reflected Gaussian kernel by FFT
    (``O(G log G)`` per bandwidth) and integrates on the same grid. State: ``G + 2`` float64 numbers summed across
    processes, whatever the number of samples.

    **Approximation bound.** Splitting a sample between grid points ``h = 1/(G - 1)`` apart replaces
    :math:`K_\sigma(t, f)` by its linear interpolant in ``f``, off by at most
    :math:`\tfrac{h^2}{8} \sup \lvert \partial_f^2 K_\sigma \rvert`; integrated over ``t``
    (:math:`\int \lvert \partial_f^2 K_\sigma \rvert dt \le 2 \int_{\mathbb{R}} \lvert \varphi_\sigma'' \rvert
    = 8 / (\sigma^2 \sqrt{2\pi e})`), so to leading order in ``h/σ``

    .. math::
        \lvert \mathrm{smECE}^{\mathrm{grid}}_\sigma - \mathrm{smECE}^{\mathrm{samples}}_\sigma \rvert \le
        \frac{h^2}{\sigma^2 \sqrt{2\pi e}}\cdot\frac{1}{n}\sum_i \lvert y_i - f_i \rvert
        \approx 0.24\,\frac{h^2}{\sigma^2}\,\overline{\lvert r \rvert},

    and σ* moves by no more (``smECE_σ - σ`` has slope at most -1). With the default ``G = 8193``
    (``h ≈ 1.2e-4``) and σ* ≥ 0.01 the bound is below ``4e-5``; both versions also share the ``t`` quadrature
    (the trapezoid rule on a grid finer than σ/10).

    Args:
        grid_size: Number of grid points ``G`` (``>= 3``).
        input_type: ``"probs"`` or ``"logits"``.
        min_bandwidth: Lower end of the bandwidth search.
        validate_args: Check every batch's values.

    Example:
        >>> from lightning_losses.functional.calibration import smooth_calibration_error
        >>> g = torch.Generator().manual_seed(0)
        >>> conf = 0.5 + 0.5 * torch.rand(600, generator=g)  # accuracy crosses the diagonal: the smoothing matters
        >>> correct = torch.bernoulli((conf + 0.15 * torch.sin(15 * conf)).clamp(0, 1), generator=g).long()
        >>> probs, target = torch.stack([conf, 1 - conf], dim=1), 1 - correct
        >>> metric = SmoothCalibrationError()
        >>> for i in range(0, 600, 200):
        ...     metric.update(probs[i : i + 200], target[i : i + 200])
        >>> exact = smooth_calibration_error(probs, target)
        >>> bool(abs(metric.compute() - exact) < 1e-4)
        True
    """

    residual_grid: Tensor
    abs_residual_sum: Tensor
    count: Tensor

    def __init__(
        self,
        grid_size: int = 8193,
        input_type: InputType = "probs",
        min_bandwidth: float = 1e-3,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_int(grid_size, "grid_size", low=3)
        check_choice("input_type", input_type, ("probs", "logits"))
        check_hyperparameter(min_bandwidth, "min_bandwidth", low=0.0, high=1.0, low_inclusive=False)
        self.grid_size, self.input_type, self.min_bandwidth = grid_size, input_type, float(min_bandwidth)
        self.validate_args = validate_args
        self.bandwidth: float | None = None
        self._add_sums((grid_size,), "residual_grid")
        self._add_sums((), "abs_residual_sum", "count")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predictions ``(N, C)`` / ``(N,)`` and targets ``(N,)``."""
        p = _prepare(preds, target, self.input_type, self.validate_args)
        confidence, prediction = _top_label(p)
        residual = (prediction == target).double() - confidence.double()
        self.residual_grid += _grid_weights(confidence, residual, self.grid_size)
        self.abs_residual_sum += residual.abs().sum()
        self.count += residual.numel()

    def compute(self) -> Tensor:
        """smECE at the fixed-point bandwidth (stored in :attr:`bandwidth`); 0 before any sample."""
        n = float(self.count)
        if n == 0:
            return torch.zeros((), dtype=torch.float32, device=self.count.device)
        weights = self.residual_grid

        def smece(sigma: float) -> Tensor:
            return _smooth_ece_grid(weights, n, sigma)

        value, self.bandwidth = _fixed_point_bandwidth(smece, self.min_bandwidth, float(self.abs_residual_sum) / n)
        return value.float()


class _SetRatio(_SummedMetric):
    """A sum over prediction sets (state ``_numerator``) divided by the number of sets ``count`` at ``compute``."""

    count: Tensor
    _numerator: str

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sums((), self._numerator, "count")

    def compute(self) -> Tensor:
        return (getattr(self, self._numerator) / self.count.clamp_min(1)).float()


class PredictionSetCoverage(_SetRatio):
    r"""Empirical coverage of prediction sets: the fraction of samples whose set holds the true class.

    .. math::
        \widehat{\mathrm{cov}} = \frac{1}{N}\sum_i \mathbb{1}[y_i \in \mathcal{C}(x_i)]

    Example:
        >>> m = PredictionSetCoverage()
        >>> m.update(torch.tensor([[True, False], [False, False]]), torch.tensor([0, 1]))
        >>> m.compute()
        tensor(0.5000)
    """

    higher_is_better = True
    covered: Tensor
    _numerator = "covered"

    def update(self, sets: Tensor, target: Tensor) -> None:
        """Add a batch of boolean sets ``(N, C)`` and targets ``(N,)``."""
        _check_sets(sets)
        if not isinstance(target, Tensor) or target.shape != (sets.shape[0],) or target.is_floating_point():
            raise ValueError(f"`target` must be an integer tensor of shape ({sets.shape[0]},) matching `sets`.")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= sets.shape[1]):
            raise ValueError(f"`target` must hold class indices in [0, {sets.shape[1]}).")
        self.covered += sets.gather(1, target[:, None].long()).sum()
        self.count += sets.shape[0]


class PredictionSetSize(_SetRatio):
    r"""Average size of prediction sets, :math:`\frac{1}{N}\sum_i \lvert \mathcal{C}(x_i) \rvert`.

    Example:
        >>> m = PredictionSetSize()
        >>> m.update(torch.tensor([[True, True], [False, True]]))
        >>> m.compute()
        tensor(1.5000)
    """

    size_sum: Tensor
    _numerator = "size_sum"

    def update(self, sets: Tensor, target: Tensor | None = None) -> None:
        """Add a batch of boolean sets ``(N, C)`` (``target`` is accepted and ignored)."""
        _check_sets(sets)
        self.size_sum += sets.sum()
        self.count += sets.shape[0]


def _check_sets(sets: object) -> None:
    if not isinstance(sets, Tensor) or sets.dtype != torch.bool or sets.ndim != 2:
        got = f"{sets.dtype} {tuple(sets.shape)}" if isinstance(sets, Tensor) else type(sets).__name__
        raise ValueError(f"`sets` must be a boolean (N, C) mask of prediction sets, got {got}.")

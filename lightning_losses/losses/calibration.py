r"""Train-time calibration losses: focal (fixed and adaptive γ), label smoothing, MMCE, MDCA and DCA.

Each module is the ``nn.Module`` twin of a function of :mod:`lightning_losses.functional.calibration`; its tunable
settings are float32 persistent buffers (``register_hyperparameter``), so a LightningModule holding the loss as
attribute ``label_smoothing`` reaches the amount as ``"label_smoothing.smoothing"``. The penalty losses (MMCE,
MDCA, DCA) add ``weight × penalty`` to a base loss: cross-entropy by default, or any injected loss module taking
``(logits, target)`` (focal loss, say, as in the MDCA paper's FL+MDCA).

Every module takes ``validate_args`` (default ``True``): the values of the data are checked before any term is
computed (targets in ``[0, C)``, finite logits; one device synchronisation), so a bad label never reaches
torch's indexing. The hyperparameters are checked by the registry when set, not again at each call. An empty
batch gives a zero connected to the graph.

The penalty losses take ``sync_dist`` (default ``True``): when a process group is initialised (DDP, FSDP), the
penalty is computed over the global batch, gathered with gradient from every process (any per-rank batch size),
so a ``W``-process run equals one process on the concatenated batch, value and DDP-averaged gradient. It is a
collective: every process must call the loss the same number of times. ``sync_dist=False`` keeps the
per-process (local batch) penalty. The base term stays per-process (it is a mean over samples: DDP's gradient
averaging makes it the global mean for equal local batch sizes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch  # noqa: F401 - used by the doctests
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.functional.calibration import (
    _adaptive_focal,
    _dca,
    _empty_loss,
    _focal,
    _label_smoothing,
    _logits_and_target,
    _mdca,
    _mmce,
)
from lightning_losses.losses.base import LossModule
from lightning_losses.utilities.numerics import as_float32, hyperparameter_tensor

__all__ = [
    "CALIBRATION_LOSSES",
    "AdaptiveFocalLoss",
    "CalibrationPenaltyLoss",
    "DCALoss",
    "FocalLoss",
    "LabelSmoothingLoss",
    "MDCALoss",
    "MMCELoss",
]


def _hyper(value: Tensor, x: Tensor, name: str) -> Tensor:
    """A registered (already range-checked) hyperparameter, as a scalar or per-sample tensor in ``x``'s dtype."""
    return hyperparameter_tensor(value, x[:, 0], name)


class FocalLoss(LossModule):
    r"""Focal loss with a tunable focusing parameter ``gamma`` (hyperparameter ``gamma``, ``>= 0``).

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_i (1 - p_{i,y_i})^{\gamma}\log p_{i,y_i}

    Example:
        >>> loss = FocalLoss(gamma=3.0)
        >>> float(loss.gamma)
        3.0
        >>> loss(torch.zeros(2, 4), torch.tensor([0, 3])).shape
        torch.Size([])
    """

    default_name = "focal"
    gamma: Tensor

    def __init__(self, gamma: float = 3.0, validate_args: bool = True) -> None:
        super().__init__()
        self.register_hyperparameter("gamma", gamma, low=0.0)
        self.validate_args = validate_args

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        x = _logits_and_target(logits, target, self.validate_args)
        return _focal(x, target, _hyper(self.gamma, x, "gamma"))


class AdaptiveFocalLoss(LossModule):
    r"""Sample-dependent focal loss FLSD (Mukhoti et al., 2020): ``gamma_low`` for samples whose target
    probability is below ``threshold``, ``gamma_high`` otherwise (all three are hyperparameters).

    .. math::
        \gamma_i = \gamma_{\mathrm{low}}\ \text{if}\ p_{i,y_i} < t\ \text{else}\ \gamma_{\mathrm{high}}

    Example:
        >>> sorted(n for n, _ in AdaptiveFocalLoss().named_buffers())
        ['gamma_high', 'gamma_low', 'threshold']
    """

    default_name = "adaptive_focal"
    gamma_low: Tensor
    gamma_high: Tensor
    threshold: Tensor

    def __init__(
        self, gamma_low: float = 5.0, gamma_high: float = 3.0, threshold: float = 0.2, validate_args: bool = True
    ) -> None:
        super().__init__()
        self.register_hyperparameter("gamma_low", gamma_low, low=0.0)
        self.register_hyperparameter("gamma_high", gamma_high, low=0.0)
        self.register_hyperparameter("threshold", threshold, low=0.0, high=1.0)
        self.validate_args = validate_args

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        x = _logits_and_target(logits, target, self.validate_args)
        low, high = _hyper(self.gamma_low, x, "gamma_low"), _hyper(self.gamma_high, x, "gamma_high")
        return _adaptive_focal(x, target, low, high, _hyper(self.threshold, x, "threshold"))


class LabelSmoothingLoss(LossModule):
    r"""Cross-entropy with label smoothing; the amount ``smoothing`` in ``[0, 1]`` is a hyperparameter.

    .. math::
        \mathcal{L} = -(1-\varepsilon)\log p_{y} - \frac{\varepsilon}{C}\sum_k \log p_k

    Example:
        >>> loss = LabelSmoothingLoss(0.1)
        >>> logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
        >>> bool(torch.isclose(loss(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1)))
        True
    """

    default_name = "label_smoothing"
    smoothing: Tensor

    def __init__(self, smoothing: float = 0.1, validate_args: bool = True) -> None:
        super().__init__()
        self.register_hyperparameter("smoothing", smoothing, low=0.0, high=1.0)
        self.validate_args = validate_args

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        x = _logits_and_target(logits, target, self.validate_args)
        return _label_smoothing(x, target, _hyper(self.smoothing, x, "smoothing"))


class CalibrationPenaltyLoss(LossModule):
    """Base of the penalty losses: ``base(logits, target) + weight * penalty(logits, target)``.

    Args:
        weight: Factor of the penalty (hyperparameter ``weight``, ``>= 0``).
        base: Loss module computing the base term; cross-entropy when ``None``.
        sync_dist: Compute the penalty over the global batch of every process (see the module docstring).
        validate_args: Check the data values before computing (targets in range, finite logits).
    """

    default_name = "calibration_penalty"
    weight: Tensor

    def __init__(
        self, weight: float = 1.0, base: nn.Module | None = None, sync_dist: bool = True, validate_args: bool = True
    ) -> None:
        super().__init__()
        self.register_hyperparameter("weight", weight, low=0.0)
        if base is not None and not callable(base):
            raise TypeError(f"`base` must be a loss module taking (logits, target), got {type(base).__name__}.")
        self.base = base
        self.sync_dist, self.validate_args = bool(sync_dist), bool(validate_args)

    def penalty(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def base_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The base term: the injected loss, or cross-entropy in float32 (zero for an empty batch)."""
        if self.base is not None:
            return self.base(logits, target)
        (x,) = as_float32(logits)
        return F.cross_entropy(x, target) if x.shape[0] else _empty_loss(x)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        x = _logits_and_target(logits, target, self.validate_args)
        return self.base_loss(logits, target) + self.weight * self.penalty(x, target)


class MMCELoss(CalibrationPenaltyLoss):
    r"""Cross-entropy plus ``weight`` × MMCE (Kumar et al., 2018), Laplacian kernel of width ``bandwidth``.

    .. math::
        \mathcal{L} = \mathrm{CE} + \lambda\,\sqrt{\frac{1}{N^2}\sum_{i,j}(c_i - r_i)(c_j - r_j)
        e^{-\lvert r_i - r_j\rvert / h}}

    Example:
        >>> MMCELoss(weight=2.0)(torch.randn(8, 3), torch.randint(0, 3, (8,))).ndim
        0
    """

    default_name = "mmce"
    bandwidth: Tensor

    def __init__(
        self,
        weight: float = 2.0,
        bandwidth: float = 0.4,
        base: nn.Module | None = None,
        sync_dist: bool = True,
        validate_args: bool = True,
    ) -> None:
        super().__init__(weight, base, sync_dist, validate_args)
        self.register_hyperparameter("bandwidth", bandwidth, low=0.0, low_inclusive=False)

    def penalty(self, logits: Tensor, target: Tensor) -> Tensor:
        return _mmce(_logits_and_target(logits, target, False), target, self.bandwidth, self.sync_dist)


class MDCALoss(CalibrationPenaltyLoss):
    r"""Cross-entropy (or an injected base) plus ``weight`` × MDCA (Hebbalaguppe et al., 2022).

    .. math::
        \mathcal{L} = \mathrm{CE} + \beta\,\frac{1}{C}\sum_k\Big\lvert \bar{p}_k - \bar{y}_k \Big\rvert

    Example:
        >>> logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
        >>> bool(torch.isclose(MDCALoss(weight=0.0)(logits, target), F.cross_entropy(logits, target)))
        True
    """

    default_name = "mdca"

    def penalty(self, logits: Tensor, target: Tensor) -> Tensor:
        return _mdca(_logits_and_target(logits, target, False), target, self.sync_dist)


class DCALoss(CalibrationPenaltyLoss):
    r"""Cross-entropy plus ``weight`` × DCA, the gap between mean confidence and accuracy (Liang et al., 2020).

    .. math::
        \mathcal{L} = \mathrm{CE} + \beta\,\Big\lvert \overline{\mathbb{1}[\hat{y} = y]} - \overline{\max_k p_k}
        \Big\rvert

    Example:
        >>> DCALoss(weight=5.0)(torch.randn(8, 3), torch.randint(0, 3, (8,))).ndim
        0
    """

    default_name = "dca"

    def penalty(self, logits: Tensor, target: Tensor) -> Tensor:
        return _dca(_logits_and_target(logits, target, False), target, self.sync_dist)


#: Loss modules by their default attribute name (``CalibrationLossMixin.configure_calibration_loss("focal")``).
CALIBRATION_LOSSES: dict[str, Callable[[], LossModule]] = {
    "focal": FocalLoss,
    "adaptive_focal": AdaptiveFocalLoss,
    "label_smoothing": LabelSmoothingLoss,
    "mmce": MMCELoss,
    "mdca": MDCALoss,
    "dca": DCALoss,
}

r"""Module twin of the ground-truth-weighted self-distillation loss (Borup & Andersen, NeurIPS 2021)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_losses.functional.self_distillation import self_distillation_loss
from lightning_losses.losses.distillation import _POSITIVE, _SAMPLE_REDUCTIONS, _UNIT_INTERVAL, DistillationLoss
from lightning_losses.utilities.checks import check_choice

__all__ = ["SelfDistillationLoss"]


class SelfDistillationLoss(DistillationLoss):
    r"""Self-distillation on the target :math:`\xi\,\mathrm{onehot}(y) + (1 - \xi)\,p^t`, times ``weight``.

    See :func:`~lightning_losses.functional.self_distillation_loss`. The loss already holds the ground-truth term,
    so it replaces (rather than adds to) the cross-entropy of a training step.

    .. math::
        \mathcal{L} = w(e)\,\frac{1}{N}\sum_i \lambda_i\Big(\xi\,\|p^s_i - e_{y_i}\|^2
        + (1 - \xi)\,\|p^s_i - p^t_i\|^2\Big) \quad (\text{``mse''}), \qquad
        \mathcal{L} = w(e)\,\frac{1}{N}\sum_i \lambda_i\,H(\tilde y_i, p^s_i) \quad (\text{``ce''}).

    Args:
        xi: Ground-truth weight in ``[0, 1]`` (hyperparameter ``xi``; the paper's α).
        temperature: ``T > 0`` of the teacher's softmax (hyperparameter ``temperature``, 1 in the paper).
        criterion: ``"mse"`` (the paper and the official code) or ``"ce"``.
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        warmup_epochs: Linear warm-up length in epochs (0: none).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = SelfDistillationLoss(xi=0.3)
        >>> s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
        >>> from lightning_losses.functional import self_distillation_loss
        >>> bool(torch.isclose(loss(s, t, y), self_distillation_loss(s, t, y, xi=0.3)))
        True
    """

    xi: Tensor
    temperature: Tensor

    def __init__(
        self,
        xi: float | Tensor = 0.5,
        temperature: float | Tensor = 1.0,
        criterion: Literal["mse", "ce"] = "mse",
        weight: float | Tensor = 1.0,
        warmup_epochs: int = 0,
        reduction: Literal["batchmean", "sum", "none"] = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self._register_settings(
            reduction, _SAMPLE_REDUCTIONS, xi=(xi, _UNIT_INTERVAL), temperature=(temperature, _POSITIVE)
        )
        check_choice("criterion", criterion, ("mse", "ce"))
        self.criterion: Literal["mse", "ce"] = criterion

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int | float | None = None
    ) -> Tensor:
        """Return the weighted, warmed-up loss; ``epoch`` is the 0-based current epoch (or ``None``)."""
        per_sample = self_distillation_loss(
            student_logits,
            teacher_logits,
            target,
            xi=self.xi,
            temperature=self.temperature,
            criterion=self.criterion,
            reduction="none",
        )
        return self._output(per_sample, epoch)

r"""``SparseGeneralizedJSDLoss``: the ``nn.Module`` twin of
:func:`~lightning_losses.functional.sparse_distillation.sparse_generalized_jsd_loss` (offline teacher logits)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_losses.functional.sparse_distillation import TopKLogProbs, sparse_generalized_jsd_loss
from lightning_losses.losses.distillation import _Range, _TokenLoss
from lightning_losses.utilities.checks import NumItems, check_hyperparameter

__all__ = ["SparseGeneralizedJSDLoss"]


def _check_number_setting(name: str, value: float | Tensor, bounds: _Range) -> None:
    """Check a setting given as a number; a tensor's values are checked when it is registered."""
    if not isinstance(value, Tensor):
        check_hyperparameter(value, name, low=0.0, high=bounds.high, low_inclusive=bounds.low_inclusive)


class SparseGeneralizedJSDLoss(_TokenLoss):
    r"""Token-level generalized JSD against a teacher stored as top-k log-probabilities (plus the tail mass).

    .. math::

        \mathcal{L} = \frac{1}{|\mathcal{M}|} \sum_{(b,k) \in \mathcal{M}} \lambda_b\,
        \mathrm{JSD}_{\beta}\big(\tilde p^t_{bk}, \tilde p^s_{bk}\big)

    over the ``k + 1`` buckets (kept ids and the rest of the vocabulary) of
    :func:`~lightning_losses.functional.sparse_distillation.sparse_generalized_jsd_loss`, and the tokens
    :math:`\mathcal{M}` whose label is not ``ignore_index``. It follows the distillation call contract
    ``loss(student_logits, teacher, labels, num_items_in_batch=...)`` with ``teacher`` a
    :class:`~lightning_losses.functional.sparse_distillation.TopKLogProbs` (what
    :class:`~lightning_losses.data.teacher_logits.TeacherLogitsDataset` yields), so
    ``DistillationMixin.distillation_loss`` calls it like any other distillation loss.

    Args:
        beta: Mixture weight in ``[0, 1]`` (hyperparameter ``beta``): 0 forward KL, 1 reverse KL.
        temperature: Student temperature ``T > 0`` (hyperparameter ``temperature``); must match the temperature
            the teacher's log-probabilities were computed at.
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        ignore_index: Label of masked tokens.
        reduction: ``"mean"`` (over counted tokens), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from lightning_losses.functional.sparse_distillation import topk_teacher_log_probs
        >>> from lightning_losses import GeneralizedJSDLoss
        >>> s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
        >>> sparse = SparseGeneralizedJSDLoss(beta=0.0)(s, topk_teacher_log_probs(t, k=9))
        >>> bool(torch.isclose(sparse, GeneralizedJSDLoss(beta=0.0)(s, t), atol=1e-6))
        True
    """

    def __init__(
        self,
        beta: float | Tensor = 0.5,
        temperature: float | Tensor = 1.0,
        weight: float | Tensor = 1.0,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum", "none"] = "mean",
    ) -> None:
        super().__init__(beta, temperature, weight, ignore_index, reduction, _check_number_setting)

    def forward(
        self,
        student_logits: Tensor,
        teacher: TopKLogProbs | tuple[Tensor, Tensor],
        labels: Tensor | None = None,
        *,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        """Return the weighted sparse JSD.

        Args:
            student_logits: ``(B, T, V)`` or ``(N, V)``.
            teacher: ``(log_probs, indices)``, each ``(B, T, k)`` or ``(N, k)``.
            labels: Optional labels of shape ``student_logits.shape[:-1]``.
            num_items_in_batch: With ``reduction="mean"``, the divisor instead of this call's token count.
        """
        if not isinstance(teacher, tuple) or len(teacher) != 2:
            raise TypeError(
                "`teacher` must be a TopKLogProbs(log_probs, indices) pair (e.g. from TeacherLogitsDataset), got "
                f"{type(teacher).__name__}. For full teacher logits use GeneralizedJSDLoss."
            )
        self._check_num_items_reduction(num_items_in_batch)
        per_token = sparse_generalized_jsd_loss(
            student_logits,
            teacher[0],
            teacher[1],
            beta=self.beta,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction="none",
        )
        return self._token_mean(per_token, labels, num_items_in_batch)

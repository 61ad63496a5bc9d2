r"""Knowledge-distillation loss modules: validated settings stored as named hyperparameters.

Each module is the ``nn.Module`` twin of a function of :mod:`lightning_losses.functional.distillation`. Its
tunable settings (``temperature``, ``alpha``, ``beta``, ``weight``) are float32 persistent buffers registered with
:meth:`~lightning_losses.losses.base.LossModule.register_hyperparameter`, so a LightningModule holding the loss as
attribute ``kd`` reaches them as ``"kd.temperature"`` and checkpoints them. Every output is multiplied by
``weight`` (scalar or per-sample) and, for the losses with a warm-up, by :meth:`DistillationLoss.warmup_factor`.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from lightning_losses.functional.distillation import (
    binary_kl_loss,
    dkd_loss,
    generalized_jsd_loss,
    kd_loss,
    nd_loss,
)
from lightning_losses.losses.base import LossModule
from lightning_losses.utilities.checks import (
    NumItems,
    check_hyperparameter,
    check_int,
    check_num_items,
    check_reduction,
)
from lightning_losses.utilities.numerics import hyperparameter_tensor, reduce_loss

__all__ = [
    "BinaryKLLoss",
    "DKDLoss",
    "DistillationLoss",
    "GeneralizedJSDLoss",
    "KDLoss",
    "NDLoss",
]

SampleReduction = Literal["batchmean", "sum", "none"]
MeanReduction = Literal["mean", "sum", "none"]


def _number_validation(
    name: str, value: float | Tensor, *, low: float, strict: bool, high: float | None = None
) -> None:
    """Raise a ValueError with the fix when a setting is out of range or not finite, a TypeError when it is not a
    number (tensors' values are checked by the registry)."""
    if isinstance(value, Tensor):
        check_hyperparameter(value, name, validate=False)  # the dtype; the values are the registry's
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number or a tensor, got {type(value).__name__} ({value!r}).")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}. Pass a finite number.")
    bad = value <= low if strict else value < low
    if high is not None:
        bad = bad or value > high
    if bad:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        if high is not None:
            bound = f"in [{low:g}, {high:g}]"
        raise ValueError(f"`{name}` must be {bound}, got {value}. Pass a value {bound}.")


class DistillationLoss(LossModule):
    r"""Base of the distillation losses: a ``weight`` hyperparameter and an optional linear warm-up.

    .. math::

        w(e) = \begin{cases} 1 & E_w = 0 \text{ or } e \text{ unknown} \\
        \min\!\left(\dfrac{e + 1}{E_w}, 1\right) & \text{otherwise} \end{cases}

    with :math:`e` the 0-based epoch (Lightning's ``current_epoch``) and :math:`E_w` = ``warmup_epochs``; this is
    the official DKD schedule ``min(epoch / warmup, 1)`` written with 1-based epochs.

    Args:
        weight: Non-negative factor of the loss (hyperparameter ``weight``).
        warmup_epochs: Number of epochs of linear warm-up (plain ``int`` attribute, ``0`` disables it).

    Example:
        >>> loss = DistillationLoss(weight=0.5, warmup_epochs=4)
        >>> [loss.warmup_factor(e) for e in (0, 1, 3, 10, None)]
        [0.25, 0.5, 1.0, 1.0, 1.0]
        >>> float(loss.weight)
        0.5
    """

    weight: Tensor

    def __init__(self, weight: float | Tensor = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__()
        _number_validation("weight", weight, low=0.0, strict=False)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(
                f"`warmup_epochs` must be an integer >= 0, got {warmup_epochs!r}. Pass 0 to disable the warm-up."
            )
        self.warmup_epochs = warmup_epochs
        self.register_hyperparameter("weight", weight, low=0.0)

    def warmup_factor(self, epoch: int | float | None) -> float:
        """Return the warm-up factor for the 0-based ``epoch`` (1 without warm-up or when ``epoch`` is ``None``)."""
        if self.warmup_epochs == 0 or epoch is None:
            return 1.0
        return min((float(epoch) + 1.0) / self.warmup_epochs, 1.0)

    def _weighted(
        self,
        unreduced: Tensor,
        reduction: str,
        count: Tensor | None = None,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        """Multiply the unreduced loss by ``weight`` (scalar or per-sample) and reduce it.

        ``"batchmean"`` divides by the number of samples, ``"mean"`` by ``count`` (the number of unmasked items,
        at least 1) or, when ``count`` is ``None``, by the number of samples. ``num_items_in_batch`` (checked by
        the caller), when given, replaces that divisor.
        """
        weighted = unreduced * hyperparameter_tensor(self.weight, unreduced, "weight", validate=False)
        if count is None and reduction != "none":
            count = weighted.new_tensor(float(unreduced.shape[0]))
        return reduce_loss(weighted, reduction, count=count, num_items_in_batch=num_items_in_batch)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, warmup_epochs={self.warmup_epochs}" if self.warmup_epochs else base


class KDLoss(DistillationLoss):
    r"""Hinton's knowledge distillation loss, :math:`w \cdot T^2\, \mathrm{KL}(p^t_T \,\|\, p^s_T)` (batchmean).

    See :func:`~lightning_losses.functional.kd_loss`.

    .. math::

        \mathcal{L} = w(e)\, \frac{1}{N} \sum_i \lambda_i T_i^2\, \mathrm{KL}\big(\operatorname{softmax}(z^t_i/T_i)
        \,\big\|\, \operatorname{softmax}(z^s_i/T_i)\big)

    Args:
        temperature: ``T > 0`` (hyperparameter ``temperature``).
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        warmup_epochs: Linear warm-up length in epochs (0: none).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = KDLoss(temperature=2.0)
        >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
        >>> from lightning_losses.functional import kd_loss
        >>> bool(torch.isclose(loss(s, t), kd_loss(s, t, temperature=2.0)))
        True
    """

    temperature: Tensor

    def __init__(
        self,
        temperature: float | Tensor = 4.0,
        weight: float | Tensor = 1.0,
        warmup_epochs: int = 0,
        reduction: SampleReduction = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        _number_validation("temperature", temperature, low=0.0, strict=True)
        check_reduction(reduction, ("batchmean", "sum", "none"))
        self.reduction = reduction
        self.register_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, epoch: int | float | None = None) -> Tensor:
        """Return the weighted, warmed-up KD loss; ``epoch`` is the 0-based current epoch (or ``None``)."""
        per_sample = kd_loss(student_logits, teacher_logits, self.temperature, reduction="none")
        return self.warmup_factor(epoch) * self._weighted(per_sample, self.reduction)


class DKDLoss(DistillationLoss):
    r"""Decoupled knowledge distillation, :math:`w(e)\,\lambda\,(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`.

    See :func:`~lightning_losses.functional.dkd_loss`. The official method adds cross-entropy and warms the DKD term
    up linearly over 20 epochs (the default here); cross-entropy is left to the training step.

    .. math::

        \mathcal{L} = w(e)\, \frac{1}{N} \sum_i \lambda_i \left(\alpha_i\, \mathrm{TCKD}_i + \beta_i\,
        \mathrm{NCKD}_i\right)

    Args:
        alpha: TCKD weight ``>= 0`` (hyperparameter ``alpha``).
        beta: NCKD weight ``>= 0`` (hyperparameter ``beta``).
        temperature: ``T > 0`` (hyperparameter ``temperature``).
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        warmup_epochs: Linear warm-up length in epochs (default 20, as in the official configuration).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = DKDLoss(warmup_epochs=2)
        >>> s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 3, 9, 1])
        >>> bool(torch.isclose(loss(s, t, y, epoch=0), 0.5 * loss(s, t, y, epoch=1)))
        True
    """

    alpha: Tensor
    beta: Tensor
    temperature: Tensor

    def __init__(
        self,
        alpha: float | Tensor = 1.0,
        beta: float | Tensor = 8.0,
        temperature: float | Tensor = 4.0,
        weight: float | Tensor = 1.0,
        warmup_epochs: int = 20,
        reduction: SampleReduction = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        _number_validation("alpha", alpha, low=0.0, strict=False)
        _number_validation("beta", beta, low=0.0, strict=False)
        _number_validation("temperature", temperature, low=0.0, strict=True)
        check_reduction(reduction, ("batchmean", "sum", "none"))
        self.reduction = reduction
        self.register_hyperparameter("alpha", alpha, low=0.0)
        self.register_hyperparameter("beta", beta, low=0.0)
        self.register_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int | float | None = None
    ) -> Tensor:
        """Return the weighted, warmed-up DKD loss; ``epoch`` is the 0-based current epoch (or ``None``)."""
        per_sample = dkd_loss(
            student_logits, teacher_logits, target, self.alpha, self.beta, self.temperature, reduction="none"
        )
        return self.warmup_factor(epoch) * self._weighted(per_sample, self.reduction)


class BinaryKLLoss(DistillationLoss):
    r"""Dual-head KD's logit-level loss (binary KL in log-cosh form), for the student's auxiliary head.

    See :func:`~lightning_losses.functional.binary_kl_loss`.

    .. math::

        \mathcal{L} = \frac{1}{N} \sum_i \lambda_i\, \tau_i^2 \sum_c \log\cosh\!\left(\frac{z^s_{ic} - z^t_{ic}}
        {2\tau_i}\right)

    Args:
        temperature: ``τ > 0`` (hyperparameter ``temperature``, default 2).
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> z = torch.randn(3, 5)
        >>> float(BinaryKLLoss()(z, z))
        0.0
    """

    temperature: Tensor

    def __init__(
        self,
        temperature: float | Tensor = 2.0,
        weight: float | Tensor = 1.0,
        reduction: SampleReduction = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        _number_validation("temperature", temperature, low=0.0, strict=True)
        check_reduction(reduction, ("batchmean", "sum", "none"))
        self.reduction = reduction
        self.register_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Return the weighted binary KL between the auxiliary-head logits and the teacher logits."""
        per_sample = binary_kl_loss(student_logits, teacher_logits, self.temperature, reduction="none")
        return self._weighted(per_sample, self.reduction)


class NDLoss(DistillationLoss):
    r"""Norm-and-direction loss on embeddings, weighted by :math:`\lambda`.

    See :func:`~lightning_losses.functional.nd_loss`.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_i \lambda_i \left(1 - \frac{\langle f^s_i, c_{y_i}/\lVert c_{y_i}\rVert
        \rangle}{\max(\lVert f^s_i\rVert, \lVert f^t_i\rVert)}\right)

    Args:
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> means = torch.eye(3)
        >>> f = torch.tensor([[5.0, 0.0, 0.0]])
        >>> float(NDLoss(weight=2.0)(f, f, means, torch.tensor([0])))
        0.0
    """

    def __init__(self, weight: float | Tensor = 1.0, reduction: MeanReduction = "mean") -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        check_reduction(reduction, ("mean", "sum", "none"))
        self.reduction = reduction

    def forward(
        self, student_features: Tensor, teacher_features: Tensor, class_means: Tensor, target: Tensor
    ) -> Tensor:
        """Return the weighted ND loss of the (projected) student features."""
        per_sample = nd_loss(student_features, teacher_features, class_means, target, reduction="none")
        return self._weighted(per_sample, self.reduction)


class GeneralizedJSDLoss(DistillationLoss):
    r"""Token-level generalized Jensen-Shannon divergence for language-model distillation.

    See :func:`~lightning_losses.functional.generalized_jsd_loss` (TRL's convention: β = 0 forward KL,
    β = 1 reverse KL, mixture :math:`m = \beta p^t + (1-\beta) p^s` in between).

    .. math::

        \mathcal{L} = \frac{1}{|\mathcal{M}|} \sum_{(b,k) \in \mathcal{M}} \lambda_b\,
        \mathrm{JSD}_{\beta}\big(p^t_{bk}, p^s_{bk}\big)

    over the set :math:`\mathcal{M}` of tokens whose label is not ``ignore_index``.

    Args:
        beta: Mixture weight in ``[0, 1]`` (hyperparameter ``beta``).
        temperature: ``T > 0`` (hyperparameter ``temperature``); no :math:`T^2` factor.
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        ignore_index: Label of masked tokens.
        vocab_mismatch: ``"error"`` or ``"slice"`` (compare the shared leading vocabulary).
        reduction: ``"mean"`` (over unmasked tokens), ``"sum"`` or ``"none"`` (per token).

    Example:
        >>> import torch
        >>> loss = GeneralizedJSDLoss(beta=0.0)
        >>> s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
        >>> from lightning_losses.functional import kd_loss
        >>> bool(torch.isclose(loss(s, t), kd_loss(s.flatten(0, 1), t.flatten(0, 1), temperature=1.0)))
        True
    """

    beta: Tensor
    temperature: Tensor

    def __init__(
        self,
        beta: float | Tensor = 0.5,
        temperature: float | Tensor = 1.0,
        weight: float | Tensor = 1.0,
        ignore_index: int = -100,
        vocab_mismatch: Literal["error", "slice"] = "error",
        reduction: MeanReduction = "mean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        _number_validation("beta", beta, low=0.0, strict=False, high=1.0)
        _number_validation("temperature", temperature, low=0.0, strict=True)
        if vocab_mismatch not in ("error", "slice"):
            raise ValueError(
                f"`vocab_mismatch` must be 'error' or 'slice', got {vocab_mismatch!r}. Use 'slice' only when the "
                "extra vocabulary entries are padding."
            )
        check_reduction(reduction, ("mean", "sum", "none"))
        check_int(ignore_index, "ignore_index")
        self.ignore_index = ignore_index
        self.vocab_mismatch: Literal["error", "slice"] = vocab_mismatch
        self.reduction = reduction
        self.register_hyperparameter("beta", beta, low=0.0, high=1.0)
        self.register_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        r"""Return the weighted JSD, averaged over the tokens whose label is not ``ignore_index``.

        Args:
            student_logits: Student logits ``(B, T, V)`` or ``(N, V)``.
            teacher_logits: Teacher logits of the same shape.
            labels: Optional labels of shape ``logits.shape[:-1]``; ``ignore_index`` marks tokens left out.
            num_items_in_batch: With ``reduction="mean"``, the number of counted tokens of the whole batch (every
                micro-batch of the optimizer step, on every rank, divided by the factor the gradients are later
                divided by); the loss is then :math:`\frac{1}{n_{\text{items}}}\sum_{(b,k)} \lambda_b
                \mathrm{JSD}_{bk}` so that the micro-batch losses sum to the whole batch's token mean. ``None``
                divides by this call's counted tokens.
        """
        self._check_num_items(num_items_in_batch)
        per_token = generalized_jsd_loss(
            student_logits,
            teacher_logits,
            beta=self.beta,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction="none",
            vocab_mismatch=self.vocab_mismatch,
        )
        return self._token_mean(per_token, labels, num_items_in_batch)

    def from_hidden(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        *,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        chunk_size: int | None = None,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        """This loss from the two models' hidden states and heads, chunked: the full logits are never formed.

        Same value and gradients as ``self(student_hidden @ student_weight.T + student_bias, teacher ..., labels)``
        (weight, reduction and ``ignore_index`` of this module), through
        :func:`~lightning_losses.functional.chunked.linear_distillation_loss`; memory of one chunk of rows × vocabulary.
        ``num_items_in_batch`` replaces the count of unmasked tokens as the divisor of ``reduction="mean"``.

        Example:
            >>> import torch
            >>> hs, ws, ht, wt = torch.randn(2, 5, 4), torch.randn(11, 4), torch.randn(2, 5, 6), torch.randn(11, 6)
            >>> loss = GeneralizedJSDLoss(beta=0.5, weight=0.3)
            >>> bool(torch.allclose(loss.from_hidden(hs, ws, ht, wt), loss(hs @ ws.T, ht @ wt.T), atol=1e-6))
            True
        """
        from lightning_losses.functional.chunked import linear_distillation_loss

        self._check_num_items(num_items_in_batch)
        per_token = linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            beta=self.beta,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction="none",
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            chunk_size=chunk_size,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
        )
        return self._token_mean(per_token, labels, num_items_in_batch)

    def _check_num_items(self, num_items_in_batch: NumItems) -> None:
        if num_items_in_batch is not None and self.reduction != "mean":
            raise ValueError(
                f"`num_items_in_batch` needs reduction='mean', but this loss was built with "
                f"reduction={self.reduction!r}."
            )
        check_num_items(num_items_in_batch)

    def _token_mean(self, per_token: Tensor, labels: Tensor | None, num_items_in_batch: NumItems) -> Tensor:
        """Weight and reduce per-token values; ``"mean"`` divides by the counted tokens or ``num_items_in_batch``."""
        if labels is None:
            count = per_token.new_tensor(float(per_token.numel()))
        else:
            count = (labels != self.ignore_index).sum().to(per_token.dtype)
        return self._weighted(per_token, self.reduction, count=count, num_items_in_batch=num_items_in_batch)

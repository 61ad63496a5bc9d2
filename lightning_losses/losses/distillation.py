r"""Knowledge-distillation loss modules: validated settings stored as named hyperparameters.

Each module is the ``nn.Module`` twin of a function of :mod:`lightning_losses.functional.distillation`. Its
tunable settings (``temperature``, ``alpha``, ``beta``, ``weight``) are float32 persistent buffers registered with
:meth:`~lightning_losses.losses.base.LossModule.register_hyperparameter`, so a LightningModule holding the loss as
attribute ``kd`` reaches them as ``"kd.temperature"`` and checkpoints them. Every output is multiplied by
``weight`` (scalar or per-sample) and, for the losses with a warm-up, by :meth:`DistillationLoss.warmup_factor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_losses.functional.distillation import (
    _MEAN_REDUCTIONS,
    _SAMPLE_REDUCTIONS,
    MeanReduction,
    SampleReduction,
    binary_kl_loss,
    dist_loss,
    dkd_loss,
    entropy_balance_step,
    generalized_jsd_loss,
    kd_loss,
    loss_balance_step,
    margin_mse_loss,
    multi_teacher_kd_losses,
    nd_loss,
    pld_loss,
    teacher_entropies,
)
from lightning_losses.losses.base import LossModule
from lightning_losses.utilities.checks import (
    NumItems,
    check_hyperparameter,
    check_int,
    check_num_items,
    check_reduction,
)
from lightning_losses.utilities.distributed import all_reduce
from lightning_losses.utilities.numerics import hyperparameter_tensor, reduce_loss

__all__ = [
    "BalancedMultiTeacherKDLoss",
    "BinaryKLLoss",
    "DISTLoss",
    "DKDLoss",
    "DistillationLoss",
    "GeneralizedJSDLoss",
    "KDLoss",
    "MarginMSELoss",
    "NDLoss",
    "PLDLoss",
]


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


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} ({value!r}).")
    return value


class _Range(NamedTuple):
    """Admissible values of a setting: from 0 (excluded unless ``low_inclusive``) up to ``high`` when given."""

    low_inclusive: bool = True
    high: float | None = None


_NON_NEGATIVE = _Range()
_POSITIVE = _Range(low_inclusive=False)
_UNIT_INTERVAL = _Range(high=1.0)

_Setting = tuple[float | Tensor, _Range]
_SettingCheck = Callable[[str, float | Tensor, _Range], None]


def _check_setting(name: str, value: float | Tensor, bounds: _Range) -> None:
    """:func:`_number_validation` of ``value`` against ``bounds``."""
    _number_validation(name, value, low=0.0, strict=not bounds.low_inclusive, high=bounds.high)


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

    def _register_settings(
        self,
        reduction: str,
        reductions: tuple[str, ...],
        check: _SettingCheck = _check_setting,
        /,
        **settings: _Setting,
    ) -> None:
        """Check the ``settings`` (``name=(value, bounds)``, with ``check``) and ``reduction`` (one of
        ``reductions``), keep ``reduction`` and register the settings as hyperparameters within their bounds."""
        for name, (value, bounds) in settings.items():
            check(name, value, bounds)
        check_reduction(reduction, reductions)
        self.reduction = reduction
        for name, (value, bounds) in settings.items():
            self.register_hyperparameter(name, value, low=0.0, high=bounds.high, low_inclusive=bounds.low_inclusive)

    def _output(self, unreduced: Tensor, epoch: int | float | None = None) -> Tensor:
        """The unreduced loss weighted, reduced with this module's ``reduction`` and warmed up for ``epoch``."""
        return self._warmed_up(epoch, self._weighted(unreduced, self.reduction))

    def _warmed_up(self, epoch: int | float | None, loss: Tensor) -> Tensor:
        """``warmup_factor(epoch) * loss``; the loss itself (no product in the graph) once the factor is 1."""
        factor = self.warmup_factor(epoch)
        return loss if factor == 1.0 else factor * loss

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
            return reduce_loss(weighted, reduction, count=unreduced.shape[0], num_items_in_batch=num_items_in_batch)
        return reduce_loss(weighted, reduction, count=count, num_items_in_batch=num_items_in_batch)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, warmup_epochs={self.warmup_epochs}" if self.warmup_epochs else base


class _StandardizableLoss(DistillationLoss):
    """A distillation loss of logits with the ``logit_standardization`` switch (shown by the repr when on)."""

    logit_standardization: bool

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, logit_standardization=True" if self.logit_standardization else base


class _TokenLoss(DistillationLoss):
    """Base of the token-level JSD losses: ``beta`` in ``[0, 1]``, ``temperature > 0``, an ``ignore_index`` and a
    mean over the counted tokens (or ``num_items_in_batch``)."""

    beta: Tensor
    temperature: Tensor

    def __init__(
        self,
        beta: float | Tensor,
        temperature: float | Tensor,
        weight: float | Tensor,
        ignore_index: int,
        reduction: str,
        check: _SettingCheck = _check_setting,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        self._register_settings(
            reduction, _MEAN_REDUCTIONS, check, beta=(beta, _UNIT_INTERVAL), temperature=(temperature, _POSITIVE)
        )
        check_int(ignore_index, "ignore_index")
        self.ignore_index = ignore_index

    def _check_num_items_reduction(self, num_items_in_batch: NumItems) -> None:
        """Raise when ``num_items_in_batch`` is given to a loss built without ``reduction="mean"``."""
        if num_items_in_batch is not None and self.reduction != "mean":
            raise ValueError(
                f"`num_items_in_batch` needs reduction='mean', but this loss was built with "
                f"reduction={self.reduction!r}."
            )

    def _token_mean(self, per_token: Tensor, labels: Tensor | None, num_items_in_batch: NumItems) -> Tensor:
        """Weight and reduce per-token values; ``"mean"`` divides by the counted tokens or ``num_items_in_batch``."""
        if labels is None:
            count = per_token.new_tensor(float(per_token.numel()))
        else:
            count = (labels != self.ignore_index).sum().to(per_token.dtype)
        return self._weighted(per_token, self.reduction, count=count, num_items_in_batch=num_items_in_batch)


class KDLoss(_StandardizableLoss):
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
        logit_standardization: Z-score both models' logits per sample before the temperature (Sun et al., CVPR
            2024; see :func:`~lightning_losses.functional.standardize_logits`). Off by default. The paper's
            CIFAR-100 setting is ``KDLoss(temperature=2.0, weight=9.0, logit_standardization=True)`` beside
            cross-entropy of weight 1.

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
        logit_standardization: bool = False,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self._register_settings(reduction, _SAMPLE_REDUCTIONS, temperature=(temperature, _POSITIVE))
        self.logit_standardization = _flag("logit_standardization", logit_standardization)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, epoch: int | float | None = None) -> Tensor:
        """Return the weighted, warmed-up KD loss; ``epoch`` is the 0-based current epoch (or ``None``)."""
        per_sample = kd_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            reduction="none",
            logit_standardization=self.logit_standardization,
        )
        return self._output(per_sample, epoch)


class DKDLoss(_StandardizableLoss):
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
        logit_standardization: Z-score both models' logits per sample before the temperature (Sun et al., CVPR
            2024). Off by default.

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
        logit_standardization: bool = False,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self._register_settings(
            reduction,
            _SAMPLE_REDUCTIONS,
            alpha=(alpha, _NON_NEGATIVE),
            beta=(beta, _NON_NEGATIVE),
            temperature=(temperature, _POSITIVE),
        )
        self.logit_standardization = _flag("logit_standardization", logit_standardization)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int | float | None = None
    ) -> Tensor:
        """Return the weighted, warmed-up DKD loss; ``epoch`` is the 0-based current epoch (or ``None``)."""
        per_sample = dkd_loss(
            student_logits,
            teacher_logits,
            target,
            self.alpha,
            self.beta,
            self.temperature,
            reduction="none",
            logit_standardization=self.logit_standardization,
        )
        return self._output(per_sample, epoch)


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
        self._register_settings(reduction, _SAMPLE_REDUCTIONS, temperature=(temperature, _POSITIVE))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Return the weighted binary KL between the auxiliary-head logits and the teacher logits."""
        per_sample = binary_kl_loss(student_logits, teacher_logits, self.temperature, reduction="none")
        return self._output(per_sample)


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
        self._register_settings(reduction, _MEAN_REDUCTIONS)

    def forward(
        self, student_features: Tensor, teacher_features: Tensor, class_means: Tensor, target: Tensor
    ) -> Tensor:
        """Return the weighted ND loss of the (projected) student features."""
        per_sample = nd_loss(student_features, teacher_features, class_means, target, reduction="none")
        return self._output(per_sample)


class GeneralizedJSDLoss(_TokenLoss):
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
        fused: In :meth:`from_hidden`, run each chunk's softmaxes, divergence and gradient as one
            ``torch.compile``-d function (``fused=True`` of
            :func:`~lightning_losses.functional.chunked.linear_distillation_loss`: 1.51–1.61× the four matrix
            products instead of 1.75–1.80× on 2 CPU cores; the first call compiles). Needs a working
            ``torch.compile`` backend; equal to the eager path up to float rounding. The logits path ignores it.

    Example:
        >>> import torch
        >>> loss = GeneralizedJSDLoss(beta=0.0)
        >>> s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
        >>> from lightning_losses.functional import kd_loss
        >>> bool(torch.isclose(loss(s, t), kd_loss(s.flatten(0, 1), t.flatten(0, 1), temperature=1.0)))
        True
    """

    def __init__(
        self,
        beta: float | Tensor = 0.5,
        temperature: float | Tensor = 1.0,
        weight: float | Tensor = 1.0,
        ignore_index: int = -100,
        vocab_mismatch: Literal["error", "slice"] = "error",
        reduction: MeanReduction = "mean",
        fused: bool = False,
    ) -> None:
        super().__init__(beta, temperature, weight, ignore_index, reduction)
        if vocab_mismatch not in ("error", "slice"):
            raise ValueError(
                f"`vocab_mismatch` must be 'error' or 'slice', got {vocab_mismatch!r}. Use 'slice' only when the "
                "extra vocabulary entries are padding."
            )
        if not isinstance(fused, bool):
            raise TypeError(f"`fused` must be True or False (compile the chunked per-chunk work), got {fused!r}.")
        self.vocab_mismatch: Literal["error", "slice"] = vocab_mismatch
        self.fused = fused

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
        weight = hyperparameter_tensor(self.weight, student_hidden, "weight", validate=False)
        # One weight for every token: the chunked function reduces itself, and computes the gradients while the
        # forward pass visits each chunk (four products per chunk); per-token values need backward to recompute
        # each chunk's logits (six).
        reduced = weight.ndim == 0 and self.reduction in ("mean", "sum")
        out = linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            beta=self.beta,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction if reduced else "none",  # type: ignore[arg-type]
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            chunk_size=chunk_size,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
            num_items_in_batch=num_items_in_batch if reduced else None,
            fused=self.fused,
        )
        return out * weight if reduced else self._token_mean(out, labels, num_items_in_batch)

    def _check_num_items(self, num_items_in_batch: NumItems) -> None:
        self._check_num_items_reduction(num_items_in_batch)
        check_num_items(num_items_in_batch)


class PLDLoss(DistillationLoss):
    r"""Plackett-Luce distillation: one teacher-weighted list-wise loss in place of cross-entropy + KD.

    See :func:`~lightning_losses.functional.pld_loss`. The ranking puts the label first, then the classes by
    descending teacher logit; each choice is weighted by the teacher's probability :math:`q = \operatorname{softmax}
    (t/\tau)` of the class chosen. Its first choice is :math:`q_y`-weighted cross-entropy, so the training step adds
    no separate cross-entropy term.

    .. math::

        \mathcal{L} = \frac1N \sum_i \lambda_i \sum_{k=1}^{C} q_{i,\pi^*_k}\Big(\log\sum_{l \ge k}
        e^{s_{i,\pi^*_l}} - s_{i,\pi^*_k}\Big)

    Args:
        temperature: Teacher temperature of the weights, ``τ > 0`` (hyperparameter ``temperature``; default 1, the
            paper's best on ImageNet).
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = PLDLoss()
        >>> s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 3, 9, 1])
        >>> from lightning_losses.functional import pld_loss
        >>> bool(torch.isclose(loss(s, t, y), pld_loss(s, t, y)))
        True
    """

    temperature: Tensor

    def __init__(
        self,
        temperature: float | Tensor = 1.0,
        weight: float | Tensor = 1.0,
        reduction: SampleReduction = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        self._register_settings(reduction, _SAMPLE_REDUCTIONS, temperature=(temperature, _POSITIVE))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """Return the weighted PLD loss of ``student_logits`` ``(N, C)`` for the labels ``target`` ``(N,)``."""
        per_sample = pld_loss(student_logits, teacher_logits, target, self.temperature, reduction="none")
        return self._output(per_sample)


class DISTLoss(DistillationLoss):
    r"""DIST: Pearson-correlation inter-class (per sample) and intra-class (per class over the batch) relations.

    See :func:`~lightning_losses.functional.dist_loss` (official hunto/DIST_KD code: :math:`\tau^2`-scaled,
    correlations with ``1e-8`` in the denominator).

    .. math::

        \mathcal{L} = \lambda \Big(\beta\, \tau^2 \big(1 - \tfrac1N \textstyle\sum_i \rho(P^s_{i,:}, P^t_{i,:})\big)
        + \gamma\, \tau^2 \big(1 - \tfrac1C \textstyle\sum_c \rho(P^s_{:,c}, P^t_{:,c})\big)\Big)

    Use it beside cross-entropy (official ImageNet setting: CE weight 1, β = γ = 1, τ = 1; CIFAR-100: β = γ = 2,
    τ = 4). A per-sample ``beta`` weights each sample's inter-class term; a per-sample ``weight`` multiplies each
    sample's value :math:`\ell_i` (its inter-class term plus the batch's intra-class term, see ``reduction="none"`` of
    :func:`~lightning_losses.functional.dist_loss`); ``gamma`` is a scalar (the intra-class term is a batch
    statistic).

    Args:
        beta: Inter-class weight ``>= 0`` (hyperparameter ``beta``).
        gamma: Intra-class weight ``>= 0`` (hyperparameter ``gamma``, scalar).
        temperature: ``τ > 0`` (hyperparameter ``temperature``).
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        reduction: ``"batchmean"`` (the official loss), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> z = torch.randn(8, 5)
        >>> bool(DISTLoss()(z, z) < 1e-5)
        True
    """

    beta: Tensor
    gamma: Tensor
    temperature: Tensor

    def __init__(
        self,
        beta: float | Tensor = 1.0,
        gamma: float | Tensor = 1.0,
        temperature: float | Tensor = 1.0,
        weight: float | Tensor = 1.0,
        reduction: SampleReduction = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        self._register_settings(
            reduction,
            _SAMPLE_REDUCTIONS,
            beta=(beta, _NON_NEGATIVE),
            gamma=(gamma, _NON_NEGATIVE),
            temperature=(temperature, _POSITIVE),
        )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Return the weighted DIST loss of ``student_logits`` ``(N, C)`` against ``teacher_logits``."""
        per_sample = dist_loss(
            student_logits, teacher_logits, self.beta, self.gamma, self.temperature, reduction="none"
        )
        return self._output(per_sample)


class MarginMSELoss(DistillationLoss):
    r"""Margin-MSE for ranking students: the squared difference of student and teacher score margins.

    See :func:`~lightning_losses.functional.margin_mse_loss` (official ``MSMarginLoss`` of
    sebastian-hofstaetter/matchmaker).

    .. math::

        \mathcal{L} = \frac1N \sum_i \lambda_i \frac1M \sum_m \Big(\big(s^s_{i}(d^+) - s^s_{i}(d^-_m)\big)
        - \big(s^t_{i}(d^+) - s^t_{i}(d^-_m)\big)\Big)^2

    Unlike the classification losses of this family, its ``forward`` takes four score tensors (the student's and
    the teacher's scores of the positive and of the negative documents), not ``(student_logits, teacher_logits,
    target)``: a ranking student scores (query, document) pairs, and the margins pair each query's positive with its
    negatives. Call it from your own ``training_step`` rather than through ``DistillationMixin.distillation_loss``.

    Args:
        weight: ``λ >= 0`` (hyperparameter ``weight``), scalar or per query.
        reduction: ``"mean"`` (over queries), ``"sum"`` or ``"none"`` (per query).

    Example:
        >>> import torch
        >>> sp, sn = torch.tensor([2.0, 1.0]), torch.tensor([[0.0, 1.0], [0.5, -1.0]])
        >>> float(MarginMSELoss()(sp, sn, sp + 2.0, sn + 2.0))  # the teacher's scores are offset, its margins equal
        0.0
    """

    def __init__(self, weight: float | Tensor = 1.0, reduction: MeanReduction = "mean") -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        self._register_settings(reduction, _MEAN_REDUCTIONS)

    def forward(
        self,
        student_positive: Tensor,
        student_negative: Tensor,
        teacher_positive: Tensor,
        teacher_negative: Tensor,
    ) -> Tensor:
        """Return the weighted Margin-MSE of positive ``(N,)`` and negative ``(N,)`` or ``(N, M)`` scores."""
        per_query = margin_mse_loss(
            student_positive, student_negative, teacher_positive, teacher_negative, reduction="none"
        )
        return self._output(per_query)


class BalancedMultiTeacherKDLoss(DistillationLoss):
    r"""Multi-teacher KD with MTARD's Entropy-Based Balance of the teachers' temperatures and Normalization Loss
    Balance of their weights.

    .. math::

        \mathcal{L} = \frac1N \sum_i \lambda_i \sum_{k=1}^{K} w_k\, \mathrm{KL}\big(\operatorname{softmax}
        (t_{k,i}/\tau_k) \,\big\|\, \operatorname{softmax}(s_{k,i})\big)

    At every training-mode call, after the per-teacher losses :math:`L_k` are computed with the current
    temperatures:

    1. (``balance_losses``) the weights take one :func:`~lightning_losses.functional.loss_balance_step` towards the
       relative losses :math:`\hat L_k = L_k / L_k^{(0)}` (the first training step's losses are recorded as
       :math:`L^{(0)}`), and this call's loss uses the new weights;
    2. (``balance_temperatures``) the temperatures take one
       :func:`~lightning_losses.functional.entropy_balance_step` so the teachers' mean entropies meet; they apply
       from the next call.

    This is the order and the arithmetic of the official code (zhaoshiji123/MTARD-extension,
    ``resnet18_mtard_cifar10.py``; conference version zhaoshiji123/MTARD); see
    :func:`~lightning_losses.functional.multi_teacher_kd_losses` for the KL form (batchmean, exact, the teacher
    alone softened). In evaluation mode nothing is updated. Under DDP the per-teacher losses and entropies are
    averaged over the processes (``torch.distributed``) before the updates, so every process keeps the same
    temperatures and weights; an empty batch updates nothing (and must then be empty on every process).

    The temperatures ``teacher_temperatures``, weights ``teacher_weights`` and the recorded ``initial_losses`` are
    checkpointed buffers (state of the algorithm, not hyperparameters). The step sizes and temperature bounds are
    hyperparameters (``temperature_step``, ``weight_step``, ``min_temperature``, ``max_temperature``), so a
    :class:`~lightning_losses.callbacks.HyperparameterSchedule` can divide the step sizes by 10 at each learning-rate
    decay, as the official code does.

    Its ``forward`` takes the student's logits and the teachers' logits stacked ``(K, N, C)`` (e.g.
    ``torch.stack([t(x) for t in teachers])``), not their average.

    Args:
        num_teachers: ``K >= 1``.
        temperature: Initial temperature of every teacher (official: 1).
        teacher_weights: Initial weights ``(K,)`` (normalised to sum to 1); uniform :math:`1/K` by default.
        balance_temperatures: Apply the Entropy-Based Balance.
        balance_losses: Apply the Normalization Loss Balance.
        temperature_step: :math:`\eta_\tau \ge 0` (official 0.001).
        weight_step: :math:`\eta_w \in [0, 1]` (official 0.025).
        min_temperature: Lower clip of the temperatures (official 1).
        max_temperature: Upper clip (official 10).
        weight: ``λ >= 0`` (hyperparameter ``weight``).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = BalancedMultiTeacherKDLoss(num_teachers=2, temperature_step=0.5)
        >>> confident, unsure = 5.0 * torch.randn(1, 8, 4), 0.1 * torch.randn(1, 8, 4)
        >>> value = loss(torch.randn(8, 4), torch.cat([confident, unsure]))
        >>> loss.teacher_temperatures.tolist()  # the confident teacher is softened, the other stays at the floor
        [1.5, 1.0]
    """

    teacher_temperatures: Tensor
    teacher_weights: Tensor
    initial_losses: Tensor
    temperature_step: Tensor
    weight_step: Tensor
    min_temperature: Tensor
    max_temperature: Tensor

    def __init__(
        self,
        num_teachers: int,
        temperature: float = 1.0,
        teacher_weights: Sequence[float] | None = None,
        *,
        balance_temperatures: bool = True,
        balance_losses: bool = True,
        temperature_step: float | Tensor = 0.001,
        weight_step: float | Tensor = 0.025,
        min_temperature: float | Tensor = 1.0,
        max_temperature: float | Tensor = 10.0,
        weight: float | Tensor = 1.0,
        reduction: SampleReduction = "batchmean",
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        check_int(num_teachers, "num_teachers", low=1)
        _number_validation("temperature", temperature, low=0.0, strict=True)
        _number_validation("temperature_step", temperature_step, low=0.0, strict=False)
        _number_validation("weight_step", weight_step, low=0.0, strict=False, high=1.0)
        _number_validation("min_temperature", min_temperature, low=0.0, strict=True)
        _number_validation("max_temperature", max_temperature, low=0.0, strict=True)
        if float(max_temperature) < float(min_temperature):
            raise ValueError(
                f"`max_temperature` ({float(max_temperature)}) must be >= `min_temperature` "
                f"({float(min_temperature)}). Swap them."
            )
        check_reduction(reduction, _SAMPLE_REDUCTIONS)
        self.num_teachers = num_teachers
        self.reduction = reduction
        self.balance_temperatures = _flag("balance_temperatures", balance_temperatures)
        self.balance_losses = _flag("balance_losses", balance_losses)
        if teacher_weights is None:
            weights = torch.full((num_teachers,), 1.0 / num_teachers)
        else:
            weights = torch.as_tensor(list(teacher_weights), dtype=torch.float32)
            if weights.shape != (num_teachers,) or not bool(torch.isfinite(weights).all()):
                raise ValueError(
                    f"`teacher_weights` must hold {num_teachers} finite numbers (one per teacher), got "
                    f"{list(teacher_weights)}."
                )
            if bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(
                    f"`teacher_weights` must be non-negative with a positive sum, got {list(teacher_weights)}."
                )
            weights = weights / weights.sum()
        self.register_buffer("teacher_temperatures", torch.full((num_teachers,), float(temperature)))
        self.register_buffer("teacher_weights", weights)
        self.register_buffer("initial_losses", torch.full((num_teachers,), math.nan))
        self.register_hyperparameter("temperature_step", temperature_step, low=0.0)
        self.register_hyperparameter("weight_step", weight_step, low=0.0, high=1.0)
        self.register_hyperparameter("min_temperature", min_temperature, low=0.0, low_inclusive=False)
        self.register_hyperparameter("max_temperature", max_temperature, low=0.0, low_inclusive=False)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Return the balanced multi-teacher loss; in training mode, update the weights and the temperatures.

        Args:
            student_logits: ``(N, C)``, or ``(K, N, C)`` with one student output per teacher.
            teacher_logits: The teachers' logits stacked ``(K, N, C)``.
        """
        if (
            isinstance(teacher_logits, Tensor)
            and teacher_logits.ndim == 3
            and (teacher_logits.shape[0] != self.num_teachers)
        ):
            raise ValueError(
                f"This loss was built for {self.num_teachers} teachers but `teacher_logits` stacks "
                f"{teacher_logits.shape[0]} (shape {tuple(teacher_logits.shape)}). Pass (K, N, C) logits with "
                f"K = {self.num_teachers}, or build the loss with num_teachers={teacher_logits.shape[0]}."
            )
        per_teacher = multi_teacher_kd_losses(
            student_logits, teacher_logits, self.teacher_temperatures, reduction="none"
        )
        if self.training and per_teacher.shape[-1] > 0:
            self._balance(per_teacher.detach(), teacher_logits)
        weights = self.teacher_weights.to(per_teacher.dtype)
        return self._weighted((weights.unsqueeze(-1) * per_teacher).sum(dim=0), self.reduction)

    @torch.no_grad()
    def _balance(self, per_teacher: Tensor, teacher_logits: Tensor) -> None:
        k, dtype = self.num_teachers, self.teacher_weights.dtype
        stats = [per_teacher.mean(dim=-1).to(dtype)]
        if self.balance_temperatures:
            stats.append(teacher_entropies(teacher_logits, self.teacher_temperatures, validate_args=False).to(dtype))
        reduced = all_reduce(torch.cat(stats), "mean")
        losses = reduced[:k].to(self.teacher_weights.device)
        if bool(torch.isnan(self.initial_losses).any()):
            self.initial_losses.copy_(losses)
        if self.balance_losses:
            self.teacher_weights.copy_(
                loss_balance_step(
                    losses, self.initial_losses, self.teacher_weights, self.weight_step, validate_args=False
                )
            )
        if self.balance_temperatures:
            self.teacher_temperatures.copy_(
                entropy_balance_step(
                    reduced[k:].to(self.teacher_temperatures.device),
                    self.teacher_temperatures,
                    self.temperature_step,
                    self.min_temperature,
                    self.max_temperature,
                    validate_args=False,
                )
            )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_teachers={self.num_teachers}, "
            f"balance_temperatures={self.balance_temperatures}, balance_losses={self.balance_losses}"
        )

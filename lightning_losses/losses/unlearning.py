r"""``nn.Module`` twins of the unlearning losses, with their hyperparameters as named, checkpointed buffers.

Each module combines the forget term of its method with an optional retain term computed by the caller:

.. math::

    \mathcal{L} = w_f \,\mathcal{L}_{\text{forget}} + w_r \,\mathcal{L}_{\text{retain}}

``forget_weight`` (:math:`w_f`) and ``retain_weight`` (:math:`w_r`) are hyperparameters like ``beta`` and ``delta``,
so on a LightningModule holding the loss at ``self.npo`` they are ``"npo.beta"``, ``"npo.retain_weight"``, ...
"""

from __future__ import annotations

from torch import Tensor

from lightning_losses._utils import NumItems, check_hyperparameter
from lightning_losses.functional.unlearning import (
    FLAT_DIVERGENCES,
    Divergence,
    flat_loss,
    gradient_ascent_loss,
    idk_dpo_loss,
    npo_loss,
    simnpo_loss,
)
from lightning_losses.losses.base import LossModule

__all__ = ["FLATLoss", "GradientAscentLoss", "IdkDPOLoss", "NPOLoss", "SimNPOLoss", "UnlearningLoss"]


def _check_settings(**values: object) -> None:
    """A TypeError for a setting that is not a real number or tensor (the registry checks the ranges)."""
    for name, value in values.items():
        check_hyperparameter(value, name, validate=False)


class UnlearningLoss(LossModule):
    """Base of the unlearning losses: the forget / retain weights and their combination."""

    forget_weight: Tensor
    retain_weight: Tensor
    needs_reference: bool = False
    """Whether the forget term compares the model with a reference model."""
    needs_template: bool = False
    """Whether the forget batch needs an alternative (template / "I don't know") answer."""

    def __init__(self, forget_weight: float = 1.0, retain_weight: float = 0.0) -> None:
        super().__init__()
        _check_settings(forget_weight=forget_weight, retain_weight=retain_weight)
        self.register_hyperparameter("forget_weight", forget_weight, low=0.0)
        self.register_hyperparameter("retain_weight", retain_weight, low=0.0)

    @property
    def uses_retain(self) -> bool:
        """Whether the retain term currently counts (``retain_weight > 0``)."""
        return bool((self.retain_weight > 0).any())

    def combine(self, forget_term: Tensor, retain_loss: Tensor | None) -> Tensor:
        """Return ``forget_weight · forget_term + retain_weight · retain_loss``."""
        out = self.forget_weight.to(forget_term) * forget_term
        if retain_loss is None:
            if self.uses_retain:
                raise ValueError(
                    f"{type(self).__name__} has retain_weight={self.retain_weight.tolist()} but no retain loss was "
                    "given. Pass retain data (or set retain_weight to 0)."
                )
            return out
        return out + self.retain_weight.to(forget_term) * retain_loss


class NPOLoss(UnlearningLoss):
    r"""NPO (with an optional retain term: NPO-RT with a retain NLL, NPO-KL with a retain KL).

    .. math::

        \mathcal{L} = w_f \cdot \frac{2}{\beta}\,\mathbb{E}\big[\operatorname{softplus}(\beta
            \log(\pi_\theta/\pi_{\mathrm{ref}}))\big] + w_r \,\mathcal{L}_{\text{retain}}

    Args:
        beta: :math:`\beta > 0` (paper default 0.1).
        forget_weight: :math:`w_f \ge 0`.
        retain_weight: :math:`w_r \ge 0` (0: plain NPO).

    Example:
        >>> import torch
        >>> loss = NPOLoss(beta=0.1)
        >>> ref = torch.tensor([-3.0, -4.0])
        >>> torch.allclose(loss(ref - 1.0, ref), 2 / 0.1 * torch.nn.functional.softplus(torch.tensor(-0.1)))
        True
        >>> loss
        NPOLoss(forget_weight=1, retain_weight=0, beta=0.1)
    """

    needs_reference = True
    beta: Tensor

    def __init__(self, beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 0.0) -> None:
        super().__init__(forget_weight, retain_weight)
        _check_settings(beta=beta)
        self.register_hyperparameter("beta", beta, low=0.0, low_inclusive=False)

    def forward(self, policy_logps: Tensor, reference_logps: Tensor, retain_loss: Tensor | None = None) -> Tensor:
        return self.combine(npo_loss(policy_logps, reference_logps, self.beta), retain_loss)


class SimNPOLoss(UnlearningLoss):
    r"""SimNPO: reference-free, length-normalised NPO with margin :math:`\delta`, plus a retain NLL term.

    .. math::

        \mathcal{L} = -w_f \frac{2}{\beta}\,\mathbb{E}\Big[\log\sigma\Big(\beta\Big(\frac{\mathrm{NLL}_\theta(y|x)}{|y|}
            - \delta\Big)\Big)\Big] + w_r\,\mathcal{L}_{\text{retain}}

    Args:
        beta: :math:`\beta > 0` (default 4.5).
        delta: margin :math:`\delta` (default 0).
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r` (default 0.125).

    Example:
        >>> import torch
        >>> loss = SimNPOLoss()
        >>> float(loss(torch.tensor([-1000.0]), torch.tensor([10]), retain_loss=torch.tensor(0.0))) < 1e-6
        True
    """

    beta: Tensor
    delta: Tensor

    def __init__(
        self, beta: float = 4.5, delta: float = 0.0, forget_weight: float = 1.0, retain_weight: float = 0.125
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        _check_settings(beta=beta, delta=delta)
        self.register_hyperparameter("beta", beta, low=0.0, low_inclusive=False)
        self.register_hyperparameter("delta", delta)

    def forward(self, policy_logps: Tensor, lengths: Tensor, retain_loss: Tensor | None = None) -> Tensor:
        return self.combine(simnpo_loss(policy_logps, lengths, self.beta, self.delta), retain_loss)


class GradientAscentLoss(UnlearningLoss):
    r"""Gradient ascent (``retain_weight = 0``) and GradDiff (``retain_weight > 0``).

    .. math::

        \mathcal{L} = -w_f\,\mathrm{NLL}_{\text{forget}} + w_r\,\mathcal{L}_{\text{retain}}

    The forward's ``num_items_in_batch`` (keyword) is the number of forget tokens (sequences without ``lengths``) of
    the whole batch, over the micro-batches of the optimizer step and the ranks; see
    :func:`~lightning_losses.functional.gradient_ascent_loss`.

    Example:
        >>> import torch
        >>> float(GradientAscentLoss()(torch.tensor([-6.0]), torch.tensor([3])))
        -2.0
    """

    def forward(
        self,
        forget_logps: Tensor,
        lengths: Tensor | None = None,
        retain_loss: Tensor | None = None,
        *,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        forget = gradient_ascent_loss(forget_logps, lengths, num_items_in_batch=num_items_in_batch)
        return self.combine(forget, retain_loss)


class FLATLoss(UnlearningLoss):
    r"""FLAT: :math:`\mathbb{E}[-g(P_{\text{template}}) + f^*(g(P_{\text{forget}}))]` for an f-divergence.

    Args:
        divergence: ``"tv"`` (default), ``"kl"``, ``"reverse_kl"``, ``"pearson"``, ``"js"`` or ``"hellinger"``.
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r` (FLAT uses no retain data: default 0).

    Example:
        >>> import torch
        >>> loss = FLATLoss("js")
        >>> bool(loss(torch.tensor([0.9]), torch.tensor([0.1])) > loss(torch.tensor([0.1]), torch.tensor([0.9])))
        True
    """

    needs_template = True

    def __init__(self, divergence: Divergence = "tv", forget_weight: float = 1.0, retain_weight: float = 0.0) -> None:
        super().__init__(forget_weight, retain_weight)
        if not isinstance(divergence, str) or divergence not in FLAT_DIVERGENCES:
            raise ValueError(f"Unknown f-divergence {divergence!r}: expected one of {', '.join(FLAT_DIVERGENCES)}.")
        self.divergence: Divergence = divergence

    def forward(self, forget_probs: Tensor, template_probs: Tensor, retain_loss: Tensor | None = None) -> Tensor:
        return self.combine(flat_loss(forget_probs, template_probs, self.divergence), retain_loss)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, " + super().extra_repr()


class IdkDPOLoss(UnlearningLoss):
    r"""IdkDPO: DPO with the "I don't know" answer preferred to the forget answer, plus a retain term.

    Example:
        >>> import torch
        >>> z = torch.tensor([-2.0])
        >>> loss = IdkDPOLoss(retain_weight=0.0)
        >>> torch.allclose(loss(z, z, z, z), torch.tensor(20 * 0.6931472))
        True
    """

    needs_reference = True
    needs_template = True
    beta: Tensor

    def __init__(self, beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 1.0) -> None:
        super().__init__(forget_weight, retain_weight)
        _check_settings(beta=beta)
        self.register_hyperparameter("beta", beta, low=0.0, low_inclusive=False)

    def forward(
        self,
        policy_idk_logps: Tensor,
        reference_idk_logps: Tensor,
        policy_forget_logps: Tensor,
        reference_forget_logps: Tensor,
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        forget = idk_dpo_loss(
            policy_idk_logps, reference_idk_logps, policy_forget_logps, reference_forget_logps, self.beta
        )
        return self.combine(forget, retain_loss)

r"""Unlearning for classifiers: the class log-probability that plays the part of a sequence log-probability, and
the Blindspot objective (output distance to a partially trained model plus attention transfer).

For an image classifier a sample's "sequence" is its one label: :math:`\log \pi_\theta(y \mid x)` is the
log-softmax of the logits at the label (:func:`class_log_probs`), with length 1, so every unlearning loss of
:mod:`lightning_losses.functional.unlearning` (NPO, SimNPO, GA, FLAT, IdkDPO) applies to classifiers unchanged.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> [round(p, 4) for p in class_log_probs(logits, torch.tensor([0, 0])).exp().tolist()]
    [0.8808, 0.1192]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_losses.functional.feature_distillation import attention_transfer_loss
from lightning_losses.utilities.checks import check_targets
from lightning_losses.utilities.numerics import as_float32, autocast_disabled, hyperparameter_tensor

__all__ = ["blindspot_loss", "class_log_probs"]


def _check_logits(logits: Tensor, name: str) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`{name}` must be floating-point logits of shape (N, num_classes), got {shape}.")


def class_log_probs(logits: Tensor, target: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""Per-sample :math:`\log p_\theta(y \mid x) = z_y - \operatorname{logsumexp}_j z_j`, in float32.

    The classification counterpart of :func:`~lightning_losses.functional.sequence_log_probs` (a sequence of one
    answer token, the label).

    Args:
        logits: ``(N, C)`` class logits.
        target: ``(N,)`` class indices in ``[0, C)``.
        validate_args: Check the range of ``target`` (its dtype and shape are always checked).

    Returns:
        ``(N,)`` log-probabilities of the targets (with the gradient of ``logits``).

    Example:
        >>> torch.allclose(class_log_probs(torch.zeros(3, 4), torch.tensor([0, 1, 3])), torch.log(torch.tensor(0.25)))
        True
    """
    _check_logits(logits, "logits")
    check_targets(target, logits.shape[-1], logits.shape[0], validate=validate_args)
    with autocast_disabled(logits):
        (z,) = as_float32(logits)
        return z.log_softmax(-1).gather(-1, target.long()[:, None]).squeeze(-1)


def blindspot_loss(
    logits: Tensor,
    blindspot_logits: Tensor,
    activations: Sequence[Tensor] = (),
    blindspot_activations: Sequence[Tensor] = (),
    temperature: float | Tensor = 1.0,
    attention_weight: float | Tensor = 50.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Blindspot forget term: pull the model toward a partially trained "blindspot" model on the forget data.

    .. math::

        \mathcal{L}_{\text{forget}} = \frac1N \sum_{i} \mathrm{KL}\big(\sigma(b_i / T) \,\|\, \sigma(z_i / T)\big)
            + \lambda_{AT} \sum_{l} \operatorname{mean}\big((a(h^\theta_l) - a(h^b_l))^2\big)

    with :math:`z` the logits of the model being unlearned, :math:`b` those of the blindspot model (randomly
    initialised, then trained briefly on the retain data only: it has never seen the forget data),
    :math:`h_l` the activations of layer :math:`l` and :math:`a` the attention map of attention transfer (the
    L2-normalised channel mean of the squared activation, :func:`~lightning_losses.functional.attention_map`;
    each term is :func:`~lightning_losses.functional.attention_transfer_loss`). A ``(N, D)`` activation (a linear
    layer) is read as one channel of ``D`` positions: its map is the normalised squared activation.

    Source: Tarun, Chundawat, Mandal, Kankanhalli, "Deep Regression Unlearning" (ICML 2023), official code
    ``ayushkumartarun/deep-regression-unlearning``, ``unlearn.py`` (``forget_loss``, ``attention``,
    ``attention_diff``; ``AT_beta = 50``). The paper regresses one output, whose distance to the blindspot output
    is an L1 norm; for classifiers the distance between the two class distributions is the KL divergence, as in the
    same authors' bad-teacher unlearning. Like the official code, each layer's attention difference is a mean over
    samples and positions, and the layers are summed.

    Args:
        logits: ``(N, C)`` logits of the model being unlearned on forget samples.
        blindspot_logits: ``(N, C)`` logits of the blindspot model on the same samples (no gradient needed).
        activations: activations of the chosen layers of the model being unlearned (``(N, C_l, ...)`` each).
        blindspot_activations: the same layers of the blindspot model, in the same order.
        temperature: :math:`T > 0` of both softmaxes (a scalar or one value per sample).
        attention_weight: :math:`\lambda_{AT} \ge 0` (paper: 50).
        validate_args: Check that the logits are finite.

    Example:
        >>> z = torch.randn(4, 3)
        >>> float(blindspot_loss(z, z)) == 0.0
        True
        >>> bool(blindspot_loss(z, torch.zeros(4, 3)) > 0)
        True
    """
    _check_logits(logits, "logits")
    _check_logits(blindspot_logits, "blindspot_logits")
    if logits.shape != blindspot_logits.shape:
        raise ValueError(
            f"`logits` and `blindspot_logits` must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(blindspot_logits.shape)}: the blindspot model must have the model's classes."
        )
    if len(activations) != len(blindspot_activations):
        raise ValueError(
            f"Got {len(activations)} activations and {len(blindspot_activations)} blindspot activations: give the "
            "same layers of both models."
        )
    with autocast_disabled(logits):
        z, b = as_float32(logits, blindspot_logits.detach())
        t = hyperparameter_tensor(temperature, z, "temperature", positive=True, validate=validate_args)
        w = hyperparameter_tensor(
            attention_weight, z, "attention_weight", low=0.0, layout="any", validate=validate_args
        )
        if w.numel() != 1:
            raise ValueError(f"`attention_weight` must be a scalar, got shape {tuple(w.shape)}.")
        if validate_args and not (torch.isfinite(z).all() and torch.isfinite(b).all()):
            raise ValueError("`logits` and `blindspot_logits` must be finite; got NaN or infinite values.")
        log_q = (z / t).log_softmax(-1)
        log_p = (b / t).log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        loss = kl.mean() if kl.numel() else z.sum() * 0.0
        for h, hb in zip(activations, blindspot_activations):
            if h.ndim == 2:
                h, hb = h.unsqueeze(1), hb.unsqueeze(1)
            loss = loss + w * attention_transfer_loss(h, hb.detach(), validate_args=validate_args)
    return loss.reshape(())

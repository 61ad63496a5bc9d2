"""Adaptive temperature: the KL-DRO robust loss behind TempNet, its contrastive form, and LDR-KL / ALDR-KL.

All functions compute in float32 (float64 is kept) whatever the autocast state, and accept their hyperparameters
as Python numbers or tensors (a scalar, or one value per sample / token) so schedules and TempNet can drive them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses._utils import as_float32, check_targets

__all__ = [
    "aldr_kl_lambda",
    "aldr_kl_loss",
    "dro_temperature_loss",
    "ldr_kl_loss",
    "robust_contrastive_loss",
    "tempered_kl_to_uniform",
]

Reduction = Literal["mean", "sum", "none"]


def _as_tensor_like(value: float | Tensor, like: Tensor, name: str, *, positive: bool = False) -> Tensor:
    """A hyperparameter as a tensor on ``like``'s device in float32 (or float64 when ``like`` is)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(value, device=like.device, dtype=dtype)
    if positive and bool((t <= 0).any()):
        raise ValueError(f"`{name}` must be > 0, got {t.detach().flatten()[:8].tolist()}. Pass positive values.")
    return t


def _per_position(value: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Broadcast a scalar or per-position hyperparameter to ``shape`` (the shape of the targets)."""
    if value.ndim == 0:
        return value.expand(shape)
    if value.shape == shape:
        return value
    if value.ndim == 1 and len(shape) >= 1 and value.shape[0] == shape[0]:
        return value.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    raise ValueError(
        f"`{name}` must be a scalar, one value per sample (shape ({shape[0] if len(shape) else 1},)) or one value "
        f"per position (shape {tuple(shape)}), got shape {tuple(value.shape)}."
    )


def _reduce(values: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return values if mask is None else values * mask
    if mask is not None:
        values = values * mask
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        if mask is None:
            return values.mean()
        return values.sum() / mask.sum().clamp_min(1)
    raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}.")


def tempered_kl_to_uniform(logits: Tensor, tau: float | Tensor) -> Tensor:
    r"""KL divergence of the tempered softmax from the uniform distribution, per row.

    .. math::
        \mathrm{KL}\big(\mathrm{softmax}(z/\tau)\,\|\,U\big) = \log V - H\big(\mathrm{softmax}(z/\tau)\big)

    At the temperature minimising the DRO loss this equals :math:`\rho` (the radius of the KL ball).

    Args:
        logits: ``(..., V)`` logits.
        tau: Temperature: a number, or a tensor broadcastable to ``logits.shape[:-1]``.

    Returns:
        ``logits.shape[:-1]`` KL values in nats, float32.

    Example:
        >>> round(float(tempered_kl_to_uniform(torch.zeros(1, 8), 1.0)), 6)
        0.0
    """
    (z,) = as_float32(logits)
    t = _as_tensor_like(tau, z, "tau", positive=True)
    if t.ndim:
        t = t.unsqueeze(-1)
    log_p = torch.log_softmax(z / t, dim=-1)
    return (log_p.exp() * log_p).sum(-1) + math.log(z.shape[-1])


def _dro_arg_validation(logits: Tensor, target: Tensor, rho: Tensor) -> None:
    if logits.ndim < 2:
        raise ValueError(f"`logits` must have shape (..., V) with at least 2 dimensions, got {tuple(logits.shape)}.")
    if target.shape != logits.shape[:-1] or target.is_floating_point():
        raise ValueError(
            f"`target` must be an integer tensor of shape {tuple(logits.shape[:-1])} (logits without the class "
            f"dimension), got dtype {target.dtype} and shape {tuple(target.shape)}."
        )
    vocab = logits.shape[-1]
    if bool((rho < 0).any()) or bool((rho >= math.log(vocab)).any()):
        raise ValueError(
            f"`rho` must lie in [0, log V) = [0, {math.log(vocab):.4f}) for V = {vocab} classes, got "
            f"{rho.detach().flatten()[:8].tolist()}. With rho >= log V the optimal temperature is tau_min whatever "
            "the logits; pass a smaller rho."
        )


def dro_temperature_loss(
    logits: Tensor,
    target: Tensor,
    tau: float | Tensor,
    rho: float | Tensor,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""KL-DRO robust loss with a (per-token) temperature, the objective that trains TempNet.

    The worst case of the margin :math:`z_j - z_y` over the distributions within a KL ball of radius :math:`\rho`
    around the uniform one has the dual form

    .. math::
        \max_{p:\,\mathrm{KL}(p\|U)\le\rho} \sum_j p_j (z_j - z_y)
        = \min_{\tau>0}\ \tau \log \frac{1}{V}\sum_{j=1}^{V} e^{(z_j - z_y)/\tau} + \tau\rho,

    computed as :math:`\tau\,\mathrm{CE}(z/\tau, y) + (\rho - \log V)\,\tau` and averaged over the positions whose
    target is not ``ignore_index``. Gradients reach the logits directly and the temperature through ``tau``, in
    closed form: :math:`\partial L/\partial z = \mathrm{softmax}(z/\tau) - e_y` (τ cancels) and
    :math:`\partial L/\partial \tau = \rho - \mathrm{KL}(\mathrm{softmax}(z/\tau)\,\|\,U)`, zero exactly at the
    KL-ball boundary. One pass over the logits each way; only the tempered softmax is kept for the backward (as
    for a cross-entropy). Second derivatives are not supported.

    Args:
        logits: ``(..., V)`` logits (tokens or samples × classes).
        target: ``(...)`` integer targets; ``ignore_index`` marks positions to skip.
        tau: Temperature, > 0: a number, one per sample (shape ``(N,)``) or one per position (``target.shape``).
        rho: KL-ball radius in ``[0, log V)``: a number or a tensor (scalar or per position).
        ignore_index: Target value of positions that do not count.
        reduction: ``"mean"`` over counted positions, ``"sum"``, or ``"none"`` (ignored positions give 0).
        validate_args: Check shapes and the range of ``rho`` (costs a device sync).

    Returns:
        The loss (float32), a scalar or of shape ``target.shape``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> target = torch.tensor([0])
        >>> loss = dro_temperature_loss(logits, target, tau=1.0, rho=0.0)
        >>> expected = torch.logsumexp(logits - 2.0, -1) - math.log(3)
        >>> bool(torch.isclose(loss, expected.squeeze()))
        True
    """
    (z,) = as_float32(logits)
    rho_t = _as_tensor_like(rho, z, "rho")
    if validate_args:
        _dro_arg_validation(z, target, rho_t)
    shape = target.shape
    tau_t = _per_position(_as_tensor_like(tau, z, "tau", positive=validate_args), shape, "tau")
    rho_t = _per_position(rho_t, shape, "rho")
    vocab = z.shape[-1]
    per_position = _DROTemperature.apply(
        z.reshape(-1, vocab), target.reshape(-1), tau_t.reshape(-1), rho_t.reshape(-1), ignore_index
    ).view(shape)
    mask = target != ignore_index
    return _reduce(per_position, mask.to(per_position.dtype), reduction)


class _DROTemperature(torch.autograd.Function):
    r"""Per-position DRO loss with closed-form gradients, one pass over the ``(M, V)`` logits each way.

    With :math:`p = \mathrm{softmax}(z/\tau)` the loss :math:`\tau\,\mathrm{lse}(z/\tau) - z_y + (\rho - \log V)\tau`
    has :math:`\partial/\partial z = p - e_y` (τ cancels), :math:`\partial/\partial\tau = \rho - \mathrm{KL}(p\|U)
    = \rho - \log V + H(p)` and :math:`\partial/\partial\rho = \tau`. Only ``p`` (as large as the logits) and
    three per-position vectors are saved, as for a plain cross-entropy; positions whose target is ``ignore_index``
    give 0 and receive no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, target: Tensor, tau: Tensor, rho: Tensor, ignore_index: int
    ) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            log_p = torch.log_softmax(z / tau.unsqueeze(-1), dim=-1)
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1)
            keep = target != ignore_index
            safe_target = torch.where(keep, target, torch.zeros_like(target))
            nll = -log_p.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
            log_v = math.log(z.shape[-1])
            loss = torch.where(keep, tau * nll + (rho - log_v) * tau, torch.zeros_like(nll))
        ctx.save_for_backward(p, safe_target, keep, entropy, tau, rho)
        ctx.log_v = log_v
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        p, safe_target, keep, entropy, tau, rho = ctx.saved_tensors
        g = torch.where(keep, grad, torch.zeros_like(grad))
        grad_z = grad_tau = grad_rho = None
        if ctx.needs_input_grad[0]:
            grad_z = p * g.unsqueeze(-1)
            grad_z.scatter_add_(-1, safe_target.unsqueeze(-1), -g.unsqueeze(-1))
        if ctx.needs_input_grad[2]:
            grad_tau = g * (rho - ctx.log_v + entropy)
        if ctx.needs_input_grad[3]:
            grad_rho = g * tau
        return grad_z, None, grad_tau, grad_rho, None


def robust_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    tau_image: float | Tensor,
    tau_text: float | Tensor,
    rho: float | Tensor,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Exact (full-batch) KL-DRO contrastive loss with per-anchor temperatures, both directions.

    With similarities :math:`s_{ij} = x_i^\top t_j` and margins :math:`h_{ij} = s_{ij} - s_{ii}`:

    .. math::
        F_i = \tau_i \log\frac{1}{B-1}\sum_{j\ne i} e^{h_{ij}/\tau_i} + \tau_i\rho,
        \qquad L = \frac1B\sum_i F^{\text{image}}_i + \frac1B\sum_i F^{\text{text}}_i,

    where the text term uses :math:`h_{ij} = s_{ji} - s_{ii}` and the text temperatures. This is the quantity
    that :class:`~lightning_losses.losses.RobustContrastiveLoss` estimates with per-sample moving averages (they
    agree exactly when its moving-average rate is 1).

    Args:
        image_features: ``(B, d)`` image embeddings (L2-normalised by the caller).
        text_features: ``(B, d)`` paired text embeddings.
        tau_image: Image-anchor temperatures: a number or shape ``(B,)``.
        tau_text: Text-anchor temperatures: a number or shape ``(B,)``.
        rho: KL-ball radius, below ``log(B - 1)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (returns ``(B, 2)``: image and text terms).

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
        >>> loss = robust_contrastive_loss(x, x, 0.1, 0.1, rho=0.5)
        >>> bool(torch.isfinite(loss))
        True
    """
    x, t = as_float32(image_features, text_features)
    if x.ndim != 2 or x.shape != t.shape or x.shape[0] < 2:
        raise ValueError(
            "`image_features` and `text_features` must both have shape (B, d) with B >= 2, got "
            f"{tuple(x.shape)} and {tuple(t.shape)}."
        )
    batch = x.shape[0]
    sim = x @ t.T
    diag = sim.diagonal()
    eye = torch.eye(batch, dtype=torch.bool, device=x.device)
    terms = []
    for margins, tau in ((sim - diag[:, None], tau_image), (sim.T - diag[:, None], tau_text)):
        tau_t = _per_position(_as_tensor_like(tau, x, "tau", positive=True), torch.Size([batch]), "tau")
        scaled = (margins / tau_t[:, None]).masked_fill(eye, float("-inf"))
        rho_t = _as_tensor_like(rho, x, "rho")
        terms.append(tau_t * (torch.logsumexp(scaled, dim=1) - math.log(batch - 1) + rho_t))
    per_anchor = torch.stack(terms, dim=1)
    if reduction == "none":
        return per_anchor
    return _reduce(per_anchor, None, reduction) * (2.0 if reduction == "mean" else 1.0)


def _ldr_margins(logits: Tensor, target: Tensor, margin: float | Tensor, rescale_logits: bool) -> Tensor:
    (f,) = as_float32(logits)
    if f.ndim != 2:
        raise ValueError(f"`logits` must have shape (N, K), got {tuple(f.shape)}.")
    check_targets(target, f.shape[1], f.shape[0])
    if rescale_logits:
        f = f / (f.abs().mean(dim=1, keepdim=True) + 1e-12)
    c = _per_position(_as_tensor_like(margin, f, "margin"), torch.Size([f.shape[0]]), "margin")
    not_target = 1.0 - F.one_hot(target, f.shape[1]).to(f.dtype)
    return c[:, None] * not_target + f - f.gather(1, target[:, None])


def ldr_kl_loss(
    logits: Tensor,
    target: Tensor,
    lam: float | Tensor = 10.0,
    margin: float | Tensor = 0.1,
    rescale_logits: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Label-distributionally-robust loss with a KL regulariser (LDR-KL).

    With margins :math:`\ell_k = c\,\mathbb 1[k\ne y] + f_k - f_y`:

    .. math::
        L = \lambda \log \frac1K \sum_{k=1}^{K} e^{\ell_k/\lambda}.

    :math:`\lambda\to 0` gives the top margin :math:`\max_k \ell_k` (a multi-class hinge); :math:`\lambda\to\infty`
    gives the mean margin.

    Args:
        logits: ``(N, K)`` scores.
        target: ``(N,)`` class indices.
        lam: Regularisation strength λ > 0: a number or one per sample.
        margin: Margin ``c`` added to the non-target scores.
        rescale_logits: Divide each row by its mean absolute value first (the reference setting).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> logits = torch.tensor([[3.0, 0.0, 0.0]])
        >>> loss = ldr_kl_loss(logits, torch.tensor([0]), lam=1.0, margin=0.0)
        >>> expected = math.log((1 + 2 * math.exp(-3.0)) / 3)
        >>> round(float(loss), 5) == round(expected, 5)
        True
    """
    margins = _ldr_margins(logits, target, margin, rescale_logits)
    lam_t = _per_position(_as_tensor_like(lam, margins, "lam", positive=True), torch.Size([margins.shape[0]]), "lam")
    per_sample = lam_t * (torch.logsumexp(margins / lam_t[:, None], dim=1) - math.log(margins.shape[1]))
    return _reduce(per_sample, None, reduction)


def aldr_kl_lambda(
    logits: Tensor,
    previous_lam: float | Tensor,
    lam0: float = 10.0,
    alpha: float = 2.0,
    rescale_logits: bool = False,
) -> Tensor:
    r"""ALDR-KL's per-sample λ update (no gradient).

    .. math::
        p = \mathrm{normalize}\big(\mathrm{softmax}(f/\lambda_{\text{old}}) + 10^{-5}\big), \qquad
        \lambda = \lambda_0\Big(1 - \frac{\mathrm{KL}(p\,\|\,U)}{\alpha \log K}\Big) \in
        \big[\lambda_0(1 - 1/\alpha),\ \lambda_0\big].

    Confident (peaked) predictions get a small λ (close to a hinge), uncertain ones a large λ (close to the mean).

    Example:
        >>> lam = aldr_kl_lambda(torch.tensor([[0.0, 0.0], [50.0, -50.0]]), 10.0, lam0=10.0, alpha=2.0)
        >>> [round(v, 2) for v in lam.tolist()]
        [10.0, 5.0]
    """
    if alpha <= 1:
        raise ValueError(f"`alpha` must be > 1 so that λ stays positive, got {alpha}.")
    if lam0 <= 0:
        raise ValueError(f"`lam0` must be > 0, got {lam0}.")
    with torch.no_grad():
        (f,) = as_float32(logits.detach())
        if rescale_logits:
            f = f / (f.abs().mean(dim=1, keepdim=True) + 1e-12)
        old = _per_position(_as_tensor_like(previous_lam, f, "previous_lam", positive=True), f.shape[:1], "lam")
        p = torch.softmax(f / old[:, None], dim=1) + 1e-5
        p = p / p.sum(dim=1, keepdim=True)
        num_classes = f.shape[1]
        kl = (p * (p.log() + math.log(num_classes))).sum(dim=1).clamp(0.0, math.log(num_classes))
        return lam0 * (1.0 - kl / (alpha * math.log(num_classes)))


def aldr_kl_loss(
    logits: Tensor,
    target: Tensor,
    lam: float | Tensor,
    lam0: float = 10.0,
    alpha: float = 2.0,
    margin: float | Tensor = 0.1,
    rescale_logits: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Adaptive LDR-KL: LDR-KL with the per-sample λ of :func:`aldr_kl_lambda` (taken as a constant).

    .. math::
        L_i = \lambda_i \log \frac1K \sum_k e^{\ell_{ik}/\lambda_i}
              - \frac{\alpha\log K}{2\lambda_0}(\lambda_i - \lambda_0)^2 .

    Args:
        logits: ``(N, K)`` scores.
        target: ``(N,)`` class indices.
        lam: The per-sample λ (``(N,)``, detached), usually from :func:`aldr_kl_lambda`.
        lam0: Reference λ0.
        alpha: α > 1: λ lives in ``[λ0(1 - 1/α), λ0]``.
        margin: Margin ``c`` on the non-target scores.
        rescale_logits: Divide each row by its mean absolute value first.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> lam = aldr_kl_lambda(logits, 10.0)
        >>> bool(torch.isfinite(aldr_kl_loss(logits, target, lam)))
        True
    """
    margins = _ldr_margins(logits, target, margin, rescale_logits)
    n, k = margins.shape
    lam_t = _per_position(_as_tensor_like(lam, margins, "lam", positive=True), torch.Size([n]), "lam").detach()
    dro = lam_t * (torch.logsumexp(margins / lam_t[:, None], dim=1) - math.log(k))
    penalty = alpha * math.log(k) / (2.0 * lam0) * (lam_t - lam0) ** 2
    return _reduce(dro - penalty, None, reduction)

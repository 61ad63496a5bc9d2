"""Adaptive temperature: the KL-DRO robust loss behind TempNet, its contrastive form, and LDR-KL / ALDR-KL.

All functions compute in float32 (float64 is kept) whatever the autocast state, and accept their hyperparameters
as Python numbers or tensors (a scalar, or one value per sample / token) so schedules and TempNet can drive them.

Bad input raises a ``TypeError`` (not a tensor, not floating-point) or a ``ValueError`` (shape, range, fewer than two
classes) naming the argument. ``validate_args=True`` (the default) also checks tensor values: finite logits and
features, targets within the classes, tensor hyperparameters finite and within their range; these checks are read
with one host synchronisation per call, and ``validate_args=False`` skips them. The mean over an empty batch is 0.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.utilities.checks import (
    DeferredChecks,
    NumItems,
    check_hyperparameter,
    check_int,
    check_labels,
    check_num_items,
    check_reduction,
    check_targets,
    check_tensor,
    start_checks,
)
from lightning_losses.utilities.numerics import (
    as_float32,
    autocast_disabled,
    compute_dtype,
    expand_hyperparameter,
    hyperparameter_tensor,
    reduce_loss,
)

__all__ = [
    "aldr_kl_lambda",
    "aldr_kl_loss",
    "dro_temperature_loss",
    "ldr_kl_loss",
    "robust_contrastive_loss",
    "tempered_kl_to_uniform",
]

Reduction = Literal["mean", "sum", "none"]


def _check_logits(logits: object, name: str = "logits", *, ndim: int | None = None, min_classes: int = 1) -> None:
    check_tensor(logits, name)
    assert isinstance(logits, Tensor)
    if ndim is not None and logits.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions (N, K), got shape {tuple(logits.shape)}.")
    if logits.ndim < 1:
        raise ValueError(f"`{name}` must have a class dimension (shape (..., V)), got a 0-d tensor.")
    if logits.shape[-1] < min_classes:
        raise ValueError(
            f"`{name}` must have at least {min_classes} classes in its last dimension, got shape "
            f"{tuple(logits.shape)}. With one class the loss is constant (log K = 0): add classes."
        )


def tempered_kl_to_uniform(logits: Tensor, tau: float | Tensor, *, validate_args: bool = True) -> Tensor:
    r"""KL divergence of the tempered softmax from the uniform distribution, per row.

    .. math::
        \mathrm{KL}\big(\mathrm{softmax}(z/\tau)\,\|\,U\big) = \log V - H\big(\mathrm{softmax}(z/\tau)\big)

    At the temperature minimising the DRO loss this equals :math:`\rho` (the radius of the KL ball).

    Args:
        logits: ``(..., V)`` logits.
        tau: Temperature > 0: a number, a 0-d tensor, one value per row (``logits.shape[:-1]``) or per sample
            (``(N,)``).
        validate_args: Check that the logits are finite and a tensor ``tau`` is finite and positive.

    Returns:
        ``logits.shape[:-1]`` KL values in nats, float32.

    Example:
        >>> round(float(tempered_kl_to_uniform(torch.zeros(1, 8), 1.0)), 6)
        0.0
    """
    _check_logits(logits)
    checks = start_checks(validate_args, (logits, "logits"))
    (z,) = as_float32(logits)
    dtype = compute_dtype(z.dtype)
    t = hyperparameter_tensor(
        tau, z, "tau", positive=True, dtype=dtype, layout="any", checks=checks, validate=validate_args
    )
    checks.run()
    if t.ndim:
        t = expand_hyperparameter(t, z.shape[:-1], "tau").unsqueeze(-1)
    log_p = torch.log_softmax(z / t, dim=-1)
    return (log_p.exp() * log_p).sum(-1) + math.log(z.shape[-1])


def _dro_arg_validation(
    logits: Tensor, target: Tensor, ignore_index: int, reduction: str, num_items_in_batch: NumItems
) -> None:
    """The checks that read no tensor value (always run)."""
    check_tensor(logits, "logits")
    if logits.ndim < 2:
        raise ValueError(f"`logits` must have shape (..., V) with at least 2 dimensions, got {tuple(logits.shape)}.")
    if logits.shape[-1] < 2:
        raise ValueError(
            f"`logits` must have at least 2 classes (V >= 2), got shape {tuple(logits.shape)}: with one class the "
            "KL ball around the uniform distribution is a point (log V = 0) and no rho is admissible."
        )
    check_tensor(target, "target", floating=False)
    bad_dtype = target.is_floating_point() or target.is_complex() or target.dtype == torch.bool
    if target.shape != logits.shape[:-1] or bad_dtype:
        raise ValueError(
            f"`target` must be an integer tensor of shape {tuple(logits.shape[:-1])} (logits without the class "
            f"dimension), got dtype {target.dtype} and shape {tuple(target.shape)}."
        )
    check_int(ignore_index, "ignore_index")
    check_reduction(reduction, num_items_in_batch=num_items_in_batch)


def _rho_check(rho: float | Tensor, vocab: int, checks: DeferredChecks, validate: bool) -> None:
    """``rho`` in ``[0, log vocab)``, with the reason in the message."""
    log_v = math.log(vocab)

    def error() -> Exception:
        shown = rho.detach().flatten()[:8].tolist() if isinstance(rho, Tensor) else rho
        return ValueError(
            f"`rho` must lie in [0, log V) = [0, {log_v:.4f}) for V = {vocab} classes, got {shown}. With "
            "rho >= log V the optimal temperature is tau_min whatever the logits; pass a smaller rho."
        )

    if isinstance(rho, Tensor):
        check_hyperparameter(rho, "rho", validate=False)
        if validate:
            r = rho.detach()
            checks.require(((r >= 0) & (r < log_v)).all(), error)
        return
    check_hyperparameter(rho, "rho")
    if not 0 <= rho < log_v:
        raise error()


def dro_temperature_loss(
    logits: Tensor,
    target: Tensor,
    tau: float | Tensor,
    rho: float | Tensor,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    validate_args: bool = True,
    *,
    num_items_in_batch: NumItems = None,
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
        reduction: ``"mean"`` over counted positions (0 when none counts), ``"sum"``, or ``"none"`` (ignored
            positions give 0).
        validate_args: Check the values of the tensors: finite logits, targets in ``[0, V)`` (or ``ignore_index``),
            tensor ``tau`` > 0, tensor ``rho`` in ``[0, log V)``, a tensor ``num_items_in_batch`` > 0 (one host
            synchronisation). Shapes, dtypes and Python numbers are always checked.
        num_items_in_batch: With ``reduction="mean"``, the number of counted positions of the whole batch this call
            is part of (every micro-batch of the optimizer step on every rank, divided by the factor the gradients
            are later divided by). ``None`` (default) divides by this call's counted positions; otherwise the loss
            is :math:`\frac{1}{n_{\text{items}}}\sum_{i\,\text{counted}} \ell_i`, so that the micro-batch losses
            sum to the token mean of the whole batch.

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
    _dro_arg_validation(logits, target, ignore_index, reduction, num_items_in_batch)
    vocab = logits.shape[-1]
    checks = start_checks(validate_args, (logits, "logits"))
    _rho_check(rho, vocab, checks, validate_args)
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    if validate_args:
        hint = "Mark positions that do not count with ignore_index."
        check_labels(target, vocab, ignore_index, checks, "target", kind="class indices", hint=hint)
    (z,) = as_float32(logits)
    shape = target.shape
    dtype = compute_dtype(z.dtype)
    tau_t = hyperparameter_tensor(
        tau,
        z,
        "tau",
        positive=True,
        dtype=dtype,
        layout="position",
        lead_shape=shape,
        checks=checks,
        validate=validate_args,
    )
    rho_t = hyperparameter_tensor(rho, z, "rho", dtype=dtype, layout="position", lead_shape=shape, validate=False)
    checks.run()
    per_position = _DROTemperature.apply(
        z.reshape(-1, vocab), target.reshape(-1), tau_t.reshape(-1), rho_t.reshape(-1), ignore_index
    ).view(shape)
    mask = target != ignore_index
    mask = mask.to(per_position.dtype)
    return reduce_loss(per_position, reduction, mask=mask, num_items_in_batch=num_items_in_batch)


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
        with autocast_disabled(z):
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
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Exact (full-batch) KL-DRO contrastive loss with per-anchor temperatures, both directions.

    With similarities :math:`s_{ij} = x_i^\top t_j` and margins :math:`h_{ij} = s_{ij} - s_{ii}`:

    .. math::
        F_i = \tau_i \log\frac{1}{B-1}\sum_{j\ne i} e^{h_{ij}/\tau_i} + \tau_i\rho,
        \qquad L = \frac1B\sum_i F^{\text{image}}_i + \frac1B\sum_i F^{\text{text}}_i,

    where the text term uses :math:`h_{ij} = s_{ji} - s_{ii}` and the text temperatures. This is the quantity
    that :class:`~lightning_losses.losses.RobustContrastiveLoss` estimates with per-sample moving averages (they
    agree exactly when its moving-average rate is 1). The similarities are computed in float32 (float64 kept) with
    autocast disabled, so a bf16 autocast region does not round them.

    Args:
        image_features: ``(B, d)`` image embeddings (L2-normalised by the caller), ``B >= 3``.
        text_features: ``(B, d)`` paired text embeddings.
        tau_image: Image-anchor temperatures > 0: a number or shape ``(B,)``.
        tau_text: Text-anchor temperatures > 0: a number or shape ``(B,)``.
        rho: KL-ball radius in ``[0, log(B - 1))``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (returns ``(B, 2)``: image and text terms).
        validate_args: Check that the features are finite and tensor temperatures / ``rho`` are in range.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
        >>> loss = robust_contrastive_loss(x, x, 0.1, 0.1, rho=0.5)
        >>> bool(torch.isfinite(loss))
        True
    """
    check_tensor(image_features, "image_features")
    check_tensor(text_features, "text_features")
    if image_features.ndim != 2 or image_features.shape != text_features.shape or image_features.shape[0] < 3:
        raise ValueError(
            "`image_features` and `text_features` must both have shape (B, d) with B >= 3 (at least 2 negatives "
            f"per anchor, so that log(B - 1) > 0 leaves room for rho), got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}."
        )
    check_reduction(reduction)
    checks = start_checks(validate_args, (image_features, "image_features"), (text_features, "text_features"))
    x, t = as_float32(image_features, text_features)
    dtype = torch.promote_types(x.dtype, t.dtype)
    x, t = x.to(dtype), t.to(dtype)
    batch = x.shape[0]
    log_m = math.log(batch - 1)
    taus = [
        hyperparameter_tensor(
            tau,
            x,
            name,
            positive=True,
            dtype=compute_dtype(x.dtype),
            layout="position",
            lead_shape=(batch,),
            checks=checks,
            validate=validate_args,
        )
        for tau, name in ((tau_image, "tau_image"), (tau_text, "tau_text"))
    ]
    if isinstance(rho, Tensor):
        check_hyperparameter(rho, "rho", validate=False)
    else:
        check_hyperparameter(rho, "rho", low=0.0, high=log_m, high_inclusive=False)
    if validate_args and isinstance(rho, Tensor):
        check_hyperparameter(rho, "rho", low=0.0, high=log_m, high_inclusive=False, checks=checks)
    rho_t = hyperparameter_tensor(rho, x, "rho", dtype=compute_dtype(x.dtype), layout="any", validate=False)
    checks.run()
    with autocast_disabled(x):
        sim = x @ t.T
        diag = sim.diagonal()
        eye = torch.eye(batch, dtype=torch.bool, device=x.device)
        terms = []
        for margins, tau_t in ((sim - diag[:, None], taus[0]), (sim.T - diag[:, None], taus[1])):
            scaled = (margins / tau_t[:, None]).masked_fill(eye, float("-inf"))
            terms.append(tau_t * (torch.logsumexp(scaled, dim=1) - log_m + rho_t))
        per_anchor = torch.stack(terms, dim=1)
    if reduction == "none":
        return per_anchor
    return reduce_loss(per_anchor, reduction) * (2.0 if reduction == "mean" else 1.0)


def _ldr_prepare(
    logits: Tensor,
    target: Tensor,
    lam: float | Tensor,
    margin: float | Tensor,
    rescale_logits: bool,
    reduction: str,
    validate_args: bool,
) -> tuple[Tensor, Tensor]:
    r"""Validate the LDR arguments (one synchronisation for the value checks) and return ``(margins, lam)``.

    The margins are :math:`c\,\mathbb 1[k\ne y] + f_k - f_y` of shape ``(N, K)``, ``lam`` has shape ``(N,)``.
    """
    _check_logits(logits, ndim=2, min_classes=2)
    check_reduction(reduction)
    if not isinstance(rescale_logits, bool):
        raise TypeError(f"`rescale_logits` must be a bool, got {type(rescale_logits).__name__}.")
    checks = start_checks(validate_args, (logits, "logits"))
    check_targets(target, logits.shape[1], logits.shape[0], checks=checks, validate=validate_args)
    (f,) = as_float32(logits)
    rows = torch.Size([f.shape[0]])
    dtype, v = compute_dtype(f.dtype), validate_args
    c = hyperparameter_tensor(
        margin, f, "margin", low=0.0, dtype=dtype, layout="position", lead_shape=rows, checks=checks, validate=v
    )
    lam_t = hyperparameter_tensor(
        lam, f, "lam", positive=True, dtype=dtype, layout="position", lead_shape=rows, checks=checks, validate=v
    )
    checks.run()
    if rescale_logits:
        f = f / (f.abs().mean(dim=1, keepdim=True) + 1e-12)
    not_target = 1.0 - F.one_hot(target, f.shape[1]).to(f.dtype)
    return c[:, None] * not_target + f - f.gather(1, target[:, None]), lam_t


def ldr_kl_loss(
    logits: Tensor,
    target: Tensor,
    lam: float | Tensor = 10.0,
    margin: float | Tensor = 0.1,
    rescale_logits: bool = False,
    reduction: Reduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Label-distributionally-robust loss with a KL regulariser (LDR-KL).

    With margins :math:`\ell_k = c\,\mathbb 1[k\ne y] + f_k - f_y`:

    .. math::
        L = \lambda \log \frac1K \sum_{k=1}^{K} e^{\ell_k/\lambda}.

    :math:`\lambda\to 0` gives the top margin :math:`\max_k \ell_k` (a multi-class hinge); :math:`\lambda\to\infty`
    gives the mean margin.

    Args:
        logits: ``(N, K)`` scores, ``K >= 2``.
        target: ``(N,)`` class indices.
        lam: Regularisation strength λ > 0: a number or one per sample.
        margin: Margin ``c >= 0`` added to the non-target scores.
        rescale_logits: Divide each row by its mean absolute value first (the reference setting).
        reduction: ``"mean"`` (0 for an empty batch), ``"sum"`` or ``"none"``.
        validate_args: Check that the logits are finite, ``target`` lies in ``[0, K)`` and tensor ``lam`` /
            ``margin`` are in range (one host synchronisation).

    Example:
        >>> logits = torch.tensor([[3.0, 0.0, 0.0]])
        >>> loss = ldr_kl_loss(logits, torch.tensor([0]), lam=1.0, margin=0.0)
        >>> expected = math.log((1 + 2 * math.exp(-3.0)) / 3)
        >>> round(float(loss), 5) == round(expected, 5)
        True
    """
    margins, lam_t = _ldr_prepare(logits, target, lam, margin, rescale_logits, reduction, validate_args)
    per_sample = lam_t * (torch.logsumexp(margins / lam_t[:, None], dim=1) - math.log(margins.shape[1]))
    return reduce_loss(per_sample, reduction)


def aldr_kl_lambda(
    logits: Tensor,
    previous_lam: float | Tensor,
    lam0: float = 10.0,
    alpha: float = 2.0,
    rescale_logits: bool = False,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""ALDR-KL's per-sample λ update (no gradient).

    .. math::
        p = \mathrm{normalize}\big(\mathrm{softmax}(f/\lambda_{\text{old}}) + 10^{-5}\big), \qquad
        \lambda = \lambda_0\Big(1 - \frac{\mathrm{KL}(p\,\|\,U)}{\alpha \log K}\Big) \in
        \big[\lambda_0(1 - 1/\alpha),\ \lambda_0\big].

    Confident (peaked) predictions get a small λ (close to a hinge), uncertain ones a large λ (close to the mean).

    Args:
        logits: ``(N, K)`` scores, ``K >= 2`` (the update divides by :math:`\log K`).
        previous_lam: The previous λ > 0: a number or one per sample.
        lam0: Reference λ0 > 0 (a finite number).
        alpha: α > 1 (a finite number).
        rescale_logits: Divide each row by its mean absolute value first.
        validate_args: Check that the logits are finite and a tensor ``previous_lam`` is finite and positive.

    Example:
        >>> lam = aldr_kl_lambda(torch.tensor([[0.0, 0.0], [50.0, -50.0]]), 10.0, lam0=10.0, alpha=2.0)
        >>> [round(v, 2) for v in lam.tolist()]
        [10.0, 5.0]
    """
    _check_logits(logits, ndim=2, min_classes=2)
    _aldr_constants_validation(lam0, alpha)
    checks = start_checks(validate_args, (logits, "logits"))
    with torch.no_grad():
        (f,) = as_float32(logits.detach())
        if rescale_logits:
            f = f / (f.abs().mean(dim=1, keepdim=True) + 1e-12)
        old = hyperparameter_tensor(
            previous_lam,
            f,
            "previous_lam",
            positive=True,
            dtype=compute_dtype(f.dtype),
            layout="position",
            lead_shape=f.shape[:1],
            checks=checks,
            validate=validate_args,
        )
        checks.run()
        p = torch.softmax(f / old[:, None], dim=1) + 1e-5
        p = p / p.sum(dim=1, keepdim=True)
        num_classes = f.shape[1]
        kl = (p * (p.log() + math.log(num_classes))).sum(dim=1).clamp(0.0, math.log(num_classes))
        return lam0 * (1.0 - kl / (alpha * math.log(num_classes)))


def _aldr_constants_validation(lam0: float | Tensor, alpha: float | Tensor) -> None:
    """``lam0 > 0`` and ``alpha > 1``, finite (numbers or one-element tensors, read at once)."""
    for value, name in ((lam0, "lam0"), (alpha, "alpha")):
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"`{name}` must be a number, got a tensor of shape {tuple(value.shape)}.")
    lam0_v = float(lam0) if isinstance(lam0, Tensor) else lam0
    alpha_v = float(alpha) if isinstance(alpha, Tensor) else alpha
    check_hyperparameter(lam0_v, "lam0", low=0.0, low_inclusive=False)
    if isinstance(alpha_v, bool) or not isinstance(alpha_v, (int, float)):
        raise TypeError(f"`alpha` must be a real number, got {type(alpha_v).__name__} ({alpha_v!r}).")
    if not (math.isfinite(alpha_v) and alpha_v > 1):
        raise ValueError(f"`alpha` must be > 1 (and finite) so that λ stays positive, got {alpha_v}.")


def aldr_kl_loss(
    logits: Tensor,
    target: Tensor,
    lam: float | Tensor,
    lam0: float = 10.0,
    alpha: float = 2.0,
    margin: float | Tensor = 0.1,
    rescale_logits: bool = False,
    reduction: Reduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Adaptive LDR-KL: LDR-KL with the per-sample λ of :func:`aldr_kl_lambda` (taken as a constant).

    .. math::
        L_i = \lambda_i \log \frac1K \sum_k e^{\ell_{ik}/\lambda_i}
              - \frac{\alpha\log K}{2\lambda_0}(\lambda_i - \lambda_0)^2 .

    Args:
        logits: ``(N, K)`` scores, ``K >= 2``.
        target: ``(N,)`` class indices.
        lam: The per-sample λ > 0 (``(N,)``, detached), usually from :func:`aldr_kl_lambda`.
        lam0: Reference λ0 > 0.
        alpha: α > 1: λ lives in ``[λ0(1 - 1/α), λ0]``.
        margin: Margin ``c >= 0`` on the non-target scores.
        rescale_logits: Divide each row by its mean absolute value first.
        reduction: ``"mean"`` (0 for an empty batch), ``"sum"`` or ``"none"``.
        validate_args: Check that the logits are finite, ``target`` lies in ``[0, K)`` and tensor ``lam`` /
            ``margin`` are in range (one host synchronisation).

    Example:
        >>> logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> lam = aldr_kl_lambda(logits, 10.0)
        >>> bool(torch.isfinite(aldr_kl_loss(logits, target, lam)))
        True
    """
    _aldr_constants_validation(lam0, alpha)
    lam0, alpha = float(lam0), float(alpha)
    margins, lam_t = _ldr_prepare(logits, target, lam, margin, rescale_logits, reduction, validate_args)
    k = margins.shape[1]
    lam_t = lam_t.detach()
    dro = lam_t * (torch.logsumexp(margins / lam_t[:, None], dim=1) - math.log(k))
    penalty = alpha * math.log(k) / (2.0 * lam0) * (lam_t - lam0) ** 2
    return reduce_loss(dro - penalty, reduction)

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
    check_choice,
    check_hyperparameter,
    check_int,
    check_labels,
    check_num_items,
    check_reduction,
    check_targets,
    check_tensor,
    finite_error,
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
    "amcl_loss",
    "amcl_temperature_penalty",
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
    checks = DeferredChecks()
    finite = None
    if validate_args:
        # The logits' finiteness is read from the forward's per-position entropy, which is finite exactly where the
        # row of logits is (see `_DROTemperature`): a reduction of M values instead of a pass over the M x V logits.
        # The flag is queued first, as the logits check always was, and filled in by the forward.
        finite = torch.ones((), dtype=torch.bool, device=logits.device)
        checks.require(finite, lambda: finite_error(logits, "logits"))
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
    # (..., V) as given: a view such as `logits[:, :-1]` is not copied to (N, V) first. The value checks run after
    # the forward (one synchronisation, the same first error); targets are clamped into range meanwhile so that a bad
    # one is reported by its check rather than by the gather.
    per_position = _DROTemperature.apply(z, target, tau_t, rho_t, ignore_index, finite)
    checks.run()
    mask = target != ignore_index
    mask = mask.to(per_position.dtype)
    return reduce_loss(per_position, reduction, mask=mask, num_items_in_batch=num_items_in_batch)


class _DROTemperature(torch.autograd.Function):
    r"""Per-position DRO loss with closed-form gradients, one pass over the ``(..., V)`` logits each way.

    With :math:`p = \mathrm{softmax}(z/\tau)` the loss :math:`\tau\,\mathrm{lse}(z/\tau) - z_y + (\rho - \log V)\tau`
    has :math:`\partial/\partial z = p - e_y` (τ cancels), :math:`\partial/\partial\tau = \rho - \mathrm{KL}(p\|U)
    = \rho - \log V + H(p)` and :math:`\partial/\partial\rho = \tau`. Only ``p`` (as large as the logits) and
    three per-position vectors are saved, as for a plain cross-entropy; positions whose target is ``ignore_index``
    give 0 and receive no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, target: Tensor, tau: Tensor, rho: Tensor, ignore_index: int, finite: Tensor | None = None
    ) -> Tensor:
        with autocast_disabled(z):
            # s = (z - max z) / τ <= 0, with its maximum exactly 0: p = softmax(s) in one pass, and since the largest
            # probability is 1 / Σ exp(s) (>= 1/V), lse = log Σ exp(s) = -log max p. Then nll = lse - s_y and
            # H(p) = lse + Σ p (-s), a sum of non-negative terms (as well conditioned as -Σ p log p). Two tensors
            # as large as the logits (s, p) instead of four, and no separate log-probabilities.
            s = torch.sub(z, z.amax(dim=-1, keepdim=True)).mul_(tau.reciprocal().unsqueeze(-1))
            p = torch.softmax(s, dim=-1)
            lse = -torch.log(p.amax(dim=-1))
            entropy = lse - torch.linalg.vecdot(p, s)
            keep = target != ignore_index
            safe_target = torch.where(keep, target, torch.zeros_like(target))
            if finite is not None:  # checked afterwards: keep the gather in range until the checks report
                safe_target = safe_target.clamp(0, z.shape[-1] - 1)
                # a non-finite logit makes its row's entropy NaN (an infinite maximum gives inf - inf, a -inf entry
                # 0 * -inf, a NaN spreads), so the entropies are all finite exactly when the logits are
                finite.copy_(torch.isfinite(entropy.sum()))
            nll = lse - s.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
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
        return grad_z, None, grad_tau, grad_rho, None, None


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


# --------------------------------------------------------------------------------------------------------------------
# AMCL: adaptive multi-head contrastive learning
# --------------------------------------------------------------------------------------------------------------------
AMCLNegatives = Literal["all", "cross"]
AMCLAggregate = Literal["max", "logsumexp"]


def amcl_temperature_penalty(tau: Tensor, dim: int) -> Tensor:
    r"""AMCL's temperature regulariser :math:`\Omega(\tau) = \frac{d'}{2}\log\tau + \frac{1}{\tau}`, elementwise.

    :math:`-\mathrm{sim}/\tau + \Omega(\tau)` is, up to a constant, the negative log-likelihood of a unit vector under
    an isotropic Gaussian of variance :math:`\tau` around another (:math:`\|a - b\|^2 / 2 = 1 - \mathrm{sim}`), the
    per-pair likelihood AMCL's loss is derived from. Minimised alone it has its minimum at :math:`\tau = 2/d'`.

    Args:
        tau: Temperatures > 0 (any shape).
        dim: The projection width :math:`d'`, ``>= 1``.

    Example:
        >>> value = amcl_temperature_penalty(torch.tensor(0.5, dtype=torch.float64), dim=4)
        >>> bool(torch.isclose(value, torch.tensor(2 * math.log(0.5) + 2, dtype=torch.float64)))
        True
    """
    check_int(dim, "dim", low=1)
    return 0.5 * dim * torch.log(tau) + torch.reciprocal(tau)


def _amcl_layout(
    a: Tensor, b: Tensor, negatives: str, offset: int = 0, local: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Anchors, candidates, positive column and excluded mask of the AMCL similarity rows.

    ``a`` and ``b`` are the (global) ``(B, H, d)`` views; the anchors are the ``local`` rows starting at ``offset`` of
    view ``a``, then the same rows of view ``b`` (every row by default). Returns anchors ``(H, R, d)`` with
    ``R = 2 * local``, candidates ``(2, H, M, d)`` (the candidate set of the view-a rows, then of the view-b rows), the
    positive's column of each row ``(R,)`` and the columns that are no candidates of each row (itself), ``(R, M)``.
    """
    batch = a.shape[0]
    local = batch if local is None else local
    rows = torch.arange(offset, offset + local, device=a.device)
    anchors = torch.cat([a[rows], b[rows]]).transpose(0, 1)  # (H, 2L, d)
    if negatives == "all":
        everything = torch.cat([a, b]).transpose(0, 1)  # (H, 2B, d): the same candidates for every row
        candidates = torch.stack([everything, everything])
        own = torch.cat([rows, rows + batch])
        positive = torch.cat([rows + batch, rows])
    else:
        candidates = torch.stack([b.transpose(0, 1), a.transpose(0, 1)])  # view-a rows see view b, and back
        own = None
        positive = torch.cat([rows, rows])
    m = candidates.shape[2]
    excluded = torch.zeros(2 * local, m, dtype=torch.bool, device=a.device)
    if own is not None:
        excluded[torch.arange(2 * local, device=a.device), own] = True
    return anchors, candidates, positive, excluded


def _amcl_similarities(anchors: Tensor, candidates: Tensor) -> Tensor:
    """``(H, R, M)`` similarities: the first half of the rows against ``candidates[0]``, the second against ``[1]``."""
    half = anchors.shape[1] // 2
    return torch.cat(
        [anchors[:, :half] @ candidates[0].transpose(1, 2), anchors[:, half:] @ candidates[1].transpose(1, 2)], dim=1
    )


def _amcl_rows(
    sim: Tensor,
    tau: Tensor,
    positive: Tensor,
    excluded: Tensor,
    beta: Tensor,
    dim: int,
    aggregate: str,
    include_positive: bool,
    topk: int,
) -> Tensor:
    r"""Per head and anchor row: :math:`-\ell^+ + A_n \ell_n` with :math:`\ell = \mathrm{sim}/\tau - \beta\Omega(\tau)`.

    ``sim`` and ``tau`` are ``(H, R, M)`` (``tau`` broadcastable); ``positive`` ``(R,)`` is each row's positive column;
    ``excluded`` ``(R, M)`` marks the columns that are no candidates (the anchor itself). Returns ``(H, R)``.
    """
    heads, rows, m = sim.shape
    tau = tau.expand(heads, rows, m)
    logit = sim / tau - beta * amcl_temperature_penalty(tau, dim)
    pos_index = positive.view(1, rows, 1).expand(heads, rows, 1)
    pos_logit = logit.gather(-1, pos_index).squeeze(-1)
    is_positive = torch.zeros_like(excluded)
    is_positive[torch.arange(rows, device=sim.device), positive] = True
    leave_out = excluded if include_positive else excluded | is_positive
    if aggregate == "logsumexp":
        agg = torch.logsumexp(logit.masked_fill(leave_out, float("-inf")), dim=-1)
    else:  # the hardest candidates by similarity (the paper's max), with their own temperatures
        hardest = sim.detach().masked_fill(leave_out, float("-inf")).topk(topk, dim=-1).indices
        agg = logit.gather(-1, hardest).mean(-1)
    return agg - pos_logit


def _amcl_arg_validation(
    a: object, b: object, negatives: object, aggregate: object, include_positive: object, topk: object
) -> None:
    check_tensor(a, "features_a")
    check_tensor(b, "features_b")
    assert isinstance(a, Tensor) and isinstance(b, Tensor)
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(
            "`features_a` and `features_b` must both have shape (B, H, d): B samples, H projection heads of width d "
            f"(unsqueeze(1) a single head), got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    check_choice("negatives", negatives, ("all", "cross"))
    check_choice("aggregate", aggregate, ("max", "logsumexp"))
    if not isinstance(include_positive, bool):
        raise TypeError(f"`include_positive` must be a bool, got {type(include_positive).__name__}.")
    check_int(topk, "topk", low=1)


def _amcl_candidates(batch: int, negatives: str, include_positive: bool) -> int:
    """The number of candidates each anchor's aggregate runs over."""
    m = 2 * batch - 1 if negatives == "all" else batch
    return m if include_positive else m - 1


def amcl_loss(
    features_a: Tensor,
    features_b: Tensor,
    tau: float | Tensor,
    beta: float | Tensor = 0.01,
    negatives: AMCLNegatives = "all",
    aggregate: AMCLAggregate = "max",
    include_positive: bool = False,
    topk: int = 1,
    reduction: Reduction = "mean",
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Adaptive multi-head contrastive loss (AMCL, Wang et al., ECCV 2024) of two views through ``H`` heads.

    For head :math:`c` and anchor :math:`i` (every sample of both views), with cosine similarities
    :math:`s = \mathrm{sim}(z^c_i, \cdot)`, one temperature per pair and
    :math:`\Omega(\tau) = \frac{d'}{2}\log\tau + \frac1\tau` (:func:`amcl_temperature_penalty`):

    .. math::
        \ell_{ci} = -\Big(\frac{s^+}{\tau^+} - \beta\,\Omega(\tau^+)\Big)
        + \operatorname*{A}_{n}\Big(\frac{s_n}{\tau_n} - \beta\,\Omega(\tau_n)\Big), \qquad
        L = \sum_{c=1}^{H} \frac{1}{2B}\sum_{i=1}^{2B} \ell_{ci}.

    ``aggregate="max"`` is the paper's Eq. (2.1): the term of the hardest negative :math:`n^\star = \arg\max_n s_n`
    (the mean over the ``topk`` hardest with ``topk > 1``, the official code's top-k approximation);
    ``"logsumexp"`` is the log-posterior of the positive before that approximation
    (:math:`\log\sum_n e^{\ell_n}`). ``include_positive=True`` lets the positive compete with the negatives (InfoNCE,
    the paper's Eq. (2.4)); ``False`` takes negatives only (NT-Xent as the paper writes it, Eq. (2.1)). With one head
    and one fixed temperature the regulariser cancels and ``"logsumexp"`` is exactly InfoNCE / NT-Xent.

    Candidates: ``negatives="all"`` (SimCLR): the other ``2B - 1`` embeddings of both views;
    ``"cross"`` (CLIP / MoCo style): the ``B`` embeddings of the other view.

    ``tau`` layout: a number, one value per head ``(H,)``, or one per pair ``(H, 2B, M)``: rows are the anchors of
    view ``a`` then of view ``b``; columns are ``[a; b]`` (``M = 2B``, ``"all"``) or the other view (``M = B``,
    ``"cross"``). :class:`~lightning_losses.nn.PairTemperature` computes it with the paper's rule.

    Source: paper arXiv:2310.05615 (Table 2); official code ``LeiWangR/cl``, ``amcl/losses.py``
    (``AMCLNTXentLoss``). The code differs from the paper in its negative regulariser: it subtracts
    :math:`\beta\sum_k(\log\tau_k + 1/\tau_k)` (no :math:`d'/2` factor, a sum over the top-k rather than the mean),
    while this function follows the paper (:math:`-\beta\,\Omega(\tau_{n^\star})`, averaged with the top-k terms).
    Both average the two views' directions and sum over heads, as here.

    Args:
        features_a: ``(B, H, d)`` projections of the first view (one row per sample, one slice per head); L2-normalised
            here.
        features_b: ``(B, H, d)`` projections of the second view (the positives, row by row).
        tau: Temperatures > 0, see the layout above (the positive's is read at the positive's column).
        beta: Weight :math:`\beta \ge 0` of the temperature regulariser (official code: 0.01).
        negatives: ``"all"`` or ``"cross"``.
        aggregate: ``"max"`` (paper) or ``"logsumexp"``.
        include_positive: Let the positive compete in the aggregate (InfoNCE) or not (NT-Xent).
        topk: Number of hardest candidates averaged by ``"max"`` (1: the paper's max).
        reduction: ``"mean"`` (over anchors, summed over heads), ``"sum"``, or ``"none"`` (``(2B, H)``).
        validate_args: Check that the features are finite and a tensor ``tau`` (``beta``) is positive (non-negative)
            and finite (one host synchronisation).

    Returns:
        The float32 (float64 kept) loss.

    Example:
        >>> a, b = torch.randn(8, 1, 16), torch.randn(8, 1, 16)
        >>> infonce = amcl_loss(a, b, tau=0.1, aggregate="logsumexp", include_positive=True, negatives="cross")
        >>> an, bn = F.normalize(a[:, 0], dim=1), F.normalize(b[:, 0], dim=1)
        >>> labels = torch.arange(8)
        >>> clip = (F.cross_entropy(an @ bn.T / 0.1, labels) + F.cross_entropy(bn @ an.T / 0.1, labels)) / 2
        >>> bool(torch.isclose(infonce, clip))
        True
    """
    _amcl_arg_validation(features_a, features_b, negatives, aggregate, include_positive, topk)
    check_reduction(reduction)
    batch, heads, dim = features_a.shape
    if _amcl_candidates(batch, negatives, include_positive) < topk:
        raise ValueError(
            f"Each anchor has {_amcl_candidates(batch, negatives, include_positive)} candidates with B = {batch}, "
            f"negatives={negatives!r} and include_positive={include_positive}, fewer than topk = {topk} (and at "
            "least one is needed). Enlarge the batch or lower topk."
        )
    checks = start_checks(validate_args, (features_a, "features_a"), (features_b, "features_b"))
    a, b = as_float32(features_a, features_b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    m = 2 * batch if negatives == "all" else batch
    tau_t = _amcl_tau(tau, a, heads, 2 * batch, m, checks, validate_args)
    beta_t = hyperparameter_tensor(
        beta, a, "beta", low=0.0, dtype=dtype, layout="any", checks=checks, validate=validate_args
    )
    if beta_t.ndim:
        raise ValueError(f"`beta` must be a number or a 0-d tensor, got shape {tuple(beta_t.shape)}.")
    checks.run()
    with autocast_disabled(a):
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        anchors, candidates, positive, excluded = _amcl_layout(a, b, negatives)
        sim = _amcl_similarities(anchors, candidates)
        per_row = _amcl_rows(sim, tau_t, positive, excluded, beta_t, dim, aggregate, include_positive, topk)
    if reduction == "none":
        return per_row.T
    if reduction == "sum":
        return per_row.sum()
    return per_row.mean(dim=1).sum()


def _amcl_tau(
    tau: float | Tensor, like: Tensor, heads: int, rows: int, m: int, checks: DeferredChecks, validate: bool
) -> Tensor:
    """``tau`` as a tensor broadcastable to ``(H, rows, M)``: a scalar, one per head or one per pair."""
    t = hyperparameter_tensor(
        tau, like, "tau", positive=True, dtype=compute_dtype(like.dtype), layout="any", checks=checks, validate=validate
    )
    if t.ndim == 0:
        return t.reshape(1, 1, 1)
    if t.shape == (heads,):
        return t.reshape(heads, 1, 1)
    if t.shape == (heads, rows, m):
        return t
    raise ValueError(
        f"`tau` must be a number, one temperature per head (shape ({heads},)) or one per pair (shape ({heads}, "
        f"{rows}, {m}): heads × anchors of both views × candidates), got shape {tuple(t.shape)}."
    )

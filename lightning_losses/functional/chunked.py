r"""Large-vocabulary losses computed from hidden states and the output head, without materialising the logits.

A language-model head maps ``N`` hidden states of width ``d`` to ``N × V`` logits; with ``V`` in the tens or hundreds
of thousands this tensor (and its gradient, and the log-softmax that autograd keeps) dominates training memory.
The functions here take the hidden states and the head's weight (and bias) instead of the logits, and process the
rows in chunks: only one chunk of logits (``chunk_size × V``) exists at any time, always in float32 (float64 when the
inputs are float64).

Two execution paths share one autograd function:

* scalar reductions (``"mean"`` / ``"sum"``): while the forward pass visits a chunk it also computes that chunk's
  gradient with respect to the hidden states, the weight, the bias and any tensor hyperparameter; backward only
  rescales those gradients by the incoming scalar. Three matrix products per chunk, as many as the naive computation.
* per-row or per-sequence outputs (``reduction="none"``, :func:`linear_sequence_log_probs`): the forward pass keeps
  only the per-row losses; backward recomputes each chunk's logits and weights its gradient with the incoming
  per-row gradient.

Rows that are ignored (``ignore_index``) are dropped before any logits are computed, so prompt and padding tokens cost
nothing. Everything is plain torch and runs on any device.

Python-number hyperparameters (temperature, z-loss weight, β) are used in the accumulation dtype (float64 for float64
inputs, float32 otherwise), never rounded to float32 first. Bad input raises a ``TypeError`` or ``ValueError`` naming
the argument; ``validate_args=True`` (the default) also checks tensor values (finite hidden states and heads, labels
within the vocabulary, tensor hyperparameters in range), and ``validate_args=False`` skips those value checks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.utilities.checks import (
    DeferredChecks,
    NumItems,
    check_int,
    check_num_items,
    check_reduction,
    check_tensor,
)
from lightning_losses.utilities.numerics import (
    autocast_disabled,
    autocast_dtype,
    compute_dtype,
    divide_by_items,
    hyperparameter_tensor,
    kl_from_log_probs,
)

__all__ = [
    "default_chunk_size",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_sequence_log_probs",
]

Reduction = Literal["mean", "sum", "none"]

# One chunk of logits holds about this many elements (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk used when ``chunk_size=None``: about 16 M logits (64 MiB in float32) per chunk.

    This is the chunk of the closed-form cross-entropy path; the paths that differentiate the row loss with autograd
    (softcap, tensor temperature, distillation) use a quarter of it, as they keep several chunk-sized temporaries.

    Example:
        >>> default_chunk_size(131072), default_chunk_size(32000), default_chunk_size(10)
        (128, 524, 4096)
    """
    check_int(vocab_size, "vocab_size", low=1)
    return max(1, min(4096, _CHUNK_ELEMENTS // max(int(vocab_size), 1)))


# --------------------------------------------------------------------------------------------------------------------
# The chunked autograd function
# --------------------------------------------------------------------------------------------------------------------

RowLoss = Callable[..., Tensor]
"""``row_loss(logits, *extras) -> (rows,)``: the loss of each row from its float32 logits and its row extras."""

RowLossAndGrad = Callable[[Tensor, Sequence[Tensor], "Tensor | float"], tuple[Tensor, Tensor, float]]
"""``row_loss_and_grad(logits, extras, row_grad) -> (loss, grad, alpha)``: the rows' losses and ``grad / alpha``, the
gradient of ``Σ row_grad·loss`` with respect to the logits divided by a number the caller folds into the matrix
products (so a scalar ``row_grad`` costs no pass over the chunk). A row whose loss the closed form cannot give to
the dtype's precision holds NaN; the caller recomputes it with the row loss."""


@dataclass(frozen=True)
class _HeadSpec:
    row_loss: RowLoss
    chunk_size: int
    softcap: float | None
    # None: return per-row losses and recompute in backward; a float: return scale · Σ rows, gradients in forward.
    scale: float | None
    grad_enabled: bool
    # Optional closed-form gradient (see ``RowLossAndGrad``), used without softcap when no extra needs a gradient;
    # it may overwrite ``logits``.
    row_loss_and_grad: RowLossAndGrad | None = None


def _chunk_extras(extras: Sequence[Tensor], n_rows: int, start: int, stop: int) -> list[Tensor]:
    """Slice per-row extras (leading dimension ``n_rows``); 0-d extras are shared by every row."""
    return [e if e.ndim == 0 else e[start:stop] for e in extras]


def _accumulate_extra_grads(
    grad_x: list[Tensor | None], chunk_grads: Sequence[Tensor | None], extras: Sequence[Tensor], start: int, stop: int
) -> None:
    """Add one chunk's gradients of the extra tensors (0-d: summed; per-row: written into rows ``start:stop``)."""
    for i, g in enumerate(chunk_grads):
        if g is None:
            continue
        total = grad_x[i]
        assert total is not None
        if extras[i].ndim == 0:
            total += g
        else:
            total[start:stop] = g


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, workspace: Tensor | None) -> Tensor:
    """``hidden @ weightᵀ + bias`` in the accumulation dtype, written into ``workspace`` when one is given."""
    acc = compute_dtype(hidden.dtype)
    h, w = hidden.detach(), weight.detach()
    b = None if bias is None else bias.detach()
    if workspace is None or h.dtype != acc or w.dtype != acc or (b is not None and b.dtype != acc):
        return F.linear(h, w, b).to(acc)
    out = workspace[: h.shape[0]]
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def _chunk_loss_and_grads(
    spec: _HeadSpec,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    extras: Sequence[Tensor],
    extras_need_grad: Sequence[bool],
    row_grad: Tensor | float | None,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, list[Tensor | None], float]:
    """Loss of one chunk of rows and, when ``row_grad`` is given, the gradient of ``Σ row_grad·loss``.

    Returns ``(loss, grad_logits, grad_extras, alpha)`` where ``alpha · grad_logits`` is the gradient with respect to
    the raw (pre-softcap) logits, in the accumulation dtype. ``workspace`` (``chunk_size × V``, accumulation dtype)
    receives the logits of the closed-form paths, so that no chunk allocates its own; the returned gradient may
    live in it and must be used before the next chunk.
    """
    # Everything here works on detached tensors: no autograd history may outlive the chunk (a history reaching the
    # gradient buffers would keep every chunk's logits alive).
    extras = [e.detach() for e in extras]
    closed_form = spec.row_loss_and_grad is not None and spec.softcap is None and not any(extras_need_grad)
    with torch.no_grad(), autocast_disabled(hidden):
        if row_grad is None and not closed_form:
            raw = _chunk_logits(hidden, weight, bias, workspace)
            logits = raw if spec.softcap is None else spec.softcap * torch.tanh(raw / spec.softcap)
            return spec.row_loss(logits, *extras), None, [None] * len(extras), 1.0
        if row_grad is None:  # the closed form's loss costs fewer passes than the row loss (its gradient is dropped)
            assert spec.row_loss_and_grad is not None
            loss = spec.row_loss_and_grad(_chunk_logits(hidden, weight, bias, workspace), extras, 1.0)[0]
            return loss, None, [None] * len(extras), 1.0
        if closed_form:
            assert spec.row_loss_and_grad is not None
            loss, grad_raw, alpha = spec.row_loss_and_grad(
                _chunk_logits(hidden, weight, bias, workspace), extras, row_grad
            )
            return loss, grad_raw, [None] * len(extras), alpha
        raw = _chunk_logits(hidden, weight, bias, None)
    with autocast_disabled(hidden), torch.enable_grad():
        raw.requires_grad_(True)
        logits = raw if spec.softcap is None else spec.softcap * torch.tanh(raw / spec.softcap)
        leaves = [e.requires_grad_(True) if need else e for e, need in zip(extras, extras_need_grad)]
        loss = spec.row_loss(logits, *leaves)
        inputs = [raw] + [leaf for leaf, need in zip(leaves, extras_need_grad) if need]
        grads = torch.autograd.grad((loss * row_grad).sum(), inputs)
    it = iter(grads[1:])
    grad_extras = [next(it) if need else None for need in extras_need_grad]
    return loss.detach(), grads[0], grad_extras, 1.0


def _head_grad_buffers(
    hidden: Tensor, weight: Tensor, acc: torch.dtype, need_h: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradient buffers of the hidden rows and the weight; every chunk writes its rows of the first, the first chunk
    overwrites the second, so neither is zero-filled (except the weight's when there is no row at all)."""
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = None
    if need_w:
        fill = torch.empty if hidden.shape[0] else torch.zeros
        grad_w = fill(weight.shape, dtype=acc, device=weight.device)
    return grad_h, grad_w


def _add_head_grads(
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    grad_logits: Tensor,
    alpha: float,
    hidden: Tensor,
    weight: Tensor,
    start: int,
    stop: int,
) -> None:
    """Add one chunk's ``alpha · grad_logits`` to the gradients of the hidden rows, the weight and the bias."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        rows = grad_h[start:stop]
        if grad_logits.dtype == weight.dtype == rows.dtype:
            torch.addmm(rows, grad_logits, weight.detach(), beta=0, alpha=alpha, out=rows)
        else:
            rows.copy_(torch.mm(grad_logits.to(weight.dtype), weight.detach()).mul_(alpha))
    if grad_w is not None:  # the first chunk overwrites the (uninitialised) buffer
        grad_w.addmm_(grad_logits.t(), hidden.detach().to(grad_w.dtype), beta=0 if start == 0 else 1, alpha=alpha)
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(0), alpha=alpha)


def _recompute_nan_rows(
    spec: _HeadSpec, losses: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, extras: Sequence[Tensor]
) -> None:
    """Recompute, with the row loss, the rows a closed form left NaN (their loss was beyond its precision)."""
    bad = losses.isnan()
    if not bool(bad.any()):
        return
    index = bad.nonzero().squeeze(1)
    with torch.no_grad(), autocast_disabled(hidden):
        logits = _chunk_logits(hidden.index_select(0, index), weight, bias, None)
        rows = [e.detach() if e.ndim == 0 else e.detach().index_select(0, index) for e in extras]
        losses[index] = spec.row_loss(logits, *rows).to(losses.dtype)


def _workspace(spec: _HeadSpec, n_rows: int, weight: Tensor, acc: torch.dtype) -> Tensor:
    """One ``chunk × V`` buffer reused by every chunk (a fresh buffer per chunk costs page faults and zeroing)."""
    return torch.empty(min(spec.chunk_size, max(n_rows, 1)), weight.shape[0], dtype=acc, device=weight.device)


class _ChunkedLinearLoss(torch.autograd.Function):
    """Row losses of ``row_loss(softcap(hidden @ weightᵀ + bias), *extras)`` computed chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, spec: _HeadSpec, hidden: Tensor, weight: Tensor, bias: Tensor | None, *extras: Tensor
    ) -> Tensor:
        n = hidden.shape[0]
        acc = compute_dtype(hidden.dtype)
        needs = [bool(x) and spec.grad_enabled for x in ctx.needs_input_grad[1:]]
        need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
        need_x = needs[3:]
        ctx.spec = spec
        ctx.consumed = False
        if spec.scale is None:  # per-row output; backward recomputes
            out = torch.empty(n, dtype=acc, device=hidden.device)
            workspace = _workspace(spec, n, weight, acc)
            for start in range(0, n, spec.chunk_size):
                stop = min(start + spec.chunk_size, n)
                loss, _, _, _ = _chunk_loss_and_grads(
                    spec,
                    hidden[start:stop],
                    weight,
                    bias,
                    _chunk_extras(extras, n, start, stop),
                    need_x,
                    None,
                    workspace,
                )
                out[start:stop] = loss
            del workspace
            _recompute_nan_rows(spec, out, hidden, weight, bias, extras)
            ctx.save_for_backward(hidden, weight, bias, *extras)
            ctx.needs = (need_h, need_w, need_b, need_x)
            return out

        any_grad = need_h or need_w or need_b or any(need_x)
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        grad_h, grad_w = _head_grad_buffers(hidden, weight, acc, need_h, need_w)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        grad_x: list[Tensor | None] = [torch.zeros(e.shape, dtype=acc, device=e.device) if nd else None
                                       for e, nd in zip(extras, need_x)]  # fmt: skip
        workspace = _workspace(spec, n, weight, acc)
        for start in range(0, n, spec.chunk_size):
            stop = min(start + spec.chunk_size, n)
            h = hidden[start:stop]
            loss, grad_logits, gx, alpha = _chunk_loss_and_grads(
                spec,
                h,
                weight,
                bias,
                _chunk_extras(extras, n, start, stop),
                need_x,
                spec.scale if any_grad else None,
                workspace,
            )
            losses[start:stop] = loss
            if grad_logits is not None:
                _add_head_grads((grad_h, grad_w, grad_b), grad_logits, alpha, h, weight, start, stop)
            del grad_logits, loss  # free this chunk's buffers before the next one is computed
            _accumulate_extra_grads(grad_x, gx, extras, start, stop)
        del workspace
        _recompute_nan_rows(spec, losses, hidden, weight, bias, extras)
        ctx.grads = (grad_h, grad_w, grad_b, grad_x)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, [e.dtype for e in extras])
        return losses.sum() * spec.scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "The chunked linear loss computed its gradients during the forward pass and they were already used "
                "by a previous backward. Recompute the loss instead of calling backward twice (retain_graph=True "
                "is not supported)."
            )
        ctx.consumed = True
        spec: _HeadSpec = ctx.spec
        if spec.scale is not None:
            grad_h, grad_w, grad_b, grad_x = ctx.grads
            ctx.grads = None
            w_dtype, b_dtype, x_dtypes = ctx.dtypes
            g = grad_out.detach()
            # ``loss.backward()`` sends a gradient of one: on CPU, where reading it costs nothing, skip the passes
            one = g.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0
            out_h = None if grad_h is None else grad_h if one else grad_h.mul_(g.to(grad_h.dtype))
            out_w = None if grad_w is None else (grad_w if one else grad_w.mul_(g.to(grad_w.dtype))).to(w_dtype)
            out_b = None if grad_b is None else grad_b.mul_(g.to(grad_b.dtype)).to(b_dtype)
            out_x = [None if gx is None else (gx * g).to(dt) for gx, dt in zip(grad_x, x_dtypes)]
            return (None, out_h, out_w, out_b, *out_x)

        hidden, weight, bias, *extras = ctx.saved_tensors
        need_h, need_w, need_b, need_x = ctx.needs
        n = hidden.shape[0]
        acc = compute_dtype(hidden.dtype)
        grad_h, grad_w = _head_grad_buffers(hidden, weight, acc, need_h, need_w)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        grad_x = [torch.zeros(e.shape, dtype=acc, device=e.device) if nd else None for e, nd in zip(extras, need_x)]
        g_rows = grad_out.detach().to(acc)
        workspace = _workspace(spec, n, weight, acc)
        for start in range(0, n, spec.chunk_size):
            stop = min(start + spec.chunk_size, n)
            h = hidden[start:stop]
            _, grad_logits, gx, alpha = _chunk_loss_and_grads(
                spec, h, weight, bias, _chunk_extras(extras, n, start, stop), need_x, g_rows[start:stop], workspace
            )
            assert grad_logits is not None
            _add_head_grads((grad_h, grad_w, grad_b), grad_logits, alpha, h, weight, start, stop)
            del grad_logits
            _accumulate_extra_grads(grad_x, gx, extras, start, stop)
        return (
            None,
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None or bias is None else grad_b.to(bias.dtype),
            *[None if gx is None else gx.to(e.dtype) for gx, e in zip(grad_x, extras)],
        )


def _chunked(
    row_loss: RowLoss,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    extras: Sequence[Tensor],
    *,
    chunk_size: int | None,
    softcap: float | None,
    scale: float | None,
    row_loss_and_grad: RowLossAndGrad | None = None,
) -> Tensor:
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
        if row_loss_and_grad is None or softcap is not None:
            # Autograd through the row loss keeps several chunk-sized temporaries: use a quarter of the rows.
            chunk_size = max(1, chunk_size // 4)
    spec = _HeadSpec(
        row_loss_and_grad=row_loss_and_grad,
        row_loss=row_loss,
        chunk_size=int(chunk_size),
        softcap=None if softcap is None else float(softcap),
        scale=scale,
        grad_enabled=torch.is_grad_enabled(),
    )
    out = _ChunkedLinearLoss.apply(spec, hidden, weight, bias, *extras)
    assert isinstance(out, Tensor)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Argument checks and preparation shared by the public functions
# --------------------------------------------------------------------------------------------------------------------


def _check_head(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prefix: str = "",
    checks: DeferredChecks | None = None,
) -> None:
    """Check the head's tensors (at once) and queue the finiteness of the weight and bias on ``checks`` when given
    (that of the hidden states is checked on the counted rows only: ignored rows may hold anything)."""
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    check_tensor(hidden, h, floating=False)
    check_tensor(weight, w, floating=False)
    if bias is not None:
        check_tensor(bias, b)
    if not hidden.is_floating_point() or hidden.ndim < 2:
        raise ValueError(
            f"`{h}` must be a floating tensor of shape (..., d) with at least 2 dimensions, got dtype {hidden.dtype} "
            f"and shape {tuple(hidden.shape)}. Pass the final hidden states (tokens × d or batch × seq × d)."
        )
    if not weight.is_floating_point() or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`{w}` must be the output head's weight of shape (V, d) with d = {hidden.shape[-1]} (the width of "
            f"`{h}`), got dtype {weight.dtype} and shape {tuple(weight.shape)}. Pass `lm_head.weight`, not its "
            "transpose."
        )
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"`{b}` must have shape (V,) = ({weight.shape[0]},) to match `{w}`, got shape {tuple(bias.shape)}."
        )
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1 and not autocast_dtype(hidden.device.type):
        raise ValueError(
            f"`{h}`, `{w}` and `{b}` must share one dtype, got {sorted(str(d) for d in dtypes)}. Cast them to the "
            "same dtype (or run under torch.autocast, which casts them to the autocast dtype)."
        )
    if checks is not None:
        checks.require_finite(weight, w)
        if bias is not None:
            checks.require_finite(bias, b)


def _autocast_head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast, cast the matrix-product operands as ``F.linear`` would (the loss itself stays float32)."""
    dtype = autocast_dtype(hidden.device.type)
    if dtype is not None:
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return hidden, weight, bias


def _check_softcap(softcap: float | None, name: str = "softcap") -> None:
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"`{name}` must be a positive number or None, got {type(softcap).__name__} ({softcap!r}).")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"`{name}` must be a positive finite number or None, got {softcap!r}.")


def _check_labels(
    labels: Tensor,
    lead_shape: torch.Size,
    vocab: int,
    ignore_index: int,
    name: str,
    checks: DeferredChecks | None = None,
    validate: bool = True,
) -> Tensor:
    """Validate integer labels of shape ``lead_shape`` and return the boolean mask of rows that count.

    The range of the counted labels is checked when ``validate`` (queued on ``checks`` when given).
    """
    check_tensor(labels, name, floating=False)
    check_int(ignore_index, "ignore_index")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {labels.dtype}.")
    if labels.shape != lead_shape:
        raise ValueError(
            f"`{name}` must have shape {tuple(lead_shape)} (the hidden states' shape without the last dimension), "
            f"got {tuple(labels.shape)}."
        )
    valid = labels != ignore_index
    if not validate:
        return valid
    outside = valid & ((labels < 0) | (labels >= vocab))

    def error() -> Exception:
        chosen = labels[outside]
        return ValueError(
            f"`{name}` holds token ids outside [0, {vocab}) (min {int(chosen.min())}, max {int(chosen.max())}) that "
            f"are not ignore_index={ignore_index}. Check the vocabulary size of the head and the padding label."
        )

    if checks is not None:
        checks.require(~outside.any(), error)
    elif bool(outside.any()):
        raise error()
    return valid


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer or None (automatic), got {chunk_size!r}.")


def _per_row(
    value: float | Tensor,
    like: Tensor,
    name: str,
    lead_shape: torch.Size,
    *,
    low: float | None = None,
    low_inclusive: bool = False,
    high: float | None = None,
    checks: DeferredChecks | None = None,
    validate: bool = True,
) -> Tensor:
    """A hyperparameter as a 0-d tensor or one value per row of ``lead_shape`` (flattened), keeping its graph.

    A Python number (or an integer tensor) becomes a tensor of the accumulation dtype of ``like`` (float64 for float64
    inputs), so it is not rounded to float32; a floating tensor keeps its dtype.
    """
    return hyperparameter_tensor(
        value,
        like,
        name,
        low=low,
        low_inclusive=low_inclusive,
        high=high,
        dtype=compute_dtype(like.dtype),
        keep_tensor_dtype=True,
        layout="row",
        lead_shape=lead_shape,
        checks=checks,
        validate=validate,
    )


def _select(t: Tensor, index: Tensor) -> Tensor:
    return t if t.ndim == 0 else t.index_select(0, index)


def _scatter_rows(rows: Tensor, index: Tensor, lead_shape: torch.Size) -> Tensor:
    """Per-row values of the counted rows back in the leading shape, 0 at the rows left out (differentiable)."""
    full = rows.new_zeros(int(torch.Size(lead_shape).numel()))
    return full.index_put((index,), rows).reshape(lead_shape)


# --------------------------------------------------------------------------------------------------------------------
# Cross-entropy and log-probabilities
# --------------------------------------------------------------------------------------------------------------------


def _ce_rows(use_temperature: bool, use_z_loss: bool, sign: float) -> RowLoss:
    def row_loss(logits: Tensor, target: Tensor, *hyper: Tensor) -> Tensor:
        it = iter(hyper)
        if use_temperature:
            t = next(it)
            logits = logits / (t if t.ndim == 0 else t.unsqueeze(1))
        lse = torch.logsumexp(logits, dim=-1)
        loss = lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)
        if use_z_loss:
            loss = loss + next(it) * lse.square()
        return sign * loss

    return row_loss


def _ce_rows_and_grad(use_z_loss: bool, sign: float) -> RowLossAndGrad:
    """Closed form of the cross-entropy gradient: ∂ℓ/∂z = (1 + 2λ·lse)·softmax(z) − onehot(y), in place on z.

    Without z-loss the chunk is read once (one softmax, in place) and the loss is ``−log p_y``; a row whose ``p_y``
    is below the dtype's smallest normal number (a loss above about 87 nats in float32) is left NaN for the caller
    to recompute exactly. A scalar ``row_grad`` is returned as ``alpha`` rather than multiplied into the chunk.
    """

    def with_z_loss(logits: Tensor, extras: Sequence[Tensor], row_grad: Tensor | float) -> tuple[Tensor, Tensor, float]:
        # One buffer: the chunk's logits become exp(z − max), then the softmax, then the gradient.
        target = extras[0].unsqueeze(1)
        target_logit = logits.gather(1, target).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()
        total = probs.sum(dim=1, keepdim=True)
        lse = (row_max + total.log()).squeeze(1)
        weight = torch.as_tensor(row_grad, dtype=logits.dtype, device=logits.device) * sign
        weight = weight.expand_as(lse)
        z_loss = extras[1]
        loss = lse - target_logit + z_loss * lse.square()
        coef = weight * (1 + 2 * z_loss * lse)
        grad = probs.mul_(coef.unsqueeze(1) / total)
        grad.scatter_add_(1, target, -weight.unsqueeze(1))
        return sign * loss, grad, 1.0

    def plain(logits: Tensor, extras: Sequence[Tensor], row_grad: Tensor | float) -> tuple[Tensor, Tensor, float]:
        target = extras[0].unsqueeze(1)
        probs = torch.softmax(logits, dim=1, out=logits)
        p_target = probs.gather(1, target).squeeze(1)
        loss = torch.where(p_target >= torch.finfo(probs.dtype).tiny, -p_target.log(), math.nan)
        grad = probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
        if isinstance(row_grad, Tensor) and row_grad.ndim > 0:
            return sign * loss, grad.mul_(row_grad.to(grad.dtype).unsqueeze(1)), sign
        return sign * loss, grad, sign * float(row_grad)

    return with_z_loss if use_z_loss else plain


def _ce_like(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    *,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int | None,
    softcap: float | None,
    temperature: float | Tensor | None,
    z_loss: float | Tensor,
    sign: float,
    target_name: str,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> tuple[Tensor, Tensor, int]:
    """Shared body: returns ``(row_values_or_scalar, valid_index, n_valid)``."""
    checks = DeferredChecks() if validate_args else None
    _check_head(hidden, weight, bias, checks=checks)
    check_reduction(reduction, num_items_in_batch=num_items_in_batch)
    _check_chunk_size(chunk_size)
    _check_softcap(softcap)
    lead = hidden.shape[:-1]
    valid = _check_labels(target, lead, weight.shape[0], ignore_index, target_name, checks, validate_args)
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    hyper = []
    if temperature is not None:
        hyper.append(_per_row(temperature, hidden, "temperature", lead, low=0.0, checks=checks, validate=validate_args))
    use_z = not (isinstance(z_loss, (int, float)) and not isinstance(z_loss, bool) and z_loss == 0)
    if use_z:
        hyper.append(
            _per_row(z_loss, hidden, "z_loss", lead, low=0.0, low_inclusive=True, checks=checks, validate=validate_args)
        )
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    index = valid.reshape(-1).nonzero().squeeze(1)
    n_valid = int(index.numel())
    rows_h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    if checks is not None:
        checks.require_finite(rows_h, "hidden")
        checks.run()
    extras = [target.reshape(-1).index_select(0, index).long()] + [_select(h, index) for h in hyper]
    use_t = temperature is not None
    if num_items_in_batch is not None:
        scale: float | None = 1.0
    else:
        scale = None if reduction == "none" else (1.0 / max(n_valid, 1) if reduction == "mean" else 1.0)
    out = _chunked(
        _ce_rows(use_t, use_z, sign),
        rows_h,
        weight,
        bias,
        extras,
        chunk_size=chunk_size,
        softcap=softcap,
        scale=scale,
        row_loss_and_grad=None if use_t else _ce_rows_and_grad(use_z, sign),
    )
    if num_items_in_batch is not None:
        out = divide_by_items(out, n_valid, num_items_in_batch)
    return out, index, n_valid


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    softcap: float | None = None,
    z_loss: float | Tensor = 0.0,
    temperature: float | Tensor | None = None,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Cross-entropy of the head ``hidden @ weightᵀ + bias`` against ``target``, never holding all the logits.

    With :math:`z = c\,\tanh\big((hW^\top + b)/c\big)` (or :math:`hW^\top + b` without ``softcap`` :math:`c`),
    the temperature :math:`\tau` and the z-loss weight :math:`\lambda`, each counted token :math:`i` gives

    .. math::

        \ell_i = \operatorname{logsumexp}_j\!\Big(\frac{z_{ij}}{\tau_i}\Big) - \frac{z_{i y_i}}{\tau_i}
                 + \lambda_i \operatorname{logsumexp}_j\!\Big(\frac{z_{ij}}{\tau_i}\Big)^2

    reduced by the mean over counted tokens (``target != ignore_index``), the sum, or not at all. Value and
    gradients (hidden, weight, bias, and tensor ``temperature`` / ``z_loss``) equal those of
    ``F.cross_entropy(softcap(F.linear(hidden, weight, bias)).float() / τ, target)`` plus the z-loss; the largest
    temporary is one chunk of ``chunk_size × V`` float32 logits.

    Args:
        hidden: final hidden states, shape ``(N, d)`` or ``(B, T, d)``.
        weight: the output head's weight, shape ``(V, d)``.
        target: token ids, shape ``hidden.shape[:-1]``; ``ignore_index`` marks tokens that do not count.
        bias: optional head bias, shape ``(V,)``.
        ignore_index: label of tokens left out of the loss (they cost no computation).
        reduction: ``"mean"`` over counted tokens (0 when none count), ``"sum"``, or ``"none"`` (shape of ``target``,
            0 at ignored tokens).
        chunk_size: rows per chunk; ``None`` picks about 16 M logits per chunk (:func:`default_chunk_size`), a
            quarter of that with ``softcap`` or ``temperature``.
        softcap: logit soft-capping value :math:`c` (Gemma-2 style), or ``None``.
        z_loss: weight :math:`\lambda` of the auxiliary :math:`\operatorname{logsumexp}^2` term (PaLM uses 1e-4);
            a number, a 0-d tensor, or per sample / per token.
        temperature: optional :math:`\tau > 0` dividing the logits (a number or a tensor, per sample / per token,
            differentiable), e.g. for the KL-DRO temperature loss :math:`\tau\,\mathrm{CE}(z/\tau, y)`.
        num_items_in_batch: With ``reduction="mean"``, the number of counted tokens of the whole batch this call is
            part of (every micro-batch of the optimizer step on every rank, divided by the factor the gradients are
            later divided by). ``None`` (default) divides by this call's counted tokens; otherwise the loss is
            :math:`\sum_{i\,\text{counted}} \ell_i / n_{\text{items}}` (value and gradients), so that the micro-batch
            losses sum to the token mean of the whole batch.
        validate_args: Check the values of the tensors: finite hidden states, weight and bias, token ids within the
            vocabulary, tensor ``temperature`` > 0 and ``z_loss`` >= 0 (one host synchronisation). ``False`` skips
            them.

    Returns:
        The reduced loss (float32, float64 for float64 inputs).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden = torch.randn(10, 8, generator=g, requires_grad=True)
        >>> weight = torch.randn(37, 8, generator=g, requires_grad=True)
        >>> target = torch.randint(0, 37, (10,), generator=g)
        >>> loss = linear_cross_entropy(hidden, weight, target, chunk_size=3)
        >>> naive = F.cross_entropy(hidden @ weight.T, target)
        >>> torch.allclose(loss, naive)
        True
        >>> loss.backward()
        >>> hidden.grad.shape, weight.grad.shape
        (torch.Size([10, 8]), torch.Size([37, 8]))
    """
    out, index, _ = _ce_like(
        hidden,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        softcap=softcap,
        temperature=temperature,
        z_loss=z_loss,
        sign=1.0,
        target_name="target",
        num_items_in_batch=num_items_in_batch,
        validate_args=validate_args,
    )
    if reduction == "none":
        return _scatter_rows(out, index, target.shape)
    return out


def linear_sequence_log_probs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    average: bool = False,
    shift: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
    temperature: float | Tensor | None = None,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Per-sequence sum (or mean) of the log-probabilities of the answer tokens, from hidden states and the head.

    For sequence :math:`b` with counted positions :math:`A_b = \{t : y_{bt} \ne \text{ignore\_index}\}`

    .. math::

        \log \pi(y_b \mid x_b) = \sum_{t \in A_b} \Big( \frac{z_{bt y_{bt}}}{\tau}
            - \operatorname{logsumexp}_j \frac{z_{btj}}{\tau} \Big),
        \qquad z = \operatorname{softcap}(h W^\top + b),

    divided by :math:`|A_b|` when ``average=True`` (SimNPO's length normalisation; 0 for a sequence with no counted
    token). This is what NPO, SimNPO and GradDiff need, computed chunk by chunk: no ``B × T × V`` tensor exists.

    Args:
        hidden: final hidden states, shape ``(B, T, d)``.
        weight: the output head's weight, shape ``(V, d)``.
        labels: shape ``(B, T)``; prompt and padding positions hold ``ignore_index``.
        bias: optional head bias, shape ``(V,)``.
        ignore_index: label of positions that do not count.
        average: divide each sequence's sum by its number of counted tokens.
        shift: ``False``: ``labels[:, t]`` is the token predicted from ``hidden[:, t]``. ``True``: Hugging Face
            causal-LM convention, ``labels`` are the input ids (with prompt masked) and ``hidden[:, t]`` predicts
            ``labels[:, t + 1]``.
        chunk_size: rows per chunk; ``None`` picks about 16 M logits per chunk (4 M with ``softcap`` or
            ``temperature``).
        softcap: logit soft-capping value, or ``None``.
        temperature: optional temperature dividing the logits (number, or tensor per sequence / per token).
        validate_args: Check finite hidden states and head, labels within the vocabulary and a tensor
            ``temperature`` > 0.

    Returns:
        Tensor of shape ``(B,)`` (float32, float64 for float64 inputs).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
        >>> labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 1, 2, 3]])
        >>> logps = linear_sequence_log_probs(hidden, weight, labels, chunk_size=4)
        >>> naive = (hidden @ weight.T).log_softmax(-1)
        >>> expected = naive[0, 1:4].gather(1, labels[0, 1:4, None]).sum()
        >>> torch.allclose(logps[0], expected)
        True
    """
    check_tensor(hidden, "hidden", floating=False)
    if hidden.ndim != 3:
        raise ValueError(
            f"`hidden` must have shape (B, T, d) for per-sequence log-probabilities, got {tuple(hidden.shape)}."
        )
    check_tensor(labels, "labels", floating=False)
    for flag, flag_name in ((average, "average"), (shift, "shift")):
        if not isinstance(flag, bool):
            raise TypeError(f"`{flag_name}` must be a bool, got {type(flag).__name__}.")
    if shift:
        hidden = hidden[:, :-1]
        labels = labels[:, 1:]
        if temperature is not None and isinstance(temperature, Tensor) and temperature.ndim == 2:
            temperature = temperature[:, :-1]
    out, index, _ = _ce_like(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        reduction="none",
        chunk_size=chunk_size,
        softcap=softcap,
        temperature=temperature,
        z_loss=0.0,
        sign=-1.0,
        target_name="labels",
        validate_args=validate_args,
    )
    batch, length = labels.shape
    sequence = torch.div(index, max(length, 1), rounding_mode="floor")
    sums = out.new_zeros(batch).index_add(0, sequence, out)
    if average:
        counts = torch.zeros(batch, dtype=out.dtype, device=out.device).index_add_(0, sequence, torch.ones_like(out))
        sums = sums / counts.clamp(min=1)
    return sums


# --------------------------------------------------------------------------------------------------------------------
# Distillation (forward KL, reverse KL, generalized Jensen-Shannon)
# --------------------------------------------------------------------------------------------------------------------

_Mode = Literal["forward", "reverse", "mixture", "mixed"]


def _distillation_rows(
    mode: _Mode,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    teacher_softcap: float | None,
    use_temperature: bool,
) -> RowLoss:
    def row_loss(student: Tensor, teacher_hidden: Tensor, beta: Tensor, *hyper: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = F.linear(teacher_hidden, teacher_weight, teacher_bias).to(student.dtype)
            if teacher_softcap is not None:
                teacher = teacher_softcap * torch.tanh(teacher / teacher_softcap)
        if use_temperature:
            t = hyper[0]
            t = t if t.ndim == 0 else t.unsqueeze(1)
            student, teacher = student / t, teacher / t
        log_s = torch.log_softmax(student, dim=-1)
        log_t = torch.log_softmax(teacher, dim=-1)
        if mode == "forward":
            return kl_from_log_probs(log_t, log_s)
        if mode == "reverse":
            return kl_from_log_probs(log_s, log_t)
        b = beta.to(student.dtype)
        b = b if b.ndim == 0 else b.unsqueeze(1)
        # log m = log((1 − β)·p_s + β·p_t); clamping only protects the β ∈ {0, 1} rows that torch.where discards.
        b_in = b.clamp(1e-12, 1 - 1e-12) if mode == "mixed" else b
        log_m = torch.logaddexp(log_s + torch.log1p(-b_in), log_t + torch.log(b_in))
        mix = b.squeeze(-1) * kl_from_log_probs(log_t, log_m) + (1 - b.squeeze(-1)) * kl_from_log_probs(log_s, log_m)
        if mode == "mixture":
            return mix
        b_row = b.squeeze(-1).expand_as(mix)
        reverse = torch.where(b_row == 1, kl_from_log_probs(log_s, log_t), mix)
        return torch.where(b_row == 0, kl_from_log_probs(log_t, log_s), reverse)

    return row_loss


def _distillation_core(
    mode: str, logits: Tensor, teacher: Tensor, beta: Tensor, temperature: Tensor | None, row_weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    r"""Row losses and their gradient with respect to the student logits :math:`z`, in place on both logit buffers.

    With :math:`s = z/T`, :math:`p = \operatorname{softmax}(s)` and :math:`q` the teacher's: forward KL
    :math:`(p - q)/T`; otherwise :math:`c\,p \odot (r - \sum_j p_j r_j)/T` with :math:`r = \log p - \log q`,
    :math:`c = 1` (reverse KL) or :math:`r = \log p - \log m`, :math:`c = 1 - \beta` (JSD, since its derivative in
    :math:`p` is :math:`(1-\beta)(\log p - \log m)`). ``row_weight`` (per row, or ``None``) multiplies the gradient.
    Plain tensor code, so that ``torch.compile`` can fuse it (``fused=True``).
    """
    weight = None if row_weight is None else row_weight.unsqueeze(-1)
    if temperature is not None:
        t = temperature if temperature.ndim == 0 else temperature.unsqueeze(1)
        logits.div_(t)
        teacher.div_(t)
        weight = 1 / t if weight is None else weight / t
    log_s = torch.log_softmax(logits, dim=-1, out=logits)  # one row-wise kernel (logsumexp is five passes)
    log_t = torch.log_softmax(teacher, dim=-1, out=teacher)
    p = log_s.exp()
    if mode == "forward":
        q = log_t.exp()
        loss = (q * (log_t - log_s)).sum(-1)
        grad = p.sub_(q)
    elif mode == "reverse":
        r = log_s - log_t
        loss = (p * r).sum(-1)
        grad = r.sub_(loss.unsqueeze(1)).mul_(p)
    else:
        b = beta if beta.ndim == 0 else beta.unsqueeze(1)
        log_m = torch.logaddexp(log_s + torch.log1p(-b), log_t + torch.log(b))
        teacher_term = kl_from_log_probs(log_t, log_m)
        r = log_s.sub_(log_m)
        student_term = (p * r).sum(-1)
        loss = b.squeeze(-1) * teacher_term + (1 - b.squeeze(-1)) * student_term
        grad = r.sub_(student_term.unsqueeze(1)).mul_(p).mul_(1 - b)
    return loss, grad if weight is None else grad.mul_(weight)


@functools.cache
def _compiled_distillation_core() -> Callable[..., tuple[Tensor, Tensor]]:
    return torch.compile(_distillation_core, dynamic=True)


def _distillation_rows_and_grad(
    mode: _Mode,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    teacher_softcap: float | None,
    use_temperature: bool,
    fused: bool = False,
) -> RowLossAndGrad:
    """Closed-form gradient of the distillation rows (see :func:`_distillation_core`); ``fused`` compiles the core."""
    core = _compiled_distillation_core() if fused else _distillation_core

    def row_loss_and_grad(
        logits: Tensor, extras: Sequence[Tensor], row_grad: Tensor | float
    ) -> tuple[Tensor, Tensor, float]:
        teacher_hidden, beta = extras[0], extras[1]
        teacher = F.linear(teacher_hidden, teacher_weight, teacher_bias).to(logits.dtype)
        if teacher_softcap is not None:
            teacher = teacher_softcap * torch.tanh(teacher / teacher_softcap)
        temperature = extras[2].to(logits.dtype) if use_temperature else None
        if isinstance(row_grad, Tensor) and row_grad.ndim > 0:  # per-row weights go into the gradient itself
            loss, grad = core(mode, logits, teacher, beta.to(logits.dtype), temperature, row_grad.to(logits.dtype))
            return loss, grad, 1.0
        loss, grad = core(mode, logits, teacher, beta.to(logits.dtype), temperature, None)
        return loss, grad, float(row_grad)

    return row_loss_and_grad


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    beta: float | Tensor = 0.5,
    temperature: float | Tensor = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    *,
    num_items_in_batch: NumItems = None,
    fused: bool = False,
    validate_args: bool = True,
) -> Tensor:
    r"""Token-level generalized Jensen-Shannon distillation from hidden states and heads, chunked over tokens.

    With student and teacher logits :math:`z^s = h^s W_s^\top + b_s`, :math:`z^t = h^t W_t^\top + b_t` (soft-capped
    when asked), :math:`p = \operatorname{softmax}(z^s/T)`, :math:`q = \operatorname{softmax}(z^t/T)` and the mixture
    :math:`m = \beta q + (1-\beta) p`, each counted token gives

    .. math::

        \ell = \begin{cases}
            \mathrm{KL}(q \,\|\, p) & \beta = 0 \text{ (forward KL)} \\
            \mathrm{KL}(p \,\|\, q) & \beta = 1 \text{ (reverse KL)} \\
            \beta\,\mathrm{KL}(q \,\|\, m) + (1-\beta)\,\mathrm{KL}(p \,\|\, m) & 0 < \beta < 1
        \end{cases}

    (TRL's ``generalized_jsd_loss``; no :math:`T^2` factor), averaged over the tokens whose label is not
    ``ignore_index`` (all tokens when ``labels`` is None). It equals
    :func:`lightning_losses.functional.generalized_jsd_loss` applied to the full logits. The teacher side runs without
    gradient; gradients reach the student hidden states, weight and bias, and tensor ``beta`` / ``temperature``.

    Args:
        student_hidden: student final hidden states, ``(N, d_s)`` or ``(B, T, d_s)``.
        student_weight: student head weight ``(V, d_s)``.
        teacher_hidden: teacher final hidden states with the same leading shape, ``(..., d_t)``.
        teacher_weight: teacher head weight ``(V, d_t)``; the same vocabulary size ``V`` is required.
        beta: interpolation :math:`\beta \in [0, 1]`; a number or tensor (0-d, per sample, per token).
        temperature: softmax temperature :math:`T > 0`; a number or tensor (0-d, per sample, per token).
        labels: optional token labels (shape of the leading dimensions); ``ignore_index`` marks tokens left out.
        ignore_index: label of tokens left out.
        reduction: ``"mean"`` over counted tokens (0 when none), ``"sum"``, or ``"none"`` (leading shape, 0 at
            ignored tokens).
        student_bias: optional student head bias ``(V,)``.
        teacher_bias: optional teacher head bias ``(V,)``.
        chunk_size: rows per chunk; ``None`` picks about 4 M logits per chunk.
        student_softcap: student logit soft-capping, or ``None``.
        teacher_softcap: teacher logit soft-capping, or ``None``.
        num_items_in_batch: With ``reduction="mean"``, the number of counted tokens of the whole batch this call is
            part of (every micro-batch of the optimizer step on every rank, divided by the factor the gradients are
            later divided by). ``None`` (default) divides by this call's counted tokens; otherwise the loss is
            :math:`\sum_{\text{counted}} \ell / n_{\text{items}}`, so that the micro-batch losses sum to the
            token mean of the whole batch.
        fused: Run each chunk's softmaxes, divergence and gradient as one ``torch.compile``-d function (fewer passes
            over the chunk: about 3× less time in that part on CPU; the first call compiles, about 10 s). Needs a
            working ``torch.compile`` backend (a C++ compiler on CPU, Triton on CUDA); equal to the eager result up to
            float rounding. Used by the closed-form path (β of every row in ``[0, 1]`` and of one kind, no student
            softcap).
        validate_args: Check the values of the tensors: finite hidden states and heads, labels within the
            vocabulary, tensor ``beta`` in ``[0, 1]``, tensor ``temperature`` > 0 (one host synchronisation).

    Returns:
        The reduced loss (float32, float64 for float64 inputs).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> hs, ws = torch.randn(6, 4, generator=g), torch.randn(13, 4, generator=g)
        >>> ht, wt = torch.randn(6, 5, generator=g), torch.randn(13, 5, generator=g)
        >>> forward_kl = linear_distillation_loss(hs, ws, ht, wt, beta=0.0, chunk_size=4)
        >>> p_t, log_p_s = (ht @ wt.T).softmax(-1), (hs @ ws.T).log_softmax(-1)
        >>> naive = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
        >>> torch.allclose(forward_kl, naive, atol=1e-6)
        True
        >>> abs(float(linear_distillation_loss(hs, ws, hs, ws, beta=0.5))) < 1e-6  # identical models: zero
        True
    """
    checks = DeferredChecks() if validate_args else None
    if not isinstance(fused, bool):
        raise TypeError(f"`fused` must be a bool (compile each chunk's work with torch.compile), got {fused!r}.")
    _check_head(student_hidden, student_weight, student_bias, "student_", checks)
    _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher_", checks)
    check_reduction(reduction, num_items_in_batch=num_items_in_batch)
    _check_chunk_size(chunk_size)
    _check_softcap(student_softcap, "student_softcap")
    _check_softcap(teacher_softcap, "teacher_softcap")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"`teacher_hidden` must have the same leading shape as `student_hidden` ({tuple(lead)}), got "
            f"{tuple(teacher_hidden.shape[:-1])}. Feed both models the same tokens."
        )
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    if vs != vt:
        raise ValueError(
            f"Vocabulary mismatch: the student head has {vs} rows and the teacher head {vt}. Distillation needs one "
            "vocabulary; if the extra rows are padding, slice both heads to the shared vocabulary "
            "(e.g. `teacher_weight[:V]`)."
        )
    if labels is None:
        valid = torch.ones(lead, dtype=torch.bool, device=student_hidden.device)
    else:
        valid = _check_labels(labels, lead, vs, ignore_index, "labels", checks, validate_args)
    beta_t = _per_row(
        beta, student_hidden, "beta", lead, low=0.0, low_inclusive=True, high=1.0, checks=checks, validate=True
    )
    temperature_t = None
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 1):
        temperature_t = _per_row(
            temperature, student_hidden, "temperature", lead, low=0.0, checks=checks, validate=validate_args
        )
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    b_detached = beta_t.detach()  # its range is always checked: the choice of branch below reads it anyway
    if bool((b_detached == 0).all()):
        mode: _Mode = "forward"
    elif bool((b_detached == 1).all()):
        mode = "reverse"
    elif bool(((b_detached > 0) & (b_detached < 1)).all()):
        mode = "mixture"
    else:
        mode = "mixed"
    use_t = temperature_t is not None
    student_hidden, student_weight, student_bias = _autocast_head(student_hidden, student_weight, student_bias)
    teacher_hidden, teacher_weight, teacher_bias = _autocast_head(teacher_hidden, teacher_weight, teacher_bias)
    index = valid.reshape(-1).nonzero().squeeze(1)
    n_valid = int(index.numel())
    rows_s = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, index)
    rows_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, index)
    if checks is not None:
        checks.require_finite(rows_s, "student_hidden")
        checks.require_finite(rows_t, "teacher_hidden")
        checks.run()
    extras = [rows_t, _select(beta_t, index)]
    if temperature_t is not None:
        extras.append(_select(temperature_t, index))
    teacher_head = (
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        None if teacher_softcap is None else float(teacher_softcap),
        use_t,
    )
    row_loss = _distillation_rows(mode, *teacher_head)
    closed_form = None
    if mode != "mixed":
        closed_form = _distillation_rows_and_grad(mode, *teacher_head, fused=fused)
    if chunk_size is None:
        # The closed form keeps about 4 chunk-sized buffers, autograd through the row loss about twice as many.
        closed = closed_form is not None and student_softcap is None and not any(e.requires_grad for e in extras)
        chunk_size = max(1, default_chunk_size(vs) // (2 if closed else 4))
    if num_items_in_batch is not None:
        scale: float | None = 1.0
    else:
        scale = None if reduction == "none" else (1.0 / max(n_valid, 1) if reduction == "mean" else 1.0)
    out = _chunked(
        row_loss,
        rows_s,
        student_weight,
        student_bias,
        extras,
        chunk_size=chunk_size,
        softcap=student_softcap,
        scale=scale,
        row_loss_and_grad=closed_form,
    )
    if reduction == "none":
        return _scatter_rows(out, index, lead)
    if num_items_in_batch is not None:
        return divide_by_items(out, n_valid, num_items_in_batch)
    return out

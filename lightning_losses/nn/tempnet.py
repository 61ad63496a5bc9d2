"""TempNet: a small network that predicts a temperature per token / sample / anchor, bounded in [τ_min, τ_max].

Two variants:

* :class:`TempNet` reads the (detached) full-vocabulary logits of an LLM or classifier.
* :class:`ContrastiveTempNet` reads a (detached) embedding and compares it with learnable prototypes, initialised
  from the first batch of the other modality.

For adaptive multi-head contrastive learning (AMCL) the module also holds :class:`MultiHeadProjection` (several
projection heads on one backbone) and the two temperature rules of
:func:`~lightning_losses.functional.amcl_loss`: :class:`HeadTemperature` (one learnable temperature per head) and
:class:`PairTemperature` (the paper's pair-adaptive rule).

Both detach their input, so the model they sit on receives no gradient through them: trained with
:func:`~lightning_losses.functional.dro_temperature_loss`, the model learns only through its logits and TempNet only
through τ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContrastiveTempNet", "HeadTemperature", "MultiHeadProjection", "PairTemperature", "TempNet"]


def _check_bounds(tau_min: float, tau_max: float) -> None:
    if not (0 < tau_min < tau_max) or not math.isfinite(tau_max):
        raise ValueError(
            f"TempNet needs 0 < tau_min < tau_max < inf, got tau_min={tau_min} and tau_max={tau_max}. "
            "Pass tau_min below tau_max (e.g. 0.5 and 5.0 for a GPT-2-style LM)."
        )


def _load_scalar_as_vector(state_dict: dict[str, Any], prefix: str) -> None:
    """Reshape a 0-dim ``log_pool_scale`` saved by earlier versions to the current shape ``(1,)`` before loading."""
    key = prefix + "log_pool_scale"
    value = state_dict.get(key)
    if isinstance(value, Tensor) and value.ndim == 0:
        state_dict[key] = value.reshape(1)


def _bounded(raw: Tensor, tau_min: float, tau_max: float) -> Tensor:
    tau = tau_min + (tau_max - tau_min) * torch.sigmoid(raw.float())
    return tau.clamp(tau_min, tau_max)


class _PooledTemperature(nn.Module):
    """The output stage both TempNets share: softmax pooling with a learnable scale, a linear head, bounded τ."""

    tau_min: float
    tau_max: float

    def _init_pooling(self, width: int, log_scale: float) -> None:
        """Create the pooling scale ``s`` (``log_scale``) and the head ``a``, ``b`` (ones and zero) of ``width``."""
        # shape (1,), not 0-dim: FSDP and DeepSpeed flatten, shard and broadcast parameters, and fail on 0-dim ones
        self.log_pool_scale = nn.Parameter(torch.full((1,), log_scale))
        self.head = nn.Linear(width, 1)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _pooled(self, scores: Tensor, values: Tensor) -> Tensor:
        """τ from ``a^T((w - 1/W) ⊙ values) + b`` with ``w = softmax(scores / e^s)`` over the last dimension."""
        w = torch.softmax(scores / self.log_pool_scale.exp(), dim=-1)
        raw = self.head((w - 1.0 / scores.shape[-1]) * values).squeeze(-1)
        return _bounded(raw, self.tau_min, self.tau_max)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _load_scalar_as_vector(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TempNet(_PooledTemperature):
    r"""Temperature network on logits (the LLM / classification variant).

    .. math::
        x = z / \|z\|_2,\quad h = W_2\,\mathrm{drop}(\sigma(W_1 x)),\quad
        w = \mathrm{softmax}(h / e^{s}),\quad
        \tau = \tau_{\min} + (\tau_{\max} - \tau_{\min})\,\sigma\big(a^\top ((w - 1/H) \odot h) + b\big)

    with a learnable pooling scale ``s`` (initialised to 0), ``a`` initialised to ones and ``b`` to 0.

    **Factorised first layer.** When the logits come from a linear head, :math:`z = W_o f + c` (an LM head on the
    last hidden state :math:`f`), pass ``features=f`` and ``head_weight=W_o`` (and ``head_bias=c``): then
    :math:`W_1 x = \big((W_1 W_o) f + W_1 c\big) / \|z\|_2`, which costs :math:`d \times H` per token instead of
    :math:`V \times H` (plus one :math:`H \times V \times d` product per call). The result is the same up to
    rounding; only the norm :math:`\|z\|_2` is read from the logits. All inputs are detached, so gradients reach
    TempNet's parameters only. With fewer tokens per call than about :math:`d` (``N·V ≤ (N + V)·d``) the product
    costs more than it saves and the logits path is taken instead (e.g. at generation).

    Args:
        vocab_size: Size ``V`` of the last dimension of the logits.
        tau_min: Lower bound of τ (GPT-2 setting: 0.5).
        tau_max: Upper bound of τ (GPT-2 setting: 5.0).
        hidden_dim: Width ``H`` of the projection.
        dropout: Dropout after the sigmoid.

    Shape:
        ``(..., V)`` logits → ``(...)`` float32 temperatures.

    Example:
        >>> net = TempNet(vocab_size=10, tau_min=0.5, tau_max=5.0, hidden_dim=16)
        >>> tau = net(torch.randn(2, 7, 10))
        >>> tuple(tau.shape), bool(((tau >= 0.5) & (tau <= 5.0)).all())
        ((2, 7), True)

        The factorised form on an LM head gives the same temperatures:

        >>> head = torch.nn.Linear(4, 10)
        >>> features = torch.randn(2, 7, 4)
        >>> _ = net.eval()
        >>> torch.allclose(net(head(features)), net(head(features), features=features, head_weight=head.weight,
        ...                                         head_bias=head.bias), atol=1e-5)
        True
    """

    def __init__(
        self,
        vocab_size: int,
        tau_min: float = 0.5,
        tau_max: float = 5.0,
        hidden_dim: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_bounds(tau_min, tau_max)
        if vocab_size < 2 or hidden_dim < 1:
            raise ValueError(f"TempNet needs vocab_size >= 2 and hidden_dim >= 1, got {vocab_size} and {hidden_dim}.")
        self.vocab_size, self.tau_min, self.tau_max, self.hidden_dim = vocab_size, tau_min, tau_max, hidden_dim
        self.proj = nn.Sequential(
            nn.Linear(vocab_size, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)
        )
        self._init_pooling(hidden_dim, 0.0)

    def forward(
        self,
        logits: Tensor,
        *,
        features: Tensor | None = None,
        head_weight: Tensor | None = None,
        head_bias: Tensor | None = None,
    ) -> Tensor:
        """Temperatures for ``logits`` of shape ``(..., V)``; see the class docstring for the factorised form.

        Args:
            logits: ``(..., V)`` logits (detached here).
            features: ``(..., d)`` inputs of the linear head that produced ``logits`` (factorised first layer).
            head_weight: ``(V, d)`` weight of that head; required with ``features``.
            head_bias: ``(V,)`` bias of that head, if it has one.

        Returns:
            ``logits.shape[:-1]`` float32 temperatures in ``[tau_min, tau_max]``.
        """
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"TempNet was built for {self.vocab_size} classes but got logits with last dimension "
                f"{logits.shape[-1]}. Build it with vocab_size={logits.shape[-1]}."
            )
        pre = None if features is None else self._factorised_first_layer(logits, features, head_weight, head_bias)
        if pre is None:
            first: nn.Linear = self.proj[0]  # type: ignore[assignment]
            pre = first(F.normalize(logits.detach().to(first.weight.dtype), dim=-1))
        h = self.proj[3](self.proj[2](self.proj[1](pre)))
        return self._pooled(h, h)

    def _factorised_first_layer(
        self, logits: Tensor, features: Tensor, head_weight: Tensor | None, head_bias: Tensor | None
    ) -> Tensor | None:
        """W₁(z/‖z‖) from the head's inputs, after checking them; ``None`` when the logits path is cheaper."""
        if head_weight is None or head_weight.ndim != 2 or head_weight.shape[0] != self.vocab_size:
            shape = None if head_weight is None else tuple(head_weight.shape)
            raise ValueError(
                f"TempNet's factorised form needs `head_weight` of shape (V={self.vocab_size}, d), the weight of the "
                f"linear head that produced the logits; got {shape}. Pass the head's weight (e.g. "
                "`model.get_output_embeddings().weight`) or drop `features`."
            )
        if features.shape[:-1] != logits.shape[:-1] or features.shape[-1] != head_weight.shape[1]:
            raise ValueError(
                f"`features` must have shape {tuple(logits.shape[:-1])} + (d={head_weight.shape[1]},) to match the "
                f"logits and the head, got {tuple(features.shape)}."
            )
        first: nn.Linear = self.proj[0]  # type: ignore[assignment]
        dtype = first.weight.dtype
        tokens, vocab, width = logits.numel() // self.vocab_size, self.vocab_size, head_weight.shape[1]
        if tokens * vocab <= (tokens + vocab) * width:  # too few tokens to pay for the H x V x d product
            return None
        weight = head_weight.detach().to(dtype)
        # (W1 W_o) f + W1 c, normalised by the norm of the logits: the same as W1 (z / |z|) without V x H per token
        projected = features.detach().to(dtype) @ (first.weight @ weight).T
        if head_bias is not None:
            projected = projected + first.weight @ head_bias.detach().to(dtype)
        norm = torch.linalg.vector_norm(logits.detach().to(dtype), dim=-1, keepdim=True).clamp_min(1e-12)
        return projected / norm + first.bias


class ContrastiveTempNet(_PooledTemperature):
    r"""Temperature network on embeddings with learnable prototypes (the contrastive / CLIP variant).

    .. math::
        x = \mathrm{drop}(\sigma(W x)),\quad q = x\,\hat P^\top,\quad w = \mathrm{softmax}(q / e^{s}),\quad
        \tau = \tau_{\min} + (\tau_{\max} - \tau_{\min})\,\sigma\big(a^\top((w - 1/M)\odot\sigma(q)) + b\big)

    with ``M`` prototypes :math:`P` (rows L2-normalised), ``s`` initialised to ``log 0.01``. Call
    :meth:`init_prototypes` with the first batch of the *other* modality's embeddings (the robust contrastive loss
    module does this on its first step).

    Args:
        embed_dim: Embedding width ``d``.
        tau_min: Lower bound of τ (0.005 in the reference).
        tau_max: Upper bound of τ (0.05).
        num_prototypes: Number ``M`` of prototypes.
        dropout: Dropout on the projected embedding.

    Example:
        >>> net = ContrastiveTempNet(embed_dim=8, num_prototypes=4)
        >>> tau = net(torch.nn.functional.normalize(torch.randn(5, 8), dim=1))
        >>> tuple(tau.shape), bool(((tau >= 0.005) & (tau <= 0.05)).all())
        ((5,), True)
    """

    prototypes_initialized: Tensor

    def __init__(
        self,
        embed_dim: int,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        num_prototypes: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_bounds(tau_min, tau_max)
        self.embed_dim, self.tau_min, self.tau_max, self.num_prototypes = embed_dim, tau_min, tau_max, num_prototypes
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, embed_dim), dim=1))
        self._init_pooling(num_prototypes, math.log(0.01))
        self.register_buffer("prototypes_initialized", torch.tensor(False))

    @torch.no_grad()
    def init_prototypes(self, other_embeddings: Tensor) -> None:
        """Set the prototypes from a batch of the other modality's embeddings (rows reused cyclically).

        Runs once: later calls do nothing (the flag is checkpointed).
        """
        if bool(self.prototypes_initialized):
            return
        rows = other_embeddings.detach().reshape(-1, self.embed_dim).to(self.prototypes)
        if rows.shape[0] == 0:
            raise ValueError("init_prototypes needs at least one embedding.")
        picks = torch.arange(self.num_prototypes, device=rows.device) % rows.shape[0]
        self.prototypes.copy_(F.normalize(rows[picks], dim=1))
        self.prototypes_initialized.fill_(True)

    def forward(self, embeddings: Tensor) -> Tensor:
        if embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"ContrastiveTempNet expects embeddings of width {self.embed_dim}, got {embeddings.shape[-1]}."
            )
        x = self.dropout(torch.sigmoid(self.proj(embeddings.detach().to(self.proj.weight.dtype))))
        prods = x @ F.normalize(self.prototypes, dim=1).T
        return self._pooled(prods, torch.sigmoid(prods))


class MultiHeadProjection(nn.Module):
    r"""``H`` independent projection heads on one embedding, AMCL's multi-head projector.

    Head :math:`c` is :math:`z^c = W^c_2\,\mathrm{ReLU}(W^c_1 h + b^c_1) + b^c_2` (the SimCLR projection MLP, replicated
    with its own weights); the heads are stacked on dimension 1, the layout of
    :func:`~lightning_losses.functional.amcl_loss`.

    Args:
        in_dim: Width of the backbone embedding.
        out_dim: Width :math:`d'` of each projection.
        num_heads: Number of heads ``H`` (official code: 3).
        hidden_dim: Hidden width of each head (official code: 512).

    Shape:
        ``(B, in_dim)`` → ``(B, H, out_dim)``.

    Example:
        >>> proj = MultiHeadProjection(in_dim=32, out_dim=8, num_heads=3, hidden_dim=16)
        >>> tuple(proj(torch.randn(5, 32)).shape)
        (5, 3, 8)
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int = 3, hidden_dim: int = 512) -> None:
        super().__init__()
        sizes = {"in_dim": in_dim, "out_dim": out_dim, "num_heads": num_heads, "hidden_dim": hidden_dim}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiHeadProjection needs `{name}` to be an integer >= 1, got {value!r}.")
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
            for _ in range(num_heads)
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"MultiHeadProjection expects embeddings of shape (B, {self.in_dim}), got {tuple(features.shape)}. "
                "Flatten the backbone output first (e.g. `features.flatten(1)`)."
            )
        return torch.stack([head(features) for head in self.heads], dim=1)


def _bounded_keep_double(raw: Tensor, tau_min: float, tau_max: float) -> Tensor:
    """:func:`_bounded` in float32, or in float64 for float64 inputs."""
    if raw.dtype == torch.float64:
        return (tau_min + (tau_max - tau_min) * torch.sigmoid(raw)).clamp(tau_min, tau_max)
    return _bounded(raw, tau_min, tau_max)


def _check_pair_inputs(anchors: Tensor, candidates: Tensor, heads: int | None, dim: int | None) -> None:
    if anchors.ndim != 3 or candidates.ndim != 3 or anchors.shape[0] != candidates.shape[0]:
        raise ValueError(
            "Temperatures read anchors (H, R, d) and candidates (H, M, d) with the same number of heads H, got "
            f"{tuple(anchors.shape)} and {tuple(candidates.shape)}."
        )
    if heads is not None and anchors.shape[0] != heads:
        raise ValueError(f"This temperature was built for {heads} heads, got features of {anchors.shape[0]} heads.")
    if dim is not None and (anchors.shape[-1] != dim or candidates.shape[-1] != dim):
        raise ValueError(
            f"This temperature was built for projections of width {dim}, got {anchors.shape[-1]} and "
            f"{candidates.shape[-1]}."
        )


class HeadTemperature(nn.Module):
    r"""One learnable temperature per projection head, bounded in :math:`[\tau_{\min}, \tau_{\max}]`.

    .. math::
        \tau_c = \tau_{\min} + (\tau_{\max} - \tau_{\min})\,\sigma(\theta_c),

    with :math:`\theta_c` initialised so that :math:`\tau_c` = ``init``. Called like :class:`PairTemperature`
    (anchors and candidates, which it does not read) and returns ``(H, 1, 1)``, broadcast over every pair.

    Args:
        num_heads: Number of heads ``H``.
        init: Initial temperature, inside ``(tau_min, tau_max)``.
        tau_min: Lower bound.
        tau_max: Upper bound.

    Example:
        >>> temp = HeadTemperature(num_heads=3, init=0.2)
        >>> tau = temp(torch.randn(3, 4, 8), torch.randn(3, 4, 8))
        >>> tuple(tau.shape), [round(v, 4) for v in tau.flatten().tolist()]
        ((3, 1, 1), [0.2, 0.2, 0.2])
    """

    def __init__(self, num_heads: int, init: float = 0.1, tau_min: float = 0.01, tau_max: float = 1.0) -> None:
        super().__init__()
        _check_bounds(tau_min, tau_max)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"HeadTemperature needs `num_heads` to be an integer >= 1, got {num_heads!r}.")
        if not tau_min < init < tau_max:
            raise ValueError(
                f"`init` must lie strictly between tau_min={tau_min} and tau_max={tau_max}, got {init}. Pass an "
                "initial temperature inside the bounds."
            )
        self.num_heads, self.tau_min, self.tau_max = num_heads, tau_min, tau_max
        unit = (init - tau_min) / (tau_max - tau_min)
        self.raw = nn.Parameter(torch.full((num_heads,), math.log(unit / (1.0 - unit))))

    def forward(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        """``(H, 1, 1)`` temperatures, float32 (float64 for a float64 module; the inputs only fix the number of
        heads)."""
        _check_pair_inputs(anchors, candidates, self.num_heads, None)
        return _bounded_keep_double(self.raw, self.tau_min, self.tau_max).reshape(-1, 1, 1)


class PairTemperature(nn.Module):
    r"""AMCL's pair-adaptive temperature: one per head and pair, from a network shared by the heads.

    .. math::
        \tau(z, z') = \tau_{\min} + (\tau_{\max} - \tau_{\min})\,\sigma\big(-\langle\phi(z), \phi(z')\rangle\big),
        \qquad \phi = W_2\,\mathrm{ReLU}(W_1 \cdot + b_1) + b_2 : \mathbb{R}^{d'} \to \mathbb{R}^{d'},

    the paper's Eq. (3) :math:`\iota / (1 + e^{r}) + \eta`: pairs that :math:`\phi` finds alike get low
    temperatures, unlike ones high. The features are read as given (L2-normalised by the loss) and not detached, as
    in the official code (``LeiWangR/cl``, ``amcl/losses.py``, ``TemperatureHead``), so the encoder also learns
    through the temperatures. Defaults are the official code's (:math:`\tau \in [10^{-5}, 2]`, hidden width
    :math:`d'`).

    Args:
        embed_dim: Projection width :math:`d'`.
        hidden_dim: Hidden width of :math:`\phi` (default ``embed_dim``).
        tau_min: Lower bound :math:`\eta`.
        tau_max: Upper bound :math:`\eta + \iota`.

    Shape:
        anchors ``(H, R, d')`` and candidates ``(H, M, d')`` → ``(H, R, M)`` temperatures, float32 (float64 for a
        float64 module).

    Example:
        >>> temp = PairTemperature(embed_dim=8)
        >>> tau = temp(torch.randn(2, 5, 8), torch.randn(2, 6, 8))
        >>> tuple(tau.shape), bool(((tau >= 1e-5) & (tau <= 2.0)).all())
        ((2, 5, 6), True)
    """

    def __init__(
        self, embed_dim: int, hidden_dim: int | None = None, tau_min: float = 1e-5, tau_max: float = 2.0
    ) -> None:
        super().__init__()
        _check_bounds(tau_min, tau_max)
        hidden = embed_dim if hidden_dim is None else hidden_dim
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"PairTemperature needs embed_dim >= 1 and hidden_dim >= 1, got {embed_dim} and {hidden}.")
        self.embed_dim, self.tau_min, self.tau_max = embed_dim, tau_min, tau_max
        self.phi = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))

    def forward(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        _check_pair_inputs(anchors, candidates, None, self.embed_dim)
        first = self.phi[0]
        assert isinstance(first, nn.Linear)
        dtype = first.weight.dtype
        scores = self.phi(anchors.to(dtype)) @ self.phi(candidates.to(dtype)).transpose(1, 2)
        return _bounded_keep_double(-scores, self.tau_min, self.tau_max)

"""TempNet: a small network that predicts a temperature per token / sample / anchor, bounded in [τ_min, τ_max].

Two variants:

* :class:`TempNet` reads the (detached) full-vocabulary logits of an LLM or classifier.
* :class:`ContrastiveTempNet` reads a (detached) embedding and compares it with learnable prototypes, initialised
  from the first batch of the other modality.

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

__all__ = ["ContrastiveTempNet", "TempNet"]


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


class TempNet(nn.Module):
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
        # shape (1,), not 0-dim: FSDP and DeepSpeed flatten, shard and broadcast parameters, and fail on 0-dim ones
        self.log_pool_scale = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(hidden_dim, 1)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _load_scalar_as_vector(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        w = torch.softmax(h / self.log_pool_scale.exp(), dim=-1)
        raw = self.head((w - 1.0 / self.hidden_dim) * h).squeeze(-1)
        return _bounded(raw, self.tau_min, self.tau_max)

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


class ContrastiveTempNet(nn.Module):
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
        self.log_pool_scale = nn.Parameter(torch.full((1,), math.log(0.01)))  # (1,): see TempNet
        self.head = nn.Linear(num_prototypes, 1)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)
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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _load_scalar_as_vector(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, embeddings: Tensor) -> Tensor:
        if embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"ContrastiveTempNet expects embeddings of width {self.embed_dim}, got {embeddings.shape[-1]}."
            )
        x = self.dropout(torch.sigmoid(self.proj(embeddings.detach().to(self.proj.weight.dtype))))
        prods = x @ F.normalize(self.prototypes, dim=1).T
        w = torch.softmax(prods / self.log_pool_scale.exp(), dim=-1)
        raw = self.head((w - 1.0 / self.num_prototypes) * torch.sigmoid(prods)).squeeze(-1)
        return _bounded(raw, self.tau_min, self.tau_max)

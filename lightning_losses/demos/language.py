"""Demo pieces for the Shakespeare plays: small GPT-2-style models from a config and a plain LM module.

No weights are downloaded: models are built from ``transformers.GPT2Config`` and trained on the plays.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_losses.utilities.checks import check_number
from lightning_losses.utilities.imports import require

__all__ = ["CausalLMModule", "build_gpt2", "causal_lm_logits", "gpt2_config"]


def gpt2_config(
    vocab_size: int,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    block_size: int = 128,
    dropout: float = 0.0,
) -> Any:
    """The ``transformers.GPT2Config`` of :func:`build_gpt2` and :class:`~lightning_losses.demos.TinyGPT2`."""
    transformers = require("transformers", "llm")
    check_number("vocab_size", vocab_size, low=2, integer=True)
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )


def build_gpt2(
    vocab_size: int,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    block_size: int = 128,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A freshly initialised ``GPT2LMHeadModel`` (tied embeddings) from a config; nothing is downloaded.

    The initial weights depend on ``seed`` only (the global random state is left as it was).

    Example:
        >>> model = build_gpt2(vocab_size=64, n_layer=1, n_embd=16, n_head=2, block_size=8)
        >>> tuple(model(torch.zeros(2, 8, dtype=torch.long)).logits.shape)
        (2, 8, 64)
    """
    transformers = require("transformers", "llm")
    config = gpt2_config(vocab_size, n_layer, n_embd, n_head, block_size, dropout)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config)


def causal_lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits of a model returning either a tensor or an object with ``.logits``."""
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


class CausalLMModule(pl.LightningModule):
    """Plain next-token cross-entropy training at a fixed temperature (the τ = 1 baseline).

    Batches are ``(input_ids, labels[, index])``; position ``t`` predicts ``labels[t + 1]``. Validation logs
    ``val/ce`` and ``val/ppl`` (exp of the token-averaged cross-entropy over the whole validation set).

    With ``chunk_size`` set, the training loss is the chunked
    :func:`~lightning_losses.functional.linear_cross_entropy` of the final hidden states and the LM head (read by
    :func:`~lightning_losses.integrations.transformers.causal_lm_hidden_states`): the ``tokens × vocabulary``
    logits are never formed, and the value and gradients equal the plain cross-entropy's.

    Example:
        >>> module = CausalLMModule(build_gpt2(64, n_layer=1, n_embd=16, n_head=2, block_size=8))
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> bool(torch.isfinite(module.training_step((ids, ids, torch.arange(2)), 0)))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        temperature: float = 1.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("temperature", temperature, low=0.0, low_inclusive=False)
        if chunk_size is not None:
            check_number("chunk_size", chunk_size, low=1, integer=True)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.lr, self.weight_decay, self.temperature, self.chunk_size = lr, weight_decay, temperature, chunk_size
        self.val_nll = MeanMetric()

    def forward(self, input_ids: Tensor) -> Tensor:
        return causal_lm_logits(self.model, input_ids)

    def _loss(self, batch: Any, chunked: bool = False) -> tuple[Tensor, int]:
        input_ids, labels = batch[0], batch[1]
        target = labels[:, 1:]
        count = int((target != -100).sum())
        if chunked:
            from lightning_losses.functional.chunked import linear_cross_entropy
            from lightning_losses.integrations.transformers import causal_lm_hidden_states

            hidden, head = causal_lm_hidden_states(self.model, input_ids)
            loss = linear_cross_entropy(
                hidden[:, :-1],
                head.weight,
                target,
                head.bias,
                chunk_size=self.chunk_size,
                softcap=head.softcap,
                temperature=self.temperature if self.temperature != 1.0 else None,
            )
            return loss, count
        logits = self(input_ids)[:, :-1].float() / self.temperature
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return loss, count

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, count = self._loss(batch, chunked=self.chunk_size is not None)
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=count)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.val_nll.update(loss.detach(), count)

    def on_validation_epoch_end(self) -> None:
        nll = float(self.val_nll.compute())
        self.val_nll.reset()
        self.log("val/ce", nll)
        self.log("val/ppl", math.exp(min(nll, 50.0)), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

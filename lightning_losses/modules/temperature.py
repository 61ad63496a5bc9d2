"""``TempNetModule``: a ready LightningModule training a classifier or a causal LM with TempNet and KL-DRO."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_losses.integrations.transformers import HiddenStatesUnavailable, causal_lm_hidden_states, output_head
from lightning_losses.mixins.temperature import TempNetMixin
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_number
from lightning_losses.utilities.tokens import count_label_tokens, step_num_items

__all__ = ["TempNetModule"]


def _has_linear_head(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM whose logits are a plain linear map of its last hidden state."""
    if not callable(getattr(model, "get_output_embeddings", None)):
        return False
    try:
        return output_head(model).softcap is None
    except (TypeError, ValueError):
        return False


class TempNetModule(TempNetMixin, pl.LightningModule):
    """Train ``model`` with per-position temperatures from TempNet and the KL-DRO robust loss.

    ``task="classification"``: batches ``(x, y[, index])``, ``model(x)`` gives ``(N, C)`` logits.
    ``task="causal_lm"``: batches ``(input_ids, labels[, index])`` or dicts with those keys; ``model(input_ids)``
    gives ``(B, L, V)`` logits (or an object with ``.logits``, as Hugging Face models do); position ``t`` predicts
    ``labels[t + 1]``. A transformers causal LM whose head is a plain linear layer (GPT-2, LLaMA; not Gemma-2's
    soft-capped logits) runs its backbone and head separately so that TempNet uses its factorised first layer
    (``d × H`` per token instead of ``V × H``; same temperatures, see :class:`~lightning_losses.nn.TempNet`).

    Validation logs the DRO loss, τ statistics, the plain cross-entropy at τ = 1 and (LM) its perplexity
    ``val/ppl``, the perplexity with TempNet's temperatures applied ``val/ppl_tempnet``, or (classification)
    ``val/acc``.

    Args:
        model: The base network.
        num_classes: Number of classes / vocabulary size.
        task: ``"classification"`` or ``"causal_lm"``.
        rho: KL-ball radius, below ``log(num_classes)``.
        tau_min: Lower bound of τ.
        tau_max: Upper bound of τ.
        hidden_dim: TempNet width.
        dropout: TempNet dropout.
        lr: Learning rate of the base model.
        tempnet_lr: Learning rate of TempNet.
        weight_decay: AdamW weight decay of the base model.
        train_base: ``False`` trains only TempNet on the frozen base.
        ignore_index: Label value of positions that do not count.

    Example:
        >>> module = TempNetModule(torch.nn.Linear(4, 10), num_classes=10, rho=1.0, hidden_dim=16)
        >>> loss = module.training_step((torch.randn(8, 4), torch.randint(0, 10, (8,))), 0)
        >>> bool(torch.isfinite(loss))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        task: Literal["classification", "causal_lm"] = "classification",
        rho: float = 1.0,
        tau_min: float = 0.5,
        tau_max: float = 5.0,
        hidden_dim: int = 256,
        dropout: float = 0.5,
        lr: float = 1e-3,
        tempnet_lr: float = 1e-4,
        weight_decay: float = 0.0,
        train_base: bool = True,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if task not in ("classification", "causal_lm"):
            raise ValueError(f"`task` must be 'classification' or 'causal_lm', got {task!r}.")
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.task = task
        self.lr, self.weight_decay = lr, weight_decay
        self.configure_tempnet(
            num_classes,
            rho=rho,
            tau_min=tau_min,
            tau_max=tau_max,
            hidden_dim=hidden_dim,
            dropout=dropout,
            tempnet_lr=tempnet_lr,
            train_base=train_base,
            ignore_index=ignore_index,
        )
        self.val_nll = MeanMetric()
        self.val_nll_tempnet = MeanMetric()
        self._linear_head = task == "causal_lm" and _has_linear_head(model)

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.model(inputs)
        return out.logits if hasattr(out, "logits") else out

    def _logits_and_targets(self, batch: Any) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Logits, targets and, for a transformers LM with a linear head, the head's inputs for factorised TempNet."""
        labels: Tensor
        if self.task == "causal_lm" and isinstance(batch, dict):
            inputs = batch["input_ids"]
            labels = cast(Tensor, batch.get("labels", inputs))
        else:
            inputs, maybe_labels, _ = unpack_batch(batch)
            if maybe_labels is None:
                raise ValueError("TempNetModule needs targets in the batch: (inputs, target[, index]).")
            labels = maybe_labels
        head: dict[str, Any] = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tempnet_settings["train_base"]):
            pair = self._hidden_states(inputs) if self._linear_head else None
            if pair is not None:
                hidden, out = pair
                logits = F.linear(hidden, out.weight, out.bias)
                head = {"features": hidden[:, :-1], "head_weight": out.weight, "head_bias": out.bias}
            else:
                logits = self(inputs)
        if self.task == "causal_lm":
            return logits[:, :-1], labels[:, 1:], head
        return logits, labels, head

    def _hidden_states(self, inputs: Tensor) -> tuple[Tensor, Any] | None:
        """The LM's hidden states and head, or ``None`` (and the logits path from then on) where sharding hides them."""
        try:
            return causal_lm_hidden_states(self.model, inputs)
        except HiddenStatesUnavailable as err:
            self._linear_head = False
            warnings.warn(f"TempNet reads the full logits instead of the factorised head path: {err}", stacklevel=2)
            return None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, target, head = self._logits_and_targets(batch)
        # the DRO loss is a mean over counted positions: over the whole optimizer step (ranks, micro-batches)
        count = count_label_tokens(target, self.tempnet_dro.ignore_index, shift=False)  # targets are already shifted
        num_items = step_num_items(self, count, batch)
        loss = self.tempnet_loss(logits, target, stage="train", num_items_in_batch=num_items, **head)
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=target.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, target, head = self._logits_and_targets(batch)
        ignore = self.tempnet_dro.ignore_index
        tau = self.tempnet_temperatures(logits, **head)
        count = int((target != ignore).sum())
        flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
        ce = F.cross_entropy(flat_logits, flat_target, ignore_index=ignore)
        ce_tempnet = F.cross_entropy(flat_logits / tau.reshape(-1, 1), flat_target, ignore_index=ignore)
        self.log("val/loss", self.tempnet_dro(logits, target, tau), sync_dist=True, batch_size=count)
        self.val_nll.update(ce.detach(), count)
        self.val_nll_tempnet.update(ce_tempnet.detach(), count)
        self.log_tau_statistics(tau, target != ignore, stage="val")
        if self.task == "classification":
            acc = (logits.argmax(-1) == target).float().mean()
            self.log("val/acc", acc, sync_dist=True, batch_size=count, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        nll, nll_tempnet = float(self.val_nll.compute()), float(self.val_nll_tempnet.compute())
        self.val_nll.reset()
        self.val_nll_tempnet.reset()
        self.log("val/ce", nll)
        self.log("val/ce_tempnet", nll_tempnet)
        if self.task == "causal_lm":
            self.log("val/ppl", math.exp(min(nll, 50.0)), prog_bar=True)
            self.log("val/ppl_tempnet", math.exp(min(nll_tempnet, 50.0)))

    def setup(self, stage: str) -> None:
        from lightning_losses.integrations.tokenization import check_trainer_vocabulary

        super().setup(stage)
        if self.task == "causal_lm":  # the data's tokenizer against the model's embedding and TempNet's vocabulary
            check_trainer_vocabulary(self, self.model)
            check_trainer_vocabulary(self, vocab_size=int(self.hparams["num_classes"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.tempnet_parameter_groups(self.lr, self.weight_decay))

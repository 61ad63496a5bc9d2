"""``UnlearningModule``: a ready LightningModule that unlearns a forget set from a transformers causal LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses.losses.unlearning import RetainLoss
from lightning_losses.mixins.unlearning import ReferenceMode, UnlearningMethod, UnlearningMixin
from lightning_losses.utilities.checks import check_number
from lightning_losses.utilities.tokens import step_num_items

__all__ = ["UnlearningModule"]


class UnlearningModule(UnlearningMixin, pl.LightningModule):
    """Unlearning of a (PEFT-wrapped) causal LM with forget and retain data combined per step.

    Training batches are ``{"forget": batch, "retain": batch}`` (a ``CombinedLoader``, as
    :class:`~lightning_losses.data.UnlearningDataModule` gives). Validation logs the token-mean NLL of each validation
    dataloader as ``val/nll_<split>``; add :class:`~lightning_losses.UnlearningEvaluation` for membership inference
    and forget quality.

    Args:
        model: the causal LM; wrap it with a fresh LoRA adapter
            (:func:`lightning_losses.integrations.peft.lora_model`) to keep the base weights untouched.
        method: ``"ga"``, ``"graddiff"``, ``"graddiff_kl"``, ``"npo"``, ``"npo_rt"``, ``"npo_kl"``, ``"simnpo"``,
            ``"flat"``, ``"idkdpo"``, ``"wga"``, ``"satimp"``, ``"ceu"``, ``"undial"``, ``"rmu"`` or ``"altpo"``, with
            the papers' / open-unlearning's defaults (:data:`~lightning_losses.UNLEARNING_PRESETS`); ``None``:
            ``loss`` as it is, or ``"npo"`` without one. For NPO on long answers pass
            ``loss=NPOLoss(length_normalize=True)`` (see :func:`~lightning_losses.functional.npo_loss`).
        loss: the loss, called as ``loss(scores)`` (:class:`~lightning_losses.UnlearningScores`): the method's class
            with other settings (``NPOLoss(beta=0.05)``), a subclass of it, or, without ``method``, your own
            ``nn.Module`` declaring the scores it reads in ``needs``.
        retain_loss: override of the method's retain term (``"nll"``, ``"kl"``, ``None``); ``"default"`` keeps it.
        reference: reference mode; ``"auto"`` picks the cheapest correct one.
        reference_adapter: name of the reference adapter for ``"named_adapter"``.
        reference_model: an explicit frozen reference model for ``reference="model"`` (a second copy in memory,
            kept out of the module tree and the checkpoint).
        lr: AdamW learning rate (NPO's paper uses 1e-5 for 7B models; small models need more).
        weight_decay: AdamW weight decay.
        split_names: names of the validation dataloaders, in order.
        use_hidden_states: compute log-probabilities from hidden states and the head, chunked.
        original_weights_path: where full-weight unlearning saves the original weights before training.
        adapter_dir: when set, the adapter is saved there with ``save_pretrained`` at the end of training.

    Example:
        >>> from lightning_losses.demos import build_gpt2
        >>> from lightning_losses.integrations.peft import lora_model
        >>> module = UnlearningModule(lora_model(build_gpt2(64, n_layer=1, n_embd=16, n_head=2, block_size=8), r=2))
        >>> module.reference_mode, round(float(module.get_hyperparameter("npo.beta")), 6)
        ('precomputed', 0.1)
    """

    def __init__(
        self,
        model: nn.Module,
        method: UnlearningMethod | None = None,
        loss: nn.Module | None = None,
        retain_loss: RetainLoss | str | None = "default",
        reference: ReferenceMode = "auto",
        reference_adapter: str = "reference",
        reference_model: nn.Module | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        split_names: tuple[str, ...] = ("forget", "retain", "heldout"),
        use_hidden_states: bool = True,
        original_weights_path: str | None = None,
        adapter_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        self.save_hyperparameters(ignore=["model", "loss", "reference_model"])
        self.model = model
        self.configure_unlearning(
            model,
            method,
            loss=loss,
            retain_loss=retain_loss,  # type: ignore[arg-type]
            reference=reference,
            reference_adapter=reference_adapter,
            reference_model=reference_model,
            use_hidden_states=use_hidden_states,
            original_weights_path=original_weights_path,
        )
        self.lr, self.weight_decay, self.split_names, self.adapter_dir = lr, weight_decay, split_names, adapter_dir
        self._val_sums: dict[int, list[float]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if not isinstance(batch, dict) or "forget" not in batch:
            raise ValueError(
                "UnlearningModule expects training batches {'forget': ..., 'retain': ...} from a CombinedLoader; got "
                f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "") + "."
            )
        forget, retain = batch["forget"], batch.get("retain")
        num_items = None
        if retain is not None and self.unlearning_uses_retain:
            # the retain term is a token mean: over the whole optimizer step (ranks and accumulated micro-batches)
            num_items = step_num_items(self, self.retain_token_count(retain), batch)
        loss = self.unlearning_loss(forget, retain, num_items_in_batch=num_items)
        size = int(forget["input_ids"].shape[0]) if isinstance(forget, dict) else int(forget[0].shape[0])
        if self._trainer is None:
            return loss
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if "retain" in self.unlearning_terms:
            self.log("train/retain", self.unlearning_terms["retain"], batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        lp, _, _, mask = self.unlearning_token_statistics(batch)
        name = self.split_names[dataloader_idx] if dataloader_idx < len(self.split_names) else str(dataloader_idx)
        n = mask.sum()
        self.log(
            f"val/nll_{name}",
            -(lp * mask).sum() / n.clamp(min=1),
            batch_size=int(n),
            sync_dist=True,
            add_dataloader_idx=False,
        )

    def setup(self, stage: str) -> None:
        from lightning_losses.integrations.tokenization import check_trainer_vocabulary

        super().setup(stage)
        check_trainer_vocabulary(self, self.model)  # the data's tokenizer against the model's embedding, up front

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameter: the adapter (or the model) is frozen.")
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.adapter_dir is not None:  # on every process: a sharded adapter is gathered first, process 0 writes
            self.save_adapter(Path(self.adapter_dir))

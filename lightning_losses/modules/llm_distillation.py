r"""Ready LightningModules for causal-LM distillation: on-policy (GKD) with a live teacher, and offline from stored
top-k teacher log-probabilities (the teacher never in training memory)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses.functional.sparse_distillation import TopKLogProbs
from lightning_losses.losses.distillation import GeneralizedJSDLoss
from lightning_losses.losses.sparse_distillation import SparseGeneralizedJSDLoss
from lightning_losses.mixins.distillation import DistillationMixin
from lightning_losses.mixins.on_policy import GenerationSettings, OnPolicyDistillationMixin
from lightning_losses.utilities.checks import check_choice, check_number
from lightning_losses.utilities.tokens import count_label_tokens, step_num_items

__all__ = ["CausalLMDistillationModule", "OfflineDistillationModule"]


def _adamw(module: pl.LightningModule, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class CausalLMDistillationModule(OnPolicyDistillationMixin, DistillationMixin, pl.LightningModule):
    r"""Distil a causal-LM ``teacher`` into ``student`` with Generalized Knowledge Distillation (GKD).

    Each training step, with probability ``lmbda`` the student samples the completions of the batch's prompts;
    otherwise the teacher does (``seq_kd=True``) or the dataset's completions are used. The loss is the generalized
    JSD (``beta``: 0 forward KL, 1 reverse KL) on the completion tokens (formula and draw:
    :mod:`lightning_losses.mixins.on_policy`), normalised by the token count of the optimizer step across ranks.
    Defaults are TRL's ``GKDConfig`` (``trl/experimental/gkd/gkd_config.py``): ``lmbda=0.5``, ``beta=0.5``, sampling
    temperature 0.9, ``max_new_tokens=128``, ``top_k=0``, ``top_p=1``. Validation reports ``val/jsd`` on the
    dataset's sequences of the validation batches (off-policy, no sampling).

    Hyperparameters: ``"on_policy.lmbda"``, ``"kd.beta"``, ``"kd.temperature"``, ``"kd.weight"``.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> def lm(width):
        ...     return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=30, n_positions=32))
        >>> module = CausalLMDistillationModule(lm(8), lm(16), lmbda=1.0, max_new_tokens=4)
        >>> sorted(module.named_hyperparameters())
        ['kd.beta', 'kd.temperature', 'kd.weight', 'on_policy.lmbda']
        >>> batch = {"prompts": torch.randint(0, 30, (2, 3)), "prompt_attention_mask": torch.ones(2, 3)}
        >>> bool(module.training_step(batch, 0).detach() >= 0)
        True
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        lmbda: float = 0.5,
        beta: float = 0.5,
        seq_kd: bool = False,
        temperature: float = 1.0,
        max_new_tokens: int = 128,
        generation_temperature: float = 0.9,
        top_k: int = 0,
        top_p: float = 1.0,
        do_sample: bool = True,
        seed: int = 0,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        chunk_size: int | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.student = student
        self.configure_distillation(teacher, loss=GeneralizedJSDLoss(beta=beta, temperature=temperature))
        generation = GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=generation_temperature,
            top_k=top_k,
            top_p=top_p,
            do_sample=do_sample,
        )
        self.configure_on_policy(
            lmbda, seq_kd=seq_kd, generation=generation, seed=seed, pad_token_id=pad_token_id, eos_token_id=eos_token_id
        )
        self.chunk_size = chunk_size

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.on_policy_distillation_loss(
            self.student, batch, chunk_size=self.chunk_size, num_items_in_batch="step"
        )
        if self._trainer is not None:
            self.log("train/jsd", loss.detach(), prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        loss = self.causal_lm_distillation_loss(self.student, ids, mask, labels, self.chunk_size)
        count = int(count_label_tokens(labels)) if labels is not None else ids.numel()
        self.log("val/jsd", loss, sync_dist=True, batch_size=max(count, 1), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _adamw(self, self.hparams["lr"], self.hparams["weight_decay"])


class OfflineDistillationModule(pl.LightningModule):
    r"""Distil into ``student`` from stored teacher top-k log-probabilities; no teacher is loaded.

    Batches are those of :class:`~lightning_losses.data.teacher_logits.TeacherLogitsDataset`: ``input_ids``,
    ``attention_mask``, ``labels``, ``teacher_log_probs``, ``teacher_indices``. The loss is
    :class:`~lightning_losses.losses.sparse_distillation.SparseGeneralizedJSDLoss` (at ``"kd"``) on next-token
    positions (student logits and stored positions ``[:, :-1]``, labels ``[:, 1:]``), plus ``ce_weight`` times the
    student's own next-token cross-entropy, normalised by the token count of the optimizer step across ranks.

    .. math::

        \mathcal{L} = w_{ce}\,\mathrm{CE} + w\,\frac{1}{|\mathcal{M}|}\sum_{\mathcal{M}}
        \mathrm{JSD}_\beta(\tilde p^t, \tilde p^s)

    Args:
        student: A causal LM.
        beta: 0 forward KL, 1 reverse KL, in between the generalized JSD.
        temperature: Must equal the temperature the cache was computed at (``cache.temperature``).
        ce_weight: Weight of the cross-entropy on the labels (0 disables it).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from lightning_losses.functional.sparse_distillation import topk_teacher_log_probs
        >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30, n_positions=16)
        >>> module = OfflineDistillationModule(GPT2LMHeadModel(cfg), beta=0.0)
        >>> ids = torch.randint(0, 30, (2, 6))
        >>> top = topk_teacher_log_probs(torch.randn(2, 6, 30), k=5)
        >>> batch = {"input_ids": ids, "labels": ids}
        >>> batch.update(teacher_log_probs=top.log_probs, teacher_indices=top.indices)
        >>> bool(module.training_step(batch, 0).detach() >= 0)
        True
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        beta: float = 0.0,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        reduction: Literal["mean"] = "mean",
    ) -> None:
        super().__init__()
        check_choice("reduction", reduction, ("mean",))
        check_number("ce_weight", ce_weight, low=0.0)
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        self.save_hyperparameters(ignore=["student"])
        self.student = student
        self.kd = SparseGeneralizedJSDLoss(beta=beta, temperature=temperature)
        self.ce_weight = ce_weight

    def compute_loss(self, batch: dict[str, Any], num_items_in_batch: Tensor | float | None = None) -> Tensor:
        """The training loss of one batch (see the class docstring)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels", ids)
        logits = self.student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        teacher = TopKLogProbs(batch["teacher_log_probs"][:, :-1], batch["teacher_indices"][:, :-1])
        shifted = labels[:, 1:]
        loss = self.kd(logits, teacher, shifted, num_items_in_batch=num_items_in_batch)
        if self.ce_weight > 0:
            ce = nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=self.kd.ignore_index, reduction="sum"
            )
            count = count_label_tokens(shifted, self.kd.ignore_index, shift=False).clamp(min=1)
            loss = loss + self.ce_weight * ce / (count if num_items_in_batch is None else num_items_in_batch)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = batch.get("labels", batch["input_ids"])
        num_items = step_num_items(self, count_label_tokens(labels, self.kd.ignore_index), batch)
        loss = self.compute_loss(batch, num_items)
        if self._trainer is not None:
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0], prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _adamw(self, self.hparams["lr"], self.hparams["weight_decay"])

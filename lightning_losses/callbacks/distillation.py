"""``TeacherClassMeans``: the teacher's per-class mean embedding that the ND loss aligns students to."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_losses.mixins.distillation import DistillationMixin
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.distributed import all_reduce, shard_dataloader

__all__ = ["TeacherClassMeans"]


class TeacherClassMeans(Callback):
    r"""Computes the teacher's class-mean embeddings once, before the first training epoch.

    .. math::
        c_k = \frac{1}{|\{i : y_i = k\}|} \sum_{i : y_i = k} f_t(x_i)

    where :math:`f_t` is the output of the teacher submodule ``feature_layer`` (the pooled penultimate embedding).
    Each process sums the embeddings and counts of its own, disjoint share of the training set (no padding, no
    duplicates), the sums and counts are all-reduced, and the means are stored in the module's checkpointed buffer
    ``teacher_class_means``. A run resumed from a checkpoint finds the buffer filled and does not recompute it.

    Args:
        feature_layer: Dotted name of the teacher submodule whose output is the embedding; defaults to the first
            name of ``teacher_features`` given to ``configure_distillation``.
        dataloader: Data to average over; defaults to the Trainer's training dataloader (its data set, read in
            order). Batches are ``(x, y)``, ``(x, y, index)`` or dicts with ``input``/``target``.

    Example:
        >>> callback = TeacherClassMeans(feature_layer="backbone")
        >>> callback.state_dict()
        {'num_samples': 0}
    """

    def __init__(self, feature_layer: str | None = None, dataloader: DataLoader | None = None) -> None:
        super().__init__()
        self.feature_layer = feature_layer
        self.dataloader = dataloader
        self.num_samples = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DistillationMixin):
            raise TypeError(
                f"TeacherClassMeans needs a module with DistillationMixin, got {type(pl_module).__name__}. "
                "Add the mixin and call `configure_distillation(teacher, teacher_features=[...])`."
            )
        layer = self._layer(pl_module)
        if layer not in pl_module._distillation_state().teacher_feature_names:
            raise ValueError(
                f"The teacher feature {layer!r} is not captured: pass `teacher_features=[{layer!r}]` to "
                "`configure_distillation`."
            )

    def _layer(self, pl_module: DistillationMixin) -> str:
        if self.feature_layer is not None:
            return self.feature_layer
        names = pl_module._distillation_state().teacher_feature_names
        if not names:
            raise ValueError(
                "TeacherClassMeans has no feature layer: pass `feature_layer=` or `teacher_features=[...]` to "
                "`configure_distillation`."
            )
        return names[0]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, DistillationMixin)
        if pl_module.teacher_class_means.numel() > 0:  # restored from a checkpoint
            return
        means, count = self.compute(trainer, pl_module)
        pl_module.set_teacher_class_means(means)
        self.num_samples = count

    def _shard(self, trainer: pl.Trainer) -> DataLoader:
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(
                "TeacherClassMeans needs a torch DataLoader; pass `dataloader=` when the training data is a "
                f"{type(loader).__name__}."
            )
        return shard_dataloader(loader, trainer.global_rank, trainer.world_size)

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module: DistillationMixin) -> tuple[Tensor, int]:
        """Return the all-reduced class means ``(C, D)`` and the number of samples they average."""
        layer = self._layer(pl_module)
        sums: Tensor | None = None
        counts: Tensor | None = None
        for batch in self._shard(trainer):
            batch = trainer.strategy.batch_to_device(batch)
            x, y, _ = unpack_batch(batch)
            if y is None:
                raise ValueError("TeacherClassMeans needs class targets in the batches.")
            logits = pl_module.teacher_forward(x)
            feats = pl_module.teacher_features(layer).flatten(1).double()
            if sums is None or counts is None:
                sums = feats.new_zeros(logits.shape[-1], feats.shape[1])
                counts = feats.new_zeros(logits.shape[-1])
            sums.index_add_(0, y, feats)
            counts += torch.bincount(y, minlength=counts.numel()).to(counts)
        if sums is None or counts is None:
            raise ValueError("The training data is empty: cannot compute teacher class means.")
        sums = all_reduce(sums, trainer=trainer)
        counts = all_reduce(counts, trainer=trainer)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"Classes {missing} have no training sample: their teacher class means are undefined.")
        return (sums / counts[:, None]).float(), int(counts.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_samples = int(state_dict["num_samples"])

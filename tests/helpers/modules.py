"""A user's own loss with a named hyperparameter and a tiny data module, for the schedule, registry, STN and PBT
tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.losses.base import LossModule


class Smoothing(LossModule):
    """Label smoothing of ``amount``, registered as the hyperparameter ``amount`` in ``[0, 1]``."""

    amount: Tensor

    def __init__(self, amount: float = 0.1) -> None:
        super().__init__()
        self.register_hyperparameter("amount", amount, low=0.0, high=1.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = logits.log_softmax(-1)
        nll = -logp.gather(1, target[:, None])[:, 0]
        return ((1 - self.amount) * nll + self.amount * -logp.mean(-1)).mean()


class TinyData(pl.LightningDataModule):
    """48 four-feature points in 3 classes: one batch of 48 for validation, three of 16 for training."""

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 4, generator=g)
        self.ds = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=48)

"""2-process CPU DDP (gloo) runs of the distillation family equal the single-process run on the same global batch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_losses import DistillationModule
from tests.helpers.tolerances import tolerance
from tests.helpers.trainer import cpu_trainer
from tests.modules.test_distillation import TinyNet, make_data


def _module(teacher: torch.nn.Module) -> DistillationModule:
    torch.manual_seed(0)
    # no BatchNorm or dropout in the student: per-rank batch statistics would differ from the global batch
    return DistillationModule(
        TinyNet(width=8, bn=False, dropout=0.0),
        teacher,
        method="nd",
        num_classes=3,
        warmup_epochs=1,
        scheduler="none",
        lr=0.1,
    )


class OrderedShards(pl.LightningDataModule):
    """Rank r reads samples r, r + W, r + 2W, ... in order, so the W local batches of a step are exactly the
    single-process batch (Lightning's own distributed sampler would shuffle)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.data = make_data(64)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        sampler = DistributedSampler(self.data, num_replicas=t.world_size, rank=t.global_rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def _fit(module: DistillationModule, devices: int, batch_size: int) -> None:
    cpu_trainer(
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=2,
        use_distributed_sampler=False,
    ).fit(module, datamodule=OrderedShards(batch_size))


@pytest.mark.ddp
def test_ddp_distillation_equals_single_process():
    torch.manual_seed(1)
    teacher = TinyNet(width=8)  # BatchNorm and dropout in the teacher are harmless: it runs in eval mode
    single, distributed = _module(teacher), _module(teacher)
    _fit(single, devices=1, batch_size=16)
    _fit(distributed, devices=2, batch_size=8)  # 2 ranks × 8 = the same global batch of 16
    torch.testing.assert_close(distributed.teacher_class_means, single.teacher_class_means)
    for (name, a), b in zip(distributed.named_parameters(), single.parameters()):
        torch.testing.assert_close(a, b, **tolerance(torch.float32), msg=name)

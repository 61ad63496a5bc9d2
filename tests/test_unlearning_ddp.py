"""A real 2-process Lightning DDP unlearning run (NPO with a retain term through LoRA) equals one process on the
concatenated per-rank batches."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from lightning_losses import UnlearningModule
from lightning_losses.data.unlearning import UnlearningBatchCollator
from tests.callbacks.test_unlearning_evaluation import lightning_ddp_env
from tests.helpers.distributed import run_distributed
from tests.modules.test_unlearning import items, tiny_lora

N, PER_RANK, WORLD, STEPS, LR = 8, 2, 2, 2, 0.5


class SGDUnlearning(UnlearningModule):
    """NPO-RT with plain SGD (so the update is the averaged gradient itself), optionally scaling the loss."""

    loss_scale = 1.0

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * self.loss_scale

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def shard(rank: int) -> DistributedSampler:
    """Rank ``rank``'s shuffled shard (the same sampler on every rank, seeded: the ranks' shards are disjoint)."""
    return DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=True, seed=3)


def combined(batch_size: int, order: list[int] | None = None, rank: int | None = None) -> CombinedLoader:
    """Forget and retain loaders: over ``order`` in one process, or over rank ``rank``'s shard."""
    forget, retain = items(N, 0, 1), items(N, 100, 2)
    if order is not None:
        forget, retain = Subset(forget, order), Subset(retain, order)
    loaders = {
        name: DataLoader(
            data, batch_size, sampler=None if rank is None else shard(rank), collate_fn=UnlearningBatchCollator(2)
        )
        for name, data in (("forget", forget), ("retain", retain))
    }
    return CombinedLoader(loaders, mode="min_size")


def fit(loader: CombinedLoader, loss_scale: float = 1.0, **trainer_kwargs) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = SGDUnlearning(tiny_lora(), method="npo_rt")
    module.loss_scale = loss_scale
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == STEPS and trainer.world_size == trainer_kwargs.get("devices", 1)
    adapter = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}
    return {**adapter, "reference": module.unlearning_reference_logps.clone()}


def _ddp_unlearning(rank: int, world_size: int):
    lightning_ddp_env(rank, world_size)
    # each rank reads its own shuffled shard (our sampler, so that the single-process order is known)
    ddp = dict(strategy="ddp", devices=world_size, use_distributed_sampler=False)
    normal = fit(combined(PER_RANK, rank=rank), **ddp)
    # the same run with rank 1's loss tripled: its gradient weighs more in the average, so the result must differ
    skewed = fit(combined(PER_RANK, rank=rank), loss_scale=3.0 if rank == 1 else 1.0, **ddp)
    return normal, skewed


@pytest.mark.ddp
def test_two_process_lightning_unlearning_equals_single_process_on_the_concatenated_batches():
    # one process, each step's batch = the two ranks' batches of that step side by side
    shards = [list(shard(r)) for r in range(WORLD)]
    order = [
        i for step in range(N // (WORLD * PER_RANK)) for s in shards for i in s[step * PER_RANK : (step + 1) * PER_RANK]
    ]
    assert sorted(order) == list(range(N)) and order != list(range(N))
    single = fit(combined(WORLD * PER_RANK, order))
    lora_b = [n for n in single if "lora_B" in n]
    assert lora_b and all(single[n].abs().max() > 1e-4 for n in lora_b)  # the adapter moved
    results = run_distributed(_ddp_unlearning, world_size=WORLD)
    for normal, skewed in results:
        torch.testing.assert_close(normal["reference"], single["reference"], rtol=1e-5, atol=1e-5)
        for name, value in single.items():
            torch.testing.assert_close(normal[name], value, rtol=1e-4, atol=1e-6, msg=name)
        assert max(float((skewed[n] - single[n]).abs().max()) for n in lora_b) > 1e-3
    # the ranks hold one model (DDP kept them in sync)
    for name in single:
        torch.testing.assert_close(results[0][0][name], results[1][0][name], rtol=0, atol=0)

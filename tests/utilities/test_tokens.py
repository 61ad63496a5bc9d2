"""Token means over a whole optimizer step: accumulated micro-batches and unequal per-rank token counts give the
gradient of one batch holding all of them (TempNetModule's DRO loss, UnlearningModule's retain term)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses import TempNetModule
from lightning_losses.utilities.tokens import NUM_ITEMS_KEY, TokensPerStep, count_label_tokens, step_num_items
from tests.helpers.trainer import cpu_trainer

V, L = 11, 6


class TinyLM(nn.Module):
    """Position-wise logits, so padding one sequence never changes another's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


class GradRecorder(TempNetModule):
    """Keeps (or, on rank 0 of a spawned run, saves) the accumulated gradients of the first optimizer step."""

    def __init__(self, save_to: str | None = None) -> None:
        super().__init__(TinyLM(), num_classes=V, task="causal_lm", rho=1.0, hidden_dim=8, dropout=0.0)
        self.save_to = save_to
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
            if self.save_to is not None and self.global_rank == 0:
                torch.save(self.grads, self.save_to)


def _batch(seed: int, batch: int, keep: int) -> dict[str, torch.Tensor]:
    """Random ids; only the first ``keep`` labels of each row count."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, L), generator=g)
    labels = ids.clone()
    labels[:, keep:] = -100
    return {"input_ids": ids, "labels": labels}


def _concat(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


MANY, FEW = _batch(1, 3, keep=L), _batch(2, 1, keep=2)  # 15 and 1 next-token labels


def _trainer(**kwargs) -> pl.Trainer:
    return cpu_trainer(**{"max_steps": 1, **kwargs})


def _grads_of_one_batch() -> dict[str, torch.Tensor]:
    module = GradRecorder()
    _trainer().fit(module, DataLoader([_concat(MANY, FEW)], batch_size=None))
    return module.grads


def test_accumulated_micro_batches_equal_one_batch_of_both():
    single = _grads_of_one_batch()
    module = GradRecorder()
    loader = TokensPerStep(DataLoader([MANY, FEW], batch_size=None), accumulate_grad_batches=2)
    _trainer(accumulate_grad_batches=2).fit(module, loader)
    assert set(module.grads) == set(single)
    for name, grad in single.items():
        torch.testing.assert_close(module.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_without_step_counts_warns_and_differs():
    single = _grads_of_one_batch()
    module = GradRecorder()
    with pytest.warns(UserWarning, match="normalised per micro-batch"):
        _trainer(accumulate_grad_batches=2).fit(module, DataLoader([MANY, FEW], batch_size=None))
    assert not torch.allclose(module.grads["model.head.weight"], single["model.head.weight"], rtol=1e-3)


class PerRankBatches(pl.LightningDataModule):
    """Rank 0 trains on MANY (15 counted labels), rank 1 on FEW (1): the token counts differ 15 to 1."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader([MANY if self.trainer.global_rank == 0 else FEW], batch_size=None)


@pytest.mark.ddp
def test_two_ranks_with_unequal_token_counts_equal_one_process(tmp_path):
    single = _grads_of_one_batch()
    path = os.path.join(tmp_path, "grads.pt")
    trainer = _trainer(devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    trainer.fit(GradRecorder(save_to=path), datamodule=PerRankBatches())
    distributed = torch.load(path)
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------- the helpers
def test_tokens_per_step_counts_each_window_and_the_short_last_one():
    batches = [_batch(i, 1, keep=k) for i, k in enumerate([6, 3, 2, 4, 1])]  # 5, 2, 1, 3, 0 counted labels
    loader = TokensPerStep(DataLoader(batches, batch_size=None), accumulate_grad_batches=2)
    counts = [int(batch[NUM_ITEMS_KEY]) for batch, _, _ in iter(loader)]
    assert counts == [7, 7, 4, 4, 0]


def test_tokens_per_step_reads_a_named_part_of_combined_batches():
    parts = {"forget": DataLoader([_batch(0, 1, keep=6)], batch_size=None)}
    parts["retain"] = DataLoader([_batch(1, 2, keep=3)], batch_size=None)
    (batch, _, _), *_ = list(iter(TokensPerStep(parts, key="retain")))
    assert int(batch[NUM_ITEMS_KEY]) == 4 == int(count_label_tokens(batch["retain"]["labels"]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"accumulate_grad_batches": 0}, ValueError, "must be >= 1, got 0"),
        ({"accumulate_grad_batches": 2.0}, TypeError, "must be an int"),
    ],
)
def test_tokens_per_step_refuses_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        TokensPerStep(DataLoader([MANY], batch_size=None), **kwargs)


def test_tokens_per_step_explains_what_it_cannot_count():
    with pytest.raises(ValueError, match=r"has none\. Pass `count=`"):
        list(iter(TokensPerStep(DataLoader([{"input_ids": MANY["input_ids"]}], batch_size=None))))
    tuples = DataLoader([(MANY["input_ids"], MANY["labels"])], batch_size=None)
    with pytest.raises(TypeError, match="writes the token count into dict batches"):
        list(iter(TokensPerStep(tuples, count=lambda batch: 1)))


def test_step_num_items_is_none_outside_training():
    assert step_num_items(pl.LightningModule(), 5) is None

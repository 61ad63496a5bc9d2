"""``ClassificationModule``: any classification loss, the sample index for losses that take it, clear config errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import ALDRKLLoss, ClassificationModule, FocalLoss, LabelSmoothingLoss, LDRKLLoss, MDCALoss

X = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2] * 4)
INDEX = torch.arange(100, 112)


def test_default_loss_is_the_cross_entropy():
    module = ClassificationModule(nn.Linear(4, 3), num_classes=3)
    loss = module.training_step((X, Y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(module.model(X), Y))


@pytest.mark.parametrize("loss", [FocalLoss(2.0), LabelSmoothingLoss(0.2), MDCALoss(), LDRKLLoss()])
def test_library_losses_are_called_on_logits_and_targets(loss):
    module = ClassificationModule(nn.Linear(4, 3), loss=loss, num_classes=3)
    torch.testing.assert_close(module.training_step((X, Y, INDEX), 0), loss(module.model(X), Y))


def test_a_user_function_and_a_loss_taking_index_get_what_they_declare():
    seen: dict[str, Tensor] = {}

    def plain(logits: Tensor, target: Tensor) -> Tensor:
        seen["target"] = target
        return logits.sum()

    def indexed(logits: Tensor, target: Tensor, index: Tensor) -> Tensor:
        seen["index"] = index
        return logits.sum()

    ClassificationModule(nn.Linear(4, 3), loss=plain, num_classes=3).training_step((X, Y, INDEX), 0)
    assert torch.equal(seen["target"], Y) and "index" not in seen
    ClassificationModule(nn.Linear(4, 3), loss=indexed, num_classes=3).training_step((X, Y, INDEX), 0)
    assert torch.equal(seen["index"], INDEX)


def test_aldr_kl_updates_lambda_of_the_batch_samples_only():
    loss = ALDRKLLoss(num_samples=120)
    module = ClassificationModule(nn.Linear(4, 3), loss=loss, num_classes=3)
    module.training_step((X * 30, Y, INDEX), 0)
    moved = set(torch.nonzero(loss.lambdas != 10.0).flatten().tolist())  # λ0 = 10 until a sample is seen
    assert moved and moved <= set(INDEX.tolist())
    assert module.named_hyperparameters()  # the loss's settings are named hyperparameters of the module


def test_loss_hyperparameters_are_named_under_loss():
    module = ClassificationModule(nn.Linear(4, 3), loss=FocalLoss(gamma=3.0), num_classes=3)
    module.set_hyperparameter("loss.gamma", 1.5)
    assert float(module.loss.gamma) == 1.5 and "loss.gamma" in module.named_hyperparameters()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "lion"}, ValueError, r"`optimizer` must be one of 'sgd', 'adam', 'adamw'; got 'lion'"),
        ({"scheduler": "step"}, ValueError, r"`scheduler` must be one of 'none', 'cosine'"),
        ({"lr": 0.0}, ValueError, r"`lr` must lie in \(0, inf\)"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must lie in \[0, 1\)"),
        ({"weight_decay": -1.0}, ValueError, r"`weight_decay` must lie in \[0, inf\)"),
        ({"num_classes": 1}, ValueError, r"`num_classes` must lie in \[2, inf\)"),
        ({"num_classes": 2.5}, TypeError, r"`num_classes` must be an int"),
        ({"loss": 3}, TypeError, r"`loss` must be a loss module or function taking \(logits, target\)"),
    ],
)
def test_bad_configuration_is_refused_with_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClassificationModule(nn.Linear(4, 3), **{"num_classes": 3, **kwargs})


def test_bad_batches_are_refused_with_the_fix():
    module = ClassificationModule(nn.Linear(4, 3), num_classes=10)
    with pytest.raises(ValueError, match=r"logits of shape \(N, 10\).*got \(12, 3\)"):
        module.training_step((X, Y), 0)
    aldr = ClassificationModule(nn.Linear(4, 3), loss=ALDRKLLoss(20), num_classes=3)
    with pytest.raises(ValueError, match=r"takes the samples' dataset indices: give batches \(x, y, index\)"):
        aldr.training_step((X, Y), 0)
    with pytest.raises(ValueError, match="needs class targets"):
        aldr.training_step({"input": X}, 0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_trains_and_logs_loss_and_accuracy_per_stage(optimizer, tmp_path):
    loader = DataLoader(TensorDataset(X, Y, INDEX - 100), batch_size=4)
    module = ClassificationModule(nn.Linear(4, 3), loss=ALDRKLLoss(12), num_classes=3, optimizer=optimizer)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    (metrics,) = trainer.test(module, loader, verbose=False)
    with torch.no_grad():
        logits = module.model(X)
    # the logged test metrics against the plain computation on the same data
    assert metrics["test/acc"] == pytest.approx(float((logits.argmax(1) == Y).float().mean()))
    assert metrics["test/loss"] == pytest.approx(float(F.cross_entropy(logits, Y)), rel=1e-5)
    assert type(trainer.optimizers[0]).__name__.lower() == optimizer

"""Ready modules and mixins refuse invalid configuration at construction, naming the argument and the range."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_losses import DistillationModule, TempNetModule

CASES = [
    (DistillationModule, {"optimizer": "lion"}, ValueError, r"`optimizer` must be one of 'sgd', 'adamw'; got 'lion'"),
    (DistillationModule, {"scheduler": "step"}, ValueError, r"`scheduler` must be one of 'none', 'cosine'"),
    (DistillationModule, {"lr": -1.0}, ValueError, r"`lr` must lie in \(0, inf\)"),
    (DistillationModule, {"lr": float("nan")}, ValueError, r"`lr` must be finite"),
    (DistillationModule, {"momentum": 1.5}, ValueError, r"`momentum` must lie in \[0, 1\)"),
    (DistillationModule, {"weight_decay": -0.1}, ValueError, r"`weight_decay` must lie in \[0, inf\)"),
    (DistillationModule, {"warmup_epochs": 2.5}, TypeError, r"`warmup_epochs` must be an int"),
    (TempNetModule, {"lr": -1.0}, ValueError, r"`lr` must lie in \(0, inf\)"),
    (TempNetModule, {"tempnet_lr": 0.0}, ValueError, r"`tempnet_lr` must lie in \(0, inf\)"),
    (TempNetModule, {"weight_decay": -1.0}, ValueError, r"`weight_decay` must lie in \[0, inf\)"),
    (TempNetModule, {"tau_min": 2.0, "tau_max": 1.0}, ValueError, r"needs 0 < tau_min < tau_max < inf"),
    (TempNetModule, {"dropout": 1.0}, ValueError, r"`dropout` must lie in \[0, 1\)"),
    (TempNetModule, {"hidden_dim": 0}, ValueError, r"`hidden_dim` must lie in \[1, inf\)"),
    (TempNetModule, {"lr": "0.1"}, TypeError, r"`lr` must be a real number"),
]


def _build(cls, overrides):
    if cls is DistillationModule:
        return cls(nn.Linear(4, 3), nn.Linear(4, 3), num_classes=3, **overrides)
    return cls(nn.Linear(4, 10), num_classes=10, **overrides)


@pytest.mark.parametrize(
    ("cls", "overrides", "error", "message"), CASES, ids=[f"{c.__name__}-{o}" for c, o, _, _ in CASES]
)
def test_invalid_configuration_is_refused(cls, overrides, error, message):
    with pytest.raises(error, match=message):
        _build(cls, overrides)


def test_unlearning_module_refuses_a_non_positive_lr():
    pytest.importorskip("peft")
    from lightning_losses import UnlearningModule
    from lightning_losses.demos import build_gpt2
    from lightning_losses.integrations.peft import lora_model

    model = lora_model(build_gpt2(32, n_layer=1, n_embd=16, n_head=2, block_size=8), r=2)
    with pytest.raises(ValueError, match=r"`lr` must lie in \(0, inf\)"):
        UnlearningModule(model, lr=0.0)


def test_valid_configuration_still_builds():
    assert isinstance(_build(DistillationModule, {"optimizer": "adamw", "scheduler": "none"}), DistillationModule)
    assert torch.isfinite(_build(TempNetModule, {}).get_hyperparameter("tempnet_dro.rho")).all()

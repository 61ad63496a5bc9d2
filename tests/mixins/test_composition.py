"""Families compose: distillation, adaptive temperature and a calibration loss on one LightningModule, trained,
checkpointed and restored, with a user subclass of a library loss injected."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import CalibrationLossMixin, DistillationMixin, FocalLoss, KDLoss, TempNetMixin


class SharperFocal(FocalLoss):
    """A user's subclass of a library loss: focal loss on logits scaled by two."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(2.0 * logits, target)


class Everything(DistillationMixin, TempNetMixin, CalibrationLossMixin, pl.LightningModule):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        self.configure_distillation(teacher, loss=KDLoss(temperature=2.0, weight=0.5))
        self.configure_tempnet(4, rho=0.5, hidden_dim=8, dropout=0.0, tempnet_lr=1e-2)
        self.configure_calibration_loss(SharperFocal(gamma=2.0), name="focal")
        self.steps: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.student(x)
        terms = {
            "dro": self.tempnet_loss(logits, y),
            "kd": self.distillation_loss(logits, self.teacher_forward(x), y),
            "focal": self.calibration_loss(logits, y),
        }
        self.steps.append({k: float(v.detach()) for k, v in terms.items()})
        return sum(terms.values())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.tempnet_parameter_groups(lr=1e-2))


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 4, (48,), generator=g)), 16)


def test_three_families_train_together_and_restore(tmp_path):
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    module = Everything(teacher)
    names = set(module.named_hyperparameters())
    assert {"kd.temperature", "kd.weight", "tempnet_dro.rho", "focal.gamma"} <= names
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, _data())
    assert len(module.steps) == 6 and all(all(torch.isfinite(torch.tensor(list(s.values())))) for s in module.steps)
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("student.") for n in moved) and any(n.startswith("tempnet.") for n in moved)
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher stayed frozen, out of the optimizer

    x, y = next(iter(_data()))
    logits = module.student(x)
    expected = FocalLoss(gamma=2.0)(2.0 * logits, y)
    torch.testing.assert_close(module.calibration_loss(logits, y), expected)  # the subclass's forward is the one called

    module.set_hyperparameter("kd.temperature", torch.full((16,), 3.0))  # per-sample, then checkpointed
    path = tmp_path / "all.ckpt"
    trainer.save_checkpoint(path)
    restored = Everything(teacher)
    restored.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    for name, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, rtol=0, atol=0, msg=name)

"""Train-time calibration losses: value and gradient against plain loops, limits, hyperparameters, mixin."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_losses.functional.calibration import (
    adaptive_focal_loss,
    dca_loss,
    focal_loss,
    label_smoothing_loss,
    mdca_loss,
    mmce_loss,
)
from lightning_losses.losses.calibration import (
    AdaptiveFocalLoss,
    DCALoss,
    FocalLoss,
    LabelSmoothingLoss,
    MDCALoss,
    MMCELoss,
)
from lightning_losses.mixins.calibration import CalibrationLossMixin

# ----------------------------------------------------------------------------- naive references (loops)


def _softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _ref_focal(logits: torch.Tensor, target: torch.Tensor, gammas: list[float]) -> torch.Tensor:
    terms = []
    for i in range(logits.shape[0]):
        p = logits[i].double().softmax(0)[target[i]]
        terms.append(-((1 - p) ** gammas[i]) * torch.log(p))
    return torch.stack(terms).mean()


def _ref_mmce(logits: torch.Tensor, target: torch.Tensor, h: float) -> torch.Tensor:
    p = logits.double().softmax(1)
    n = p.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            ri, rj = p[i].max(), p[j].max()
            ci = float(p[i].argmax() == target[i])
            cj = float(p[j].argmax() == target[j])
            total = total + (ci - ri) * (cj - rj) * torch.exp(-(ri - rj).abs() / h)
    return (total / n**2).sqrt()


def _ref_mdca(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(1)
    n, c = p.shape
    out = torch.zeros((), dtype=torch.float64)
    for k in range(c):
        out = out + (sum(p[i, k] for i in range(n)) / n - sum(float(target[i] == k) for i in range(n)) / n).abs()
    return out / c


def _ref_dca(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(1)
    acc = sum(float(p[i].argmax() == target[i]) for i in range(p.shape[0])) / p.shape[0]
    conf = sum(p[i].max() for i in range(p.shape[0])) / p.shape[0]
    return (acc - conf).abs()


def _ref_smoothing(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    logp = logits.double().log_softmax(1)
    c = logits.shape[1]
    terms = [-(1 - eps) * logp[i, target[i]] - eps / c * logp[i].sum() for i in range(logits.shape[0])]
    return torch.stack(terms).mean()


def _data(n: int = 12, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, c, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def _value_and_grad(fn, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = logits.clone().requires_grad_(True)
    value = fn(x, target)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


CASES = [
    ("focal", lambda x, y: focal_loss(x, y, 2.0), lambda x, y: _ref_focal(x, y, [2.0] * x.shape[0])),
    ("focal0", lambda x, y: focal_loss(x, y, 0.0), lambda x, y: _ref_focal(x, y, [0.0] * x.shape[0])),
    ("smoothing", lambda x, y: label_smoothing_loss(x, y, 0.15), lambda x, y: _ref_smoothing(x, y, 0.15)),
    ("mmce", lambda x, y: mmce_loss(x, y, 0.4), lambda x, y: _ref_mmce(x, y, 0.4)),
    ("mdca", mdca_loss, _ref_mdca),
    ("dca", dca_loss, _ref_dca),
]


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=[c[0] for c in CASES])
def test_value_and_gradient_match_reference(name: str, fn, ref) -> None:  # type: ignore[no-untyped-def]
    logits, target = _data()
    value, grad = _value_and_grad(fn, logits, target)
    ref_value, ref_grad = _value_and_grad(ref, logits, target)
    torch.testing.assert_close(value, ref_value, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=1e-8)


def test_adaptive_focal_value_and_gradient() -> None:
    logits, target = _data(16, 3)
    p = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
    gammas = [5.0 if float(pi) < 0.2 else 3.0 for pi in p]
    assert 0 < sum(g == 5.0 for g in gammas) < 16  # both branches are exercised
    value, grad = _value_and_grad(adaptive_focal_loss, logits, target)
    ref_value, ref_grad = _value_and_grad(lambda x, y: _ref_focal(x, y, gammas), logits, target)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)


def test_closed_forms_and_limits() -> None:
    logits, target = _data(10, 5)
    ce = F.cross_entropy(logits, target)
    # gamma = 0 is cross-entropy; smoothing = 0 is cross-entropy; smoothing = 1 is CE against the uniform target
    torch.testing.assert_close(focal_loss(logits, target, 0.0), ce)
    torch.testing.assert_close(label_smoothing_loss(logits, target, 0.0), ce)
    torch.testing.assert_close(label_smoothing_loss(logits, target, 1.0), -logits.log_softmax(1).mean())
    # focal loss is below CE for gamma > 0 and decreases with gamma
    values = [float(focal_loss(logits, target, g)) for g in (0.0, 1.0, 3.0)]
    assert values[0] > values[1] > values[2] > 0
    # per-sample gamma equals the average of per-sample losses
    gammas = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5] * 2, dtype=torch.float64)
    per = torch.stack([focal_loss(logits[i : i + 1], target[i : i + 1], float(gammas[i])) for i in range(10)])
    torch.testing.assert_close(focal_loss(logits, target, gammas), per.mean())
    # MDCA is zero when the mean prediction equals the class frequencies; DCA zero when confidence = accuracy
    assert float(mdca_loss(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))) == 0.0
    assert float(dca_loss(torch.tensor([[30.0, 0.0], [0.0, 30.0]]), torch.tensor([0, 1]))) < 1e-6
    # MMCE vanishes for confident, correct predictions
    assert float(mmce_loss(torch.tensor([[30.0, 0.0], [0.0, 30.0]]), torch.tensor([0, 1]))) < 1e-5
    # focal loss at p_y = 1 is exactly zero with a finite gradient, for gamma 0 and > 0
    sure = torch.tensor([[50.0, -50.0]], requires_grad=True)
    for g in (0.0, 2.0):
        v = focal_loss(sure, torch.tensor([0]), g)
        (grad,) = torch.autograd.grad(v, sure)
        assert float(v) == pytest.approx(0.0, abs=1e-12) and bool(torch.isfinite(grad).all())


def test_float32_under_autocast() -> None:
    logits, target = _data(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = focal_loss(logits.bfloat16(), target, 2.0)
        smooth = label_smoothing_loss(logits.bfloat16(), target, 0.1)
    assert out.dtype == torch.float32 and smooth.dtype == torch.float32
    torch.testing.assert_close(out.double(), focal_loss(logits.bfloat16().float(), target, 2.0).double())


def test_modules_register_hyperparameters_and_match_functions() -> None:
    logits, target = _data(8, 3)
    logits = logits.float()
    pairs = [
        (FocalLoss(2.0), focal_loss(logits, target, 2.0)),
        (AdaptiveFocalLoss(), adaptive_focal_loss(logits, target)),
        (LabelSmoothingLoss(0.2), label_smoothing_loss(logits, target, 0.2)),
        (MMCELoss(2.0), F.cross_entropy(logits, target) + 2.0 * mmce_loss(logits, target)),
        (MDCALoss(1.0), F.cross_entropy(logits, target) + mdca_loss(logits, target)),
        (DCALoss(5.0), F.cross_entropy(logits, target) + 5.0 * dca_loss(logits, target)),
    ]
    for module, expected in pairs:
        torch.testing.assert_close(module(logits, target), expected)
        for buffer in module.buffers():
            assert buffer.dtype == torch.float32
    # injected base: FL + MDCA
    fl_mdca = MDCALoss(1.0, base=FocalLoss(3.0))
    torch.testing.assert_close(fl_mdca(logits, target), focal_loss(logits, target, 3.0) + mdca_loss(logits, target))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        LabelSmoothingLoss(1.5)
    with pytest.raises(ValueError, match=r"`smoothing` must lie in \[0, 1\]"):
        label_smoothing_loss(logits, target, torch.full((8,), 2.0))
    with pytest.raises(ValueError, match="`gamma` must be >= 0"):
        focal_loss(logits, target, -1.0)
    with pytest.raises(ValueError, match=r"`logits` must have shape \(N, C\)"):
        focal_loss(logits[0], target[:1])
    with pytest.raises(ValueError, match="1-D integer tensor of 8 class indices"):
        mdca_loss(logits, target[:3])


class _Model(CalibrationLossMixin, pl.LightningModule):
    def __init__(self, loss: str = "label_smoothing") -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.configure_calibration_loss(loss)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return self.calibration_loss(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_mixin_hyperparameter_names_and_checkpoint() -> None:
    model = _Model()
    assert set(model.named_hyperparameters()) == {"label_smoothing.smoothing"}
    model.set_hyperparameter("label_smoothing.smoothing", 0.3)
    restored = _Model()
    restored.load_state_dict(model.state_dict())
    assert float(restored.get_hyperparameter("label_smoothing.smoothing")) == pytest.approx(0.3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(model.calibration_loss(model.net(x), y), label_smoothing_loss(model.net(x), y, 0.3))
    focal = _Model("adaptive_focal")
    assert set(focal.named_hyperparameters()) == {
        "adaptive_focal.gamma_low",
        "adaptive_focal.gamma_high",
        "adaptive_focal.threshold",
    }
    with pytest.raises(ValueError, match="Unknown calibration loss 'brier'"):
        _Model("brier")


def test_mixin_trains_with_lightning() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = _Model("mdca")
    before = float(model.calibration_loss(model.net(x), y))
    trainer = pl.Trainer(
        max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, loader)
    assert float(model.calibration_loss(model.net(x), y)) < before

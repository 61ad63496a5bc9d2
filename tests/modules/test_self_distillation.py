"""Ground-truth-weighted self-distillation: the loss, the optimal weight and the generation loop."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import SelfDistillation, SelfDistillationLoss, SelfDistillationModule
from lightning_losses.functional import (
    optimal_ground_truth_weight,
    self_distillation_loss,
    self_distillation_target,
)
from lightning_losses.mixins.distillation import DistillationMixin
from tests.helpers.loss_tester import (
    assert_module_equals_functional,
    assert_per_sample_equals_scalar_loop,
    assert_value_and_gradient,
)


# ---------------------------------------------------------------------------------------------------------- references
def ref_self_distillation(student: Tensor, teacher: Tensor, target: Tensor, xi: float, criterion: str) -> Tensor:
    """Naive per-sample loop: the mixed target written out row by row."""
    rows = []
    for i in range(student.shape[0]):
        s, t = student[i], teacher[i]
        p_s = torch.exp(s) / torch.exp(s).sum()
        p_t = torch.exp(t) / torch.exp(t).sum()
        onehot = torch.zeros_like(s)
        onehot[int(target[i])] = 1.0
        if criterion == "mse":
            rows.append(xi * ((p_s - onehot) ** 2).sum() + (1 - xi) * ((p_s - p_t) ** 2).sum())
        else:
            mixed = xi * onehot + (1 - xi) * p_t
            rows.append(-(mixed * torch.log(p_s)).sum())
    return torch.stack(rows).mean()


def official_formula(student: Tensor, teacher: Tensor, target: Tensor, alpha: float) -> Tensor:
    """``training_step`` of Kennethborup/self_distillation, self_distiller.py (without the weight penalty)."""
    onehot = F.one_hot(target, student.shape[1]).to(student.dtype)
    loss = F.mse_loss(F.softmax(student, dim=1), onehot) * alpha
    return loss + (1 - alpha) * F.mse_loss(F.softmax(student, dim=1), F.softmax(teacher, dim=1))


def _inputs(n: int = 7, c: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=g) * 2,
        torch.randn(n, c, generator=g) * 2,
        torch.randint(0, c, (n,), generator=g),
    )


# ---------------------------------------------------------------------------------------------------------- loss values
@pytest.mark.parametrize("criterion", ["mse", "ce"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xi", [0.0, 0.35, 1.0])
def test_value_and_gradient_against_naive_reference(criterion: str, dtype: torch.dtype, xi: float) -> None:
    s, t, y = _inputs()
    assert_value_and_gradient(
        lambda a, b: self_distillation_loss(a, b, y, xi=xi, criterion=criterion),  # type: ignore[arg-type]
        lambda a, b: ref_self_distillation(a, b, y, xi, criterion),
        s,
        t,
        dtype=dtype,
    )


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_matches_official_code_times_number_of_classes(alpha: float) -> None:
    s, t, y = _inputs(n=6, c=4)
    s64 = s.double().requires_grad_(True)
    ours = self_distillation_loss(s64, t.double(), y, xi=alpha)
    (grad,) = torch.autograd.grad(ours, s64)
    s_ref = s.double().requires_grad_(True)
    official = official_formula(s_ref, t.double(), y, alpha) * s.shape[1]
    (grad_ref,) = torch.autograd.grad(official, s_ref)
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(grad, grad_ref)


def test_mse_is_squared_error_to_mixed_target_plus_constant() -> None:
    """ξ‖p − e‖² + (1 − ξ)‖p − q‖² = ‖p − (ξe + (1 − ξ)q)‖² + ξ(1 − ξ)‖e − q‖²: same gradient as the mixed form."""
    s, t, y = _inputs()
    xi = 0.3
    s = s.double().requires_grad_(True)
    loss = self_distillation_loss(s, t.double(), y, xi=xi, reduction="none")
    mixed = self_distillation_target(t.double(), y, xi)
    onehot = F.one_hot(y, s.shape[1]).double()
    constant = xi * (1 - xi) * ((onehot - torch.softmax(t.double(), -1)) ** 2).sum(-1)
    direct = ((torch.softmax(s, -1) - mixed) ** 2).sum(-1)
    torch.testing.assert_close(loss, direct + constant)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), s)[0], torch.autograd.grad(direct.sum(), s)[0])


def test_limits() -> None:
    s, t, y = _inputs()
    # ξ = 1: the labels only, the teacher does not matter; with "ce" it is the cross-entropy
    torch.testing.assert_close(self_distillation_loss(s, t, y, xi=1.0, criterion="ce"), F.cross_entropy(s, y))
    torch.testing.assert_close(self_distillation_loss(s, t, y, xi=1.0), self_distillation_loss(s, -t, y, xi=1.0))
    # ξ = 0: pure self-distillation, zero when the student equals the teacher (mse), the teacher entropy (ce)
    assert float(self_distillation_loss(t, t, y, xi=0.0)) == pytest.approx(0.0, abs=1e-7)
    p = torch.softmax(t, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(self_distillation_loss(t, t, y, xi=0.0, criterion="ce"), entropy)
    # the loss is linear in ξ, and the teacher gets no gradient
    lo, hi = (self_distillation_loss(s, t, y, xi=v) for v in (0.0, 1.0))
    torch.testing.assert_close(self_distillation_loss(s, t, y, xi=0.25), 0.75 * lo + 0.25 * hi)
    teacher = t.clone().requires_grad_(True)
    self_distillation_loss(s.requires_grad_(True), teacher, y).backward()
    assert teacher.grad is None


def test_temperature_softens_the_teacher() -> None:
    s, t, y = _inputs()
    hot = self_distillation_loss(s, t, y, xi=0.0, temperature=3.0)
    torch.testing.assert_close(hot, self_distillation_loss(s, t / 3.0, y, xi=0.0))


def test_module_equals_functional_and_per_sample_xi() -> None:
    s, t, y = _inputs()
    for criterion in ("mse", "ce"):
        module = SelfDistillationLoss(xi=0.4, temperature=2.0, criterion=criterion, weight=0.5)  # type: ignore[arg-type]
        assert_module_equals_functional(
            module,
            lambda a, b, c, crit=criterion: 0.5 * self_distillation_loss(a, b, c, 0.4, 2.0, crit),  # type: ignore[misc]
            s,
            t,
            y,
        )
    xi = torch.linspace(0.0, 1.0, s.shape[0])
    assert_per_sample_equals_scalar_loop(lambda: SelfDistillationLoss(), {"xi": xi}, s, t, y)


def test_distillation_mixin_calls_it_through_the_contract() -> None:
    class Student(DistillationMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)
            self.configure_distillation(nn.Linear(4, 3), loss=SelfDistillationLoss(xi=0.2))

    model = Student()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    s, t = model.net(x), model.teacher_forward(x)
    torch.testing.assert_close(model.distillation_loss(s, t, y), self_distillation_loss(s, t, y, xi=0.2))
    assert model.get_hyperparameter("kd.xi").item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="needs the class targets"):
        model.distillation_loss(s, t)


# ---------------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs() -> None:
    s, t, y = _inputs()
    with pytest.raises(ValueError, match=r"`xi` must lie in \[0, 1\]"):
        self_distillation_loss(s, t, y, xi=1.5)
    with pytest.raises(ValueError, match=r"`xi` must lie in \[0, 1\]"):
        self_distillation_loss(s, t, y, xi=torch.full((7,), -0.1))
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        self_distillation_loss(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="must have the student's shape"):
        self_distillation_loss(s, t[:, :3], y)
    with pytest.raises(ValueError, match=r"shape \(N, C\) with C >= 2"):
        self_distillation_loss(s[:, :1], t[:, :1], y)
    with pytest.raises(ValueError, match="class indices outside"):
        self_distillation_loss(s, t, y + 5)
    with pytest.raises(ValueError, match="non-finite"):
        self_distillation_loss(s, t.index_fill(0, torch.tensor([0]), float("nan")), y)
    with pytest.raises(ValueError, match="`criterion`"):
        self_distillation_loss(s, t, y, criterion="kl")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`teacher_logits` must be a torch\.Tensor"):
        self_distillation_loss(s, t.numpy(), y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`xi` must be in \[0, 1\]"):
        SelfDistillationLoss(xi=2.0)
    with pytest.raises(ValueError, match="`xi` must be 1"):
        SelfDistillationModule(nn.Linear(4, 3), None, xi=0.5, num_classes=3)
    with pytest.raises(ValueError, match="'optimal' or a number"):
        SelfDistillation(lambda: nn.Linear(4, 3), pl.LightningDataModule(), weight="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not set 'xi'"):
        SelfDistillation(lambda: nn.Linear(4, 3), pl.LightningDataModule(), module_kwargs={"xi": 0.1})
    with pytest.raises(ValueError, match="same shape"):
        optimal_ground_truth_weight(torch.rand(4, 3), torch.rand(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"need \(N, C\) fits"):
        optimal_ground_truth_weight(torch.rand(4), torch.rand(4), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="class indices outside"):
        optimal_ground_truth_weight(torch.rand(4, 3), torch.rand(4, 3), torch.tensor([0, 1, 2, 3]))


# ---------------------------------------------------------------------------------------------------------- optimal ξ
def _krr_generation(k_ridge: Tensor, y: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """One step of the official toy example: ``Y_t = K (K + λI)^-1 (α Y + (1 - α) Y_{t-1})``."""
    return k_ridge @ (alpha * y + (1 - alpha) * previous)


def test_optimal_weight_is_the_kernel_ridge_optimum() -> None:
    """On the official toy data (11 noisy sine points, RBF kernel), the closed form beats a fine grid over α."""
    x = torch.arange(0, 1.1, 0.1, dtype=torch.float64).reshape(-1, 1)
    y = torch.tensor(  # the 11 noisy points of the official toy example (those of Mobahi et al., 2020)
        [0.3848, 1.2334, 1.3323, 0.6920, -0.2976, -0.2419, -0.7964, -0.9616, -0.4967, -0.3469, 0.5590],
        dtype=torch.float64,
    )
    kernel = torch.exp(-80.0 * (x - x.T) ** 2)
    k_ridge = kernel @ torch.linalg.inv(kernel + 0.2 * torch.eye(11, dtype=torch.float64))
    truth = torch.sin(2 * math.pi * x).squeeze(1)  # the noiseless function: the risk the weight should minimise
    previous = _krr_generation(k_ridge, y, y, 1.0)  # generation 0 fits the labels
    for _ in range(3):
        f1 = _krr_generation(k_ridge, y, previous, 1.0)
        f0 = _krr_generation(k_ridge, y, previous, 0.0)
        xi = float(optimal_ground_truth_weight(f1, f0, truth, clip=False))
        grid = torch.linspace(-3.0, 3.0, 6001, dtype=torch.float64)
        risks = torch.stack([((_krr_generation(k_ridge, y, previous, float(a)) - truth) ** 2).sum() for a in grid])
        assert -3.0 < xi < 3.0 and xi == pytest.approx(float(grid[risks.argmin()]), abs=1e-3)
        best = ((_krr_generation(k_ridge, y, previous, xi) - truth) ** 2).sum()
        assert float(best) <= float(risks.min()) + 1e-12
        previous = _krr_generation(k_ridge, y, previous, min(max(xi, 0.0), 1.0))


def test_optimal_weight_properties() -> None:
    g = torch.Generator().manual_seed(1)
    f1, f0 = torch.rand(6, 4, generator=g).softmax(-1), torch.rand(6, 4, generator=g).softmax(-1)
    # an exact mixture is recovered; class indices mean one-hot rows
    assert float(optimal_ground_truth_weight(f1, f0, 0.3 * f1 + 0.7 * f0)) == pytest.approx(0.3)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(
        optimal_ground_truth_weight(f1, f0, labels), optimal_ground_truth_weight(f1, f0, F.one_hot(labels, 4).float())
    )
    # clipped to [0, 1] unless asked; identical fits give 1 (the labels)
    assert float(optimal_ground_truth_weight(f1, f0, 2 * f1 - f0, clip=False)) == pytest.approx(2.0)
    assert float(optimal_ground_truth_weight(f1, f0, 2 * f1 - f0)) == 1.0
    assert float(optimal_ground_truth_weight(f1, f0, 2 * f0 - f1)) == 0.0
    assert float(optimal_ground_truth_weight(f1, f1, labels)) == 1.0


# ---------------------------------------------------------------------------------------------------------- the loop
class _RandomData(pl.LightningDataModule):
    """Linearly separable random data with a validation and a test split."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(6, 3, generator=g)
        self.splits = {}
        for name, n in (("train", 96), ("val", 48), ("test", 48)):
            x = torch.randn(n, 6, generator=g)
            self.splits[name] = TensorDataset(x, (x @ w).argmax(1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=48)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=48)


def _make() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


_QUICK = {"max_epochs": 3, "num_sanity_val_steps": 0, "limit_val_batches": 0}


def test_loop_teacher_is_the_previous_generation_frozen() -> None:
    loop = SelfDistillation(_make, _RandomData(), generations=3, weight=0.5, num_classes=3, trainer_kwargs=_QUICK)
    seen: list[nn.Module | None] = []
    original = loop.train_student

    def spy(teacher: nn.Module | None, xi: float) -> nn.Module:
        seen.append(teacher)
        return original(teacher, xi)

    loop.train_student = spy  # type: ignore[method-assign]
    results = loop.fit()
    assert [(r.generation, r.xi) for r in results] == [(0, 1.0), (1, 0.5), (2, 0.5)]
    assert seen == [None, loop.students[0], loop.students[1]]
    assert all(r.val_accuracy is not None and 0.0 <= r.val_accuracy <= 1.0 for r in results)
    # the teachers were copied: each student still has its own trainable weights, untouched by later generations
    assert all(p.requires_grad for s in loop.students for p in s.parameters())
    assert loop.students[0] is not loop.students[1]


def test_generation_zero_is_training_on_labels() -> None:
    """Generation 0 with the stand-in teacher equals a plain training on the squared error to the one-hot labels."""
    data = _RandomData()
    loop = SelfDistillation(_make, data, generations=1, num_classes=3, trainer_kwargs=_QUICK)
    (result,) = loop.fit()
    teacher = nn.Linear(6, 3)  # any teacher: its weight in the loss is 0
    pl.seed_everything(0, verbose=False)
    net = _make()
    module = SelfDistillationModule(net, teacher, xi=1.0, num_classes=3)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, **_QUICK).fit(module, datamodule=data)  # fmt: skip
    for a, b in zip(loop.students[0].state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert result.xi == 1.0


def test_optimal_weight_loop_uses_the_two_extreme_students() -> None:
    loop = SelfDistillation(_make, _RandomData(), generations=2, weight="optimal", num_classes=3, trainer_kwargs=_QUICK)
    calls: list[float] = []
    original = loop.train_student

    def spy(teacher: nn.Module | None, xi: float) -> nn.Module:
        calls.append(xi)
        return original(teacher, xi)

    loop.train_student = spy  # type: ignore[method-assign]
    results = loop.fit()
    xi = results[1].xi
    assert 0.0 <= xi <= 1.0
    # generation 0, the teacher-only probe, then generation 1 (unless ξ* is 0 or 1: then a probe is reused)
    assert calls[:2] == [1.0, 0.0] and (calls[2:] == [xi] or xi in (0.0, 1.0))
    # the weight is the closed form on the validation split
    val = loop.datamodule.val_dataloader()
    x, y = next(iter(val))
    with torch.no_grad():
        f1 = torch.softmax(loop.students[0](x), -1)
        probe = original(loop.students[0], 0.0)
        f0 = torch.softmax(probe(x), -1)
    assert xi == pytest.approx(float(optimal_ground_truth_weight(f1, f0, y)), abs=1e-6)
    estimate = results[1].estimate
    assert estimate is not None and min(max(estimate, 0.0), 1.0) == pytest.approx(xi)
    assert estimate == pytest.approx(float(optimal_ground_truth_weight(f1, f0, y, clip=False)), abs=1e-6)
    assert results[0].estimate is None

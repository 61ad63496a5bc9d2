"""Lightning side of the distillation family: teacher lifecycle, helpers, DistillationModule, TeacherClassMeans."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses import DistillationMixin, DistillationModule, DKDLoss, KDLoss, TeacherClassMeans
from lightning_losses.data import IndexedTensorDataset
from lightning_losses.nn import DualHeadClassifier
from tests.helpers.trainer import cpu_trainer


# ---------------------------------------------------------------------------------------------------- fixtures
class TinyNet(nn.Module):
    """``backbone`` → embedding → ``fc``; dropout/BN make train/eval mode observable."""

    def __init__(self, width: int = 8, classes: int = 3, bn: bool = True, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(6, width)]
        if bn:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.backbone = nn.Sequential(*layers)
        self.fc = nn.Linear(width, classes)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def make_data(n: int = 48, classes: int = 3, seed: int = 0) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 6, generator=g) + F.one_hot(y, 6).float() * 2
    return IndexedTensorDataset(x, y, torch.arange(n))


def loader(ds: IndexedTensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def trainer(tmp_path, max_epochs: int = 1, **kw) -> pl.Trainer:
    return cpu_trainer(tmp_path, max_epochs=max_epochs, **kw)


class UserModule(DistillationMixin, pl.LightningModule):
    """What a user writes: their own step calling the helpers."""

    def __init__(self, teacher, **distill_kwargs) -> None:
        super().__init__()
        self.student = TinyNet(bn=False, dropout=0.0)
        self.configure_distillation(teacher, **distill_kwargs)
        self.teacher_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self.student(x)
        teacher_logits = self.teacher_forward(x, index=index)
        self.teacher_modes.append(self.teacher.training)
        return F.cross_entropy(logits, y) + self.distillation_loss(logits, teacher_logits, y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self.student(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# ---------------------------------------------------------------------------------------------------- lifecycle
def test_teacher_is_frozen_hidden_and_stays_in_eval(tmp_path):
    teacher = TinyNet()
    before = copy.deepcopy(teacher.state_dict())
    model = UserModule(teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    param_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in param_ids for p in teacher.parameters()), "teacher must stay out of the optimizer"
    assert not any(k.startswith("teacher") and k != "teacher_class_means" for k in model.state_dict())
    model.train()
    assert not teacher.training
    trainer(tmp_path, max_epochs=2, limit_val_batches=2, val_check_interval=2).fit(
        model, loader(make_data()), loader(make_data(16, seed=1))
    )
    assert model.teacher_modes and not any(model.teacher_modes), "teacher ran in train mode during a step"
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BN statistics untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_teacher_forced_to_eval_even_if_someone_flips_it(tmp_path):
    teacher = TinyNet()
    model = UserModule(teacher)

    class Flip(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            teacher.train()  # runs before the module's own hook

    trainer(tmp_path, max_epochs=2, callbacks=[Flip()]).fit(model, loader(make_data()))
    assert not any(model.teacher_modes)


def test_multi_teacher_weighted_average_and_features():
    t1, t2 = TinyNet().eval(), TinyNet().eval()
    model = UserModule(
        [t1, t2], teacher_weights=[1.0, 3.0], teacher_features=["backbone"], student_features=["student.backbone"]
    )
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = 0.25 * t1(x) + 0.75 * t2(x)
        torch.testing.assert_close(model.teacher_forward(x), expected)
        torch.testing.assert_close(model.teacher_features("backbone"), t1.backbone(x))
    model.student(x)
    torch.testing.assert_close(model.student_features("student.backbone"), model.student.backbone(x))


def test_teacher_cache_serves_each_sample_once(tmp_path):
    teacher = TinyNet()
    model = UserModule(teacher, cache_teacher_outputs=True, teacher_features=["backbone"])
    data = make_data()
    trainer(tmp_path, max_epochs=3).fit(model, loader(data))
    state = model._distillation_state()
    batches = len(loader(data))
    assert state.teacher_calls == batches, "teacher ran again after the first epoch"
    assert state.cache_hits == 2 * batches
    with torch.no_grad():
        torch.testing.assert_close(state.cache["logits"][data.indices], teacher.eval()(data.images))
        torch.testing.assert_close(state.cache["backbone"][data.indices], teacher.backbone(data.images))


def test_teacher_out_of_checkpoint_unless_asked(tmp_path):
    teacher = TinyNet()
    model = UserModule(teacher)
    t = trainer(tmp_path)
    t.fit(model, loader(make_data()))
    t.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert "distillation_teachers" not in ckpt
    assert not any("fc" in k and "student" not in k for k in ckpt["state_dict"])

    model = UserModule(teacher, save_teachers=True)
    t = trainer(tmp_path)
    t.fit(model, loader(make_data()))
    t.save_checkpoint(tmp_path / "b.ckpt")
    fresh_teacher = TinyNet()
    restored = UserModule.load_from_checkpoint(tmp_path / "b.ckpt", teacher=fresh_teacher, save_teachers=True)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(restored.teacher.state_dict()[k], v)


def test_hyperparameters_are_named_and_checkpointed(tmp_path):
    model = UserModule(TinyNet(), loss=DKDLoss())
    # the loss's tensors, plus the student's dropout rate (a plain float attribute, listed on request)
    assert set(model.named_hyperparameters(include_attributes=True)) == {
        "kd.alpha",
        "kd.beta",
        "kd.temperature",
        "kd.weight",
        "student.backbone.2.p",
    }
    model.set_hyperparameter("kd.temperature", 2.5)
    t = trainer(tmp_path)
    t.fit(model, loader(make_data()))
    t.save_checkpoint(tmp_path / "h.ckpt")
    restored = UserModule.load_from_checkpoint(tmp_path / "h.ckpt", teacher=TinyNet(), loss=DKDLoss())
    assert restored.get_hyperparameter("kd.temperature").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"kd\.temperature"):
        model.set_hyperparameter("kd.temperature", -1.0)
    with pytest.raises(KeyError, match=r"Available: kd\.alpha"):
        model.get_hyperparameter("kd.temp")


def test_configuration_errors():
    teacher = TinyNet()

    class Registered(DistillationMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.teacher_net = teacher
            self.configure_distillation(teacher)

    with pytest.raises(ValueError, match="also registered as the submodule 'teacher_net'"):
        Registered()
    with pytest.raises(ValueError, match="must hold 2 non-negative numbers"):
        UserModule([TinyNet(), TinyNet()], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="not a submodule"):
        UserModule(teacher, teacher_features=["nope"])
    with pytest.raises(KeyError, match="teacher_features"):
        UserModule(teacher).teacher_features("backbone")

    class Bare(DistillationMixin, pl.LightningModule):
        pass

    with pytest.raises(RuntimeError, match="configure_distillation"):
        Bare().teacher_forward(torch.zeros(1, 6))


def test_distillation_loss_helper_dispatches_by_loss_type():
    teacher = TinyNet().eval()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    model = UserModule(teacher, loss=DKDLoss(warmup_epochs=0))
    s, t = model.student(x), model.teacher_forward(x)
    with pytest.raises(ValueError, match="DKD needs the class targets"):
        model.distillation_loss(s, t)
    torch.testing.assert_close(model.distillation_loss(s, t, y), DKDLoss(warmup_epochs=0)(s, t, y))
    model = UserModule(teacher, loss=KDLoss(temperature=3.0))
    torch.testing.assert_close(model.distillation_loss(s, t), KDLoss(temperature=3.0)(s, t))


# ---------------------------------------------------------------------------------------------------- ready module
@pytest.mark.parametrize("method", ["kd", "dkd", "dhkd", "nd", "dkd+nd"])
def test_distillation_module_trains_every_method(tmp_path, method):
    torch.manual_seed(0)
    student: nn.Module = TinyNet(width=4)
    if method == "dhkd":
        student = DualHeadClassifier(student.backbone, 4, 3)
    module = DistillationModule(
        student,
        TinyNet(width=8),
        method=method,
        num_classes=3,
        student_feature_dim=4,
        teacher_feature_dim=8,
        warmup_epochs=1 if method in ("dkd", "nd", "dkd+nd") else None,
        lr=0.05,
    )
    before = [p.detach().clone() for p in module.student.parameters()]
    t = trainer(tmp_path, max_epochs=2)
    t.fit(module, loader(make_data()), loader(make_data(16, seed=1)))
    assert torch.isfinite(torch.tensor(t.callback_metrics["train/loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    if method in ("nd", "dkd+nd"):
        assert module.teacher_class_means.shape == (3, 8)
        assert isinstance(module.projector, nn.Module) and not isinstance(module.projector, nn.Identity)


def test_module_gradient_alignment_changes_the_update(tmp_path):
    def run(align: bool):
        torch.manual_seed(0)
        student = TinyNet(width=4, bn=False, dropout=0.0)
        m = DistillationModule(
            DualHeadClassifier(student.backbone, 4, 3),
            TinyNet(),
            method="dhkd",
            num_classes=3,
            gradient_alignment=align,
            scheduler="none",
            kd_weight=5.0,
        )
        trainer(tmp_path, max_epochs=1).fit(m, loader(make_data()))
        return torch.cat([p.flatten() for p in m.student.parameters()])

    plain, aligned = run(False), run(True)
    assert torch.isfinite(aligned).all()
    assert not torch.allclose(plain, aligned)


def test_module_bad_inputs():
    with pytest.raises(TypeError, match="DualHeadClassifier"):
        DistillationModule(TinyNet(), TinyNet(), method="dhkd", num_classes=3)
    with pytest.raises(ValueError, match="Unknown method 'fitnets'"):
        DistillationModule(TinyNet(), TinyNet(), method="fitnets", num_classes=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be > 0"):
        DistillationModule(TinyNet(), TinyNet(), num_classes=3, temperature=0.0)
    module = DistillationModule(TinyNet(classes=4), TinyNet(classes=3), num_classes=3)
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="student predicts 4 classes but the teacher 3"):
        module.compute_losses(batch)
    module = DistillationModule(TinyNet(), TinyNet(), num_classes=3)
    with pytest.raises(ValueError, match="class indices outside"):
        module.compute_losses((torch.randn(4, 6), torch.tensor([0, 1, 3, 0])))
    module = DistillationModule(TinyNet(), TinyNet(), method="nd", num_classes=3)
    with pytest.raises(RuntimeError, match="teacher class means"):
        module.compute_losses(batch)
    module = DistillationModule(TinyNet(width=4), TinyNet(width=8), method="nd", num_classes=3)
    module.set_teacher_class_means(torch.randn(3, 8))
    with pytest.raises(ValueError, match="width 4 but teacher embeddings 8"):
        module.compute_losses(batch)


# ---------------------------------------------------------------------------------------------------- class means
def test_teacher_class_means_match_a_direct_computation(tmp_path):
    teacher = TinyNet(width=8)
    data = make_data(50)  # not a multiple of the batch size
    module = DistillationModule(TinyNet(width=8), teacher, method="nd", num_classes=3)
    trainer(tmp_path, max_epochs=1).fit(module, loader(data))
    with torch.no_grad():
        emb = teacher.eval().backbone(data.images).double()
    expected = torch.stack([emb[data.targets == c].mean(0) for c in range(3)]).float()
    torch.testing.assert_close(module.teacher_class_means, expected)


def test_teacher_class_means_errors(tmp_path):
    with pytest.raises(TypeError, match="DistillationMixin"):
        trainer(tmp_path, callbacks=[TeacherClassMeans()]).fit(_Plain(), loader(make_data()))
    module = UserModule(TinyNet())
    with pytest.raises(ValueError, match="has no feature layer"):
        trainer(tmp_path, callbacks=[TeacherClassMeans()]).fit(module, loader(make_data()))
    data = make_data(12)
    data.targets[data.targets == 2] = 0
    module = DistillationModule(TinyNet(), TinyNet(), method="nd", num_classes=3)
    with pytest.raises(ValueError, match=r"Classes \[2\] have no training sample"):
        trainer(tmp_path).fit(module, loader(data))


class _Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CountTeacherPasses(Callback):
    def __init__(self):
        self.calls_at_train_start = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.calls_at_train_start is None:
            self.calls_at_train_start = pl_module._distillation_state().teacher_calls


class Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _nd_module(teacher: nn.Module) -> DistillationModule:
    # same widths (no projector, whose dropout would draw from the global RNG that a checkpoint does not hold)
    torch.manual_seed(0)
    return DistillationModule(
        TinyNet(width=8, bn=False, dropout=0.0), teacher, method="nd", num_classes=3, warmup_epochs=2
    )


def test_crash_and_resume_equals_uninterrupted_run(tmp_path):
    data = make_data()
    teacher = TinyNet(width=8)
    full = _nd_module(teacher)
    trainer(tmp_path / "full", max_epochs=3).fit(full, loader(data))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", max_epochs=3, enable_checkpointing=True, callbacks=[ckpt, Crash()]).fit(
            _nd_module(teacher), loader(data)
        )
    # a new process rebuilds the module and resumes from the last checkpoint (written after epoch 0)
    resumed = _nd_module(teacher)
    counter = CountTeacherPasses()
    t = trainer(tmp_path / "b", max_epochs=3, callbacks=[counter])
    t.fit(resumed, loader(data), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert counter.calls_at_train_start == 0, "class means were recomputed on resume"
    (means_callback,) = [c for c in t.callbacks if isinstance(c, TeacherClassMeans)]
    assert means_callback.num_samples == len(data)  # restored callback state
    torch.testing.assert_close(resumed.teacher_class_means, full.teacher_class_means)
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b)


def test_teacher_hooks_do_not_accumulate_on_a_shared_teacher():
    teacher = TinyNet()
    modules = [UserModule(teacher, teacher_features=["backbone"]) for _ in range(3)]
    x = torch.randn(4, 6)
    for m in modules:
        m.teacher_forward(x)
        torch.testing.assert_close(m.teacher_features("backbone"), teacher.eval().backbone(x))
    assert not teacher.backbone._forward_hooks

"""The hyperparameter registry: checkpoints load whatever shape a hyperparameter took, compiled submodules keep
their names, the optimizer names belong to the registry, and the mixin passes every range flag through."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import hyperparameters as hp
from lightning_losses.callbacks import schedules
from lightning_losses.callbacks.schedules import HyperparameterSchedule, LinearSchedule
from lightning_losses.functional import kd_loss
from lightning_losses.losses import KDLoss
from lightning_losses.mixins.base import HyperparameterMixin
from tests.helpers.modules import Smoothing
from tests.helpers.trainer import cpu_trainer


class PerSample(HyperparameterMixin, pl.LightningModule):
    """User code driving a hyperparameter: one label-smoothing amount per example, set in every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.ls = Smoothing()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.set_hyperparameter("ls.amount", per_sample_amount(len(x), self.global_step))
        return self.ls(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def per_sample_amount(n: int, step: int) -> torch.Tensor:
    return torch.linspace(0.05, 0.4, n) + 0.001 * step


def _loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch_size)


# -------------------------------------------------------------------------------------- shapes in checkpoints
@pytest.mark.parametrize("saved", [torch.tensor([0.1, 0.2, 0.3]), torch.tensor(0.25)])
def test_any_saved_shape_loads_strictly_into_a_fresh_module(saved):
    model = nn.Module()
    model.ls = Smoothing()
    hp.set_hyperparameter(model, "ls.amount", torch.tensor([0.3, 0.2]))  # the current shape differs from `saved`
    hp.set_hyperparameter(model, "ls.amount", saved)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = nn.Module()
    fresh.ls = Smoothing()
    hp.set_hyperparameter(fresh, "ls.amount", torch.tensor([0.5, 0.5, 0.5, 0.5]))  # yet another shape
    fresh.load_state_dict(state, strict=True)
    restored = hp.get_hyperparameter(fresh, "ls.amount")
    assert restored.shape == saved.shape and torch.equal(restored, saved)
    assert restored.dtype == torch.float32
    # the strict mode is kept: a missing entry is still an error
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({}, strict=True)


def test_shape_following_load_keeps_device_and_dtype_and_survives_copies():
    import copy
    import pickle

    model = nn.Module()
    model.ls = Smoothing()
    model.double()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # the load hook travels with the module
        clone.load_state_dict({"ls.amount": torch.tensor([0.1, 0.2])})
        assert clone.ls.amount.dtype == torch.float64
        assert clone.ls.amount.tolist() == pytest.approx([0.1, 0.2])


class _Restored(pl.Callback):
    def on_train_start(self, trainer, pl_module):  # after Lightning restored the checkpoint, before any step
        self.amount = pl_module.ls.amount.detach().clone()


def test_lightning_checkpoint_of_a_per_sample_value_resumes(tmp_path):
    first = PerSample()
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(first, _loader())
    ckpt = tmp_path / "per_sample.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = first.ls.amount.detach().clone()
    assert saved.shape == (8,)

    probe = _Restored()
    resumed = PerSample()  # fresh: a scalar amount
    cpu_trainer(max_steps=5, callbacks=[probe]).fit(resumed, _loader(), ckpt_path=ckpt)
    assert torch.equal(probe.amount, saved)  # restored exactly, strict load
    assert torch.equal(resumed.ls.amount, per_sample_amount(8, 4))
    # and a plain load of the checkpoint file
    plain = PerSample()
    plain.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"], strict=True)
    assert torch.equal(plain.ls.amount, saved)


class _SpawnPerSample(PerSample):
    pass


@pytest.mark.ddp
def test_ddp_spawn_returns_a_per_sample_value_to_the_main_process():
    model = _SpawnPerSample()
    trainer = cpu_trainer(max_steps=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    trainer.fit(model, _loader())
    # the workers' weights come back (Lightning loads them into this process's module): the per-sample shape too
    assert torch.equal(model.ls.amount, per_sample_amount(8, 1))


# ------------------------------------------------------------------------------------------------ the mixin
class Root(HyperparameterMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_hyperparameter("weight", 0.5, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


def test_mixin_register_passes_the_inclusive_flags():
    m = Root()
    assert hp.hyperparameter_spec(m, "weight") == hp.HyperparameterSpec(0.0, 1.0, False, False)
    for excluded in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
            m.set_hyperparameter("weight", excluded)
    m.set_hyperparameter("weight", 0.999)


# --------------------------------------------------------------------------------- opt-in attribute discovery
class WithInternals(HyperparameterMixin, pl.LightningModule):
    """A loss hyperparameter beside two dropout rates: the student's own and one inside a TempNet."""

    def __init__(self, expose: bool = False) -> None:
        super().__init__()
        from lightning_losses.nn import TempNet

        self.student = nn.Module()
        self.student.drop = nn.Dropout(0.1)
        self.tempnet = TempNet(8)
        self.kd = KDLoss(temperature=4.0)
        if expose:
            self.expose_hyperparameter("student.drop.p", high=0.5)


def test_dropout_rates_are_not_discovered_unless_exposed():
    model = WithInternals()
    assert sorted(model.named_hyperparameters()) == ["kd.temperature", "kd.weight"]  # no TempNet internals
    everything = model.named_hyperparameters(include_attributes=True)
    assert {"student.drop.p", "tempnet.proj.2.p"} <= set(everything)
    assert float(everything["student.drop.p"]) == pytest.approx(0.1)
    for access in (
        lambda: model.get_hyperparameter("student.drop.p"),
        lambda: model.set_hyperparameter("student.drop.p", 0.2),
    ):
        with pytest.raises(
            KeyError,
            match=r"rate of the Dropout at 'student\.drop'.*expose_hyperparameter\(module, 'student\.drop\.p'\)",
        ):
            access()
    assert model.student.drop.p == 0.1
    with pytest.raises(KeyError, match=r"Available: kd\.temperature, kd\.weight\."):
        hp.hyperparameter_spec(model, "tempnet.proj.2.p")


def test_an_exposed_dropout_rate_is_named_range_checked_and_travels_with_the_module():
    import copy
    import pickle

    model = WithInternals(expose=True)
    assert sorted(model.named_hyperparameters()) == ["kd.temperature", "kd.weight", "student.drop.p"]
    model.set_hyperparameter("student.drop.p", 0.3)
    assert model.student.drop.p == 0.3 and float(model.get_hyperparameter("student.drop.p")) == pytest.approx(0.3)
    assert hp.hyperparameter_spec(model, "student.drop.p") == hp.HyperparameterSpec(0.0, 0.5)
    assert hp.hyperparameter_buffer_name(model, "student.drop.p") is None
    assert not any("drop" in k for k in model.state_dict())  # a plain attribute: not checkpointed
    with pytest.raises(ValueError, match=r"'student\.drop\.p' must lie in \[0, 0\.5\]"):
        model.set_hyperparameter("student.drop.p", 0.7)
    with pytest.raises(ValueError, match="takes a scalar"):
        model.set_hyperparameter("student.drop.p", torch.tensor([0.1, 0.2]))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # spawn strategies, Ray workers
        clone.set_hyperparameter("student.drop.p", 0.4)
        assert clone.student.drop.p == 0.4
    assert "tempnet.proj.2.p" not in model.named_hyperparameters()  # exposing one rate exposes no other


def test_expose_any_float_attribute_and_bad_exposures():
    model = nn.Module()
    model.act = nn.LeakyReLU(0.01)
    model.ls = Smoothing()
    with pytest.raises(
        KeyError, match=r"plain attribute of a LeakyReLU.*expose_hyperparameter\(module, 'act\.negative_slope'\)"
    ):
        hp.get_hyperparameter(model, "act.negative_slope")
    hp.expose_hyperparameter(model, "act.negative_slope", low=0.0, low_inclusive=False)
    hp.set_hyperparameter(model, "act.negative_slope", 0.2)
    assert model.act.negative_slope == 0.2
    with pytest.raises(ValueError, match=r"must lie in \(0, inf\)"):
        hp.set_hyperparameter(model, "act.negative_slope", 0.0)
    model.drop = nn.Dropout(0.6)
    cases = [
        ("ls.amount", ValueError, "already a registered hyperparameter"),
        ("net.drop.p", KeyError, "no submodule at 'net.drop'"),
        ("act.slope", KeyError, "has no attribute 'slope'"),
        ("act.inplace", ValueError, "only a real-number attribute"),
        ("drop.p", None, None),
    ]
    for name, error, match in cases:
        if error is None:
            with pytest.raises(ValueError, match=r"'drop\.p' must lie in \[0, 0\.5\]"):
                hp.expose_hyperparameter(model, name, high=0.5)  # the current value is checked
            continue
        with pytest.raises(error, match=match):
            hp.expose_hyperparameter(model, name)
    model.register_buffer("scale", torch.ones(()))
    with pytest.raises(ValueError, match="buffer, parameter or submodule"):
        hp.expose_hyperparameter(model, "scale")


# ----------------------------------------------------------------------------------------- optimizer names
def test_optimizer_names_belong_to_the_registry_and_stay_importable_from_schedules():
    assert hp.OPTIMIZER_HYPERPARAMETERS == ("lr", "weight_decay")
    assert schedules.apply_hyperparameters is hp.apply_hyperparameters
    assert schedules.read_hyperparameters is hp.read_hyperparameters
    assert schedules.OPTIMIZER_HYPERPARAMETERS is hp.OPTIMIZER_HYPERPARAMETERS
    model = nn.Module()
    model.ls = Smoothing()
    with pytest.raises(KeyError, match=r"'lr' is an optimizer hyperparameter.*apply_hyperparameters"):
        hp.set_hyperparameter(model, "lr", 0.1)

    class _Trainer:  # what apply/read need of a Trainer: its optimizers
        def __init__(self) -> None:
            self.optimizers = [torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0, weight_decay=0.0)]

    trainer = _Trainer()
    hp.apply_hyperparameters(model, {"lr": 0.25, "weight_decay": 0.01, "ls.amount": 0.3}, trainer)
    assert hp.read_hyperparameters(model, ["lr", "weight_decay", "ls.amount"], trainer) == pytest.approx(
        {"lr": 0.25, "weight_decay": 0.01, "ls.amount": 0.3}
    )


# -------------------------------------------------------------------------------------------------- compile
def test_compiled_submodule_keeps_its_hyperparameter_names():
    model = nn.Module()
    model.kd = torch.compile(KDLoss(temperature=4.0), backend="eager")
    model.ls = Smoothing()
    assert sorted(hp.named_hyperparameters(model)) == ["kd.temperature", "kd.weight", "ls.amount"]
    hp.set_hyperparameter(model, "kd.temperature", 2.0)
    assert float(model.kd._orig_mod.temperature) == 2.0  # the wrapped module's buffer
    assert float(hp.get_hyperparameter(model, "kd.temperature")) == 2.0
    assert hp.hyperparameter_spec(model, "kd.temperature").describe() == "(0, inf)"
    assert hp.hyperparameter_buffer_name(model, "kd.temperature") == "kd._orig_mod.temperature"
    assert float(hp.get_hyperparameter(model, "kd._orig_mod.temperature")) == 2.0  # the state-dict spelling too
    compiled_root = torch.compile(model, backend="eager")
    assert sorted(hp.named_hyperparameters(compiled_root)) == ["kd.temperature", "kd.weight", "ls.amount"]
    with pytest.raises(KeyError, match=r"Available: kd\.temperature, kd\.weight, ls\.amount"):
        hp.get_hyperparameter(model, "kd.temp")


class CompiledKD(HyperparameterMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = nn.Linear(4, 5), nn.Linear(4, 5)
        self.teacher.requires_grad_(False)
        self.kd = torch.compile(KDLoss(temperature=4.0), backend="eager")
        self.seen: list[tuple[float, float, float]] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        s, t = self.student(x), self.teacher(x)
        loss = self.kd(s, t)
        temperature = float(self.kd._orig_mod.temperature)
        self.seen.append((temperature, float(loss.detach()), float(kd_loss(s.detach(), t, temperature=temperature))))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


def test_schedule_drives_a_compiled_loss_by_its_plain_name():
    model = CompiledKD()
    schedule = LinearSchedule(4.0, 1.0, duration=3)
    cpu_trainer(max_steps=4, callbacks=[HyperparameterSchedule({"kd.temperature": schedule})]).fit(model, _loader())
    assert [t for t, _, _ in model.seen] == pytest.approx([schedule(step) for step in range(4)])
    for _, loss, reference in model.seen:  # the compiled loss used the scheduled value
        assert loss == pytest.approx(reference, rel=1e-6)


def test_range_check_compiles_without_a_graph_break():
    spec = hp.HyperparameterSpec(0.0, None, low_inclusive=False)

    def scaled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        spec.check("t", t)
        return x / t

    fn = torch.compile(scaled, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    x = torch.randn(3)
    torch.testing.assert_close(fn(x, torch.tensor(2.0)), x / 2)
    with pytest.raises(ValueError, match=r"must lie in \(0, inf\)"):
        spec.check("t", torch.tensor(0.0))  # eager: the full message


def test_compiled_loss_checkpoint_loads_with_a_per_sample_value():
    model = nn.Module()
    model.kd = torch.compile(KDLoss(), backend="eager")
    hp.set_hyperparameter(model, "kd.temperature", torch.tensor([2.0, 3.0]))
    fresh = nn.Module()
    fresh.kd = torch.compile(KDLoss(), backend="eager")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert hp.get_hyperparameter(fresh, "kd.temperature").tolist() == [2.0, 3.0]

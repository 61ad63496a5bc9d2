"""Hyperparameter schedules: exact values against plain formulas, the callback in a Trainer, crash and resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.callbacks.schedules import (
    ChainedSchedule,
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    HyperparameterSchedule,
    LambdaSchedule,
    LinearSchedule,
    PiecewiseSchedule,
    StepSchedule,
    apply_hyperparameters,
)
from lightning_losses.mixins.base import HyperparameterMixin
from tests.helpers.modules import Smoothing
from tests.helpers.resume import crash_and_resume
from tests.helpers.trainer import cpu_trainer


class Recorder(HyperparameterMixin, pl.LightningModule):
    """Records, inside each training step, the values in effect (loss buffer, dropout rate, optimizer lr)."""

    def __init__(self, dropout: float = 0.1, expose_dropout: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))
        self.ls = Smoothing(0.1)
        if expose_dropout:
            self.expose_hyperparameter("net.2.p")  # a dropout rate is a hyperparameter once exposed
        self.seen: list[tuple[int, float, float, float]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        lr = self.optimizers().param_groups[0]["lr"]
        self.seen.append((self.global_step, float(self.ls.amount), float(self.net[2].p), float(lr)))
        return self.ls(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def _loader(n: int = 32, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("t", [0, 1, 3, 7, 10, 12, 30])
def test_schedule_shapes_match_plain_formulas(t):
    p = min(max(t / 10, 0.0), 1.0)
    assert LinearSchedule(2.0, 0.5, duration=10)(t) == pytest.approx(2.0 + (0.5 - 2.0) * p)
    assert CosineSchedule(2.0, 0.5, duration=10)(t) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi * p)) / 2)
    assert ExponentialSchedule(2.0, 0.02, duration=10)(t) == pytest.approx(2.0 * 0.01**p)
    expected_step = 1.0 * 0.5 ** sum(m <= t for m in (3, 10))
    assert StepSchedule(1.0, milestones=[3, 10], gamma=0.5)(t) == pytest.approx(expected_step)
    assert ConstantSchedule(3.0)(t) == 3.0
    assert LambdaSchedule(lambda s: s * s)(t) == t * t


def test_offset_delays_the_ramp_and_both_ends_hold():
    s = LinearSchedule(1.0, 3.0, duration=4, offset=10)
    assert [s(t) for t in (0, 10, 12, 14, 100)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    c = CosineSchedule(0.0, 1.0, duration=8)  # a cosine warm-up
    assert c(0) == 0.0 and c(8) == pytest.approx(1.0)
    assert c(4) == pytest.approx(0.5)  # the half-cosine passes the midpoint at half time (symmetry)
    assert c(2) + c(6) == pytest.approx(1.0)
    values = [c(t) for t in range(9)]
    assert values == sorted(values)


def test_exponential_is_geometric_midpoint():
    s = ExponentialSchedule(4.0, 1.0, duration=10)
    assert s(5) == pytest.approx(math.sqrt(4.0 * 1.0))


def test_piecewise_linear_and_constant_interpolation():
    points = [(0, 1.0), (4, 3.0), (6, -1.0)]
    lin = PiecewiseSchedule(points)
    const = PiecewiseSchedule(points, interpolation="constant")
    for t in range(-2, 9):
        if t <= 0:
            ref = 1.0
        elif t < 4:
            ref = 1.0 + 2.0 * t / 4
        elif t < 6:
            ref = 3.0 - 4.0 * (t - 4) / 2
        else:
            ref = -1.0
        assert lin(t) == pytest.approx(ref)
        ref_const = 1.0 if t < 4 else (3.0 if t < 6 else -1.0)
        assert const(t) == ref_const


def test_chained_warmup_then_decay_is_continuous():
    s = ChainedSchedule([LinearSchedule(0.0, 1.0, duration=5), CosineSchedule(1.0, 0.1, duration=20)], [5])
    assert [s(t) for t in (0, 5, 25)] == pytest.approx([0.0, 1.0, 0.1])
    assert s(4.999) == pytest.approx(s(5), abs=1e-3)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: LinearSchedule(0, 1, duration=0), "duration"),
        (lambda: CosineSchedule(0, 1, duration=5, offset=-1), "offset"),
        (lambda: ExponentialSchedule(0.0, 1.0, duration=5), "non-zero"),
        (lambda: ExponentialSchedule(-1.0, 1.0, duration=5), "same sign"),
        (lambda: StepSchedule(1.0, milestones=[5, 2]), "increasing"),
        (lambda: PiecewiseSchedule([]), "at least one"),
        (lambda: PiecewiseSchedule([(3, 1.0), (1, 2.0)]), "non-decreasing"),
        (lambda: ChainedSchedule([ConstantSchedule(1.0)], [3]), "one boundary fewer"),
        (lambda: HyperparameterSchedule({}), "at least one"),
        (lambda: HyperparameterSchedule({"ls.amount": ConstantSchedule(0.1)}, interval="batch"), "interval"),
    ],
)
def test_bad_configuration_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_non_callable_schedule_is_a_type_error():
    with pytest.raises(TypeError, match="ConstantSchedule"):
        HyperparameterSchedule({"ls.amount": 0.1})  # type: ignore[dict-item]


def test_unknown_name_lists_available_names():
    cb = HyperparameterSchedule({"ls.amnt": ConstantSchedule(0.1)})
    with pytest.raises(KeyError, match=r"ls\.amount"):
        cpu_trainer(max_steps=1, callbacks=[cb]).fit(Recorder(), _loader())


def test_optimizer_hyperparameter_needs_an_optimizer():
    with pytest.raises(RuntimeError, match="on_train_start"):
        apply_hyperparameters(Recorder(), {"lr": 0.1}, trainer=None)


# ---------------------------------------------------------------------------------------------- callback
def _schedules():
    return {
        "ls.amount": LinearSchedule(0.0, 0.5, duration=10),
        "net.2.p": StepSchedule(0.4, milestones=[3, 6], gamma=0.5),
        "lr": CosineSchedule(0.2, 0.0, duration=12),
    }


def test_exact_values_at_every_step():
    model = Recorder()
    schedules = _schedules()
    cpu_trainer(max_steps=12, callbacks=[HyperparameterSchedule(schedules)]).fit(model, _loader())
    assert [s[0] for s in model.seen] == list(range(12))
    for step, amount, p, lr in model.seen:
        assert amount == pytest.approx(schedules["ls.amount"](step), abs=1e-7)
        assert p == pytest.approx(schedules["net.2.p"](step))
        assert lr == pytest.approx(schedules["lr"](step))


def test_dropout_rate_found_by_the_deprecated_discovery_still_follows_its_schedule():
    model = Recorder(expose_dropout=False)
    with pytest.raises(KeyError, match=r"expose_hyperparameter\('net\.2\.p'\)"):
        model.set_hyperparameter("net.2.p", 0.2)  # direct access needs the opt-in
    schedules = {"net.2.p": StepSchedule(0.4, milestones=[3], gamma=0.5)}
    with pytest.warns(DeprecationWarning, match=r"HyperparameterSchedule reaches 'net\.2\.p'.*expose_hyperparameter"):
        cpu_trainer(max_steps=6, callbacks=[HyperparameterSchedule(schedules)]).fit(model, _loader())
    assert [s[2] for s in model.seen] == pytest.approx([schedules["net.2.p"](t) for t in range(6)])
    assert "net.2.p" in model.named_hyperparameters()  # exposed from then on


def test_epoch_interval_and_logging():
    model = Recorder()
    cb = HyperparameterSchedule({"ls.amount": PiecewiseSchedule([(0, 0.1), (1, 0.3), (2, 0.2)], "constant")}, "epoch")
    trainer = cpu_trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(model, _loader())  # 8 steps per epoch
    per_epoch = [model.seen[i][1] for i in (0, 7, 8, 15, 16, 23)]
    assert per_epoch == pytest.approx([0.1, 0.1, 0.3, 0.3, 0.2, 0.2])
    assert float(trainer.callback_metrics["hp/ls.amount"]) == pytest.approx(0.2)


def test_several_schedule_callbacks_coexist_with_distinct_state_keys():
    a = HyperparameterSchedule({"ls.amount": ConstantSchedule(0.2)})
    b = HyperparameterSchedule({"lr": ConstantSchedule(0.01)})
    assert a.state_key != b.state_key
    model = Recorder()
    cpu_trainer(max_steps=3, callbacks=[a, b]).fit(model, _loader())
    assert all(s[1] == pytest.approx(0.2) and s[3] == pytest.approx(0.01) for s in model.seen)


def test_crash_and_resume_continues_exactly(tmp_path):
    # no dropout schedule here: its random masks are not part of a checkpoint, so weights would differ
    def schedules():
        return {"ls.amount": LinearSchedule(0.0, 0.5, duration=10), "lr": CosineSchedule(0.2, 0.0, duration=12)}

    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Recorder(dropout=0.0).state_dict().items()}

    def fit(steps, ckpt):
        model = Recorder(dropout=0.0)
        if ckpt is None:
            model.load_state_dict(init)
        else:  # fresh process: different initial values everywhere
            model.set_hyperparameter("ls.amount", 0.9)
        cb = HyperparameterSchedule(schedules())
        trainer = cpu_trainer(max_steps=steps, callbacks=[cb])
        # one batch per epoch: the data order of a resumed run is then the uninterrupted one whatever Lightning replays
        trainer.fit(model, _loader(n=4), ckpt_path=ckpt)
        return (model, cb), trainer

    runs = crash_and_resume(fit, crash_step=8, total_steps=12, tmp_path=tmp_path)
    (full, _), (resumed, cb) = runs.full, runs.resumed

    assert [s[0] for s in resumed.seen] == list(range(8, 12))
    for got, want in zip(resumed.seen, full.seen[8:]):
        assert got == pytest.approx(want, abs=1e-7)  # same step, same amount, same lr
    # the optimizer's restored lr (from step 7) was replaced before the first resumed step
    assert resumed.seen[0][3] == pytest.approx(schedules()["lr"](8))
    assert cb.last_position == 11
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)  # the whole run is reproduced


def test_schedule_state_is_checkpointed(tmp_path):
    cb = HyperparameterSchedule({"ls.amount": LinearSchedule(0.0, 0.5, duration=10)})
    trainer = cpu_trainer(max_steps=5, callbacks=[cb])
    trainer.fit(Recorder(), _loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert state["last_position"] == 4
    assert state["last_values"]["ls.amount"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------- spawn strategies
def halving(t: float, start: float = 0.4) -> float:
    return start * 0.5**t


def test_picklable_schedule_forms_round_trip():
    import copy
    import functools
    import pickle

    cb = HyperparameterSchedule(
        {
            "ls.amount": LambdaSchedule(halving),
            "net.2.p": functools.partial(halving, start=0.2),
            "lr": ChainedSchedule([ConstantSchedule(0.1), LinearSchedule(0.1, 0.0, duration=5)], [2]),
        }
    )
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.value_at(3) == cb.value_at(3)
    with_lambda = HyperparameterSchedule({"ls.amount": lambda t: 0.1})
    assert copy.deepcopy(with_lambda).value_at(0) == {"ls.amount": 0.1}  # copies do not need pickling
    assert copy.copy(with_lambda).schedules == with_lambda.schedules


def test_lambda_schedule_under_ddp_spawn_names_the_picklable_forms():
    cb = HyperparameterSchedule({"ls.amount": LambdaSchedule(lambda t: 0.1 * t)})
    trainer = cpu_trainer(max_steps=1, strategy="ddp_spawn", devices=2, callbacks=[cb])
    with pytest.raises(TypeError, match=r"'ls\.amount'.*ConstantSchedule, LinearSchedule.*functools\.partial"):
        trainer.fit(Recorder(), _loader())  # raised in this process, before any worker starts

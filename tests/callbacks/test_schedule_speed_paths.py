"""Speed paths of the self-tuning family: the float write of the registry, and ``log=False`` really not logging.

``set_hyperparameter`` writes a Python number into a scalar float32 buffer (or an exposed float attribute) with no
tensor built: its decisions (accept or reject) and the stored bits must equal those of the tensor path, for values
on either side of the bounds once both are rounded to float32. ``HyperparameterSchedule(log=False)`` and
``SelfTuning(log=False)`` must not call ``LightningModule.log`` (Lightning sets ``callback.log`` to the module's
method when ``fit`` starts, so the option has to live under another name).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import hyperparameters as hp
from lightning_losses.callbacks.schedules import HyperparameterSchedule, LinearSchedule
from lightning_losses.callbacks.self_tuning import SelfTuning, TunedHyperparameter
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.nn.stn import HyperLinear
from tests.helpers.modules import Smoothing
from tests.helpers.trainer import cpu_trainer


def _owner(low: float | None, high: float | None, low_inclusive: bool = True, high_inclusive: bool = True):
    module = nn.Module()
    module.loss = nn.Module()
    start = 0.5 if low is None or high is None else (low + high) / 2
    hp.register_hyperparameter(
        module.loss, "w", start, low=low, high=high, low_inclusive=low_inclusive, high_inclusive=high_inclusive
    )
    return module


def _neighbours(x: float) -> list[float]:
    """``x``, its float32 rounding and the doubles just around both."""
    x32 = float(np.float32(x))
    return sorted(
        {
            x,
            x32,
            math.nextafter(x, -math.inf),
            math.nextafter(x, math.inf),
            math.nextafter(x32, math.inf),
            math.nextafter(x32, -math.inf),
            float(np.nextafter(np.float32(x), np.float32(np.inf))),
        }
    )


def _outcome(module: nn.Module, value: float | torch.Tensor) -> tuple[str, bytes | str]:
    try:
        hp.set_hyperparameter(module, "loss.w", value)
    except ValueError as err:
        return "rejected", str(err)
    return "stored", module.loss.w.numpy().tobytes()


BOUNDS = [
    (0.1, 0.3, True, True),
    (0.1, 0.3, False, False),
    (0.0, 1.0, True, False),
    (None, 0.7, True, True),
    (1e-3, None, False, True),
]


@pytest.mark.parametrize("low, high, low_inclusive, high_inclusive", BOUNDS)
def test_float_write_decides_and_stores_like_the_tensor_path(low, high, low_inclusive, high_inclusive):
    values = [v for b in (low, high) if b is not None for v in _neighbours(b)]
    values += [0.2, -5.0, 5.0, math.inf, -math.inf, math.nan, 1e39, 0, 1]  # 1e39 overflows float32 to inf
    for value in values:
        fast, tensor = (
            _owner(low, high, low_inclusive, high_inclusive),
            _owner(low, high, low_inclusive, high_inclusive),
        )
        reference = _outcome(tensor, torch.tensor(float(value), dtype=torch.float64))  # the tensor path
        assert _outcome(fast, value) == reference, value


def test_float_write_builds_no_tensor_and_keeps_the_buffer(monkeypatch):
    module = _owner(0.0, 1.0)
    buffer = module.loss.w
    calls = []
    as_tensor = torch.as_tensor

    def counting(*args, **kwargs):
        calls.append(args)
        return as_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", counting)
    hp.set_hyperparameter(module, "loss.w", 0.25)
    hp.set_hyperparameter(module, "loss.w", 1)
    assert calls == []
    assert module.loss.w is buffer and float(buffer) == 1.0
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got 2\.0\."):
        hp.set_hyperparameter(module, "loss.w", 2.0)  # a rejected value takes the tensor path and its message


def test_float_write_of_an_exposed_attribute_and_of_other_shapes_and_dtypes():
    net = nn.Module()
    net.drop = nn.Dropout(0.1)
    hp.expose_hyperparameter(net, "drop.p", high=0.5)
    hp.set_hyperparameter(net, "drop.p", 0.3)
    assert net.drop.p == 0.3 and type(net.drop.p) is float  # the number as given, not its float32 rounding
    with pytest.raises(ValueError, match=r"'drop\.p' must lie in \[0, 0\.5\]"):
        hp.set_hyperparameter(net, "drop.p", 0.6)
    module = _owner(0.0, 1.0)
    hp.set_hyperparameter(module, "loss.w", torch.tensor([0.2, 0.4]))  # per sample
    hp.set_hyperparameter(module, "loss.w", 0.3)  # back to a scalar: the shape follows the value
    assert module.loss.w.shape == () and float(module.loss.w) == pytest.approx(0.3)
    half = _owner(0.0, 1.0).half()  # a float16 buffer keeps the tensor path's float32-then-float16 rounding
    hp.set_hyperparameter(half, "loss.w", 0.1)
    assert half.loss.w.dtype == torch.float16
    assert half.loss.w.item() == torch.tensor(0.1, dtype=torch.float32).to(torch.float16).item()
    hp.set_hyperparameter(module, "loss.w", True)  # a bool is not a number here: the tensor path, as before
    assert float(module.loss.w) == 1.0


# --------------------------------------------------------------------------------------------------- log=False


class Model(HyperparameterMixin, pl.LightningModule):
    def __init__(self, hyper: bool = False) -> None:
        super().__init__()
        self.net = HyperLinear(4, 3, num_hyperparameters=1) if hyper else nn.Linear(4, 3)
        self.ls = Smoothing()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.ls(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)), 4)


@pytest.mark.parametrize("log", [False, True])
def test_schedule_logs_only_when_asked(log):
    trainer = cpu_trainer(
        max_steps=4, callbacks=[HyperparameterSchedule({"ls.amount": LinearSchedule(0, 1, 4)}, log=log)]
    )
    trainer.fit(Model(), _loader())
    assert ("hp/ls.amount" in trainer.callback_metrics) is log


@pytest.mark.parametrize("log", [False, True])
def test_self_tuning_logs_only_when_asked(log):
    stn = SelfTuning(
        {"ls.amount": TunedHyperparameter(initial=0.1, low=0.0, high=0.5)}, val_dataloader=_loader(), log=log
    )
    trainer = cpu_trainer(max_steps=4, callbacks=[stn])
    trainer.fit(Model(hyper=True), _loader())
    assert stn.hyper_steps == 2
    assert ("stn/ls.amount" in trainer.callback_metrics) is log

"""PostHocCalibration across checkpoints and into the user's steps: the calibrator fitted at the end of fit is what
``test``/``predict`` use after any ``ckpt_path=`` restore of the run, and it reaches the logits the steps compute."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_losses.callbacks.calibration import PostHocCalibration
from tests.helpers.data import three_class_data
from tests.helpers.trainer import cpu_trainer


class _Net(pl.LightningModule):
    """Over-confident by construction (logits times 4); the steps call ``self(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * self.net(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return F.cross_entropy(self.logits(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_loss", F.cross_entropy(self.logits(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("test_nll", F.cross_entropy(self.logits(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.logits(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _NoForward(_Net):
    """The README's pattern: no ``forward``; every step calls ``self.net(x)``."""

    forward = pl.LightningModule.forward  # type: ignore[assignment]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * self.net(x)


class _StepsBypassForward(_Net):
    """``forward`` exists, but the steps call ``self.net`` directly (bypassing the default hook)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * self.net(x)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:  # type: ignore[no-untyped-def]
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return cpu_trainer(
        tmp_path, callbacks=callbacks, **{"max_epochs": 3, "enable_checkpointing": checkpointing, **kwargs}
    )


_TRAIN, _VAL, _TEST = three_class_data(160, 0), three_class_data(90, 1), three_class_data(60, 2)


def _fit(tmp_path: Path, model: pl.LightningModule, callback: PostHocCalibration, **kwargs) -> tuple:  # type: ignore[no-untyped-def]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True)
    trainer = _trainer(tmp_path, [callback, ckpt], **kwargs)
    trainer.fit(model, DataLoader(_TRAIN, batch_size=32, shuffle=True), DataLoader(_VAL, batch_size=32))
    return trainer, ckpt


def _expected_nll(path: str, temperature: float) -> float:
    """Cross-entropy of the checkpoint's weights on the test set, with the logits divided by ``temperature``."""
    reference = _Net()
    reference.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    with torch.no_grad():
        return float(F.cross_entropy(reference(_TEST.tensors[0]) / temperature, _TEST.tensors[1]))


def _test_nll(trainer: pl.Trainer, model: pl.LightningModule, ckpt_path: str) -> float:
    result = trainer.test(model, DataLoader(_TEST, batch_size=30), ckpt_path=ckpt_path, verbose=False)
    return float(result[0]["test_nll"])


def test_best_last_and_explicit_checkpoints_of_the_run_carry_the_fitted_calibrator(tmp_path: Path) -> None:
    model, callback = _Net(), PostHocCalibration("temperature")
    trainer, ckpt = _fit(tmp_path, model, callback)
    temperature = callback.calibrator.temperature  # type: ignore[attr-defined]
    assert abs(temperature - 1.0) > 0.05
    run_files = {ckpt.best_model_path, ckpt.last_model_path, *ckpt.best_k_models}
    assert set(callback.updated_checkpoints) == run_files and len(run_files) == 3
    for path in sorted(run_files):  # "best", "last" and an explicit path of the run: calibrated in this Trainer
        name = {ckpt.best_model_path: "best", ckpt.last_model_path: "last"}.get(path, path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # restoring a file of the run: no warning
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            value = _test_nll(trainer, model, name)
        assert callback.is_fitted
        assert value == pytest.approx(_expected_nll(path, temperature), abs=1e-5), name
    # a fresh process: new Trainer, new module, new callback, test from the best file
    fresh = PostHocCalibration("temperature")
    value = _test_nll(_trainer(tmp_path, [fresh]), _Net(), ckpt.best_model_path)
    assert fresh.calibrator.temperature == pytest.approx(temperature, rel=1e-7)  # type: ignore[attr-defined]
    assert value == pytest.approx(_expected_nll(ckpt.best_model_path, temperature), abs=1e-5)
    # a checkpoint saved after calibration carries it too
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert bool(state["calibrator"]["fitted"])


def test_unfitted_checkpoint_of_this_run_keeps_the_fitted_calibrator_with_a_warning(tmp_path: Path) -> None:
    model, callback = _Net(), PostHocCalibration("temperature", update_checkpoints=False)
    trainer, ckpt = _fit(tmp_path, model, callback, max_epochs=2)
    assert callback.updated_checkpoints == []
    temperature = callback.calibrator.temperature  # type: ignore[attr-defined]
    with pytest.warns(UserWarning, match="written by this run before the calibration"):
        value = _test_nll(trainer, model, "best")
    assert callback.is_fitted
    assert value == pytest.approx(_expected_nll(ckpt.best_model_path, temperature), abs=1e-5)


def test_unfitted_checkpoint_of_another_run_never_loads_silently(tmp_path: Path) -> None:
    other = PostHocCalibration("temperature", update_checkpoints=False)
    _, other_ckpt = _fit(tmp_path / "other", _Net(), other, max_epochs=1)
    model, callback = _Net(), PostHocCalibration("temperature")
    trainer, _ = _fit(tmp_path / "this", model, callback, max_epochs=1)
    with pytest.warns(UserWarning) as record:
        value = _test_nll(trainer, model, other_ckpt.best_model_path)
    messages = " | ".join(str(w.message) for w in record)
    assert "another run" in messages and "NOT calibrated" in messages
    assert not callback.is_fitted
    assert value == pytest.approx(_expected_nll(other_ckpt.best_model_path, 1.0), abs=1e-5)


def test_named_submodule_calibrates_steps_that_call_self_net(tmp_path: Path) -> None:
    model, callback = _NoForward(), PostHocCalibration("temperature", module="net")
    trainer = _trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(model, DataLoader(_TRAIN, batch_size=32, shuffle=True), DataLoader(_VAL, batch_size=32))
    with torch.no_grad():  # the fit used the named module's logits (its scale, not the step's 4x)
        raw_val = model.net(_VAL.tensors[0])
    from lightning_losses.nn.calibration import TemperatureScaler

    reference = TemperatureScaler().fit(raw_val, _VAL.tensors[1])
    assert callback.calibrator.temperature == pytest.approx(reference.temperature, rel=1e-5)  # type: ignore[attr-defined]
    with torch.no_grad():
        raw = model.net(_TEST.tensors[0])
    expected = float(F.cross_entropy(4 * (raw / reference.temperature), _TEST.tensors[1]))
    value = float(trainer.test(model, DataLoader(_TEST, batch_size=30), verbose=False)[0]["test_nll"])
    assert value == pytest.approx(expected, abs=1e-5)
    predictions = torch.cat(trainer.predict(model, DataLoader(_TEST, batch_size=30)))  # type: ignore[arg-type]
    assert torch.allclose(predictions, 4 * raw / reference.temperature, atol=1e-5)


def test_steps_that_bypass_the_hooked_module_raise_at_the_first_batch(tmp_path: Path) -> None:
    model, callback = _StepsBypassForward(), PostHocCalibration("temperature")
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, DataLoader(_TRAIN, batch_size=32), DataLoader(_VAL, batch_size=32))
    assert callback.is_fitted
    with pytest.raises(RuntimeError, match=r"never called the LightningModule's forward.*module='net'"):
        trainer.test(model, DataLoader(_TEST, batch_size=30), verbose=False)
    with pytest.raises(RuntimeError, match="predict step never called"):
        trainer.predict(model, DataLoader(_TEST, batch_size=30))


def test_unknown_module_name_and_unfitted_test_are_reported(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [PostHocCalibration(module="head")], max_epochs=1)
    with pytest.raises(ValueError, match=r"no submodule 'head'.*\['net'\]"):
        trainer.fit(_Net(), DataLoader(_TRAIN, batch_size=32), DataLoader(_VAL, batch_size=32))
    manual = PostHocCalibration(fit_on="manual")
    with pytest.warns(UserWarning, match="not fitted at test start: the test outputs are NOT calibrated"):
        _trainer(tmp_path, [manual]).test(_Net(), DataLoader(_TEST, batch_size=30), verbose=False)

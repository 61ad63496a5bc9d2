"""Calibration callbacks: PostHocCalibration (fit, apply, checkpoint/resume, DDP) and CalibrationMonitor."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.callbacks.calibration import CalibrationMonitor, PostHocCalibration
from lightning_losses.functional.calibration import (
    brier_score,
    classwise_calibration_error,
    expected_calibration_error,
    negative_log_likelihood,
)
from lightning_losses.metrics.calibration import CalibrationError, ClasswiseCalibrationError, NegativeLogLikelihood
from lightning_losses.nn.calibration import CorrectnessAwareCalibrator, TemperatureScaler
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import cpu_trainer


def _data(n: int = 240, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.7 * torch.randn(n, generator=g) > 0).long() + (x[:, 1] > 0.8).long()
    return TensorDataset(x, y, torch.arange(n))


class _Net(pl.LightningModule):
    """Over-confident by construction: logits are multiplied by 4."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * self.lin(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        return {"logits": logits}

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        self.log("test_nll", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:  # type: ignore[no-untyped-def]
    return cpu_trainer(tmp_path, callbacks=callbacks, **{"max_epochs": 3, **kwargs})


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(_data(240, 0), batch_size=32, shuffle=True), DataLoader(_data(150, 1), batch_size=32)


def _logits(model: pl.LightningModule, dataset: TensorDataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(dataset.tensors[0])


def test_post_hoc_calibration_fits_on_validation_and_calibrates_predict(tmp_path: Path) -> None:
    train, val = _loaders()
    model = _Net()
    callback = PostHocCalibration("temperature")
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(model, train, val)
    assert callback.is_fitted
    # the same fit, by hand, on the validation logits of the final model
    val_logits, val_y = _logits(model, val.dataset), val.dataset.tensors[1]  # type: ignore[attr-defined]
    reference = TemperatureScaler().fit(val_logits, val_y)
    assert callback.calibrator.temperature == pytest.approx(reference.temperature, rel=1e-6)  # type: ignore[attr-defined]
    assert callback.calibrator.temperature > 1.2  # type: ignore[attr-defined]
    assert callback.metrics["nll_after"] < callback.metrics["nll_before"]
    assert callback.metrics["ece_before"] == pytest.approx(
        float(expected_calibration_error(val_logits, val_y, input_type="logits")), abs=1e-6
    )
    # predict outputs are calibrated; the module itself is not changed outside predict/test
    predictions = torch.cat(trainer.predict(model, DataLoader(_data(40, 2), batch_size=16)))  # type: ignore[arg-type]
    raw = _logits(model, _data(40, 2))
    assert torch.allclose(predictions, raw / reference.temperature, atol=1e-5)
    assert torch.allclose(model(_data(40, 2).tensors[0]), raw)
    # test metrics use calibrated logits too
    test_ds = _data(90, 3)
    result = trainer.test(model, DataLoader(test_ds, batch_size=30), verbose=False)[0]
    expected = float(F.cross_entropy(_logits(model, test_ds) / reference.temperature, test_ds.tensors[1]))
    assert result["test_nll"] == pytest.approx(expected, abs=1e-5)


def test_checkpoint_restores_calibrator_exactly_in_test_and_resume(tmp_path: Path) -> None:
    train, val = _loaders()
    model = _Net()
    callback = PostHocCalibration("dirichlet")
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(model, train, val)
    path = tmp_path / "calibrated.ckpt"
    trainer.save_checkpoint(path)
    saved = {k: v.clone() for k, v in callback.calibrator.state_dict().items()}

    # a fresh process: new module, new callback, test from the checkpoint
    fresh_cb = PostHocCalibration("dirichlet")
    fresh_model = _Net()
    test_ds = _data(60, 4)
    _trainer(tmp_path, [fresh_cb]).test(fresh_model, DataLoader(test_ds, batch_size=30), ckpt_path=path, verbose=False)
    assert fresh_cb.is_fitted
    for k, v in fresh_cb.calibrator.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert fresh_cb.metrics == callback.metrics

    # crash and resume: fit continues from the checkpoint with the calibrator restored before training
    seen: dict[str, torch.Tensor] = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            seen.update({k: v.clone() for k, v in resumed_cb.calibrator.state_dict().items()})

    resumed_cb = PostHocCalibration("dirichlet")
    _trainer(tmp_path, [resumed_cb, Spy()], max_epochs=4).fit(_Net(), train, val, ckpt_path=path)
    for k, v in saved.items():
        assert torch.equal(seen[k], v), k
    assert resumed_cb.is_fitted


def test_checkpoint_from_model_checkpoint_then_manual_calibration(tmp_path: Path) -> None:
    train, val = _loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = PostHocCalibration("vector", fit_on="manual")
    model = _Net()
    trainer = _trainer(tmp_path, [callback, ckpt], enable_checkpointing=True)
    trainer.fit(model, train, val)
    assert not callback.is_fitted  # manual: nothing fitted at fit end
    metrics = callback.calibrate(trainer, model)
    assert callback.is_fitted and metrics["nll_after"] <= metrics["nll_before"]


def test_ca_calibrator_in_callback(tmp_path: Path) -> None:
    train, val = _loaders()
    model = _Net()
    noise = [lambda x: x + 0.3 * torch.randn_like(x), lambda x: 0.8 * x, lambda x: x.flip(1)]
    ca = CorrectnessAwareCalibrator(transforms=noise, top_k=3, epochs=3)
    callback = PostHocCalibration(ca)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, train, val)
    assert callback.is_fitted
    test_ds = _data(20, 5)
    preds = torch.cat(trainer.predict(model, DataLoader(test_ds, batch_size=20)))  # type: ignore[arg-type]
    raw = _logits(model, test_ds)
    assert torch.equal(preds.argmax(1), raw.argmax(1))
    assert not torch.allclose(preds, raw)


def test_post_hoc_configuration_errors() -> None:
    with pytest.warns(UserWarning, match="fits the calibrator on the TEST set"):
        PostHocCalibration(split="test")
    with pytest.raises(ValueError, match="Unknown calibrator 'gamma'"):
        PostHocCalibration("gamma")
    with pytest.raises(ValueError, match="`fit_on` must be"):
        PostHocCalibration(fit_on="epoch_end")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a Calibrator"):
        PostHocCalibration(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_post_hoc_without_validation_data_raises(tmp_path: Path) -> None:
    train, _ = _loaders()
    trainer = _trainer(tmp_path, [PostHocCalibration()], max_epochs=1, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="found no val dataloader"):
        trainer.fit(_Net(), train)


def test_calibration_monitor_logs_metrics_and_diagram(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    train, val = _loaders()
    model = _Net()
    monitor = CalibrationMonitor(metrics=("ece", "mce", "ace", "classwise_ece", "ks", "nll", "brier"), num_classes=3)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [monitor], max_epochs=2, logger=logger)
    trainer.fit(model, train, val)
    logits, y = _logits(model, val.dataset), val.dataset.tensors[1]  # type: ignore[attr-defined]
    m = trainer.callback_metrics
    assert float(m["calibration/ece"]) == pytest.approx(
        float(expected_calibration_error(logits, y, 15, input_type="logits")), abs=1e-5
    )
    assert float(m["calibration/classwise_ece"]) == pytest.approx(
        float(classwise_calibration_error(logits, y, 15, input_type="logits")), abs=1e-5
    )
    assert float(m["calibration/nll"]) == pytest.approx(float(negative_log_likelihood(logits, y, "logits")), abs=1e-5)
    assert float(m["calibration/brier"]) == pytest.approx(float(brier_score(logits, y, "logits")), abs=1e-5)
    assert monitor.last_diagram is not None and monitor.last_diagram.name == "reliability_epoch1.png"
    assert monitor.last_diagram.stat().st_size > 1000
    assert len(list(monitor.last_diagram.parent.glob("*.png"))) == 2
    csv_text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "calibration/ece" in csv_text


def test_calibration_monitor_tensorboard_and_recompute(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")

    class NoOutput(_Net):
        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return None

    train, val = _loaders()
    model = NoOutput()
    monitor = CalibrationMonitor(metrics=("ece",), dirpath=tmp_path / "diagrams")
    trainer = _trainer(tmp_path, [monitor], max_epochs=1, logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(model, train, val)
    logits, y = _logits(model, val.dataset), val.dataset.tensors[1]  # type: ignore[attr-defined]
    expected = float(expected_calibration_error(logits, y, 15, input_type="logits"))
    assert float(trainer.callback_metrics["calibration/ece"]) == pytest.approx(expected, abs=1e-5)
    assert (tmp_path / "diagrams" / "reliability_epoch0.png").exists()
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_calibration_monitor_configuration_errors() -> None:
    with pytest.raises(ValueError, match="Unknown calibration metrics"):
        CalibrationMonitor(metrics=("ece", "auroc"))
    with pytest.raises(ValueError, match="needs `num_classes`"):
        CalibrationMonitor(metrics=("classwise_ece",))


# ----------------------------------------------------------------------------- DDP (2 CPU processes, gloo)


def _metrics_worker(rank: int, world_size: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    logits, target = 2 * torch.randn(1001, 4, generator=g), torch.randint(0, 4, (1001,), generator=g)
    metrics = {
        "ece": CalibrationError(10, input_type="logits"),
        "ece_mass": CalibrationError(10, binning="quantile", input_type="logits"),
        "classwise": ClasswiseCalibrationError(4, 10, input_type="logits"),
        "nll": NegativeLogLikelihood(input_type="logits"),
    }
    for m in metrics.values():
        m.update(logits[rank::world_size], target[rank::world_size])  # uneven shares: 501 and 500
    return {name: float(m.compute()) for name, m in metrics.items()}


@pytest.mark.ddp
def test_metrics_ddp_equal_single_process() -> None:
    results = run_distributed(_metrics_worker)
    g = torch.Generator().manual_seed(0)
    logits, target = 2 * torch.randn(1001, 4, generator=g), torch.randint(0, 4, (1001,), generator=g)
    expected = {
        "ece": float(expected_calibration_error(logits, target, 10, input_type="logits")),
        "ece_mass": float(expected_calibration_error(logits, target, 10, binning="quantile", input_type="logits")),
        "classwise": float(classwise_calibration_error(logits, target, 10, input_type="logits")),
        "nll": float(negative_log_likelihood(logits, target, "logits")),
    }
    assert results[0] == results[1]
    for name, value in expected.items():
        assert results[0][name] == pytest.approx(value, abs=1e-6), name


class _RecordingCalibration(PostHocCalibration):
    def __init__(self, out_dir: str) -> None:
        super().__init__("temperature")
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        super().on_fit_end(trainer, pl_module)
        torch.save(
            {"temperature": self.calibrator.temperature, "metrics": self.metrics, "world": dist.get_world_size()},  # type: ignore[attr-defined]
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )


@pytest.mark.ddp
def test_post_hoc_calibration_ddp_same_temperature_as_single_process(tmp_path: Path) -> None:
    train, val = _loaders()
    model = _Net()
    trainer = _trainer(
        tmp_path,
        [_RecordingCalibration(str(tmp_path))],
        max_epochs=2,
        strategy="ddp_spawn",
        devices=2,
    )
    trainer.fit(model, train, val)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["temperature"] == ranks[1]["temperature"]  # broadcast: identical on every rank
    assert ranks[0]["metrics"]["num_samples"] == 150  # all samples, no duplicates from padding
    # the single-process fit on the final weights (returned by ddp_spawn) over the whole validation set
    reference = TemperatureScaler().fit(_logits(model, val.dataset), val.dataset.tensors[1])  # type: ignore[attr-defined]
    assert ranks[0]["temperature"] == pytest.approx(reference.temperature, rel=1e-5)


def test_calibration_monitor_reads_the_named_submodule_without_a_second_forward(tmp_path: Path) -> None:
    calls = {"net": 0}

    class NoForward(_Net):
        forward = pl.LightningModule.forward  # type: ignore[assignment]

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return F.cross_entropy(self.lin(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            calls["net"] += 1
            self.log("val_loss", F.cross_entropy(self.lin(batch[0]), batch[1]))  # no logits returned

    train, val = _loaders()
    model = NoForward()
    monitor = CalibrationMonitor(metrics=("ece", "nll"), diagram=False, module="lin")
    trainer = _trainer(tmp_path, [monitor], max_epochs=1, num_sanity_val_steps=0)
    model.lin.register_forward_hook(lambda m, a, o: calls.__setitem__("lin", calls.get("lin", 0) + 1))
    trainer.fit(model, train, val)
    assert calls["lin"] == len(train) + calls["net"]  # one forward per validation batch: no recomputation
    with torch.no_grad():
        logits, y = model.lin(val.dataset.tensors[0]), val.dataset.tensors[1]  # type: ignore[attr-defined]
    expected = float(expected_calibration_error(logits, y, 15, input_type="logits"))
    assert float(trainer.callback_metrics["calibration/ece"]) == pytest.approx(expected, abs=1e-5)
    assert float(trainer.callback_metrics["calibration/nll"]) == pytest.approx(
        float(negative_log_likelihood(logits, y, "logits")), abs=1e-5
    )

"""PostHocCalibration and CalibrationMonitor under DDP and FSDP2 (ModelParallelStrategy + fully_shard), 2 CPU
processes: equal to one process on the same data, with unequal validation shares and the sampler's padding."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses.callbacks.calibration import CalibrationMonitor, PostHocCalibration
from lightning_losses.functional.calibration import brier_score, expected_calibration_error, negative_log_likelihood
from lightning_losses.nn.calibration import TemperatureScaler
from tests.helpers.data import three_class_data
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import cpu_trainer


class _Net(pl.LightningModule):
    """Validation returns nothing: the monitor reads the logits from the forward hook. BatchNorm buffers make
    DDP broadcast at every forward through the wrapper (a collective: the ranks must stay in step)."""

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        norm: nn.Module = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.3)


class _ShardedNet(_Net):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


_TRAIN, _VAL = three_class_data(64, 0), three_class_data(51, 1)  # 51 = 26 + 25: the sampler pads rank 1 with a repeat


def _fit(strategy: object, model: pl.LightningModule) -> tuple[PostHocCalibration, pl.Trainer]:
    calibration = PostHocCalibration("temperature")
    monitor = CalibrationMonitor(metrics=("ece", "nll", "brier"), diagram=False)
    trainer = cpu_trainer(devices=2, strategy=strategy, max_epochs=1, callbacks=[calibration, monitor])
    # validation batches of 25: shares of 26 and 25 samples read in 2 and 1 batches unless padded
    trainer.fit(model, DataLoader(_TRAIN, batch_size=16), DataLoader(_VAL, batch_size=25))
    return calibration, trainer


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def _worker(rank: int, world_size: int) -> dict[str, dict[str, object]]:
    # processes made outside Lightning (the gloo group exists): Lightning joins them instead of launching its own
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    from lightning.pytorch.strategies import ModelParallelStrategy

    results: dict[str, dict[str, object]] = {}
    for name, strategy, model in (
        ("ddp", "ddp", _Net()),
        ("fsdp2", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), _ShardedNet(batch_norm=False)),
    ):
        pl.seed_everything(0, verbose=False)
        calibration, trainer = _fit(strategy, model)
        results[name] = {
            "temperature": calibration.calibrator.temperature,  # type: ignore[attr-defined]
            "num_samples": calibration.metrics["num_samples"],
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("calibration/")},
            "state": _full_state(model),
            "batch_norm": name == "ddp",
        }
    return results


@pytest.mark.ddp
def test_post_hoc_calibration_and_monitor_under_ddp_and_fsdp2_equal_one_process() -> None:
    ranks = run_distributed(_worker)
    x, y = _VAL.tensors
    for name in ("ddp", "fsdp2"):
        r0, r1 = ranks[0][name], ranks[1][name]
        reference = _Net(batch_norm=bool(r0["batch_norm"]))
        reference.load_state_dict(r0["state"])  # type: ignore[arg-type]
        reference.eval()
        with torch.no_grad():
            logits = reference(x)
        expected_t = TemperatureScaler().fit(logits, y).temperature
        assert r0["num_samples"] == 51, name  # every sample once: the padding of the shares is dropped
        assert r0["temperature"] == r1["temperature"], name
        # the same optimum: float32 LBFGS stops anywhere in the flat bottom of the NLL, so compare the NLL there
        nll_at = {t: float(F.cross_entropy(logits.double() / t, y)) for t in (r0["temperature"], expected_t)}
        assert r0["temperature"] == pytest.approx(expected_t, rel=2e-3), name
        assert nll_at[r0["temperature"]] == pytest.approx(nll_at[expected_t], abs=1e-6), name
        logged = r0["logged"]
        expected = {
            "calibration/ece": float(expected_calibration_error(logits, y, 15, input_type="logits")),
            "calibration/nll": float(negative_log_likelihood(logits, y, "logits")),
            "calibration/brier": float(brier_score(logits, y, "logits")),
        }
        for key, value in expected.items():  # 51 samples, not 52 (the sampler's repeat is not counted)
            assert logged[key] == pytest.approx(value, abs=1e-5), (name, key)  # type: ignore[index]

"""Conformal prediction sets: scores against the official formulas, the finite-sample quantile, the coverage
guarantee over seeds, and the ConformalPrediction callback (fit, test metrics, predict sets, checkpoints, DDP)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.callbacks.conformal import ConformalPrediction
from lightning_losses.functional.calibration import (
    conformal_class_scores,
    conformal_quantile,
    conformal_scores,
    prediction_sets,
)
from lightning_losses.metrics.calibration import PredictionSetCoverage, PredictionSetSize
from tests.helpers.data import three_class_data
from tests.helpers.trainer import cpu_trainer

# ------------------------------------------------------------------------------ the official formulas (numpy)


def _official_sorted(probs: np.ndarray, lam: float, k_reg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """conformal_classification's ``sort_sum`` plus the RAPS mask: order, penalised sorted probs, their cumsum."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=1)
    mask = np.zeros((1, probs.shape[1]))
    mask[:, k_reg:] += lam
    return order, ordered + mask, np.cumsum(ordered + mask, axis=1)


def _official_score(probs: np.ndarray, y: np.ndarray, u: np.ndarray | None, lam: float, k_reg: int) -> np.ndarray:
    """``get_tau``: the cumulative mass up to y, or ``U * ordered[y] + cumsum[y - 1]`` when randomised."""
    order, ordered, cumsum = _official_sorted(probs, lam, k_reg)
    out = np.empty(len(y))
    for i in range(len(y)):
        r = int(np.where(order[i] == y[i])[0][0])
        if u is None:
            out[i] = cumsum[i, r]
        else:
            out[i] = u[i] * ordered[i, r] + (cumsum[i, r - 1] if r > 0 else 0.0)
    return out


def _problem(n: int, c: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, y


@pytest.mark.parametrize(("method", "lam"), [("aps", 0.0), ("raps", 0.05)])
@pytest.mark.parametrize("randomized", [False, True])
def test_scores_equal_the_official_formula(method: str, lam: float, randomized: bool) -> None:
    logits, y = _problem(200)
    p = logits.softmax(1)
    u = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) if randomized else None
    ours = conformal_scores(p, y, method, randomized, u, lam=lam, k_reg=2)  # type: ignore[arg-type]
    ref = _official_score(p.numpy(), y.numpy(), None if u is None else u.numpy(), lam if method == "raps" else 0, 2)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)


def test_thr_score_and_sets_are_the_probability_threshold() -> None:
    logits, y = _problem(100)
    p = logits.softmax(1)
    torch.testing.assert_close(conformal_scores(p, y, "thr"), 1 - p.gather(1, y[:, None]).squeeze(1))
    assert torch.equal(prediction_sets(p, 0.7, "thr"), p >= 0.3)


def test_nonrandomised_sets_are_the_official_ones_without_the_crossing_class() -> None:
    """The official ``gcq`` (non-randomised) adds the first class that crosses the threshold to our set."""
    logits, _ = _problem(300)
    p = logits.softmax(1)
    tau = 0.8
    _, _, cumsum = _official_sorted(p.numpy(), 0.0, 0)
    official_sizes = np.minimum((cumsum <= tau).sum(1) + 1, p.shape[1])
    ours = prediction_sets(p, tau, "aps", randomized=False).sum(1).numpy()
    np.testing.assert_array_equal(np.minimum(ours + 1, p.shape[1]), official_sizes)


def test_sets_are_prefixes_of_the_ranking_and_hold_y_exactly_when_its_score_is_below() -> None:
    logits, y = _problem(400)
    p = logits.softmax(1)
    u = torch.rand(400, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q = 0.85
    sets = prediction_sets(p, q, "raps", u=u, lam=0.02, k_reg=1)
    ranked = sets.gather(1, p.sort(dim=1, descending=True, stable=True).indices)
    assert bool((ranked[:, 1:] <= ranked[:, :-1]).all())  # a prefix of the ranking
    scores = conformal_scores(p, y, "raps", u=u, lam=0.02, k_reg=1)
    assert torch.equal(sets.gather(1, y[:, None]).squeeze(1), scores <= q)


def test_quantile_is_the_finite_sample_rank() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 9, 50, 201):
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        for alpha in (0.05, 0.1, 0.3):
            k = math.ceil((n + 1) * (1 - alpha))
            q = conformal_quantile(scores, alpha)
            if k > n:
                assert math.isinf(float(q))
            else:
                assert float(q) == float(np.quantile(scores.numpy(), k / n, method="inverted_cdf"))
                assert float(q) == float(scores.sort().values[k - 1])


@pytest.mark.parametrize(
    ("method", "randomized"), [("thr", False), ("aps", False), ("aps", True), ("raps", False), ("raps", True)]
)
def test_coverage_guarantee_over_seeds(method: str, randomized: bool) -> None:
    alpha, n_cal, n_test, seeds = 0.1, 400, 2000, 24
    coverages = []
    for seed in range(seeds):
        logits, y = _problem(n_cal + n_test, c=8, seed=100 + seed)
        g = torch.Generator().manual_seed(seed)
        scores = conformal_scores(logits[:n_cal], y[:n_cal], method, randomized, input_type="logits", generator=g,  # type: ignore[arg-type]
                                  lam=0.05, k_reg=2)  # fmt: skip
        q = conformal_quantile(scores, alpha)
        sets = prediction_sets(logits[n_cal:], q, method, randomized, input_type="logits", generator=g,  # type: ignore[arg-type]
                               lam=0.05, k_reg=2)  # fmt: skip
        coverages.append(float(sets.gather(1, y[n_cal:, None]).double().mean()))
    mean = float(np.mean(coverages))
    # seed noise of the mean: Beta-distributed coverage, sd ~ sqrt(alpha(1-alpha)/n_cal)/sqrt(seeds) ~ 0.003
    assert mean >= 1 - alpha - 0.01
    assert mean <= 1 - alpha + 1 / (n_cal + 1) + 0.01  # the upper bound for continuous scores


def test_conformal_bad_inputs() -> None:
    p, y = torch.full((4, 3), 1 / 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="`method`"):
        conformal_scores(p, y, "lac")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`alpha`"):
        conformal_quantile(torch.rand(5), 1.0)
    with pytest.raises(ValueError, match="`scores` is empty"):
        conformal_quantile(torch.empty(0), 0.1)
    with pytest.raises(ValueError, match="`scores` must be a 1-d floating-point tensor"):
        conformal_quantile(torch.rand(2, 2), 0.1)
    with pytest.raises(ValueError, match="`u` must be a floating-point tensor of shape"):
        conformal_scores(p, y, u=torch.rand(3))
    with pytest.raises(ValueError, match="randomized=False"):
        conformal_scores(p, y, randomized=False, u=torch.rand(4))
    with pytest.raises(ValueError, match="`threshold` is NaN"):
        prediction_sets(p, float("nan"))
    with pytest.raises(ValueError, match=r"shape \(N, C\) for prediction sets"):
        conformal_class_scores(torch.rand(4))
    with pytest.raises(ValueError, match="`lam`"):
        prediction_sets(p, 0.5, "raps", lam=-1.0)
    with pytest.raises(ValueError, match="`sets` must be a boolean"):
        PredictionSetCoverage().update(torch.ones(4, 3), y)
    with pytest.raises(ValueError, match="`target` must hold class indices"):
        PredictionSetCoverage().update(torch.ones(4, 3, dtype=torch.bool), y + 5)
    with pytest.raises(ValueError, match="`alpha`"):
        ConformalPrediction(alpha=0.0)
    with pytest.raises(ValueError, match="`method`"):
        ConformalPrediction(method="lac")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- the callback


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * self.lin(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self(batch[0])

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loaders() -> tuple[DataLoader, DataLoader, DataLoader]:
    return (
        DataLoader(three_class_data(200, 0), batch_size=32, shuffle=True),
        DataLoader(three_class_data(150, 1), batch_size=32),
        DataLoader(three_class_data(120, 2), batch_size=40),
    )


def _val_logits(model: pl.LightningModule, dataset: TensorDataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(dataset.tensors[0])


def test_callback_fits_on_validation_logs_test_coverage_and_predicts_sets(tmp_path: Path) -> None:
    train, val, test = _loaders()
    model = _Net()
    cb = ConformalPrediction(alpha=0.2, method="raps", lam=0.1, k_reg=1)
    trainer = cpu_trainer(tmp_path, callbacks=[cb], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    vy = val.dataset.tensors[1]  # type: ignore[attr-defined]
    scores = cb.calibration_scores(_val_logits(model, val.dataset), vy)  # type: ignore[arg-type]
    assert cb.threshold == pytest.approx(float(conformal_quantile(scores, 0.2)))
    assert cb.num_samples == 150
    results = trainer.test(model, test, verbose=False)[0]
    tx, ty = test.dataset.tensors  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(cb.seed + 1)
    expected = torch.cat([cb.prediction_sets(_val_logits(model, TensorDataset(tx[i : i + 40])), g)
                          for i in range(0, 120, 40)])  # fmt: skip
    coverage, size = PredictionSetCoverage(), PredictionSetSize()
    coverage.update(expected, ty)
    size.update(expected)
    assert results["conformal/coverage"] == pytest.approx(float(coverage.compute()))
    assert results["conformal/set_size"] == pytest.approx(float(size.compute()))
    trainer.predict(model, test)
    sets = torch.cat(cb.predicted_sets)
    assert sets.dtype == torch.bool and sets.shape == (120, 3)


def test_threshold_survives_test_from_checkpoint_in_a_fresh_trainer(tmp_path: Path) -> None:
    train, val, test = _loaders()
    model = _Net()
    cb = ConformalPrediction(alpha=0.1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    trainer = cpu_trainer(tmp_path, callbacks=[cb, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, train, val)
    assert cb.is_fitted and ckpt.best_model_path in cb.updated_checkpoints  # written during fit, then rewritten
    fresh = ConformalPrediction(alpha=0.1)
    fresh_trainer = cpu_trainer(tmp_path, callbacks=[fresh])
    fresh_trainer.test(_Net(), test, ckpt_path=ckpt.best_model_path, verbose=False)
    assert fresh.threshold == cb.threshold and fresh.num_samples == 150
    assert "coverage" in fresh.test_metrics
    with pytest.raises(ValueError, match="fitted with"):
        ConformalPrediction(alpha=0.1, method="thr").load_state_dict(cb.state_dict())


def test_crash_and_resume_keeps_the_fitted_threshold(tmp_path: Path) -> None:
    """A run resumed from a mid-training checkpoint refits at its end; a checkpoint of the same run written before
    the fit never unfits it."""
    train, val, _ = _loaders()
    torch.manual_seed(0)
    model = _Net()
    cb = ConformalPrediction(alpha=0.1, update_checkpoints=False)
    trainer = cpu_trainer(tmp_path, callbacks=[cb], max_epochs=1)
    trainer.fit(model, train, val)
    early = tmp_path / "early.ckpt"
    trainer.save_checkpoint(early)  # holds the fitted threshold (saved after fit)
    resumed_cb = ConformalPrediction(alpha=0.1, update_checkpoints=False)
    resumed = cpu_trainer(tmp_path, callbacks=[resumed_cb], max_epochs=2)
    resumed.fit(model, train, val, ckpt_path=early)
    vy = val.dataset.tensors[1]  # type: ignore[attr-defined]
    scores = resumed_cb.calibration_scores(_val_logits(model, val.dataset), vy)  # type: ignore[arg-type]
    assert resumed_cb.threshold == pytest.approx(float(conformal_quantile(scores, 0.1)))
    stale = resumed_cb.state_dict() | {"threshold": None}  # this run, before its fit
    with pytest.warns(UserWarning, match="keeping the threshold"):
        resumed_cb.load_state_dict(stale)
    assert resumed_cb.is_fitted


class _RecordingConformal(ConformalPrediction):
    def __init__(self, out_dir: str) -> None:
        super().__init__(alpha=0.1, method="aps", randomized=True)
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        super().on_fit_end(trainer, pl_module)
        torch.save({"threshold": self.threshold, "n": self.num_samples, "world": trainer.world_size},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))  # fmt: skip


@pytest.mark.ddp
def test_ddp_two_processes_fit_the_single_process_threshold(tmp_path: Path) -> None:
    train, val, _ = _loaders()
    model = _Net()
    trainer = cpu_trainer(tmp_path, callbacks=[_RecordingConformal(str(tmp_path))], max_epochs=1,
                          strategy="ddp_spawn", devices=2)  # fmt: skip
    trainer.fit(model, train, val)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["n"] == 150  # gathered, no padding duplicates
    assert ranks[0]["threshold"] == ranks[1]["threshold"]
    single = ConformalPrediction(alpha=0.1, method="aps", randomized=True)
    vy = val.dataset.tensors[1]  # type: ignore[attr-defined]
    reference = conformal_quantile(single.calibration_scores(_val_logits(model, val.dataset), vy), 0.1)  # type: ignore[arg-type]
    assert ranks[0]["threshold"] == pytest.approx(float(reference), abs=1e-6)


@pytest.mark.ddp
def test_ddp_test_coverage_and_set_size_equal_one_process_with_the_samplers_padding(tmp_path: Path) -> None:
    """121 test samples on 2 ranks: the distributed sampler pads rank 1 with a duplicate, which must not count."""
    train, val, _ = _loaders()
    torch.manual_seed(0)
    model = _Net()
    cb = ConformalPrediction(alpha=0.2, method="thr", update_checkpoints=False)
    cpu_trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model, train, val)
    test = DataLoader(three_class_data(121, 3), batch_size=16)
    single = cpu_trainer(tmp_path, callbacks=[cb]).test(model, test, verbose=False)[0]
    spawned = cpu_trainer(tmp_path, callbacks=[cb], strategy="ddp_spawn", devices=2)
    two = spawned.test(model, test, verbose=False)[0]
    tx, ty = test.dataset.tensors  # type: ignore[attr-defined]
    sets = cb.prediction_sets(_val_logits(model, TensorDataset(tx)))
    assert single["conformal/coverage"] == pytest.approx(float(sets[torch.arange(121), ty].float().mean()))
    assert two["conformal/coverage"] == pytest.approx(single["conformal/coverage"], abs=1e-6)
    assert two["conformal/set_size"] == pytest.approx(single["conformal/set_size"], abs=1e-6)
    assert two["conformal/set_size"] == pytest.approx(float(sets.sum(1).float().mean()), abs=1e-6)

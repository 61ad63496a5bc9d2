"""The deprecated Ray-task PBT engine: its explore / exploit functions on fake trial tables still work and warn,
``PopulationBasedTraining`` maps onto ``tune_population_based_training`` (Ray Tune, synchronous), replay, and
end-to-end runs through it (slow: Ray) proving that an exploiting trial restores its donor's checkpoint with its own
new hyperparameters in effect, optimizer learning rate included."""

from __future__ import annotations

import math
import random
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.tuning import common
from lightning_losses.tuning.pbt import (
    ExploitDecision,
    PBTResult,
    PopulationBasedTraining,
    SearchDimension,
    TrialRecord,
    pb2_explore,
    pbt_exploit,
    pbt_explore,
    pbt_quantiles,
    replay_schedule,
)
from tests.helpers import modules as helper_modules
from tests.helpers.modules import Smoothing, TinyData

SPACE = {"ls.amount": SearchDimension(0.0, 0.3), "lr": SearchDimension(1e-3, 1.0, log=True)}


def _table(scores, checkpoints=None):
    checkpoints = checkpoints or [f"c{i}.ckpt" for i in range(len(scores))]
    return [
        TrialRecord(i, {"ls.amount": 0.1 + 0.01 * i, "lr": 0.01 * (i + 1)}, s, c)
        for i, (s, c) in enumerate(zip(scores, checkpoints))
    ]


# ------------------------------------------------------------------------------------------ fake tables
@pytest.mark.parametrize(
    ("mode", "fraction", "bottom", "top"),
    [
        ("max", 0.25, [4, 0], [7, 2]),
        ("min", 0.25, [2, 7], [0, 4]),
        ("max", 0.5, [4, 0, 6, 3], [1, 5, 7, 2]),
        ("max", 0.1, [4], [2]),  # ceil(0.8) = 1
    ],
)
def test_quantiles_on_a_fake_table(mode, fraction, bottom, top):
    scores = [0.2, 0.6, 0.9, 0.4, 0.1, 0.7, 0.3, 0.8]
    assert pbt_quantiles(_table(scores), mode, fraction) == (bottom, top)


def test_unscored_trials_rank_last_and_small_populations():
    scores = [0.5, None, 0.9, float("nan")]
    bottom, top = pbt_quantiles(_table(scores), "max", 0.5)
    assert set(bottom) == {1, 3} and top == [0, 2]
    bottom, top = pbt_quantiles(_table(scores), "min", 0.5)
    assert set(bottom) == {1, 3} and top == [2, 0]
    assert pbt_quantiles(_table([0.3]), "max", 0.5) == ([], [])


def test_exploit_copies_top_donors_checkpoint_and_config_then_explores():
    scores = [0.2, 0.6, 0.9, 0.4, 0.1, 0.7, 0.3, 0.8]
    table = _table(scores)
    decisions = pbt_exploit(table, SPACE, "max", 0.25, random.Random(0), resample_probability=0.0)
    assert sorted(decisions) == [0, 4]
    for trial_id, d in decisions.items():
        assert d.trial_id == trial_id and d.donor in (2, 7)
        assert d.checkpoint == f"c{d.donor}.ckpt"
        donor_cfg = table[d.donor].config
        for name in SPACE:  # perturbed by exactly 1.2 or 0.8 (inside the bounds here)
            ratio = d.config[name] / donor_cfg[name]
            assert ratio == pytest.approx(1.2) or ratio == pytest.approx(0.8)


def test_donor_without_checkpoint_is_skipped():
    scores = [0.2, 0.6, 0.9, 0.4, 0.1, 0.7, 0.3, 0.8]
    ckpts = [f"c{i}.ckpt" for i in range(8)]
    ckpts[2] = None  # the best trial has never saved a checkpoint
    for seed in range(20):
        decisions = pbt_exploit(_table(scores, ckpts), SPACE, "max", 0.25, random.Random(seed))
        assert {d.donor for d in decisions.values()} == {7}
    no_ckpt = [None] * 8
    assert pbt_exploit(_table(scores, no_ckpt), SPACE, "max", 0.25, random.Random(0)) == {}


def test_explore_respects_bounds_log_scale_and_integers():
    space = {
        "a": SearchDimension(0.0, 1.0),
        "b": SearchDimension(1e-4, 1e-1, log=True),
        "n": SearchDimension(1, 5, integer=True),
    }
    rng = random.Random(0)
    config = {"a": 0.95, "b": 0.09, "n": 5.0, "other": 7.0}
    logs = []
    for _ in range(400):
        config = pbt_explore(config, space, rng, resample_probability=0.3)
        assert 0.0 <= config["a"] <= 1.0 and 1e-4 <= config["b"] <= 1e-1 and 1 <= config["n"] <= 5
        assert config["n"] == int(config["n"]) and config["other"] == 7.0
        logs.append(math.log10(config["b"]))
    resampled = [pbt_explore({}, space, rng, resample_probability=1.0)["b"] for _ in range(2000)]
    # log-uniform resampling: a quarter of the draws below 10^-3.25 (a quarter of the log range)
    assert sum(v < 10**-3.25 for v in resampled) / 2000 == pytest.approx(0.25, abs=0.04)
    clipped = pbt_explore({"a": 0.99}, {"a": SearchDimension(0.0, 1.0)}, random.Random(1), 0.0, (1.2, 1.2))
    assert clipped["a"] == 1.0


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SearchDimension(1.0, 1.0), "low < high"),
        (lambda: SearchDimension(0.0, 1.0, log=True), "low > 0"),
        (lambda: pbt_quantiles(_table([1, 2]), "maximum", 0.25), "mode"),
        (lambda: pbt_quantiles(_table([1, 2]), "max", 0.75), "quantile_fraction"),
        (lambda: pbt_explore({}, SPACE, random.Random(0), resample_probability=2.0), "resample_probability"),
        (lambda: PopulationBasedTraining(_module, _datamodule, {}), "search space is empty"),
        (lambda: PopulationBasedTraining(_module, _datamodule, SPACE, population_size=1), "population_size"),
        (lambda: PopulationBasedTraining(_module, _datamodule, SPACE, resources={"tpu": 1}), "resources"),
        (lambda: replay_schedule([]), "empty"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# ------------------------------------------------------------------------------------------ deprecations
def test_every_engine_name_warns_and_points_to_the_ray_tune_entry_point():
    calls = {
        "pbt_quantiles": lambda: pbt_quantiles(_table([0.1, 0.2]), "max", 0.5),
        "pbt_explore": lambda: pbt_explore({"lr": 0.1}, SPACE, random.Random(0)),
        "pb2_explore": lambda: pb2_explore([], SPACE, now=1.0, rng=random.Random(0)),
        "TrialRecord": lambda: TrialRecord(0, {}, 0.1, None),
        "ExploitDecision": lambda: ExploitDecision(0, 1, "c.ckpt", {}),
    }
    for name, call in calls.items():
        with pytest.warns(
            DeprecationWarning, match=rf"tuning\.pbt\.{name}` is deprecated.*tune_population_based_training"
        ):
            call()
    table = _table([0.2, 0.9])
    with pytest.warns(DeprecationWarning, match="pbt_exploit") as caught:
        pbt_exploit(table, SPACE, "max", 0.5, random.Random(0))
    assert len(caught) == 1  # one warning per call, not one per helper it uses
    with pytest.warns(DeprecationWarning, match=r"space -> search_space, generations -> max_epochs"):
        PopulationBasedTraining(_module, _datamodule, SPACE)


def test_the_shared_parts_stay_importable_from_the_old_module_without_warning():
    import warnings

    from lightning_losses import tuning
    from lightning_losses.tuning import pbt, ray_tune

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("SearchDimension", "ApplyHyperparameters", "PBTResult", "replay_schedule", "segment_trainer"):
            assert getattr(pbt, name) is getattr(common, name)
        for name in ("SearchDimension", "ClipToBounds", "ApplyHyperparameters", "PBTResult", "replay_schedule"):
            assert getattr(tuning, name) is getattr(common, name)
        assert ray_tune.ClipToBounds is common.ClipToBounds
        assert tuning.tune_population_based_training is ray_tune.tune_population_based_training


def test_population_based_training_runs_on_ray_tune_with_the_mapped_names(monkeypatch, tmp_path):
    from lightning_losses.tuning import ray_tune

    seen = {}

    def fake_tune(module_factory, datamodule_factory, **kwargs):
        seen.update(kwargs, factories=(module_factory, datamodule_factory))
        rows = [{"epoch": e, "trial": t} for t in (0, 1) for e in (1, 2, 3, 4)]
        return PBTResult(0, 0.5, {"lr": 0.1}, None, {0: [(0, {"lr": 0.1})]}, rows)

    monkeypatch.setattr(ray_tune, "tune_population_based_training", fake_tune)
    pbt = PopulationBasedTraining(
        _module,
        _datamodule,
        SPACE,
        population_size=2,
        perturbation_interval=2,
        generations=2,
        explore="pb2",
        resources={"cpu": 2},
        perturbation_factors=(1.5, 0.5),
        storage_path=tmp_path,
        ray_address="auto",  # a cluster: nothing is started here
        seed=3,
    )
    result = pbt.fit()
    assert seen["factories"] == (_module, _datamodule)
    assert seen["search_space"] == SPACE and seen["max_epochs"] == 4 and seen["scheduler"] == "pb2"
    assert seen["synch"] is True and seen["resources_per_trial"] == {"cpu": 2} and seen["seed"] == 3
    assert seen["perturbation_factors"] == (1.5, 0.5) and seen["ray_address"] == "auto"
    # one row per trial and generation, as the old engine's table had: the generation's last epoch
    assert [(r["trial"], r["epoch"]) for r in result.table] == [(0, 2), (0, 4), (1, 2), (1, 4)]


def test_sequential_population_starts_a_local_ray_sized_to_one_trial(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from lightning_losses.tuning import ray_tune

    events = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: events.append(("init", kw["num_cpus"], kw["num_gpus"])))
    monkeypatch.setattr(ray, "shutdown", lambda: events.append(("shutdown",)))

    def fake_tune(*args, **kwargs):
        events.append(("tune", kwargs["resources_per_trial"]))
        return PBTResult(None, math.nan, {}, None, {}, [])

    monkeypatch.setattr(ray_tune, "tune_population_based_training", fake_tune)
    PopulationBasedTraining(_module, _datamodule, SPACE, use_ray=False, storage_path=tmp_path).fit()
    assert events == [("init", 1, 0), ("tune", {"cpu": 1.0}), ("shutdown",)]


def test_replay_schedule_is_piecewise_constant_per_epoch():
    cb = replay_schedule([(0, {"ls.amount": 0.1, "lr": 0.1}), (2, {"ls.amount": 0.2, "lr": 0.08})])
    assert [cb.value_at(e) for e in (0, 1, 2, 3)] == [
        {"ls.amount": 0.1, "lr": 0.1},
        {"ls.amount": 0.1, "lr": 0.1},
        {"ls.amount": 0.2, "lr": 0.08},
        {"ls.amount": 0.2, "lr": 0.08},
    ]


# ------------------------------------------------------------------------------------------- end to end


class Tiny(HyperparameterMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.ls = Smoothing(0.05)
        # the weights a segment starts from, saved in its checkpoint: proves which checkpoint was restored
        self.register_buffer("start_fingerprint", torch.zeros(()))

    def on_train_start(self) -> None:
        self.start_fingerprint.fill_(float(self.net.weight.detach().sum()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.ls(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _module():
    return Tiny()


def _datamodule():
    return TinyData()


def _check_exploit(result, population):
    assert len(result.table) == 2 * population
    gen0 = {r["trial"]: r for r in result.table if r["generation"] == 0}
    gen1 = {r["trial"]: r for r in result.table if r["generation"] == 1}
    losers = [t for t, r in gen1.items() if r["donor"] is not None]
    assert losers, "the bottom quantile exploits a donor"
    for t in losers:
        row, donor = gen1[t], gen0[gen1[t]["donor"]]
        assert row["restored_from"] == donor["checkpoint"]  # the donor's checkpoint was copied
        assert row["config"] != donor["config"]  # and explored
        # what was in effect at the first step after restore: the new values, not the checkpoint's
        assert row["observed"]["lr"] == pytest.approx(row["config"]["lr"])
        assert row["observed"]["ls.amount"] == pytest.approx(row["config"]["ls.amount"], rel=1e-6)
        ckpt = torch.load(row["checkpoint"], weights_only=False)
        donor_ckpt = torch.load(donor["checkpoint"], weights_only=False)
        assert float(ckpt["state_dict"]["start_fingerprint"]) == pytest.approx(
            float(donor_ckpt["state_dict"]["net.weight"].sum()), rel=1e-6
        )
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(row["config"]["lr"])
        assert donor_ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(donor["config"]["lr"])
        assert result.schedules[t][0] == (0, donor["config"]) and result.schedules[t][1] == (1, row["config"])
    for t, row in gen1.items():
        if row["donor"] is None:  # the others continued from their own checkpoint
            assert row["restored_from"] == gen0[t]["checkpoint"]
            assert row["observed"]["lr"] == pytest.approx(row["config"]["lr"])
    assert result.best_checkpoint == gen1[result.best_trial]["checkpoint"]
    assert result.best_score == max(r["score"] for r in gen1.values())


@pytest.fixture
def workers_see_this_module():
    ray = pytest.importorskip("ray")
    for module in (sys.modules[__name__], helper_modules):  # the test modules are not importable by workers
        ray.cloudpickle.register_pickle_by_value(module)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def _pbt(tmp_path, use_ray, population=2):
    configs = [{"ls.amount": 0.05 + 0.1 * i, "lr": 0.05 * (i + 1)} for i in range(population)]
    return PopulationBasedTraining(
        _module,
        _datamodule,
        SPACE,
        population_size=population,
        metric="val_acc",
        mode="max",
        generations=2,
        quantile_fraction=0.5,
        resample_probability=0.0,
        initial_configs=configs,
        storage_path=tmp_path,
        trainer_kwargs={"accelerator": "cpu", "num_sanity_val_steps": 0},
        use_ray=use_ray,
        seed=0,
    )


@pytest.mark.slow  # Ray's start-up and 3 trials of 2 epochs, one at a time
def test_pbt_in_sequence_exploits_with_new_hyperparameters_after_restore(tmp_path, workers_see_this_module):
    result = _pbt(tmp_path, use_ray=False, population=3).fit()
    _check_exploit(result, 3)
    # the discovered schedule replays in one plain run through HyperparameterSchedule
    model = Tiny()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[replay_schedule(result.schedules[result.best_trial])],
    )
    trainer.fit(model, datamodule=TinyData())
    last = result.schedules[result.best_trial][-1][1]
    assert float(model.ls.amount) == pytest.approx(last["ls.amount"], rel=1e-6)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(last["lr"])


@pytest.mark.slow  # Ray's start-up
def test_missing_metric_names_the_logged_ones(tmp_path, workers_see_this_module):
    pbt = _pbt(tmp_path, use_ray=False)
    pbt.metric = "val_loss"
    with pytest.raises(KeyError, match="val_acc"):
        pbt.fit()


@pytest.mark.slow  # Ray's start-up and 2 trials of 2 epochs
def test_pbt_on_local_ray(tmp_path, workers_see_this_module):
    workers_see_this_module.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    result = _pbt(tmp_path, use_ray=True).fit()
    _check_exploit(result, 2)


# ------------------------------------------------------------------------------------------------- PB2
def test_pb2_starts_uniform_then_follows_the_improvement_surface():
    space = {"x": SearchDimension(0.0, 1.0), "lr": SearchDimension(1e-3, 1e-1, log=True)}
    rng = random.Random(0)
    first = pb2_explore([], space, now=1.0, rng=rng)
    assert 0 <= first["x"] <= 1 and 1e-3 <= first["lr"] <= 1e-1
    # improvement peaks at x = 0.7 whatever lr and time: the GP's UCB maximiser lands near it
    observations = []
    for t in range(1, 6):
        for _ in range(8):
            x, lr = rng.uniform(0, 1), 10 ** rng.uniform(-3, -1)
            observations.append((float(t), {"x": x, "lr": lr}, -((x - 0.7) ** 2)))
    proposals = [pb2_explore(observations, space, now=6.0, rng=random.Random(s), kappa=0.1) for s in range(3)]
    for p in proposals:
        assert abs(p["x"] - 0.7) < 0.15
        assert 1e-3 <= p["lr"] <= 1e-1


@pytest.mark.slow  # Ray's start-up and 3 trials of 4 epochs, one at a time
def test_pbt_with_pb2_explore_runs_in_sequence(tmp_path, workers_see_this_module):
    pbt = _pbt(tmp_path, use_ray=False, population=3)
    pbt.generations, pbt.explore = 4, "pb2"
    result = pbt.fit()
    assert len(result.table) == 12
    for row in result.table:
        assert 0.0 <= row["config"]["ls.amount"] <= 0.3 and 1e-3 <= row["config"]["lr"] <= 1.0
        assert row["observed"]["lr"] == pytest.approx(row["config"]["lr"])
    with pytest.raises(ValueError, match="explore"):
        PopulationBasedTraining(_module, _datamodule, SPACE, explore="bayes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- the tune job
def _job_args(tmp_path, *extra):
    return [
        "tune",
        "--epochs",
        "1",
        "--teacher-epochs",
        "1",
        "--train-subset",
        "256",
        "--output",
        str(tmp_path),
        *extra,
    ]


@pytest.mark.slow
def test_tune_job_smoke_pbt_and_stn_without_ray(tmp_path):
    from lightning_losses.cli import main

    assert main(_job_args(tmp_path, "--methods", "pbt,stn", "--population", "2", "--no-ray")) == 0
    text = (tmp_path / "tune.md").read_text()
    assert "PBT (population 2, sequential)" in text and "STN (hyper-layers)" in text
    assert (tmp_path / "tune_schedules.png").stat().st_size > 0


@pytest.mark.slow
def test_tune_job_quick_all_methods_on_ray(tmp_path):
    from lightning_losses.cli import main

    assert main(["tune", "--quick", "--output", str(tmp_path)]) == 0
    text = (tmp_path / "tune_quick.md").read_text()
    for label in ("fixed (T=4, α=0.9)", "grid (4 runs", "PBT (population 4, Ray local)", "STN (hyper-layers)"):
        assert label in text

"""PBT on Ray Tune: the clipping explore function, argument checks, and one end-to-end run of 2 trials proving that
the worse trial exploits the better one's checkpoint (its step counter continues), with the perturbed loss
hyperparameter and learning rate in effect after restore."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.tuning.common import SearchDimension
from lightning_losses.tuning.ray_tune import ClipToBounds, tune_population_based_training
from tests.helpers import modules as helper_modules
from tests.helpers.modules import Smoothing, TinyData

SPACE = {"ls.amount": SearchDimension(0.0, 0.3), "lr": SearchDimension(1e-3, 1.0, log=True)}


# ------------------------------------------------------------------------------------------ explore / clip
def test_clip_to_bounds_after_ray_perturbation():
    space = {"a": SearchDimension(0.0, 1.0), "n": SearchDimension(1, 5, integer=True)}
    clip = ClipToBounds(space)
    assert clip({"a": 1.2, "n": 5.6, "other": 9.0}) == {"a": 1.0, "n": 5.0, "other": 9.0}
    assert clip({"a": -0.1, "n": 0.2}) == {"a": 0.0, "n": 1.0}
    assert clip({"a": 0.5}) == {"a": 0.5}  # inside: unchanged; missing names are left missing


def test_ray_explore_then_clip_stays_in_bounds():
    schedulers = pytest.importorskip("ray.tune.schedulers.pbt")
    tune = pytest.importorskip("ray.tune")
    random.seed(0)
    mutations = {"a": tune.uniform(0.0, 1.0)}
    config = {"a": 0.95}
    unclipped = []
    for _ in range(200):  # Ray's own explore, then our custom_explore_fn
        raw = schedulers._explore(config, mutations, 0.25, (1.2, 0.8), None)[0]
        unclipped.append(raw["a"])
        config = schedulers._explore(config, mutations, 0.25, (1.2, 0.8), ClipToBounds({"a": SearchDimension(0, 1)}))[0]
        assert 0.0 <= config["a"] <= 1.0
    assert max(unclipped) > 1.0  # Ray alone leaves the bounds: the clipping is needed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"search_space": {}}, "search space is empty"),
        ({"population_size": 1}, "population_size"),
        ({"mode": "maximum"}, "mode"),
        ({"quantile_fraction": 0.75}, "quantile_fraction"),
        ({"scheduler": "asha"}, "scheduler"),
        ({"resources_per_trial": {"tpu": 1}}, "resources_per_trial"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"perturbation_factors": (1.2, 0.0)}, "perturbation_factors"),
    ],
)
def test_bad_arguments(kwargs, match):
    options = dict(search_space=SPACE, metric="val_loss", mode="min")
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tune_population_based_training(_module, _datamodule, **options)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- the library's own record
def _report(trial_id, report, epoch, score, donor="none", restored_epoch=0, lineage=None):
    metrics = {
        "val_loss": score,
        "epoch": epoch,
        "global_step": 3 * epoch,
        "start_step": 3 * restored_epoch,
        "restored_epoch": restored_epoch,
        "donor": donor,
        "hp/ls.amount": 0.1 * (report + 1),
        "observed/ls.amount": 0.1 * (report + 1),
    }
    lineage = lineage or [[0, {"ls.amount": 0.1}]]
    return {"trial_id": trial_id, "report": report, "time": float(report), "metrics": metrics, "lineage": lineage}


def _checkpoint(trial_dir, name, trial_id, report):
    folder = trial_dir / name
    folder.mkdir(parents=True)
    (folder / "model.ckpt").write_bytes(b"")
    (folder / "lineage.json").write_text(json.dumps({"trial_id": trial_id, "report": report, "epoch": report + 1}))
    return folder


def test_table_holds_every_recorded_report_and_the_best_trial_is_judged_by_its_last_report(tmp_path):
    from lightning_losses.tuning.ray_tune import _result_from_records

    # mode "min": trial b's best-looking row (epoch 2, loss 0.1) is not its last one: after exploiting trial a's
    # epoch-1 checkpoint it reported epoch 2 again, with loss 0.6, worse than a's last (0.3)
    reports = {
        "a": [_report("a", 0, 1, 0.5), _report("a", 1, 2, 0.4), _report("a", 2, 3, 0.3)],
        "b": [
            _report("b", 0, 1, 0.7),
            _report("b", 1, 2, 0.1),
            _report("b", 2, 2, 0.6, donor="a", restored_epoch=1, lineage=[[0, {"ls.amount": 0.1}], [1, {"x": 2.0}]]),
        ],
        "c": [],
    }
    reports["b"] = [reports["b"][2], reports["b"][0], reports["b"][1]]  # any order on disk: sorted by report index
    dirs = {"a": tmp_path / "trial_a", "b": tmp_path / "trial_b", "c": None}
    _checkpoint(dirs["a"], "checkpoint_000000", "a", 0)
    newest = _checkpoint(dirs["a"], "checkpoint_000002", "a", 2)
    _checkpoint(dirs["a"], "checkpoint_000009", "b", 7)  # another trial's checkpoint is never a's own
    with pytest.warns(UserWarning, match=r"1 of 3 trial\(s\) left no report \(c\)"):
        result = _result_from_records(["a", "b", "c"], reports, dirs, "val_loss", "min")
    assert len(result.table) == 6
    assert {(r["trial"], r["report"]) for r in result.table} == {(t, k) for t in (0, 1) for k in range(3)}
    assert [r["report"] for r in result.table if r["trial"] == 1] == [0, 1, 2]
    exploited = result.table[-1]
    assert exploited["donor"] == 0 and exploited["restored_epoch"] == 1 and exploited["start_step"] == 3
    assert exploited["config"] == {"ls.amount": pytest.approx(0.3)} and exploited["metrics"]["val_loss"] == 0.6
    assert result.best_trial == 0 and result.best_score == 0.3
    assert result.best_config == {"ls.amount": pytest.approx(0.3)}
    assert result.best_checkpoint == f"{newest}/model.ckpt"
    assert result.schedules == {0: [(0, {"ls.amount": 0.1})], 1: [(0, {"ls.amount": 0.1}), (1, {"x": 2.0})]}


def test_an_empty_or_partial_record_warns_and_never_crashes(tmp_path):
    from lightning_losses.tuning.ray_tune import _result_from_records

    with pytest.warns(UserWarning, match="No trial reported"):
        empty = _result_from_records([], {}, {}, "val_loss", "min")
    assert empty.best_trial is None and empty.best_checkpoint is None and empty.table == []
    with pytest.warns(UserWarning, match="left no report"), pytest.warns(UserWarning, match="No trial reported"):
        silent = _result_from_records(["a", "b"], {"a": [], "b": []}, {}, "val_loss", "max")
    assert silent.best_trial is None and math.isnan(silent.best_score)
    partial = {"a": [{"trial_id": "a", "report": 0, "metrics": {"val_loss": 0.2}}]}  # fields missing
    with pytest.warns(UserWarning, match="no checkpoint of its own"):
        result = _result_from_records(["a"], partial, {"a": tmp_path}, "val_loss", "min")
    assert result.best_trial == 0 and result.best_score == 0.2 and result.best_checkpoint is None
    assert result.table[0]["epoch"] == -1 and result.table[0]["config"] == {}


def test_reports_are_appended_to_the_record_and_collected_by_trial_directory(tmp_path):
    from lightning_losses.tuning.common import ApplyHyperparameters
    from lightning_losses.tuning.ray_tune import TuneReportCheckpoint, _collect, read_reports

    records = tmp_path / "records"
    for trial_id, scores in (("t0", [0.5, 0.4]), ("t1", [0.6])):
        apply = ApplyHyperparameters({"ls.amount": 0.1})
        for score in scores:  # a restarted trial keeps counting its reports
            cb = TuneReportCheckpoint(
                "val_loss", apply, [(0, {"ls.amount": 0.1})], trial_id, record=records / f"{trial_id}.jsonl"
            )
            cb._append({"val_loss": score, "epoch": cb.reports + 1})
    with open(records / "t1.jsonl", "a") as f:
        f.write('{"trial_id": "t1", "report": 1, "metr')  # a report cut short (the process was killed)
    with pytest.warns(UserWarning, match="not a complete JSON report"):
        assert [r["report"] for r in read_reports(records / "t1.jsonl")] == [0]
    _checkpoint(tmp_path / "exp" / "trial_t0", "checkpoint_000001", "t0", 1)

    class _Result:
        def __init__(self, path):
            self.path = str(path)

    grid = [_Result(tmp_path / "exp" / "trial_t0"), _Result(tmp_path / "exp" / "trial_t1")]
    with pytest.warns(UserWarning):
        result = _collect(grid, records, "val_loss", "min")
    assert [(r["trial_id"], r["report"], r["score"]) for r in result.table] == [
        ("t0", 0, 0.5),
        ("t0", 1, 0.4),
        ("t1", 0, 0.6),
    ]
    assert result.best_trial == 0 and result.best_checkpoint.endswith("trial_t0/checkpoint_000001/model.ckpt")


def test_rows_name_the_checkpoints_written_and_restored_and_their_generation(tmp_path):
    from lightning_losses.tuning.ray_tune import _result_from_records

    reports = {
        "a": [_report("a", 0, 1, 0.3), _report("a", 1, 2, 0.2)],
        "b": [_report("b", 0, 1, 0.9), _report("b", 1, 2, 0.4, donor="a", restored_epoch=1)],
    }
    reports["a"][1]["restored_from"] = {"trial_id": "a", "report": 0}  # resumed from its own checkpoint
    reports["b"][1]["restored_from"] = {"trial_id": "a", "report": 0}  # exploited a's
    reports["b"][0]["restored_from"] = None
    dirs = {"a": tmp_path / "trial_a", "b": tmp_path / "trial_b"}
    a0 = _checkpoint(dirs["a"], "checkpoint_000000", "a", 0)
    a1 = _checkpoint(dirs["a"], "checkpoint_000001", "a", 1)
    b1 = _checkpoint(dirs["b"], "checkpoint_000001", "b", 1)  # b's first report left no checkpoint on disk
    result = _result_from_records(["a", "b"], reports, dirs, "val_loss", "min", perturbation_interval=2)
    rows = {(r["trial_id"], r["report"]): r for r in result.table}
    assert rows["a", 0]["checkpoint"] == f"{a0}/model.ckpt" and rows["a", 0]["restored_from"] is None
    assert rows["a", 1]["checkpoint"] == f"{a1}/model.ckpt" and rows["a", 1]["restored_from"] == f"{a0}/model.ckpt"
    assert rows["b", 0]["checkpoint"] is None
    assert rows["b", 1]["checkpoint"] == f"{b1}/model.ckpt" and rows["b", 1]["restored_from"] == f"{a0}/model.ckpt"
    assert {r["generation"] for r in result.table} == {0}  # epochs 1 and 2 end in the first interval of 2
    spread = _result_from_records(["a", "b"], reports, dirs, "val_loss", "min", perturbation_interval=1)
    assert sorted((r["epoch"], r["generation"]) for r in spread.table) == [(1, 0), (1, 0), (2, 1), (2, 1)]


def test_the_record_names_the_restored_checkpoint(tmp_path):
    from lightning_losses.tuning.common import ApplyHyperparameters
    from lightning_losses.tuning.ray_tune import TuneReportCheckpoint, read_reports

    record = tmp_path / "t1.jsonl"
    cb = TuneReportCheckpoint(
        "val_loss", ApplyHyperparameters({}), [(0, {})], "t1", "t0", 1, record, restored=("t0", 3)
    )
    cb._append({"val_loss": 0.1})
    TuneReportCheckpoint("val_loss", ApplyHyperparameters({}), [(0, {})], "t1", record=record)._append({})
    assert [r["restored_from"] for r in read_reports(record)] == [{"trial_id": "t0", "report": 3}, None]


def test_a_failed_trial_raises_its_own_error():
    from lightning_losses.tuning.ray_tune import _trial_error

    class TaskError(Exception):  # how Ray wraps the trial's exception
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    error = _trial_error([TaskError(KeyError("The metric 'val_acc' was not logged")), TaskError(ValueError())], 4)
    assert isinstance(error, KeyError) and "val_acc" in str(error)
    assert any("2 of 4 trial(s) failed" in note for note in getattr(error, "__notes__", []))
    ray_internal = type("TuneError", (Exception,), {"__module__": "ray.tune.error"})("the controller died")
    wrapped = _trial_error([ray_internal], 2)
    assert isinstance(wrapped, RuntimeError) and "the controller died" in str(wrapped)


# ------------------------------------------------------------------------------------------- end to end


class Tiny(HyperparameterMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.ls = Smoothing(0.05)
        self.register_buffer("steps", torch.zeros(()))  # checkpointed counter: proves which checkpoint was restored

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return self.ls(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))
        self.log("steps", self.steps.clone())
        self.log("amount_now", self.ls.amount.clone())
        self.log("lr_now", self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _module():
    return Tiny()


def _datamodule():
    return TinyData()


@pytest.mark.slow  # ~40 s: Ray's start-up and two trials of two epochs
def test_pbt_on_ray_tune_exploits_donor_checkpoint_with_new_hyperparameters(tmp_path):
    ray = pytest.importorskip("ray")
    for module in (sys.modules[__name__], helper_modules):  # the test modules are not importable by workers
        ray.cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # trial 0 learns (lr 0.5), trial 1 barely moves (lr 0.001): trial 1 must exploit trial 0 after epoch 1
        result = tune_population_based_training(
            _module,
            _datamodule,
            SPACE,
            metric="val_loss",
            mode="min",
            population_size=2,
            perturbation_interval=1,
            max_epochs=2,  # one exploit decision (after epoch 1): roles cannot swap at a later one
            quantile_fraction=0.5,
            resample_probability=0.0,
            initial_configs=[{"ls.amount": 0.05, "lr": 0.5}, {"ls.amount": 0.25, "lr": 0.001}],
            storage_path=tmp_path,
            trainer_kwargs={"accelerator": "cpu", "num_sanity_val_steps": 0},
            synch=True,
        )
    finally:
        ray.shutdown()
    rows = result.table
    # every report is in the table: population x epochs (synchronous PBT: each trial reports each epoch once)
    assert len(rows) == 2 * 2, rows
    assert sorted((r["trial"], r["epoch"]) for r in rows) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert sorted((r["trial"], r["report"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    by_trial = {t: sorted((r for r in rows if r["trial"] == t), key=lambda r: r["epoch"]) for t in (0, 1)}
    first = {t: by_trial[t][0] for t in (0, 1)}
    good = 0 if first[0]["score"] < first[1]["score"] else 1
    bad = 1 - good
    assert first[good]["config"] == pytest.approx({"ls.amount": 0.05, "lr": 0.5})
    exploited = [r for r in by_trial[bad] if r["donor"] == good]
    assert exploited, f"the worse trial never exploited the better one: {rows}"
    row = exploited[0]
    donor_row = next(r for r in by_trial[good] if r["epoch"] == row["restored_epoch"])
    # restored from the donor's checkpoint: the step counters continue from the donor's
    assert row["start_step"] == donor_row["global_step"] and row["epoch"] == row["restored_epoch"] + 1
    steps_per_epoch = 3
    assert row["global_step"] == donor_row["global_step"] + steps_per_epoch
    assert row["metrics"]["steps"] == donor_row["metrics"]["steps"] + steps_per_epoch  # the module's own buffer too
    # explored: the donor's values times 1.2 or 0.8, clipped to the bounds
    for name, dim in SPACE.items():
        candidates = [dim.clip(donor_row["config"][name] * f) for f in (1.2, 0.8)]
        assert any(row["config"][name] == pytest.approx(c) for c in candidates)
        assert row["config"][name] != pytest.approx(donor_row["config"][name])
    # in effect after restore, not the checkpoint's values: read back in training and in validation
    assert row["observed"]["lr"] == pytest.approx(row["config"]["lr"])
    assert row["observed"]["ls.amount"] == pytest.approx(row["config"]["ls.amount"], rel=1e-6)
    assert row["metrics"]["lr_now"] == pytest.approx(row["config"]["lr"])
    assert row["metrics"]["amount_now"] == pytest.approx(row["config"]["ls.amount"], rel=1e-6)
    # the discovered schedule: the donor's lineage then the explored config from the restored epoch on
    # (a later exploit replaces the lineage by the donor's again: the schedule is the one of the final weights)
    last = max(exploited, key=lambda r: r["restored_epoch"])
    assert all(r["donor"] is None for r in by_trial[good])  # the better trial kept its own lineage
    assert result.schedules[good] == [(0, pytest.approx(first[good]["config"]))]
    assert result.schedules[bad] == [
        (0, pytest.approx(first[good]["config"])),
        (last["restored_epoch"], pytest.approx(last["config"])),
    ]
    assert result.best_checkpoint is not None and result.best_checkpoint.endswith("model.ckpt")
    assert result.best_score == min(by_trial[t][-1]["score"] for t in (0, 1))
    assert result.best_trial == min((0, 1), key=lambda t: by_trial[t][-1]["score"])
    best_dir = f"trial_{by_trial[result.best_trial][-1]['trial_id']}"
    assert best_dir in {p.name for p in Path(result.best_checkpoint).parents}  # the best trial's own checkpoint


# ------------------------------------------------------------------------------------------------- PB2
def test_pb2_scheduler_gets_the_bounds_and_the_clipping_explore():
    pb2 = pytest.importorskip("ray.tune.schedulers.pb2")
    from lightning_losses.tuning.ray_tune import _make_scheduler

    sched = _make_scheduler("pb2", SPACE, "val_loss", "min", 2, 0.5, 0.25, False)
    assert isinstance(sched, pb2.PB2)
    assert sched._hyperparam_bounds == {"ls.amount": [0.0, 0.3], "lr": [1e-3, 1.0]}
    assert isinstance(sched._custom_explore_fn, ClipToBounds) and sched._time_attr == "epoch"
    pbt = _make_scheduler("pbt", SPACE, "val_loss", "min", 1, 0.25, 0.1, True)
    assert set(pbt._hyperparam_mutations) == set(SPACE) and pbt._resample_probability == 0.1 and pbt._synch
    assert tuple(pbt._perturbation_factors) == (1.2, 0.8)
    wide = _make_scheduler("pbt", SPACE, "val_loss", "min", 1, 0.25, 0.1, True, perturbation_factors=(1.5, 0.5))
    assert tuple(wide._perturbation_factors) == (1.5, 0.5)


def test_pb2_without_its_gaussian_process_package_names_it(monkeypatch):
    pb2 = pytest.importorskip("ray.tune.schedulers.pb2")
    from lightning_losses.tuning.ray_tune import _make_scheduler

    monkeypatch.setattr(pb2, "import_pb2_dependencies", lambda: None)
    with pytest.raises(ImportError, match=r"scikit-learn.*GPy"):
        _make_scheduler("pb2", SPACE, "val_loss", "min", 1, 0.25, 0.25, False)

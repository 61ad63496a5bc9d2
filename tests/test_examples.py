"""Every example under examples/: the script at quick settings and its LightningCLI config for a few steps."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lightning_losses.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FAMILIES = ("distillation", "temperature", "calibration", "schedules", "unlearning", "chunked", "llm")
SHAKESPEARE = ["--data.init_args.vocab_size", "512", "--model.init_args.model.init_args.vocab_size", "512"]


@pytest.fixture(scope="module")
def cache_dir() -> str:
    """The tokenizer and token-id cache the rest of the suite uses (a vocabulary is trained and the plays encoded
    once per machine; the files depend only on the vocabulary size)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return str(ROOT / "results" / "cache")


@pytest.fixture
def small_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``pl.Trainer`` the scripts build runs one epoch of at most 3 batches (the scripts' wiring, not their
    accuracy, is under test here; their quick settings run in full in the slow tests)."""
    import lightning.pytorch as pl

    class SmallTrainer(pl.Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(limit_train_batches=3, limit_val_batches=1, limit_test_batches=1, num_sanity_val_steps=0)
            kwargs["max_epochs"] = 1
            kwargs["max_steps"] = min(kwargs.get("max_steps") or 3, 3)
            kwargs.setdefault("enable_progress_bar", False)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", SmallTrainer)


def _script(family: str) -> ModuleType:
    path = EXAMPLES / family / "train.py"
    spec = importlib.util.spec_from_file_location(f"example_{family}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: str, *overrides: str) -> Any:
    """``lightning-losses lightning fit --config examples/<config>`` for a few steps; return the LightningCLI."""
    from lightning.pytorch.cli import LightningCLI

    built: list[LightningCLI] = []
    init = LightningCLI.__init__

    def record(self: LightningCLI, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(LightningCLI, "__init__", record)
    args = ["lightning", "fit", "--config", str(EXAMPLES / config), *overrides]
    args += ["--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    assert cli_main(args) == 0
    (cli,) = built
    return cli


def test_every_family_has_a_script_and_a_config():
    for family in FAMILIES:
        assert (EXAMPLES / family / "train.py").is_file() and (EXAMPLES / family / "config.yaml").is_file()
        text = (EXAMPLES / family / "train.py").read_text()
        assert "--quick" in text and "lightning_losses.jobs" not in text


# ---------------------------------------------------------------------------------------------- distillation
@pytest.mark.slow
def test_distillation_script_quick_teacher_beats_chance(tmp_path):
    pytest.importorskip("sklearn")
    result = _script("distillation").main(["--quick", "--output", str(tmp_path)])
    assert result["teacher_acc"] > 0.2 and 0.0 <= result["student_acc"] <= 1.0


def test_distillation_script_writes_the_teacher_the_config_loads(tmp_path, monkeypatch, small_trainer):
    pytest.importorskip("sklearn")
    result = _script("distillation").main(["--quick", "--output", str(tmp_path / "out")])
    assert 0.0 <= result["student_acc"] <= 1.0 and 0.0 <= result["teacher_acc"] <= 1.0
    monkeypatch.undo()  # the config runs with the real Trainer
    weights = tmp_path / "out" / "teacher.pt"
    cli = _fit(
        monkeypatch,
        tmp_path,
        "distillation/config.yaml",
        f"--model.init_args.teacher.init_args.weights={weights}",
        "--data=lightning_losses.data.DigitsDataModule",
        "--trainer.max_steps=2",
    )
    saved = torch.load(weights, weights_only=True)
    torch.testing.assert_close(cli.model.teacher.fc.weight, saved["fc.weight"])
    assert cli.model.method == "dkd" and cli.trainer.global_step == 2


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_script_temperature_scaling_lowers_the_validation_nll(small_trainer):
    pytest.importorskip("sklearn")
    result = _script("calibration").main(["--quick"])
    # temperature scaling minimises the validation NLL over T, and T = 1 (no change) is a candidate
    assert result["nll_after"] <= result["nll_before"] + 1e-6 and result["temperature"] > 0


def test_calibration_config_trains_mdca_and_fits_the_calibrator(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from lightning_losses import MDCALoss, PostHocCalibration

    cli = _fit(
        monkeypatch,
        tmp_path,
        "calibration/config.yaml",
        "--data=lightning_losses.data.DigitsDataModule",
        "--trainer.max_steps=3",
    )
    assert isinstance(cli.model.loss, MDCALoss)
    (posthoc,) = [c for c in cli.trainer.callbacks if isinstance(c, PostHocCalibration)]
    assert posthoc.calibrator.is_fitted and posthoc.metrics["num_samples"] > 0


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.slow
def test_schedules_script_quick_runs_the_whole_schedule():
    pytest.importorskip("sklearn")
    result = _script("schedules").main(["--quick"])
    assert result["steps"] == result["total_steps"] and result["gamma"] < 0.01


def test_schedules_script_values_follow_the_schedules(small_trainer):
    pytest.importorskip("sklearn")
    result = _script("schedules").main(["--quick"])
    # LinearSchedule(3, 0) and CosineSchedule(0.05, 0) over the planned steps, as set before the last step run
    last = (result["steps"] - 1) / result["total_steps"]
    assert result["gamma"] == pytest.approx(3.0 * (1 - last), abs=1e-5)
    assert result["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * last)), abs=1e-6)


def test_schedules_config_drives_the_focal_gamma(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from lightning_losses import HyperparameterSchedule

    cli = _fit(
        monkeypatch,
        tmp_path,
        "schedules/config.yaml",
        "--data=lightning_losses.data.DigitsDataModule",
        "--trainer.max_steps=4",
    )
    (schedule,) = [c for c in cli.trainer.callbacks if isinstance(c, HyperparameterSchedule)]
    gamma = float(cli.model.get_hyperparameter("loss.gamma"))
    assert gamma == pytest.approx(float(schedule.schedules["loss.gamma"](cli.trainer.global_step - 1)), abs=1e-6)
    assert gamma < 3.0


# ---------------------------------------------------------------------------------------------- temperature
def test_temperature_script_learns_a_bounded_temperature(cache_dir, small_trainer):
    result = _script("temperature").main(["--quick", "--max-steps", "3", "--cache-dir", cache_dir])
    assert 0.5 <= result["tau_min"] <= result["tau_mean"] <= result["tau_max"] <= 5.0
    assert math.isfinite(result["ppl"]) and math.isfinite(result["ppl_tempnet"])


def test_temperature_config_builds_a_tiny_gpt2_with_tempnet(tmp_path, monkeypatch, cache_dir):
    cli = _fit(
        monkeypatch,
        tmp_path,
        "temperature/config.yaml",
        *SHAKESPEARE,
        "--model.init_args.num_classes=512",
        "--model.init_args.rho=3.0",
        "--model.init_args.model.init_args.n_layer=1",
        "--data.init_args.plays=[The Tempest]",
        f"--data.init_args.cache_dir={cache_dir}",
        "--trainer.max_steps=2",
    )
    assert type(cli.model.model).__name__ == "TinyGPT2" and cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_aldr_kl_config_updates_lambda_of_the_samples_seen_only(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    cli = _fit(
        monkeypatch,
        tmp_path,
        "temperature/aldr_kl.yaml",
        "--data=lightning_losses.data.DigitsDataModule",
        "--data.init_args.batch_size=16",
        "--trainer.max_steps=2",
    )
    lambdas = cli.model.loss.lambdas
    changed = int((lambdas != 10.0).sum())
    assert 0 < changed <= 2 * 16  # two batches of 16 samples: only their λ may move


# ---------------------------------------------------------------------------------------------- chunked
def test_chunked_script_matches_the_plain_cross_entropy(cache_dir, small_trainer):
    result = _script("chunked").main(["--quick", "--cache-dir", cache_dir])
    assert result["chunked_loss"] == pytest.approx(result["plain_loss"], rel=1e-5)
    assert result["grad_error"] < 1e-5 and math.isfinite(result["val_ppl"])


def test_chunked_config_trains_with_the_chunked_loss(tmp_path, monkeypatch, cache_dir):
    from lightning_losses.demos import CausalLMModule

    calls: list[int] = []
    import lightning_losses.functional.chunked as chunked

    original = chunked.linear_cross_entropy
    monkeypatch.setattr(chunked, "linear_cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    cli = _fit(
        monkeypatch,
        tmp_path,
        "chunked/config.yaml",
        *SHAKESPEARE,
        "--data.init_args.plays=[The Tempest]",
        "--data.init_args.block_size=32",
        "--model.init_args.model.init_args.block_size=32",
        f"--data.init_args.cache_dir={cache_dir}",
        "--trainer.max_steps=2",
    )
    assert isinstance(cli.model, CausalLMModule) and cli.model.chunk_size == 256
    assert len(calls) == 2  # one chunked loss per training step, never the logits


# ---------------------------------------------------------------------------------------------- unlearning
@pytest.mark.slow
def test_unlearning_script_raises_the_forget_nll(tmp_path, cache_dir):
    pytest.importorskip("peft")
    result = _script("unlearning").main(["--quick", "--output", str(tmp_path), "--cache-dir", cache_dir])
    assert result["forget_nll_after"] > result["forget_nll_before"]
    assert (tmp_path / "original.pt").is_file()


def test_unlearning_config_saves_the_original_weights_first(tmp_path, monkeypatch, cache_dir):
    from lightning_losses.demos import TinyGPT2

    original = TinyGPT2(512, n_layer=1, n_embd=32, n_head=2, block_size=32, seed=3)
    weights = tmp_path / "original.pt"
    torch.save(original.state_dict(), weights)
    cli = _fit(
        monkeypatch,
        tmp_path,
        "unlearning/config.yaml",
        *SHAKESPEARE,
        "--model.init_args.model.init_args.n_layer=1",
        "--model.init_args.model.init_args.n_embd=32",
        "--model.init_args.model.init_args.n_head=2",
        "--model.init_args.model.init_args.block_size=32",
        f"--model.init_args.model.init_args.weights={weights}",
        "--data.init_args.block_size=32",
        "--data.init_args.max_forget_blocks=8",
        "--data.init_args.max_retain_blocks=8",
        "--data.init_args.max_eval_blocks=8",
        f"--data.init_args.cache_dir={cache_dir}",
        "--trainer.max_steps=1",
    )
    saved = torch.load(tmp_path / "original_weights.pt", weights_only=True)
    key = "transformer.h.0.mlp.c_fc.weight"
    saved_value = next(v for k, v in saved.items() if k.endswith(key))
    torch.testing.assert_close(saved_value, original.state_dict()[key])  # the weights before unlearning
    assert not torch.equal(cli.model.model.state_dict()[key], original.state_dict()[key])  # then unlearned


@pytest.mark.slow
def test_unlearning_script_runs_at_the_smallest_settings(tmp_path, cache_dir, monkeypatch, small_trainer):
    """The fast check of the unlearning script: its pieces wired together, a few batches each."""
    pytest.importorskip("peft")
    script = _script("unlearning")
    from lightning_losses.data import UnlearningDataModule

    monkeypatch.setattr(script, "UnlearningDataModule", _small(UnlearningDataModule))
    result = script.main(["--quick", "--output", str(tmp_path), "--cache-dir", cache_dir])
    assert all(math.isfinite(result[f"{s}_nll_{w}"]) for s in ("forget", "retain") for w in ("before", "after"))


def _small(cls: type) -> Any:
    def build(**kwargs: Any) -> Any:
        kwargs.update(max_forget_blocks=8, max_retain_blocks=8, max_eval_blocks=8)
        return cls(**kwargs)

    return build

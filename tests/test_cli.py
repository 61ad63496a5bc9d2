"""The `lightning-losses` command: lazily loaded subcommands, --version, `python -m`, LightningCLI pass-through."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from lightning_losses import DistillationModule
from lightning_losses.cli import SUBCOMMANDS, build_parser, main
from lightning_losses.demos import ConvNet

ROOT = Path(__file__).resolve().parents[1]


def test_every_subcommand_parses_its_quick_flag():
    parser = build_parser()
    for name in SUBCOMMANDS:
        args = parser.parse_args([name, "--quick"])
        assert args.command == name and args.quick


def test_unknown_subcommand_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_lightning_cli_trains_the_example_config(tmp_path, monkeypatch):
    """`lightning-losses lightning fit --config examples/distillation/config.yaml` builds the module with a trained
    teacher."""
    teacher = ConvNet(width=32)
    torch.nn.init.constant_(teacher.fc.bias, 0.25)
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    built: list[DistillationModule] = []
    monkeypatch.setattr(DistillationModule, "on_fit_start", lambda self: built.append(self))
    main(
        [
            "lightning",
            "fit",
            "--config",
            str(ROOT / "examples" / "distillation" / "config.yaml"),
            "--model.init_args.teacher.init_args.weights",
            str(weights),
            "--data",
            "lightning_losses.data.DigitsDataModule",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    (module,) = built
    assert module.method == "dkd" and module.get_hyperparameter("kd.beta").item() == 8.0
    torch.testing.assert_close(module.teacher.fc.bias, torch.full((10,), 0.25))


@pytest.fixture
def no_job_imported(monkeypatch):
    """The job modules removed from ``sys.modules`` for the test (restored afterwards)."""
    for name in list(sys.modules):
        if name.startswith("lightning_losses.jobs"):
            monkeypatch.delitem(sys.modules, name)


def _jobs_imported() -> list[str]:
    return sorted(m for m in sys.modules if m.startswith("lightning_losses.jobs."))


def test_help_and_other_subcommands_import_no_job(no_job_imported, capsys):
    """`--help` lists every subcommand without importing any job; parsing one subcommand imports only its job."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and _jobs_imported() == []
    out = capsys.readouterr().out
    assert all(name in out for name in ("lightning", *SUBCOMMANDS))
    build_parser().parse_args(["calibrate", "--quick"])
    assert _jobs_imported() == ["lightning_losses.jobs.calibrate", "lightning_losses.jobs.common"]


def test_subcommand_help_shows_the_job_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0 and "--teacher-epochs" in capsys.readouterr().out


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-losses {version('lightning-losses')}"


@pytest.mark.parametrize(("argv", "code", "expected"), [(["--version"], 0, "lightning-losses "), (["nope"], 2, "nope")])
def test_python_dash_m_runs_the_command(argv, code, expected, monkeypatch, capsys):
    """`python -m lightning_losses ...` (run as `-m` does, by runpy) is the `lightning-losses` command."""
    monkeypatch.setattr(sys, "argv", ["lightning_losses", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_losses", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == code
    captured = capsys.readouterr()
    assert expected in (captured.out + captured.err)

"""The `lightning-losses` command: subcommands registered, LightningCLI pass-through with the example config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_losses import DistillationModule
from lightning_losses.cli import SUBCOMMANDS, build_parser, main
from lightning_losses.jobs.common import ConvNet

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
    """`lightning-losses lightning fit --config examples/distill.yaml` builds the module with a trained teacher."""
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
            str(ROOT / "examples" / "distill.yaml"),
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

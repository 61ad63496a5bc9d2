"""The ``lightning-losses`` command: one subcommand per family, each running that family's main job.

``lightning-losses distill --quick`` trains a teacher and compares distillation methods on MNIST 5k, and so on.
Each subcommand lives in :mod:`lightning_losses.jobs` and is imported only when it is called.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("lightning_losses.jobs.distill", "knowledge distillation on MNIST 5k: CE, KD, DKD, DHKD, ND"),
    "tune": ("lightning_losses.jobs.tune", "KD temperature and weight tuned by a grid, PBT on Ray and STN on MNIST 5k"),
    "temperature": ("lightning_losses.jobs.temperature", "TempNet + DRO on Shakespeare, LDR/ALDR-KL on noisy MNIST 5k"),
    "calibrate": ("lightning_losses.jobs.calibrate", "post-hoc calibrators and calibration losses on MNIST 5k"),
    "unlearn": ("lightning_losses.jobs.unlearn", "forget a Shakespeare play: GA, GradDiff, NPO, SimNPO, FLAT via LoRA"),
}


LIGHTNING_HELP = (
    "LightningCLI over any LightningModule and DataModule (fit/validate/test/predict), "
    "e.g. `lightning-losses lightning fit --config examples/distill.yaml`"
)


def lightning_cli(args: Sequence[str]) -> int:
    """Run Lightning's own CLI with any LightningModule / LightningDataModule chosen by ``class_path``."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args),
        save_config_kwargs={"overwrite": True},
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="lightning-losses", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("lightning", help=LIGHTNING_HELP, add_help=False)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lightning"]:
        return lightning_cli(argv[1:])
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``lightning-losses`` command: one subcommand per family, each running that family's main job.

``lightning-losses distill --quick`` trains a teacher and compares distillation methods on MNIST 5k, and so on;
``lightning-losses lightning fit --config examples/distillation/config.yaml`` runs LightningCLI. Each subcommand
lives in :mod:`lightning_losses.jobs` and is imported only when it is called: ``lightning-losses --help`` and the
other subcommands never import it. ``python -m lightning_losses`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["LIGHTNING_HELP", "SUBCOMMANDS", "build_parser", "lightning_cli", "main"]

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
    "e.g. `lightning-losses lightning fit --config examples/distillation/config.yaml`"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-losses")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from lightning_losses import __version__

        return __version__


class _LazySubcommands(argparse._SubParsersAction):
    """Sub-parsers whose options are added by the job's ``add_arguments`` only when that subcommand is chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loaded: set[str] = set()

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        name = values[0] if values else None
        if name in SUBCOMMANDS and name not in self.loaded:
            importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(self.choices[name])
            self.loaded.add(name)
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: every subcommand is listed, and a job's module is imported once its subcommand is
    parsed (so ``--help`` and the other subcommands do not import it)."""
    parser = argparse.ArgumentParser(prog="lightning-losses", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.register("action", "lazy_parsers", _LazySubcommands)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action="lazy_parsers")
    sub.add_parser("lightning", help=LIGHTNING_HELP, add_help=False)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m lightning_losses``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lightning"]:
        return lightning_cli(argv[1:])
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

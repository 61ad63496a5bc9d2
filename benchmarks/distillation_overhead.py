"""Training-step overhead of ``DistillationMixin`` against the same KD written inline, and teacher-caching speed-up.

Both modules train the same student from the same initial weights on the same MNIST 5k batches with the same
teacher, loss (0.1·CE + 0.9·KD, T = 4) and optimizer. The runs are interleaved (A, B, A, B, ...) in one process so
that machine noise hits both alike; the table reports median step times and their ratio, then the per-epoch time
after the first epoch with and without caching teacher outputs by sample index.

Run: ``python benchmarks/distillation_overhead.py [--rounds 5] [--epochs 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_losses import DistillationMixin, DistillationModule, KDLoss
from lightning_losses.demos import ConvNet
from lightning_losses.demos import image_datamodule as pick_image_datamodule
from lightning_losses.jobs.common import ResultsTable, make_trainer

RESULTS = Path(__file__).resolve().parent / "results"


class InlineKD(pl.LightningModule):
    """KD as users write it by hand: the teacher an attribute frozen by hand."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        kd = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True)
        return 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * kd

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9)


class MixinKD(DistillationMixin, pl.LightningModule):
    """The same with the mixin and its helpers."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.student = student
        self.configure_distillation(teacher, loss=KDLoss(temperature=4.0, weight=0.9))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        s = self.student(x)
        return 0.1 * F.cross_entropy(s, y) + self.distillation_loss(s, self.teacher_forward(x, index=index))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self.epochs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append(time.perf_counter() - self._t)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._e = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self._e)


def _fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, epochs: int) -> StepTimer:
    timer = StepTimer()
    make_trainer(epochs, progress=False, callbacks=[timer]).fit(module, datamodule=datamodule)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule = pick_image_datamodule(args.data, batch_size=128)
    teacher = ConvNet(width=32).eval()
    init = ConvNet(width=8).state_dict()

    def student() -> ConvNet:
        net = ConvNet(width=8)
        net.load_state_dict(init)
        return net

    inline_steps: list[float] = []
    mixin_steps: list[float] = []
    for _ in range(args.rounds):
        inline_steps += _fit(InlineKD(student(), teacher), datamodule, args.epochs).steps[3:]
        mixin_steps += _fit(MixinKD(student(), teacher), datamodule, args.epochs).steps[3:]

    cached_epochs: list[float] = []
    plain_epochs: list[float] = []
    for _ in range(max(1, args.rounds // 2)):
        for cache, sink in ((False, plain_epochs), (True, cached_epochs)):
            module = DistillationModule(student(), teacher, "kd", cache_teacher_outputs=cache, scheduler="none")
            sink += _fit(module, datamodule, args.epochs + 1).epochs[1:]

    inline, mixin = statistics.median(inline_steps), statistics.median(mixin_steps)
    plain, cached = statistics.median(plain_epochs), statistics.median(cached_epochs)
    table = ResultsTable("Distillation overhead", ["measure", "baseline", "lightning-losses", "ratio", "target"])
    table.add(
        measure="median train step (ms), inline KD vs DistillationMixin",
        baseline=f"{1e3 * inline:.2f}",
        **{"lightning-losses": f"{1e3 * mixin:.2f}"},
        ratio=f"{mixin / inline:.3f}×",
        target="≤ 1.05×",
    )
    table.add(
        measure="epoch after the first (s), teacher every step vs cached by index",
        baseline=f"{plain:.2f}",
        **{"lightning-losses": f"{cached:.2f}"},
        ratio=f"{plain / cached:.2f}× faster",
        target="> 1×",
    )
    preamble = (
        f"Teacher ConvNet width 32, student width 8, batch 128, {type(datamodule).__name__}; "
        f"{args.rounds} interleaved rounds × {args.epochs} epochs ({len(inline_steps)} steps each side), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU."
    )
    print(preamble)
    print(table.markdown())
    table.write(RESULTS, "distillation_overhead", preamble)


if __name__ == "__main__":
    main()

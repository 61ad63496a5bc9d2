"""Overheads of the self-tuning family: ``HyperparameterSchedule`` and STN per training step, PBT trial throughput.

Step overhead: the same small CNN trains on the same MNIST 5k batches (label-smoothed cross-entropy with the
smoothing a named hyperparameter) as

* ``plain``: no callback;
* ``schedule``: with a ``HyperparameterSchedule`` driving three names per step (smoothing, dropout rate, lr);
* ``STN layers``: the CNN built from STN hyper-layers, condition fixed, no callback (the cost of the layers);
* ``STN``: the hyper-layer CNN with the ``SelfTuning`` callback (one hyper-step every 2 training steps).

The runs are interleaved (A, B, C, D, A, ...) in one process; the time of a step is the interval between two
consecutive batch starts (data, forward, backward, optimizer and every hook, hyper-steps included); the table gives
the median per case and its ratio to ``plain``.

PBT throughput: the same population (4 trials × 2 synchronous generations of one epoch each on a 700-image MNIST
subset) on Ray Tune's PopulationBasedTraining (``tune_population_based_training(..., synch=True)``), on a local Ray
of 1 CPU (one trial at a time) and of 2 CPUs (two trials at a time, one CPU each), with Ray's start-up timed apart.

Run: ``python benchmarks/tuning.py [--rounds 3] [--steps 40]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_losses.callbacks.schedules import CosineSchedule, HyperparameterSchedule, LinearSchedule, StepSchedule
from lightning_losses.callbacks.self_tuning import SelfTuning, TunedHyperparameter
from lightning_losses.data import MNIST5kDataModule
from lightning_losses.jobs.common import ResultsTable
from lightning_losses.losses.base import LossModule
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.nn.stn import HyperConv2d, HyperLinear, condition_hyper_layers

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 8


class Smoothing(LossModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_hyperparameter("amount", 0.1, low=0.0, high=1.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(1, target[:, None])[:, 0]
        amount = self.get_buffer("amount")
        return ((1 - amount) * nll + amount * -logp.mean(-1)).mean()


class Net(nn.Module):
    def __init__(self, hyper: bool) -> None:
        super().__init__()
        if hyper:
            self.conv1: nn.Module = HyperConv2d(1, WIDTH, 3, 1, padding=1)
            self.conv2: nn.Module = HyperConv2d(WIDTH, 2 * WIDTH, 3, 1, padding=1)
            self.fc: nn.Module = HyperLinear(2 * WIDTH, 10, 1)
        else:
            self.conv1 = nn.Conv2d(1, WIDTH, 3, padding=1)
            self.conv2 = nn.Conv2d(WIDTH, 2 * WIDTH, 3, padding=1)
            self.fc = nn.Linear(2 * WIDTH, 10)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.fc(self.drop(x))


class Classifier(HyperparameterMixin, pl.LightningModule):
    def __init__(self, hyper: bool) -> None:
        super().__init__()
        self.net = Net(hyper)
        self.ls = Smoothing()
        self.expose_hyperparameter("net.drop.p")  # the schedule case drives the dropout rate too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.ls(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(Callback):
    """Intervals between consecutive training-batch starts (everything one step costs)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.starts.append(time.perf_counter())

    def step_ms(self, skip: int = 3) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][skip:]
        return 1000 * statistics.median(gaps)


def _trainer(steps: int, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def _case(name: str, steps: int, data: MNIST5kDataModule) -> float:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    model = Classifier(hyper=name.startswith("STN"))
    if name == "schedule":
        schedules = {
            "ls.amount": LinearSchedule(0.0, 0.2, duration=steps),
            "net.drop.p": StepSchedule(0.1, milestones=[steps // 2], gamma=0.5),
            "lr": CosineSchedule(0.05, 0.0, duration=steps),
        }
        callbacks.append(HyperparameterSchedule(schedules, log=False))
    elif name == "STN layers":
        condition_hyper_layers(model, torch.zeros(1))
    elif name == "STN":
        callbacks.append(
            SelfTuning(
                {"ls.amount": TunedHyperparameter(initial=0.1, low=0.0, high=0.5)},
                train_steps=2,
                val_dataloader=data.val_dataloader(),
                log=False,
            )
        )
    _trainer(steps, callbacks).fit(model, train_dataloaders=data.train_dataloader())
    return timer.step_ms()


class _Factory:
    def __call__(self) -> pl.LightningModule:
        return Classifier(hyper=False)


class _Data:
    def __call__(self) -> pl.LightningDataModule:
        return MNIST5kDataModule(batch_size=128, train_subset=700)


def _pbt(storage: str) -> float:
    from lightning_losses.tuning import SearchDimension, tune_population_based_training

    start = time.perf_counter()
    tune_population_based_training(
        _Factory(),
        _Data(),
        {"ls.amount": SearchDimension(0.0, 0.3), "lr": SearchDimension(0.01, 0.2, log=True)},
        metric="val_acc",
        mode="max",
        population_size=4,
        max_epochs=2,
        synch=True,
        storage_path=storage,
        trainer_kwargs={"accelerator": "cpu", "num_sanity_val_steps": 0},
        resources_per_trial={"cpu": 1},
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-pbt", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = MNIST5kDataModule(batch_size=128)
    data.setup("fit")
    cases = ["plain", "schedule", "STN layers", "STN"]
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for case in cases:
            times[case].append(_case(case, args.steps, data))
    base = statistics.median(times["plain"])
    table = ResultsTable("Per-step overhead (median ms per training step)", ["case", "ms / step", "× plain"])
    for case in cases:
        ms = statistics.median(times[case])
        table.add(case=case, **{"ms / step": f"{ms:.2f}", "× plain": f"{ms / base:.2f}"})
    text = (
        f"Small CNN (width {WIDTH}), MNIST 5k, batch 128, 1 torch thread, {args.steps} steps × {args.rounds} "
        "interleaved rounds; step time = interval between consecutive batch starts.\n\n" + table.markdown()
    )

    if not args.skip_pbt:
        import ray

        runs: dict[str, float] = {}
        ray_start: dict[int, float] = {}
        with tempfile.TemporaryDirectory() as storage:
            for cpus in (1, 2):
                start = time.perf_counter()
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
                ray_start[cpus] = time.perf_counter() - start
                try:
                    runs[f"Ray local, {cpus} CPU(s), first run (workers start)"] = _pbt(f"{storage}/c{cpus}a")
                    runs[f"Ray local, {cpus} CPU(s), warm workers"] = _pbt(f"{storage}/c{cpus}b")
                finally:
                    ray.shutdown()
        segments = 4 * 2
        sequential = runs["Ray local, 1 CPU(s), warm workers"]
        pbt_table = ResultsTable("PBT throughput", ["run", "wall s", "segments / s", "× one at a time"])
        for label, seconds in runs.items():
            pbt_table.add(
                run=label,
                **{
                    "wall s": f"{seconds:.1f}",
                    "segments / s": f"{segments / seconds:.2f}",
                    "× one at a time": f"{sequential / seconds:.2f}",
                },
            )
        text += (
            "\n\nPopulation 4 × 2 synchronous generations × 1 epoch (700 MNIST images, batch 128) on Ray Tune's "
            "PopulationBasedTraining, 1 CPU per trial; `ray.init` itself took "
            f"{ray_start[1]:.1f} s / {ray_start[2]:.1f} s (not included).\n\n" + pbt_table.markdown()
        )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "tuning.md"
    path.write_text("# Self-tuning schedules: overheads\n\n" + text + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()

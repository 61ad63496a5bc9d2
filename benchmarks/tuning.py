"""Overheads of the self-tuning family per training step: ``HyperparameterSchedule`` and ``SelfTuning`` (STN).

The same small CNN trains on the same MNIST 5k batches (label-smoothed cross-entropy, the smoothing a named
hyperparameter) in every case; the **floor** of both callbacks is ``plain``, the training step with no callback:

* ``plain``: no callback (the floor);
* ``schedule``: a ``HyperparameterSchedule`` driving three names per step (smoothing, dropout rate, lr), values not
  logged;
* ``schedule, logged``: the same with ``log=True`` (the default): three ``LightningModule.log`` calls per step;
* ``STN layers``: the CNN built from STN hyper-layers, conditioned on one zero row per example (no callback): the
  cost of the hyper-layers themselves;
* ``STN perturbation``: the hyper-layer CNN with ``SelfTuning`` but no hyper-step yet (warm-up longer than the
  run): the per-step draw of perturbed hyperparameters, their writes and the conditioning;
* ``STN``: ``SelfTuning`` at its default interval (one hyper-step every 2 training steps).

The STN split rows are the differences of consecutive cases (hyper-layers, perturbation, hyper-step), per round.

Each round trains every case once (a fresh Trainer per case and round), the order alternating between rounds
(``_harness.interleave``); a case's time in a round is the mean interval between batch starts over a whole number of
hyper-step periods (data, forward, backward, optimizer and every hook, hyper-steps included), read on the CPU-time
clock of the process by default (one torch thread, data loaded in-process: the work of a step, steadier than wall
time on a shared machine); ratios are taken round by round and printed as ``median (min–max)``.

Optionally (``--pbt``) the throughput of a PBT population on Ray Tune (slow: Ray start-up and worker imports).

Run: ``python benchmarks/tuning.py [--rounds 9] [--steps 31] [--quick] [--pbt] [--clock cpu|wall]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _harness import Spread, Timing, interleave, machine_description, markdown_table, write_result
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_losses.callbacks.schedules import CosineSchedule, HyperparameterSchedule, LinearSchedule, StepSchedule
from lightning_losses.callbacks.self_tuning import SelfTuning, TunedHyperparameter
from lightning_losses.data import MNIST5kDataModule
from lightning_losses.losses.base import LossModule
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.nn.stn import HyperConv2d, HyperLinear, condition_hyper_layers

WIDTH = 8
PERIOD = 2  # the STN's default hyper-step interval: every case is timed over whole periods
SKIP = 4  # first batch starts left out (warm-up of the loop)
# CPU time of this process (1 torch thread, data loaded in-process): the work a step does, steadier than wall time
# on a machine shared with other jobs (``--clock wall`` for wall time)
CLOCK = time.process_time
CASES = ["plain", "schedule", "schedule, logged", "STN layers", "STN perturbation", "STN"]


BOUNDS = (
    "What bounds the STN: a hyper-layer computes its elementwise path and its gated hyper path, two convolutions "
    "(or matrix products) where the plain layer has one, plus the gates; a hyper-step is one forward and one "
    "backward (input gradients only, no weight gradients) through the hyper-layers on a validation batch. The "
    "per-step draw, writes and conditioning (the perturbation row) are the only work the callback adds on top."
)


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
        self.expose_hyperparameter("net.drop.p")  # the schedule cases drive the dropout rate too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.ls(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(Callback):
    """Batch-start times: the mean interval over whole hyper-step periods is everything one step costs."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.starts.append(CLOCK())

    def step_s(self) -> float:
        n = (len(self.starts) - 1 - SKIP) // PERIOD * PERIOD
        if n < PERIOD:
            raise ValueError(f"too few steps to time: give --steps >= {SKIP + PERIOD + 1}")
        return (self.starts[SKIP + n] - self.starts[SKIP]) / n


class ConditionPerExample(Callback):
    """The hyper-layers' condition without SelfTuning: one zero row per example (the shape an STN step uses)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        condition_hyper_layers(pl_module, torch.zeros(len(batch[0]), 1))


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
    if name.startswith("schedule"):
        schedules = {
            "ls.amount": LinearSchedule(0.0, 0.2, duration=steps),
            "net.drop.p": StepSchedule(0.1, milestones=[steps // 2], gamma=0.5),
            "lr": CosineSchedule(0.05, 0.0, duration=steps),
        }
        callbacks.append(HyperparameterSchedule(schedules, log=name == "schedule, logged"))
    elif name == "STN layers":
        callbacks.append(ConditionPerExample())
    elif name.startswith("STN"):
        callbacks.append(
            SelfTuning(
                {"ls.amount": TunedHyperparameter(initial=0.1, low=0.0, high=0.5)},
                warmup_steps=10 * steps if name == "STN perturbation" else 0,
                train_steps=PERIOD,
                val_dataloader=data.val_dataloader(),
                log=False,
            )
        )
    _trainer(steps, callbacks).fit(model, train_dataloaders=data.train_dataloader())
    return timer.step_s()


def step_overheads(rounds: int, steps: int) -> str:
    data = MNIST5kDataModule(batch_size=128)
    data.setup("fit")
    per_round: dict[str, list[float]] = {c: [] for c in CASES}

    def run(case: str) -> Any:
        return lambda: per_round[case].append(_case(case, steps, data))

    interleave({c: run(c) for c in CASES}, rounds=rounds, warmup=1)
    times = {c: Timing(c, per_round[c][1:]) for c in CASES}  # the warm-up run of each case left out
    floor = times["plain"]
    rows = []
    for case in CASES:
        t = times[case]
        rows.append(
            {
                "case": case,
                "ms / step": f"{1000 * t.median:.2f}",
                "floor ms (plain)": f"{1000 * floor.median:.2f}",
                "× floor": f"{t.over(floor):.2f}",
            }
        )
    table = markdown_table(rows, ["case", "ms / step", "floor ms (plain)", "× floor"])

    def diff(a: str, b: str) -> Spread:  # per-round difference, in units of the floor's step
        return Spread([(x - y) / f for x, y, f in zip(times[a].times_s, times[b].times_s, floor.times_s)])

    split = [
        ("hyper-layers (STN layers − plain)", "STN layers", "plain"),
        ("perturbation (STN perturbation − STN layers)", "STN perturbation", "STN layers"),
        (f"hyper-step, 1 per {PERIOD} steps (STN − STN perturbation)", "STN", "STN perturbation"),
    ]
    split_rows = [
        {
            "part": label,
            "ms / step": f"{1000 * statistics.median(x - y for x, y in zip(times[a].times_s, times[b].times_s)):.2f}",
            "× floor": f"{diff(a, b):.2f}",
        }
        for label, a, b in split
    ]
    split_table = markdown_table(split_rows, ["part", "ms / step", "× floor"])
    return (
        f"Machine: {machine_description()}.\n\n"
        f"Small CNN (width {WIDTH}), MNIST 5k, batch 128, 1 torch thread; {rounds} interleaved rounds of a "
        f"{steps}-step fit per case (fresh Trainer each), a round's step time the mean batch-start interval over "
        f"{PERIOD}-step periods ({'CPU time of the process' if CLOCK is time.process_time else 'wall time'}); "
        "ratios per round, `median (min–max)`. Floor: the plain training step (no "
        "callback).\n\n"
        + table
        + "\n\nSTN split (per-round differences, in floor steps):\n\n"
        + split_table
        + "\n\n"
        + BOUNDS
    )


class _Factory:
    def __call__(self) -> pl.LightningModule:
        return Classifier(hyper=False)


class _Data:
    def __call__(self) -> pl.LightningDataModule:
        return MNIST5kDataModule(batch_size=128, train_subset=700)


def pbt_throughput() -> str:
    import ray

    from lightning_losses.tuning import SearchDimension, tune_population_based_training

    def population(storage: str) -> float:
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

    rows = []
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        rows.append({"part": "ray.init (2 CPUs)", "wall s": f"{time.perf_counter() - start:.1f}"})
        try:
            first = population(storage + "/a")
            rows.append({"part": "population, first run (workers start)", "wall s": f"{first:.1f}"})
            rows.append({"part": "population, warm workers", "wall s": f"{population(storage + '/b'):.1f}"})
        finally:
            ray.shutdown()
    return "PBT: population 4 × 2 synchronous generations × 1 epoch (700 MNIST images), 1 CPU per trial.\n\n" + (
        markdown_table(rows, ["part", "wall s"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fit (default 31, quick 11)")
    parser.add_argument("--quick", action="store_true", help="smoke run, under 30 s")
    parser.add_argument("--pbt", action="store_true", help="also time a PBT population on Ray (minutes)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="step times in CPU or wall time")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 9)
    steps = args.steps or (11 if args.quick else 31)
    start = time.perf_counter()
    text = step_overheads(rounds, steps)
    if args.pbt:
        text += "\n\n" + pbt_throughput()
    print(text)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if not args.quick:
        path = write_result("tuning", "# Self-tuning schedules: per-step overheads\n\n" + text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()

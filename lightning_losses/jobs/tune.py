"""``lightning-losses tune``: tuning the KD temperature and weight on MNIST 5k distillation, four ways.

A teacher CNN is trained once; the same small student is then distilled (Hinton KD) with

* fixed hyperparameters (the paper defaults T = 4, α = 0.9),
* a small grid (T ∈ {2, 8} × α ∈ {0.5, 0.9}, the best by validation accuracy),
* Population Based Training (population 4 on a local Ray, one exploit / explore round per epoch, on Ray Tune's PBT
  scheduler; ``--backend tasks`` makes it synchronous, in generations),
* a Self-Tuning Network (the student built from STN hyper-layers conditioned on T and α).

The table reports the final student test accuracy, the compute (student epochs), the wall time and the final
hyperparameters; the discovered schedules are plotted as PNG under ``results/tune/``. The job ends with its time
split: start-up (imports), data loading, Ray start and stop, training (per method; PBT's includes the Ray workers' start
and the checkpoints), evaluation (the test passes) and the rest.

The MNIST 5k images are parsed once (a CSV read that takes seconds): every run, trial and segment gets a copy of one
set-up datamodule, the same splits as a fresh one.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_losses.callbacks.self_tuning import SelfTuning, TunedHyperparameter
from lightning_losses.demos import ConvNet, HyperConvNet
from lightning_losses.jobs.common import ResultsTable, Timer, TimeSplit, make_trainer, quiet_lightning, report
from lightning_losses.modules.classification import ClassificationModule
from lightning_losses.utilities.imports import require

__all__ = ["HyperConvNet", "add_arguments", "run"]

TEACHER_WIDTH, STUDENT_WIDTH = 32, 4
DEFAULT_T, DEFAULT_ALPHA = 4.0, 0.9
GRID = [(t, a) for t in (2.0, 8.0) for a in (0.5, 0.9)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2 teacher and 2 student epochs: about 2 minutes")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs per run (default 6, quick 2)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default 6, quick 2)")
    parser.add_argument("--population", type=int, default=4, help="PBT population size")
    parser.add_argument("--methods", default="fixed,grid,pbt,stn", help="comma-separated subset of the methods")
    parser.add_argument(
        "--backend",
        choices=("tune", "tasks"),
        default="tune",
        help="PBT on Ray Tune's PopulationBasedTraining scheduler, asynchronous (tune) or in synchronous "
        "generations (tasks)",
    )
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="run the PBT population one trial at a time, on a local Ray of 1 CPU (implies tasks)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None, help="train on this many images (smoke runs)")
    parser.add_argument("--output", default="results/tune", help="folder of the table and the plots")


class _DataFactory:
    """MNIST 5k datamodules sharing one load of the images (picklable for Ray: the set-up copy travels with it).

    The first call builds and sets up a datamodule; every call returns a deep copy of it, so runs, trials and PBT
    segments never parse the images again and never share a datamodule.
    """

    def __init__(self, batch_size: int, train_subset: int | None) -> None:
        self.batch_size, self.train_subset = batch_size, train_subset
        self.prototype: pl.LightningDataModule | None = None
        self.load_seconds = 0.0

    def __call__(self) -> pl.LightningDataModule:
        if self.prototype is None:
            from lightning_losses.data import MNIST5kDataModule

            start = time.perf_counter()
            prototype = MNIST5kDataModule(batch_size=self.batch_size, seed=0, train_subset=self.train_subset)
            prototype.setup("fit")
            self.prototype, self.load_seconds = prototype, time.perf_counter() - start
        return copy.deepcopy(self.prototype)


class _StudentFactory:
    """A KD student module with the given hyperparameters (picklable for Ray)."""

    def __init__(self, teacher: nn.Module, temperature: float = DEFAULT_T, alpha: float = DEFAULT_ALPHA) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, student: nn.Module | None = None) -> pl.LightningModule:
        from lightning_losses.modules import DistillationModule

        return DistillationModule(
            student if student is not None else ConvNet(width=STUDENT_WIDTH),
            self.teacher,
            method="kd",
            num_classes=10,
            temperature=self.temperature,
            kd_weight=self.alpha,
            ce_weight=1.0 - self.alpha,
            cache_teacher_outputs=True,
            scheduler="none",
        )


def _fit_and_test(
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    epochs: int,
    callbacks: list[Any] | None = None,
    split: TimeSplit | None = None,
) -> tuple[float, float, float]:
    trainer = make_trainer(epochs, progress=False, callbacks=callbacks or [], num_sanity_val_steps=0)
    with Timer() as timer:
        trainer.fit(module, datamodule=data)
    val = float(trainer.callback_metrics["val/acc"])
    with Timer() as test_time:
        (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    if split is not None:
        split.add("evaluation", test_time.seconds)
    return float(metrics["test/acc"]), val, timer.seconds


def _plot(curves: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name, label in zip(axes, ("kd.temperature", "kd.weight"), ("KD temperature T", "KD weight α")):
        for method, series in curves.items():
            points = series.get(name, [])
            if points:
                xs, ys = zip(*points)
                ax.step(xs, ys, where="post", label=method, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Discovered hyperparameter schedules (KD on MNIST 5k)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@quiet_lightning()
def run(args: argparse.Namespace) -> int:
    epochs = args.epochs or (2 if args.quick else 6)
    teacher_epochs = args.teacher_epochs or (2 if args.quick else 6)
    subset = args.train_subset
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"fixed", "grid", "pbt", "stn"})
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}: choose from fixed,grid,pbt,stn.")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    split = TimeSplit()
    data_factory = _DataFactory(args.batch_size, subset)
    teacher_data = data_factory()
    split.add("data loading", data_factory.load_seconds)

    pl.seed_everything(0, verbose=False)
    teacher = ConvNet(width=TEACHER_WIDTH)
    with Timer() as teacher_time:
        teacher_module = ClassificationModule(teacher)
        trainer = make_trainer(teacher_epochs, progress=False)
        trainer.fit(teacher_module, datamodule=teacher_data)
    split.train("teacher", teacher_time.seconds)
    with Timer() as test_time:
        (teacher_metrics,) = trainer.test(teacher_module, datamodule=data_factory(), verbose=False)
    split.add("evaluation", test_time.seconds)
    teacher.eval()
    print(f"teacher: test accuracy {100 * teacher_metrics['test/acc']:.2f} % ({teacher_time.seconds:.1f} s)")

    table = ResultsTable(
        "Tuning the KD temperature and weight on MNIST 5k",
        ["method", "student test acc %", "val acc %", "compute (student epochs)", "wall s", "final T", "final α"],
        formats={"student test acc %": ".2f", "val acc %": ".2f", "wall s": ".1f", "final T": ".2f", "final α": ".2f"},
    )
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}

    def add(method: str, test: float, val: float, compute: int, seconds: float, t: float, a: float) -> None:
        table.add(
            **{
                "method": method,
                "student test acc %": 100 * test,
                "val acc %": 100 * val,
                "compute (student epochs)": compute,
                "wall s": seconds,
                "final T": t,
                "final α": a,
            }
        )
        print(f"{method}: test accuracy {100 * test:.2f} % (T {t:.2f}, α {a:.2f}, {seconds:.1f} s)")

    if "fixed" in methods:
        pl.seed_everything(0, verbose=False)
        test, val, seconds = _fit_and_test(_StudentFactory(teacher)(), data_factory(), epochs, split=split)
        split.train("fixed", seconds)
        add("fixed (T=4, α=0.9)", test, val, epochs, seconds, DEFAULT_T, DEFAULT_ALPHA)
        curves["fixed"] = {"kd.temperature": [(0, DEFAULT_T), (epochs, DEFAULT_T)]}
        curves["fixed"]["kd.weight"] = [(0, DEFAULT_ALPHA), (epochs, DEFAULT_ALPHA)]

    if "grid" in methods:
        best: tuple[float, float, float, float] | None = None
        total = 0.0
        for t, a in GRID:
            pl.seed_everything(0, verbose=False)
            test, val, seconds = _fit_and_test(_StudentFactory(teacher, t, a)(), data_factory(), epochs, split=split)
            split.train("grid", seconds)
            total += seconds
            print(f"  grid T={t:g} α={a:g}: val {100 * val:.2f} %, test {100 * test:.2f} %")
            if best is None or val > best[1]:
                best = (test, val, t, a)
        assert best is not None
        add(f"grid ({len(GRID)} runs, best by val)", best[0], best[1], epochs * len(GRID), total, best[2], best[3])
        curves["grid best"] = {
            "kd.temperature": [(0, best[2]), (epochs, best[2])],
            "kd.weight": [(0, best[3]), (epochs, best[3])],
        }

    if "pbt" in methods:
        from lightning_losses.tuning import SearchDimension, tune_population_based_training

        space = {"kd.temperature": SearchDimension(1.0, 10.0), "kd.weight": SearchDimension(0.05, 0.95)}
        on_tune = args.backend == "tune" and not args.no_ray
        ray = require("ray", "tune")
        with tempfile.TemporaryDirectory() as storage, Timer() as timer:
            with Timer() as ray_time:
                if args.no_ray:  # room for one trial: Ray Tune runs the population one trial at a time
                    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
                elif not ray.is_initialized():  # as tune_population_based_training would, timed apart
                    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            split.add("Ray start/stop", ray_time.seconds)
            with Timer() as trials_time:
                result = tune_population_based_training(
                    _StudentFactory(teacher),
                    data_factory,
                    space,
                    metric="val/acc",
                    mode="max",
                    population_size=args.population,
                    perturbation_interval=1,
                    max_epochs=epochs,
                    quantile_fraction=0.25,
                    storage_path=storage,
                    trainer_kwargs={"num_sanity_val_steps": 0},
                    initial_configs=_initial_configs(args.population),
                    derived={"ce_weight": _ce_weight},
                    seed=0,
                    synch=not on_tune,  # generations
                )
            split.train("PBT trials", trials_time.seconds)
            test_acc = math.nan  # without a checkpoint of the best trial (warned about) there is nothing to test
            if result.best_checkpoint is not None:
                with Timer() as test_time:
                    module = _StudentFactory(teacher)()
                    trainer = make_trainer(epochs, progress=False)
                    (metrics,) = trainer.test(
                        module, datamodule=data_factory(), ckpt_path=result.best_checkpoint, verbose=False
                    )
                split.add("evaluation", test_time.seconds)
                test_acc = float(metrics["test/acc"])
        with Timer() as shutdown_time:
            ray.shutdown()
        split.add("Ray start/stop", shutdown_time.seconds)
        if result.best_trial is None:
            print("PBT: no trial reported a result (see the warnings above); the table has no PBT row.")
        else:
            schedule = result.schedules.get(result.best_trial) or [(0, dict(result.best_config))]
            final = schedule[-1][1]
            add(
                f"PBT (population {args.population}, {'Ray local' if not args.no_ray else 'sequential'})"
                + (" on Ray Tune" if on_tune else " in generations on Ray Tune" if not args.no_ray else ""),
                test_acc,
                result.best_score,
                epochs * args.population,
                timer.seconds,
                final.get("kd.temperature", math.nan),
                final.get("kd.weight", math.nan),
            )
            curves["PBT best trial"] = {
                name: [(float(e), float(c.get(name, math.nan))) for e, c in schedule]
                + [(float(epochs), float(final.get(name, math.nan)))]
                for name in ("kd.temperature", "kd.weight")
            }

    if "stn" in methods:
        pl.seed_everything(0, verbose=False)
        data = data_factory()
        module = _StudentFactory(teacher)(HyperConvNet(width=STUDENT_WIDTH, num_hyperparameters=2))
        data.setup("fit")
        steps_per_epoch = len(data.train_dataloader())
        stn = SelfTuning(
            {
                "kd.temperature": TunedHyperparameter(initial=DEFAULT_T, low=1.0, high=10.0),
                "kd.weight": TunedHyperparameter(initial=DEFAULT_ALPHA, low=0.05, high=0.95, per_example=False),
            },
            derived={"ce_weight": _stn_ce_weight},  # CE weight follows α
            warmup_steps=steps_per_epoch // 2,
            train_steps=2,
            valid_steps=1,
            hyper_lr=0.02,
            perturb_scale=0.5,
            entropy_weight=1e-3,
        )
        test, val, seconds = _fit_and_test(module, data, epochs, callbacks=[stn], split=split)
        split.train("STN", seconds)
        final_stn = stn.current()
        add("STN (hyper-layers)", test, val, epochs, seconds, final_stn["kd.temperature"], final_stn["kd.weight"])
        curves["STN"] = {
            name: [(0.0, DEFAULT_T if name == "kd.temperature" else DEFAULT_ALPHA)]
            + [(h["step"] / steps_per_epoch, h[name]) for h in stn.history]
            for name in ("kd.temperature", "kd.weight")
        }

    preamble = (
        f"Teacher ConvNet width {TEACHER_WIDTH} ({100 * teacher_metrics['test/acc']:.2f} % test accuracy, "
        f"{teacher_epochs} epoch(s)); student ConvNet width {STUDENT_WIDTH}, {epochs} epoch(s) per run, SGD 0.05 "
        "constant learning rate, Hinton KD with CE weight 1 − α. PBT: one exploit / explore round per epoch, bottom "
        "25 % copies a top-25 % checkpoint, perturbation ×1.2 / ×0.8 or resampling (p = 0.25), bounds T ∈ [1, 10], "
        "α ∈ [0.05, 0.95]. STN: the student's convolutions and classifier are hyper-layers conditioned on (T, α); "
        "2 training steps per hyper-step after half an epoch of warm-up, hyper Adam 0.02."
    )
    stem = "tune" + ("_quick" if args.quick else "")
    path = table.write(output, stem, preamble)
    written: list[Path] = [path, path.with_suffix(".json")]
    if curves:
        try:
            _plot(curves, output / f"{stem}_schedules.png")
            written.append(output / f"{stem}_schedules.png")
        except ImportError as err:
            print(f"no plot: {err}")
    report(table, preamble, written)
    print(split.line())
    return 0


def _ce_weight(config: Mapping[str, float]) -> float:
    return 1.0 - float(config["kd.weight"])


def _stn_ce_weight(values: Mapping[str, Tensor]) -> Tensor:
    return 1.0 - values["kd.weight"]


def _initial_configs(population: int) -> list[dict[str, float]]:
    """The paper defaults first, then spread-out corners of the search space, then the defaults again."""
    points = [(DEFAULT_T, DEFAULT_ALPHA), (2.0, 0.5), (8.0, 0.5), (8.0, 0.9), (2.0, 0.9)]
    points += [(DEFAULT_T, DEFAULT_ALPHA)] * max(0, population - len(points))
    return [{"kd.temperature": t, "kd.weight": a} for t, a in points[:population]]

r"""Population Based Training (and PB2) of a LightningModule's loss hyperparameters on Ray Tune.

Every trial is a function trainable running one plain Lightning ``fit``. At the end of every validation epoch it
reports the metric and a checkpoint (the Lightning checkpoint and the trial's lineage) with ``ray.tune.report``;
Ray Tune's :class:`~ray.tune.schedulers.PopulationBasedTraining` (or :class:`~ray.tune.schedulers.pb2.PB2`) ranks
the trials every ``perturbation_interval`` epochs, and a trial of the bottom quantile restarts from the checkpoint of
a top-quantile donor with an explored configuration:

.. math::
    \lambda' = \operatorname{clip}_{[a, b]}\big(\lambda \cdot f\big),\ f \in \{1.2, 0.8\}
    \quad\text{or, with probability } p_{\text{resample}},\quad \lambda' \sim \mathcal U[a, b]

(PB2 replaces the random step by a GP-bandit over the bounds). Ray does not clip perturbed values, so a
``custom_explore_fn`` (:class:`ClipToBounds`) clips them; Ray skips donors that have not reported a checkpoint yet.

The restored trial resumes through Lightning's ``ckpt_path`` and the trial's configuration is applied in
``on_train_start`` (:class:`~lightning_losses.tuning.common.ApplyHyperparameters`), after Lightning has restored the
module, the loops and the optimizer param groups, so neither the checkpoint nor the restored ``lr`` /
``weight_decay`` override the mutated values. Each checkpoint carries the lineage ``[(start_epoch, config), ...]``
of its trial, returned as the discovered schedules.

The result table is built from the library's own record, not from Ray's per-trial ``result.json`` (whose rows can be
lost across a trial's pause and restore): every report is first appended, as one JSON line, to
``<storage_path>/<experiment>_reports/<trial_id>.jsonl``; the table holds every line, each trial's final score is
that of its last report (in time, not the highest epoch: an exploiting trial may restart from an earlier epoch),
and a missing report or checkpoint gives a warning, never a crash. On a cluster ``storage_path`` must be a shared
file system path (it already must be for PBT's checkpoints). With ``synch=True`` the population advances in
generations of ``perturbation_interval`` epochs (every trial waits for the others at each perturbation); the table
numbers them.

With fewer resources than trials, Ray Tune pauses trials at every perturbation and runs the others, so a local Ray
sized to one trial (``ray.init(num_cpus=1)`` before the call) trains the population one trial at a time.

Ray is imported lazily (extra ``tune``). PB2 needs scikit-learn in recent Ray releases (GPy in old ones); without
it :func:`tune_population_based_training` raises an ImportError naming the package.

Example:
    >>> from lightning_losses.tuning.common import SearchDimension
    >>> clip = ClipToBounds({"kd.temperature": SearchDimension(1.0, 8.0)})
    >>> clip({"kd.temperature": 9.6, "other": 3.0})
    {'kd.temperature': 8.0, 'other': 3.0}
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_losses.tuning.common import (
    ApplyHyperparameters,
    ClipToBounds,
    PBTResult,
    SearchDimension,
    check_population,
    segment_trainer,
)
from lightning_losses.utilities.imports import require

__all__ = ["ClipToBounds", "TuneReportCheckpoint", "read_reports", "tune_population_based_training"]

MODEL_FILE = "model.ckpt"
LINEAGE_FILE = "lineage.json"
TRIAL_DIR_PREFIX = "trial_"


class TuneReportCheckpoint(Callback):
    """Report the logged metrics and a checkpoint to Ray Tune at the end of every validation epoch.

    The checkpoint directory holds the Lightning checkpoint (``model.ckpt``) and ``lineage.json`` (the writing
    trial, the epoch and the lineage of configurations). Besides the logged scalars, the report holds ``epoch``
    (epochs completed), ``global_step``, ``start_step`` (the global step this run started from, after restore),
    ``restored_epoch``, ``donor`` (the trial whose checkpoint this run restored, ``"none"`` for the trial's own or
    none), ``hp/<name>`` (the configuration applied) and ``observed/<name>`` (the values read back at the first
    training batch: what was in effect after restore).

    With ``record``, every report is first appended to that JSON-lines file as
    ``{"trial_id", "report", "time", "metrics", "lineage", "restored_from"}`` (``report`` counts the trial's
    reports, across its restarts; ``restored_from`` names the checkpoint this run restored, as the trial and report
    that wrote it), flushed to disk before Ray sees it; ``lineage.json`` in the checkpoint holds the same
    ``report``.

    Args:
        metric: The metric PBT ranks by; a clear error is raised when it was not logged.
        apply: The callback applying the trial's configuration.
        lineage: The trial's ``[(start_epoch, config), ...]``.
        trial_id: The Ray trial id of this run.
        donor: The trial whose checkpoint this run restored, if another one.
        restored_epoch: Epochs completed in the restored checkpoint (0 for a fresh start).
        record: JSON-lines file this trial appends its reports to (``None``: no record).
        restored: ``(trial_id, report)`` of the checkpoint this run restored, ``None`` for a fresh start.

    Example:
        >>> cb = TuneReportCheckpoint("val_loss", ApplyHyperparameters({"lr": 0.1}), [(0, {"lr": 0.1})], "t0")
        >>> cb.metric, cb.donor
        ('val_loss', 'none')
    """

    def __init__(
        self,
        metric: str,
        apply: ApplyHyperparameters,
        lineage: Sequence[tuple[int, Mapping[str, float]]],
        trial_id: str,
        donor: str | None = None,
        restored_epoch: int = 0,
        record: str | Path | None = None,
        restored: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.metric, self.apply = metric, apply
        self.lineage = [(int(e), dict(c)) for e, c in lineage]
        self.trial_id, self.donor, self.restored_epoch = trial_id, donor or "none", restored_epoch
        self.start_step = 0
        self.record = None if record is None else Path(record)
        self.restored = None if restored is None else (str(restored[0]), int(restored[1]))
        self.reports = len(read_reports(self.record)) if self.record is not None else 0

    def _append(self, metrics: Mapping[str, Any]) -> int:
        """Append one report to the record (flushed and synced); return its index among the trial's reports."""
        index = self.reports
        self.reports += 1
        if self.record is not None:
            row = {
                "trial_id": self.trial_id,
                "report": index,
                "time": time.time(),
                "metrics": dict(metrics),
                "lineage": [[e, c] for e, c in self.lineage],
                "restored_from": None
                if self.restored is None
                else {"trial_id": self.restored[0], "report": self.restored[1]},
            }
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return index

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = int(trainer.global_step)

    def _metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                metrics[key] = float(value)
        if self.metric not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            raise KeyError(
                f"The metric {self.metric!r} was not logged during validation (logged: {available}). Log it with "
                "`self.log(...)` in `validation_step` or pass the right `metric=`."
            )
        metrics.update(
            epoch=int(trainer.current_epoch) + 1,
            global_step=int(trainer.global_step),
            start_step=self.start_step,
            restored_epoch=self.restored_epoch,
            donor=self.donor,
        )
        metrics.update({f"hp/{k}": float(v) for k, v in self.apply.config.items()})
        metrics.update({f"observed/{k}": float(v) for k, v in (self.apply.observed or {}).items()})
        return metrics

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        tune = require("ray.tune", "tune")
        metrics = self._metrics(trainer)
        index = self._append(metrics)  # before Ray sees the report: the record keeps it whatever Ray does next
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(str(Path(folder) / MODEL_FILE))
            state = {"trial_id": self.trial_id, "epoch": metrics["epoch"], "lineage": self.lineage, "report": index}
            (Path(folder) / LINEAGE_FILE).write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class _TrialSetup:
    """Everything a trial needs besides its config (shipped to the workers through ``tune.with_parameters``)."""

    def __init__(
        self,
        module_factory: Callable[[], pl.LightningModule],
        datamodule_factory: Callable[[], pl.LightningDataModule],
        metric: str,
        max_epochs: int,
        trainer_kwargs: Mapping[str, Any],
        derived: Mapping[str, Callable[[Mapping[str, float]], float]],
        seed: int,
        num_threads: int,
        records: str | None = None,
    ) -> None:
        self.module_factory, self.datamodule_factory = module_factory, datamodule_factory
        self.metric, self.max_epochs, self.trainer_kwargs = metric, max_epochs, dict(trainer_kwargs)
        self.derived, self.seed, self.num_threads = dict(derived), seed, num_threads
        self.records = records

    def derive(self, config: Mapping[str, Any]) -> dict[str, float]:
        out = {str(k): float(v) for k, v in config.items()}
        for name, fn in self.derived.items():
            out[name] = float(fn(out))
        return out


def _train_trial(config: dict[str, Any], setup: _TrialSetup) -> None:
    """The function trainable: one Lightning fit, resumed from Tune's checkpoint when there is one."""
    tune = require("ray.tune", "tune")
    torch.set_num_threads(setup.num_threads)
    trial_id = str(tune.get_context().get_trial_id())
    values = setup.derive(config)
    lineage: list[tuple[int, dict[str, float]]] = [(0, dict(values))]
    donor, restored_epoch, ckpt_path = None, 0, None
    restored: tuple[str, int] | None = None
    local = Path(tempfile.mkdtemp(prefix="pbt_restore_"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                shutil.copy(Path(folder) / MODEL_FILE, local / MODEL_FILE)
                state = json.loads((Path(folder) / LINEAGE_FILE).read_text())
            ckpt_path = str(local / MODEL_FILE)
            restored_epoch = int(state["epoch"])
            if "report" in state:
                restored = (str(state["trial_id"]), int(state["report"]))
            lineage = [(int(e), {k: float(v) for k, v in c.items()}) for e, c in state["lineage"]]
            if state["trial_id"] != trial_id:
                donor = str(state["trial_id"])
            if lineage[-1][1] != values:
                lineage.append((restored_epoch, dict(values)))
        pl.seed_everything(setup.seed + restored_epoch, verbose=False)
        module, datamodule = setup.module_factory(), setup.datamodule_factory()
        apply = ApplyHyperparameters(values)
        record = None if setup.records is None else Path(setup.records) / f"{trial_id}.jsonl"
        report = TuneReportCheckpoint(
            setup.metric, apply, lineage, trial_id, donor, restored_epoch, record, restored=restored
        )
        trainer = segment_trainer(setup.trainer_kwargs, setup.max_epochs, [apply, report])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _trial_dirname(trial: Any) -> str:
    """Ray Tune ``trial_dirname_creator``: the trial's directory is named after its id."""
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


def _domain(tune: Any, dim: SearchDimension) -> Any:
    return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)


def _make_scheduler(
    kind: str,
    space: Mapping[str, SearchDimension],
    metric: str,
    mode: str,
    perturbation_interval: int,
    quantile_fraction: float,
    resample_probability: float,
    synch: bool,
    perturbation_factors: tuple[float, float] = (1.2, 0.8),
) -> Any:
    tune = require("ray.tune", "tune")
    common: dict[str, Any] = dict(
        time_attr="epoch",
        metric=metric,
        mode=mode,
        perturbation_interval=perturbation_interval,
        quantile_fraction=quantile_fraction,
        custom_explore_fn=ClipToBounds(space),
        synch=synch,
    )
    if kind == "pbt":
        schedulers = require("ray.tune.schedulers", "tune")
        return schedulers.PopulationBasedTraining(
            hyperparam_mutations={name: _domain(tune, dim) for name, dim in space.items()},
            resample_probability=resample_probability,
            perturbation_factors=tuple(perturbation_factors),
            **common,
        )
    pb2 = require("ray.tune.schedulers.pb2", "tune")
    try:
        return pb2.PB2(hyperparam_bounds={name: [dim.low, dim.high] for name, dim in space.items()}, **common)
    except (ImportError, RuntimeError) as err:
        raise ImportError(
            "Ray Tune's PB2 scheduler needs its Gaussian-process package: scikit-learn in recent Ray releases, GPy "
            f'in older ones ({err}). Install it with: pip install "lightning-losses[tune]" (and `pip install GPy` '
            'for older Ray), or use scheduler="pbt".'
        ) from err


def tune_population_based_training(
    module_factory: Callable[[], pl.LightningModule],
    datamodule_factory: Callable[[], pl.LightningDataModule],
    search_space: Mapping[str, SearchDimension],
    *,
    metric: str,
    mode: Literal["min", "max"],
    population_size: int = 4,
    perturbation_interval: int = 1,
    max_epochs: int = 4,
    scheduler: Literal["pbt", "pb2"] = "pbt",
    quantile_fraction: float = 0.25,
    resample_probability: float = 0.25,
    perturbation_factors: tuple[float, float] = (1.2, 0.8),
    resources_per_trial: Mapping[str, float] | None = None,
    storage_path: str | Path | None = None,
    ray_address: str | None = None,
    seed: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    initial_configs: Sequence[Mapping[str, float]] | None = None,
    derived: Mapping[str, Callable[[Mapping[str, float]], float]] | None = None,
    synch: bool = False,
) -> PBTResult:
    """Run PBT (or PB2) on Ray Tune over named hyperparameters of a LightningModule; return what it found.

    Args:
        module_factory: ``() -> LightningModule`` (picklable); weights of a restored trial come from the checkpoint.
        datamodule_factory: ``() -> LightningDataModule`` (picklable).
        search_space: Dotted hyperparameter names (``"kd.temperature"``) and ``"lr"`` / ``"weight_decay"``
            mapped to their bounds; initial values are drawn from them (log-uniform where ``log``).
        metric: Validation metric logged by the module (``self.log(metric, ...)``).
        mode: ``"max"`` or ``"min"``.
        population_size: Number of trials.
        perturbation_interval: Epochs between two exploit / explore decisions of a trial.
        max_epochs: Epochs every trial trains.
        scheduler: ``"pbt"`` (Ray's PopulationBasedTraining) or ``"pb2"`` (Ray's PB2, needs scikit-learn).
        quantile_fraction: Fraction of the population in the bottom / top quantile (0 < q ≤ 0.5).
        resample_probability: Probability of resampling a value instead of perturbing it (PBT only).
        perturbation_factors: The factors a perturbed value is multiplied by, one drawn at random (PBT only).
        resources_per_trial: ``{"cpu": 1}`` by default; ``"gpu"`` to give each trial GPUs.
        storage_path: Where Ray Tune writes trials and checkpoints (shared storage on a cluster); a temporary
            folder by default (the best checkpoint then lives until the interpreter exits).
        ray_address: Address of a Ray cluster (``"auto"``); ``None`` starts (or reuses) a local Ray.
        seed: Seed of the initial sampling and of the Lightning runs.
        trainer_kwargs: Extra ``pl.Trainer`` arguments (``limit_train_batches`` ...).
        initial_configs: Starting configurations of the first trials (the rest sampled).
        derived: Names computed from every configuration, e.g. ``{"ce_weight": lambda c: 1 - c["kd.weight"]}``
            (picklable functions).
        synch: Ray's synchronous PBT: wait for the whole population at every perturbation, so the population
            advances in generations of ``perturbation_interval`` epochs.

    Returns:
        A :class:`~lightning_losses.tuning.common.PBTResult`: trial indices follow Ray's trial order; ``table`` has one
        row per report, from the library's own record (epoch, generation, trial, score, config, donor,
        restored_epoch, restored_from and checkpoint (paths of the Lightning checkpoints restored and written,
        ``None`` where none is on disk), start_step, global_step, observed, trial_id, report, and ``metrics``:
        every number reported); the best
        trial is the one whose last report scores best; ``schedules`` are the lineages of every trial's last report,
        ``best_checkpoint`` the best trial's own newest checkpoint. Missing reports or checkpoints give warnings
        (``best_trial`` and ``best_checkpoint`` are ``None`` when nothing was reported or saved).

    Raises:
        ValueError: On an empty search space, a population below 2, bad mode / fraction / intervals / factors.
        ImportError: Without Ray Tune, or for PB2 without its Gaussian-process package.
        Exception: The error of the first failed trial, re-raised as it was raised in the trial (a ``KeyError``
            when the metric was not logged, say), with a note naming how many trials failed.

    Example:
        >>> tune_population_based_training(  # checked before Ray starts
        ...     None, None, {"lr": SearchDimension(1e-3, 1e-1, log=True)}, metric="val/acc", mode="max",
        ...     perturbation_factors=(1.2, -1.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `perturbation_factors` must be positive numbers, got (1.2, -1.0)...
    """
    check_population(search_space, population_size, perturbation_interval, max_epochs, mode, quantile_fraction)
    if not 0 <= resample_probability <= 1:
        raise ValueError(f"`resample_probability` must be in [0, 1], got {resample_probability}.")
    if scheduler not in ("pbt", "pb2"):
        raise ValueError(f"`scheduler` must be 'pbt' or 'pb2', got {scheduler!r}.")
    if not perturbation_factors or not all(math.isfinite(f) and f > 0 for f in perturbation_factors):
        raise ValueError(
            f"`perturbation_factors` must be positive numbers, got {tuple(perturbation_factors)}; e.g. (1.2, 0.8)."
        )
    if initial_configs is not None and len(initial_configs) > population_size:
        raise ValueError(
            f"`initial_configs` holds {len(initial_configs)} configurations for a population of {population_size}."
        )
    resources = dict(resources_per_trial or {"cpu": 1})
    unknown = set(resources) - {"cpu", "gpu"}
    if unknown:
        raise ValueError(f"`resources_per_trial` keys must be 'cpu' and 'gpu', got {sorted(unknown)}.")
    space = dict(search_space)
    ray = require("ray", "tune")
    tune = require("ray.tune", "tune")
    search = require("ray.tune.search", "tune")
    sched = _make_scheduler(
        scheduler,
        space,
        metric,
        mode,
        perturbation_interval,
        quantile_fraction,
        resample_probability,
        synch,
        tuple(perturbation_factors),  # type: ignore[arg-type]
    )
    if not ray.is_initialized():
        ray.init(
            address=ray_address,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
            configure_logging=False,
        )
    storage = Path(storage_path) if storage_path is not None else Path(tempfile.mkdtemp(prefix="tune_pbt_"))
    storage.mkdir(parents=True, exist_ok=True)
    records = Path(tempfile.mkdtemp(prefix=f"pbt_{scheduler}_reports_", dir=storage)).resolve()
    setup = _TrialSetup(  # shipped to the object store by `with_parameters`: complete before that
        module_factory,
        datamodule_factory,
        metric,
        max_epochs,
        trainer_kwargs or {},
        derived or {},
        seed,
        max(1, int(resources.get("cpu", 1))),
        str(records),
    )
    trainable = tune.with_resources(tune.with_parameters(_train_trial, setup=setup), resources)
    points = [{n: space[n].clip(v) if n in space else float(v) for n, v in c.items()} for c in (initial_configs or [])]
    tuner = tune.Tuner(
        trainable,
        param_space={name: _domain(tune, dim) for name, dim in space.items()},
        tune_config=tune.TuneConfig(
            scheduler=sched,
            num_samples=population_size,
            search_alg=search.BasicVariantGenerator(points_to_evaluate=points or None, random_state=seed),
            reuse_actors=True,  # no new worker process (and torch import) per exploit
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=f"pbt_{scheduler}",
            storage_path=str(storage.resolve()),
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # donors' checkpoints must survive
        ),
    )
    # Ray's PBT draws its explore factors and donors from Python's global `random` in this (driver) process:
    # seed it so a population run is reproducible.
    random.seed(seed)
    grid = tuner.fit()
    if grid.errors:
        raise _trial_error(grid.errors, population_size)
    return _collect(grid, records, metric, mode, perturbation_interval)


def _trial_error(errors: Sequence[BaseException], population_size: int) -> BaseException:
    """The first trial's own exception (unwrapped from Ray's task error), noting how many trials failed."""
    error = errors[0]
    while isinstance(getattr(error, "cause", None), BaseException):  # ray.exceptions.RayTaskError(cause)
        error = error.cause  # type: ignore[attr-defined]
    note = f"{len(errors)} of {population_size} trial(s) failed; this is the first error, raised in the trial."
    if type(error).__module__.split(".")[0] == "ray":
        return RuntimeError(f"{note} {error}")
    if hasattr(error, "add_note"):
        error.add_note(note)
    return error


def read_reports(path: str | Path | None) -> list[dict[str, Any]]:
    """The reports recorded in a JSON-lines file, in the order written; a line that does not parse is skipped (and
    warned about), a missing file reads as no report."""
    if path is None or not Path(path).exists():
        return []
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"Skipping line {number} of {path}: it is not a complete JSON report.", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _trial_id(path: str | Path) -> str:
    name = Path(str(path)).name
    if name.startswith(TRIAL_DIR_PREFIX):
        return name[len(TRIAL_DIR_PREFIX) :]
    for lineage in sorted(Path(str(path)).glob(f"checkpoint_*/{LINEAGE_FILE}")):  # a directory named otherwise
        try:
            return str(json.loads(lineage.read_text())["trial_id"])
        except (OSError, ValueError, KeyError):
            continue
    return name


def _collect(grid: Any, records: Path, metric: str, mode: str, perturbation_interval: int = 1) -> PBTResult:
    order: list[str] = []
    trial_dirs: dict[str, Path | None] = {}
    for result in grid:
        trial_id = _trial_id(result.path)
        order.append(trial_id)
        trial_dirs[trial_id] = Path(result.path)
    for path in sorted(Path(records).glob("*.jsonl")):  # a trial Ray did not return: still show its reports
        if path.stem not in trial_dirs:
            order.append(path.stem)
            trial_dirs[path.stem] = None
    reports = {trial_id: read_reports(Path(records) / f"{trial_id}.jsonl") for trial_id in order}
    return _result_from_records(order, reports, trial_dirs, metric, mode, perturbation_interval)


def _checkpoints(trial_dirs: Mapping[str, Path | None]) -> dict[tuple[str, int], str]:
    """Every Lightning checkpoint on disk, by the ``(trial_id, report)`` that wrote it (a donor's lives in its own
    trial directory)."""
    found: dict[tuple[str, int], str] = {}
    for trial_dir in trial_dirs.values():
        if trial_dir is None:
            continue
        for lineage in Path(trial_dir).glob(f"checkpoint_*/{LINEAGE_FILE}"):
            try:
                state = json.loads(lineage.read_text())
                key = (str(state["trial_id"]), int(state["report"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (lineage.parent / MODEL_FILE).exists():
                found[key] = f"{lineage.parent}/{MODEL_FILE}"
    return found


def _own_newest_checkpoint(trial_dir: Path | None, trial_id: str) -> tuple[str, int] | None:
    """The newest checkpoint directory a trial wrote itself (by report index), with that index."""
    if trial_dir is None:
        return None
    best: tuple[int, str] | None = None
    for lineage in Path(trial_dir).glob(f"checkpoint_*/{LINEAGE_FILE}"):
        try:
            state = json.loads(lineage.read_text())
        except (OSError, ValueError):
            continue
        if str(state.get("trial_id")) != trial_id or not (lineage.parent / MODEL_FILE).exists():
            continue
        key = (int(state.get("report", state.get("epoch", -1))), str(lineage.parent))
        if best is None or key > best:
            best = key
    return None if best is None else (best[1], best[0])


def _number(value: Any, default: float = math.nan) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _result_from_records(
    order: Sequence[str],
    reports: Mapping[str, Sequence[Mapping[str, Any]]],
    trial_dirs: Mapping[str, Path | None],
    metric: str,
    mode: str,
    perturbation_interval: int = 1,
) -> PBTResult:
    """Build the PBT result from the record of every trial's reports (trial ids in Ray's order)."""
    index = {trial_id: i for i, trial_id in enumerate(order)}
    on_disk = _checkpoints(trial_dirs)
    table: list[dict[str, Any]] = []
    last: dict[int, dict[str, Any]] = {}
    schedules: dict[int, list[tuple[int, dict[str, float]]]] = {}
    silent = []
    for i, trial_id in enumerate(order):
        rows = sorted(reports.get(trial_id, ()), key=lambda r: (_number(r.get("report"), -1.0), _number(r.get("time"))))
        if not rows:
            silent.append(trial_id)
            continue
        for row in rows:
            m = dict(row.get("metrics", {}))
            donor = m.get("donor")
            epoch = int(_number(m.get("epoch"), -1))
            report = int(_number(row.get("report"), -1))
            restored = row.get("restored_from")
            restored_key = None
            if isinstance(restored, dict):
                restored_key = (str(restored.get("trial_id")), int(_number(restored.get("report"), -1)))
            entry = {
                "epoch": epoch,
                "generation": (epoch - 1) // perturbation_interval if epoch > 0 else -1,
                "trial": i,
                "trial_id": trial_id,
                "report": report,
                "score": _number(m.get(metric)),
                "config": {k[3:]: _number(v) for k, v in m.items() if str(k).startswith("hp/")},
                "observed": {k[9:]: _number(v) for k, v in m.items() if str(k).startswith("observed/")},
                "donor": index.get(str(donor)) if isinstance(donor, str) else None,
                "restored_epoch": int(_number(m.get("restored_epoch"), 0)),
                "restored_from": None if restored_key is None else on_disk.get(restored_key),
                "checkpoint": on_disk.get((trial_id, report)),
                "start_step": int(_number(m.get("start_step"), 0)),
                "global_step": int(_number(m.get("global_step"), 0)),
                "metrics": {
                    str(k): float(v)
                    for k, v in m.items()
                    if isinstance(v, (int, float)) and not str(k).startswith(("hp/", "observed/", "config/"))
                },
            }
            table.append(entry)
            last[i] = entry
        lineage = rows[-1].get("lineage") or []
        schedules[i] = [(int(e), {k: float(v) for k, v in c.items()}) for e, c in lineage]
    if silent:
        warnings.warn(
            f"{len(silent)} of {len(order)} trial(s) left no report ({', '.join(silent)}): the table shows the "
            f"{len(table)} report(s) of the others.",
            stacklevel=3,
        )
    if not last:
        warnings.warn("No trial reported: the PBT result is empty (no best trial, no checkpoint).", stacklevel=3)
        return PBTResult(None, math.nan, {}, None, schedules, table)
    sign = 1.0 if mode == "max" else -1.0

    def final(i: int) -> float:
        score = float(last[i]["score"])
        return sign * score if math.isfinite(score) else -math.inf

    best = max(last, key=final)
    own = _own_newest_checkpoint(trial_dirs.get(order[best]), order[best])
    checkpoint = None
    if own is None:
        warnings.warn(f"The best trial {order[best]} has no checkpoint of its own on disk.", stacklevel=3)
    else:
        checkpoint = f"{own[0]}/{MODEL_FILE}"
        if own[1] != last[best]["report"]:
            warnings.warn(
                f"The best trial's newest checkpoint is from its report {own[1]}, its last report is "
                f"{last[best]['report']}: the checkpoint lags the reported score.",
                stacklevel=3,
            )
    return PBTResult(
        best_trial=best,
        best_score=float(last[best]["score"]),
        best_config=dict(last[best]["config"]),
        best_checkpoint=checkpoint,
        schedules=schedules,
        table=table,
    )

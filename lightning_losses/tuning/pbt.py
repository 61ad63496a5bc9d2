r"""Population Based Training (Jaderberg et al., 2017) of a LightningModule's loss hyperparameters on Ray.

A population of trials trains in segments of ``perturbation_interval`` epochs, each segment a plain Lightning
``fit`` (one per trial, run in parallel as Ray tasks on a local Ray or a cluster, or in-process in sequence). After
each segment the trials are ranked by ``metric``; each trial of the bottom quantile copies (exploits) the checkpoint
and configuration of a random trial of the top quantile and perturbs (explores) the configuration:

.. math::
    \lambda' = \operatorname{clip}_{[a, b]}\big(\lambda \cdot f\big),\ f \in \{1.2, 0.8\}
    \quad\text{or, with probability } p_{\text{resample}},\quad \lambda' \sim \mathcal U[a, b].

It avoids the known pitfalls of PBT with Lightning checkpoints:

* the (mutated) configuration is applied in ``on_train_start``, *after* Lightning has restored the module, the
  optimizers and the loops, and written into the optimizer param groups (``"lr"``, ``"weight_decay"``), so the
  restored checkpoint never overrides it;
* a donor that has no checkpoint is never exploited (the trial keeps its own weights);
* checkpoints are kept per generation and never deleted while a trial may still restore them;
* explored values are clipped to the bounds of the search space.

The result holds the best configuration and checkpoint and each trial's discovered schedule (its lineage of
configurations); :func:`replay_schedule` turns a schedule into a :class:`HyperparameterSchedule` callback that
re-runs it in one plain Lightning run.

Ray is imported lazily (extra ``tune``); the explore / exploit functions are plain Python.

Example:
    >>> import random
    >>> space = {"kd.temperature": SearchDimension(1.0, 8.0), "lr": SearchDimension(1e-3, 1e-1, log=True)}
    >>> table = [TrialRecord(0, {"kd.temperature": 4.0, "lr": 0.01}, 0.9, "a.ckpt"),
    ...          TrialRecord(1, {"kd.temperature": 2.0, "lr": 0.05}, 0.5, "b.ckpt")]
    >>> decisions = pbt_exploit(table, space, mode="max", quantile_fraction=0.5, rng=random.Random(0),
    ...                         resample_probability=0.0)
    >>> decisions[1].donor, decisions[1].checkpoint
    (0, 'a.ckpt')
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_losses._utils import require
from lightning_losses.callbacks.schedules import (
    HyperparameterSchedule,
    PiecewiseSchedule,
    apply_hyperparameters,
    read_hyperparameters,
)

__all__ = [
    "ApplyHyperparameters",
    "ExploitDecision",
    "PBTResult",
    "PopulationBasedTraining",
    "SearchDimension",
    "TrialRecord",
    "pb2_explore",
    "pbt_exploit",
    "pbt_explore",
    "pbt_quantiles",
    "replay_schedule",
]


@dataclass(frozen=True)
class SearchDimension:
    """Bounds of one hyperparameter in the search space.

    Args:
        low: Lower bound (inclusive).
        high: Upper bound (inclusive).
        log: Sample (resample) uniformly in log space.
        integer: Round values to integers.
    """

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"A search dimension needs finite low < high, got low={self.low}, high={self.high}.")
        if self.log and self.low <= 0:
            raise ValueError(f"A log-scale search dimension needs low > 0, got {self.low}.")

    def clip(self, value: float) -> float:
        """Clip (and round, for integers) ``value`` into the bounds."""
        value = min(max(float(value), self.low), self.high)
        return float(round(value)) if self.integer else value

    def sample(self, rng: random.Random) -> float:
        """A uniform (or log-uniform) draw inside the bounds."""
        if self.log:
            return self.clip(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return self.clip(rng.uniform(self.low, self.high))


@dataclass
class TrialRecord:
    """One row of the population table: a trial's configuration, its last score and its last checkpoint."""

    trial_id: int
    config: dict[str, float]
    score: float | None
    checkpoint: str | None


@dataclass(frozen=True)
class ExploitDecision:
    """Trial ``trial_id`` restarts from ``donor``'s ``checkpoint`` with the explored ``config``."""

    trial_id: int
    donor: int
    checkpoint: str
    config: dict[str, float]


def _check_pbt_args(mode: str, quantile_fraction: float) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
    if not 0 < quantile_fraction <= 0.5:
        raise ValueError(f"`quantile_fraction` must be in (0, 0.5], got {quantile_fraction}.")


def pbt_quantiles(
    table: Sequence[TrialRecord], mode: Literal["min", "max"], quantile_fraction: float = 0.25
) -> tuple[list[int], list[int]]:
    """The bottom and top quantiles of the population, as trial ids (worst first, best last).

    Each quantile holds ``ceil(n · quantile_fraction)`` trials, at most ``n // 2``. Trials without a score rank
    below every scored trial. Ties keep the table order.
    """
    _check_pbt_args(mode, quantile_fraction)
    n = len(table)
    k = min(math.ceil(n * quantile_fraction), n // 2)
    if k == 0:
        return [], []
    sign = 1.0 if mode == "max" else -1.0

    def key(record: TrialRecord) -> tuple[int, float]:
        if record.score is None or not math.isfinite(record.score):
            return (0, 0.0)
        return (1, sign * record.score)

    ranked = sorted(table, key=key)  # stable: worst first
    return [r.trial_id for r in ranked[:k]], [r.trial_id for r in ranked[-k:]]


def pbt_explore(
    config: Mapping[str, float],
    space: Mapping[str, SearchDimension],
    rng: random.Random,
    resample_probability: float = 0.25,
    perturbation_factors: tuple[float, float] = (1.2, 0.8),
) -> dict[str, float]:
    """Perturb every searched value: resample with ``resample_probability``, else multiply by a random factor.

    Values outside ``space`` are copied unchanged; results are clipped to the bounds (integers rounded).
    """
    if not 0 <= resample_probability <= 1:
        raise ValueError(f"`resample_probability` must be in [0, 1], got {resample_probability}.")
    out = dict(config)
    for name, dim in space.items():
        if rng.random() < resample_probability or name not in config:
            out[name] = dim.sample(rng)
        else:
            out[name] = dim.clip(float(config[name]) * rng.choice(perturbation_factors))
    return out


def pbt_exploit(
    table: Sequence[TrialRecord],
    space: Mapping[str, SearchDimension],
    mode: Literal["min", "max"],
    quantile_fraction: float,
    rng: random.Random,
    resample_probability: float = 0.25,
    perturbation_factors: tuple[float, float] = (1.2, 0.8),
    explore: Callable[[Mapping[str, float]], dict[str, float]] | None = None,
) -> dict[int, ExploitDecision]:
    """Decide which bottom-quantile trials copy which top-quantile donor, and their explored configurations.

    Donors without a checkpoint are skipped; when no donor of the top quantile has one, nothing is exploited.
    ``explore`` replaces the PBT perturbation (``config -> new config``), e.g. by :func:`pb2_explore`.
    """
    bottom, top = pbt_quantiles(table, mode, quantile_fraction)
    by_id = {r.trial_id: r for r in table}
    donors = [t for t in top if by_id[t].checkpoint is not None]
    decisions: dict[int, ExploitDecision] = {}
    if not donors:
        return decisions
    for trial_id in bottom:
        donor = rng.choice(donors)
        record = by_id[donor]
        assert record.checkpoint is not None
        if explore is not None:
            config = {**record.config, **explore(record.config)}
        else:
            config = pbt_explore(record.config, space, rng, resample_probability, perturbation_factors)
        decisions[trial_id] = ExploitDecision(trial_id, donor, record.checkpoint, config)
    return decisions


def _to_unit(dim: SearchDimension, value: float) -> float:
    if dim.log:
        return (math.log(value) - math.log(dim.low)) / (math.log(dim.high) - math.log(dim.low))
    return (value - dim.low) / (dim.high - dim.low)


def _from_unit(dim: SearchDimension, u: float) -> float:
    if dim.log:
        return dim.clip(math.exp(math.log(dim.low) + u * (math.log(dim.high) - math.log(dim.low))))
    return dim.clip(dim.low + u * (dim.high - dim.low))


def pb2_explore(
    observations: Sequence[tuple[float, Mapping[str, float], float]],
    space: Mapping[str, SearchDimension],
    now: float,
    rng: random.Random,
    num_candidates: int = 512,
    kappa: float = 2.0,
) -> dict[str, float]:
    r"""PB2-style explore (Parker-Holder et al., 2020): a GP-bandit over the bounds instead of random perturbation.

    A Gaussian process (RBF + white noise, scikit-learn) is fitted to the observed *improvements* of the metric over
    one interval, as a function of the time and the (unit-scaled, log where asked) configuration; the new
    configuration maximises the upper confidence bound at the current time over random candidates:

    .. math:: x' = \arg\max_{x} \; \mu(t_{now}, x) + \kappa\, \sigma(t_{now}, x)

    With fewer than 3 observations the configuration is resampled uniformly (as PB2 starts). Observations are
    ``(time, config, improvement)`` with larger improvements better.
    """
    names = list(space)
    if len(observations) < 3:
        return {n: space[n].sample(rng) for n in names}
    np = require("numpy")
    gp_module = require("sklearn.gaussian_process", "tune")
    kernels = require("sklearn.gaussian_process.kernels", "tune")
    t_max = max(max(o[0] for o in observations), now, 1.0)
    X = np.array([[o[0] / t_max] + [_to_unit(space[n], float(o[1][n])) for n in names] for o in observations])
    y = np.array([float(o[2]) for o in observations])
    y = (y - y.mean()) / (y.std() + 1e-12)
    kernel = kernels.RBF(length_scale=np.ones(X.shape[1]), length_scale_bounds=(1e-2, 1e2)) + kernels.WhiteKernel(
        1e-2, (1e-6, 1e1)
    )
    gp = gp_module.GaussianProcessRegressor(kernel=kernel, normalize_y=False, random_state=rng.randrange(2**31))
    with warnings.catch_warnings():  # tiny, noisy data sets often hit a kernel bound; the fit is still usable
        warnings.simplefilter("ignore")
        gp.fit(X, y)
    gen = np.random.default_rng(rng.randrange(2**31))
    candidates = gen.uniform(size=(num_candidates, len(names)))
    query = np.concatenate([np.full((num_candidates, 1), now / t_max), candidates], axis=1)
    mean, std = gp.predict(query, return_std=True)
    best = candidates[int(np.argmax(mean + kappa * std))]
    return {n: _from_unit(space[n], float(u)) for n, u in zip(names, best)}


class ApplyHyperparameters(Callback):
    """Apply a configuration in ``on_train_start`` (after checkpoint restore) and record what is in effect.

    Names go through ``set_hyperparameter``; ``"lr"`` and ``"weight_decay"`` into every optimizer param group.
    ``observed`` holds the values read back at the first training batch. Use it in a Ray Tune function trainable
    too, with the trial's ``config``.

    Example:
        >>> ApplyHyperparameters({"kd.temperature": 2.0, "lr": 0.01}).config
        {'kd.temperature': 2.0, 'lr': 0.01}
    """

    def __init__(self, config: Mapping[str, float]) -> None:
        super().__init__()
        self.config = dict(config)
        self.observed: dict[str, float] | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        apply_hyperparameters(pl_module, self.config, trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.observed is None:
            self.observed = read_hyperparameters(pl_module, list(self.config), trainer)


def segment_trainer(trainer_kwargs: Mapping[str, Any], max_epochs: int, callbacks: Sequence[Callback]) -> pl.Trainer:
    """A quiet single-device Trainer for one trial segment; ``callbacks`` run before the user's own."""
    options: dict[str, Any] = dict(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(trainer_kwargs)
    options["max_epochs"] = max_epochs
    options["callbacks"] = [*callbacks, *options.get("callbacks", [])]
    return pl.Trainer(**options)


def _run_segment(
    module_factory: Callable[[], pl.LightningModule],
    datamodule_factory: Callable[[], pl.LightningDataModule],
    config: dict[str, float],
    restore_from: str | None,
    save_to: str,
    max_epochs: int,
    metric: str,
    trainer_kwargs: dict[str, Any],
    seed: int,
    num_threads: int | None,
) -> dict[str, Any]:
    """Train one trial for one segment; runs in a Ray worker or in-process."""
    if num_threads:
        torch.set_num_threads(num_threads)
    pl.seed_everything(seed, verbose=False)
    module, datamodule = module_factory(), datamodule_factory()
    apply = ApplyHyperparameters(config)
    trainer = segment_trainer(trainer_kwargs, max_epochs, [apply])
    trainer.fit(module, datamodule=datamodule, ckpt_path=restore_from)
    if metric not in trainer.callback_metrics:
        available = ", ".join(sorted(trainer.callback_metrics)) or "none"
        raise KeyError(
            f"The metric {metric!r} was not logged during validation (logged: {available}). Log it with "
            "`self.log(...)` in `validation_step` or pass the right `metric=`."
        )
    score = float(trainer.callback_metrics[metric])
    Path(save_to).parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(save_to)
    return {
        "score": score,
        "checkpoint": save_to,
        "observed": apply.observed or {},
        "global_step": int(trainer.global_step),
        "restored_from": restore_from,
    }


@dataclass
class PBTResult:
    """What a PBT run found.

    Attributes:
        best_trial: Id of the best trial of the last generation (``None`` when no trial reported).
        best_score: Its score (NaN when no trial reported).
        best_config: Its last configuration.
        best_checkpoint: Path of its last checkpoint (``None`` when it has none on disk).
        schedules: Per trial, its lineage ``[(start_epoch, config), ...]`` (the discovered schedule).
        table: One row per trial and generation: generation, trial, score, config, donor, restored_from,
            observed (the values in effect after restore), checkpoint. On Ray Tune: one row per report.
    """

    best_trial: int | None
    best_score: float
    best_config: dict[str, float]
    best_checkpoint: str | None
    schedules: dict[int, list[tuple[int, dict[str, float]]]]
    table: list[dict[str, Any]] = field(default_factory=list)


def replay_schedule(schedule: Sequence[tuple[int, Mapping[str, float]]], *, log: bool = True) -> HyperparameterSchedule:
    """A per-epoch :class:`HyperparameterSchedule` that re-runs a discovered PBT schedule in one Lightning run.

    Example:
        >>> cb = replay_schedule([(0, {"kd.temperature": 4.0}), (2, {"kd.temperature": 4.8})])
        >>> [cb.value_at(e)["kd.temperature"] for e in (0, 1, 2, 5)]
        [4.0, 4.0, 4.8, 4.8]
    """
    if not schedule:
        raise ValueError("The schedule is empty; pass a trial's `[(start_epoch, config), ...]` from PBTResult.")
    names = list(schedule[0][1])
    curves = {
        name: PiecewiseSchedule([(float(epoch), float(cfg[name])) for epoch, cfg in schedule], "constant")
        for name in names
    }
    return HyperparameterSchedule(curves, interval="epoch", log=log)


class PopulationBasedTraining:
    """Run PBT over the named hyperparameters of a LightningModule, on Ray (local or a cluster) or in-process.

    Args:
        module_factory: ``() -> LightningModule``; every trial and segment builds a fresh module (weights then come
            from the restored checkpoint).
        datamodule_factory: ``() -> LightningDataModule``.
        space: Search space: dotted hyperparameter names (``"kd.temperature"``) and ``"lr"`` / ``"weight_decay"``
            mapped to their bounds.
        population_size: Number of trials.
        metric: Validation metric logged by the module (``self.log(metric, ...)``).
        mode: ``"max"`` or ``"min"``.
        perturbation_interval: Epochs per segment (between two exploit/explore rounds).
        generations: Number of segments; every trial trains ``generations · perturbation_interval`` epochs.
        quantile_fraction: Fraction of the population in the bottom / top quantile.
        resample_probability: Probability of resampling a value instead of perturbing it.
        perturbation_factors: Multiplicative factors of the perturbation.
        initial_configs: Starting configurations (default: sampled from ``space``).
        resources: Per trial, ``{"cpu": 1, "gpu": 0}``.
        storage_path: Directory of the checkpoints (shared storage on a cluster).
        trainer_kwargs: Extra ``pl.Trainer`` arguments of every segment (``limit_train_batches`` ...).
        use_ray: Run the trials of a generation as parallel Ray tasks; ``False`` runs them in sequence here.
        ray_address: Address of a Ray cluster (``"auto"``); ``None`` starts a local Ray.
        derived: Names computed from every configuration, e.g. ``{"ce_weight": lambda c: 1 - c["kd.weight"]}``.
        explore: ``"pbt"`` (random perturbation / resampling) or ``"pb2"`` (GP-bandit over the bounds, fitted to
            the metric's improvement per interval; needs scikit-learn).
        seed: Seed of the random decisions and of each segment.
    """

    def __init__(
        self,
        module_factory: Callable[[], pl.LightningModule],
        datamodule_factory: Callable[[], pl.LightningDataModule],
        space: Mapping[str, SearchDimension],
        *,
        population_size: int = 4,
        metric: str = "val_acc",
        mode: Literal["min", "max"] = "max",
        perturbation_interval: int = 1,
        generations: int = 4,
        quantile_fraction: float = 0.25,
        resample_probability: float = 0.25,
        perturbation_factors: tuple[float, float] = (1.2, 0.8),
        initial_configs: Sequence[Mapping[str, float]] | None = None,
        resources: Mapping[str, float] | None = None,
        storage_path: str | Path = "pbt_checkpoints",
        trainer_kwargs: Mapping[str, Any] | None = None,
        use_ray: bool = True,
        ray_address: str | None = None,
        derived: Mapping[str, Callable[[Mapping[str, float]], float]] | None = None,
        explore: Literal["pbt", "pb2"] = "pbt",
        seed: int = 0,
    ) -> None:
        if not space:
            raise ValueError("The search space is empty; give at least one name with its SearchDimension bounds.")
        if population_size < 2:
            raise ValueError(f"`population_size` must be >= 2 for PBT to exploit, got {population_size}.")
        if perturbation_interval < 1 or generations < 1:
            raise ValueError(
                f"`perturbation_interval` and `generations` must be >= 1, got {perturbation_interval} and "
                f"{generations}."
            )
        _check_pbt_args(mode, quantile_fraction)
        if explore not in ("pbt", "pb2"):
            raise ValueError(f"`explore` must be 'pbt' or 'pb2', got {explore!r}.")
        if initial_configs is not None and len(initial_configs) != population_size:
            raise ValueError(
                f"`initial_configs` holds {len(initial_configs)} configurations for a population of {population_size}."
            )
        unknown = set(resources or {}) - {"cpu", "gpu"}
        if unknown:
            raise ValueError(f"`resources` keys must be 'cpu' and 'gpu', got {sorted(unknown)}.")
        self.module_factory, self.datamodule_factory = module_factory, datamodule_factory
        self.space = dict(space)
        self.population_size, self.metric, self.mode = population_size, metric, mode
        self.perturbation_interval, self.generations = perturbation_interval, generations
        self.quantile_fraction, self.resample_probability = quantile_fraction, resample_probability
        self.perturbation_factors = perturbation_factors
        self.rng = random.Random(seed)
        self.seed = seed
        if initial_configs is None:
            self.initial_configs = [
                {n: d.sample(self.rng) for n, d in self.space.items()} for _ in range(population_size)
            ]
        else:
            self.initial_configs = [
                {n: self.space[n].clip(v) if n in self.space else float(v) for n, v in c.items()}
                for c in initial_configs
            ]
        self.resources = {"cpu": 1.0, "gpu": 0.0, **(resources or {})}
        self.storage_path = Path(storage_path)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.use_ray, self.ray_address = use_ray, ray_address
        self.derived = dict(derived or {})
        self.explore = explore

    def _derive(self, config: Mapping[str, float]) -> dict[str, float]:
        out = dict(config)
        for name, fn in self.derived.items():
            out[name] = float(fn(out))
        return out

    def _run_generation(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        common: dict[str, Any] = dict(
            metric=self.metric,
            trainer_kwargs=self.trainer_kwargs,
            num_threads=max(1, int(self.resources["cpu"])),
        )
        if not self.use_ray:
            return [_run_segment(self.module_factory, self.datamodule_factory, **job, **common) for job in jobs]
        ray = require("ray", "tune")
        if not ray.is_initialized():
            ray.init(
                address=self.ray_address,
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=False,
                configure_logging=False,
            )
        remote = ray.remote(num_cpus=self.resources["cpu"], num_gpus=self.resources["gpu"])(_run_segment)
        refs = [remote.remote(self.module_factory, self.datamodule_factory, **job, **common) for job in jobs]
        return list(ray.get(refs))

    def fit(self) -> PBTResult:
        """Run every generation; return the best trial and every trial's schedule."""
        configs = [self._derive(c) for c in self.initial_configs]
        restore: list[str | None] = [None] * self.population_size
        schedules: dict[int, list[tuple[int, dict[str, float]]]] = {
            i: [(0, dict(configs[i]))] for i in range(self.population_size)
        }
        donors: list[int | None] = [None] * self.population_size
        rows: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        previous: list[float | None] = [None] * self.population_size  # score each trial's weights started from
        observations: list[tuple[float, dict[str, float], float]] = []
        sign = 1.0 if self.mode == "max" else -1.0
        for generation in range(self.generations):
            end_epoch = (generation + 1) * self.perturbation_interval
            jobs = [
                dict(
                    config=configs[i],
                    restore_from=restore[i],
                    save_to=str(self.storage_path / f"generation{generation:03d}" / f"trial{i:03d}.ckpt"),
                    max_epochs=end_epoch,
                    seed=self.seed + 1000 * generation + i,
                )
                for i in range(self.population_size)
            ]
            results = self._run_generation(jobs)
            table = []
            for i, res in enumerate(results):
                rows.append(
                    {
                        "generation": generation,
                        "trial": i,
                        "score": res["score"],
                        "config": dict(configs[i]),
                        "donor": donors[i],
                        "restored_from": res["restored_from"],
                        "observed": res["observed"],
                        "checkpoint": res["checkpoint"],
                    }
                )
                table.append(TrialRecord(i, dict(configs[i]), res["score"], res["checkpoint"]))
            restore = [res["checkpoint"] for res in results]
            for i, res in enumerate(results):
                if previous[i] is not None and math.isfinite(res["score"]):
                    observations.append((float(end_epoch), dict(configs[i]), sign * (res["score"] - previous[i])))
            previous = [res["score"] for res in results]
            donors = [None] * self.population_size
            if generation == self.generations - 1:
                break
            pb2: Callable[[Mapping[str, float]], dict[str, float]] | None = None
            if self.explore == "pb2":

                def pb2(config: Mapping[str, float], now: float = float(end_epoch)) -> dict[str, float]:
                    return pb2_explore(observations, self.space, now, self.rng)

            decisions = pbt_exploit(
                table,
                self.space,
                self.mode,
                self.quantile_fraction,
                self.rng,
                self.resample_probability,
                self.perturbation_factors,
                explore=pb2,
            )
            lineage = copy.deepcopy(schedules)
            for trial_id, decision in decisions.items():
                configs[trial_id] = self._derive(decision.config)
                restore[trial_id] = decision.checkpoint
                donors[trial_id] = decision.donor
                previous[trial_id] = results[decision.donor]["score"]
                schedules[trial_id] = [*lineage[decision.donor], (end_epoch, dict(configs[trial_id]))]
        best = max(range(self.population_size), key=lambda i: sign * results[i]["score"])
        return PBTResult(
            best_trial=best,
            best_score=results[best]["score"],
            best_config=dict(configs[best]),
            best_checkpoint=results[best]["checkpoint"],
            schedules=schedules,
            table=rows,
        )

r"""Deprecated: the Ray-task PBT engine. Population Based Training runs on Ray Tune's schedulers.

:func:`~lightning_losses.tuning.ray_tune.tune_population_based_training` (also ``lightning_losses.tuning``) runs
Ray Tune's :class:`~ray.tune.schedulers.PopulationBasedTraining` or :class:`~ray.tune.schedulers.pb2.PB2`; its
``synch=True`` gives the generations of this module's loop. :class:`PopulationBasedTraining` now warns and runs on
it; the explore / exploit functions here (``pbt_quantiles``, ``pbt_exploit``, ``pbt_explore``, ``pb2_explore``,
``TrialRecord``, ``ExploitDecision``) are no longer used by any engine, warn, and will be removed.

======================================  ==================================================================
``PopulationBasedTraining(...)``        ``tune_population_based_training(...)``
======================================  ==================================================================
``space``                               ``search_space``
``generations``                         ``max_epochs = generations * perturbation_interval``
``explore="pbt"`` / ``"pb2"``           ``scheduler="pbt"`` / ``"pb2"``
``resources``                           ``resources_per_trial``
the generation loop                     ``synch=True``
``use_ray=False`` (in sequence)         a local Ray sized to one trial: ``ray.init(num_cpus=1)`` first
``.fit()``                              the call itself returns the :class:`PBTResult`
======================================  ==================================================================

What Ray Tune lacks (bounded explore, the Lightning restore glue, the result table, schedule replay) lives in
:mod:`lightning_losses.tuning.common` and is re-exported here unchanged: :class:`SearchDimension`,
:class:`ApplyHyperparameters`, :class:`PBTResult`, :func:`replay_schedule`, :func:`segment_trainer`.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = PopulationBasedTraining(None, None, {"kd.temperature": SearchDimension(1.0, 8.0)})
    >>> "tune_population_based_training" in str(caught[0].message)
    True
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from lightning_losses.tuning.common import (
    ApplyHyperparameters,
    PBTResult,
    SearchDimension,
    check_mode_and_quantile,
    check_population,
    replay_schedule,
    segment_trainer,
)
from lightning_losses.utilities.imports import require

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
    "segment_trainer",
]

_ENGINE = (
    "Ray Tune's PopulationBasedTraining / PB2 schedulers decide the exploits and explores in "
    "`tune_population_based_training` (lightning_losses.tuning)"
)


def _deprecated(name: str) -> None:
    warnings.warn(
        f"`lightning_losses.tuning.pbt.{name}` is deprecated and will be removed: {_ENGINE}.",
        DeprecationWarning,
        stacklevel=3,
    )


@dataclass
class TrialRecord:
    """Deprecated. One row of the population table: a trial's configuration, its last score and its checkpoint."""

    trial_id: int
    config: dict[str, float]
    score: float | None
    checkpoint: str | None

    def __post_init__(self) -> None:
        _deprecated("TrialRecord")


@dataclass(frozen=True)
class ExploitDecision:
    """Deprecated. Trial ``trial_id`` restarts from ``donor``'s ``checkpoint`` with the explored ``config``."""

    trial_id: int
    donor: int
    checkpoint: str
    config: dict[str, float]

    def __post_init__(self) -> None:
        _deprecated("ExploitDecision")


def pbt_quantiles(
    table: Sequence[TrialRecord], mode: Literal["min", "max"], quantile_fraction: float = 0.25
) -> tuple[list[int], list[int]]:
    """Deprecated. The bottom and top quantiles of the population, as trial ids (worst first, best last).

    Each quantile holds ``ceil(n · quantile_fraction)`` trials, at most ``n // 2``. Trials without a score rank
    below every scored trial. Ties keep the table order.
    """
    _deprecated("pbt_quantiles")
    return _quantiles(table, mode, quantile_fraction)


def _quantiles(
    table: Sequence[TrialRecord], mode: Literal["min", "max"], quantile_fraction: float
) -> tuple[list[int], list[int]]:
    check_mode_and_quantile(mode, quantile_fraction)
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
    """Deprecated. Perturb every searched value: resample with ``resample_probability``, else multiply by a factor.

    Values outside ``space`` are copied unchanged; results are clipped to the bounds (integers rounded). Ray Tune's
    explore, followed by :class:`~lightning_losses.tuning.common.ClipToBounds`, does this in
    ``tune_population_based_training``.
    """
    _deprecated("pbt_explore")
    return _explore(config, space, rng, resample_probability, perturbation_factors)


def _explore(
    config: Mapping[str, float],
    space: Mapping[str, SearchDimension],
    rng: random.Random,
    resample_probability: float,
    perturbation_factors: tuple[float, float],
) -> dict[str, float]:
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
    """Deprecated. Which bottom-quantile trials copy which top-quantile donor, and their explored configurations.

    Donors without a checkpoint are skipped; when no donor of the top quantile has one, nothing is exploited.
    ``explore`` replaces the PBT perturbation (``config -> new config``), e.g. by :func:`pb2_explore`.
    """
    _deprecated("pbt_exploit")
    bottom, top = _quantiles(table, mode, quantile_fraction)
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
            config = _explore(record.config, space, rng, resample_probability, perturbation_factors)
        with warnings.catch_warnings():  # warned about once, above
            warnings.simplefilter("ignore", DeprecationWarning)
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
    r"""Deprecated (Ray Tune's ``PB2``: ``scheduler="pb2"``). PB2-style explore (Parker-Holder et al., 2020).

    A GP-bandit over the bounds instead of random perturbation.

    A Gaussian process (RBF + white noise, scikit-learn) is fitted to the observed *improvements* of the metric over
    one interval, as a function of the time and the (unit-scaled, log where asked) configuration; the new
    configuration maximises the upper confidence bound at the current time over random candidates:

    .. math:: x' = \arg\max_{x} \; \mu(t_{now}, x) + \kappa\, \sigma(t_{now}, x)

    With fewer than 3 observations the configuration is resampled uniformly (as PB2 starts). Observations are
    ``(time, config, improvement)`` with larger improvements better.
    """
    _deprecated("pb2_explore")
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


class PopulationBasedTraining:
    """Deprecated: :func:`~lightning_losses.tuning.ray_tune.tune_population_based_training` with ``synch=True``.

    Kept so existing code runs: the constructor warns (``DeprecationWarning``) and checks its arguments as before;
    :meth:`fit` runs the population on Ray Tune's synchronous ``PopulationBasedTraining`` (``explore="pb2"``:
    ``PB2``) through ``tune_population_based_training`` and returns its :class:`PBTResult`, keeping one table row
    per trial and generation (the report at the generation's last epoch), as this class did. The names map as in
    the table of this module; ``use_ray=False`` starts a local Ray sized to one trial (when Ray is not running yet),
    so the trials run one at a time (Ray Tune pauses each at every perturbation and runs the next) instead of
    in-process, and shuts it down afterwards.

    Args:
        module_factory: ``() -> LightningModule`` (picklable); weights of a restored trial come from the checkpoint.
        datamodule_factory: ``() -> LightningDataModule`` (picklable).
        space: ``search_space``: dotted hyperparameter names and ``"lr"`` / ``"weight_decay"`` with their bounds.
        population_size: Number of trials.
        metric: Validation metric logged by the module (``self.log(metric, ...)``).
        mode: ``"max"`` or ``"min"``.
        perturbation_interval: Epochs per generation.
        generations: Number of generations: ``max_epochs = generations * perturbation_interval``.
        quantile_fraction: Fraction of the population in the bottom / top quantile.
        resample_probability: Probability of resampling a value instead of perturbing it.
        perturbation_factors: Multiplicative factors of the perturbation.
        initial_configs: Starting configurations, one per trial (default: sampled from ``space``).
        resources: ``resources_per_trial``: ``{"cpu": 1, "gpu": 0}``.
        storage_path: Where Ray Tune writes trials and checkpoints (shared storage on a cluster).
        trainer_kwargs: Extra ``pl.Trainer`` arguments (``limit_train_batches`` ...).
        use_ray: ``False``: one trial at a time on a local Ray sized to one trial (see above).
        ray_address: Address of a Ray cluster (``"auto"``); ``None`` starts (or reuses) a local Ray.
        derived: Names computed from every configuration, e.g. ``{"ce_weight": lambda c: 1 - c["kd.weight"]}``
            (picklable functions).
        explore: ``scheduler``: ``"pbt"`` or ``"pb2"`` (Ray Tune's PB2, needs scikit-learn).
        seed: Seed of the initial sampling, Ray's explore and the Lightning runs.
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
        warnings.warn(
            "`PopulationBasedTraining` is deprecated and will be removed: call `tune_population_based_training("
            "module_factory, datamodule_factory, search_space, metric=..., mode=..., synch=True)` from "
            "lightning_losses.tuning (Ray Tune's PopulationBasedTraining / PB2 schedulers), which this class now "
            "runs. Names: space -> search_space, generations -> max_epochs = generations * perturbation_interval, "
            "explore -> scheduler, resources -> resources_per_trial, use_ray=False -> ray.init(num_cpus=1) before "
            "the call (one trial at a time), .fit() -> the call's result.",
            DeprecationWarning,
            stacklevel=2,
        )
        check_population(
            space,
            population_size,
            perturbation_interval,
            generations,
            mode,
            quantile_fraction,
            epochs_name="generations",
        )
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
        self.initial_configs = None if initial_configs is None else [dict(c) for c in initial_configs]
        self.resources = {"cpu": 1.0, "gpu": 0.0, **(resources or {})}
        self.storage_path = Path(storage_path)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.use_ray, self.ray_address = use_ray, ray_address
        self.derived = dict(derived or {})
        self.explore = explore
        self.seed = seed

    def tune_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``tune_population_based_training`` this configuration maps to."""
        resources = {k: v for k, v in self.resources.items() if k == "cpu" or v}
        return dict(
            search_space=self.space,
            metric=self.metric,
            mode=self.mode,
            population_size=self.population_size,
            perturbation_interval=self.perturbation_interval,
            max_epochs=self.generations * self.perturbation_interval,
            scheduler=self.explore,
            quantile_fraction=self.quantile_fraction,
            resample_probability=self.resample_probability,
            perturbation_factors=tuple(self.perturbation_factors),
            resources_per_trial=resources,
            storage_path=self.storage_path,
            ray_address=self.ray_address,
            seed=self.seed,
            trainer_kwargs=self.trainer_kwargs,
            initial_configs=self.initial_configs,
            derived=self.derived,
            synch=True,
        )

    def fit(self) -> PBTResult:
        """Run the population on Ray Tune (synchronous generations); return the best trial and every schedule."""
        from lightning_losses.tuning.ray_tune import tune_population_based_training

        ray = require("ray", "tune")
        started = False
        if not self.use_ray and self.ray_address is None and not ray.is_initialized():
            ray.init(  # room for one trial: the population runs one trial at a time
                num_cpus=max(1, math.ceil(self.resources["cpu"])),
                num_gpus=math.ceil(self.resources["gpu"]),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            started = True
        try:
            result = tune_population_based_training(
                self.module_factory, self.datamodule_factory, **self.tune_arguments()
            )
        finally:
            if started:
                ray.shutdown()
        # this class's table: one row per trial and generation, the report at the generation's last epoch
        rows = [r for r in result.table if r["epoch"] > 0 and r["epoch"] % self.perturbation_interval == 0]
        return dataclasses.replace(result, table=rows)

r"""What Population Based Training of a LightningModule needs besides Ray Tune's schedulers.

Ray Tune's :class:`~ray.tune.schedulers.PopulationBasedTraining` and :class:`~ray.tune.schedulers.pb2.PB2` decide
which trial exploits which and explore the configurations; the run itself is
:func:`~lightning_losses.tuning.ray_tune.tune_population_based_training`. This module holds the parts Ray Tune lacks:

* :class:`SearchDimension` and :class:`ClipToBounds`: bounded explore. Ray multiplies a value by a perturbation
  factor without clipping; the ``custom_explore_fn`` clips (and rounds integer) values into the bounds:

  .. math:: \lambda' = \operatorname{clip}_{[a, b]}\big(\lambda \cdot f\big),\ f \in \{1.2, 0.8\}

* :class:`ApplyHyperparameters` and :func:`segment_trainer`: the Lightning restore glue. The trial's configuration
  is applied in ``on_train_start``, after Lightning has restored the module, the optimizers and the loops, and
  written into the optimizer param groups (``"lr"``, ``"weight_decay"``), so a restored checkpoint never overrides
  it;
* :class:`PBTResult`: the result table (best trial, configuration, checkpoint, and every trial's lineage);
* :func:`replay_schedule`: a discovered schedule as a :class:`~lightning_losses.callbacks.HyperparameterSchedule`
  re-run in one plain Lightning run.

Nothing here imports Ray.

Example:
    >>> space = {"kd.temperature": SearchDimension(1.0, 8.0)}
    >>> ClipToBounds(space)({"kd.temperature": 9.6, "other": 3.0})
    {'kd.temperature': 8.0, 'other': 3.0}
    >>> replay_schedule([(0, {"kd.temperature": 4.0}), (2, {"kd.temperature": 4.8})]).value_at(3)
    {'kd.temperature': 4.8}
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_losses.callbacks.schedules import HyperparameterSchedule, PiecewiseSchedule
from lightning_losses.hyperparameters import apply_hyperparameters, read_hyperparameters, require_hyperparameters

__all__ = [
    "ApplyHyperparameters",
    "ClipToBounds",
    "PBTResult",
    "SearchDimension",
    "replay_schedule",
    "segment_trainer",
]


@dataclass(frozen=True)
class SearchDimension:
    """Bounds of one hyperparameter in the search space.

    Args:
        low: Lower bound (inclusive).
        high: Upper bound (inclusive).
        log: Sample (resample) uniformly in log space.
        integer: Round values to integers.

    Example:
        >>> SearchDimension(1e-3, 1e-1, log=True).clip(0.5)
        0.1
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


class ClipToBounds:
    """Ray Tune ``custom_explore_fn``: clip (and round integer) values of the search space into their bounds.

    Ray's PBT multiplies by a perturbation factor without clipping; this runs after it. Names outside the search
    space are left alone.

    Example:
        >>> ClipToBounds({"n": SearchDimension(1, 4, integer=True)})({"n": 4.8})
        {'n': 4.0}
    """

    def __init__(self, space: Mapping[str, SearchDimension]) -> None:
        self.space = dict(space)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, dim in self.space.items():
            if name in config:
                config[name] = dim.clip(float(config[name]))
        return config


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
        require_hyperparameters(pl_module, list(self.config), user="Population Based Training")
        apply_hyperparameters(pl_module, self.config, trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.observed is None:
            self.observed = read_hyperparameters(pl_module, list(self.config), trainer)


def segment_trainer(trainer_kwargs: Mapping[str, Any], max_epochs: int, callbacks: Sequence[Callback]) -> pl.Trainer:
    """A quiet single-device Trainer for one trial; ``callbacks`` run before the user's own."""
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


def check_population(
    search_space: Mapping[str, Any],
    population_size: int,
    perturbation_interval: int,
    epochs: int,
    mode: str,
    quantile_fraction: float,
    *,
    epochs_name: str = "max_epochs",
) -> None:
    """Raise ``ValueError`` on an empty search space, a population below 2, intervals below 1, a bad mode or fraction.

    ``epochs_name`` is the name of the ``epochs`` argument in the message (``"generations"`` for the deprecated class).

    Example:
        >>> check_population({"lr": SearchDimension(0.1, 1.0)}, 4, 2, 0, "max", 0.25)
        Traceback (most recent call last):
        ...
        ValueError: `perturbation_interval` and `max_epochs` must be >= 1, got 2 and 0.
    """
    if not search_space:
        raise ValueError("The search space is empty; give at least one name with its SearchDimension bounds.")
    if population_size < 2:
        raise ValueError(f"`population_size` must be >= 2 for PBT to exploit, got {population_size}.")
    if perturbation_interval < 1 or epochs < 1:
        raise ValueError(
            f"`perturbation_interval` and `{epochs_name}` must be >= 1, got {perturbation_interval} and {epochs}."
        )
    check_mode_and_quantile(mode, quantile_fraction)


def check_mode_and_quantile(mode: str, quantile_fraction: float) -> None:
    """Raise ``ValueError`` unless ``mode`` is ``"min"`` or ``"max"`` and ``quantile_fraction`` lies in ``(0, 0.5]``."""
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
    if not 0 < quantile_fraction <= 0.5:
        raise ValueError(f"`quantile_fraction` must be in (0, 0.5], got {quantile_fraction}.")


@dataclass
class PBTResult:
    """What a PBT run found.

    Attributes:
        best_trial: Index of the best trial (``None`` when no trial reported).
        best_score: Its score (NaN when no trial reported).
        best_config: Its last configuration.
        best_checkpoint: Path of its newest checkpoint (``None`` when it has none on disk).
        schedules: Per trial, its lineage ``[(start_epoch, config), ...]`` (the discovered schedule).
        table: One row per report: epoch, generation (the perturbation interval the epoch ends in, from 0), trial,
            score, config, donor, restored_epoch, restored_from and checkpoint (the Lightning checkpoints restored
            and written, ``None`` where there is none), observed (the values in effect after restore), and more.
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

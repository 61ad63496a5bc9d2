"""Population Based Training on Ray Tune (PBT / PB2) and its Lightning glue; the Self-Tuning Network loop.

``tune_population_based_training`` runs Ray Tune's ``PopulationBasedTraining`` / ``PB2`` schedulers over named
hyperparameters of a LightningModule; ``SearchDimension``, ``ClipToBounds``, ``ApplyHyperparameters``,
``PBTResult`` and ``replay_schedule`` are what it adds to Ray Tune (:mod:`lightning_losses.tuning.common`). The names
are loaded lazily: Ray itself is imported only when a run starts. :mod:`lightning_losses.tuning.pbt` is the
deprecated Ray-task engine.
"""

from typing import Any as _Any

_RAY_TUNE = ("tune_population_based_training", "TuneReportCheckpoint")
_COMMON = ("ApplyHyperparameters", "ClipToBounds", "PBTResult", "SearchDimension", "replay_schedule")

__all__ = [*_COMMON, *_RAY_TUNE]


def __getattr__(name: str) -> _Any:
    """Lazy export of the Ray Tune entry point and its shared parts."""
    if name in _RAY_TUNE:
        from lightning_losses.tuning import ray_tune

        return getattr(ray_tune, name)
    if name in _COMMON:
        from lightning_losses.tuning import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

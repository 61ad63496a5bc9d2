"""Ray Tune PBT/PB2 glue and the Self-Tuning Network loop. Import the submodules directly."""

from typing import Any as _Any


def __getattr__(name: str) -> _Any:
    """Lazy export of the Ray Tune entry point (Ray itself is imported only when a run starts)."""
    if name in ("tune_population_based_training", "ClipToBounds", "TuneReportCheckpoint"):
        from lightning_losses.tuning import ray_tune

        return getattr(ray_tune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

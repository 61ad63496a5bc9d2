"""Crash and resume: fit to step ``k``, checkpoint, resume to the end, and an uninterrupted run to compare with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import lightning.pytorch as pl

T = TypeVar("T")


@dataclass
class ResumedRuns(Generic[T]):
    """What ``fit`` returned for each of the three runs, and the checkpoint written at the crash step."""

    full: T
    first: T
    resumed: T
    checkpoint: Path


def crash_and_resume(
    fit: Callable[[int, Path | None], tuple[T, pl.Trainer]], *, crash_step: int, total_steps: int, tmp_path: Path
) -> ResumedRuns[T]:
    """Run ``fit`` uninterrupted, then to ``crash_step`` with a checkpoint, then resumed from it to ``total_steps``.

    Args:
        fit: ``fit(max_steps, ckpt_path)`` builds a model (fresh when ``ckpt_path`` is given: a new process), fits it
            for ``max_steps`` optimizer steps from ``ckpt_path`` and returns ``(result, trainer)``.
        crash_step: the global step at which the interrupted run stops and is checkpointed.
        total_steps: the number of steps of the uninterrupted and the resumed run.
        tmp_path: where the checkpoint is written.
    """
    if not 0 < crash_step < total_steps:
        raise ValueError(f"crash_step must lie in (0, total_steps={total_steps}), got {crash_step}.")
    full, _ = fit(total_steps, None)
    first, trainer = fit(crash_step, None)
    checkpoint = Path(tmp_path) / f"crash-step{crash_step}.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed, _ = fit(total_steps, checkpoint)
    return ResumedRuns(full=full, first=first, resumed=resumed, checkpoint=checkpoint)

"""One quiet CPU ``Trainer`` factory for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def cpu_trainer(tmp_path: str | Path | None = None, **overrides: Any) -> pl.Trainer:
    """A single-device CPU ``Trainer`` with no logger, progress bar, model summary or checkpointing.

    Args:
        tmp_path: ``default_root_dir`` of the run (Lightning's default, the working directory, when ``None``).
        **overrides: any ``Trainer`` argument; these replace the quiet defaults (``enable_checkpointing=True`` to
            checkpoint, ``num_sanity_val_steps=0`` to skip the sanity check, ``max_epochs``, ``callbacks``...).
    """
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if tmp_path is not None:
        options["default_root_dir"] = tmp_path
    options.update(overrides)
    return pl.Trainer(**options)

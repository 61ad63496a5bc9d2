"""Compatibility module: these helpers live in :mod:`lightning_losses.utilities`; import them from there."""

from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import (
    DeferredChecks,
    NumItems,
    check_hyperparameter,
    check_int,
    check_num_items,
    check_same_shape,
    check_targets,
    check_tensor,
    finite_error,
    finite_flag,
)
from lightning_losses.utilities.imports import require
from lightning_losses.utilities.numerics import as_float32, divide_by_items, hyperparameter_tensor

__all__ = [
    "DeferredChecks",
    "NumItems",
    "as_float32",
    "check_hyperparameter",
    "check_int",
    "check_num_items",
    "check_same_shape",
    "check_targets",
    "check_tensor",
    "divide_by_items",
    "finite_error",
    "finite_flag",
    "hyperparameter_tensor",
    "require",
    "unpack_batch",
]

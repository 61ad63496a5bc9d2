"""Loading state into buffers whose shape is only known once data has been seen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["follow_saved_shapes"]


def follow_saved_shapes(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, names: Iterable[str]) -> None:
    """Resize the buffers ``names`` of ``module`` to the shapes saved in ``state_dict`` before a strict load.

    Call it from ``_load_from_state_dict`` (which every load path runs: Lightning checkpoints, ``ddp_spawn`` result
    recovery, plain ``load_state_dict``) for buffers that start empty and grow with the data, such as class means or
    precomputed reference log-probabilities. Dtype and device of the current buffer are kept.

    Example:
        >>> m = nn.Module()
        >>> m.register_buffer("means", torch.empty(0))
        >>> follow_saved_shapes(m, {"means": torch.ones(2, 3)}, "", ["means"])
        >>> tuple(m.means.shape)
        (2, 3)
    """
    for name in names:
        saved = state_dict.get(prefix + name)
        current = module._buffers.get(name)
        if saved is not None and current is not None and saved.shape != current.shape:
            module._buffers[name] = torch.empty(saved.shape, dtype=current.dtype, device=current.device)

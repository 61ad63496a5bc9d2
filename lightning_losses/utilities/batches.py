"""Reading the parts of a classification batch, whatever its container."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["unpack_batch"]


def unpack_batch(batch: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """Split a classification batch into ``(inputs, target, index)``.

    Accepts ``(x, y)``, ``(x, y, index)`` and dicts with keys ``input``/``x``, ``target``/``y`` and ``index``.
    """
    if isinstance(batch, dict):
        x = batch.get("input", batch.get("x"))
        return x, batch.get("target", batch.get("y")), batch.get("index")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
    raise ValueError(
        f"Cannot unpack a batch of type {type(batch).__name__}: expected (inputs, target), (inputs, target, index) "
        "or a dict with keys 'input', 'target' and optionally 'index'."
    )

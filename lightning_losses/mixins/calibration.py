"""The calibration mixin: a train-time calibration loss on the user's LightningModule."""

from __future__ import annotations

import torch  # noqa: F401 - used by the doctest
from torch import Tensor, nn

from lightning_losses.losses.calibration import CALIBRATION_LOSSES
from lightning_losses.mixins.base import HyperparameterMixin

__all__ = ["CalibrationLossMixin"]


class CalibrationLossMixin(HyperparameterMixin):
    """Adds a train-time calibration loss (focal, adaptive focal, label smoothing, MMCE, MDCA, DCA) to a module.

    The concrete class calls :meth:`configure_calibration_loss` in its ``__init__`` and
    :meth:`calibration_loss` from its own ``training_step``. The loss is a submodule named after its kind
    (``"focal"``, ``"label_smoothing"``, ...), so its hyperparameters are reachable as
    ``get_hyperparameter("label_smoothing.smoothing")`` and are checkpointed with the module.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Model(CalibrationLossMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 3)
        ...         self.configure_calibration_loss("label_smoothing")
        >>> m = Model()
        >>> m.set_hyperparameter("label_smoothing.smoothing", 0.2)
        >>> loss = m.calibration_loss(m.net(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1]))
        >>> round(float(m.get_hyperparameter("label_smoothing.smoothing")), 3), loss.ndim
        (0.2, 0)
    """

    _calibration_loss_name: str | None = None

    def configure_calibration_loss(self, loss: str | nn.Module = "focal", name: str | None = None) -> nn.Module:
        """Attach the calibration loss as a submodule and return it.

        Args:
            loss: A loss module taking ``(logits, target)``, or one of ``"focal"``, ``"adaptive_focal"``,
                ``"label_smoothing"``, ``"mmce"``, ``"mdca"``, ``"dca"`` (built with default settings).
            name: Attribute name of the submodule (the prefix of its hyperparameter names); defaults to the
                loss's ``default_name`` (the kind above) or ``"calibration"``.
        """
        assert isinstance(self, nn.Module)
        if isinstance(loss, str):
            if loss not in CALIBRATION_LOSSES:
                raise ValueError(
                    f"Unknown calibration loss {loss!r}. Choose one of {sorted(CALIBRATION_LOSSES)} or pass a module."
                )
            module: nn.Module = CALIBRATION_LOSSES[loss]()
        elif isinstance(loss, nn.Module):
            module = loss
        else:
            raise TypeError(f"`loss` must be a loss name or an nn.Module, got {type(loss).__name__}.")
        attribute = str(name or getattr(module, "default_name", "calibration"))
        if "." in attribute or not attribute.isidentifier():
            raise ValueError(f"`name` must be a plain attribute name, got {attribute!r}.")
        if self._calibration_loss_name is not None and self._calibration_loss_name != attribute:
            delattr(self, self._calibration_loss_name)
        setattr(self, attribute, module)
        self._calibration_loss_name = attribute
        return module

    @property
    def calibration_loss_module(self) -> nn.Module:
        """The configured loss module."""
        if self._calibration_loss_name is None:
            raise RuntimeError(
                "No calibration loss configured: call self.configure_calibration_loss(...) in your __init__."
            )
        return getattr(self, self._calibration_loss_name)

    def calibration_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the configured calibration loss of ``(logits, target)`` (a scalar)."""
        return self.calibration_loss_module(logits, target)

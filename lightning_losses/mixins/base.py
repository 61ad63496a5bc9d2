"""The base every family mixin shares: named hyperparameters on the LightningModule."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_losses import hyperparameters as _hp

__all__ = ["HyperparameterMixin"]


class HyperparameterMixin:
    """Gives a LightningModule dotted access to every loss hyperparameter it holds.

    ``get_hyperparameter("kd.temperature")`` reads the buffer ``temperature`` of the submodule ``kd``;
    ``set_hyperparameter`` writes it in place after a range check. The values are buffers, so they are saved in
    checkpoints and restored with the module, whatever shape they had when saved. Compiled submodules keep their
    names. Schedules, PBT and STN use only these two methods.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_losses.losses.base import LossModule
        >>> class Smooth(LossModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_hyperparameter("amount", 0.1, low=0.0, high=1.0)
        >>> class Model(HyperparameterMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.ls = Smooth()
        >>> m = Model()
        >>> m.set_hyperparameter("ls.amount", 0.2)
        >>> round(float(m.get_hyperparameter("ls.amount")), 3)
        0.2
        >>> list(m.named_hyperparameters())
        ['ls.amount']
    """

    def get_hyperparameter(self, name: str) -> Tensor:
        """Return the current value of the hyperparameter ``name`` (a dotted path such as ``"kd.temperature"``)."""
        assert isinstance(self, nn.Module)
        return _hp.get_hyperparameter(self, name)

    def set_hyperparameter(self, name: str, value: float | Tensor) -> None:
        """Set the hyperparameter ``name`` in place after checking its finiteness and range."""
        assert isinstance(self, nn.Module)
        _hp.set_hyperparameter(self, name, value)

    def named_hyperparameters(self) -> dict[str, Tensor]:
        """Return every hyperparameter of this module and its submodules by dotted name."""
        assert isinstance(self, nn.Module)
        return _hp.named_hyperparameters(self)

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
        """Register a top-level hyperparameter (a loss weight, say) on the LightningModule itself.

        See :func:`lightning_losses.hyperparameters.register_hyperparameter`; the bounds are checked on every set.
        """
        assert isinstance(self, nn.Module)
        _hp.register_hyperparameter(
            self, name, value, low=low, high=high, low_inclusive=low_inclusive, high_inclusive=high_inclusive
        )

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
    names. Schedules, PBT and STN use only these two methods. A float attribute of a module the library does not own
    (a dropout rate of the network) is a hyperparameter only once exposed: ``self.expose_hyperparameter("net.2.p")``
    in ``__init__``.

    Example:
        >>> import lightning.pytorch as pl
        >>> import torch
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
        >>> m.drop = torch.nn.Dropout(0.1)
        >>> m.expose_hyperparameter("drop.p", high=0.5)
        >>> m.set_hyperparameter("drop.p", 0.2)
        >>> sorted(m.named_hyperparameters()), m.drop.p
        (['drop.p', 'ls.amount'], 0.2)
    """

    def get_hyperparameter(self, name: str) -> Tensor:
        """Return the current value of the hyperparameter ``name`` (a dotted path such as ``"kd.temperature"``)."""
        assert isinstance(self, nn.Module)
        return _hp.get_hyperparameter(self, name)

    def set_hyperparameter(self, name: str, value: float | Tensor) -> None:
        """Set the hyperparameter ``name`` in place after checking its finiteness and range."""
        assert isinstance(self, nn.Module)
        _hp.set_hyperparameter(self, name, value)

    def named_hyperparameters(self, *, include_attributes: bool = False) -> dict[str, Tensor]:
        """Return every hyperparameter of this module and its submodules by dotted name.

        The registered ones and the exposed attributes; ``include_attributes=True`` also lists the dropout rates
        that are not exposed (see :func:`lightning_losses.hyperparameters.named_hyperparameters`).
        """
        assert isinstance(self, nn.Module)
        return _hp.named_hyperparameters(self, include_attributes=include_attributes)

    # The two functions of lightning_losses.hyperparameters below serve as methods as they are (self is the module).

    #: Make the float attribute ``name`` of a submodule (``"student.drop.p"``) a named hyperparameter; call it in
    #: ``__init__`` (see :func:`lightning_losses.hyperparameters.expose_hyperparameter`).
    expose_hyperparameter = _hp.expose_hyperparameter

    #: Register a top-level hyperparameter (a loss weight, say) on the LightningModule itself; the bounds are checked
    #: on every set (see :func:`lightning_losses.hyperparameters.register_hyperparameter`).
    register_hyperparameter = _hp.register_hyperparameter

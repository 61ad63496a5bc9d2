"""lightning-losses: loss families of recent research as PyTorch Lightning mixins, callbacks and modules.

Everything public is importable from here (losses, nn blocks, metrics, mixins, callbacks, modules) and from
:mod:`lightning_losses.functional` (the pure tensor functions).
"""

from lightning_losses.callbacks import *
from lightning_losses.hyperparameters import (
    expose_hyperparameter,
    get_hyperparameter,
    named_hyperparameters,
    register_hyperparameter,
    set_hyperparameter,
)
from lightning_losses.losses import *
from lightning_losses.metrics import *
from lightning_losses.mixins import *
from lightning_losses.modules import *
from lightning_losses.nn import *

__version__ = "0.1.0"

"""LightningModule mixins, one per family. Put them before ``pl.LightningModule`` in the bases."""

from lightning_losses.mixins import calibration, distillation, temperature, unlearning
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.mixins.calibration import *
from lightning_losses.mixins.distillation import *
from lightning_losses.mixins.temperature import *
from lightning_losses.mixins.unlearning import *

__all__ = [
    *calibration.__all__,
    *distillation.__all__,
    *temperature.__all__,
    *unlearning.__all__,
    "HyperparameterMixin",
]
from lightning_losses.mixins import on_policy
from lightning_losses.mixins.on_policy import *

__all__ += on_policy.__all__

"""``nn.Module`` twins of the functional losses: validate and store settings (as named hyperparameters)."""

from lightning_losses.losses import calibration, distillation, temperature, unlearning
from lightning_losses.losses.base import LossModule
from lightning_losses.losses.calibration import *
from lightning_losses.losses.distillation import *
from lightning_losses.losses.temperature import *
from lightning_losses.losses.unlearning import *

__all__ = [*calibration.__all__, *distillation.__all__, *temperature.__all__, *unlearning.__all__, "LossModule"]

"""Pure tensor math, torch only: one module per family. No state, no Lightning."""

from lightning_losses.functional import calibration, chunked, distillation, temperature, unlearning
from lightning_losses.functional.calibration import *
from lightning_losses.functional.chunked import *
from lightning_losses.functional.distillation import *
from lightning_losses.functional.temperature import *
from lightning_losses.functional.unlearning import *

__all__ = [*calibration.__all__, *chunked.__all__, *distillation.__all__, *temperature.__all__, *unlearning.__all__]

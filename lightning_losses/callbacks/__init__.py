"""Trainer callbacks."""

from lightning_losses.callbacks import calibration, distillation, schedules, self_tuning, unlearning
from lightning_losses.callbacks.calibration import *
from lightning_losses.callbacks.distillation import *
from lightning_losses.callbacks.schedules import *
from lightning_losses.callbacks.self_tuning import *
from lightning_losses.callbacks.unlearning import *

__all__ = [*calibration.__all__, *distillation.__all__, *schedules.__all__, *self_tuning.__all__, *unlearning.__all__]
from lightning_losses.callbacks import conformal
from lightning_losses.callbacks.conformal import *

__all__ += conformal.__all__

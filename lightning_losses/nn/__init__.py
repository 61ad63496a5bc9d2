"""Trainable building blocks: heads, projectors, calibrators, TempNet, STN hyper-layers."""

from lightning_losses.nn import calibration, distillation, stn, tempnet
from lightning_losses.nn.calibration import *
from lightning_losses.nn.distillation import *
from lightning_losses.nn.stn import *
from lightning_losses.nn.tempnet import *

__all__ = [*calibration.__all__, *distillation.__all__, *stn.__all__, *tempnet.__all__]

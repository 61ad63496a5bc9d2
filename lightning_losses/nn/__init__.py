"""Trainable building blocks: heads, projectors, calibrators, TempNet, STN hyper-layers."""

from lightning_losses.nn.distillation import *
from lightning_losses.nn.tempnet import *  # noqa: F403
from lightning_losses.nn.calibration import *  # noqa: F403
from lightning_losses.nn.stn import *  # noqa: F403

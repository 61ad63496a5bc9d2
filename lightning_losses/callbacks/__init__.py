"""Trainer callbacks."""

from lightning_losses.callbacks.distillation import *
from lightning_losses.callbacks.schedules import *  # noqa: F403
from lightning_losses.callbacks.self_tuning import *  # noqa: F403
from lightning_losses.callbacks.calibration import *  # noqa: F403
from lightning_losses.callbacks.unlearning import *  # noqa: F403

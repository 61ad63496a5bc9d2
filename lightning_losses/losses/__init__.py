"""``nn.Module`` twins of the functional losses: validate and store settings (as named hyperparameters)."""

from lightning_losses.losses.base import LossModule
from lightning_losses.losses.distillation import *
from lightning_losses.losses.temperature import *  # noqa: F403
from lightning_losses.losses.calibration import *  # noqa: F403
from lightning_losses.losses.unlearning import *  # noqa: F403

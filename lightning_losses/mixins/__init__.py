"""LightningModule mixins, one per family. Put them before ``pl.LightningModule`` in the bases."""

from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.mixins.distillation import *
from lightning_losses.mixins.calibration import *  # noqa: F403
from lightning_losses.mixins.temperature import *  # noqa: F403
from lightning_losses.mixins.unlearning import *  # noqa: F403

"""Ready LightningModules assembled from the mixins."""

from lightning_losses.modules.distillation import *
from lightning_losses.modules.temperature import *  # noqa: F403

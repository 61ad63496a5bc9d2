"""Ready LightningModules assembled from the mixins."""

from lightning_losses.modules.distillation import *
from lightning_losses.modules.temperature import *  # noqa: F403
from lightning_losses.modules.unlearning import *  # noqa: F403

"""Ready LightningModules assembled from the mixins."""

from lightning_losses.modules import classification, distillation, temperature, unlearning
from lightning_losses.modules.classification import *
from lightning_losses.modules.distillation import *
from lightning_losses.modules.temperature import *
from lightning_losses.modules.unlearning import *

__all__ = [*classification.__all__, *distillation.__all__, *temperature.__all__, *unlearning.__all__]

"""Ready LightningModules assembled from the mixins."""

from lightning_losses.modules.distillation import *

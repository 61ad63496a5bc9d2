"""torchmetrics ``Metric`` classes (streaming calibration errors, unlearning metrics)."""

from lightning_losses.metrics import calibration, unlearning
from lightning_losses.metrics.calibration import *
from lightning_losses.metrics.unlearning import *

__all__ = [*calibration.__all__, *unlearning.__all__]

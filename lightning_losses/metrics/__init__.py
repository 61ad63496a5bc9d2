"""torchmetrics ``Metric`` classes (streaming calibration errors, unlearning metrics)."""

from lightning_losses.metrics.calibration import *  # noqa: F403
from lightning_losses.metrics.unlearning import *  # noqa: F403

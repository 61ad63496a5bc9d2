"""``nn.Module`` twins of the functional losses: validate and store settings (as named hyperparameters)."""

import lightning_losses.losses.unlearning_classification as unlearning_classification
from lightning_losses.losses import calibration, distillation, self_distillation, temperature, unlearning
from lightning_losses.losses.base import LossModule
from lightning_losses.losses.calibration import *
from lightning_losses.losses.distillation import *
from lightning_losses.losses.self_distillation import *
from lightning_losses.losses.temperature import *
from lightning_losses.losses.unlearning import *
from lightning_losses.losses.unlearning_classification import *

__all__ = [*calibration.__all__, *distillation.__all__, *temperature.__all__, *unlearning.__all__, "LossModule"]
__all__ += self_distillation.__all__
from lightning_losses.losses import feature_distillation  # noqa: E402
from lightning_losses.losses.feature_distillation import *  # noqa: E402

__all__ += feature_distillation.__all__
__all__ += unlearning_classification.__all__
from lightning_losses.losses import sparse_distillation  # noqa: E402
from lightning_losses.losses.sparse_distillation import *  # noqa: E402

__all__ += sparse_distillation.__all__

"""Pure tensor math, torch only: one module per family. No state, no Lightning."""

import lightning_losses.functional.unlearning_classification as unlearning_classification
from lightning_losses.functional import calibration, chunked, distillation, self_distillation, temperature, unlearning
from lightning_losses.functional.calibration import *
from lightning_losses.functional.chunked import *
from lightning_losses.functional.distillation import *
from lightning_losses.functional.self_distillation import *
from lightning_losses.functional.temperature import *
from lightning_losses.functional.unlearning import *
from lightning_losses.functional.unlearning_classification import *

__all__ = [*calibration.__all__, *chunked.__all__, *distillation.__all__, *temperature.__all__, *unlearning.__all__]
__all__ += self_distillation.__all__
from lightning_losses.functional import feature_distillation  # noqa: E402
from lightning_losses.functional.feature_distillation import *  # noqa: E402

__all__ += feature_distillation.__all__
__all__ += unlearning_classification.__all__
from lightning_losses.functional import sparse_distillation  # noqa: E402
from lightning_losses.functional.sparse_distillation import *  # noqa: E402

__all__ += sparse_distillation.__all__

"""Ready LightningModules assembled from the mixins."""

import lightning_losses.modules.classification_unlearning as classification_unlearning
from lightning_losses.modules import classification, distillation, self_distillation, temperature, unlearning
from lightning_losses.modules.classification import *
from lightning_losses.modules.classification_unlearning import *
from lightning_losses.modules.distillation import *
from lightning_losses.modules.self_distillation import *
from lightning_losses.modules.temperature import *
from lightning_losses.modules.unlearning import *

__all__ = [*classification.__all__, *distillation.__all__, *temperature.__all__, *unlearning.__all__]
__all__ += self_distillation.__all__
__all__ += classification_unlearning.__all__
from lightning_losses.modules import llm_distillation  # noqa: E402
from lightning_losses.modules.llm_distillation import *  # noqa: E402

__all__ += llm_distillation.__all__

"""Pure tensor math, torch only: one module per family. No state, no Lightning."""

# Each family module defines ``__all__``; everything listed there is re-exported here.
from lightning_losses.functional.distillation import *
from lightning_losses.functional.temperature import *  # noqa: F403
from lightning_losses.functional.chunked import *  # noqa: F403
from lightning_losses.functional.calibration import *  # noqa: F403
from lightning_losses.functional.unlearning import *  # noqa: F403

"""Helpers shared by every family, importing only torch and Lightning.

* :mod:`~lightning_losses.utilities.numerics`: float32 under autocast, hyperparameters as tensors, reductions, KL.
* :mod:`~lightning_losses.utilities.checks`: argument and tensor checks (``validate_args``).
* :mod:`~lightning_losses.utilities.distributed`: padded all-gather, dataloader shards, reductions.
* :mod:`~lightning_losses.utilities.tokens`: token counts per optimizer step.
* :mod:`~lightning_losses.utilities.checkpoints`: shape-following checkpoint loads.
* :mod:`~lightning_losses.utilities.imports`, :mod:`~lightning_losses.utilities.batches`: optional dependencies,
  classification batches.
"""

from lightning_losses.utilities.checkpoints import follow_saved_shapes
from lightning_losses.utilities.tokens import NUM_ITEMS_KEY, TokensPerStep, count_label_tokens, step_num_items

__all__ = ["NUM_ITEMS_KEY", "TokensPerStep", "count_label_tokens", "follow_saved_shapes", "step_num_items"]

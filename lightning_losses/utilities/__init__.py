"""Helpers shared by every family: token counts per optimizer step, shape-following checkpoint loads."""

from lightning_losses.utilities.checkpoints import follow_saved_shapes
from lightning_losses.utilities.tokens import NUM_ITEMS_KEY, TokensPerStep, count_label_tokens, step_num_items

__all__ = ["NUM_ITEMS_KEY", "TokensPerStep", "count_label_tokens", "follow_saved_shapes", "step_num_items"]

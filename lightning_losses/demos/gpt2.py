"""``TinyGPT2``: a GPT-2 built from its sizes, as a class (so LightningCLI configs can name it by ``class_path``).

Imported lazily by :mod:`lightning_losses.demos` (it needs transformers, ``pip install "lightning-losses[llm]"``).
"""

from __future__ import annotations

import torch

from lightning_losses.demos.language import gpt2_config
from lightning_losses.utilities.imports import require

__all__ = ["TinyGPT2"]

_transformers = require("transformers", "llm")


class TinyGPT2(_transformers.GPT2LMHeadModel):  # type: ignore[misc,name-defined]
    """``GPT2LMHeadModel`` of the given sizes, initialised from ``seed`` (as :func:`build_gpt2`), or loaded.

    ``weights`` names a ``state_dict`` file to load, e.g. the model written by ``examples/unlearning/train.py``.

    Example:
        >>> from lightning_losses.demos import TinyGPT2, build_gpt2
        >>> tiny = TinyGPT2(vocab_size=64, n_layer=1, n_embd=16, n_head=2, block_size=8)
        >>> built = build_gpt2(vocab_size=64, n_layer=1, n_embd=16, n_head=2, block_size=8)
        >>> all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), built.state_dict().values()))
        True
    """

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        block_size: int = 128,
        dropout: float = 0.0,
        seed: int = 0,
        weights: str | None = None,
    ) -> None:
        config = gpt2_config(vocab_size, n_layer, n_embd, n_head, block_size, dropout)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            super().__init__(config)
        if weights is not None:
            self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

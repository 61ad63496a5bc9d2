"""Small demo models and data helpers used by the docs, the examples, the tests and the benchmarks.

In the style of :mod:`lightning.pytorch.demos`: nothing here is part of a loss family; these are the pieces a
runnable example needs (a small CNN for the embedded digit images, a tiny GPT-2 built from a config, a plain
language-model module, label noise). Nothing is downloaded.

Example:
    >>> import torch
    >>> from lightning_losses.demos import ConvNet
    >>> tuple(ConvNet(width=4)(torch.zeros(2, 1, 8, 8)).shape)
    (2, 10)
"""

from typing import Any

from lightning_losses.demos.language import CausalLMModule, build_gpt2, causal_lm_logits
from lightning_losses.demos.vision import ConvNet, HyperConvNet, image_datamodule, symmetric_label_noise

__all__ = [
    "CausalLMModule",
    "ConvNet",
    "HyperConvNet",
    "TinyGPT2",
    "build_gpt2",
    "causal_lm_logits",
    "image_datamodule",
    "symmetric_label_noise",
]


def __getattr__(name: str) -> Any:
    # TinyGPT2 subclasses transformers' GPT2LMHeadModel: import transformers only when it is asked for
    if name == "TinyGPT2":
        from lightning_losses.demos.gpt2 import TinyGPT2

        return TinyGPT2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

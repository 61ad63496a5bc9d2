"""Language-model pieces of the jobs, now in :mod:`lightning_losses.demos` (re-exported for earlier import paths)."""

from lightning_losses.demos.language import CausalLMModule, build_gpt2, causal_lm_logits

__all__ = ["CausalLMModule", "build_gpt2", "causal_lm_logits"]

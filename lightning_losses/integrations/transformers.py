r"""Final hidden states and output head of a transformers causal LM, without computing its logits.

The chunked losses of :mod:`lightning_losses.functional.chunked` take the last hidden states and the head instead of
the ``batch × seq × V`` logits. :func:`causal_lm_hidden_states` runs only the model's backbone (``model.transformer``
for GPT-2, ``model.model`` for LLaMA-style models, through PEFT wrappers) and :func:`output_head` returns the head's
weight, bias and final-logit soft-capping, so that

.. math::

    \text{logits} = \operatorname{softcap}(h W^\top + b)

equals the model's own logits while the head itself is never run. ``transformers`` is imported lazily.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_losses._utils import require

__all__ = ["OutputHead", "backbone_of", "causal_lm_hidden_states", "output_head"]


class OutputHead(NamedTuple):
    """The output head of a causal LM: ``logits = softcap(hidden @ weight.T + bias)``."""

    weight: Tensor
    """Head weight, shape ``(V, d)`` (the input embedding matrix when the model ties them)."""
    bias: Tensor | None
    """Head bias, shape ``(V,)``, or ``None``."""
    softcap: float | None
    """Final-logit soft-capping value (``config.final_logit_softcapping``, Gemma-2 style), or ``None``."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT wrappers (adapter layers stay injected and active)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def _check_pretrained(model: nn.Module) -> None:
    transformers = require("transformers", "llm")
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"Expected a transformers causal LM (a PreTrainedModel such as GPT2LMHeadModel or LlamaForCausalLM, "
            f"optionally wrapped by PEFT), got {type(model).__name__}."
        )


def backbone_of(model: nn.Module) -> nn.Module:
    """The module that maps token ids to the final (normalised) hidden states, i.e. the causal LM without its head.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16))
        >>> type(backbone_of(lm)).__name__
        'GPT2Model'
    """
    model = _unwrap(model)
    _check_pretrained(model)
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ValueError(
            f"{type(model).__name__} has no backbone attribute {prefix!r} (its `base_model_prefix`): it is not a "
            "causal LM with a separate head. Pass a *ForCausalLM / *LMHeadModel instance."
        )
    return backbone


def output_head(model: nn.Module) -> OutputHead:
    """The weight, bias and logit soft-capping of a causal LM's output head.

    Raises:
        ValueError: when the head is not a plain ``nn.Linear`` (e.g. wrapped by a LoRA adapter, whose update would be
            missed) or the model scales its logits in a way this helper does not reproduce (``config.logit_scale``).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16))
        >>> head = output_head(lm)
        >>> head.weight.shape, head.bias, head.softcap
        (torch.Size([40, 8]), None, None)
        >>> head.weight is lm.transformer.wte.weight  # GPT-2 ties the head to the input embeddings
        True
    """
    model = _unwrap(model)
    _check_pretrained(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output head (get_output_embeddings() is None). Pass a causal LM "
            "(*ForCausalLM / *LMHeadModel), not its base model."
        )
    if type(head) is not nn.Linear:
        raise ValueError(
            f"The output head of {type(model).__name__} is a {type(head).__name__}, expected a plain torch.nn.Linear. "
            "If a PEFT adapter wraps the head, leave `lm_head` out of `target_modules` or merge the adapter first; "
            "otherwise compute the logits with the model itself."
        )
    config = getattr(model, "config", None)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        raise ValueError(
            f"{type(model).__name__} multiplies its logits by config.logit_scale={scale}, which the head returned "
            "here would not reproduce. Use the model's own logits for this architecture."
        )
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(head.weight, head.bias, None if softcap is None else float(softcap))


def causal_lm_hidden_states(
    model: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, OutputHead]:
    r"""Run a causal LM's backbone and return its final hidden states and output head; the logits are never formed.

    ``softcap(hidden @ head.weight.T + head.bias)`` equals ``model(input_ids, attention_mask).logits``. Feed the pair
    to :func:`~lightning_losses.functional.chunked.linear_cross_entropy`,
    :func:`~lightning_losses.functional.chunked.linear_sequence_log_probs` (``shift=True`` for labels that are the
    input ids) or :func:`~lightning_losses.functional.chunked.linear_distillation_loss`.

    Args:
        model: a transformers causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), optionally wrapped by PEFT;
            active adapters are applied.
        input_ids: token ids ``(B, T)``.
        attention_mask: optional mask ``(B, T)``.
        **kwargs: further backbone arguments (``position_ids``, ``inputs_embeds``, ...); ``use_cache`` defaults to
            ``False``.

    Returns:
        ``(hidden, head)``: hidden states ``(B, T, d)`` after the final norm, and :class:`OutputHead`.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16)).eval()
        >>> ids = torch.randint(0, 40, (2, 5))
        >>> hidden, head = causal_lm_hidden_states(lm, ids)
        >>> torch.allclose(hidden @ head.weight.T, lm(ids).logits, atol=1e-5)
        True
    """
    head = output_head(model)
    backbone = backbone_of(model)
    kwargs.setdefault("use_cache", False)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = backbone(**kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden, head

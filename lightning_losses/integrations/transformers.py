r"""Final hidden states and output head of a transformers causal LM, without computing its logits.

The chunked losses of :mod:`lightning_losses.functional.chunked` take the last hidden states and the head instead of
the ``batch × seq × V`` logits. :func:`causal_lm_hidden_states` runs the model's own forward (through PEFT wrappers
and FSDP2's hooks) with the head stood in for by a recorder of its input, and :func:`output_head` returns the head's
weight, bias and final-logit soft-capping, so that

.. math::

    \text{logits} = \operatorname{softcap}(h W^\top + b)

equals the model's own logits while the head itself is never run. ``transformers`` is imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_losses.utilities.imports import require

__all__ = ["HiddenStatesUnavailable", "OutputHead", "backbone_of", "causal_lm_hidden_states", "output_head"]


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
    if _unsharded_class(head) is not nn.Linear:
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


class HiddenStatesUnavailable(ValueError):
    """The model runs, but its hidden states and whole head cannot be read under the current sharding.

    Raised by :func:`causal_lm_hidden_states`; callers that can fall back to the model's logits catch exactly this.
    """


def causal_lm_hidden_states(
    model: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, OutputHead]:
    r"""Run a causal LM and return its final hidden states and output head; the logits are never formed.

    ``softcap(hidden @ head.weight.T + head.bias)`` equals ``model(input_ids, attention_mask).logits``. Feed the pair
    to :func:`~lightning_losses.functional.chunked.linear_cross_entropy`,
    :func:`~lightning_losses.functional.chunked.linear_sequence_log_probs` (``shift=True`` for labels that are the
    input ids) or :func:`~lightning_losses.functional.chunked.linear_distillation_loss`.

    The model is called through its own ``forward`` (so every hook on it runs: PEFT's, and the parameter gathering
    of a sharded model) with the output head replaced, for the duration of the call, by a stand-in that records the
    head's input and returns a ``(..., 1)`` placeholder. The head is read after the call. Under FSDP2
    (``fully_shard``) this works when the head belongs to the root's group (``fully_shard(model)``, with or without
    the blocks sharded too): the root keeps its parameters gathered from its forward to its backward, so
    ``head.weight`` is the full matrix, and its gradient is reduce-scattered by FSDP as usual. A head that needs no
    gradient (a frozen teacher sharded with ``reshard_after_forward=True``) is gathered whole after the forward.

    Args:
        model: a transformers causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), optionally wrapped by PEFT
            and / or sharded by ``fully_shard``; active adapters are applied.
        input_ids: token ids ``(B, T)``.
        attention_mask: optional mask ``(B, T)``.
        **kwargs: further arguments of the model's forward (``position_ids``, ``inputs_embeds``, ...); ``use_cache``
            defaults to ``False``. Not ``labels``: the model would compute its loss on the placeholder.

    Returns:
        ``(hidden, head)``: hidden states ``(B, T, d)`` after the final norm, and :class:`OutputHead`.

    Raises:
        ValueError: when the head cannot be used directly (see :func:`output_head`).
        HiddenStatesUnavailable: (a ``ValueError``) when the head has its own ``fully_shard``
            group, is partitioned by DeepSpeed ZeRO-3, is still sharded after the forward while it needs a gradient
            (FSDP2 ``reshard_after_forward=True`` on the root), or the model's forward does not call its head exactly
            once. Callers that can,
            fall back to the model's logits on this error.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16)).eval()
        >>> ids = torch.randint(0, 40, (2, 5))
        >>> hidden, head = causal_lm_hidden_states(lm, ids)
        >>> torch.allclose(hidden @ head.weight.T, lm(ids).logits, atol=1e-5)
        True
    """
    if "labels" in kwargs:
        raise ValueError(
            "causal_lm_hidden_states does not take `labels`: the model's own loss would be computed on a placeholder "
            "instead of the logits. Compute the loss from the returned hidden states and head."
        )
    base = _unwrap(model)
    checked = output_head(model)  # validates the model and its head before anything runs
    head = base.get_output_embeddings()  # type: ignore[operator]
    if _is_fsdp_module(head):
        raise HiddenStatesUnavailable(
            f"The output head of {type(base).__name__} has its own `fully_shard` group, so its weight is resharded "
            "right after its forward and cannot be read whole. Leave the head in the root's group (call "
            "`fully_shard` on the blocks and on the whole model, not on the head)."
        )
    if hasattr(head.weight, "ds_id"):
        raise HiddenStatesUnavailable(
            f"The output head of {type(base).__name__} is partitioned by DeepSpeed ZeRO-3, so its weight is gathered "
            "only during the head's own forward and cannot be read whole afterwards. Use the model's logits (or ZeRO "
            "stage 1 or 2)."
        )
    parent, attribute = _parent_of(base, head)
    stand_in = _CapturingHead()
    kwargs.setdefault("use_cache", False)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    setattr(parent, attribute, stand_in)
    try:
        out = model(**kwargs)
    finally:
        setattr(parent, attribute, head)
    if len(stand_in.inputs) != 1:
        raise HiddenStatesUnavailable(
            f"The forward of {type(base).__name__} called its output head {len(stand_in.inputs)} times, expected "
            "once: its hidden states cannot be taken from the head's input. Use the model's logits instead."
        )
    hidden = stand_in.inputs[0]
    weight, bias = _whole(head.weight), None if head.bias is None else _whole(head.bias)
    vocab, width = head.out_features, head.in_features  # the weight's shape may be partitioned away
    if _is_dtensor(weight) or tuple(weight.shape) != (vocab, width):
        raise HiddenStatesUnavailable(
            f"The output head's weight is sharded or partitioned after the forward (a {type(weight).__name__} of "
            f"shape {tuple(weight.shape)}, expected the full ({vocab}, {width})) and needs a gradient: FSDP2 with "
            "`reshard_after_forward=True` on the root, or DeepSpeed ZeRO-3. Keep the root's default "
            "`reshard_after_forward` (the root stays gathered until its backward), or use the model's logits."
        )
    anchors = [t for t in _tensors(out) if t.requires_grad] if torch.is_grad_enabled() else []
    if anchors:
        # the model's own outputs must be part of the backward graph: hooks registered on them (FSDP2's
        # pre-backward, which reduce-scatters the gradients at the end of the backward) then run
        hidden = _Anchor.apply(hidden, *anchors)
    return hidden, OutputHead(weight, bias, checked.softcap)


class _CapturingHead(nn.Module):
    """Stands in for an output head during one forward: records its input, returns a ``(..., 1)`` placeholder."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, hidden: Tensor) -> Tensor:
        self.inputs.append(hidden)
        return _Placeholder.apply(hidden)


class _Placeholder(torch.autograd.Function):
    """Zeros of shape ``(..., 1)`` attached to the graph of ``hidden`` (so they require grad when it does)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor) -> Tensor:
        return hidden.new_zeros((*hidden.shape[:-1], 1))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None


class _Anchor(torch.autograd.Function):
    """Identity on ``hidden`` whose backward also gives a zero gradient to ``anchors``, so their hooks run."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, *anchors: Tensor) -> Tensor:
        ctx.anchors = [(a.shape, a.dtype, a.device) for a in anchors]
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.anchors]
        return (grad, *zeros)


def _tensors(output: Any) -> list[Tensor]:
    """The tensors of a model output (a ``ModelOutput``, tuple or tensor), without the cache."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [v for k, v in output.items() if isinstance(v, Tensor) and k != "past_key_values"]
    if isinstance(output, (tuple, list)):
        return [v for v in output if isinstance(v, Tensor)]
    return []


def _parent_of(root: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    """The parent of ``module`` inside ``root`` and its attribute name there."""
    for name, sub in root.named_modules():
        if sub is module and name:
            parent_name, _, attribute = name.rpartition(".")
            return root.get_submodule(parent_name), attribute
    raise ValueError(
        f"The output head of {type(root).__name__} is not one of its submodules, so the model's forward cannot be run "
        "without it. Use the model's logits instead."
    )


def _is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _unsharded_class(module: nn.Module) -> type:
    """The class of ``module`` before ``fully_shard`` (which swaps in a subclass ``FSDP<Class>(FSDPModule, Class)``)."""
    cls = type(module)
    return cls.__bases__[-1] if _is_fsdp_module(module) else cls


def _whole(tensor: Tensor) -> Tensor:
    """A sharded (DTensor) parameter gathered whole when no gradient is needed (a frozen, resharded teacher)."""
    if _is_dtensor(tensor) and not (torch.is_grad_enabled() and tensor.requires_grad):
        return tensor.full_tensor()  # type: ignore[attr-defined, no-any-return]
    return tensor


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)

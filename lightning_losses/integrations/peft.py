r"""PEFT glue for unlearning: the reference model through adapters, adapter freshness, saving adapters.

A LoRA adapter adds :math:`\Delta W = B A` with :math:`B = 0` at creation, so a *fresh* adapter leaves the model
unchanged and ``disable_adapter()`` gives back exactly the model before unlearning, with no second copy of the
weights. Once an adapter has been trained (:math:`B \ne 0`), disabling it gives the base model *without* that
fine-tune: such a model must be merged first, or its fine-tuned state loaded as a second, named reference adapter.

``peft`` is imported lazily (only :func:`lora_model` imports it); the other helpers only inspect modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_losses.utilities.distributed import rank_and_world_size
from lightning_losses.utilities.imports import require

__all__ = [
    "active_adapter_name",
    "adapter_is_fresh",
    "adapter_parameter_names",
    "disabled_adapter",
    "eval_mode",
    "is_peft_model",
    "lora_model",
    "named_adapter",
    "save_adapter",
]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by PEFT (has ``peft_config`` and ``disable_adapter``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


def active_adapter_name(model: nn.Module) -> str:
    """The name of the single active adapter of a PEFT model."""
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"Expected one active adapter, got {list(active)}. Activate one with `set_adapter`.")
        active = active[0]
    if not isinstance(active, str):
        raise ValueError(f"{type(model).__name__} has no active PEFT adapter.")
    return active


def adapter_parameter_names(model: nn.Module, adapter: str) -> list[str]:
    """Names of the parameters that belong to ``adapter`` (those whose dotted path holds ``.<adapter>.``)."""
    token = f".{adapter}."
    return [n for n, _ in model.named_parameters() if token in f".{n}." and ("lora_" in n or "adapter" in n)]


def adapter_is_fresh(model: nn.Module, adapter: str | None = None) -> bool:
    """Whether a LoRA adapter is still at its initialisation (every ``lora_B`` / ``lora_embedding_B`` is zero).

    Only LoRA-family adapters can be checked; for any other adapter type the answer is ``False`` (not provably
    fresh).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0)
        >>> lm = GPT2LMHeadModel(config)
        >>> peft_lm = lora_model(lm, r=2)
        >>> adapter_is_fresh(peft_lm)
        True
        >>> with torch.no_grad():
        ...     _ = next(p for n, p in peft_lm.named_parameters() if "lora_B" in n).add_(1.0)
        >>> adapter_is_fresh(peft_lm)
        False
    """
    name = adapter or active_adapter_name(model)
    found = False
    for param_name, param in model.named_parameters():
        if f".{name}." not in f".{param_name}.":
            continue
        if "lora_B" in param_name or "lora_embedding_B" in param_name:
            found = True
            if bool(param.detach().ne(0).any()):
                return False
    return found


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (dropout off) and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def disabled_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its adapters disabled, in eval mode and without gradient: the reference of a fresh adapter."""
    if not is_peft_model(model):
        raise TypeError(
            f"`disabled_adapter` needs a PEFT model (with `disable_adapter()`), got {type(model).__name__}."
        )
    with torch.no_grad(), eval_mode(model), model.disable_adapter():  # type: ignore[operator]
        yield model


@contextmanager
def named_adapter(model: nn.Module, adapter: str) -> Iterator[nn.Module]:
    """The model with ``adapter`` active instead of the trained one, in eval mode and without gradient.

    The previously active adapter and every parameter's ``requires_grad`` are restored afterwards (PEFT's
    ``set_adapter`` would otherwise make the reference adapter trainable and freeze the trained one).
    """
    peft_config = getattr(model, "peft_config", {})
    if adapter not in peft_config:
        raise ValueError(
            f"No adapter named {adapter!r} on the model (adapters: {sorted(peft_config)}). Load the model before "
            f"unlearning as a reference adapter: `model.load_adapter(path, adapter_name={adapter!r})`."
        )
    previous = active_adapter_name(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter)  # type: ignore[operator]
    try:
        with torch.no_grad(), eval_mode(model):
            yield model
    finally:
        model.set_adapter(previous)  # type: ignore[operator]
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_model(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    adapter_name: str = "default",
    config: Any = None,
) -> nn.Module:
    """Wrap a transformers causal LM with a fresh LoRA adapter (base weights frozen).

    Either the keyword shortcuts (``r``, ``alpha``, ``dropout``, ``target_modules``) or a full ``peft.LoraConfig``
    as ``config`` (every LoRA setting: ``modules_to_save``, ``use_rslora``, ``init_lora_weights``, ...); the config
    is copied, never modified. Without a ``task_type`` it is given ``"CAUSAL_LM"``. ``target_modules`` defaults to
    PEFT's per-architecture choice (``c_attn`` for GPT-2), whose ``Conv1D`` layers get ``fan_in_fan_out=True``.

    Raises:
        TypeError: ``config`` is not a ``peft.LoraConfig``.
        ValueError: both ``config`` and a shortcut other than its default are given.

    Example:
        >>> from peft import LoraConfig
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16))
        >>> wrapped = lora_model(lm, config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]))
        >>> wrapped.peft_config["default"].r, sorted(wrapped.peft_config["default"].target_modules)
        (4, ['c_attn', 'c_proj'])
    """
    peft = require("peft", "llm")
    gpt2_style = type(model).__name__.startswith("GPT2")
    if config is None:
        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
            task_type="CAUSAL_LM",
            fan_in_fan_out=gpt2_style,
        )
    else:
        if not isinstance(config, peft.LoraConfig):
            raise TypeError(
                f"`config` must be a peft.LoraConfig, got {type(config).__name__}. For another adapter type call "
                "peft.get_peft_model(model, config) yourself."
            )
        shortcuts = {"r": (r, 8), "alpha": (alpha, 16), "dropout": (dropout, 0.0)}
        given = [name for name, (value, default) in shortcuts.items() if value != default]
        given += ["target_modules"] if target_modules is not None else []
        if given:
            raise ValueError(
                f"Pass either `config` (a LoraConfig) or the shortcuts, not both: got `config` and {given}. Set them "
                "on the LoraConfig instead."
            )
        config = copy.deepcopy(config)
        if config.task_type is None:
            config.task_type = "CAUSAL_LM"
        if gpt2_style and not config.fan_in_fan_out:
            config.fan_in_fan_out = True  # GPT-2's Conv1D stores the weight transposed
    return peft.get_peft_model(model, config, adapter_name=adapter_name)


def save_adapter(model: nn.Module, directory: str | Path, **kwargs: Any) -> Path:
    """Save the adapter(s) of a PEFT model with ``save_pretrained`` (only the adapter weights and config).

    Under a process group every process must call it: a model sharded by FSDP2 (``fully_shard``) is gathered whole
    first (a collective), and process 0 alone writes. On one process it simply writes.
    """
    if not is_peft_model(model):
        raise TypeError(f"`save_adapter` needs a PEFT model, got {type(model).__name__}.")
    path = Path(directory)
    if "state_dict" not in kwargs and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on process 0 only
        kwargs["state_dict"] = get_model_state_dict(model, options=options)
    if rank_and_world_size()[0] != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), **kwargs)  # type: ignore[operator]
    return path


def _is_sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is a DTensor (FSDP2 / tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())

"""Frozen teachers from a Lightning checkpoint, a ``state_dict`` file or a Hugging Face ``save_pretrained`` folder.

A Lightning checkpoint stores the whole LightningModule: the network's weights sit under the attribute it had on the
module (``model.``, ``student.``, ``model.base_model.model.`` for a PEFT-wrapped one), beside everything else the
module held. :func:`load_teacher` finds that prefix by matching the checkpoint's keys with the architecture it is
given (or takes ``prefix=``), loads exactly those weights (strictly: a missing or unexpected weight is an error that
names them), merges LoRA adapters into the weights when the architecture is a PEFT model, and returns the network
frozen and in eval mode, ready to be a distillation teacher.

``transformers`` (for folders) and ``peft`` (for adapter folders) are imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_losses.utilities.imports import require

__all__ = ["find_state_dict_prefix", "load_teacher"]


def find_state_dict_prefix(state_dict: Mapping[str, Any], model: nn.Module) -> str:
    """The key prefix under which ``state_dict`` holds ``model``'s weights (``""`` when the keys match as they are).

    The prefix is chosen among the leading dotted parts of the checkpoint's keys: the one under which most of
    ``model``'s keys are found with their shapes (the shortest on a tie).

    Raises:
        ValueError: no prefix gives any of the model's keys.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> saved = {f"student.{k}": v for k, v in net.state_dict().items()} | {"teacher.weight": torch.zeros(1)}
        >>> find_state_dict_prefix(saved, net)
        'student.'
    """
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    candidates = {""}
    for key in state_dict:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))

    def hits(prefix: str) -> int:
        found = (state_dict.get(prefix + k) for k in wanted)
        return sum(1 for v, shape in zip(found, wanted.values()) if tuple(getattr(v, "shape", (-1,))) == shape)

    scored = [(hits(p), -len(p), p) for p in candidates]
    n_found, _, best = max(scored)
    if n_found == 0:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            f"None of the {len(wanted)} weights of {type(model).__name__} (e.g. {sorted(wanted)[:3]}) is in the "
            f"checkpoint under any prefix (its keys look like {sample}). Pass the architecture the checkpoint was "
            "trained with (wrapped the same way, e.g. by lora_model), or `prefix=`."
        )
    return best


def _read_state_dict(path: Path, weights_only: bool) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        safetensors = require("safetensors.torch", "llm")
        return dict(safetensors.load_file(str(path)))
    saved = torch.load(path, map_location="cpu", weights_only=weights_only)
    if isinstance(saved, Mapping) and isinstance(saved.get("state_dict"), Mapping):
        return dict(saved["state_dict"])  # a Lightning checkpoint
    if isinstance(saved, Mapping) and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return dict(saved)
    raise ValueError(
        f"{path} holds neither a Lightning checkpoint (a dict with 'state_dict') nor a state_dict of tensors "
        f"(got {type(saved).__name__})."
    )


def _freeze(model: nn.Module, dtype: torch.dtype | None, device: Any) -> nn.Module:
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def load_teacher(
    source: str | Path,
    model: nn.Module | None = None,
    prefix: str | None = None,
    strict: bool = True,
    merge_adapters: bool = True,
    dtype: torch.dtype | None = None,
    device: Any = None,
    weights_only: bool = True,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A frozen (``requires_grad=False``), eval-mode teacher network loaded from ``source``.

    Args:
        source: one of

            * a Lightning checkpoint (``.ckpt``): the weights under ``prefix`` of its ``state_dict``;
            * a ``state_dict`` file (``torch.save``, ``.pt`` / ``.bin``, or ``.safetensors``);
            * a Hugging Face ``save_pretrained`` folder (``config.json``): loaded with
              ``AutoModelForCausalLM.from_pretrained`` (local files only), or with ``type(model).from_pretrained``
              when ``model`` is given;
            * a PEFT adapter folder (``adapter_config.json``): the adapter loaded onto ``model`` (the base network).
        model: the architecture to load a checkpoint or ``state_dict`` into (the same as trained: a PEFT-wrapped
            student needs the same wrapping), or the base of an adapter folder. Modified in place and returned.
        prefix: the key prefix of the network in the checkpoint (``"student."``, ``"model."``); ``None``: found by
            :func:`find_state_dict_prefix`.
        strict: refuse missing or unexpected weights under the prefix (``False``: load what matches).
        merge_adapters: merge a PEFT model's adapters into its weights and drop the wrapper (a plain network, with
            no adapter arithmetic per step).
        dtype: cast the teacher to this dtype (e.g. ``torch.bfloat16``).
        device: move the teacher there.
        weights_only: unpickle only tensors and plain containers (``torch.load(weights_only=True)``); set ``False``
            only for a checkpoint you trust that holds other objects.
        **from_pretrained_kwargs: passed to ``from_pretrained`` for a folder.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a checkpoint without ``model``, a prefix that holds none of the model's weights, or (``strict``)
            missing / unexpected weights.

    Example:
        >>> import tempfile
        >>> student = nn.Sequential(nn.Linear(3, 3))
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> torch.save({"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}}, path)
        >>> teacher = load_teacher(path, nn.Sequential(nn.Linear(3, 3)))
        >>> torch.equal(teacher[0].weight, student[0].weight), teacher.training, teacher[0].weight.requires_grad
        (True, False, False)
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"No teacher at {str(path)!r}: expected a checkpoint file or a save_pretrained folder.")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            if model is None:
                raise ValueError(
                    f"{path} is a PEFT adapter folder: pass its base network as `model=` (the adapter is loaded onto "
                    "it)."
                )
            peft = require("peft", "llm")
            wrapped = peft.PeftModel.from_pretrained(model, str(path))
            loaded: nn.Module = wrapped.merge_and_unload() if merge_adapters else wrapped
            return _freeze(loaded, dtype, device)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json: not a Hugging Face save_pretrained folder.")
        kwargs = {"local_files_only": True, **from_pretrained_kwargs}
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        if model is not None:
            loaded = type(model).from_pretrained(str(path), **kwargs)  # type: ignore[attr-defined]
        else:
            transformers = require("transformers", "llm")
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        return _freeze(loaded, dtype, device)
    if model is None:
        raise ValueError(
            f"{path} is a weights file: pass the teacher's architecture as `model=` (e.g. the same model class and "
            "config the checkpoint was trained with) to load it into."
        )
    state_dict = _read_state_dict(path, weights_only)
    prefix = find_state_dict_prefix(state_dict, model) if prefix is None else prefix
    weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"No weight under the prefix {prefix!r} in {path} (keys like {sorted(state_dict)[:5]}).")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if strict and (missing or unexpected):
        raise ValueError(
            f"The checkpoint's weights under {prefix!r} do not fit {type(model).__name__}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}). Pass the architecture it was trained with "
            "(same config, same PEFT wrapping), another `prefix=`, or `strict=False`."
        )
    model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False)
    if merge_adapters and callable(getattr(model, "merge_and_unload", None)):
        model = model.merge_and_unload()  # type: ignore[operator]
    return _freeze(model, dtype, device)

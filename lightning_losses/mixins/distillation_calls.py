"""How :class:`~lightning_losses.DistillationMixin` calls a distillation loss: one contract for every loss.

A distillation loss is called as ``loss(student, teacher, **extras)``, the extras being those its ``forward``
declares among ``target`` (or ``labels``, which receives the same tensor), ``epoch`` and ``num_items_in_batch``.
Nothing is recognised by type: the library's losses, a user's subclass or a user's own module (compiled with
``torch.compile`` or not) are called the same way.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class MyLoss(nn.Module):
    ...     def forward(self, student, teacher, target, epoch=None):
    ...         return (student - teacher).pow(2).mean() * (1 if epoch is None else epoch + 1)
    >>> accepted_keywords(MyLoss())
    {'target': True, 'epoch': False}
    >>> s, t = torch.ones(2, 3), torch.zeros(2, 3)
    >>> float(call_distillation_loss(MyLoss(), s, t, target=torch.tensor([0, 1]), epoch=1))
    2.0
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CALL_KEYWORDS",
    "accepted_keywords",
    "call_distillation_loss",
    "causal_lm_distillation",
    "changes_dtype",
    "loss_name",
    "unwrapped",
]

#: The keywords a distillation loss may declare in ``forward``.
CALL_KEYWORDS = ("target", "labels", "epoch", "num_items_in_batch")


def unwrapped(loss: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``loss`` itself."""
    inner = getattr(loss, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else loss


@functools.lru_cache(maxsize=256)
def _keywords_of(cls: Any) -> dict[str, bool]:
    parameters = inspect.signature(cls.forward).parameters
    return {name: parameters[name].default is inspect.Parameter.empty for name in CALL_KEYWORDS if name in parameters}


def accepted_keywords(loss: nn.Module) -> dict[str, bool]:
    """The distillation call keywords ``loss.forward`` declares, each mapped to whether it is required."""
    cls: Any = type(unwrapped(loss))
    return _keywords_of(cls)


def loss_name(loss: nn.Module) -> str:
    """The class name of ``loss`` (of the module a compiled wrapper holds)."""
    return type(unwrapped(loss)).__name__


def call_distillation_loss(
    loss: nn.Module,
    student: Tensor,
    teacher: Tensor,
    *,
    target: Tensor | None = None,
    epoch: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
) -> Tensor:
    """Call ``loss(student, teacher, **extras)`` with the extras its ``forward`` declares (see the module doc).

    Raises:
        ValueError: When the loss requires the targets and ``target`` is ``None``.
    """
    accepted = accepted_keywords(loss)
    kwargs: dict[str, Any] = {}
    for name in ("target", "labels"):
        if name in accepted:
            if target is None and accepted[name]:
                raise ValueError(
                    f"{loss_name(loss).removesuffix('Loss')} needs the class targets: call "
                    "`distillation_loss(student, teacher, target)`."
                )
            kwargs[name] = target
    if "epoch" in accepted:
        kwargs["epoch"] = epoch
    if "num_items_in_batch" in accepted and num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    return loss(student, teacher, **kwargs)


def changes_dtype(module: nn.Module, fn: Any) -> bool:
    """Whether ``Module._apply(fn)`` would change the dtype of ``module``'s floating tensors."""
    probe: Tensor | None = next((p for p in module.parameters() if p.is_floating_point()), None)
    if probe is None:
        probe = next((b for b in module.buffers() if b.is_floating_point()), None)
    if probe is None:
        return False
    try:
        converted = fn(torch.empty(0, dtype=probe.dtype, device=probe.device))
    except Exception:  # a function that only works on real parameters: assume it keeps the dtype
        return False
    return isinstance(converted, Tensor) and converted.dtype != probe.dtype


def causal_lm_distillation(
    loss: nn.Module,
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor | None,
    chunk_size: int | None,
    *,
    num_items_in_batch: Tensor | float | None = None,
    epoch: int | None = None,
) -> Tensor:
    """Token-level distillation of the causal LM ``teacher`` into ``student`` through ``loss.from_hidden``.

    See :meth:`~lightning_losses.DistillationMixin.causal_lm_distillation_loss`; where the backbones' hidden states
    are unavailable (e.g. a head partitioned by DeepSpeed ZeRO-3) it warns and calls ``loss`` on the full logits.
    """
    from lightning_losses.integrations.transformers import HiddenStatesUnavailable, causal_lm_hidden_states

    from_hidden = getattr(unwrapped(loss), "from_hidden", None)
    if from_hidden is None:
        raise TypeError(
            "causal_lm_distillation_loss needs `self.kd` to be a GeneralizedJSDLoss (or any loss with a chunked "
            f"`from_hidden` path), got {loss_name(loss)}: pass `loss=GeneralizedJSDLoss(beta=...)` to "
            "`configure_distillation`."
        )
    ignore_index = int(unwrapped(loss).ignore_index)  # type: ignore[arg-type]
    if labels is not None:
        shifted = labels[:, 1:]
    elif attention_mask is not None:
        shifted = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    else:
        shifted = None
    try:
        student_hidden, student_head = causal_lm_hidden_states(student, input_ids, attention_mask)
        with torch.no_grad():
            teacher.eval()
            teacher_hidden, teacher_head = causal_lm_hidden_states(teacher, input_ids, attention_mask)
    except HiddenStatesUnavailable as err:  # e.g. a head partitioned by DeepSpeed ZeRO-3: use the full logits
        warnings.warn(f"causal_lm_distillation_loss falls back to the full logits: {err}", stacklevel=3)
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        with torch.no_grad():
            teacher.eval()
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return call_distillation_loss(
            loss, student_logits, teacher_logits, target=shifted, epoch=epoch, num_items_in_batch=num_items_in_batch
        )
    return from_hidden(
        student_hidden[:, :-1],
        student_head.weight,
        teacher_hidden[:, :-1],
        teacher_head.weight,
        labels=shifted,
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        student_softcap=student_head.softcap,
        teacher_softcap=teacher_head.softcap,
        chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch,
    )

r"""Token means of a whole optimizer step, under gradient accumulation and data parallelism.

A token-averaged loss computed on one micro-batch of one process divides by that micro-batch's token count. With
``accumulate_grad_batches = k`` micro-batches per optimizer step on ``W`` processes, Lightning divides each
micro-batch loss by ``k`` and DDP / FSDP average the gradients over ``W``, so the step's gradient is the mean of
``k·W`` per-micro-batch means — not the token mean of the step, whenever the counts differ (padding, prompt
masking, unequal sequence lengths per rank). The token mean of the step is

.. math::

    \mathcal{L} = \frac{1}{N} \sum_{r=1}^{W} \sum_{i=1}^{k} S_{r,i},
    \qquad N = \sum_{r,i} n_{r,i},

with :math:`S_{r,i}` the summed per-token loss and :math:`n_{r,i}` the counted tokens of micro-batch ``i`` on rank
``r``. Each micro-batch therefore returns :math:`S_{r,i} / \nu` with :math:`\nu = N / (k W)`: after Lightning's
``1/k`` and the gradient average's ``1/W`` the gradient is exactly :math:`\nabla \mathcal{L}`. Every token-averaged
loss of the library takes :math:`\nu` as its ``num_items_in_batch`` argument (the name TRL and transformers use for
the same correction); :func:`step_num_items` computes it inside a training step.

:math:`N` sums over ranks with one all-reduce of a scalar per step. Summing over the micro-batches of a step needs
them before the first one is trained: :class:`TokensPerStep` reads each optimizer step's ``k`` micro-batches ahead
and writes their local token count into every batch (key ``"num_items_in_batch"``). Without it, and with ``k > 1``,
each micro-batch is normalised by its own (all-reduced) count and a warning says so once.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> rows = [{"labels": torch.tensor([1, 2, -100])}, {"labels": torch.tensor([1, 2, 3])}]
    >>> loader = TokensPerStep(DataLoader(rows, batch_size=1), accumulate_grad_batches=2)
    >>> [int(batch["num_items_in_batch"]) for batch, _, _ in iter(loader)]  # 1 + 2 next-token labels
    [3, 3]
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor

from lightning_losses.utilities.distributed import all_reduce

__all__ = ["NUM_ITEMS_KEY", "TokensPerStep", "count_label_tokens", "step_num_items"]

#: Key under which :class:`TokensPerStep` stores a step's local token count in each batch.
NUM_ITEMS_KEY = "num_items_in_batch"


def count_label_tokens(labels: Tensor, ignore_index: int = -100, shift: bool = True) -> Tensor:
    """Number of labels that count in a token loss: ``labels[..., 1:] != ignore_index`` (``shift=False``: all).

    Example:
        >>> int(count_label_tokens(torch.tensor([[5, 6, -100, 7]])))
        2
    """
    counted = labels[..., 1:] if shift else labels
    return (counted != ignore_index).sum()


def _label_count(key: str | None, ignore_index: int, shift: bool) -> Callable[[Any], Tensor]:
    def count(batch: Any) -> Tensor:
        part = batch[key] if key is not None else batch
        if not isinstance(part, dict) or "labels" not in part:
            where = f"batch[{key!r}]" if key is not None else "the batch"
            raise ValueError(
                f"TokensPerStep counts `labels` in {where}, which has none. Pass `count=` (a function of the batch "
                "returning its token count) or `key=` naming the part of the batch that holds `labels`."
            )
        return count_label_tokens(part["labels"], ignore_index, shift)

    return count


class TokensPerStep(CombinedLoader):
    """A training loader whose batches carry the local token count of their optimizer step.

    Iterates like Lightning's own training loader (a :class:`~lightning.pytorch.utilities.CombinedLoader` in
    ``"max_size_cycle"`` mode, so a dict of dataloaders gives dict batches); Lightning still injects its distributed
    sampler into the dataloaders inside. Each optimizer step's ``accumulate_grad_batches`` batches are read ahead,
    counted, and each (a dict) gets ``batch["num_items_in_batch"]``: the tokens of the whole window on this rank. The
    last window of an epoch may be shorter; Lightning steps the optimizer there too, and the count covers what it
    holds. Return it from ``train_dataloader`` with the Trainer's ``accumulate_grad_batches``.

    Args:
        iterables: A dataloader, or a dict / list of them (as ``CombinedLoader`` takes).
        accumulate_grad_batches: Micro-batches per optimizer step; must equal the Trainer's.
        count: Function of a batch returning its token count; default: labels that count in a causal-LM loss,
            ``(batch[key]["labels"][:, 1:] != ignore_index).sum()``.
        key: Part of a dict batch that holds ``labels`` (e.g. ``"retain"``); ``None``: the batch itself.
        ignore_index: Label value that does not count.
        shift: Count ``labels[:, 1:]`` (causal LMs predict the next token) instead of every label.
        mode: ``CombinedLoader`` mode.
    """

    def __init__(
        self,
        iterables: Any,
        accumulate_grad_batches: int = 1,
        *,
        count: Callable[[Any], int | Tensor] | None = None,
        key: str | None = None,
        ignore_index: int = -100,
        shift: bool = True,
        mode: Literal["min_size", "max_size_cycle", "max_size"] = "max_size_cycle",
    ) -> None:
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int):
            raise TypeError(f"`accumulate_grad_batches` must be an int, got {type(accumulate_grad_batches).__name__}.")
        if accumulate_grad_batches < 1:
            raise ValueError(f"`accumulate_grad_batches` must be >= 1, got {accumulate_grad_batches}.")
        super().__init__(iterables, mode)
        self.accumulate_grad_batches = accumulate_grad_batches
        self._count = count if count is not None else _label_count(key, ignore_index, shift)
        self._window: deque[Any] = deque()

    def __iter__(self) -> TokensPerStep:
        super().__iter__()
        self._window = deque()
        return self

    def __next__(self) -> Any:
        if not self._window:
            window = []
            for _ in range(self.accumulate_grad_batches):
                try:
                    window.append(super().__next__())
                except StopIteration:
                    break
            if not window:
                raise StopIteration
            total = sum(int(self._count(item[0])) for item in window)
            for batch, _, _ in window:
                if not isinstance(batch, dict):
                    raise TypeError(
                        f"TokensPerStep writes the token count into dict batches; got a {type(batch).__name__}. "
                        "Collate batches as dicts, or pass `num_items_in_batch` to the loss yourself."
                    )
                batch[NUM_ITEMS_KEY] = torch.tensor(total)
            self._window.extend(window)
        return self._window.popleft()


_WARNED: set[int] = set()


def step_num_items(module: pl.LightningModule, local_count: Tensor | int, batch: Any = None) -> Tensor | float | None:
    r"""The ``num_items_in_batch`` that makes one micro-batch's token sum the token mean of its optimizer step.

    Returns :math:`\nu = N / (k W)` (see the module docstring): ``N`` is the step's token count summed over ranks
    (``batch["num_items_in_batch"]`` when :class:`TokensPerStep` wrote it, else ``local_count``), ``k`` the
    Trainer's ``accumulate_grad_batches`` and ``W`` its world size. Outside ``fit`` (no Trainer, validation, test)
    it returns ``None``: the loss keeps its local mean. Call it on every rank at every training step (it all-reduces
    one scalar).

    Args:
        module: The LightningModule whose training step computes the loss.
        local_count: Tokens counted in this micro-batch on this rank.
        batch: The training batch, read for ``"num_items_in_batch"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> step_num_items(pl.LightningModule(), 12) is None  # not attached to a Trainer
        True
    """
    trainer = module._trainer
    if trainer is None or not trainer.training:
        return None
    k = int(trainer.accumulate_grad_batches)
    window = batch.get(NUM_ITEMS_KEY) if isinstance(batch, dict) else None
    if window is None:
        window = local_count
        if k > 1 and id(trainer) not in _WARNED:
            _WARNED.add(id(trainer))
            warnings.warn(
                f"accumulate_grad_batches={k}: token means are normalised per micro-batch (summed over ranks), not "
                "over the whole optimizer step. Return `TokensPerStep(loader, accumulate_grad_batches=k)` from "
                "`train_dataloader` for the exact token mean of each step.",
                stacklevel=2,
            )
    total = torch.as_tensor(window, dtype=torch.float64, device=module.device)
    total = all_reduce(total, trainer=trainer)
    return total / (k * trainer.world_size)

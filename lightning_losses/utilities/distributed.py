"""Distributed helpers shared by every family: padded all-gather, dataloader shards, reductions.

Each collective takes an optional ``trainer``. Inside a Lightning run pass it: the collective then goes through
``trainer.strategy`` (DDP, FSDP, DeepSpeed, XLA, ...), which knows its process group and devices. Without a trainer
(a loss or a function called on its own) the default ``torch.distributed`` process group is used when one is
initialised. With one process every helper returns its input: nothing is communicated.

Every collective must be called on every process, in the same order.

Example:
    >>> import torch
    >>> all_gather_rows(torch.ones(2, 3)).shape  # one process: the rows as they are
    torch.Size([2, 3])
    >>> shard_indices(5, rank=1, world_size=2, pad=True)  # rows 1, 3, and a repeat to match rank 0's three
    [1, 3, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "all_gather_rows",
    "all_gather_sizes",
    "all_reduce",
    "distributed_ready",
    "gather_shards",
    "rank_and_world_size",
    "shard_dataloader",
    "shard_indices",
]

ReduceOp = Literal["sum", "mean", "max", "min"]


def distributed_ready() -> bool:
    """Whether a default ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size(trainer: pl.Trainer | None = None) -> tuple[int, int]:
    """This process's rank and the number of processes: the trainer's, else ``torch.distributed``'s, else ``(0, 1)``.

    Example:
        >>> rank_and_world_size()
        (0, 1)
    """
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if distributed_ready():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_sizes(size: int, device: torch.device | str, trainer: pl.Trainer | None = None) -> list[int]:
    """Every process's ``size`` (e.g. its number of rows), in rank order: one all-gather of a scalar."""
    _, world = rank_and_world_size(trainer)
    if world == 1:
        return [size]
    local = torch.tensor([size], device=device, dtype=torch.long)
    if trainer is not None:
        sizes = trainer.strategy.all_gather(local)
        return [int(c) for c in sizes.reshape(-1).tolist()]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return [int(c) for c in torch.cat(parts).tolist()]


def all_gather_rows(
    tensor: Tensor,
    *,
    grad: bool = False,
    sizes: Sequence[int] | None = None,
    trainer: pl.Trainer | None = None,
) -> Tensor:
    """Concatenate every process's rows (dim 0) in rank order; the processes may hold different numbers of rows.

    Each process pads its rows with zeros to the largest count, the padded tensors are all-gathered and the padding
    is dropped. ``grad=True`` keeps the autograd graph: the backward pass sends each process the gradient of its own
    rows, summed over the processes (so DDP's gradient average gives the gradient of a loss of the global batch).

    Args:
        tensor: This process's rows, ``(n_r, ...)``; the trailing shape, dtype and device must agree everywhere.
        grad: Gather with gradient.
        sizes: Every process's row count when already known (:func:`all_gather_sizes`); saves one collective.
        trainer: Gather through ``trainer.strategy`` instead of ``torch.distributed``.

    Returns:
        ``(sum_r n_r, ...)``; ``tensor`` itself on one process.
    """
    _, world = rank_and_world_size(trainer)
    if world == 1:
        return tensor
    counts = list(sizes) if sizes is not None else all_gather_sizes(tensor.shape[0], tensor.device, trainer)
    rows = max(counts)
    padded = tensor
    if rows > tensor.shape[0]:
        padded = F.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, rows - tensor.shape[0]))
    padded = padded.contiguous()
    parts: Sequence[Tensor]
    if trainer is not None:
        parts = trainer.strategy.all_gather(padded, sync_grads=grad).unbind(0)
    elif grad:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        buffers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buffers, padded)
        parts = buffers
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


_TORCH_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(
    tensor: Tensor, op: ReduceOp = "sum", *, grad: bool = False, trainer: pl.Trainer | None = None
) -> Tensor:
    """Reduce ``tensor`` over the processes (``"sum"``, ``"mean"``, ``"max"`` or ``"min"``).

    With ``trainer``: ``trainer.strategy.reduce`` (which may reduce in place: pass a copy of a tensor you still
    need). Without: ``torch.distributed`` on a copy; ``grad=True`` keeps the autograd graph (the backward pass sums
    the gradients of every process). On one process ``tensor`` itself is returned.
    """
    if op not in _TORCH_OPS:
        raise ValueError(f"`op` must be one of {tuple(_TORCH_OPS)}; got {op!r}.")
    _, world = rank_and_world_size(trainer)
    if world == 1:
        return tensor
    if trainer is not None:
        return trainer.strategy.reduce(tensor, reduce_op=op)
    reduce_op = getattr(dist.ReduceOp, _TORCH_OPS[op])
    if grad:
        from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

        out = all_reduce_with_grad(tensor, op=reduce_op)
    else:
        out = tensor.clone()
        dist.all_reduce(out, op=reduce_op)
    return out / world if op == "mean" else out


def shard_indices(total: int, rank: int, world_size: int, *, pad: bool = False) -> list[int]:
    """The indices ``rank, rank + W, rank + 2W, ...`` of ``total`` samples that process ``rank`` of ``W`` reads.

    The shares are disjoint and cover every sample once. ``pad=True`` repeats a share's last index so that every
    process reads ``ceil(total / W)`` samples (collectives inside a forward pass stay in step); drop the repeats
    afterwards (:func:`gather_shards` does).
    """
    indices = list(range(rank, total, world_size))
    if pad:
        rows = -(-total // world_size)
        indices += [indices[-1] if indices else 0] * (rows - len(indices))
    return indices


def shard_dataloader(loader: DataLoader, rank: int, world_size: int, *, pad: bool = False) -> DataLoader:
    """A loader over this process's share of ``loader``'s (map-style) data set, read in order.

    Keeps the batch size and the collate function; drops the sampler (the share is read in data set order). See
    :func:`shard_indices` for the share and ``pad``.

    Example:
        >>> loader = DataLoader(list(range(5)), batch_size=2)
        >>> [b.tolist() for b in shard_dataloader(loader, rank=0, world_size=2)]
        [[0, 2], [4]]
    """
    dataset: Any = loader.dataset
    indices = shard_indices(len(dataset), rank, world_size, pad=pad)
    return DataLoader(Subset(dataset, indices), batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn)


def gather_shards(local: Tensor, total: int, trainer: pl.Trainer) -> Tensor:
    """All-gather the rows of padded shards (:func:`shard_dataloader` with ``pad=True``) back in data set order.

    Process ``r`` holds the rows of samples ``r, r + W, r + 2W, ...``; the result holds the ``total`` samples in
    their original order, the padding dropped.
    """
    world = trainer.world_size
    if world == 1:
        return local
    rows = -(-total // world)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local[:rows]
    gathered = trainer.strategy.all_gather(padded)  # (W, rows, ...)
    return gathered.transpose(0, 1).reshape(rows * world, *local.shape[1:])[:total]

r"""The frozen teachers of :class:`~lightning_losses.DistillationMixin`: running, caching, sharing and sharding them.

:class:`TeacherState` holds what the mixin keeps about its teachers (the teachers themselves, their weights, the
captured features and the cache of their outputs) and does the work that needs no Lightning:

* :meth:`TeacherState.forward` runs every teacher in eval mode without gradient, captures the first teacher's
  named features while it runs, and returns the weighted average of the logits (or the per-teacher logits stacked
  along a new first dimension);
* :class:`TeacherOutputCache` stores those outputs by sample index (grown on demand) and, at the end of each
  training epoch, shares the entries every rank computed with one padded all-gather;
* :func:`shard_teachers` shards each teacher with FSDP2's ``fully_shard``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> teachers = [nn.Linear(3, 2), nn.Linear(3, 2)]
    >>> state = TeacherState(teachers, weights=None, save_teachers=False, cache_enabled=True)
    >>> x, index = torch.randn(4, 3), torch.arange(4)
    >>> logits = state.forward((x,), index=index)
    >>> stacked = state.forward((x,), index=None, combine=False)
    >>> tuple(stacked.shape), bool(torch.allclose(stacked.mean(0), logits))
    ((2, 4, 2), True)
    >>> _ = state.forward((x,), index=index)  # served from the cache
    >>> state.teacher_calls, state.cache_hits
    (2, 1)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_losses.mixins.distillation_calls import changes_dtype
from lightning_losses.utilities.distributed import all_gather_rows, all_gather_sizes

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["FeatureRecorder", "TeacherOutputCache", "TeacherState", "feature_module", "shard_teachers"]


class FeatureRecorder:
    """Forward hook storing a module's output under ``key`` (a class, so the module stays picklable)."""

    def __init__(self, store: dict[str, Tensor], key: str) -> None:
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.store[self.key] = output


def feature_module(root: nn.Module, name: str, argument: str) -> nn.Module:
    """The submodule ``name`` of ``root``; a ValueError naming ``argument`` and some valid names otherwise."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n][:20]
        raise ValueError(f"`{argument}` names {name!r}, which is not a submodule. Some valid names: {names}.") from None


@dataclass
class TeacherOutputCache:
    """Teacher outputs (``"logits"`` and feature names) by sample index, grown on demand.

    Attributes:
        cache: key -> ``(num_samples, ...)`` tensor.
        cached: bool mask ``(num_samples,)`` of the samples stored.
        pending: entries written this epoch, to share with the other ranks.
    """

    cache: dict[str, Tensor] = field(default_factory=dict)
    cached: Tensor | None = None
    pending: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)

    def lookup(self, index: Tensor, feature_names: Sequence[str], features: dict[str, Tensor]) -> Tensor | None:
        """The cached logits of ``index`` (and the features put into ``features``), or ``None`` on any miss."""
        if self.cached is None or int(index.max()) >= self.cached.numel():
            return None
        index = index.to(self.cached.device)
        if not bool(self.cached[index].all()):
            return None
        for name in feature_names:
            features[name] = self.cache[name][index]
        return self.cache["logits"][index]

    def store(self, index: Tensor, values: dict[str, Tensor], distributed: bool) -> None:
        """Write ``values`` (``"logits"``, features) for ``index``; keep them for sharing when ``distributed``."""
        if distributed:
            self.pending.append((index.detach(), values))
        self.write(index, values)

    def write(self, index: Tensor, values: dict[str, Tensor]) -> None:
        logits = values["logits"]
        needed = int(index.max()) + 1
        size = 0 if self.cached is None else self.cached.numel()
        if needed > size:
            new_size = max(needed, 2 * size)
            grown = torch.zeros(new_size, dtype=torch.bool, device=logits.device)
            if self.cached is not None:
                grown[:size] = self.cached
            self.cached = grown
            for key, value in values.items():
                buf = value.new_zeros((new_size, *value.shape[1:]))
                if key in self.cache:
                    buf[:size] = self.cache[key]
                self.cache[key] = buf
        index = index.to(logits.device)
        for key, value in values.items():
            self.cache[key][index] = value
        assert self.cached is not None
        self.cached[index] = True

    def apply(self, fn: Any) -> None:
        """Apply a ``Module._apply`` function (device or dtype move) to the stored tensors."""
        self.cache = {key: fn(value) for key, value in self.cache.items()}
        self.cached = None if self.cached is None else fn(self.cached)

    def share(self, keys: Sequence[str], device: torch.device, trainer: pl.Trainer) -> None:
        """Give every rank the entries any rank wrote since the last call (collective: call it on every rank)."""
        pending, self.pending = self.pending, []
        sizes = all_gather_sizes(sum(int(i.numel()) for i, _ in pending), device, trainer)
        if max(sizes) == 0:
            return
        if not self.cache:
            raise RuntimeError(
                "cache_teacher_outputs: this rank computed no teacher output in a whole epoch, so it cannot take part "
                "in sharing the cache; give every rank at least one training batch."
            )
        index = torch.cat([torch.empty(0, dtype=torch.long, device=device)] + [i.to(device) for i, _ in pending])
        local = {
            key: torch.cat(
                [self.cache[key].new_empty((0, *self.cache[key].shape[1:])).to(device)]
                + [v[key].to(device=device, dtype=self.cache[key].dtype) for _, v in pending]
            )
            for key in keys
        }
        gathered_index = all_gather_rows(index, sizes=sizes, trainer=trainer)
        self.write(gathered_index, {key: all_gather_rows(local[key], sizes=sizes, trainer=trainer) for key in keys})


@dataclass
class TeacherState:
    """The teachers of a distilling module and what is captured or cached from them.

    Attributes:
        teachers: The frozen teachers (not submodules of the module).
        weights: Normalised teacher weights ``(K,)``, or ``None`` for a uniform average.
        save_teachers: Whether checkpoints hold the teachers' weights.
        cache_enabled: Whether teacher outputs are cached by sample index.
        student_feature_names / teacher_feature_names: Captured submodules.
        student_features / teacher_features: The latest captured outputs.
        teacher_calls / cache_hits: How often the teachers ran, and how often the cache served a whole batch.
        converted: ids of teacher copies this module owns (dtype-converted).
    """

    teachers: list[nn.Module]
    weights: Tensor | None
    save_teachers: bool
    cache_enabled: bool
    student_feature_names: tuple[str, ...] = ()
    teacher_feature_names: tuple[str, ...] = ()
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    caches: dict[bool, TeacherOutputCache] = field(
        default_factory=lambda: {True: TeacherOutputCache(), False: TeacherOutputCache()}
    )
    teacher_calls: int = 0
    cache_hits: int = 0
    converted: set[int] = field(default_factory=set)

    @property
    def cache(self) -> dict[str, Tensor]:
        """The cached averaged logits and features (key -> ``(num_samples, ...)``)."""
        return self.caches[True].cache

    def eval(self) -> None:
        """Put every teacher in eval mode."""
        for t in self.teachers:
            t.eval()

    def forward(
        self, inputs: tuple[Any, ...], index: Tensor | None, combine: bool = True, trainer: pl.Trainer | None = None
    ) -> Tensor:
        """Teacher logits, detached: the weighted average, or stacked per teacher ``(K, ...)`` for ``combine=False``.

        With caching enabled and ``index`` given, a batch whose samples are all cached is served from the cache
        (the averaged and the stacked logits are cached separately).
        """
        cache = self.caches[combine]
        caching = self.cache_enabled and index is not None
        if caching:
            assert index is not None
            cached = self.lookup(index, combine)
            if cached is not None:
                self.cache_hits += 1
                return cached
        # Teacher hooks live only for this call: a teacher shared by several modules (or reused after this one is
        # gone) never accumulates hooks or keeps references to this module's feature store.
        handles = [
            self.teachers[0].get_submodule(name).register_forward_hook(FeatureRecorder(self.teacher_features, name))
            for name in self.teacher_feature_names
        ]
        try:
            with torch.no_grad():
                outputs = []
                for t in self.teachers:
                    t.eval()
                    outputs.append(t(*inputs))
        finally:
            for handle in handles:
                handle.remove()
        self.teacher_calls += 1
        if not combine:
            logits = torch.stack(outputs)
        elif len(outputs) == 1:
            logits = outputs[0]
        else:
            stacked = torch.stack(outputs)
            weights = self.weights if self.weights is not None else torch.full((len(outputs),), 1 / len(outputs))
            logits = torch.einsum("t,t...->...", weights.to(stacked), stacked)
        logits = logits.detach()
        if caching:
            assert index is not None
            # The stacked logits are cached sample-major, (N, K, ...), and handed back teacher-major.
            values = {"logits": logits if combine else logits.transpose(0, 1)}
            values.update({n: self.teacher_features[n].detach() for n in self.teacher_feature_names})
            cache.store(index, values, distributed=trainer is not None and trainer.world_size > 1)
        return logits

    def lookup(self, index: Tensor, combine: bool) -> Tensor | None:
        """The cached logits of ``index`` (averaged, or stacked ``(K, N, ...)``), or ``None`` on any miss."""
        out = self.caches[combine].lookup(index, self.teacher_feature_names, self.teacher_features)
        return out if out is None or combine else out.transpose(0, 1)

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Follow the owning module's ``_apply(fn)`` (device or dtype move): the teachers and the caches.

        A dtype conversion (e.g. ``precision="bf16-true"``) would rewrite the caller's teacher weights in place: a
        copy is converted instead (once), with a warning, and the caller's object is left as it was.
        """
        for i, t in enumerate(self.teachers):
            if changes_dtype(t, fn) and id(t) not in self.converted:
                warnings.warn(
                    f"Converting the teacher {type(t).__name__} to another dtype: this module now holds a "
                    "converted copy and the teacher object you passed is left unchanged (its memory is freed "
                    "once you drop your reference). Convert the teacher yourself before `configure_distillation` "
                    "to avoid the copy.",
                    stacklevel=4,
                )
                t = copy.deepcopy(t)
                self.teachers[i] = t
                self.converted.add(id(t))
            t._apply(fn, *args, **kwargs)
        for cache in self.caches.values():
            cache.apply(fn)

    def share_cache(self, device: torch.device, trainer: pl.Trainer) -> None:
        """Give every rank the teacher outputs any rank computed since the last call (both caches; collective)."""
        keys = ["logits", *self.teacher_feature_names]
        for cache in self.caches.values():
            cache.share(keys, device, trainer)


def shard_teachers(teachers: Sequence[nn.Module], mesh: Any, **fully_shard_kwargs: Any) -> None:
    """Shard each teacher in place with FSDP2's ``fully_shard`` on ``mesh`` (``reshard_after_forward=True`` by
    default), keeping it frozen and in eval mode."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    fully_shard_kwargs.setdefault("reshard_after_forward", True)
    for t in teachers:
        if not isinstance(t, FSDPModule):
            fully_shard(t, mesh=mesh, **fully_shard_kwargs)
        t.requires_grad_(False)
        t.eval()

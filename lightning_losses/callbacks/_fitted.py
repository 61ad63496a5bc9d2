"""What the callbacks fitted on gathered validation outputs share (``PostHocCalibration``, ``ConformalPrediction``):
the data, the logits inside the strategy's forward, the forward hook of ``test``/``predict``, the checkpoint state
and the rewrite of the run's checkpoint files; and the distributed sampler's padding, which streaming metrics drop."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.cloud_io import _atomic_save, _load, get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from typing_extensions import override

from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.distributed import gather_shards, shard_dataloader

LogitsFn = Callable[[pl.LightningModule, Any], Tensor]
Stage = Literal["test", "predict"]


def _find_module(pl_module: pl.LightningModule, name: str | None, owner: str) -> torch.nn.Module:
    """The submodule called ``name`` (dotted path), or the LightningModule itself for ``None``."""
    if name is None:
        return pl_module
    try:
        return pl_module.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in pl_module.named_children()]
        raise ValueError(
            f"{owner}(module={name!r}): the LightningModule has no submodule {name!r}. Name the submodule that "
            f"returns the logits (a dotted path); its direct children are {children}."
        ) from None


def _defines_forward(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).forward is not pl.LightningModule.forward


def _strategy_forward(trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` inside the forward of the strategy's wrapper of the module (DDP, FSDP, DeepSpeed, ...).

    Wrappers that shard or synchronise (FSDP1's flat parameters, ZeRO-3 partitions, DDP's buffer broadcast) prepare
    the module in their own ``forward``; calling the LightningModule directly would bypass them. With no wrapper
    (one device, FSDP2's in-place ``fully_shard``) ``fn`` runs as is, and ``fully_shard``'s hooks do their work.
    """
    wrapper = getattr(trainer.strategy, "model", None)
    redirect = getattr(trainer.strategy, "_forward_redirection", None)
    if wrapper is None or wrapper is pl_module or redirect is None:
        return fn()
    name = "_posthoc_calibration_forward"
    object.__setattr__(pl_module, name, lambda *_: fn())
    try:
        return redirect(wrapper, pl_module, name, torch.zeros(()))
    finally:
        object.__delattr__(pl_module, name)


# ---------------------------------------------------------------------- the distributed sampler's padding


def _sampler_of(loader: Any) -> Any:
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", sampler)
    return sampler


def _real_samples(loader: Any) -> int | None:
    """Samples of this process that are not the distributed sampler's padding (``None``: no padding to drop).

    ``DistributedSampler(drop_last=False)`` repeats the first indices so that every process gets
    ``ceil(N / W)``; the repeats sit at the end of the padded index list, so on process ``r`` they are the last
    samples it reads: the real ones are the first ``len(range(r, N, W))``.
    """
    sampler = _sampler_of(loader)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    try:
        total = len(sampler.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    return len(range(sampler.rank, total, sampler.num_replicas))


class _SamplerPadding:
    """Drops the distributed sampler's padding from the batches one process reads from one dataloader.

    Args:
        limit: The number of real samples (:func:`_real_samples`); ``None`` keeps every sample.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.seen = 0

    @classmethod
    def of(cls, trainer: pl.Trainer, loaders: Any, dataloader_idx: int = 0) -> _SamplerPadding:
        """The padding of dataloader ``dataloader_idx`` of ``loaders`` (a Trainer's ``*_dataloaders``)."""
        if trainer.world_size == 1:
            return cls()
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        return cls(_real_samples(loader))

    def drop(self, values: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The next batch's ``values`` and ``target`` without the repeated samples among them."""
        seen, self.seen = self.seen, self.seen + target.shape[0]
        if self.limit is not None and seen + target.shape[0] > self.limit:
            keep = max(self.limit - seen, 0)
            values, target = values[:keep], target[:keep]
        return values, target


# ---------------------------------------------------------------------- the base of the fitted callbacks


class _FitOnValidation(Callback):
    """What the callbacks fitted on gathered validation outputs share: the data (the validation dataloader,
    sharded without duplicates across processes), the logits of the named submodule inside the strategy's
    forward, a forward hook on that module during ``test`` and ``predict``, the checkpoint state (the fitted
    state and the id of the run that fitted it) and the rewrite of this run's ``ModelCheckpoint`` files once
    fitted.

    Subclasses set ``split``, ``fit_on``, ``logits_fn``, ``module`` and ``update_checkpoints``, the messages
    below, and define ``state_key``, ``is_fitted``, :meth:`_fit_now` (the fit of ``fit_on="fit_end"``),
    :meth:`_forward_hook`, the per-stage steps :meth:`_stage_start`, :meth:`_batch_start` and :meth:`_batch_end`,
    and the fitted state: :meth:`_fitted_state`, :meth:`_holds_fit` and :meth:`_load_fitted_state`.
    """

    split: str
    fit_on: str
    logits_fn: LogitsFn | None
    module: str | None
    update_checkpoints: bool
    #: The name in messages.
    _owner: str
    #: The warning of an unfitted callback at ``{stage}`` start.
    _not_fitted_warning: str
    #: The warnings of loading a checkpoint without a fit over a fitted callback: the checkpoint comes from this
    #: run (written before the fit, which is kept), or from another run (the callback becomes unfitted).
    _kept_fit_warning: str
    _lost_fit_warning: str
    #: Whether the forward hook runs before the hooks already on the module.
    _prepend_hook = False

    def __init__(self) -> None:
        super().__init__()
        self.updated_checkpoints: list[str] = []
        self._run_id: str | None = None
        self._hook: Any = None

    @property
    def is_fitted(self) -> bool:
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _find_module(pl_module, self.module, self._owner)  # a wrong name fails before any work
        if self._run_id is None and stage == "fit":
            run_id = uuid.uuid4().hex if trainer.is_global_zero else None
            self._run_id = trainer.strategy.broadcast(run_id, src=0) if trainer.world_size > 1 else run_id

    # ------------------------------------------------------------------ data

    def _dataloader(self, trainer: pl.Trainer) -> DataLoader:
        datamodule = getattr(trainer, "datamodule", None)
        if self.split == "test":
            loader: Any = datamodule.test_dataloader() if datamodule is not None else trainer.test_dataloaders
        else:
            loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                f"{type(self).__name__} found no {self.split} dataloader to fit on. Give the Trainer validation data "
                "(a datamodule with val_dataloader(), or val_dataloaders=...), or call calibrate(..., dataloader=...)."
            )
        return loader

    def _shard(self, trainer: pl.Trainer, loader: DataLoader) -> tuple[DataLoader, int]:
        """This process's share ``r, r + W, ...``, padded (with repeats) to the same length on every process."""
        dataset = loader.dataset
        world, rank = trainer.world_size, trainer.global_rank
        if isinstance(dataset, IterableDataset) or world == 1:
            return loader, -1
        replicas = getattr(trainer, "distributed_sampler_kwargs", None) or {}
        if replicas.get("num_replicas", world) != world:
            raise RuntimeError(
                f"{type(self).__name__} gathers the validation logits over every process and needs every process to be "
                f"a data-parallel replica; this strategy has {replicas.get('num_replicas')} replicas on {world} "
                "processes (tensor parallelism). Calibrate with fit_on='manual' on logits you gather yourself."
            )
        total = len(dataset)  # type: ignore[arg-type]
        if total == 0:
            raise RuntimeError("The calibration dataloader is empty: nothing to fit on.")
        return shard_dataloader(loader, rank, world, pad=True), total

    def _logits(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        if self.logits_fn is not None:
            fn = self.logits_fn
            return _strategy_forward(trainer, pl_module, lambda: fn(pl_module, batch))
        x, _, _ = unpack_batch(batch)
        if self.module is None:
            return _strategy_forward(trainer, pl_module, lambda: pl_module(x))
        target = _find_module(pl_module, self.module, type(self).__name__)
        if not _defines_forward(pl_module):
            return _strategy_forward(trainer, pl_module, lambda: target(x))
        captured: list[Tensor] = []
        handle = target.register_forward_hook(lambda m, a, out: captured.append(out) if not captured else None)
        try:
            _strategy_forward(trainer, pl_module, lambda: pl_module(x))
        finally:
            handle.remove()
        if not captured or not isinstance(captured[0], Tensor):
            raise RuntimeError(
                f"{type(self).__name__}(module={self.module!r}): the LightningModule's forward did not return a tensor "
                f"from {self.module!r} on the validation inputs. Pass logits_fn=(module, batch) -> logits."
            )
        return captured[0]

    def _copies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        """Per-batch values collected with the logits, ``(K, B, C)`` (``None``: none)."""
        return None

    @torch.no_grad()
    def _collect(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        logits, targets, copies = [], [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in loader:
                batch = move_data_to_device(batch, pl_module.device)
                out = self._logits(trainer, pl_module, batch)
                _, target, _ = unpack_batch(batch)
                if target is None:
                    raise ValueError(f"{self._owner} needs targets in the validation batches.")
                logits.append(out.float())
                targets.append(target)
                extra = self._copies(trainer, pl_module, batch)
                if extra is not None:
                    copies.append(extra.float())
        finally:
            pl_module.train(was_training)
        if not logits:
            raise RuntimeError("The calibration dataloader is empty: nothing to fit on.")
        return torch.cat(logits), torch.cat(targets), (torch.cat(copies, dim=1) if copies else None)

    def _gathered(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: DataLoader | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The logits, targets and :meth:`_copies` of the whole data set (``dataloader``, or the ``split``'s), each
        process computing its share and every process getting all of them in the data set's order."""
        loader = dataloader if dataloader is not None else self._dataloader(trainer)
        loader, total = self._shard(trainer, loader)
        logits, target, copies = self._collect(trainer, pl_module, loader)
        if total >= 0:
            logits = gather_shards(logits, total, trainer)
            target = gather_shards(target, total, trainer)
            if copies is not None:
                copies = gather_shards(copies.transpose(0, 1).contiguous(), total, trainer).transpose(0, 1)
        elif trainer.world_size > 1:
            raise RuntimeError(
                f"{self._owner} under several processes needs a map-style data set (with __len__) to split "
                "without duplicates; an IterableDataset was given."
            )
        return logits, target, copies

    def _fit_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit on the ``split``'s data (collective under DDP)."""
        raise NotImplementedError

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fit_on == "fit_end":
            self._fit_now(trainer, pl_module)

    # ------------------------------------------------------------------ test / predict

    def _forward_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        raise NotImplementedError

    def _attach(self, pl_module: pl.LightningModule, stage: Stage) -> bool:
        """Hook the logits module for ``stage``; an unfitted callback warns and returns ``False``."""
        if not self.is_fitted:
            rank_zero_warn(self._not_fitted_warning.format(stage=stage))
            return False
        if self._hook is None:
            target = _find_module(pl_module, self.module, self._owner)
            self._hook = target.register_forward_hook(self._forward_hook, prepend=self._prepend_hook)
        return True

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """At the start of ``stage``: reset what the stage collects and :meth:`_attach`."""
        raise NotImplementedError

    def _batch_start(self) -> None:
        """Before every batch of ``test`` and ``predict``."""

    def _batch_end(self, pl_module: pl.LightningModule, batch: Any, stage: Stage) -> None:
        """After every batch of ``stage``."""

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start(trainer, pl_module, "test")

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start()

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(pl_module, batch, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start(trainer, pl_module, "predict")

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start()

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(pl_module, batch, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    # ------------------------------------------------------------------ checkpoint

    def _fitted_state(self) -> dict[str, Any]:
        """The fitted state, saved with the id of the run."""
        raise NotImplementedError

    def _holds_fit(self, state_dict: dict[str, Any]) -> bool:
        """Whether a checkpoint's state holds a fit."""
        raise NotImplementedError

    def _load_fitted_state(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._fitted_state(), "run_id": self._run_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        run_id = state_dict.get("run_id")
        if self.is_fitted and not self._holds_fit(state_dict):
            if run_id is not None and run_id == self._run_id:
                rank_zero_warn(self._kept_fit_warning)
                return
            rank_zero_warn(self._lost_fit_warning)
        self._load_fitted_state(state_dict)
        if run_id is not None:
            self._run_id = run_id

    # ------------------------------------------------------------------ checkpoint files of the run

    @staticmethod
    def _run_checkpoint_paths(trainer: pl.Trainer) -> list[str]:
        paths: dict[str, str] = {}
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            for path in [cb.best_model_path, cb.last_model_path, *cb.best_k_models]:
                if path:
                    key = os.path.realpath(path) if "://" not in str(path) else str(path)
                    paths.setdefault(key, str(path))
        return sorted(paths.values())

    def _update_checkpoints(self, trainer: pl.Trainer) -> None:
        """Write the fitted state into this run's checkpoint files (rank 0), then wait for every process."""
        if not self.update_checkpoints:
            return
        paths = self._run_checkpoint_paths(trainer)
        if not paths:
            return
        updated: list[str] = []
        if trainer.is_global_zero:
            state = self.state_dict()
            for path in paths:
                if self._rewrite(path, state):
                    updated.append(path)
        if trainer.world_size > 1:
            updated = trainer.strategy.broadcast(updated, src=0)
            trainer.strategy.barrier(f"{type(self).__name__}.update_checkpoints")
        self.updated_checkpoints = updated

    def _rewrite(self, path: str, state: dict[str, Any]) -> bool:
        fs = get_filesystem(path)
        if not fs.exists(path):
            return False
        target = path
        if fs.isdir(path):  # a distributed checkpoint: the callbacks' states live in its metadata file
            target = os.path.join(path, "meta.pt")
            if not fs.exists(target):
                rank_zero_warn(
                    f"{type(self).__name__} could not update the checkpoint directory {path} (no meta.pt): it holds "
                    "the state of before the fit at the end of training. Save a checkpoint after fit to keep it."
                )
                return False
        checkpoint = _load(target, map_location="cpu", weights_only=False)
        checkpoint.setdefault("callbacks", {})[self.state_key] = state
        _atomic_save(checkpoint, target)
        return True

r"""Where the reference model of unlearning comes from: one strategy object per reference mode.

The reference is the model *before* unlearning. It is never a silent second copy:

* :class:`PrecomputedReference` (``"precomputed"``): the forget answers' log-probabilities under the model before
  its first update, computed once and looked up by sample ``index`` in a :class:`ReferenceTable` (two checkpointed
  buffers of the LightningModule);
* :class:`DisabledAdapterReference` (``"disabled_adapter"``): PEFT's ``disable_adapter()``, refused unless the
  adapter is fresh (LoRA :math:`B = 0`), the only case where it gives back the model before unlearning;
* :class:`NamedAdapterReference` (``"named_adapter"``): a second adapter holding the model before unlearning;
* :class:`ModelReference` (``"model"``): an explicit frozen model, kept out of the module tree;
* :class:`NoReference` (``"none"``): for reference-free methods.

:func:`resolve_reference` picks and validates one from what the loss needs. Every strategy gives its reference model
through :meth:`ReferenceStrategy.model` (a context: no gradient, eval mode, adapters restored after) and the
reference log-probabilities of a batch through :meth:`ReferenceStrategy.log_probs`. No Lightning is involved, so
each can be tested on a plain ``nn.Module``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> owner, model = nn.Module(), nn.Linear(2, 2)
    >>> reference = resolve_reference("auto", model, table=ReferenceTable(owner), forget_reference=True)
    >>> reference.mode
    'precomputed'
    >>> reference.table.store({0: -1.5, 2: -3.0}, torch.device("cpu"))
    2
    >>> reference.log_probs({"index": torch.tensor([2, 0])}, score=None).tolist()
    [-3.0, -1.5]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

#: The reference strategies and their types, also exported by :mod:`lightning_losses.mixins.unlearning`.
STRATEGY_EXPORTS: tuple[str, ...] = (
    "DisabledAdapterReference",
    "ModelReference",
    "NamedAdapterReference",
    "NoReference",
    "PrecomputedReference",
    "ReferenceMode",
    "ReferenceStrategy",
    "ReferenceTable",
)
__all__ = [
    "REFERENCE_KEY",
    "REFERENCE_MASK_KEY",
    *STRATEGY_EXPORTS,
    "check_frozen_base",
    "check_unlearning_models",
    "forget_dataloader",
    "frozen",
    "precompute_at_train_start",
    "protect_original_weights",
    "resolve_reference",
]

ReferenceMode = Literal["auto", "precomputed", "disabled_adapter", "named_adapter", "model", "none"]
REFERENCE_MODES: tuple[str, ...] = ("auto", "precomputed", "disabled_adapter", "named_adapter", "model", "none")
#: Checkpoint key of the precomputed reference log-probabilities (one per forget sample index).
REFERENCE_KEY = "unlearning_reference_logps"
#: Checkpoint key of the mask of the sample indices whose reference log-probability is known.
REFERENCE_MASK_KEY = "unlearning_reference_known"

#: ``score(model, batch, prefix)``: the summed answer log-probabilities ``(B,)`` of ``batch`` under ``model``.
Score = Callable[[nn.Module, Mapping[str, Tensor], str], Tensor]


def _is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by PEFT (see :func:`~lightning_losses.integrations.peft.is_peft_model`)."""
    from lightning_losses.integrations.peft import is_peft_model

    return is_peft_model(model)


def check_frozen_base(model: nn.Module) -> None:
    """Refuse a PEFT model whose base weights are trainable: unlearning would modify the only original copy."""
    trainable_base = [
        n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and "modules_to_save" not in n
    ]
    if trainable_base:
        raise ValueError(
            f"The PEFT model trains base weights ({trainable_base[:3]} ...), so unlearning would modify the only "
            "copy of the original model. Freeze them (PEFT does by default) or unlearn without an adapter."
        )


def check_unlearning_models(owner: nn.Module, model: nn.Module, reference_model: nn.Module | None = None) -> None:
    """Check that ``model`` is a submodule of ``owner`` and ``reference_model`` is not; freeze the reference model.

    Raises:
        ValueError: one of these does not hold, or ``model`` is a PEFT model with trainable base weights.
    """
    if not any(sub is model for sub in owner.modules()):
        raise ValueError(
            "`model` must be a submodule of this LightningModule (assign `self.model = model` before calling "
            "`configure_unlearning`), so that it is trained, moved and checkpointed with the module."
        )
    if reference_model is not None:
        if any(sub is reference_model for sub in owner.modules()):
            raise ValueError(
                "`reference_model` is a submodule of this module, so it would be trained and checkpointed. Pass it "
                "only to `configure_unlearning`."
            )
        reference_model.requires_grad_(False).eval()
    if _is_peft(model):
        check_frozen_base(model)


def protect_original_weights(model: nn.Module, path: str | None, trainer: Any = None) -> str | None:
    """Nothing lost: check a PEFT model's base is frozen, or save a full-weight model's weights before training.

    The weights go to ``path`` (default ``<trainer.default_root_dir>/original_weights.pt``), written once, by process
    0; an existing file is kept (it holds the weights from before the first run).

    Returns:
        The path of the saved weights (``None`` for a PEFT model).
    """
    if _is_peft(model):
        check_frozen_base(model)
        return None
    if path is None:
        path = str(Path(trainer.default_root_dir if trainer is not None else ".") / "original_weights.pt")
    if (trainer is None or trainer.is_global_zero) and not Path(path).exists():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    return path


def forget_dataloader(trainer: Any) -> Any:
    """The ``"forget"`` entry of the trainer's training dataloader (a dict / ``CombinedLoader``), or ``None``."""
    combined = getattr(trainer, "train_dataloader", None)
    iterables = getattr(combined, "iterables", combined)
    return iterables.get("forget") if isinstance(iterables, Mapping) else None


class _Frozen(AbstractContextManager[nn.Module]):
    """No gradient and eval mode for ``model``, restoring each submodule's mode after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._grad: Any = nullcontext()
        self._modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self._grad = torch.no_grad()
        self._grad.__enter__()
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, training in self._modes:
            m.training = training
        self._grad.__exit__(*exc)


def frozen(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """A context giving ``model`` with no gradient and in eval mode, each submodule's mode restored after."""
    return _Frozen(model)


class ReferenceTable:
    """The reference log-probabilities of the forget set by sample index, kept as two buffers of ``owner``.

    The buffers (:data:`REFERENCE_KEY`, :data:`REFERENCE_MASK_KEY`) are registered on ``owner`` (the LightningModule)
    so that they are checkpointed and moved with it; they start empty and take the size of the forget set.
    """

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        for key, dtype in ((REFERENCE_KEY, torch.float32), (REFERENCE_MASK_KEY, torch.bool)):
            if key not in owner._buffers:
                owner.register_buffer(key, torch.zeros(0, dtype=dtype), persistent=True)

    @property
    def values(self) -> Tensor:
        """The stored log-probabilities (0 where unknown)."""
        return self.owner._buffers[REFERENCE_KEY]  # type: ignore[return-value]

    @property
    def known(self) -> Tensor:
        """Which sample indices have a stored log-probability."""
        return self.owner._buffers[REFERENCE_MASK_KEY]  # type: ignore[return-value]

    @property
    def filled(self) -> bool:
        """Whether any log-probability is stored."""
        return bool(self.known.any())

    def lookup(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The stored log-probabilities of the samples of ``batch`` (by its ``index`` entry).

        Raises:
            ValueError: the batch has no ``index``.
            RuntimeError: some of its samples have no stored value.
        """
        index = batch.get("index")
        if index is None:
            raise ValueError(
                "reference='precomputed' looks reference log-probabilities up by sample: the forget batches need an "
                "'index' entry (a unique id per example). Add it to the dataset, or use an adapter reference."
            )
        known, values = self.known, self.values
        index = index.to(known.device).long()
        if known.numel() == 0 or int(index.max()) >= known.numel() or not bool(known[index].all()):
            raise RuntimeError(
                "Reference log-probabilities are missing for some forget examples: they are computed at the start of "
                "training from the 'forget' dataloader. Call `precompute_reference(forget_dataloader)` before "
                "training, or make sure the training dataloader is a dict with a 'forget' entry."
            )
        return values[index]

    def store(
        self, values: Mapping[int, float], device: torch.device, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> int:
        """Store ``values`` (sample index → log-probability); ``reduce`` (a sum over processes) merges the ranks'.

        A sample given by several processes is averaged, so the duplicates of a padded sampler are harmless.

        Returns:
            The number of samples stored.
        """
        size = torch.tensor(max(values, default=-1) + 1, dtype=torch.float64, device=device)
        if reduce is not None:
            size = _max_across(size, reduce)
        n = int(size)
        total = torch.zeros(n, dtype=torch.float64, device=device)
        count = torch.zeros(n, dtype=torch.float64, device=device)
        if values:
            idx = torch.tensor(list(values), device=device)
            total[idx] = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
            count[idx] = 1.0
        if reduce is not None:
            total, count = reduce(total), reduce(count)
        known = count > 0
        mean = torch.where(known, total / count.clamp(min=1), torch.zeros_like(total))
        self.owner._buffers[REFERENCE_KEY] = mean.float()
        self.owner._buffers[REFERENCE_MASK_KEY] = known
        return int(known.sum())

    def precompute(
        self,
        reference: ReferenceStrategy,
        batches: Iterable[Mapping[str, Tensor]],
        score: Score,
        device: torch.device,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> int:
        """Score every forget batch under ``reference.model()`` and store the results (see :meth:`store`)."""
        values: dict[int, float] = {}
        with reference.model() as ref:
            for batch in batches:
                if "index" not in batch:
                    self.lookup(batch)  # raises the error about the missing index
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                logps = score(ref, batch, "")
                for i, v in zip(batch["index"].tolist(), logps.tolist()):
                    values[int(i)] = v
        return self.store(values, device, reduce)


def _max_across(value: Tensor, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """The maximum of a non-negative scalar across processes using only a sum reduction (one-hot over ranks)."""
    from lightning_losses.utilities.distributed import rank_and_world_size

    rank, world = rank_and_world_size()
    if world == 1:
        return value
    ranks = torch.zeros(world, dtype=value.dtype, device=value.device)
    ranks[rank] = value
    return reduce_sum(ranks).max()


class ReferenceStrategy:
    """How the reference model of unlearning is obtained."""

    mode: ClassVar[str]
    """The reference mode's name."""
    per_step: ClassVar[bool] = True
    """Whether it gives reference outputs on new inputs at every step (not only on the forget answers)."""
    table: ReferenceTable | None = None
    """The table the strategy reads, to be filled before training (``None``: nothing to precompute)."""

    def model(self) -> AbstractContextManager[nn.Module]:
        """A context giving the reference model (no gradient, eval mode)."""
        raise RuntimeError(f"Reference mode {self.mode!r} has no reference model.")

    def log_probs(self, batch: Mapping[str, Tensor], score: Score | None, prefix: str = "") -> Tensor:
        """Reference log-probabilities ``(B,)`` of the answers ``prefix + "input_ids"`` / ``"labels"`` of ``batch``."""
        assert score is not None
        with self.model() as ref:
            return score(ref, batch, prefix).detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class NoReference(ReferenceStrategy):
    """No reference model (for reference-free methods)."""

    mode = "none"
    per_step = False

    def log_probs(self, batch: Mapping[str, Tensor], score: Score | None, prefix: str = "") -> Tensor:
        raise RuntimeError(
            "The reference mode is 'none', but the loss reads reference log-probabilities. Declare them in the "
            "loss's `needs` (e.g. `needs = ('policy_logps', 'reference_logps')`) or choose a `reference=` mode."
        )


class PrecomputedReference(ReferenceStrategy):
    """The forget answers' log-probabilities under the model before its first update, stored by sample index.

    :meth:`model` is ``model`` itself, frozen: it is the reference only before the first update, when
    :meth:`ReferenceTable.precompute` runs.
    """

    mode = "precomputed"
    per_step = False

    def __init__(self, model: nn.Module, table: ReferenceTable) -> None:
        self.policy = model
        self.table: ReferenceTable = table

    def model(self) -> AbstractContextManager[nn.Module]:
        return frozen(self.policy)

    def log_probs(self, batch: Mapping[str, Tensor], score: Score | None, prefix: str = "") -> Tensor:
        if prefix:
            raise RuntimeError(
                f"reference='precomputed' holds the forget answers only, not the {prefix.rstrip('_')!r} answers. Use "
                "'disabled_adapter', 'named_adapter' or 'model' for a loss that reads them."
            )
        return self.table.lookup(batch)


class DisabledAdapterReference(ReferenceStrategy):
    """The PEFT model with its adapter disabled: the model before unlearning while the adapter is fresh.

    Raises:
        ValueError: ``model`` is not a PEFT model, or its active adapter has been trained.
    """

    mode = "disabled_adapter"

    def __init__(self, model: nn.Module, reference_adapter: str = "reference") -> None:
        if not _is_peft(model):
            raise ValueError(
                "reference='disabled_adapter' needs a PEFT model; wrap the model with a fresh LoRA adapter first."
            )
        from lightning_losses.integrations.peft import adapter_is_fresh

        if not adapter_is_fresh(model):
            raise ValueError(
                "reference='disabled_adapter' is only correct on a fresh adapter (LoRA B = 0), but the active "
                "adapter has been trained: disabling it would give the base model, not the model before "
                "unlearning. Merge the adapter into the base first (`merge_and_unload()`), load it as a named "
                f"reference adapter ({reference_adapter!r}) and use reference='named_adapter', or use "
                "reference='precomputed'."
            )
        self.peft_model = model

    def model(self) -> AbstractContextManager[nn.Module]:
        from lightning_losses.integrations.peft import disabled_adapter

        return disabled_adapter(self.peft_model)


class NamedAdapterReference(ReferenceStrategy):
    """A second PEFT adapter, ``adapter``, holding the model before unlearning (activated for the reference pass).

    Raises:
        ValueError: ``model`` has no adapter of that name.
    """

    mode = "named_adapter"

    def __init__(self, model: nn.Module, adapter: str = "reference") -> None:
        adapters = getattr(model, "peft_config", {}) if _is_peft(model) else {}
        if adapter not in adapters:
            raise ValueError(
                f"reference='named_adapter' needs an adapter named {adapter!r}, found {sorted(adapters)}. "
                f"Load it with `model.load_adapter(path, adapter_name={adapter!r})`."
            )
        self.peft_model, self.adapter = model, adapter

    def model(self) -> AbstractContextManager[nn.Module]:
        from lightning_losses.integrations.peft import named_adapter

        return named_adapter(self.peft_model, self.adapter)


class ModelReference(ReferenceStrategy):
    """An explicit reference model (a second copy in memory), frozen here; keep it out of the module tree."""

    mode = "model"

    def __init__(self, reference_model: nn.Module) -> None:
        self.reference_model = reference_model.requires_grad_(False).eval()

    def model(self) -> AbstractContextManager[nn.Module]:
        return frozen(self.reference_model)


def resolve_reference(
    mode: str,
    model: nn.Module,
    *,
    table: ReferenceTable,
    forget_reference: bool,
    per_step: bool = False,
    reference_adapter: str = "reference",
    reference_model: nn.Module | None = None,
    method: str = "the loss",
    retain: str | None = None,
) -> ReferenceStrategy:
    """The reference strategy for ``mode``, checked against what the loss needs.

    ``"auto"`` picks the cheapest correct one: the explicit ``reference_model`` when given; ``"none"`` when nothing
    needs a reference; ``"precomputed"`` when only the forget answers do; else the named adapter when present, else
    the disabled (fresh) adapter.

    Args:
        mode: one of ``"auto"``, ``"precomputed"``, ``"disabled_adapter"``, ``"named_adapter"``, ``"model"``,
            ``"none"``.
        model: the model being unlearned.
        table: where ``"precomputed"`` stores its log-probabilities.
        forget_reference: whether the loss reads reference log-probabilities of the forget answers.
        per_step: whether a reference output on new inputs is needed every step (template answers, a retain KL).
        reference_adapter: the name of the reference adapter for ``"named_adapter"``.
        reference_model: an explicit reference model for ``"model"``.
        method, retain: the method's name and retain term, for the error messages.

    Raises:
        ValueError: an unknown mode, or one that cannot be correct for this model and loss.
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"Unknown reference mode {mode!r}: expected one of {', '.join(REFERENCE_MODES)}.")
    peft = _is_peft(model)
    if mode == "auto":
        if reference_model is not None:
            mode = "model"
        elif not forget_reference and not per_step:
            mode = "none"
        elif not per_step:
            mode = "precomputed"
        elif peft and reference_adapter in getattr(model, "peft_config", {}):
            mode = "named_adapter"
        elif peft:
            mode = "disabled_adapter"
        else:
            raise ValueError(
                f"Method {method!r} with retain term {retain!r} needs the reference model at every step, and the "
                "model has no PEFT adapter to disable. Unlearn through a fresh LoRA adapter "
                "(`lightning_losses.integrations.peft.lora_model`), load a named reference adapter, or pass an "
                "explicit `reference_model=` (a second copy in memory)."
            )
    if mode == "none":
        if forget_reference or per_step:
            raise ValueError(f"Method {method!r} needs a reference model; choose a reference mode other than 'none'.")
        return NoReference()
    if mode == "precomputed":
        if per_step:
            raise ValueError(
                f"Method {method!r} with retain term {retain!r} needs reference outputs on new inputs every step, "
                "which cannot be precomputed. Use 'disabled_adapter', 'named_adapter' or 'model'."
            )
        return PrecomputedReference(model, table)
    if mode == "model":
        if reference_model is None:
            raise ValueError("reference='model' needs `reference_model=`.")
        return ModelReference(reference_model)
    if mode == "disabled_adapter":
        return DisabledAdapterReference(model, reference_adapter)
    return NamedAdapterReference(model, reference_adapter)


def precompute_at_train_start(reference: ReferenceStrategy, trainer: Any, owner: Any) -> None:
    """Fill ``reference``'s table (when it has an empty one) from the trainer's ``"forget"`` dataloader with
    ``owner.precompute_reference``, merging the ranks' shards with a sum over processes.

    Raises:
        RuntimeError: the table needs filling but the training dataloader has no ``"forget"`` entry.
    """
    table = reference.table
    if table is None or table.filled:
        return
    loader = forget_dataloader(trainer) if trainer is not None else None
    if loader is None:
        raise RuntimeError(
            "reference='precomputed' needs the forget data before training: make the training dataloader a dict "
            "(CombinedLoader) with a 'forget' entry, or call `precompute_reference(forget_dataloader)` first."
        )
    reduce = None
    if trainer.world_size > 1:
        strategy = trainer.strategy

        def reduce(t: Tensor) -> Tensor:
            return strategy.reduce(t, reduce_op="sum")

    owner.precompute_reference(loader, reduce)

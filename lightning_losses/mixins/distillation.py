"""``DistillationMixin``: the teacher lifecycle and distillation helpers for any LightningModule."""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.losses.distillation import KDLoss
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.utilities.checkpoints import follow_saved_shapes
from lightning_losses.utilities.distributed import all_gather_rows, all_gather_sizes

__all__ = ["DistillationMixin"]

_TEACHERS_CHECKPOINT_KEY = "distillation_teachers"


_CALL_KEYWORDS = ("target", "labels", "epoch", "num_items_in_batch")


def _unwrapped(loss: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``loss`` itself."""
    inner = getattr(loss, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else loss


@functools.lru_cache(maxsize=256)
def _keywords_of(cls: Any) -> dict[str, bool]:
    parameters = inspect.signature(cls.forward).parameters
    return {
        name: parameters[name].default is inspect.Parameter.empty for name in _CALL_KEYWORDS if name in parameters
    }


def _accepted_keywords(loss: nn.Module) -> dict[str, bool]:
    """The distillation call keywords ``loss.forward`` declares, each mapped to whether it is required."""
    cls: Any = type(_unwrapped(loss))
    return _keywords_of(cls)


def _changes_dtype(module: nn.Module, fn: Any) -> bool:
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


def _loss_name(loss: nn.Module) -> str:
    return type(_unwrapped(loss)).__name__


class _FeatureRecorder:
    """Forward hook storing a module's output under ``key`` (a class, so the module stays picklable)."""

    def __init__(self, store: dict[str, Tensor], key: str) -> None:
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.store[self.key] = output


@dataclass
class _DistillationState:
    teachers: list[nn.Module]
    weights: Tensor | None
    save_teachers: bool
    cache_enabled: bool
    student_feature_names: tuple[str, ...]
    teacher_feature_names: tuple[str, ...]
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    cache: dict[str, Tensor] = field(default_factory=dict)  # "logits" and feature names -> (num_samples, ...)
    cached: Tensor | None = None  # bool mask (num_samples,)
    teacher_calls: int = 0
    cache_hits: int = 0
    converted: set[int] = field(default_factory=set)  # ids of teacher copies this module owns (dtype-converted)
    pending: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)  # cache entries to share


class DistillationMixin(HyperparameterMixin):
    """Puts one or several frozen teachers and a distillation loss into your LightningModule.

    The mixin owns the teacher lifecycle:

    * **frozen**: ``requires_grad_(False)``, forward under ``torch.no_grad()``, forced to ``eval()`` whenever the
      module changes mode and at every training epoch start, whatever the loops do;
    * **out of the module tree**: the teachers are not submodules, so they are not in ``self.parameters()`` (hence
      not in your optimizer), not wrapped or synchronised by DDP/FSDP, and not in the checkpoint unless
      ``save_teachers=True``; they still follow the module's device and dtype moves (``.to``, ``.cuda``, ``.half``);
    * **features by name**: forward hooks capture intermediate outputs of student submodules (dotted names in this
      module) and of the first teacher (dotted names in the teacher);
    * **several teachers**: logits are averaged with ``teacher_weights`` (normalised to sum to one);
    * **caching**: with ``cache_teacher_outputs=True``, teacher logits (and captured features) are stored by sample
      index so each sample goes through the teachers once. Only correct when a sample's input is the same every
      epoch (no random augmentation).

    The distillation loss lives at the attribute ``kd`` (so its hyperparameters are ``"kd.temperature"``,
    ``"kd.weight"``, ...). Call :meth:`configure_distillation` in your ``__init__`` and the helpers from your own
    ``training_step``.

    Example:
        >>> import lightning.pytorch as pl, torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> class Student(DistillationMixin, pl.LightningModule):
        ...     def __init__(self, teacher: nn.Module):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 3)
        ...         self.configure_distillation(teacher)          # KDLoss(temperature=4) by default
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         logits = self.net(x)
        ...         return F.cross_entropy(logits, y) + self.distillation_loss(logits, self.teacher_forward(x), y)
        >>> model = Student(nn.Linear(4, 3))
        >>> [n for n, _ in model.named_parameters()]                   # the teacher is not a parameter
        ['net.weight', 'net.bias']
        >>> model.get_hyperparameter("kd.temperature").item()
        4.0
    """

    teacher_class_means: Tensor  # checkpointed buffer registered by `configure_distillation`

    # ------------------------------------------------------------------ configuration
    def configure_distillation(
        self,
        teacher: nn.Module | Sequence[nn.Module],
        *,
        loss: nn.Module | None = None,
        teacher_weights: Sequence[float] | None = None,
        student_features: Sequence[str] = (),
        teacher_features: Sequence[str] = (),
        cache_teacher_outputs: bool = False,
        save_teachers: bool = False,
    ) -> None:
        """Attach the teacher(s) and the distillation loss.

        Args:
            teacher: A teacher network, or a sequence of them (their logits are averaged).
            loss: The distillation loss, stored as ``self.kd``; defaults to an existing ``self.kd`` or ``KDLoss()``.
            teacher_weights: One non-negative weight per teacher (normalised to sum to one); uniform by default.
            student_features: Dotted names of submodules of this module whose outputs to capture.
            teacher_features: Dotted names of submodules of the first teacher whose outputs to capture.
            cache_teacher_outputs: Store teacher outputs by sample index (pass ``index`` to :meth:`teacher_forward`).
            save_teachers: Also save the teachers' weights in checkpoints (they are restored on load).

        Raises:
            ValueError: When a teacher is also a submodule of this module, the weights do not match the teachers,
                or a feature name does not exist.
        """
        assert isinstance(self, nn.Module)
        teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
            raise ValueError("`teacher` must be an nn.Module or a non-empty sequence of nn.Modules.")
        for t in teachers:
            for name, sub in self.named_modules():
                if sub is t:
                    raise ValueError(
                        f"The teacher is also registered as the submodule {name!r} of this module, so it would be "
                        "trained, wrapped by DDP and checkpointed. Do not assign it as an attribute: pass it only "
                        "to `configure_distillation`."
                    )
        weights = None
        if teacher_weights is not None:
            weights = torch.as_tensor(list(teacher_weights), dtype=torch.float32)
            if weights.shape != (len(teachers),) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(
                    f"`teacher_weights` must hold {len(teachers)} non-negative numbers with a positive sum, "
                    f"got {list(teacher_weights)}."
                )
            weights = weights / weights.sum()
        for t in teachers:
            t.requires_grad_(False)
            t.eval()
        state = _DistillationState(
            teachers=teachers,
            weights=weights,
            save_teachers=save_teachers,
            cache_enabled=cache_teacher_outputs,
            student_feature_names=tuple(student_features),
            teacher_feature_names=tuple(teacher_features),
        )
        self.__dict__["_distillation"] = state
        for name in student_features:
            self._feature_module(self, name, "student_features").register_forward_hook(
                _FeatureRecorder(state.student_features, name)
            )
        for name in teacher_features:  # validated now; hooked only while `teacher_forward` runs (see there)
            self._feature_module(teachers[0], name, "teacher_features")
        if loss is not None:
            self.kd = loss
        elif not isinstance(getattr(self, "kd", None), nn.Module):
            self.kd = KDLoss()
        if "teacher_class_means" not in self._buffers:
            self.register_buffer("teacher_class_means", torch.empty(0), persistent=True)

    @staticmethod
    def _feature_module(root: nn.Module, name: str, argument: str) -> nn.Module:
        try:
            return root.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n][:20]
            raise ValueError(
                f"`{argument}` names {name!r}, which is not a submodule. Some valid names: {names}."
            ) from None

    def _distillation_state(self) -> _DistillationState:
        state = self.__dict__.get("_distillation")
        if state is None:
            raise RuntimeError(
                f"{type(self).__name__} has no teacher: call `self.configure_distillation(teacher=...)` in __init__."
            )
        return state

    # ------------------------------------------------------------------ teachers
    @property
    def teachers(self) -> list[nn.Module]:
        """The frozen teachers (not submodules of this module)."""
        return self._distillation_state().teachers

    @property
    def teacher(self) -> nn.Module:
        """The first (or only) teacher."""
        return self.teachers[0]

    def shard_teachers(self, mesh: Any = None, **fully_shard_kwargs: Any) -> None:
        """Shard every teacher with FSDP2's ``fully_shard`` on the student's mesh; call it from ``configure_model``.

        Without it a teacher is replicated whole on every process (right under DDP, wasteful under FSDP, impossible
        for a teacher larger than one device). Each teacher becomes its own FSDP root on ``mesh`` (default: the
        ``"data_parallel"`` dimension of ``self.device_mesh``, or the whole mesh), with ``reshard_after_forward=True``
        so its parameters are gathered only while :meth:`teacher_forward` runs it (under ``no_grad``, in eval mode).
        The teachers stay frozen and out of the module tree, hence out of the optimizer and the checkpoint; they are
        sharded in place, as ``fully_shard`` does (no second copy of a large teacher). Shard a teacher's blocks
        yourself first (``fully_shard(block, mesh=...)``) to gather one block at a time. Every
        process must call :meth:`teacher_forward` the same number of times (each call is collective). With no mesh
        (one process) this does nothing, so one ``configure_model`` serves both.

        Args:
            mesh: The device mesh to shard on; ``None`` takes this module's (see above).
            **fully_shard_kwargs: Further arguments of ``fully_shard`` (``mp_policy``, ``offload_policy``, ...).
        """
        if mesh is None:
            mesh = getattr(self, "device_mesh", None)
            names = getattr(mesh, "mesh_dim_names", None) or ()
            if mesh is not None and "data_parallel" in names:
                mesh = mesh["data_parallel"]
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        fully_shard_kwargs.setdefault("reshard_after_forward", True)
        for t in self.teachers:
            if not isinstance(t, FSDPModule):
                fully_shard(t, mesh=mesh, **fully_shard_kwargs)
            t.requires_grad_(False)
            t.eval()

    def teacher_forward(self, *inputs: Any, index: Tensor | None = None) -> Tensor:
        """Run the teachers in eval mode without gradient and return their (weighted-average) logits.

        Args:
            inputs: Positional inputs of the teachers.
            index: Sample indices ``(N,)``; with caching enabled, samples already seen are served from the cache.

        Returns:
            Teacher logits, detached.
        """
        state = self._distillation_state()
        if state.cache_enabled and index is not None:
            cached = self._cache_lookup(state, index)
            if cached is not None:
                state.cache_hits += 1
                return cached
        # Teacher hooks live only for this call: a teacher shared by several modules (or reused after this one is
        # gone) never accumulates hooks or keeps references to this module's feature store.
        handles = [
            state.teachers[0].get_submodule(name).register_forward_hook(_FeatureRecorder(state.teacher_features, name))
            for name in state.teacher_feature_names
        ]
        try:
            with torch.no_grad():
                outputs = []
                for t in state.teachers:
                    t.eval()
                    outputs.append(t(*inputs))
        finally:
            for handle in handles:
                handle.remove()
        state.teacher_calls += 1
        if len(outputs) == 1:
            logits = outputs[0]
        else:
            stacked = torch.stack(outputs)
            weights = state.weights if state.weights is not None else torch.full((len(outputs),), 1 / len(outputs))
            logits = torch.einsum("t,t...->...", weights.to(stacked), stacked)
        logits = logits.detach()
        if state.cache_enabled and index is not None:
            self._cache_store(state, index, logits)
        return logits

    def _cache_lookup(self, state: _DistillationState, index: Tensor) -> Tensor | None:
        if state.cached is None or int(index.max()) >= state.cached.numel():
            return None
        index = index.to(state.cached.device)
        if not bool(state.cached[index].all()):
            return None
        for name in state.teacher_feature_names:
            state.teacher_features[name] = state.cache[name][index]
        return state.cache["logits"][index]

    def _cache_store(self, state: _DistillationState, index: Tensor, logits: Tensor) -> None:
        values = {"logits": logits}
        values.update({n: state.teacher_features[n].detach() for n in state.teacher_feature_names})
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            state.pending.append((index.detach(), values))
        self._cache_write(state, index, values)

    def _cache_write(self, state: _DistillationState, index: Tensor, values: dict[str, Tensor]) -> None:
        logits = values["logits"]
        needed = int(index.max()) + 1
        size = 0 if state.cached is None else state.cached.numel()
        if needed > size:
            new_size = max(needed, 2 * size)
            grown = torch.zeros(new_size, dtype=torch.bool, device=logits.device)
            if state.cached is not None:
                grown[:size] = state.cached
            state.cached = grown
            for key, value in values.items():
                buf = value.new_zeros((new_size, *value.shape[1:]))
                if key in state.cache:
                    buf[:size] = state.cache[key]
                state.cache[key] = buf
        index = index.to(logits.device)
        for key, value in values.items():
            state.cache[key][index] = value
        assert state.cached is not None
        state.cached[index] = True

    def student_features(self, name: str) -> Tensor:
        """The output of the student submodule ``name`` in the latest forward pass."""
        return self._captured(self._distillation_state().student_features, name, "student_features")

    def teacher_features(self, name: str) -> Tensor:
        """The output of the first teacher's submodule ``name`` in the latest :meth:`teacher_forward`."""
        return self._captured(self._distillation_state().teacher_features, name, "teacher_features")

    @staticmethod
    def _captured(store: dict[str, Tensor], name: str, argument: str) -> Tensor:
        if name not in store:
            raise KeyError(
                f"No captured output for {name!r}: list it in `{argument}` of `configure_distillation` and run "
                "the forward pass first."
            )
        return store[name]

    def set_teacher_class_means(self, means: Tensor) -> None:
        """Store the teacher's per-class mean embeddings ``(C, D)`` (a checkpointed buffer, used by ND)."""
        assert isinstance(self, nn.Module)
        if means.ndim != 2:
            raise ValueError(f"Class means must have shape (num_classes, feature_dim), got {tuple(means.shape)}.")
        device = self.teacher_class_means.device
        self._buffers["teacher_class_means"] = means.detach().to(device=device, dtype=torch.float32).clone()

    # ------------------------------------------------------------------ loss helpers
    def distillation_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor | None = None,
        *,
        num_items_in_batch: Tensor | float | None = None,
    ) -> Tensor:
        """The weighted distillation term of ``self.kd`` (warm-up applied from the current epoch).

        ``self.kd`` is called as ``kd(student_logits, teacher_logits, **extras)`` with the extras its ``forward``
        declares among ``target`` (or ``labels``, which receives the same tensor), ``epoch`` and
        ``num_items_in_batch``: the library's losses and a user's own loss (compiled or not) are called the same
        way, whatever their class.

        Args:
            student_logits: Student logits ``(N, C)`` (or ``(B, T, V)`` for token-level losses).
            teacher_logits: Teacher logits, e.g. from :meth:`teacher_forward`.
            target: Class targets (required by DKD) or token labels (masking for the generalized JSD).
            num_items_in_batch: Normaliser of a token-averaged loss (see
                :func:`~lightning_losses.utilities.tokens.step_num_items`); ignored by losses that do not take it.
        """
        loss = self.kd
        accepted = _accepted_keywords(loss)
        trainer = getattr(self, "_trainer", None)
        kwargs: dict[str, Any] = {}
        for name in ("target", "labels"):
            if name in accepted:
                if target is None and accepted[name]:
                    raise ValueError(
                        f"{_loss_name(loss).removesuffix('Loss')} needs the class targets: call "
                        "`distillation_loss(student, teacher, target)`."
                    )
                kwargs[name] = target
        if "epoch" in accepted:
            kwargs["epoch"] = self.current_epoch if trainer is not None else None  # type: ignore[attr-defined]
        if "num_items_in_batch" in accepted and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return loss(student_logits, teacher_logits, **kwargs)

    def causal_lm_distillation_loss(
        self,
        student: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        chunk_size: int | None = None,
        *,
        num_items_in_batch: Tensor | float | None = None,
    ) -> Tensor:
        """Token-level distillation of a causal LM into ``student`` without materialising either model's logits.

        Runs the student's and the (single) teacher's backbones, then ``self.kd.from_hidden(...)`` (the chunked path
        of :class:`~lightning_losses.GeneralizedJSDLoss`, which applies the loss's own β, temperature, weight and
        reduction, exactly as ``self.kd`` on the full logits). Position ``t`` predicts token ``t + 1``: the
        distributions at positions ``:-1`` are compared where ``labels[:, 1:]`` is not ``ignore_index`` (where
        ``attention_mask[:, 1:]`` is set when ``labels`` is None). Memory: one chunk of rows × vocabulary.

        Args:
            student: The student causal LM (transformers, optionally PEFT-wrapped).
            input_ids: Token ids ``(B, T)`` shared by both models.
            attention_mask: Optional ``(B, T)`` mask.
            labels: Optional ``(B, T)`` labels (``ignore_index`` on prompt and padding tokens).
            chunk_size: Rows per chunk; ``None`` lets the chunked loss choose.
            num_items_in_batch: Token count to divide by instead of this micro-batch's (see
                :func:`~lightning_losses.utilities.tokens.step_num_items`).
        """
        from lightning_losses.integrations.transformers import HiddenStatesUnavailable, causal_lm_hidden_states

        loss = self.kd
        from_hidden = getattr(_unwrapped(loss), "from_hidden", None)
        if from_hidden is None:
            raise TypeError(
                "causal_lm_distillation_loss needs `self.kd` to be a GeneralizedJSDLoss (or any loss with a chunked "
                f"`from_hidden` path), got {_loss_name(loss)}: pass `loss=GeneralizedJSDLoss(beta=...)` to "
                "`configure_distillation`."
            )
        if len(self.teachers) != 1:
            raise ValueError("causal_lm_distillation_loss supports a single teacher LM.")
        ignore_index = int(_unwrapped(loss).ignore_index)  # type: ignore[arg-type]
        if labels is not None:
            shifted = labels[:, 1:]
        elif attention_mask is not None:
            shifted = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, ignore_index)
        else:
            shifted = None
        try:
            student_hidden, student_head = causal_lm_hidden_states(student, input_ids, attention_mask)
            with torch.no_grad():
                self.teacher.eval()
                teacher_hidden, teacher_head = causal_lm_hidden_states(self.teacher, input_ids, attention_mask)
        except HiddenStatesUnavailable as err:  # e.g. a head partitioned by DeepSpeed ZeRO-3: use the full logits
            warnings.warn(f"causal_lm_distillation_loss falls back to the full logits: {err}", stacklevel=2)
            student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            with torch.no_grad():
                self.teacher.eval()
                teacher_logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            return self.distillation_loss(
                student_logits, teacher_logits, shifted, num_items_in_batch=num_items_in_batch
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

    # ------------------------------------------------------------------ Lightning hooks
    def train(self, mode: bool = True) -> Any:
        result = super().train(mode)  # type: ignore[misc]
        state = self.__dict__.get("_distillation")
        if state is not None:
            for t in state.teachers:
                t.eval()
        return result

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        state = self.__dict__.get("_distillation")
        if state is not None:
            for i, t in enumerate(state.teachers):
                if _changes_dtype(t, fn) and id(t) not in state.converted:
                    # A dtype conversion (e.g. precision="bf16-true") would rewrite the user's teacher weights in
                    # place; convert a copy instead and leave the caller's object as it was.
                    warnings.warn(
                        f"Converting the teacher {type(t).__name__} to another dtype: this module now holds a "
                        "converted copy and the teacher object you passed is left unchanged (its memory is freed "
                        "once you drop your reference). Convert the teacher yourself before `configure_distillation` "
                        "to avoid the copy.",
                        stacklevel=2,
                    )
                    t = copy.deepcopy(t)
                    state.teachers[i] = t
                    state.converted.add(id(t))
                t._apply(fn, *args, **kwargs)
            state.cache = {key: fn(value) for key, value in state.cache.items()}
            state.cached = None if state.cached is None else fn(state.cached)
        return result

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The class-means buffer starts empty; take the saved shape so every load path (checkpoints, DDP-spawn
        # result recovery, plain load_state_dict) restores it strictly.
        assert isinstance(self, nn.Module)
        follow_saved_shapes(self, state_dict, prefix, ("teacher_class_means",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # type: ignore[misc]
        for t in self.teachers:
            t.eval()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        self._share_teacher_cache()

    def _share_teacher_cache(self) -> None:
        """Give every rank the teacher outputs any rank computed this epoch.

        A distributed sampler that reshuffles each epoch sends each sample to a different rank; without this each rank
        would only hit the samples it happened to see before. Called on every rank at the end of each training epoch
        (one padded all-gather of the epoch's new entries).
        """
        state = self.__dict__.get("_distillation")
        trainer = getattr(self, "_trainer", None)
        if state is None or not state.cache_enabled or trainer is None or trainer.world_size <= 1:
            return
        pending, state.pending = state.pending, []
        device = self.device  # type: ignore[attr-defined]
        keys = ["logits", *state.teacher_feature_names]
        sizes = all_gather_sizes(sum(int(i.numel()) for i, _ in pending), device, trainer)
        if max(sizes) == 0:
            return
        if not state.cache:
            raise RuntimeError(
                "cache_teacher_outputs: this rank computed no teacher output in a whole epoch, so it cannot take part "
                "in sharing the cache; give every rank at least one training batch."
            )
        index = torch.cat([torch.empty(0, dtype=torch.long, device=device)] + [i.to(device) for i, _ in pending])
        local = {
            key: torch.cat(
                [state.cache[key].new_empty((0, *state.cache[key].shape[1:])).to(device)]
                + [v[key].to(device=device, dtype=state.cache[key].dtype) for _, v in pending]
            )
            for key in keys
        }
        gathered_index = all_gather_rows(index, sizes=sizes, trainer=trainer)
        gathered = {key: all_gather_rows(local[key], sizes=sizes, trainer=trainer) for key in keys}
        self._cache_write(state, gathered_index, gathered)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        state = self._distillation_state()
        if state.save_teachers:
            checkpoint[_TEACHERS_CHECKPOINT_KEY] = [t.state_dict() for t in state.teachers]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        state = self._distillation_state()
        saved = checkpoint.get(_TEACHERS_CHECKPOINT_KEY)
        if saved is not None:
            if len(saved) != len(state.teachers):
                raise ValueError(
                    f"The checkpoint holds {len(saved)} teachers but this module has {len(state.teachers)}."
                )
            for t, sd in zip(state.teachers, saved):
                t.load_state_dict(sd)

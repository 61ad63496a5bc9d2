"""``DistillationMixin``: the teacher lifecycle and distillation helpers for any LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.losses.distillation import KDLoss
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.mixins.distillation_calls import call_distillation_loss, causal_lm_distillation
from lightning_losses.mixins.distillation_teachers import FeatureRecorder, TeacherState, feature_module, shard_teachers
from lightning_losses.utilities.checkpoints import follow_saved_shapes

__all__ = ["DistillationMixin"]

_TEACHERS_CHECKPOINT_KEY = "distillation_teachers"


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
    * **several teachers**: logits are averaged with ``teacher_weights`` (normalised to sum to one), or returned
      stacked ``(K, ...)`` by ``teacher_forward(..., combine=False)`` for a loss that takes the teachers apart;
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
        state = TeacherState(
            teachers=teachers,
            weights=weights,
            save_teachers=save_teachers,
            cache_enabled=cache_teacher_outputs,
            student_feature_names=tuple(student_features),
            teacher_feature_names=tuple(teacher_features),
        )
        self.__dict__["_distillation"] = state
        for name in student_features:
            feature_module(self, name, "student_features").register_forward_hook(
                FeatureRecorder(state.student_features, name)
            )
        for name in teacher_features:  # validated now; hooked only while `teacher_forward` runs
            feature_module(teachers[0], name, "teacher_features")
        if loss is not None:
            self.kd = loss
        elif not isinstance(getattr(self, "kd", None), nn.Module):
            self.kd = KDLoss()
        if "teacher_class_means" not in self._buffers:
            self.register_buffer("teacher_class_means", torch.empty(0), persistent=True)

    def _distillation_state(self) -> TeacherState:
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
        if mesh is not None:
            shard_teachers(self.teachers, mesh, **fully_shard_kwargs)

    def teacher_forward(self, *inputs: Any, index: Tensor | None = None, combine: bool = True) -> Tensor:
        """Run the teachers in eval mode without gradient and return their logits, detached.

        Args:
            inputs: Positional inputs of the teachers.
            index: Sample indices ``(N,)``; with caching enabled, samples already seen are served from the cache.
            combine: ``True`` returns the weighted average of the teachers' logits (``teacher_weights``);
                ``False`` returns every teacher's logits stacked along a new first dimension, ``(K, ...)``, for a
                loss that takes the teachers separately.

        Returns:
            Teacher logits: ``(...)`` combined, or ``(K, ...)`` for ``combine=False``.
        """
        return self._distillation_state().forward(inputs, index, combine, getattr(self, "_trainer", None))

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
        trainer = getattr(self, "_trainer", None)
        epoch = self.current_epoch if trainer is not None else None  # type: ignore[attr-defined]
        return call_distillation_loss(
            self.kd, student_logits, teacher_logits, target=target, epoch=epoch, num_items_in_batch=num_items_in_batch
        )

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
        if len(self.teachers) != 1:
            raise ValueError("causal_lm_distillation_loss supports a single teacher LM.")
        trainer = getattr(self, "_trainer", None)
        return causal_lm_distillation(
            self.kd,
            student,
            self.teacher,
            input_ids,
            attention_mask,
            labels,
            chunk_size,
            num_items_in_batch=num_items_in_batch,
            epoch=self.current_epoch if trainer is not None else None,  # type: ignore[attr-defined]
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
            state.apply(fn, *args, **kwargs)
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
        state.share_cache(self.device, trainer)  # type: ignore[attr-defined]

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

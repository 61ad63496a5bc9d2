"""``UnlearningMixin``: forget / retain objectives, the reference model and nothing-lost guarantees for causal LMs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses.losses.unlearning import (
    DEFAULT_MODULE_ATTRIBUTE,
    PER_STEP_REFERENCE_SCORES,
    UNLEARNING_PRESETS,
    RetainLoss,
    UnlearningMethod,
    UnlearningScores,
    loss_needs,
    resolve_unlearning_loss,
)
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.mixins.unlearning_reference import (  # noqa: F401 - strategies exported: STRATEGY_EXPORTS
    REFERENCE_KEY,
    REFERENCE_MASK_KEY,
    STRATEGY_EXPORTS,
    DisabledAdapterReference,
    ModelReference,
    NamedAdapterReference,
    NoReference,
    PrecomputedReference,
    ReferenceMode,
    ReferenceStrategy,
    ReferenceTable,
    check_unlearning_models,
    frozen,
    precompute_at_train_start,
    protect_original_weights,
    resolve_reference,
)
from lightning_losses.mixins.unlearning_scoring import (
    CausalLMScorer,
    as_unlearning_batch,
    check_layer,
    check_step_batches,
    step_terms,
    uses_retain_data,
)
from lightning_losses.utilities.checkpoints import follow_saved_shapes
from lightning_losses.utilities.tokens import count_label_tokens, step_num_items

__all__ = [
    "UNLEARNING_METHODS",
    "CausalLMScorer",
    *STRATEGY_EXPORTS,
    "UnlearningMethod",
    "UnlearningMixin",
]

#: The unlearning methods by name: :data:`~lightning_losses.losses.unlearning.UNLEARNING_PRESETS` (one registry).
UNLEARNING_METHODS = UNLEARNING_PRESETS


@dataclass
class _UnlearningState:
    model: nn.Module
    method: str
    attribute: str
    retain: RetainLoss | None
    reference: ReferenceStrategy
    scorer: CausalLMScorer
    original_weights_path: str | None
    last_terms: dict[str, float]


class UnlearningMixin(HyperparameterMixin):
    """Unlearning for a LightningModule that holds a (transformers, optionally PEFT-wrapped) causal LM.

    Call :meth:`configure_unlearning` in ``__init__`` and :meth:`unlearning_loss` from ``training_step`` with the
    forget batch and the retain batch of the step (Lightning's ``CombinedLoader`` gives both as a dict).

    * **Any loss, one call**: the loss is called as ``loss(scores)`` with an
      :class:`~lightning_losses.UnlearningScores` filled lazily (:meth:`unlearning_scores`); what it declares in
      ``needs`` decides the reference model and whether retain data is needed. Methods by name are presets of the
      library's losses (:data:`~lightning_losses.UNLEARNING_PRESETS`): ``"ga"``, ``"graddiff"``,
      ``"graddiff_kl"``, ``"npo"``, ``"npo_rt"``, ``"npo_kl"``, ``"simnpo"``, ``"flat"``, ``"idkdpo"``, ``"wga"``,
      ``"satimp"``, ``"ceu"``, ``"undial"``, ``"rmu"`` (activations of a layer, read with a forward hook),
      ``"altpo"``. Pass ``loss=`` for your own settings, a subclass, or your own ``nn.Module`` with
      ``forward(self, scores)``.
    * **Where the loss lives**: at ``self.<loss.module_attribute>`` (``npo``, ``wga``, ``rmu``, ...; a subclass
      keeps its parent's), else ``self.unlearning``: its hyperparameters are ``"npo.beta"``, ``"rmu.steering_coeff"``.
    * **Reference model**, never a silent second copy (:mod:`~lightning_losses.mixins.unlearning_reference`):
      ``"precomputed"`` (forget log-probs computed once before training, by sample ``index``, checkpointed),
      ``"disabled_adapter"`` (refused unless the adapter is fresh), ``"named_adapter"``, ``"model"`` (an explicit
      ``reference_model``, kept out of the module tree); ``"auto"`` picks the cheapest correct one.
    * **Nothing lost**: through PEFT the base weights are checked to be frozen; full-weight unlearning first saves
      the original weights to ``original_weights_path`` (default ``<default_root_dir>/original_weights.pt``).
    * Log-probabilities come from the final hidden states and the head, chunk by chunk, when the model allows it
      (:class:`~lightning_losses.mixins.unlearning_scoring.CausalLMScorer`, which also describes the batches:
      ``input_ids``, ``labels``, optional ``attention_mask``, ``index`` and ``template_*`` answers).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_losses.demos import build_gpt2
        >>> class Unlearner(UnlearningMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = build_gpt2(64, n_layer=1, n_embd=16, n_head=2, block_size=8)
        ...         self.configure_unlearning(self.model, method="simnpo")
        ...     def training_step(self, batch, batch_idx):
        ...         return self.unlearning_loss(batch["forget"], batch["retain"])
        >>> m = Unlearner()
        >>> float(m.get_hyperparameter("simnpo.beta")), m.reference_mode
        (4.5, 'none')
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> batch = {"forget": {"input_ids": ids, "labels": ids}, "retain": {"input_ids": ids, "labels": ids}}
        >>> bool(torch.isfinite(m.training_step(batch, 0)))
        True
    """

    def configure_unlearning(
        self,
        model: nn.Module,
        method: UnlearningMethod | None = None,
        *,
        loss: nn.Module | None = None,
        retain_loss: RetainLoss | Literal["default"] | None = "default",
        reference: ReferenceMode = "auto",
        reference_adapter: str = "reference",
        reference_model: nn.Module | None = None,
        use_hidden_states: bool = True,
        ignore_index: int = -100,
        original_weights_path: str | None = None,
    ) -> None:
        """Choose the loss (by method name, or injected), its retain term and the reference model.

        Args:
            model: the causal LM, already assigned as a submodule of this module (``self.model = model``).
            method: a preset by name (see the class docstring); ``None``: ``loss`` as it is, or ``"npo"``.
            loss: the loss, called as ``loss(scores)``: the method's class with other settings
                (``NPOLoss(beta=0.05)``), a subclass of it, or (without ``method``) any such ``nn.Module``.
            retain_loss: ``"nll"``, ``"kl"`` or ``None`` to override the retain term (``"default"``: the method's;
                ``"nll"`` for a loss given without a method).
            reference: how the reference log-probabilities are obtained (see the class docstring).
            reference_adapter: name of the reference adapter for ``"named_adapter"`` (and ``"auto"``).
            reference_model: an explicit frozen reference model (for ``reference="model"``); not a submodule.
            use_hidden_states: compute log-probabilities from hidden states and the head (chunked) when possible.
            ignore_index: label of prompt and padding positions.
            original_weights_path: where full-weight unlearning saves the original weights first.

        Raises:
            ValueError: unknown method, a loss not of the method's class, an unknown name in its ``needs`` or an
                unknown ``layer``, a reference mode that cannot be correct here (a trained adapter with
                ``"disabled_adapter"``, no adapter, a missing named adapter), a PEFT model with trainable base weights.
        """
        assert isinstance(self, nn.Module)
        loss, label, retain = resolve_unlearning_loss(method, loss, retain_loss)
        needs = loss_needs(loss)
        check_unlearning_models(self, model, reference_model)
        check_layer(loss, model, reference_model)
        attribute = getattr(loss, "module_attribute", DEFAULT_MODULE_ATTRIBUTE)
        previous = self.__dict__.get("_unlearning")
        if previous is not None and previous.attribute != attribute and hasattr(self, previous.attribute):
            delattr(self, previous.attribute)
        setattr(self, attribute, loss)
        strategy = resolve_reference(
            reference,
            model,
            table=ReferenceTable(self),
            forget_reference="reference_logps" in needs,
            per_step=bool(needs & PER_STEP_REFERENCE_SCORES) or (retain == "kl" and "retain" in needs),
            reference_adapter=reference_adapter,
            reference_model=reference_model,
            method=label,
            retain=retain,
        )
        scorer = CausalLMScorer(ignore_index, use_hidden_states)
        self.__dict__["_unlearning"] = _UnlearningState(
            model, label, attribute, retain, strategy, scorer, original_weights_path, {}
        )

    def _unlearning_state(self) -> _UnlearningState:
        state = self.__dict__.get("_unlearning")
        if state is None:
            raise RuntimeError(
                f"{type(self).__name__} is not configured for unlearning: call `self.configure_unlearning(self.model, "
                "method=...)` in __init__."
            )
        return state

    @property
    def unlearning_loss_module(self) -> nn.Module:
        """The loss (at ``self.npo``, ``self.simnpo``, ..., or ``self.unlearning``)."""
        loss = getattr(self, self._unlearning_state().attribute)
        assert isinstance(loss, nn.Module)
        return loss

    @property
    def reference_mode(self) -> str:
        """The reference mode in use: ``"precomputed"``, ``"disabled_adapter"``, ``"named_adapter"``, ``"model"`` or
        ``"none"``."""
        return self._unlearning_state().reference.mode

    @property
    def unlearning_uses_retain(self) -> bool:
        """Whether the loss has a retain term now (a retain batch is then needed every step)."""
        return uses_retain_data(self.unlearning_loss_module, self._unlearning_state().retain)

    @property
    def unlearning_terms(self) -> dict[str, float]:
        """The loss and retain term of the last :meth:`unlearning_loss` call (for logging)."""
        return dict(self._unlearning_state().last_terms)

    @property
    def reference_precomputed(self) -> bool:
        """Whether reference log-probabilities are stored (for ``"precomputed"``)."""
        known = getattr(self, REFERENCE_MASK_KEY, None)
        return known is not None and bool(known.any())

    # ------------------------------------------------------------------ scores
    def _as_batch(self, batch: Any, role: str) -> dict[str, Tensor]:
        return as_unlearning_batch(batch, role, self._unlearning_state().scorer.ignore_index)

    def _sequence_logps(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> tuple[Tensor, Tensor]:
        """Per-sequence summed answer log-probabilities and answer lengths of ``batch`` under ``model``."""
        return self._unlearning_state().scorer.sequence_log_probs(model, batch, prefix)

    def _mean_token_probs(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> Tensor:
        return self._unlearning_state().scorer.mean_token_probs(model, batch, prefix)

    def _score(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str) -> Tensor:
        return self._sequence_logps(model, batch, prefix)[0]

    def reference_context(self) -> AbstractContextManager[nn.Module]:
        """A context giving the reference model (no gradient, eval mode) for the configured reference mode."""
        return self._unlearning_state().reference.model()

    def reference_log_probs(self, batch: Mapping[str, Tensor], prefix: str = "") -> Tensor:
        """Reference sequence log-probabilities of a batch (looked up by ``index`` when precomputed)."""
        return self._unlearning_state().reference.log_probs(batch, self._score, prefix)

    @torch.no_grad()
    def precompute_reference(self, dataloader: Any, reduce: Callable[[Tensor], Tensor] | None = None) -> int:
        """Compute and store the reference log-probabilities of every forget example in ``dataloader``.

        Run before the first optimizer step (the module does it in ``on_train_start``). Under DDP each rank
        covers its shard and ``reduce`` (a sum over processes) merges them; a sample seen on several ranks is
        averaged, so padding duplicates are harmless.

        Returns:
            The number of examples stored.
        """
        assert isinstance(self, nn.Module)
        state = self._unlearning_state()
        batches = (self._as_batch(raw, "forget") for raw in dataloader)
        device = next(iter(state.model.parameters())).device
        return ReferenceTable(self).precompute(state.reference, batches, self._score, device, reduce)

    def retain_token_count(self, retain: Any) -> Tensor:
        """Answer tokens of a retain batch: the count its token-mean retain term divides by."""
        labels = self._as_batch(retain, "retain")["labels"]
        return count_label_tokens(labels, self._unlearning_state().scorer.ignore_index, shift=True)

    def retain_term(self, retain: Any, *, num_items_in_batch: Tensor | float | None = None) -> Tensor:
        """The retain term (token-mean NLL, or KL(reference ‖ model) over answer tokens with ``"kl"``).

        Args:
            retain: A retain batch.
            num_items_in_batch: Token count to divide by instead of this batch's (see
                :func:`~lightning_losses.utilities.tokens.step_num_items`).
        """
        state = self._unlearning_state()
        batch = self._as_batch(retain, "retain")
        if state.retain == "kl":
            return state.scorer.retain_kl(state.model, state.reference.model, batch, num_items_in_batch)
        return state.scorer.retain_nll(state.model, batch, num_items_in_batch)

    def unlearning_scores(
        self, forget: Any, retain: Any | None = None, *, num_items_in_batch: Tensor | float | None = None
    ) -> UnlearningScores:
        """The scores of one forget batch (and retain batch), each computed when the loss first reads it."""
        f = self._as_batch(forget, "forget")
        return self._scores(f, None if retain is None else self._as_batch(retain, "retain"), num_items_in_batch)

    def _scores(self, f: dict[str, Tensor], r: Any | None, num_items: Tensor | float | None) -> UnlearningScores:
        state = self._unlearning_state()
        with_retain = r is not None and state.retain is not None

        def retain() -> Tensor | None:
            return self.retain_term(r, num_items_in_batch=num_items) if with_retain else None

        def step_items(count: Tensor) -> Any:  # the forget terms' token mean over the optimizer step
            return step_num_items(self, count) if isinstance(self, pl.LightningModule) else None

        reference = state.reference.model if state.reference.per_step else None
        layer = getattr(self.unlearning_loss_module, "layer", None)
        return state.scorer.scores(
            state.model, f, self.reference_log_probs, retain, state.method, reference_model=reference, retain_batch=r,
            layer=layer, num_items=step_items,
        )  # fmt: skip

    def unlearning_loss(
        self, forget: Any, retain: Any | None = None, *, num_items_in_batch: Tensor | float | None = None
    ) -> Tensor:
        """The loss on one forget batch (and one retain batch when it has a retain term): ``loss(scores)``.

        ``num_items_in_batch`` normalises the token-mean retain term (see :meth:`retain_term`).

        Raises:
            ValueError: an empty batch, a sequence with every label masked, missing keys, forget and retain batches
                with different keys, a missing retain batch or template answer the loss needs.
        """
        state = self._unlearning_state()
        loss_module = self.unlearning_loss_module
        f = self._as_batch(forget, "forget")
        r = None if retain is None else self._as_batch(retain, "retain")
        check_step_batches(f, r, state.method, self.unlearning_uses_retain, loss_needs(loss_module))
        scores = self._scores(f, r, num_items_in_batch)
        loss = loss_module(scores)
        state.last_terms = step_terms(loss_module, loss, scores)
        return loss

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def unlearning_token_statistics(self, batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-token log-probabilities, their expected value and spread under the model, and the mask (for metrics)."""
        state = self._unlearning_state()
        with frozen(state.model) as model:
            return state.scorer.token_statistics(model, self._as_batch(batch, "evaluation"))

    @torch.no_grad()
    def truth_ratio_log_probs(self, batch: Any) -> tuple[Tensor, Tensor] | None:
        """Mean answer-token log-probabilities ``(B,)``, ``(B, K)`` of the correct and the perturbed answers of an
        evaluation batch, or ``None`` without perturbed answers (see
        :meth:`~lightning_losses.mixins.unlearning_scoring.CausalLMScorer.truth_ratio_log_probs`)."""
        state = self._unlearning_state()
        with frozen(state.model) as model:
            return state.scorer.truth_ratio_log_probs(model, self._as_batch(batch, "evaluation"))

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        state = self._unlearning_state()
        trainer = getattr(self, "_trainer", None)
        state.original_weights_path = protect_original_weights(state.model, state.original_weights_path, trainer)

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        precompute_at_train_start(self._unlearning_state().reference, getattr(self, "_trainer", None), self)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The reference log-probabilities start empty and grow with the forget set: take the saved shapes so every
        # load path (checkpoints, ddp_spawn result recovery, plain load_state_dict) restores them strictly.
        assert isinstance(self, nn.Module)
        follow_saved_shapes(self, state_dict, prefix, (REFERENCE_KEY, REFERENCE_MASK_KEY))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def save_adapter(self, directory: str | Path) -> Path:
        """Save the PEFT adapter of the unlearned model with ``save_pretrained``."""
        from lightning_losses.integrations.peft import save_adapter

        return save_adapter(self._unlearning_state().model, directory)

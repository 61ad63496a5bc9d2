"""``UnlearningMixin``: forget / retain objectives, the reference model and nothing-lost guarantees for causal LMs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_losses.functional.chunked import (
    linear_cross_entropy,
    linear_distillation_loss,
    linear_sequence_log_probs,
)
from lightning_losses.functional.unlearning import retain_kl_loss, retain_nll_loss, sequence_log_probs
from lightning_losses.losses.unlearning import (
    FLATLoss,
    GradientAscentLoss,
    IdkDPOLoss,
    NPOLoss,
    SimNPOLoss,
    UnlearningLoss,
)
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.utilities.checkpoints import follow_saved_shapes
from lightning_losses.utilities.tokens import count_label_tokens

__all__ = ["UNLEARNING_METHODS", "ReferenceMode", "UnlearningMethod", "UnlearningMixin"]

UnlearningMethod = Literal["ga", "graddiff", "graddiff_kl", "npo", "npo_rt", "npo_kl", "simnpo", "flat", "idkdpo"]
ReferenceMode = Literal["auto", "precomputed", "disabled_adapter", "named_adapter", "model", "none"]
RetainLoss = Literal["nll", "kl"]


@dataclass(frozen=True)
class _Method:
    attribute: str
    factory: Callable[[], UnlearningLoss]
    retain: RetainLoss | None


# Paper defaults: NPO β = 0.1; SimNPO β = 4.5, δ = 0, retain weight 0.125; GradDiff γ = α = 1; FLAT with TV.
UNLEARNING_METHODS: dict[str, _Method] = {
    "ga": _Method("ga", GradientAscentLoss, None),
    "graddiff": _Method("ga", lambda: GradientAscentLoss(retain_weight=1.0), "nll"),
    "graddiff_kl": _Method("ga", lambda: GradientAscentLoss(retain_weight=1.0), "kl"),
    "npo": _Method("npo", NPOLoss, None),
    "npo_rt": _Method("npo", lambda: NPOLoss(retain_weight=1.0), "nll"),
    "npo_kl": _Method("npo", lambda: NPOLoss(retain_weight=1.0), "kl"),
    "simnpo": _Method("simnpo", SimNPOLoss, "nll"),
    "flat": _Method("flat", FLATLoss, None),
    "idkdpo": _Method("idkdpo", IdkDPOLoss, "nll"),
}

_BATCH_KEYS = ("input_ids", "labels")
_REFERENCE_KEY = "unlearning_reference_logps"
_REFERENCE_MASK_KEY = "unlearning_reference_known"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


@dataclass
class _UnlearningState:
    model: nn.Module
    method: str
    attribute: str
    retain: RetainLoss | None
    reference: str
    reference_adapter: str
    reference_model: nn.Module | None
    use_hidden_states: bool
    ignore_index: int
    original_weights_path: str | None
    last_terms: dict[str, float]


class UnlearningMixin(HyperparameterMixin):
    """Unlearning for a LightningModule that holds a (transformers, optionally PEFT-wrapped) causal LM.

    Call :meth:`configure_unlearning` in ``__init__`` and :meth:`unlearning_loss` from ``training_step`` with the
    forget batch and the retain batch of the step (Lightning's ``CombinedLoader`` gives both as a dict).

    * **Methods by name**, with their paper defaults: ``"ga"``, ``"graddiff"`` (retain NLL), ``"graddiff_kl"``,
      ``"npo"``, ``"npo_rt"`` (retain NLL), ``"npo_kl"`` (retain KL to the reference), ``"simnpo"``, ``"flat"``,
      ``"idkdpo"``. The loss lives at ``self.<family>`` (``npo``, ``simnpo``, ``flat``, ``ga``, ``idkdpo``), so its
      hyperparameters are ``"npo.beta"``, ``"npo.retain_weight"``, ``"simnpo.delta"``, ...
    * **Reference model**, never a silent second copy: ``"precomputed"`` (forget log-probs of the model before
      unlearning, computed once at the start of training, stored by sample ``index`` in a checkpointed buffer),
      ``"disabled_adapter"`` (PEFT's ``disable_adapter()``; refused unless the adapter is fresh),
      ``"named_adapter"`` (a second adapter holding the model before unlearning), ``"model"`` (an explicit
      ``reference_model`` you pass, kept out of the module tree). ``"auto"`` picks the cheapest correct one:
      ``"none"`` for reference-free methods, ``"precomputed"`` when only the forget answers need the reference,
      else the named adapter when present, else the disabled fresh adapter.
    * **Nothing lost**: through PEFT the base weights are checked to be frozen; for full-weight unlearning the
      original weights are saved to ``original_weights_path`` (default ``<default_root_dir>/original_weights.pt``)
      before the first step. The adapter is a submodule, hence in every Lightning checkpoint.
    * Log-probabilities are computed from the final hidden states and the head, chunk by chunk
      (:func:`~lightning_losses.functional.chunked.linear_sequence_log_probs`), when the model allows it.

    Batches are dicts with ``input_ids`` and ``labels`` (prompt and padding at ``ignore_index``; labels are the
    input ids, shifted inside), optional ``attention_mask`` and ``index`` (sample id, needed by
    ``"precomputed"``), and for FLAT / IdkDPO ``template_input_ids`` / ``template_labels`` (the refusal answer).
    Tuples ``(input_ids, labels[, index])`` are accepted too.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_losses.jobs.language import build_gpt2
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

    # ------------------------------------------------------------------ configuration
    def configure_unlearning(
        self,
        model: nn.Module,
        method: UnlearningMethod = "npo",
        *,
        loss: UnlearningLoss | None = None,
        retain_loss: RetainLoss | Literal["default"] | None = "default",
        reference: ReferenceMode = "auto",
        reference_adapter: str = "reference",
        reference_model: nn.Module | None = None,
        use_hidden_states: bool = True,
        ignore_index: int = -100,
        original_weights_path: str | None = None,
    ) -> None:
        """Choose the method, its loss and the reference model.

        Args:
            model: the causal LM, already assigned as a submodule of this module (``self.model = model``).
            method: the unlearning method by name (see the class docstring).
            loss: a loss module replacing the method's default (same family, e.g. ``NPOLoss(beta=0.05)``).
            retain_loss: ``"nll"``, ``"kl"`` or ``None`` to override the method's retain term.
            reference: how the reference log-probabilities are obtained (see the class docstring).
            reference_adapter: name of the reference adapter for ``"named_adapter"`` (and ``"auto"``).
            reference_model: an explicit frozen reference model (for ``reference="model"``); not a submodule.
            use_hidden_states: compute log-probabilities from hidden states and the head (chunked) when possible.
            ignore_index: label of prompt and padding positions.
            original_weights_path: where full-weight unlearning saves the original weights first.

        Raises:
            ValueError: unknown method, a loss of the wrong family, a reference mode that cannot be correct for this
                model (a trained adapter with ``"disabled_adapter"``, no adapter, a missing named adapter), or a PEFT
                model whose base weights are trainable.
        """
        assert isinstance(self, nn.Module)
        if method not in UNLEARNING_METHODS:
            raise ValueError(f"Unknown unlearning method {method!r}: expected one of {', '.join(UNLEARNING_METHODS)}.")
        if not any(sub is model for sub in self.modules()):
            raise ValueError(
                "`model` must be a submodule of this LightningModule (assign `self.model = model` before calling "
                "`configure_unlearning`), so that it is trained, moved and checkpointed with the module."
            )
        spec = UNLEARNING_METHODS[method]
        default_loss = spec.factory()
        if loss is not None and type(loss) is not type(default_loss):
            raise ValueError(
                f"Method {method!r} uses {type(default_loss).__name__}, got a {type(loss).__name__}. Pass a "
                f"{type(default_loss).__name__} (or choose the method that matches your loss)."
            )
        setattr(self, spec.attribute, loss if loss is not None else default_loss)
        retain = spec.retain if retain_loss == "default" else retain_loss
        if retain not in (None, "nll", "kl"):
            raise ValueError(f"`retain_loss` must be 'nll', 'kl' or None, got {retain!r}.")
        if reference_model is not None:
            if any(sub is reference_model for sub in self.modules()):
                raise ValueError(
                    "`reference_model` is a submodule of this module, so it would be trained and checkpointed. Pass it "
                    "only to `configure_unlearning`."
                )
            reference_model.requires_grad_(False).eval()
        is_peft = _is_peft(model)
        if is_peft:
            self._check_frozen_base(model)
        state = _UnlearningState(
            model=model,
            method=method,
            attribute=spec.attribute,
            retain=retain,
            reference="none",
            reference_adapter=reference_adapter,
            reference_model=reference_model,
            use_hidden_states=use_hidden_states,
            ignore_index=ignore_index,
            original_weights_path=original_weights_path,
            last_terms={},
        )
        self.__dict__["_unlearning"] = state
        state.reference = self._resolve_reference(reference, model, state)
        for key, dtype in ((_REFERENCE_KEY, torch.float32), (_REFERENCE_MASK_KEY, torch.bool)):
            if key not in self._buffers:
                self.register_buffer(key, torch.zeros(0, dtype=dtype), persistent=True)

    @staticmethod
    def _check_frozen_base(model: nn.Module) -> None:
        trainable_base = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n and "modules_to_save" not in n
        ]
        if trainable_base:
            raise ValueError(
                f"The PEFT model trains base weights ({trainable_base[:3]} ...), so unlearning would modify the only "
                "copy of the original model. Freeze them (PEFT does by default) or unlearn without an adapter."
            )

    def _needs(self, state: _UnlearningState) -> tuple[bool, bool]:
        """(reference needed on the forget answers, reference needed at every step)."""
        loss = self.unlearning_loss_module
        per_step = state.retain == "kl" or isinstance(loss, IdkDPOLoss)
        return loss.needs_reference, per_step

    def _resolve_reference(self, reference: str, model: nn.Module, state: _UnlearningState) -> str:
        allowed = ("auto", "precomputed", "disabled_adapter", "named_adapter", "model", "none")
        if reference not in allowed:
            raise ValueError(f"Unknown reference mode {reference!r}: expected one of {', '.join(allowed)}.")
        forget_ref, per_step = self._needs(state)
        is_peft = _is_peft(model)
        has_named = is_peft and state.reference_adapter in getattr(model, "peft_config", {})
        if reference == "auto":
            if state.reference_model is not None:
                return "model"
            if not forget_ref and not per_step:
                return "none"
            if not per_step:
                return "precomputed"
            if has_named:
                return "named_adapter"
            if is_peft:
                reference = "disabled_adapter"
            else:
                raise ValueError(
                    f"Method {state.method!r} with retain term {state.retain!r} needs the reference model at every "
                    "step, and the model has no PEFT adapter to disable. Unlearn through a fresh LoRA adapter "
                    "(`lightning_losses.integrations.peft.lora_model`), load a named reference adapter, or pass an "
                    "explicit `reference_model=` (a second copy in memory)."
                )
        if reference == "none" and (forget_ref or per_step):
            raise ValueError(
                f"Method {state.method!r} needs a reference model; choose a reference mode other than 'none'."
            )
        if reference == "precomputed" and per_step:
            raise ValueError(
                f"Method {state.method!r} with retain term {state.retain!r} needs reference outputs on new inputs "
                "every step, which cannot be precomputed. Use 'disabled_adapter', 'named_adapter' or 'model'."
            )
        if reference == "model" and state.reference_model is None:
            raise ValueError("reference='model' needs `reference_model=`.")
        if reference == "disabled_adapter":
            if not is_peft:
                raise ValueError(
                    "reference='disabled_adapter' needs a PEFT model; wrap the model with a fresh LoRA adapter first."
                )
            from lightning_losses.integrations.peft import adapter_is_fresh

            if not adapter_is_fresh(model):
                raise ValueError(
                    "reference='disabled_adapter' is only correct on a fresh adapter (LoRA B = 0), but the active "
                    "adapter has been trained: disabling it would give the base model, not the model before "
                    "unlearning. Merge the adapter into the base first (`merge_and_unload()`), load it as a named "
                    f"reference adapter ({state.reference_adapter!r}) and use reference='named_adapter', or use "
                    "reference='precomputed'."
                )
        if reference == "named_adapter" and not has_named:
            adapters = sorted(getattr(model, "peft_config", {}))
            raise ValueError(
                f"reference='named_adapter' needs an adapter named {state.reference_adapter!r}, found {adapters}. "
                f"Load it with `model.load_adapter(path, adapter_name={state.reference_adapter!r})`."
            )
        return reference

    def _unlearning_state(self) -> _UnlearningState:
        state = self.__dict__.get("_unlearning")
        if state is None:
            raise RuntimeError(
                f"{type(self).__name__} is not configured for unlearning: call `self.configure_unlearning(self.model, "
                "method=...)` in __init__."
            )
        return state

    @property
    def unlearning_loss_module(self) -> UnlearningLoss:
        """The loss module of the configured method (at ``self.npo``, ``self.simnpo``, ...)."""
        state = self._unlearning_state()
        loss = getattr(self, state.attribute)
        assert isinstance(loss, UnlearningLoss)
        return loss

    @property
    def reference_mode(self) -> str:
        """The reference mode in use: ``"precomputed"``, ``"disabled_adapter"``, ``"named_adapter"``, ``"model"`` or
        ``"none"``."""
        return self._unlearning_state().reference

    @property
    def unlearning_uses_retain(self) -> bool:
        """Whether the configured method has a retain term (a retain batch is then needed every step)."""
        state = self._unlearning_state()
        return state.retain is not None and self.unlearning_loss_module.uses_retain

    @property
    def unlearning_terms(self) -> dict[str, float]:
        """The forget / retain terms of the last :meth:`unlearning_loss` call (for logging)."""
        return dict(self._unlearning_state().last_terms)

    # ------------------------------------------------------------------ batches
    def _as_batch(self, batch: Any, role: str) -> dict[str, Tensor]:
        if isinstance(batch, Mapping):
            out = dict(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            out = {"input_ids": batch[0], "labels": batch[1]}
            if len(batch) == 3:
                out["index"] = batch[2]
        else:
            raise ValueError(
                f"The {role} batch must be a dict with 'input_ids' and 'labels' (optionally 'attention_mask', 'index') "
                f"or a tuple (input_ids, labels[, index]), got {type(batch).__name__}."
            )
        missing = [k for k in _BATCH_KEYS if k not in out]
        if missing:
            raise ValueError(f"The {role} batch lacks {missing}; it has keys {sorted(out)}.")
        ids, labels = out["input_ids"], out["labels"]
        if ids.ndim != 2 or labels.shape != ids.shape:
            raise ValueError(
                f"The {role} batch must have input_ids and labels of one shape (B, T), got {tuple(ids.shape)} and "
                f"{tuple(labels.shape)}."
            )
        if ids.shape[0] == 0:
            raise ValueError(f"The {role} batch is empty. Check that the {role} set has examples.")
        counted = (labels[:, 1:] != self._unlearning_state().ignore_index).sum(-1)
        if bool((counted == 0).any()):
            bad = (counted == 0).nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"In the {role} batch, sequences {bad} have every label masked (no answer token after the first "
                "position): nothing to learn or forget. Check the prompt masking / truncation."
            )
        return out

    @staticmethod
    def _check_same_keys(forget: Mapping[str, Any], retain: Mapping[str, Any]) -> None:
        core = {"input_ids", "labels", "attention_mask", "index"}
        f, r = set(forget) & core, set(retain) & core
        if f != r:
            raise ValueError(
                f"The forget and retain batches have different keys: forget {sorted(set(forget))}, retain "
                f"{sorted(set(retain))} (differing: {sorted(f ^ r)}). Build both with the same collate function."
            )

    # ------------------------------------------------------------------ log-probabilities
    def _hidden_and_head(self, model: nn.Module, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Any] | None:
        if not self._unlearning_state().use_hidden_states:
            return None
        try:
            from lightning_losses.integrations.transformers import causal_lm_hidden_states

            return causal_lm_hidden_states(model, ids, mask)
        except (ValueError, TypeError, ImportError):
            return None

    def _logits(self, model: nn.Module, ids: Tensor, mask: Tensor | None) -> Tensor:
        out = model(input_ids=ids, attention_mask=mask) if mask is not None else model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out

    def _sequence_logps(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> tuple[Tensor, Tensor]:
        """Per-sequence summed answer log-probabilities and answer lengths of ``batch`` under ``model``."""
        state = self._unlearning_state()
        ids, labels = batch[prefix + "input_ids"], batch[prefix + "labels"]
        mask = batch.get(prefix + "attention_mask")
        lengths = (labels[:, 1:] != state.ignore_index).sum(-1)
        pair = self._hidden_and_head(model, ids, mask)
        if pair is not None:
            hidden, head = pair
            logps = linear_sequence_log_probs(
                hidden, head.weight, labels, head.bias, state.ignore_index, shift=True, softcap=head.softcap
            )
        else:
            logps = sequence_log_probs(self._logits(model, ids, mask), labels, state.ignore_index, shift=True)
        return logps, lengths

    def _mean_token_probs(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> Tensor:
        state = self._unlearning_state()
        ids, labels = batch[prefix + "input_ids"], batch[prefix + "labels"]
        mask = batch.get(prefix + "attention_mask")
        target = labels[:, 1:]
        counted = target != state.ignore_index
        pair = self._hidden_and_head(model, ids, mask)
        if pair is not None:
            hidden, head = pair
            ce = linear_cross_entropy(
                hidden[:, :-1], head.weight, target, head.bias, state.ignore_index, "none", softcap=head.softcap
            )
        else:
            from lightning_losses.functional.unlearning import token_log_probs

            lp, _ = token_log_probs(self._logits(model, ids, mask), labels, state.ignore_index, shift=True)
            ce = -lp
        probs = torch.exp(-ce) * counted
        return probs.sum(-1) / counted.sum(-1).clamp(min=1).to(probs.dtype)

    def reference_context(self) -> AbstractContextManager[nn.Module]:
        """A context giving the reference model (no gradient, eval mode) for the configured reference mode."""
        state = self._unlearning_state()
        from lightning_losses.integrations import peft as peft_glue

        if state.reference == "disabled_adapter":
            return peft_glue.disabled_adapter(state.model)
        if state.reference == "named_adapter":
            return peft_glue.named_adapter(state.model, state.reference_adapter)
        if state.reference == "model":
            assert state.reference_model is not None
            return _frozen(state.reference_model)
        if state.reference == "precomputed":
            # the model itself, before its first update (used only to precompute)
            return _frozen(state.model)
        raise RuntimeError(f"Reference mode {state.reference!r} has no reference model.")

    def reference_log_probs(self, batch: Mapping[str, Tensor], prefix: str = "") -> Tensor:
        """Reference sequence log-probabilities of a batch (looked up by ``index`` when precomputed)."""
        state = self._unlearning_state()
        if state.reference == "precomputed" and not prefix:
            return self._lookup_reference(batch)
        with self.reference_context() as ref:
            logps, _ = self._sequence_logps(ref, batch, prefix)
        return logps.detach()

    def _lookup_reference(self, batch: Mapping[str, Tensor]) -> Tensor:
        index = batch.get("index")
        if index is None:
            raise ValueError(
                "reference='precomputed' looks reference log-probabilities up by sample: the forget batches need an "
                "'index' entry (a unique id per example). Add it to the dataset, or use an adapter reference."
            )
        known: Tensor = getattr(self, _REFERENCE_MASK_KEY)
        values: Tensor = getattr(self, _REFERENCE_KEY)
        index = index.to(known.device).long()
        if known.numel() == 0 or int(index.max()) >= known.numel() or not bool(known[index].all()):
            raise RuntimeError(
                "Reference log-probabilities are missing for some forget examples: they are computed at the start of "
                "training from the 'forget' dataloader. Call `precompute_reference(forget_dataloader)` before "
                "training, or make sure the training dataloader is a dict with a 'forget' entry."
            )
        return values[index]

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
        values: dict[int, float] = {}
        device = next(iter(state.model.parameters())).device
        with self.reference_context() as ref:
            for raw in dataloader:
                batch = self._as_batch(raw, "forget")
                if "index" not in batch:
                    self._lookup_reference(batch)  # raises the error about the missing index
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                logps, _ = self._sequence_logps(ref, batch)
                for i, v in zip(batch["index"].tolist(), logps.tolist()):
                    values[int(i)] = v
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
        self._buffers[_REFERENCE_KEY] = mean.float()
        self._buffers[_REFERENCE_MASK_KEY] = known
        return int(known.sum())

    @property
    def reference_precomputed(self) -> bool:
        """Whether reference log-probabilities are stored (for ``"precomputed"``)."""
        known = getattr(self, _REFERENCE_MASK_KEY, None)
        return known is not None and bool(known.any())

    # ------------------------------------------------------------------ the loss
    def retain_token_count(self, retain: Any) -> Tensor:
        """Answer tokens of a retain batch: the count its token-mean retain term divides by."""
        labels = self._as_batch(retain, "retain")["labels"]
        return count_label_tokens(labels, self._unlearning_state().ignore_index, shift=True)

    def retain_term(self, retain: Any, *, num_items_in_batch: Tensor | float | None = None) -> Tensor:
        """The retain term of the method (token-mean NLL, or KL(reference ‖ model) over answer tokens).

        Args:
            retain: A retain batch.
            num_items_in_batch: Token count to divide by instead of this batch's (see
                :func:`~lightning_losses.utilities.tokens.step_num_items`).
        """
        state = self._unlearning_state()
        batch = self._as_batch(retain, "retain")
        if state.retain == "kl":
            ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
            pair = self._hidden_and_head(state.model, ids, mask)
            with self.reference_context() as ref:
                ref_pair = self._hidden_and_head(ref, ids, mask) if pair is not None else None
                if ref_pair is None:
                    ref_logits = self._logits(ref, ids, mask).detach()
            if pair is not None and ref_pair is not None:
                (hidden, head), (ref_hidden, ref_head) = pair, ref_pair
                return linear_distillation_loss(
                    hidden[:, :-1],
                    head.weight,
                    ref_hidden[:, :-1].detach(),
                    ref_head.weight.detach(),
                    beta=0.0,
                    labels=labels[:, 1:],
                    ignore_index=state.ignore_index,
                    student_bias=head.bias,
                    teacher_bias=None if ref_head.bias is None else ref_head.bias.detach(),
                    student_softcap=head.softcap,
                    teacher_softcap=ref_head.softcap,
                    num_items_in_batch=num_items_in_batch,
                )
            logits = self._logits(state.model, ids, mask)
            return retain_kl_loss(
                logits, ref_logits, labels, state.ignore_index, shift=True, num_items_in_batch=num_items_in_batch
            )
        logps, lengths = self._sequence_logps(state.model, batch)
        return retain_nll_loss(logps, lengths, num_items_in_batch=num_items_in_batch)

    def unlearning_loss(
        self, forget: Any, retain: Any | None = None, *, num_items_in_batch: Tensor | float | None = None
    ) -> Tensor:
        """The configured method's loss on one forget batch (and one retain batch when the method uses it).

        ``num_items_in_batch`` normalises the token-mean retain term (see :meth:`retain_term`).

        Raises:
            ValueError: on an empty batch, a sequence with every label masked, missing keys, forget and retain
                batches with different keys, or a missing retain batch for a method with a retain term.
        """
        state = self._unlearning_state()
        loss_module = self.unlearning_loss_module
        f = self._as_batch(forget, "forget")
        if retain is not None:
            r = self._as_batch(retain, "retain")
            self._check_same_keys(f, r)
        needs_retain = state.retain is not None and loss_module.uses_retain
        if needs_retain and retain is None:
            raise ValueError(
                f"Method {state.method!r} has a retain term (retain_weight > 0) but no retain batch was given. Combine "
                "forget and retain dataloaders (CombinedLoader) or set the retain weight to 0."
            )
        retain_value = self.retain_term(retain, num_items_in_batch=num_items_in_batch) if needs_retain else None
        if loss_module.needs_template:
            missing = [k for k in ("template_input_ids", "template_labels") if k not in f]
            if missing:
                raise ValueError(
                    f"Method {state.method!r} needs a template (refusal) answer per forget example: the forget batch "
                    f"lacks {missing}."
                )
        model = state.model
        if isinstance(loss_module, NPOLoss):
            policy, _ = self._sequence_logps(model, f)
            loss = loss_module(policy, self.reference_log_probs(f), retain_value)
        elif isinstance(loss_module, (SimNPOLoss, GradientAscentLoss)):
            policy, lengths = self._sequence_logps(model, f)
            loss = loss_module(policy, lengths, retain_value)
        elif isinstance(loss_module, FLATLoss):
            loss = loss_module(
                self._mean_token_probs(model, f), self._mean_token_probs(model, f, "template_"), retain_value
            )
        elif isinstance(loss_module, IdkDPOLoss):
            policy_f, _ = self._sequence_logps(model, f)
            policy_i, _ = self._sequence_logps(model, f, "template_")
            loss = loss_module(
                policy_i, self.reference_log_probs(f, "template_"), policy_f, self.reference_log_probs(f), retain_value
            )
        else:  # pragma: no cover - guarded by configure_unlearning
            raise TypeError(f"Unsupported unlearning loss {type(loss_module).__name__}.")
        terms = {"loss": float(loss.detach())}
        if retain_value is not None:
            terms["retain"] = float(retain_value.detach())
        state.last_terms = terms
        return loss

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def unlearning_token_statistics(self, batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-token log-probabilities, their expected value and spread under the model, and the mask (for metrics)."""
        from lightning_losses.functional.unlearning import token_logprob_statistics

        state = self._unlearning_state()
        b = self._as_batch(batch, "evaluation")
        with _frozen(state.model) as model:
            logits = self._logits(model, b["input_ids"], b.get("attention_mask"))
        return token_logprob_statistics(logits, b["labels"], state.ignore_index, shift=True)

    @torch.no_grad()
    def truth_ratio_log_probs(self, batch: Any) -> tuple[Tensor, Tensor] | None:
        """Mean answer-token log-probabilities of the correct and the perturbed answers of an evaluation batch.

        The batch carries ``perturbed_input_ids`` / ``perturbed_labels`` of shape ``(B, K, T)`` (``K`` wrong answers
        per sample, optional ``perturbed_attention_mask``) and optionally ``paraphrased_input_ids`` /
        ``paraphrased_labels`` ``(B, T)`` (the correct answer reworded); without a paraphrase the sample's own
        ``input_ids`` / ``labels`` are the correct answer.

        Returns:
            ``(correct (B,), perturbed (B, K))`` float32, or ``None`` when the batch has no perturbed answers.

        Raises:
            ValueError: a paraphrase without perturbed answers, missing labels, wrong shapes, or an answer with every
                label masked.
        """
        state = self._unlearning_state()
        b = self._as_batch(batch, "evaluation")
        if "perturbed_input_ids" not in b:
            if any(k.startswith("paraphrased_") for k in b):
                raise ValueError(
                    "The evaluation batch has paraphrased answers but no 'perturbed_input_ids': the truth ratio "
                    "compares the correct answer with perturbed (wrong) ones. Add 'perturbed_input_ids' / "
                    "'perturbed_labels' of shape (B, K, T)."
                )
            return None
        prefix = "paraphrased_" if "paraphrased_input_ids" in b else ""
        pert_ids, pert_labels = b["perturbed_input_ids"], b.get("perturbed_labels")
        if pert_labels is None or (prefix and "paraphrased_labels" not in b):
            raise ValueError(
                "The evaluation batch needs labels for its answers: 'perturbed_labels' with 'perturbed_input_ids' and "
                "'paraphrased_labels' with 'paraphrased_input_ids' (prompt and padding at ignore_index)."
            )
        n = b["input_ids"].shape[0]
        if pert_ids.ndim != 3 or pert_ids.shape[0] != n or pert_labels.shape != pert_ids.shape:
            raise ValueError(
                f"'perturbed_input_ids' and 'perturbed_labels' must both be (B, K, T) with B = {n}, got "
                f"{tuple(pert_ids.shape)} and {tuple(pert_labels.shape)}."
            )
        if prefix and (
            b["paraphrased_input_ids"].ndim != 2
            or b["paraphrased_labels"].shape != b["paraphrased_input_ids"].shape
            or b["paraphrased_input_ids"].shape[0] != n
        ):
            raise ValueError(
                f"'paraphrased_input_ids' and 'paraphrased_labels' must both be (B, T) with B = {n}, got "
                f"{tuple(b['paraphrased_input_ids'].shape)} and {tuple(b['paraphrased_labels'].shape)}."
            )
        k = pert_ids.shape[1]
        flat = {"input_ids": pert_ids.flatten(0, 1), "labels": pert_labels.flatten(0, 1)}
        if "perturbed_attention_mask" in b:
            flat["attention_mask"] = b["perturbed_attention_mask"].flatten(0, 1)
        means = []
        with _frozen(state.model) as model:
            for name, sub, pre in (("correct", b, prefix), ("perturbed", flat, "")):
                total, lengths = self._sequence_logps(model, sub, pre)
                if bool((lengths == 0).any()):
                    raise ValueError(
                        f"Some {name} answers have every label masked: the truth ratio needs answer tokens in each."
                    )
                means.append(total.float() / lengths.to(torch.float32))
        return means[0], means[1].view(n, k)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        state = self._unlearning_state()
        if _is_peft(state.model):
            self._check_frozen_base(state.model)
            return
        trainer = getattr(self, "_trainer", None)
        path = state.original_weights_path
        if path is None:
            root = trainer.default_root_dir if trainer is not None else "."
            path = str(Path(root) / "original_weights.pt")
        is_zero = trainer is None or trainer.is_global_zero
        if is_zero and not Path(path).exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}, path)
        state.original_weights_path = path

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        state = self._unlearning_state()
        if state.reference != "precomputed" or self.reference_precomputed:
            return
        trainer = getattr(self, "_trainer", None)
        loader = None
        if trainer is not None:
            combined = trainer.train_dataloader
            iterables = getattr(combined, "iterables", combined)
            if isinstance(iterables, Mapping):
                loader = iterables.get("forget")
        if loader is None:
            raise RuntimeError(
                "reference='precomputed' needs the forget data before training: make the training dataloader a dict "
                "(CombinedLoader) with a 'forget' entry, or call `precompute_reference(forget_dataloader)` first."
            )
        reduce = None
        if trainer is not None and trainer.world_size > 1:
            strategy = trainer.strategy

            def reduce(t: Tensor) -> Tensor:
                return strategy.reduce(t, reduce_op="sum")

        self.precompute_reference(loader, reduce)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The reference log-probabilities start empty and grow with the forget set: take the saved shapes so every
        # load path (checkpoints, ddp_spawn result recovery, plain load_state_dict) restores them strictly.
        assert isinstance(self, nn.Module)
        follow_saved_shapes(self, state_dict, prefix, (_REFERENCE_KEY, _REFERENCE_MASK_KEY))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def save_adapter(self, directory: str | Path) -> Path:
        """Save the PEFT adapter of the unlearned model with ``save_pretrained``."""
        from lightning_losses.integrations.peft import save_adapter

        return save_adapter(self._unlearning_state().model, directory)


def _max_across(value: Tensor, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """The maximum of a non-negative scalar across processes using only a sum reduction (one-hot over ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    ranks = torch.zeros(dist.get_world_size(), dtype=value.dtype, device=value.device)
    ranks[dist.get_rank()] = value
    return reduce_sum(ranks).max()


class _frozen(AbstractContextManager[nn.Module]):
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

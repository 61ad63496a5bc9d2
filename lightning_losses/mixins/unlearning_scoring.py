r"""Answer-token scores of a causal LM for unlearning, and the checks of the batches they are computed on.

:class:`CausalLMScorer` computes every quantity the unlearning losses and metrics read — summed answer
log-probabilities, mean answer-token probabilities, the retain NLL and the retain KL to a reference — from one
forward of the model, on one of two paths:

* **hidden states and head** (chunked, the ``B × T × V`` logits are never formed): the final hidden states come
  from :func:`~lightning_losses.integrations.transformers.causal_lm_hidden_states` and go through
  :func:`~lightning_losses.functional.chunked.linear_sequence_log_probs`, ``linear_cross_entropy`` or
  ``linear_distillation_loss``;
* **logits**: the model's own output.

The path is chosen once per model (and per grad mode, since a frozen sharded head can be gathered whole while a
trained one cannot): the logits when ``use_hidden_states=False``, when the model is not a transformers causal LM
with a plain linear head, or when the hidden-state helper refuses the model at its first forward (a head called
several times, a head partitioned by DeepSpeed ZeRO-3 / FSDP2 ``reshard_after_forward=True``). Only those refusals of
the helper itself switch the path; any other error of the forward propagates.

Batches are dicts with ``input_ids`` and ``labels`` (prompt and padding at ``ignore_index``; labels are the input
ids, shifted inside), optional ``attention_mask`` and ``index``; the template answer of a forget example is under
``template_input_ids`` / ``template_labels`` / ``template_attention_mask`` (read with ``prefix="template_"``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_losses.functional.chunked import (
    linear_cross_entropy,
    linear_distillation_loss,
    linear_sequence_log_probs,
)
from lightning_losses.functional.unlearning import (
    mean_token_probs,
    retain_kl_loss,
    retain_nll_loss,
    sequence_log_probs,
    token_log_probs,
    token_logprob_statistics,
)
from lightning_losses.losses.unlearning import ACTIVATION_SCORES, RETAIN_SCORES, UnlearningScores, loss_needs
from lightning_losses.utilities.numerics import NumItems

__all__ = [
    "CausalLMScorer",
    "LMOutput",
    "as_unlearning_batch",
    "check_layer",
    "check_same_keys",
    "check_step_batches",
    "check_template",
    "find_layer",
    "step_terms",
    "truth_ratio_inputs",
    "uses_retain_data",
]

Path = Literal["hidden", "logits"]
_BATCH_KEYS = ("input_ids", "labels")


def as_unlearning_batch(batch: Any, role: str, ignore_index: int = -100) -> dict[str, Tensor]:
    """A checked dict of a forget / retain / evaluation batch (a dict, or a tuple ``(input_ids, labels[, index])``).

    Raises:
        ValueError: not a dict or such a tuple, missing keys, mismatched shapes, an empty batch, or a sequence whose
            every label is masked.
    """
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
    counted = (labels[:, 1:] != ignore_index).sum(-1)
    if bool((counted == 0).any()):
        bad = (counted == 0).nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"In the {role} batch, sequences {bad} have every label masked (no answer token after the first "
            "position): nothing to learn or forget. Check the prompt masking / truncation."
        )
    return out


def check_same_keys(forget: Mapping[str, Any], retain: Mapping[str, Any]) -> None:
    """Refuse forget and retain batches built differently (one with an attention mask or index, the other without)."""
    core = {"input_ids", "labels", "attention_mask", "index"}
    f, r = set(forget) & core, set(retain) & core
    if f != r:
        raise ValueError(
            f"The forget and retain batches have different keys: forget {sorted(set(forget))}, retain "
            f"{sorted(set(retain))} (differing: {sorted(f ^ r)}). Build both with the same collate function."
        )


def check_template(forget: Mapping[str, Any], method: str) -> Mapping[str, Any]:
    """``forget`` itself, after checking that it carries a template answer per example."""
    missing = [k for k in ("template_input_ids", "template_labels") if k not in forget]
    if missing:
        raise ValueError(
            f"Method {method!r} needs a template (refusal) answer per forget example: the forget batch lacks {missing}."
        )
    return forget


def check_step_batches(
    forget: Mapping[str, Any],
    retain: Mapping[str, Any] | None,
    method: str,
    needs_retain: bool,
    needs: frozenset[str],
) -> None:
    """Refuse a step's batches that the loss cannot use: forget and retain batches built differently, a missing
    retain batch for a loss with a retain term, a missing template answer for a loss that reads one."""
    if retain is not None:
        check_same_keys(forget, retain)
    if needs_retain and retain is None:
        raise ValueError(
            f"Method {method!r} has a retain term (retain_weight > 0) but no retain batch was given. Combine "
            "forget and retain dataloaders (CombinedLoader) or set the retain weight to 0."
        )
    if any(name.startswith("template_") for name in needs):
        check_template(forget, method)


def check_layer(loss: nn.Module, *models: nn.Module | None) -> None:
    """Refuse, before training, a ``loss.layer`` that is not found in the models (for losses reading activations)."""
    if loss_needs(loss) & ACTIVATION_SCORES:
        for model in models:
            if model is not None:
                find_layer(model, getattr(loss, "layer", None))


def uses_retain_data(loss: nn.Module, retain: str | None) -> bool:
    """Whether a step needs a retain batch: the loss's retain term counts now (its ``uses_retain``, else its
    ``needs``), and it is a retain NLL / KL (``retain`` not ``None``) or retain activations the loss reads."""
    needs = loss_needs(loss)
    flag = getattr(loss, "uses_retain", None)
    counts = bool(flag) if flag is not None else "retain" in needs
    return counts and (retain is not None or bool(needs & (RETAIN_SCORES - {"retain"})))


def step_terms(loss_module: nn.Module, loss: Any, scores: UnlearningScores) -> dict[str, float]:
    """The loss and (when computed) retain term of a step, for logging, after checking the loss is a scalar."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise TypeError(
            f"{type(loss_module).__name__}(scores) must return a scalar tensor, got "
            f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}."
        )
    terms = {"loss": float(loss.detach())}
    retain = scores.get("retain") if "retain" in scores.computed else None
    if retain is not None:
        terms["retain"] = float(retain.detach())
    return terms


def truth_ratio_inputs(batch: Mapping[str, Tensor]) -> tuple[str, dict[str, Tensor], int, int] | None:
    """The correct answer's prefix, the flattened perturbed answers and ``(B, K)`` of a truth-ratio batch.

    ``None`` when the batch has no perturbed answers.

    Raises:
        ValueError: a paraphrase without perturbed answers, missing labels or wrong shapes.
    """
    if "perturbed_input_ids" not in batch:
        if any(k.startswith("paraphrased_") for k in batch):
            raise ValueError(
                "The evaluation batch has paraphrased answers but no 'perturbed_input_ids': the truth ratio "
                "compares the correct answer with perturbed (wrong) ones. Add 'perturbed_input_ids' / "
                "'perturbed_labels' of shape (B, K, T)."
            )
        return None
    prefix = "paraphrased_" if "paraphrased_input_ids" in batch else ""
    pert_ids, pert_labels = batch["perturbed_input_ids"], batch.get("perturbed_labels")
    if pert_labels is None or (prefix and "paraphrased_labels" not in batch):
        raise ValueError(
            "The evaluation batch needs labels for its answers: 'perturbed_labels' with 'perturbed_input_ids' and "
            "'paraphrased_labels' with 'paraphrased_input_ids' (prompt and padding at ignore_index)."
        )
    n = batch["input_ids"].shape[0]
    if pert_ids.ndim != 3 or pert_ids.shape[0] != n or pert_labels.shape != pert_ids.shape:
        raise ValueError(
            f"'perturbed_input_ids' and 'perturbed_labels' must both be (B, K, T) with B = {n}, got "
            f"{tuple(pert_ids.shape)} and {tuple(pert_labels.shape)}."
        )
    if prefix:
        para_ids, para_labels = batch["paraphrased_input_ids"], batch["paraphrased_labels"]
        if para_ids.ndim != 2 or para_labels.shape != para_ids.shape or para_ids.shape[0] != n:
            raise ValueError(
                f"'paraphrased_input_ids' and 'paraphrased_labels' must both be (B, T) with B = {n}, got "
                f"{tuple(para_ids.shape)} and {tuple(para_labels.shape)}."
            )
    flat = {"input_ids": pert_ids.flatten(0, 1), "labels": pert_labels.flatten(0, 1)}
    if "perturbed_attention_mask" in batch:
        flat["attention_mask"] = batch["perturbed_attention_mask"].flatten(0, 1)
    return prefix, flat, n, pert_ids.shape[1]


class _StopForward(Exception):
    """Raised by the activation hook once the layer has run: the rest of the forward is not needed."""


def find_layer(model: nn.Module, layer: str | None) -> nn.Module:
    """The submodule of ``model`` named ``layer``: its dotted name, or a unique suffix of one, or the longest name
    that is a suffix of ``layer`` (so one name works with and without a PEFT wrapper's ``base_model.model.``
    prefix); ``None``: the block at a quarter of the depth of the largest ``nn.ModuleList`` (the transformer blocks).

    Raises:
        ValueError: no module matches, several do, or (``None``) the model has no ``nn.ModuleList``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2) for _ in range(8)]))
        >>> find_layer(net, "1.3") is net[1][3], find_layer(net, "x.1.3") is net[1][3]
        (True, True)
        >>> find_layer(net, None) is net[1][2]  # a quarter of the depth
        True
    """
    names = dict(model.named_modules())
    if layer is None:
        lists = [(len(m), n) for n, m in names.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise ValueError(
                f"{type(model).__name__} has no nn.ModuleList of blocks to choose a layer from: name the layer "
                "(e.g. `RMULoss(layer='model.layers.7')`)."
            )
        size, name = max(lists, key=lambda item: item[0])
        return names[name][size // 4]  # type: ignore[index]
    if layer in names:
        return names[layer]
    matches = [n for n in names if n.endswith("." + layer)]
    if not matches:
        inner = [n for n in names if n and layer.endswith("." + n)]
        matches = [max(inner, key=len)] if inner else []
    if len(matches) != 1:
        close = [n for n in names if layer.split(".")[-1] in n.split(".")][:5]
        found = (
            "several modules match: " + ", ".join(matches[:5]) if matches else f"no module matches (similar: {close})"
        )
        raise ValueError(
            f"Layer {layer!r} of {type(model).__name__}: {found}. Pass the module's full dotted name (see "
            "`model.named_modules()`)."
        )
    return names[matches[0]]


class _Once:
    """A zero-argument function computed once (one forward shared by the scores of a step)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.value = fn, False, None

    def __call__(self) -> Any:
        if not self.done:
            self.value, self.done = self.fn(), True
        return self.value


@dataclass
class LMOutput:
    """One forward of a causal LM: its final hidden states and head (``path="hidden"``), or its logits."""

    path: Path
    logits: Tensor | None = None
    hidden: Tensor | None = None
    head: Any = None
    """The :class:`~lightning_losses.integrations.transformers.OutputHead` (weight, bias, softcap) on the hidden
    path."""

    def as_logits(self) -> Tensor:
        """The logits, formed from the hidden states and the head on the hidden path."""
        if self.logits is not None:
            return self.logits
        assert self.hidden is not None and self.head is not None
        z = self.hidden @ self.head.weight.T
        if self.head.bias is not None:
            z = z + self.head.bias
        return z if self.head.softcap is None else self.head.softcap * torch.tanh(z / self.head.softcap)


class CausalLMScorer:
    """Answer-token scores of causal LMs, on the hidden-state (chunked) or the logits path chosen once per model.

    Args:
        ignore_index: label of prompt and padding positions.
        use_hidden_states: use the hidden states and the head where the model allows it.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16)).eval()
        >>> ids = torch.randint(0, 40, (2, 6))
        >>> chunked, plain = CausalLMScorer(), CausalLMScorer(use_hidden_states=False)
        >>> a, lengths = chunked.sequence_log_probs(lm, {"input_ids": ids, "labels": ids})
        >>> b, _ = plain.sequence_log_probs(lm, {"input_ids": ids, "labels": ids})
        >>> torch.allclose(a, b, atol=1e-5), lengths.tolist(), chunked.path(lm), plain.path(lm)
        (True, [5, 5], 'hidden', 'logits')
    """

    def __init__(self, ignore_index: int = -100, use_hidden_states: bool = True) -> None:
        self.ignore_index = ignore_index
        self.use_hidden_states = use_hidden_states
        self._paths: weakref.WeakKeyDictionary[nn.Module, dict[bool, Path]] = weakref.WeakKeyDictionary()
        self.fallback_reasons: dict[str, str] = {}
        """Why a model (by class name) is scored from its logits although ``use_hidden_states`` is set."""

    def __getstate__(self) -> dict[str, Any]:
        # the paths are keyed by model object: a copy (pickled to spawned processes, deep-copied) decides anew
        return {k: v for k, v in self.__dict__.items() if k != "_paths"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._paths = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ the path
    def path(self, model: nn.Module) -> Path | None:
        """The path chosen for ``model`` under the current grad mode (``None`` until its first forward)."""
        return self._paths.get(model, {}).get(torch.is_grad_enabled())

    def _static_path(self, model: nn.Module) -> Path:
        """The path decided before any forward: by the setting and the model's type and head."""
        if not self.use_hidden_states:
            return "logits"
        try:
            from lightning_losses.integrations.transformers import output_head

            output_head(model)
        except (ImportError, TypeError, ValueError) as error:
            self.fallback_reasons[type(model).__name__] = str(error)
            return "logits"
        return "hidden"

    def forward(self, model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> LMOutput:
        """One forward of ``model`` on the path chosen for it (chosen now on the first call)."""
        grad = torch.is_grad_enabled()
        paths = self._paths.setdefault(model, {})
        path = paths.get(grad)
        if path is None:
            path = self._static_path(model)
            if path == "hidden":
                from lightning_losses.integrations.transformers import HiddenStatesUnavailable

                try:
                    out = self._hidden(model, ids, mask)
                except HiddenStatesUnavailable as error:  # the helper's own refusal; the model's errors propagate
                    self.fallback_reasons[type(model).__name__] = str(error)
                    from lightning.pytorch.utilities import rank_zero_warn

                    rank_zero_warn(f"Scoring {type(model).__name__} from its logits (not chunked): {error}")
                    paths[grad] = "logits"
                    return self._logits(model, ids, mask)
                paths[grad] = "hidden"
                return out
            paths[grad] = path
        return self._hidden(model, ids, mask) if path == "hidden" else self._logits(model, ids, mask)

    @staticmethod
    def _hidden(model: nn.Module, ids: Tensor, mask: Tensor | None) -> LMOutput:
        from lightning_losses.integrations.transformers import causal_lm_hidden_states

        hidden, head = causal_lm_hidden_states(model, ids, mask)
        return LMOutput("hidden", hidden=hidden, head=head)

    @staticmethod
    def _logits(model: nn.Module, ids: Tensor, mask: Tensor | None) -> LMOutput:
        return LMOutput("logits", logits=CausalLMScorer.logits(model, ids, mask))

    @staticmethod
    def logits(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """The model's own logits ``(B, T, V)`` (for statistics that need the whole distribution)."""
        out = model(input_ids=ids, attention_mask=mask) if mask is not None else model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out

    # ------------------------------------------------------------------ scores
    def lengths(self, batch: Mapping[str, Tensor], prefix: str = "") -> Tensor:
        """``(B,)`` answer tokens per sequence (labels after the first position that are not ``ignore_index``)."""
        return (batch[prefix + "labels"][:, 1:] != self.ignore_index).sum(-1)

    def sequence_log_probs(
        self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = ""
    ) -> tuple[Tensor, Tensor]:
        """Per-sequence summed answer log-probabilities ``(B,)`` and answer lengths ``(B,)`` under ``model``."""
        return self._sequence_from(self._forward_batch(model, batch, prefix), batch[prefix + "labels"]), self.lengths(
            batch, prefix
        )

    def _forward_batch(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> LMOutput:
        return self.forward(model, batch[prefix + "input_ids"], batch.get(prefix + "attention_mask"))

    def _sequence_from(self, out: LMOutput, labels: Tensor) -> Tensor:
        if out.path == "hidden":
            assert out.hidden is not None
            head = out.head
            return linear_sequence_log_probs(
                out.hidden, head.weight, labels, head.bias, self.ignore_index, shift=True, softcap=head.softcap
            )
        return sequence_log_probs(out.as_logits(), labels, self.ignore_index, shift=True)

    def _tokens_from(self, out: LMOutput, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token answer log-probabilities ``(B, T - 1)`` (0 where masked) and the answer mask."""
        if out.path == "logits":
            return token_log_probs(out.as_logits(), labels, self.ignore_index, shift=True)
        assert out.hidden is not None
        head, target = out.head, labels[:, 1:]
        counted = target != self.ignore_index
        ce = linear_cross_entropy(
            out.hidden[:, :-1], head.weight, target, head.bias, self.ignore_index, "none", softcap=head.softcap
        )
        return (-ce).masked_fill(~counted, 0.0), counted

    def _mean_probs_from(self, out: LMOutput, labels: Tensor) -> Tensor:
        if out.path == "logits":
            return mean_token_probs(out.as_logits(), labels, self.ignore_index, shift=True)
        lp, counted = self._tokens_from(out, labels)
        probs = torch.exp(lp) * counted
        return probs.sum(-1) / counted.sum(-1).clamp(min=1).to(probs.dtype)

    def mean_token_probs(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> Tensor:
        """Per-sequence mean answer-token probability ``(B,)`` under ``model`` (FLAT's statistic)."""
        return self._mean_probs_from(self._forward_batch(model, batch, prefix), batch[prefix + "labels"])

    def token_log_probs(self, model: nn.Module, batch: Mapping[str, Tensor], prefix: str = "") -> tuple[Tensor, Tensor]:
        """Per-token answer log-probabilities ``(B, T - 1)`` under ``model`` (0 where masked) and the answer mask."""
        return self._tokens_from(self._forward_batch(model, batch, prefix), batch[prefix + "labels"])

    def activations(self, model: nn.Module, batch: Mapping[str, Tensor], layer: str | None) -> Tensor:
        """The output ``(B, T, D)`` of ``layer`` (see :func:`find_layer`) on ``batch``, read with a forward hook; the
        forward stops there (the later layers are not run)."""
        module = find_layer(model, layer)
        cache: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            cache.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = module.register_forward_hook(hook)
        try:
            self.logits(model, batch["input_ids"], batch.get("attention_mask"))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not cache or not isinstance(cache[0], Tensor) or cache[0].ndim != 3:
            got = "nothing" if not cache else f"{type(cache[0]).__name__} {tuple(getattr(cache[0], 'shape', ()))}"
            raise ValueError(
                f"Layer {layer!r} gave {got} on the batch, not activations (B, T, D): name a block (e.g. a decoder "
                "layer) whose output is the hidden states."
            )
        return cache[0]

    def retain_nll(
        self, model: nn.Module, batch: Mapping[str, Tensor], num_items_in_batch: Tensor | float | None = None
    ) -> Tensor:
        """Token-mean NLL of the answers of ``batch`` under ``model``."""
        logps, lengths = self.sequence_log_probs(model, batch)
        return retain_nll_loss(logps, lengths, num_items_in_batch=num_items_in_batch)

    def retain_kl(
        self,
        model: nn.Module,
        reference: Callable[[], AbstractContextManager[nn.Module]],
        batch: Mapping[str, Tensor],
        num_items_in_batch: Tensor | float | None = None,
    ) -> Tensor:
        """KL(reference ‖ model) over the answer tokens of ``batch`` (token mean); ``reference()`` gives the model."""
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        policy = self.forward(model, ids, mask)
        with reference() as ref_model:
            ref = self.forward(ref_model, ids, mask)
        if policy.path == "hidden" and ref.path == "hidden":
            assert policy.hidden is not None and ref.hidden is not None
            head, ref_head = policy.head, ref.head
            return linear_distillation_loss(
                policy.hidden[:, :-1],
                head.weight,
                ref.hidden[:, :-1].detach(),
                ref_head.weight.detach(),
                beta=0.0,
                labels=labels[:, 1:],
                ignore_index=self.ignore_index,
                student_bias=head.bias,
                teacher_bias=None if ref_head.bias is None else ref_head.bias.detach(),
                student_softcap=head.softcap,
                teacher_softcap=ref_head.softcap,
                num_items_in_batch=num_items_in_batch,
            )
        with torch.no_grad():
            ref_logits = ref.as_logits()
        return retain_kl_loss(
            policy.as_logits(),
            ref_logits,
            labels,
            self.ignore_index,
            shift=True,
            num_items_in_batch=num_items_in_batch,
        )

    def scores(
        self,
        model: nn.Module,
        forget: Mapping[str, Tensor],
        reference: Callable[[Mapping[str, Tensor], str], Tensor],
        retain: Callable[[], Tensor | None],
        method: str = "the loss",
        *,
        reference_model: Callable[[], AbstractContextManager[nn.Module]] | None = None,
        retain_batch: Mapping[str, Tensor] | None = None,
        layer: str | None = None,
        num_items: Callable[[Tensor], NumItems] | None = None,
    ) -> UnlearningScores:
        """The lazy :class:`~lightning_losses.UnlearningScores` of a forget batch under ``model``.

        The forget batch's forward (and the template's) runs once however many entries read it.

        Args:
            model: the model being unlearned.
            forget: the (checked) forget batch.
            reference: ``reference(batch, prefix)``, the reference log-probabilities of the answers of a batch.
            retain: computes the retain term of the step (or ``None``).
            method: the method's name, for the error about a missing template answer.
            reference_model: a context giving the reference model (for its logits and activations).
            retain_batch: the (checked) retain batch, for the retain activations.
            layer: the layer whose activations are read (see :func:`find_layer`).
            num_items: turns a local item count into the optimizer step's ``num_items_in_batch``.
        """
        t, labels = "template_", forget["labels"]

        def template() -> Mapping[str, Tensor]:
            return check_template(forget, method)

        def reference_run(fn: Callable[[nn.Module], Tensor]) -> Tensor:
            if reference_model is None:
                raise RuntimeError(f"{method!r} reads reference outputs, but no reference model is configured.")
            with reference_model() as ref:
                return fn(ref).detach()

        def retain_data() -> Mapping[str, Tensor]:
            if retain_batch is None:
                raise ValueError(f"{method!r} reads activations on retain data, but no retain batch was given.")
            return retain_batch

        out = _Once(lambda: self._forward_batch(model, forget))
        template_out = _Once(lambda: self._forward_batch(model, template(), t))
        tokens = _Once(lambda: self._tokens_from(out(), labels))
        providers: dict[str, Callable[[], Tensor | None]] = {
            "policy_logps": lambda: self._sequence_from(out(), labels),
            "reference_logps": lambda: reference(forget, ""),
            "lengths": lambda: self.lengths(forget),
            "mean_token_probs": lambda: self._mean_probs_from(out(), labels),
            "template_policy_logps": lambda: self._sequence_from(template_out(), template()[t + "labels"]),
            "template_reference_logps": lambda: reference(template(), t),
            "template_lengths": lambda: self.lengths(template(), t),
            "template_mean_token_probs": lambda: self._mean_probs_from(template_out(), template()[t + "labels"]),
            "retain": retain,
            "labels": lambda: labels,
            "token_logps": lambda: tokens()[0],
            "token_mask": lambda: tokens()[1],
            "logits": lambda: out().as_logits(),
            "reference_logits": lambda: reference_run(
                lambda ref: self.logits(ref, forget["input_ids"], forget.get("attention_mask"))
            ),
            "activations": lambda: self.activations(model, forget, layer),
            "activation_mask": lambda: labels != self.ignore_index,
            "retain_activations": lambda: self.activations(model, retain_data(), layer),
            "retain_reference_activations": lambda: reference_run(
                lambda ref: self.activations(ref, retain_data(), layer)
            ),
            "retain_activation_mask": lambda: retain_data()["labels"] != self.ignore_index,
        }
        return UnlearningScores.lazy(providers, batch=forget, num_items=num_items)

    # ------------------------------------------------------------------ evaluation
    def token_statistics(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-token log-probabilities, their mean and spread under the model's distribution, and the mask.

        From the logits (the statistics need the whole next-token distribution); see
        :func:`~lightning_losses.functional.unlearning.token_logprob_statistics`.
        """
        logits = self.logits(model, batch["input_ids"], batch.get("attention_mask"))
        return token_logprob_statistics(logits, batch["labels"], self.ignore_index, shift=True)

    def truth_ratio_log_probs(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """Mean answer-token log-probabilities ``(B,)`` and ``(B, K)`` of the correct and the perturbed answers.

        The batch carries ``perturbed_input_ids`` / ``perturbed_labels`` of shape ``(B, K, T)`` (``K`` wrong answers
        per sample, optional ``perturbed_attention_mask``) and optionally ``paraphrased_input_ids`` /
        ``paraphrased_labels`` ``(B, T)`` (the correct answer reworded); without a paraphrase the sample's own
        ``input_ids`` / ``labels`` are the correct answer. ``None`` when the batch has no perturbed answers.

        Raises:
            ValueError: bad perturbed / paraphrased entries, or an answer with every label masked.
        """
        inputs = truth_ratio_inputs(batch)
        if inputs is None:
            return None
        prefix, flat, n, k = inputs
        means = []
        for name, sub, pre in (("correct", batch, prefix), ("perturbed", flat, "")):
            total, lengths = self.sequence_log_probs(model, sub, pre)
            if bool((lengths == 0).any()):
                raise ValueError(
                    f"Some {name} answers have every label masked: the truth ratio needs answer tokens in each."
                )
            means.append(total.float() / lengths.to(torch.float32))
        return means[0], means[1].view(n, k)

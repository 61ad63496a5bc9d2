r"""``ClassificationUnlearningModule``: unlearn a forget set (a class or samples) from an image classifier with any
unlearning loss, plus the pieces of an unlearning study (training the original, the retrained "gold" model and the
blindspot model; evaluating accuracy, membership inference and forget quality).

Every loss of the unlearning family is called through its contract, ``loss(scores)``, with
:class:`~lightning_losses.ClassificationUnlearningScores` filled lazily: on a classifier a sample's sequence
log-probability is :math:`\log p_\theta(y \mid x)`, its length is 1, and its template ("I don't know") answer is
another class, fixed per sample: :math:`t = (y + 1 + (i \bmod (C - 1))) \bmod C` for dataset index :math:`i`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.functional.unlearning_classification import class_log_probs
from lightning_losses.losses.unlearning import (
    DEFAULT_MODULE_ATTRIBUTE,
    UNLEARNING_PRESETS,
    RetainLoss,
    ScoreName,
    loss_needs,
    resolve_unlearning_loss,
)
from lightning_losses.losses.unlearning_classification import (
    BlindspotLoss,
    ClassificationUnlearningScores,
    record_activations,
)
from lightning_losses.metrics.unlearning import (
    DedupedAccuracy,
    ForgetQuality,
    LossMembershipInference,
    classification_losses,
)
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.mixins.unlearning_scoring import find_layer, uses_retain_data
from lightning_losses.modules._optimizers import optimizer_and_schedule
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_choice, check_number, check_targets
from lightning_losses.utilities.numerics import kl_from_log_probs
from lightning_losses.utilities.tokens import step_num_items

__all__ = [
    "CLASSIFICATION_SCORES",
    "CLASSIFICATION_UNLEARNING_METHODS",
    "ClassificationUnlearningModule",
    "evaluate_classification_unlearning",
    "template_targets",
    "train_classifier",
]

#: The scores the module computes for a classifier: a sample is an answer of one token (its label), so the
#: token-level entries have one position (``labels`` ``(B, 2)`` is ``[ignore_index, y]`` in the causal-LM layout where
#: ``logits[:, t]`` predicts ``labels[:, t + 1]``, and ``logits`` ``(B, 2, C)`` repeats the class logits at the unread
#: last position). The layer entries of RMU (``activations``, ``retain_activations``,
#: ``retain_reference_activations``) are the output of the loss's ``layer`` for each sample, flattened to one
#: position: ``(B, 1, D)`` with ``D`` the product of its non-batch sizes, and masks of ones.
CLASSIFICATION_SCORES: frozenset[str] = frozenset(get_args(ScoreName)) | {"forget_logits", "forget_activations"}
_LAYER_SCORES = frozenset({"activations", "retain_activations", "retain_reference_activations"})
#: Preset settings that differ on a classifier: CE-U leaves out the first answer token of each sequence by default,
#: which on a classifier is the only one.
CLASSIFIER_PRESET_SETTINGS: dict[str, dict[str, Any]] = {"ceu": {"ignore_first": 0}}
#: The method names the module takes: the unlearning presets whose losses read only :data:`CLASSIFICATION_SCORES`,
#: and ``"blindspot"``.
CLASSIFICATION_UNLEARNING_METHODS: tuple[str, ...] = (
    *(name for name, preset in UNLEARNING_PRESETS.items() if set(preset.loss.needs) <= CLASSIFICATION_SCORES),
    "blindspot",
)


def template_targets(target: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """A class other than ``target`` for each sample, fixed by its dataset ``index``: the "template" answer of FLAT
    and IdkDPO on a classifier, :math:`(y + 1 + (i \\bmod (C - 1))) \\bmod C`.

    Example:
        >>> template_targets(torch.tensor([0, 0, 9]), torch.tensor([0, 1, 3]), 10).tolist()
        [1, 2, 3]
    """
    return (target + 1 + index.long() % (num_classes - 1)) % num_classes


def _scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` with its gradient multiplied by ``scale`` (the value is unchanged)."""
    if scale == 1.0 or not x.requires_grad:
        return x
    return x.detach() + scale * (x - x.detach())


def _one_position(activations: Tensor) -> Tensor:
    """A layer's output ``(B, ...)`` as one position per sample, ``(B, 1, D)``: the layout RMU's scores use."""
    return activations.reshape(activations.shape[0], 1, -1)


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class ClassificationUnlearningModule(HyperparameterMixin, pl.LightningModule):
    r"""Unlearn the forget data from a classifier: ``loss(scores)`` on forget and retain batches combined per step.

    Training batches are ``{"forget": (x, y, index), "retain": (x, y, index)}`` (a ``CombinedLoader``, as
    :class:`~lightning_losses.data.ClassificationUnlearningDataModule` gives). The scores a loss reads are computed
    on first access: ``policy_logps`` = :math:`\log p_\theta(y \mid x)` of the forget samples, ``reference_logps``
    the same under the frozen reference (the original model), ``lengths`` 1, ``mean_token_probs`` =
    :math:`p_\theta(y \mid x)`, the template entries for :func:`template_targets`, ``forget_logits`` and
    ``forget_activations`` (of the layers the loss names in ``activation_layers``), and ``retain``: the retain term
    (``"nll"``: mean cross-entropy on the retain batch; ``"kl"``: mean :math:`\mathrm{KL}(p_{\text{ref}} \,\|\,
    p_\theta)`).

    * **Reference**: ``"copy"`` (default) keeps a frozen copy of ``model`` as given (the original), in eval mode, in
      the module tree: it is saved in every checkpoint, so the original weights are never lost; pass your own frozen
      module, or ``None`` for losses that need none (GA, SimNPO, FLAT with a retain NLL).
    * **Mean over the step**: each forget / retain sample weighs the same in the gradient whatever the batch sizes of
      the processes and micro-batches (the gradients of the forget and the retain outputs are rescaled by the local
      batch size over the step's mean batch size, as ``num_items_in_batch`` does for tokens), so a multi-process run
      equals one process on the concatenated batches for every loss that is a mean of per-sample terms (all the
      library's). The logged values stay the local ones.
    * **RMU** (:class:`~lightning_losses.RMULoss`): the layer entries are the output of the submodule ``loss.layer``
      names (a dotted name or a unique suffix, as on a causal LM), flattened per sample to ``(B, 1, D)``: on the
      forget batch from the same forward as the logits, on the retain batch under the model and the frozen
      reference. Its LLM defaults need tuning on a small network (see ``docs/unlearning.md``).
    * **Validation**: one dataloader per split of ``split_names`` (``forget``, ``retain``, ``test``, ``heldout``);
      logs ``val/acc_<split>`` and ``val/mia_auc`` (loss-based membership inference, forget vs held-out), each
      sample counted once under a ``DistributedSampler``.

    Args:
        model: the trained classifier (inputs → logits ``(N, num_classes)``), unlearned in place.
        loss: a method name (:data:`CLASSIFICATION_UNLEARNING_METHODS`: ``"ga"``, ``"graddiff"``, ``"graddiff_kl"``,
            ``"npo"``, ``"npo_rt"``, ``"npo_kl"``, ``"simnpo"``, ``"flat"``, ``"idkdpo"``, ``"altpo"``, ... of
            :data:`~lightning_losses.UNLEARNING_PRESETS`, whose losses read only :data:`CLASSIFICATION_SCORES`;
            ``"blindspot"``: :class:`~lightning_losses.BlindspotLoss` with ``blindspot_model``), or a loss module
            called as ``loss(scores)`` (the library's, a subclass, or your own declaring ``needs``).
        reference: ``"copy"``, a frozen reference model, or ``None``.
        retain_loss: ``"nll"``, ``"kl"`` or ``None`` to override the method's retain term (``"default"``: the
            method's; for a loss module its ``default_retain``, else ``"nll"``).
        blindspot_model: the partially trained model of ``loss="blindspot"`` (see :func:`train_classifier`).
        blindspot_layers: layers compared by attention transfer with ``loss="blindspot"``.
        num_classes: the number of classes.
        optimizer, lr, momentum, weight_decay, scheduler: as :class:`~lightning_losses.ClassificationModule`.
        split_names: the names of the validation dataloaders, in order.
        norm_statistics: ``"frozen"`` (default) keeps the model's batch-norm layers in eval mode while unlearning:
            their running statistics stay those of the original training data instead of drifting toward the
            forget batches (all of one class when a class is forgotten), and each sample's output depends on that
            sample only, so data-parallel runs equal one process exactly; ``"update"`` trains them as usual.

    Example:
        >>> from lightning_losses.demos import ConvNet
        >>> module = ClassificationUnlearningModule(ConvNet(width=4), loss="npo_kl")
        >>> round(float(module.get_hyperparameter("npo.beta")), 6), module.retain_loss
        (0.1, 'kl')
        >>> x, y, i = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.arange(4)
        >>> module.training_step({"forget": (x, y, i), "retain": (x, y, i + 4)}, 0).ndim
        0
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | nn.Module = "npo",
        reference: nn.Module | Literal["copy"] | None = "copy",
        retain_loss: RetainLoss | Literal["default"] | None = "default",
        blindspot_model: nn.Module | None = None,
        blindspot_layers: tuple[str, ...] = (),
        num_classes: int = 10,
        optimizer: Literal["sgd", "adam", "adamw"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scheduler: Literal["none", "cosine"] = "none",
        split_names: tuple[str, ...] = ("forget", "retain", "test", "heldout"),
        norm_statistics: Literal["frozen", "update"] = "frozen",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module mapping inputs to logits; got {type(model).__name__}.")
        check_number("num_classes", num_classes, low=2, integer=True)
        check_choice("optimizer", optimizer, ("sgd", "adam", "adamw"))
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        check_choice("scheduler", scheduler, ("none", "cosine"))
        check_choice("retain_loss", retain_loss, ("default", "nll", "kl", None))
        check_choice("norm_statistics", norm_statistics, ("frozen", "update"))
        self.save_hyperparameters(ignore=["model", "loss", "reference", "blindspot_model"])
        self.model = model
        loss_module, self.method, self.retain_loss = self._resolve_loss(
            loss, retain_loss, blindspot_model, blindspot_layers
        )
        self.attribute: str = getattr(loss_module, "module_attribute", DEFAULT_MODULE_ATTRIBUTE)
        setattr(self, self.attribute, loss_module)
        needs = loss_needs(loss_module)
        unsupported = sorted(needs - CLASSIFICATION_SCORES)
        if unsupported:
            raise ValueError(
                f"The loss {self.method!r} reads {unsupported}, which a classifier's scores do not have: it reads "
                f"token-level or layer entries of causal LMs. Classifier scores: {sorted(CLASSIFICATION_SCORES)}; "
                f"methods: {', '.join(CLASSIFICATION_UNLEARNING_METHODS)}."
            )
        wants_reference = bool(
            needs & {"reference_logps", "template_reference_logps", "reference_logits", "retain_reference_activations"}
        ) or (self.retain_loss == "kl" and "retain" in needs)
        # RMU's steered layer: its full name in `model`, found as the causal-LM path finds it (a suffix is enough)
        self.steered_layer: str | None = None
        if needs & _LAYER_SCORES:
            found = find_layer(model, getattr(loss_module, "layer", None))
            self.steered_layer = next(name for name, module in model.named_modules() if module is found)
        if reference is model:
            raise ValueError(
                "`reference` is the model being unlearned: pass 'copy' (a frozen copy of it now) or a separate model."
            )
        if reference == "copy":
            reference = copy.deepcopy(model) if wants_reference else None
        elif reference is not None and not isinstance(reference, nn.Module):
            raise TypeError(f"`reference` must be 'copy', an nn.Module or None, got {type(reference).__name__}.")
        if wants_reference and reference is None:
            raise ValueError(
                f"The loss {self.method!r} (retain term {self.retain_loss!r}) compares with a reference model, but "
                "`reference` is None. Pass reference='copy' (a frozen copy of the original model) or a model."
            )
        self.reference: nn.Module | None = None if not isinstance(reference, nn.Module) else _frozen(reference)
        self.num_classes = num_classes
        self.split_names = split_names
        self.norm_statistics = norm_statistics
        self.val_accuracy = nn.ModuleDict({name: DedupedAccuracy() for name in split_names})
        self.val_mia = LossMembershipInference()
        self.last_terms: dict[str, float] = {}

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _resolve_loss(
        loss: str | nn.Module,
        retain_loss: RetainLoss | Literal["default"] | None,
        blindspot_model: nn.Module | None,
        blindspot_layers: tuple[str, ...],
    ) -> tuple[nn.Module, str, RetainLoss | None]:
        if isinstance(loss, str):
            check_choice("loss", loss, CLASSIFICATION_UNLEARNING_METHODS)
            if loss != "blindspot":
                preset = UNLEARNING_PRESETS[loss]
                built_preset = preset.loss(**{**preset.settings, **CLASSIFIER_PRESET_SETTINGS.get(loss, {})})
                return resolve_unlearning_loss(loss, built_preset, retain_loss)
            if blindspot_model is None:
                raise ValueError(
                    "loss='blindspot' needs `blindspot_model`: a randomly initialised model of the same architecture "
                    "trained briefly on the retain data: `train_classifier(fresh_model, retain_loader, max_steps=...)`."
                )
            built = BlindspotLoss(blindspot_model, blindspot_layers)
            return built, loss, built.default_retain if retain_loss == "default" else retain_loss
        if not isinstance(loss, nn.Module):
            raise TypeError(
                f"`loss` must be a method name or an nn.Module called as `loss(scores)`, got {type(loss).__name__}."
            )
        default: Any = getattr(loss, "default_retain", "nll")
        return resolve_unlearning_loss(None, loss, default if retain_loss == "default" else retain_loss)

    @property
    def unlearning_loss_module(self) -> nn.Module:
        """The loss (at ``self.<loss.module_attribute>``: ``self.npo``, ``self.ga``, ``self.blindspot``, ...)."""
        loss = getattr(self, self.attribute)
        assert isinstance(loss, nn.Module)
        return loss

    @property
    def uses_retain(self) -> bool:
        """Whether the loss adds the retain term now (a retain batch is then needed every step)."""
        return uses_retain_data(self.unlearning_loss_module, self.retain_loss)

    def train(self, mode: bool = True) -> ClassificationUnlearningModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: its batch norms never update, dropout never fires
        if mode and getattr(self, "norm_statistics", "update") == "frozen":
            for layer in self.model.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        return self

    def forward(self, x: Any) -> Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ scores
    def _unpack(self, batch: Any, role: str) -> tuple[Any, Tensor, Tensor]:
        x, y, index = unpack_batch(batch)
        if y is None:
            raise ValueError(f"The {role} batch has no targets: give (x, y, index) batches.")
        if index is None:
            index = torch.arange(len(y), device=y.device)
        return x, y, index

    def _logits(self, model: nn.Module, x: Any, n: int) -> Tensor:
        logits = model(x)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape != (n, self.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"The model must return logits of shape (N, {self.num_classes}) (num_classes={self.num_classes}), got "
                f"{shape}. Set `num_classes` to the model's number of outputs."
            )
        return logits

    def _reference_logits(self, x: Any, n: int) -> Tensor:
        if self.reference is None:
            raise ValueError("No reference model: build the module with reference='copy' or a reference model.")
        self.reference.eval()
        with torch.no_grad():
            return self._logits(self.reference, x, n).float()

    def retain_term(self, retain: Any, scale: float = 1.0) -> Tensor:
        """The retain term of a retain batch: mean cross-entropy (``"nll"``) or mean KL(reference ‖ model)."""
        x, y, _ = self._unpack(retain, "retain")
        check_targets(y, self.num_classes, len(y))
        logits = _scale_gradient(self._logits(self.model, x, len(y)).float(), scale)
        if self.retain_loss == "kl":
            return kl_from_log_probs(self._reference_logits(x, len(y)).log_softmax(-1), logits.log_softmax(-1)).mean()
        return F.cross_entropy(logits, y)

    def unlearning_scores(
        self, forget: Any, retain: Any | None = None, *, forget_scale: float = 1.0, retain_scale: float = 1.0
    ) -> ClassificationUnlearningScores:
        """The scores of a forget batch (and retain batch), each computed when the loss first reads it.

        ``forget_scale`` / ``retain_scale`` multiply the gradients of the forget / retain outputs (see the class
        docstring); the values are unchanged.
        """
        x, y, index = self._unpack(forget, "forget")
        check_targets(y, self.num_classes, len(y))
        loss = self.unlearning_loss_module
        steered = self.steered_layer
        loss_layers = tuple(getattr(loss, "activation_layers", ()))
        layers = loss_layers + (() if steered is None or steered in loss_layers else (steered,))
        cache: dict[str, Any] = {}

        def outputs() -> tuple[Tensor, dict[str, Tensor]]:
            if "outputs" not in cache:
                with record_activations(self.model, layers) as acts:
                    logits = self._logits(self.model, x, len(y))
                scaled = {name: _scale_gradient(a, forget_scale) for name, a in acts.items()}
                cache["outputs"] = (_scale_gradient(logits, forget_scale), scaled)
            return cache["outputs"]

        def reference() -> Tensor:
            if "reference" not in cache:
                cache["reference"] = self._reference_logits(x, len(y))
            return cache["reference"]

        def template() -> Tensor:
            return template_targets(y, index, self.num_classes)

        def retain_layer(model: nn.Module | None) -> Tensor:
            """The steered layer's output on the retain batch: the model's (gradient scaled) or the reference's."""
            if retain is None:
                raise ValueError(f"{self.method!r} reads activations on retain data, but no retain batch was given.")
            if model is None:
                raise ValueError("No reference model: build the module with reference='copy' or a reference model.")
            assert steered is not None
            rx, ry, _ = self._unpack(retain, "retain")
            grad = model is self.model and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad), record_activations(model, (steered,)) as acts:
                self._logits(model, rx, len(ry))
            out = _one_position(acts[steered])
            return _scale_gradient(out, retain_scale) if model is self.model else out.detach()

        def one_position_mask(batch: Any) -> Tensor:
            n = len(self._unpack(batch, "retain")[1])
            return torch.ones(n, 1, dtype=torch.bool, device=y.device)

        def policy() -> Tensor:
            return class_log_probs(outputs()[0], y)

        def template_policy() -> Tensor:
            return class_log_probs(outputs()[0], template())

        ones = torch.ones(len(y), device=y.device)
        labels = torch.stack([torch.full_like(y, -100), y], dim=1)
        providers: dict[str, Callable[[], Any]] = {
            "labels": lambda: labels,
            "token_logps": lambda: policy()[:, None],
            "token_mask": lambda: torch.ones(len(y), 1, dtype=torch.bool, device=y.device),
            "logits": lambda: outputs()[0][:, None, :].expand(-1, 2, -1),
            "reference_logits": lambda: reference()[:, None, :].expand(-1, 2, -1),
            "forget_logits": lambda: outputs()[0],
            "forget_activations": lambda: {n: a for n, a in outputs()[1].items() if n in loss_layers},
            "activations": lambda: _one_position(outputs()[1][steered]),  # type: ignore[index]
            "activation_mask": lambda: torch.ones(len(y), 1, dtype=torch.bool, device=y.device),
            "retain_activations": lambda: retain_layer(self.model),
            "retain_reference_activations": lambda: retain_layer(self.reference),
            "retain_activation_mask": lambda: one_position_mask(retain),
            "policy_logps": policy,
            "reference_logps": lambda: class_log_probs(reference(), y),
            "lengths": lambda: ones,
            "mean_token_probs": lambda: policy().exp(),
            "template_policy_logps": template_policy,
            "template_reference_logps": lambda: class_log_probs(reference(), template()),
            "template_lengths": lambda: ones,
            "template_mean_token_probs": lambda: template_policy().exp(),
            "retain": lambda: None if retain is None else self.retain_term(retain, retain_scale),
        }
        scores = ClassificationUnlearningScores.lazy(providers, batch={"input": x, "target": y, "index": index})
        assert isinstance(scores, ClassificationUnlearningScores)
        return scores

    def unlearning_loss(
        self, forget: Any, retain: Any | None = None, *, forget_scale: float = 1.0, retain_scale: float = 1.0
    ) -> Tensor:
        """The loss of one forget batch (and retain batch): ``loss(scores)``.

        Raises:
            ValueError: a loss with a retain term and no retain batch; bad targets or logits.
            TypeError: the loss does not return a scalar tensor.
        """
        if retain is None and self.uses_retain:
            raise ValueError(
                f"Method {self.method!r} has a retain term (retain_weight > 0) but no retain batch was given. Combine "
                "forget and retain dataloaders (CombinedLoader) or set the retain weight to 0."
            )
        loss_module = self.unlearning_loss_module
        scores = self.unlearning_scores(
            forget, retain if self.uses_retain else None, forget_scale=forget_scale, retain_scale=retain_scale
        )
        loss = loss_module(scores)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise TypeError(
                f"{type(loss_module).__name__}(scores) must return a scalar tensor, got "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}."
            )
        terms = {"loss": float(loss.detach())}
        if "retain" in scores.computed and scores.get("retain") is not None:
            terms["retain"] = float(scores.get("retain").detach())  # type: ignore[union-attr]
        self.last_terms = terms
        return loss

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if not isinstance(batch, dict) or "forget" not in batch:
            raise ValueError(
                "ClassificationUnlearningModule expects training batches {'forget': ..., 'retain': ...} from a "
                f"CombinedLoader; got {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
                + "."
            )
        forget, retain = batch["forget"], batch.get("retain")
        n_forget = len(self._unpack(forget, "forget")[1])
        # every sample weighs the same over the whole step (ranks and micro-batches): rescale the local means
        forget_scale = self._step_scale(n_forget)
        retain_scale = 1.0
        if retain is not None and self.uses_retain:
            retain_scale = self._step_scale(len(self._unpack(retain, "retain")[1]))
        loss = self.unlearning_loss(forget, retain, forget_scale=forget_scale, retain_scale=retain_scale)
        if self._trainer is not None:
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n_forget)
            if "retain" in self.last_terms:
                self.log("train/retain", self.last_terms["retain"], batch_size=n_forget)
        return loss

    def _step_scale(self, local: int) -> float:
        mean = step_num_items(self, local)
        return 1.0 if mean is None else local / max(float(mean), 1e-12)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, index = self._unpack(batch, "validation")
        name = self.split_names[dataloader_idx] if dataloader_idx < len(self.split_names) else str(dataloader_idx)
        logits = self._logits(self.model, x, len(y))
        if name in self.val_accuracy:
            accuracy: Any = self.val_accuracy[name]
            accuracy.update(logits, y, index)
        if name in ("forget", "heldout"):
            self.val_mia.update(logits, y, name == "forget", index)

    def on_validation_epoch_end(self) -> None:
        metric: Any
        for name, metric in self.val_accuracy.items():
            if metric.update_count:
                self.log(f"val/acc_{name}", metric.compute(), add_dataloader_idx=False)
            metric.reset()
        if self.val_mia.update_count:
            self.log("val/mia_auc", self.val_mia.compute(), add_dataloader_idx=False)
        self.val_mia.reset()

    def configure_optimizers(self) -> Any:
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("No trainable parameter: the model is frozen.")
        return optimizer_and_schedule(self)


# ---------------------------------------------------------------------- the pieces of an unlearning study
def train_classifier(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` with Adam on the cross-entropy of ``(x, y[, index])`` batches, in place, on one process.

    The original model (all training data), the retrained "gold" model (retain data only) and the blindspot model
    (a fresh model, ``max_steps`` steps on the retain data: partially trained) of an unlearning study.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> train_classifier(net, data, max_steps=1) is net
        True
    """
    check_number("epochs", epochs, low=1, integer=True)
    if max_steps is not None:
        check_number("max_steps", max_steps, low=1, integer=True)
    check_number("lr", lr, low=0.0, low_inclusive=False)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    steps = 0
    sampler: Any = getattr(dataloader, "sampler", None)
    for epoch in range(epochs):
        if hasattr(sampler, "set_epoch"):  # a new order each epoch (EpochShuffle, DistributedSampler)
            sampler.set_epoch(epoch)
        for batch in dataloader:
            x, y, _ = unpack_batch(batch)
            if y is None:
                raise ValueError("train_classifier needs batches (x, y) or (x, y, index).")
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return model.eval()
    return model.eval()


@torch.no_grad()
def _outputs(model: nn.Module, loader: Iterable[Any]) -> tuple[Tensor, Tensor, Tensor]:
    logits, targets, indices = [], [], []
    for batch in loader:
        x, y, index = unpack_batch(batch)
        assert y is not None
        logits.append(model(x).float())
        targets.append(y)
        indices.append(index if index is not None else torch.arange(len(y)))
    return torch.cat(logits), torch.cat(targets), torch.cat(indices)


def evaluate_classification_unlearning(
    model: nn.Module,
    loaders: Mapping[str, Iterable[Any]],
    gold_forget_losses: Tensor | None = None,
    gold_mia_auc: float | None = None,
) -> dict[str, Any]:
    """Accuracy on each split, loss-based membership inference and forget quality of ``model``.

    Args:
        model: the classifier to evaluate (evaluated in eval mode; its mode is restored after).
        loaders: dataloaders of ``(x, y, index)`` batches by split: ``"forget"``, ``"retain"``, ``"test"`` and
            ``"heldout"`` (the non-members of the attack).
        gold_forget_losses: the per-sample forget-set losses of the model retrained without the forget set: with
            it, ``forget_quality`` is the KS-test p-value between those and ``model``'s (TOFU's forget quality; 1:
            indistinguishable from retraining).
        gold_mia_auc: the gold model's ``mia_auc``: with it, ``mia_gap`` is the absolute difference.

    Returns:
        ``{"<split>_acc": float, "mia_auc": float, "forget_losses": Tensor, ...}`` (``forget_quality`` and
        ``mia_gap`` when the gold figures are given).
    """
    was_training = model.training
    model.eval()
    try:
        out: dict[str, Any] = {}
        outputs = {name: _outputs(model, loader) for name, loader in loaders.items()}
    finally:
        model.train(was_training)
    for name, (logits, y, index) in outputs.items():
        acc = DedupedAccuracy()
        acc.update(logits, y, index)
        out[f"{name}_acc"] = float(acc.compute())
    if "forget" in outputs and "heldout" in outputs:
        mia = LossMembershipInference()
        mia.update(*outputs["forget"][:2], members=True, index=outputs["forget"][2])
        mia.update(*outputs["heldout"][:2], members=False, index=outputs["heldout"][2])
        out["mia_auc"] = float(mia.compute())
    if "forget" in outputs:
        out["forget_losses"] = classification_losses(*outputs["forget"][:2])
        if gold_forget_losses is not None:
            quality = ForgetQuality(reference=gold_forget_losses)
            quality.update(out["forget_losses"])
            out["forget_quality"] = float(quality.compute())
    if gold_mia_auc is not None and "mia_auc" in out:
        out["mia_gap"] = abs(out["mia_auc"] - gold_mia_auc)
    return out

r"""Unlearning losses on classifiers: the scores of a classification step and the Blindspot loss.

The unlearning losses of :mod:`lightning_losses.losses.unlearning` read an
:class:`~lightning_losses.UnlearningScores`; on a classifier each sample is a "sequence" of one answer, its label,
so ``policy_logps`` is :math:`\log \pi_\theta(y \mid x)`, ``lengths`` is 1, ``mean_token_probs`` is
:math:`\pi_\theta(y \mid x)`, and a template answer is another class (see
:class:`~lightning_losses.ClassificationUnlearningModule`). :class:`ClassificationUnlearningScores` adds what a
loss that compares whole outputs or layers reads: the logits of the forget batch and the activations of named layers.

:class:`BlindspotLoss` follows the same call contract, ``loss(scores)``: it declares ``needs = ("retain",)`` and
reads the two classification entries (``forget_logits``, ``forget_activations``) and the forget inputs
(``scores.batch["input"]``), on which it runs its own blindspot model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_losses.functional.unlearning_classification import blindspot_loss
from lightning_losses.losses.unlearning import RetainLoss, UnlearningLoss, UnlearningScores

__all__ = ["BlindspotLoss", "ClassificationUnlearningScores", "record_activations"]


class ClassificationUnlearningScores(UnlearningScores):
    """:class:`~lightning_losses.UnlearningScores` of a classification step, with two more entries:

    * ``forget_logits`` ``(B, C)``: the logits of the model being unlearned on the forget batch (with gradient);
    * ``forget_activations``: a dict from layer name to that layer's output on the forget batch (with gradient),
      for the layers the loss names in its ``activation_layers``.

    ``batch`` is ``{"input": x, "target": y, "index": index}`` of the forget batch.

    Example:
        >>> import torch
        >>> scores = ClassificationUnlearningScores.lazy({"forget_logits": lambda: torch.zeros(2, 3)})
        >>> tuple(scores.forget_logits.shape)
        (2, 3)
    """

    FIELDS: ClassVar[tuple[str, ...]] = (*UnlearningScores.FIELDS, "forget_logits", "forget_activations")

    @property
    def forget_logits(self) -> Tensor:
        """``(B, C)`` logits of the model being unlearned on the forget batch."""
        return self._tensor("forget_logits")

    @property
    def forget_activations(self) -> dict[str, Tensor]:
        """The outputs of the named layers of the model being unlearned on the forget batch."""
        value: Any = self.get("forget_activations")
        return {} if value is None else dict(value)


def _submodules(model: nn.Module, layers: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        shown = ", ".join(repr(n) for n in list(modules)[1:12])
        raise ValueError(
            f"{type(model).__name__} has no submodule {missing}: name layers as `model.named_modules()` does "
            f"(e.g. {shown}, ...)."
        )
    return [modules[name] for name in layers]


@contextmanager
def record_activations(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the submodules ``layers`` of ``model`` during the forward passes inside the context.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with record_activations(net, ["1"]) as acts:
        ...     _ = net(torch.ones(4, 2))
        >>> tuple(acts["1"].shape)
        (4, 3)
    """
    out: dict[str, Tensor] = {}
    handles = []
    for name, module in zip(layers, _submodules(model, layers)):

        def hook(_module: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Layer {name!r} returns a {type(output).__name__}; name a layer that returns a tensor."
                )
            out[name] = output

        handles.append(module.register_forward_hook(hook))
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class BlindspotLoss(UnlearningLoss):
    r"""Blindspot unlearning (Tarun et al., "Deep Regression Unlearning", ICML 2023) for classifiers.

    .. math::

        \mathcal{L} = w_f\Big[\mathrm{KL}\big(\sigma(b/T) \,\|\, \sigma(z/T)\big)_{\text{forget}}
            + \lambda_{AT} \sum_l \operatorname{mean}\big((a(h^\theta_l) - a(h^b_l))^2\big)_{\text{forget}}\Big]
            + w_r\,\mathcal{L}_{\text{retain}}

    The blindspot model :math:`b` (a randomly initialised copy of the architecture, trained briefly on the retain
    data only) answers on the forget samples as a model that never saw them; the model being unlearned is pulled
    toward it there (output and, through attention transfer, the chosen layers), and held to the original model on
    the retain data by the retain term, by default :math:`\mathrm{KL}(p_{\text{original}} \,\|\, p_\theta)`
    (``default_retain = "kl"``). See :func:`~lightning_losses.functional.blindspot_loss` for the forget term and
    where it differs from the official regression code: that code weights the forget and the retain term of a mixed
    batch by its forget fraction :math:`\lambda` and :math:`1 - \lambda`; with separate forget and retain batches of
    sizes :math:`B_f`, :math:`B_r` set ``forget_weight`` and ``retain_weight`` to those fractions (the defaults, 1
    and 1, are the equal-size case up to a factor 2).

    Called as ``loss(scores)`` with :class:`ClassificationUnlearningScores` (reads ``forget_logits``,
    ``forget_activations``, the forget inputs ``scores.batch["input"]`` and ``retain``), or with tensors,
    ``loss(logits, blindspot_logits, activations, blindspot_activations, retain_loss=None)``.

    Args:
        blindspot_model: the partially trained model; frozen here and kept in eval mode. It is saved with the
            loss (a resumed run needs the same one).
        layers: names of the layers (``named_modules``) whose activations are compared; the same names in the
            model and the blindspot model. Empty: outputs only.
        temperature: :math:`T > 0` of the output KL.
        attention_weight: :math:`\lambda_{AT} \ge 0` (paper: 50).
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r`.

    Example:
        >>> import torch
        >>> blindspot = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> loss = BlindspotLoss(blindspot, layers=["1"], retain_weight=0.0)
        >>> x = torch.randn(5, 4)
        >>> with record_activations(blindspot, ["1"]) as acts:
        ...     logits = blindspot(x)
        >>> scores = ClassificationUnlearningScores(
        ...     forget_logits=logits, forget_activations=dict(acts), batch={"input": x})
        >>> float(loss(scores))  # the blindspot model itself has nothing to move
        0.0
    """

    needs = ("retain",)
    module_attribute = "blindspot"
    default_retain: ClassVar[RetainLoss] = "kl"
    temperature: Tensor
    attention_weight: Tensor

    def __init__(
        self,
        blindspot_model: nn.Module,
        layers: Sequence[str] = (),
        temperature: float = 1.0,
        attention_weight: float = 50.0,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        if not isinstance(blindspot_model, nn.Module):
            raise TypeError(
                f"`blindspot_model` must be an nn.Module (the partially trained model), got "
                f"{type(blindspot_model).__name__}. Build one with `lightning_losses.modules.train_classifier`."
            )
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"`layers` must be a sequence of layer names, got {layers!r}.")
        _submodules(blindspot_model, layers)
        self.blindspot_model = _freeze(blindspot_model)
        self.activation_layers: tuple[str, ...] = tuple(layers)
        self.register_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)
        self.register_hyperparameter("attention_weight", attention_weight, low=0.0)

    def train(self, mode: bool = True) -> BlindspotLoss:
        super().train(mode)
        self.blindspot_model.eval()  # frozen: its batch norms and dropouts never switch to training
        return self

    @torch.no_grad()
    def blindspot_outputs(self, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The blindspot model's logits and activations of :attr:`activation_layers` on ``inputs``."""
        self.blindspot_model.eval()
        with record_activations(self.blindspot_model, self.activation_layers) as acts:
            logits = self.blindspot_model(inputs)
        return logits, dict(acts)

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        batch: Mapping[str, Any] | None = scores.batch
        if batch is None or "input" not in batch:
            raise ValueError(
                "BlindspotLoss runs its blindspot model on the forget inputs: give scores whose `batch` holds them "
                "(`batch={'input': x}`), as ClassificationUnlearningModule does."
            )
        try:
            logits = scores.get("forget_logits")
            activations: Any = scores.get("forget_activations") if self.activation_layers else {}
        except ValueError as error:
            raise ValueError(
                "BlindspotLoss reads `forget_logits` and `forget_activations`: give ClassificationUnlearningScores "
                f"(as ClassificationUnlearningModule does). {error}"
            ) from error
        if logits is None:
            raise ValueError("`scores.forget_logits` is not available for this step.")
        activations = activations or {}
        missing = [name for name in self.activation_layers if name not in activations]
        if missing:
            raise ValueError(
                f"`scores.forget_activations` lacks the layers {missing}: record the layers of the loss's "
                "`activation_layers` during the forget forward pass."
            )
        blind_logits, blind_acts = self.blindspot_outputs(batch["input"])
        names = self.activation_layers
        return self._forget(logits, blind_logits, [activations[n] for n in names], [blind_acts[n] for n in names])

    def _forget(
        self,
        logits: Tensor,
        blindspot_logits: Tensor | None,
        activations: Sequence[Tensor] = (),
        blindspot_activations: Sequence[Tensor] = (),
    ) -> Tensor:
        if blindspot_logits is None:
            raise ValueError("Pass `blindspot_logits` (the blindspot model's logits on the same forget samples).")
        return blindspot_loss(
            logits, blindspot_logits, activations, blindspot_activations, self.temperature, self.attention_weight
        )

    def forward(
        self,
        logits: Tensor | UnlearningScores,
        blindspot_logits: Tensor | None = None,
        activations: Sequence[Tensor] = (),
        blindspot_activations: Sequence[Tensor] = (),
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        return self._scores_or_tensors(
            logits, blindspot_logits, activations, blindspot_activations, retain_loss=retain_loss
        )

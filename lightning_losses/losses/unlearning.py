r"""``nn.Module`` twins of the unlearning losses, with their hyperparameters as named, checkpointed buffers.

**One call contract.** Every unlearning loss is called as ``loss(scores)``, where ``scores`` is an
:class:`UnlearningScores`: the answer log-probabilities, lengths, token probabilities and retain term of one step,
each computed on first access and kept for the step. A loss declares what it reads in its class attribute
``needs`` (names of :attr:`UnlearningScores.FIELDS`); whether it needs a reference model, a template answer or
retain data follows from that declaration. :class:`~lightning_losses.UnlearningMixin` calls the library's losses,
their subclasses and a user's own ``nn.Module`` with ``forward(self, scores)`` the same way.

Each library loss combines the forget term of its method with the retain term:

.. math::

    \mathcal{L} = w_f \,\mathcal{L}_{\text{forget}} + w_r \,\mathcal{L}_{\text{retain}}

``forget_weight`` (:math:`w_f`) and ``retain_weight`` (:math:`w_r`) are hyperparameters like ``beta`` and ``delta``.
The library's losses also keep their tensor form (``NPOLoss()(policy_logps, reference_logps)``).

**Where a loss lives.** On a LightningModule a loss sits at the attribute named by its class attribute
``module_attribute`` (``"npo"``, ``"simnpo"``, ``"ga"``, ``"flat"``, ``"idkdpo"``; inherited by subclasses, so a
subclass of :class:`NPOLoss` is still at ``self.npo``), which fixes its hyperparameter names (``"npo.beta"``,
``"npo.retain_weight"``, ...). A loss without one lives at ``self.unlearning``.

**Methods by name** are presets of these classes (:data:`UNLEARNING_PRESETS`): ``"npo_rt"`` is ``NPOLoss`` with
the paper's retain weight 1 and a token-mean retain NLL, ``"npo_kl"`` the same with a retain KL to the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, overload

from torch import Tensor, nn

from lightning_losses.functional.unlearning import (
    FLAT_DIVERGENCES,
    Divergence,
    altpo_loss,
    ceu_loss,
    ceu_target_labels,
    flat_loss,
    gradient_ascent_loss,
    idk_dpo_loss,
    npo_loss,
    rmu_control_vector,
    rmu_loss,
    satimp_loss,
    simnpo_loss,
    undial_loss,
    wga_loss,
)
from lightning_losses.losses.base import LossModule
from lightning_losses.utilities.checks import NumItems, check_hyperparameter, check_int

__all__ = [
    "UNLEARNING_PRESETS",
    "AltPOLoss",
    "CEULoss",
    "FLATLoss",
    "GradientAscentLoss",
    "IdkDPOLoss",
    "NPOLoss",
    "RMULoss",
    "SatImpLoss",
    "ScoreName",
    "SimNPOLoss",
    "UNDIALLoss",
    "UnlearningLoss",
    "UnlearningMethod",
    "UnlearningPreset",
    "UnlearningScores",
    "WGALoss",
    "loss_needs",
    "resolve_unlearning_loss",
    "unlearning_preset",
]

ScoreName = Literal[
    "policy_logps",
    "reference_logps",
    "lengths",
    "mean_token_probs",
    "template_policy_logps",
    "template_reference_logps",
    "template_lengths",
    "template_mean_token_probs",
    "retain",
    "labels",
    "token_logps",
    "token_mask",
    "logits",
    "reference_logits",
    "activations",
    "activation_mask",
    "retain_activations",
    "retain_reference_activations",
    "retain_activation_mask",
]
UnlearningMethod = Literal[
    "ga",
    "graddiff",
    "graddiff_kl",
    "npo",
    "npo_rt",
    "npo_kl",
    "simnpo",
    "flat",
    "idkdpo",
    "wga",
    "satimp",
    "ceu",
    "undial",
    "rmu",
    "altpo",
]
RetainLoss = Literal["nll", "kl"]
#: The attribute of the LightningModule a loss without ``module_attribute`` lives at.
DEFAULT_MODULE_ATTRIBUTE = "unlearning"
#: Scores read from the reference model on new inputs at every step (they cannot be precomputed).
PER_STEP_REFERENCE_SCORES = frozenset({"template_reference_logps", "reference_logits", "retain_reference_activations"})
#: Scores computed on the retain batch (the step needs one while the loss reads them).
RETAIN_SCORES = frozenset({"retain", "retain_activations", "retain_reference_activations", "retain_activation_mask"})
#: Scores that are activations of a layer (the loss names the layer in its ``layer`` attribute).
ACTIVATION_SCORES = frozenset({"activations", "retain_activations", "retain_reference_activations"})


class _Score:
    """A read-only score of :class:`UnlearningScores`, computed on first access (typed as a ``Tensor``)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.__doc__ = name, doc

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _Score: ...

    @overload
    def __get__(self, instance: UnlearningScores, owner: type | None = None) -> Tensor: ...

    def __get__(self, instance: UnlearningScores | None, owner: type | None = None) -> Tensor | _Score:
        return self if instance is None else instance._tensor(self.name)

    def __set__(self, instance: UnlearningScores, value: Any) -> None:
        raise AttributeError(
            f"UnlearningScores.{self.name} is read-only: it is computed from the batch on first access."
        )


class UnlearningScores:
    r"""What an unlearning loss reads about one step: computed on first access, then kept for the step.

    With :math:`B` forget sequences (prompt and padding labelled ``ignore_index``), the entries are

    * ``policy_logps`` ``(B,)``: :math:`\log \pi_\theta(y \mid x)`, the summed answer-token log-probabilities of
      the forget answers under the model being unlearned (with gradient);
    * ``reference_logps`` ``(B,)``: the same under the reference model (no gradient);
    * ``lengths`` ``(B,)``: answer tokens per forget sequence;
    * ``mean_token_probs`` ``(B,)``: the mean over answer tokens of :math:`\pi_\theta(y_t \mid x, y_{<t})` (FLAT);
    * ``template_policy_logps``, ``template_reference_logps``, ``template_lengths``, ``template_mean_token_probs``:
      the same for the template (alternate, e.g. "I don't know") answer of each forget example;
    * ``retain``: the retain term (a scalar: token-mean NLL or KL to the reference on the retain batch), or ``None``
      where the step has none;
    * ``labels`` ``(B, T)``: the forget labels as in the batch (prompt and padding at ``ignore_index``; the Hugging
      Face convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``);
    * ``token_logps``, ``token_mask`` ``(B, T - 1)``: the per-token log-probabilities of the forget answers under
      the model being unlearned (0 where masked) and the mask of answer tokens (WGA, SatImp);
    * ``logits``, ``reference_logits`` ``(B, T, V)``: the whole next-token distributions on the forget batch under
      the model and the reference (CE-U, UNDIAL; these form the ``B × T × V`` logits);
    * ``activations`` ``(B, T, D)``: the output of the loss's ``layer`` on the forget batch (with gradient),
      ``activation_mask`` ``(B, T)`` its answer positions (labels not ``ignore_index``); ``retain_activations``,
      ``retain_reference_activations`` and ``retain_activation_mask``: the same on the retain batch under the model
      and the reference (RMU).

    ``batch`` is the forget batch itself (a dict of tensors) when the scores come from a batch. ``num_items``, when
    given, turns a local count of items (answer tokens of this micro-batch) into the ``num_items_in_batch`` of the
    whole optimizer step (see :func:`~lightning_losses.utilities.tokens.step_num_items`); token-mean forget terms
    read it through :meth:`step_items`.

    Build one from tensors to call a loss directly, or from zero-argument functions with :meth:`lazy`, as
    :class:`~lightning_losses.UnlearningMixin` does: an entry nobody reads is never computed.

    Example:
        >>> import torch
        >>> calls = []
        >>> scores = UnlearningScores.lazy({"policy_logps": lambda: calls.append(1) or torch.tensor([-2.0])})
        >>> scores.computed, calls
        ((), [])
        >>> float(scores.policy_logps), float(scores.policy_logps), calls  # computed once
        (-2.0, -2.0, [1])
        >>> scores.computed
        ('policy_logps',)
    """

    FIELDS: ClassVar[tuple[str, ...]] = get_args(ScoreName)

    def __init__(
        self,
        *,
        batch: Mapping[str, Any] | None = None,
        num_items: Callable[[Tensor], NumItems] | None = None,
        **values: Tensor | None,
    ) -> None:
        self._check_names(values)
        self._values: dict[str, Tensor | None] = dict(values)
        self._providers: dict[str, Callable[[], Tensor | None]] = {}
        self.batch = batch
        self.num_items = num_items

    @classmethod
    def lazy(
        cls,
        providers: Mapping[str, Callable[[], Tensor | None]],
        *,
        batch: Mapping[str, Any] | None = None,
        num_items: Callable[[Tensor], NumItems] | None = None,
    ) -> UnlearningScores:
        """Scores whose entries are computed by ``providers[name]()`` on first access."""
        scores = cls(batch=batch, num_items=num_items)
        scores._check_names(providers)
        scores._providers = dict(providers)
        return scores

    def step_items(self, local_count: Tensor) -> NumItems:
        """The ``num_items_in_batch`` of the optimizer step for ``local_count`` items here (``None``: local mean)."""
        return None if self.num_items is None else self.num_items(local_count)

    @classmethod
    def _check_names(cls, names: Mapping[str, Any]) -> None:
        unknown = sorted(set(names) - set(cls.FIELDS))
        if unknown:
            raise ValueError(f"Unknown unlearning scores {unknown}: expected names from {list(cls.FIELDS)}.")

    @property
    def computed(self) -> tuple[str, ...]:
        """The entries available without computing anything (given, or already computed), in that order."""
        return tuple(self._values)

    def get(self, name: str) -> Tensor | None:
        """The entry ``name``, computed now if it was not yet."""
        if name in self._values:
            return self._values[name]
        provider = self._providers.get(name)
        if provider is None:
            if name == "retain":
                return None
            self._check_names({name: None})
            raise ValueError(
                f"`scores.{name}` was not given. Pass it (`UnlearningScores({name}=...)`) or declare it in the loss's "
                "`needs` so that the mixin computes it."
            )
        value = provider()
        self._values[name] = value
        return value

    def _tensor(self, name: str) -> Tensor:
        value = self.get(name)
        if value is None:
            raise ValueError(f"`scores.{name}` is not available for this step.")
        return value

    policy_logps = _Score(
        "policy_logps",
        "``(B,)`` summed answer log-probabilities of the forget answers under the model being unlearned.",
    )
    reference_logps = _Score(
        "reference_logps", "``(B,)`` summed answer log-probabilities of the forget answers under the reference model."
    )
    lengths = _Score("lengths", "``(B,)`` answer tokens of each forget sequence.")
    mean_token_probs = _Score(
        "mean_token_probs",
        "``(B,)`` mean answer-token probability of the forget answers under the model being unlearned.",
    )
    template_policy_logps = _Score(
        "template_policy_logps",
        "``(B,)`` summed answer log-probabilities of the template answers under the model being unlearned.",
    )
    template_reference_logps = _Score(
        "template_reference_logps",
        "``(B,)`` summed answer log-probabilities of the template answers under the reference model.",
    )
    template_lengths = _Score("template_lengths", "``(B,)`` answer tokens of each template answer.")
    template_mean_token_probs = _Score(
        "template_mean_token_probs",
        "``(B,)`` mean answer-token probability of the template answers under the model being unlearned.",
    )

    @property
    def retain(self) -> Tensor | None:
        """The retain term of the step (a scalar), or ``None`` where there is none."""
        return self.get("retain")

    labels = _Score("labels", "``(B, T)`` forget labels, prompt and padding at ``ignore_index``.")
    token_logps = _Score("token_logps", "``(B, T - 1)`` per-token log-probabilities of the forget answers.")
    token_mask = _Score("token_mask", "``(B, T - 1)`` bool mask of the forget answer tokens.")
    logits = _Score("logits", "``(B, T, V)`` logits of the model being unlearned on the forget batch.")
    reference_logits = _Score("reference_logits", "``(B, T, V)`` reference logits on the forget batch.")
    activations = _Score("activations", "``(B, T, D)`` the layer's output on the forget batch.")
    activation_mask = _Score("activation_mask", "``(B, T)`` answer positions of the forget batch.")
    retain_activations = _Score("retain_activations", "``(B, T, D)`` the layer's output on retain data.")
    retain_reference_activations = _Score(
        "retain_reference_activations", "``(B, T, D)`` the reference's layer output on retain data."
    )
    retain_activation_mask = _Score("retain_activation_mask", "``(B, T)`` answer positions of retain data.")

    def __repr__(self) -> str:
        pending = sorted(set(self._providers) - set(self._values))
        return f"{type(self).__name__}(computed={list(self.computed)}, pending={pending})"


def loss_needs(loss: nn.Module) -> frozenset[str]:
    """The scores ``loss`` declares it reads (its ``needs``; none when it declares nothing).

    Raises:
        ValueError: ``needs`` names something :class:`UnlearningScores` does not have.

    Example:
        >>> sorted(loss_needs(NPOLoss()))
        ['policy_logps', 'reference_logps', 'retain']
    """
    needs = getattr(loss, "needs", ())
    if isinstance(needs, str) or not all(isinstance(n, str) for n in needs):
        raise TypeError(f"{type(loss).__name__}.needs must be a tuple of score names, got {needs!r}.")
    unknown = sorted(set(needs) - set(UnlearningScores.FIELDS))
    if unknown:
        raise ValueError(
            f"{type(loss).__name__}.needs names unknown scores {unknown}: expected names from "
            f"{list(UnlearningScores.FIELDS)}."
        )
    return frozenset(needs)


def _check_settings(**values: object) -> None:
    """A TypeError for a setting that is not a real number or tensor (the registry checks the ranges)."""
    for name, value in values.items():
        check_hyperparameter(value, name, validate=False)


# Bounds of a setting for ``register_hyperparameter``: > 0, >= 0, any value.
_POSITIVE: Mapping[str, Any] = {"low": 0.0, "low_inclusive": False}
_NON_NEGATIVE: Mapping[str, Any] = {"low": 0.0}
_ANY: Mapping[str, Any] = {}


class UnlearningLoss(LossModule):
    """Base of the unlearning losses: the scores they read, the forget / retain weights and their combination.

    A subclass declares ``needs`` and defines :meth:`forget_term`; :meth:`forward` (``loss(scores)``) returns
    ``forget_weight · forget_term(scores) + retain_weight · scores.retain``, reading the retain term only while
    ``retain_weight > 0``.
    """

    needs: ClassVar[tuple[ScoreName, ...]] = ("retain",)
    """The :class:`UnlearningScores` entries the loss reads (``"retain"``: it adds the retain term)."""
    module_attribute: ClassVar[str] = DEFAULT_MODULE_ATTRIBUTE
    """The attribute of the LightningModule the loss lives at (the prefix of its hyperparameter names)."""
    forget_weight: Tensor
    retain_weight: Tensor

    def __init__(self, forget_weight: float = 1.0, retain_weight: float = 0.0) -> None:
        super().__init__()
        _check_settings(forget_weight=forget_weight, retain_weight=retain_weight)
        self.register_hyperparameter("forget_weight", forget_weight, low=0.0)
        self.register_hyperparameter("retain_weight", retain_weight, low=0.0)

    def _register_settings(self, **settings: tuple[float, Mapping[str, Any]]) -> None:
        """Check that every setting is a number or a tensor, then register each ``name=(value, bounds)``."""
        _check_settings(**{name: value for name, (value, _) in settings.items()})
        for name, (value, bounds) in settings.items():
            self.register_hyperparameter(name, value, **bounds)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the model with a reference model (it reads a ``*reference_logps`` entry)."""
        return bool(loss_needs(self) & {"reference_logps", "template_reference_logps"})

    @property
    def needs_template(self) -> bool:
        """Whether the forget batch needs a template (alternate, "I don't know") answer."""
        return any(name.startswith("template_") for name in loss_needs(self))

    @property
    def uses_retain(self) -> bool:
        """Whether the retain term currently counts (declared in ``needs`` and ``retain_weight > 0``)."""
        return "retain" in loss_needs(self) and bool((self.retain_weight > 0).any())

    def forward(self, scores: UnlearningScores, /) -> Tensor:
        """The loss of one step from its scores."""
        return self.combine(self.forget_term(scores), scores.retain if self.uses_retain else None)

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        """The method's forget term from the scores of a step (before ``forget_weight``)."""
        raise NotImplementedError(f"{type(self).__name__} must define `forget_term(scores)` or `forward(scores)`.")

    def _forget(self, *tensors: Any, **kwargs: Any) -> Tensor:
        """The forget term from tensors, for the losses that also take them (``loss(policy_logps, ...)``)."""
        raise NotImplementedError(f"{type(self).__name__} takes its scores: call it as `loss(scores)`.")

    def _scores_or_tensors(
        self, first: Tensor | UnlearningScores, *tensors: Any, retain_loss: Tensor | None, **kwargs: Any
    ) -> Tensor:
        """``loss(scores)``, or the tensor form: ``combine(_forget(first, *tensors, **kwargs), retain_loss)``."""
        if isinstance(first, UnlearningScores):
            return UnlearningLoss.forward(self, first)
        return self.combine(self._forget(first, *tensors, **kwargs), retain_loss)

    def combine(self, forget_term: Tensor, retain_loss: Tensor | None) -> Tensor:
        """Return ``forget_weight · forget_term + retain_weight · retain_loss``."""
        out = self.forget_weight.to(forget_term) * forget_term
        if retain_loss is None:
            if self.uses_retain:
                raise ValueError(
                    f"{type(self).__name__} has retain_weight={self.retain_weight.tolist()} but no retain loss was "
                    "given. Pass retain data (or set retain_weight to 0)."
                )
            return out
        return out + self.retain_weight.to(forget_term) * retain_loss


class NPOLoss(UnlearningLoss):
    r"""NPO (with an optional retain term: NPO-RT with a retain NLL, NPO-KL with a retain KL).

    .. math::

        \mathcal{L} = w_f \cdot \frac{2}{\beta}\,\mathbb{E}\big[\operatorname{softplus}(\beta
            \log(\pi_\theta/\pi_{\mathrm{ref}}))\big] + w_r \,\mathcal{L}_{\text{retain}}

    Called as ``loss(scores)`` (reads ``policy_logps``, ``reference_logps`` and, while :math:`w_r > 0`, ``retain``)
    or with the tensors themselves, ``loss(policy_logps, reference_logps, retain_loss=None)``.

    Args:
        beta: :math:`\beta > 0` (paper default 0.1).
        forget_weight: :math:`w_f \ge 0`.
        retain_weight: :math:`w_r \ge 0` (0: plain NPO).
        length_normalize: divide each log-ratio by its answer length (off, as in the paper), so that the gradient
            weight does not vanish on long answers; see :func:`~lightning_losses.functional.npo_loss`. The loss then
            also reads ``lengths``.

    Example:
        >>> import torch
        >>> loss = NPOLoss(beta=0.1)
        >>> ref = torch.tensor([-3.0, -4.0])
        >>> torch.allclose(loss(ref - 1.0, ref), 2 / 0.1 * torch.nn.functional.softplus(torch.tensor(-0.1)))
        True
        >>> torch.equal(loss(UnlearningScores(policy_logps=ref - 1.0, reference_logps=ref)), loss(ref - 1.0, ref))
        True
        >>> loss
        NPOLoss(forget_weight=1, retain_weight=0, beta=0.1)
    """

    needs = ("policy_logps", "reference_logps", "retain")
    module_attribute = "npo"
    beta: Tensor

    def __init__(
        self,
        beta: float = 0.1,
        forget_weight: float = 1.0,
        retain_weight: float = 0.0,
        length_normalize: bool = False,
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        if not isinstance(length_normalize, bool):
            raise TypeError(f"`length_normalize` must be a bool, got {type(length_normalize).__name__}.")
        self._register_settings(beta=(beta, _POSITIVE))
        self.length_normalize = length_normalize
        if length_normalize:
            self.__dict__["needs"] = (*type(self).needs, "lengths")

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        lengths = scores.lengths if self.length_normalize else None
        return self._forget(scores.policy_logps, scores.reference_logps, lengths=lengths)

    def _forget(self, policy_logps: Tensor, reference_logps: Tensor, lengths: Tensor | None = None) -> Tensor:
        return npo_loss(
            policy_logps, reference_logps, self.beta, lengths=lengths, length_normalize=self.length_normalize
        )

    def forward(
        self,
        policy_logps: Tensor | UnlearningScores,
        reference_logps: Tensor | None = None,
        retain_loss: Tensor | None = None,
        *,
        lengths: Tensor | None = None,
    ) -> Tensor:
        return self._scores_or_tensors(policy_logps, reference_logps, retain_loss=retain_loss, lengths=lengths)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", length_normalize=True" if self.length_normalize else "")


class SimNPOLoss(UnlearningLoss):
    r"""SimNPO: reference-free, length-normalised NPO with margin :math:`\delta`, plus a retain NLL term.

    .. math::

        \mathcal{L} = -w_f \frac{2}{\beta}\,\mathbb{E}\Big[\log\sigma\Big(\beta\Big(\frac{\mathrm{NLL}_\theta(y|x)}{|y|}
            - \delta\Big)\Big)\Big] + w_r\,\mathcal{L}_{\text{retain}}

    Called as ``loss(scores)`` (reads ``policy_logps``, ``lengths``, ``retain``) or
    ``loss(policy_logps, lengths, retain_loss=None)``.

    Args:
        beta: :math:`\beta > 0` (default 4.5).
        delta: margin :math:`\delta` (default 0).
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r` (default 0.125).

    Example:
        >>> import torch
        >>> loss = SimNPOLoss()
        >>> float(loss(torch.tensor([-1000.0]), torch.tensor([10]), retain_loss=torch.tensor(0.0))) < 1e-6
        True
    """

    needs = ("policy_logps", "lengths", "retain")
    module_attribute = "simnpo"
    beta: Tensor
    delta: Tensor

    def __init__(
        self, beta: float = 4.5, delta: float = 0.0, forget_weight: float = 1.0, retain_weight: float = 0.125
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        self._register_settings(beta=(beta, _POSITIVE), delta=(delta, _ANY))

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return self._forget(scores.policy_logps, scores.lengths)

    def _forget(self, policy_logps: Tensor, lengths: Tensor) -> Tensor:
        return simnpo_loss(policy_logps, lengths, self.beta, self.delta)

    def forward(
        self, policy_logps: Tensor | UnlearningScores, lengths: Tensor | None = None, retain_loss: Tensor | None = None
    ) -> Tensor:
        return self._scores_or_tensors(policy_logps, lengths, retain_loss=retain_loss)


class GradientAscentLoss(UnlearningLoss):
    r"""Gradient ascent (``retain_weight = 0``) and GradDiff (``retain_weight > 0``).

    .. math::

        \mathcal{L} = -w_f\,\mathrm{NLL}_{\text{forget}} + w_r\,\mathcal{L}_{\text{retain}}

    Called as ``loss(scores)`` (reads ``policy_logps``, ``lengths``, ``retain``) or
    ``loss(forget_logps, lengths=None, retain_loss=None, *, num_items_in_batch=None)``, whose ``num_items_in_batch``
    is the number of forget tokens (sequences without ``lengths``) of the whole batch, over the micro-batches of the
    optimizer step and the ranks; see :func:`~lightning_losses.functional.gradient_ascent_loss`.

    Example:
        >>> import torch
        >>> float(GradientAscentLoss()(torch.tensor([-6.0]), torch.tensor([3])))
        -2.0
    """

    needs = ("policy_logps", "lengths", "retain")
    module_attribute = "ga"

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        lengths = scores.lengths
        return self._forget(scores.policy_logps, lengths, num_items_in_batch=scores.step_items(lengths.sum()))

    def _forget(
        self, forget_logps: Tensor, lengths: Tensor | None = None, *, num_items_in_batch: NumItems = None
    ) -> Tensor:
        return gradient_ascent_loss(forget_logps, lengths, num_items_in_batch=num_items_in_batch)

    def forward(
        self,
        forget_logps: Tensor | UnlearningScores,
        lengths: Tensor | None = None,
        retain_loss: Tensor | None = None,
        *,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        return self._scores_or_tensors(
            forget_logps, lengths, retain_loss=retain_loss, num_items_in_batch=num_items_in_batch
        )


class FLATLoss(UnlearningLoss):
    r"""FLAT: :math:`\mathbb{E}[-g(P_{\text{template}}) + f^*(g(P_{\text{forget}}))]` for an f-divergence.

    Called as ``loss(scores)`` (reads ``mean_token_probs``, ``template_mean_token_probs``, ``retain``) or
    ``loss(forget_probs, template_probs, retain_loss=None)``.

    Args:
        divergence: ``"tv"`` (default), ``"kl"``, ``"reverse_kl"``, ``"pearson"``, ``"js"`` or ``"hellinger"``.
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r` (FLAT uses no retain data: default 0).

    Example:
        >>> import torch
        >>> loss = FLATLoss("js")
        >>> bool(loss(torch.tensor([0.9]), torch.tensor([0.1])) > loss(torch.tensor([0.1]), torch.tensor([0.9])))
        True
    """

    needs = ("mean_token_probs", "template_mean_token_probs", "retain")
    module_attribute = "flat"

    def __init__(self, divergence: Divergence = "tv", forget_weight: float = 1.0, retain_weight: float = 0.0) -> None:
        super().__init__(forget_weight, retain_weight)
        if not isinstance(divergence, str) or divergence not in FLAT_DIVERGENCES:
            raise ValueError(f"Unknown f-divergence {divergence!r}: expected one of {', '.join(FLAT_DIVERGENCES)}.")
        self.divergence: Divergence = divergence

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return self._forget(scores.mean_token_probs, scores.template_mean_token_probs)

    def _forget(self, forget_probs: Tensor, template_probs: Tensor) -> Tensor:
        return flat_loss(forget_probs, template_probs, self.divergence)

    def forward(
        self,
        forget_probs: Tensor | UnlearningScores,
        template_probs: Tensor | None = None,
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        return self._scores_or_tensors(forget_probs, template_probs, retain_loss=retain_loss)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, " + super().extra_repr()


class IdkDPOLoss(UnlearningLoss):
    r"""IdkDPO: DPO with the "I don't know" answer preferred to the forget answer, plus a retain term.

    Called as ``loss(scores)`` (reads the policy and reference log-probabilities of the template and the forget
    answers, and ``retain``) or ``loss(policy_idk_logps, reference_idk_logps, policy_forget_logps,
    reference_forget_logps, retain_loss=None)``.

    Example:
        >>> import torch
        >>> z = torch.tensor([-2.0])
        >>> loss = IdkDPOLoss(retain_weight=0.0)
        >>> torch.allclose(loss(z, z, z, z), torch.tensor(20 * 0.6931472))
        True
    """

    needs = ("template_policy_logps", "template_reference_logps", "policy_logps", "reference_logps", "retain")
    module_attribute = "idkdpo"
    beta: Tensor

    def __init__(self, beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 1.0) -> None:
        super().__init__(forget_weight, retain_weight)
        self._register_settings(beta=(beta, _POSITIVE))

    @staticmethod
    def _preference_logps(scores: UnlearningScores) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The policy and reference log-probabilities of the template (preferred) and of the forget answers."""
        return (
            scores.template_policy_logps,
            scores.template_reference_logps,
            scores.policy_logps,
            scores.reference_logps,
        )

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return self._forget(*self._preference_logps(scores))

    def _forget(
        self,
        policy_idk_logps: Tensor,
        reference_idk_logps: Tensor,
        policy_forget_logps: Tensor,
        reference_forget_logps: Tensor,
    ) -> Tensor:
        return idk_dpo_loss(
            policy_idk_logps, reference_idk_logps, policy_forget_logps, reference_forget_logps, self.beta
        )

    def forward(
        self,
        policy_idk_logps: Tensor | UnlearningScores,
        reference_idk_logps: Tensor | None = None,
        policy_forget_logps: Tensor | None = None,
        reference_forget_logps: Tensor | None = None,
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        return self._scores_or_tensors(
            policy_idk_logps, reference_idk_logps, policy_forget_logps, reference_forget_logps, retain_loss=retain_loss
        )


class _TokenMeanLoss(UnlearningLoss):
    """A loss whose forget term is a token mean: normalised over the optimizer step where the scores say how."""

    def _num_items(self, scores: UnlearningScores, mask: Tensor) -> NumItems:
        return scores.step_items(mask.sum())


class WGALoss(_TokenMeanLoss):
    r"""Weighted gradient ascent (WGA): gradient ascent with each answer token weighted by :math:`p^\beta`.

    .. math::

        \mathcal{L} = w_f\,\frac{1}{|A|}\sum_{(b,t)\in A} \operatorname{sg}(p_{bt}^{\beta}) \log p_{bt}
            + w_r\,\mathcal{L}_{\text{retain}}

    Called as ``loss(scores)`` (reads ``token_logps``, ``token_mask`` and, while :math:`w_r > 0`, ``retain``); see
    :func:`~lightning_losses.functional.wga_loss` for the source and where the code and the paper differ. Defaults
    are open-unlearning's ``configs/trainer/WGA.yaml`` (β = 1, :math:`w_f = w_r = 1`, retain NLL).

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.25]]))
        >>> scores = UnlearningScores(token_logps=lp, token_mask=torch.ones(1, 2, dtype=torch.bool))
        >>> torch.allclose(WGALoss(retain_weight=0.0)(scores), (0.5 * lp[0, 0] + 0.25 * lp[0, 1]) / 2)
        True
    """

    needs = ("token_logps", "token_mask", "retain")
    module_attribute = "wga"
    beta: Tensor

    def __init__(self, beta: float = 1.0, forget_weight: float = 1.0, retain_weight: float = 1.0) -> None:
        super().__init__(forget_weight, retain_weight)
        self._register_settings(beta=(beta, _NON_NEGATIVE))

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        mask = scores.token_mask
        return wga_loss(scores.token_logps, mask, self.beta, num_items_in_batch=self._num_items(scores, mask))


class SatImpLoss(_TokenMeanLoss):
    r"""SatImp: gradient ascent with each answer token weighted by :math:`p^{\beta_1}(1-p)^{\beta_2}`.

    .. math::

        \mathcal{L} = w_f\,\frac{1}{|A|}\sum_{(b,t)\in A}
            \operatorname{sg}\big(p_{bt}^{\beta_1}(1-p_{bt})^{\beta_2}\big) \log p_{bt}
            + w_r\,\mathcal{L}_{\text{retain}}

    Called as ``loss(scores)`` (reads ``token_logps``, ``token_mask``, ``retain``); see
    :func:`~lightning_losses.functional.satimp_loss`. Defaults are open-unlearning's ``configs/trainer/SatImp.yaml``
    (:math:`\beta_1 = 5`, :math:`\beta_2 = 1`, forget weight 0.1, retain NLL weight 1; its trainer class defaults
    are the other way round, forget 1 and retain 0.1).

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5]]))
        >>> scores = UnlearningScores(token_logps=lp, token_mask=torch.ones(1, 1, dtype=torch.bool))
        >>> loss = SatImpLoss(beta1=1.0, beta2=1.0, forget_weight=1.0, retain_weight=0.0)
        >>> torch.allclose(loss(scores), 0.25 * lp[0, 0])
        True
    """

    needs = ("token_logps", "token_mask", "retain")
    module_attribute = "satimp"
    beta1: Tensor
    beta2: Tensor

    def __init__(
        self, beta1: float = 5.0, beta2: float = 1.0, forget_weight: float = 0.1, retain_weight: float = 1.0
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        self._register_settings(beta1=(beta1, _NON_NEGATIVE), beta2=(beta2, _NON_NEGATIVE))

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        mask = scores.token_mask
        return satimp_loss(
            scores.token_logps, mask, self.beta1, self.beta2, num_items_in_batch=self._num_items(scores, mask)
        )


class CEULoss(_TokenMeanLoss):
    r"""CE-U: cross-entropy toward the model's own (detached) next-token distribution with the answer token removed.

    Called as ``loss(scores)`` (reads ``logits``, ``labels``, ``retain``; the whole ``B × T × V`` logits are
    formed); see :func:`~lightning_losses.functional.ceu_loss`. Defaults are open-unlearning's ``CEU`` trainer
    (``src/trainer/unlearn/ceu.py``): the first answer token of each sequence left out, no retain term.

    Args:
        ignore_first: answer tokens left out at the start of each sequence.
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r` (default 0: CE-U uses no retain data).
        ignore_index: label of prompt and padding positions in ``scores.labels``.

    Example:
        >>> import torch
        >>> z, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
        >>> from lightning_losses.functional import ceu_loss
        >>> torch.equal(CEULoss()(UnlearningScores(logits=z, labels=y)), ceu_loss(z, y, shift=True, ignore_first=1))
        True
    """

    needs = ("logits", "labels", "retain")
    module_attribute = "ceu"

    def __init__(
        self, ignore_first: int = 1, forget_weight: float = 1.0, retain_weight: float = 0.0, ignore_index: int = -100
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        check_int(ignore_first, "ignore_first", low=0)
        check_int(ignore_index, "ignore_index")
        self.ignore_first, self.ignore_index = ignore_first, ignore_index

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        labels = scores.labels
        counted = ceu_target_labels(labels, self.ignore_index, True, self.ignore_first) != self.ignore_index
        return ceu_loss(
            scores.logits,
            labels,
            self.ignore_index,
            shift=True,
            ignore_first=self.ignore_first,
            num_items_in_batch=self._num_items(scores, counted),
        )

    def extra_repr(self) -> str:
        return f"ignore_first={self.ignore_first}, " + super().extra_repr()


class UNDIALLoss(_TokenMeanLoss):
    r"""UNDIAL: self-distillation toward the reference logits with the answer token's logit lowered by :math:`\gamma`.

    .. math::

        \mathcal{L} = w_f\,\frac{1}{|A|}\sum_{(b,t)\in A}
            \mathrm{CE}\big(\operatorname{softmax}(z^{\mathrm{ref}}_{bt} - \gamma e_{y_{bt}}),\, p^\theta_{bt}\big)
            + w_r\,\mathcal{L}_{\text{retain}}

    Called as ``loss(scores)`` (reads ``logits``, ``reference_logits``, ``labels``, ``retain``): the reference runs on
    the forget batch at every step (an adapter or an explicit reference model; it cannot be precomputed). See
    :func:`~lightning_losses.functional.undial_loss` for where the code and the paper differ. Defaults are
    open-unlearning's ``configs/trainer/UNDIAL.yaml`` (γ = 10, named ``beta`` there; retain weight 0).

    Example:
        >>> import torch
        >>> z, y = torch.randn(1, 4, 6), torch.randint(0, 6, (1, 4))
        >>> scores = UnlearningScores(logits=z, reference_logits=z + 1.0, labels=y)
        >>> from lightning_losses.functional import undial_loss
        >>> torch.equal(UNDIALLoss(gamma=2.0)(scores), undial_loss(z, z + 1.0, y, 2.0, shift=True))
        True
    """

    needs = ("logits", "reference_logits", "labels", "retain")
    module_attribute = "undial"
    gamma: Tensor

    def __init__(
        self, gamma: float = 10.0, forget_weight: float = 1.0, retain_weight: float = 0.0, ignore_index: int = -100
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        check_int(ignore_index, "ignore_index")
        self._register_settings(gamma=(gamma, _NON_NEGATIVE))
        self.ignore_index = ignore_index

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        labels = scores.labels
        counted = labels[:, 1:] != self.ignore_index
        return undial_loss(
            scores.logits,
            scores.reference_logits,
            labels,
            self.gamma,
            self.ignore_index,
            shift=True,
            num_items_in_batch=self._num_items(scores, counted),
        )


class RMULoss(UnlearningLoss):
    r"""RMU (representation misdirection): forget activations at one layer pushed toward :math:`c\,u`, retain
    activations held at the frozen model's.

    .. math::

        \mathcal{L} = w_f\,\mathrm{MSE}_A\big(h^\theta_{\text{forget}},\, c\,u\big)
            + w_r\,\mathrm{MSE}_A\big(h^\theta_{\text{retain}},\, h^{\mathrm{ref}}_{\text{retain}}\big)

    with :math:`h` the output of ``layer`` (read with a forward hook; through PEFT adapters and, for the frozen model,
    through the configured reference mode), :math:`u` a fixed random unit vector (:func:`~lightning_losses.functional.
    rmu_control_vector`, seeded by ``seed``) and :math:`\mathrm{MSE}_A` the per-sequence answer-token mean of the
    mean squared difference (:func:`~lightning_losses.functional.rmu_loss`, where the code and the paper differ).
    Called as ``loss(scores)``; the retain term comes from the retain batch's activations, not from ``retain``.

    As in open-unlearning (``src/trainer/unlearn/rmu.py``, after WMDP's ``rmu/unlearn.py``) only what precedes the
    layer receives gradient: put the trainable parameters (the LoRA adapter, ``target_modules``) at or before it;
    under DDP with trainable parameters after it, set ``find_unused_parameters=True``. The defaults are
    open-unlearning's ``configs/trainer/RMU.yaml`` (c = 300, :math:`w_f = 1`, :math:`w_r = 1000`), which it says to
    tune per model; c is a hyperparameter (``"rmu.steering_coeff"``).

    Args:
        layer: the module whose output is steered: its dotted name (``"transformer.h.1"``; a unique suffix of a
            name is enough, so the same name works through a PEFT wrapper), or ``None``: the block at a quarter of
            the depth of the model's largest ``nn.ModuleList`` (open-unlearning's layer 7 of 32).
        steering_coeff: :math:`c > 0`.
        forget_weight: :math:`w_f`.
        retain_weight: :math:`w_r`.
        seed: seed of :math:`u`.

    Example:
        >>> import torch
        >>> loss = RMULoss(steering_coeff=2.0, retain_weight=0.0)
        >>> h, mask = torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
        >>> torch.allclose(loss(UnlearningScores(activations=h, activation_mask=mask)), torch.tensor(4.0 / 4))
        True
    """

    needs = (
        "activations",
        "activation_mask",
        "retain_activations",
        "retain_reference_activations",
        "retain_activation_mask",
    )
    module_attribute = "rmu"
    steering_coeff: Tensor

    def __init__(
        self,
        layer: str | None = None,
        steering_coeff: float = 300.0,
        forget_weight: float = 1.0,
        retain_weight: float = 1000.0,
        seed: int = 0,
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        check_int(seed, "seed")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError(f"`layer` must be a module name (a non-empty str) or None, got {layer!r}.")
        self._register_settings(steering_coeff=(steering_coeff, _POSITIVE))
        self.layer, self.seed = layer, seed

    @property
    def uses_retain(self) -> bool:
        """Whether the retain activation term counts (``retain_weight > 0``): a retain batch is then needed."""
        return bool((self.retain_weight > 0).any())

    def target(self, activations: Tensor) -> Tensor:
        """The forget target :math:`c\\,u` ``(D,)`` for activations of width ``D``."""
        u = rmu_control_vector(activations.shape[-1], seed=self.seed, device=activations.device)
        return self.steering_coeff.to(u) * u

    def forward(self, scores: UnlearningScores, /) -> Tensor:
        h = scores.activations
        forget = rmu_loss(h, self.target(h), scores.activation_mask)
        out = self.forget_weight.to(forget) * forget
        if not self.uses_retain:
            return out
        retain = rmu_loss(scores.retain_activations, scores.retain_reference_activations, scores.retain_activation_mask)
        return out + self.retain_weight.to(forget) * retain

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, " + super().extra_repr()


class AltPOLoss(IdkDPOLoss):
    r"""AltPO: DPO with a plausible alternate answer (the template answer) preferred to the forget answer, plus a
    retain term.

    Called as ``loss(scores)`` (the template entries hold the alternate answer) or with the four log-probability
    tensors; see :func:`~lightning_losses.functional.altpo_loss` for the source. Defaults: β = 0.1 (the AltPO
    repository's configuration; open-unlearning's ``DPO`` trainer defaults to 1), retain NLL weight 1. It lives at
    ``self.altpo``.

    Example:
        >>> import torch
        >>> z = torch.tensor([-2.0])
        >>> torch.allclose(AltPOLoss(retain_weight=0.0)(z, z, z, z), torch.tensor(20 * 0.6931472))
        True
    """

    module_attribute = "altpo"

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return altpo_loss(*self._preference_logps(scores), self.beta)


@dataclass(frozen=True)
class UnlearningPreset:
    """An unlearning method by name: a loss class, its settings, and the retain term the mixin computes for it.

    Example:
        >>> preset = UNLEARNING_PRESETS["npo_rt"]
        >>> preset.build(), preset.retain, preset.attribute
        (NPOLoss(forget_weight=1, retain_weight=1, beta=0.1), 'nll', 'npo')
    """

    loss: type[UnlearningLoss]
    settings: Mapping[str, Any] = field(default_factory=dict)
    retain: RetainLoss | None = None

    def build(self, **overrides: Any) -> UnlearningLoss:
        """A new loss with the preset's settings, ``overrides`` replacing some (``build(length_normalize=True)``)."""
        return self.loss(**{**self.settings, **overrides})

    @property
    def attribute(self) -> str:
        """The attribute of the LightningModule the loss lives at."""
        return self.loss.module_attribute


#: The unlearning methods by name, with the papers' defaults: NPO β = 0.1; SimNPO β = 4.5, δ = 0, retain weight
#: 0.125; GradDiff γ = α = 1; FLAT with TV; and open-unlearning's configurations (``configs/trainer/*.yaml``) for
#: WGA (β = 1, retain NLL weight 1), SatImp (β1 = 5, β2 = 1, forget weight 0.1, retain NLL weight 1), CE-U (first
#: answer token left out, no retain term), UNDIAL (γ = 10, retain weight 0), RMU (c = 300, retain weight 1000) and
#: AltPO (β = 0.1, retain NLL weight 1). Add an entry to make a name of your own available to
#: ``configure_unlearning(method=...)``.
UNLEARNING_PRESETS: dict[str, UnlearningPreset] = {
    "ga": UnlearningPreset(GradientAscentLoss),
    "graddiff": UnlearningPreset(GradientAscentLoss, {"retain_weight": 1.0}, "nll"),
    "graddiff_kl": UnlearningPreset(GradientAscentLoss, {"retain_weight": 1.0}, "kl"),
    "npo": UnlearningPreset(NPOLoss),
    "npo_rt": UnlearningPreset(NPOLoss, {"retain_weight": 1.0}, "nll"),
    "npo_kl": UnlearningPreset(NPOLoss, {"retain_weight": 1.0}, "kl"),
    "simnpo": UnlearningPreset(SimNPOLoss, {}, "nll"),
    "flat": UnlearningPreset(FLATLoss),
    "idkdpo": UnlearningPreset(IdkDPOLoss, {}, "nll"),
    "wga": UnlearningPreset(WGALoss, {}, "nll"),
    "satimp": UnlearningPreset(SatImpLoss, {}, "nll"),
    "ceu": UnlearningPreset(CEULoss),
    "undial": UnlearningPreset(UNDIALLoss, {}, "nll"),
    "rmu": UnlearningPreset(RMULoss),
    "altpo": UnlearningPreset(AltPOLoss, {}, "nll"),
}


def unlearning_preset(method: str) -> UnlearningPreset:
    """The preset named ``method``.

    Raises:
        ValueError: no preset has that name.
    """
    preset = UNLEARNING_PRESETS.get(method) if isinstance(method, str) else None
    if preset is None:
        raise ValueError(f"Unknown unlearning method {method!r}: expected one of {', '.join(UNLEARNING_PRESETS)}.")
    return preset


def resolve_unlearning_loss(
    method: str | None = None, loss: nn.Module | None = None, retain_loss: str | None = "default"
) -> tuple[nn.Module, str, RetainLoss | None]:
    """The loss, a name for it, and the retain term, from a method name and / or a loss.

    ``method`` alone builds its preset; ``loss`` alone is used as it is (retain term ``"nll"`` unless
    ``retain_loss`` says otherwise); both: ``loss`` must be of the preset's class (a subclass is fine) and takes its
    retain term; neither: ``"npo"``.

    Raises:
        ValueError: an unknown method, a loss of another class than the method's, or a bad ``retain_loss``.
        TypeError: ``loss`` is not an ``nn.Module``.

    Example:
        >>> class MyNPO(NPOLoss):
        ...     pass
        >>> resolve_unlearning_loss("npo_kl", MyNPO(beta=0.2))
        (MyNPO(forget_weight=1, retain_weight=0, beta=0.2), 'npo_kl', 'kl')
    """
    if method is None and loss is None:
        method = "npo"
    preset = unlearning_preset(method) if method is not None else None
    if preset is not None and loss is not None and not isinstance(loss, preset.loss):
        name = preset.loss.__name__
        raise ValueError(
            f"Method {method!r} uses {name}, got a {type(loss).__name__}. Pass a {name} (or a subclass), choose "
            "the method that matches your loss, or leave `method` unset to use your loss as it is."
        )
    if loss is None:
        assert preset is not None
        loss = preset.build()
    if not isinstance(loss, nn.Module):
        raise TypeError(f"`loss` must be an nn.Module called as `loss(scores)`, got {type(loss).__name__}.")
    loss_needs(loss)  # a bad declaration is refused here
    retain = (preset.retain if preset is not None else "nll") if retain_loss == "default" else retain_loss
    if retain not in (None, "nll", "kl"):
        raise ValueError(f"`retain_loss` must be 'nll', 'kl' or None, got {retain!r}.")
    return loss, method if method is not None else type(loss).__name__, retain  # type: ignore[return-value]

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
from typing import Any, ClassVar, Literal, get_args

from torch import Tensor, nn

from lightning_losses.functional.unlearning import (
    FLAT_DIVERGENCES,
    Divergence,
    flat_loss,
    gradient_ascent_loss,
    idk_dpo_loss,
    npo_loss,
    simnpo_loss,
)
from lightning_losses.losses.base import LossModule
from lightning_losses.utilities.checks import NumItems, check_hyperparameter

__all__ = [
    "UNLEARNING_PRESETS",
    "FLATLoss",
    "GradientAscentLoss",
    "IdkDPOLoss",
    "NPOLoss",
    "ScoreName",
    "SimNPOLoss",
    "UnlearningLoss",
    "UnlearningMethod",
    "UnlearningPreset",
    "UnlearningScores",
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
]
UnlearningMethod = Literal["ga", "graddiff", "graddiff_kl", "npo", "npo_rt", "npo_kl", "simnpo", "flat", "idkdpo"]
RetainLoss = Literal["nll", "kl"]
#: The attribute of the LightningModule a loss without ``module_attribute`` lives at.
DEFAULT_MODULE_ATTRIBUTE = "unlearning"


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
      where the step has none.

    ``batch`` is the forget batch itself (a dict of tensors) when the scores come from a batch.

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

    def __init__(self, *, batch: Mapping[str, Any] | None = None, **values: Tensor | None) -> None:
        self._check_names(values)
        self._values: dict[str, Tensor | None] = dict(values)
        self._providers: dict[str, Callable[[], Tensor | None]] = {}
        self.batch = batch

    @classmethod
    def lazy(
        cls, providers: Mapping[str, Callable[[], Tensor | None]], *, batch: Mapping[str, Any] | None = None
    ) -> UnlearningScores:
        """Scores whose entries are computed by ``providers[name]()`` on first access."""
        scores = cls(batch=batch)
        scores._check_names(providers)
        scores._providers = dict(providers)
        return scores

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

    @property
    def policy_logps(self) -> Tensor:
        """``(B,)`` summed answer log-probabilities of the forget answers under the model being unlearned."""
        return self._tensor("policy_logps")

    @property
    def reference_logps(self) -> Tensor:
        """``(B,)`` summed answer log-probabilities of the forget answers under the reference model."""
        return self._tensor("reference_logps")

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` answer tokens of each forget sequence."""
        return self._tensor("lengths")

    @property
    def mean_token_probs(self) -> Tensor:
        """``(B,)`` mean answer-token probability of the forget answers under the model being unlearned."""
        return self._tensor("mean_token_probs")

    @property
    def template_policy_logps(self) -> Tensor:
        """``(B,)`` summed answer log-probabilities of the template answers under the model being unlearned."""
        return self._tensor("template_policy_logps")

    @property
    def template_reference_logps(self) -> Tensor:
        """``(B,)`` summed answer log-probabilities of the template answers under the reference model."""
        return self._tensor("template_reference_logps")

    @property
    def template_lengths(self) -> Tensor:
        """``(B,)`` answer tokens of each template answer."""
        return self._tensor("template_lengths")

    @property
    def template_mean_token_probs(self) -> Tensor:
        """``(B,)`` mean answer-token probability of the template answers under the model being unlearned."""
        return self._tensor("template_mean_token_probs")

    @property
    def retain(self) -> Tensor | None:
        """The retain term of the step (a scalar), or ``None`` where there is none."""
        return self.get("retain")

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

    def __init__(self, beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 0.0) -> None:
        super().__init__(forget_weight, retain_weight)
        _check_settings(beta=beta)
        self.register_hyperparameter("beta", beta, low=0.0, low_inclusive=False)

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return npo_loss(scores.policy_logps, scores.reference_logps, self.beta)

    def forward(
        self,
        policy_logps: Tensor | UnlearningScores,
        reference_logps: Tensor | None = None,
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        if isinstance(policy_logps, UnlearningScores):
            return super().forward(policy_logps)
        return self.combine(npo_loss(policy_logps, reference_logps, self.beta), retain_loss)  # type: ignore[arg-type]


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
        _check_settings(beta=beta, delta=delta)
        self.register_hyperparameter("beta", beta, low=0.0, low_inclusive=False)
        self.register_hyperparameter("delta", delta)

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return simnpo_loss(scores.policy_logps, scores.lengths, self.beta, self.delta)

    def forward(
        self, policy_logps: Tensor | UnlearningScores, lengths: Tensor | None = None, retain_loss: Tensor | None = None
    ) -> Tensor:
        if isinstance(policy_logps, UnlearningScores):
            return super().forward(policy_logps)
        return self.combine(simnpo_loss(policy_logps, lengths, self.beta, self.delta), retain_loss)  # type: ignore[arg-type]


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
        return gradient_ascent_loss(scores.policy_logps, scores.lengths)

    def forward(
        self,
        forget_logps: Tensor | UnlearningScores,
        lengths: Tensor | None = None,
        retain_loss: Tensor | None = None,
        *,
        num_items_in_batch: NumItems = None,
    ) -> Tensor:
        if isinstance(forget_logps, UnlearningScores):
            return super().forward(forget_logps)
        forget = gradient_ascent_loss(forget_logps, lengths, num_items_in_batch=num_items_in_batch)
        return self.combine(forget, retain_loss)


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
        return flat_loss(scores.mean_token_probs, scores.template_mean_token_probs, self.divergence)

    def forward(
        self,
        forget_probs: Tensor | UnlearningScores,
        template_probs: Tensor | None = None,
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        if isinstance(forget_probs, UnlearningScores):
            return super().forward(forget_probs)
        return self.combine(flat_loss(forget_probs, template_probs, self.divergence), retain_loss)  # type: ignore[arg-type]

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
        _check_settings(beta=beta)
        self.register_hyperparameter("beta", beta, low=0.0, low_inclusive=False)

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return idk_dpo_loss(
            scores.template_policy_logps,
            scores.template_reference_logps,
            scores.policy_logps,
            scores.reference_logps,
            self.beta,
        )

    def forward(
        self,
        policy_idk_logps: Tensor | UnlearningScores,
        reference_idk_logps: Tensor | None = None,
        policy_forget_logps: Tensor | None = None,
        reference_forget_logps: Tensor | None = None,
        retain_loss: Tensor | None = None,
    ) -> Tensor:
        if isinstance(policy_idk_logps, UnlearningScores):
            return super().forward(policy_idk_logps)
        forget = idk_dpo_loss(
            policy_idk_logps,
            reference_idk_logps,  # type: ignore[arg-type]
            policy_forget_logps,  # type: ignore[arg-type]
            reference_forget_logps,  # type: ignore[arg-type]
            self.beta,
        )
        return self.combine(forget, retain_loss)


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

    def build(self) -> UnlearningLoss:
        """A new loss with the preset's settings."""
        return self.loss(**self.settings)

    @property
    def attribute(self) -> str:
        """The attribute of the LightningModule the loss lives at."""
        return self.loss.module_attribute


#: The unlearning methods by name, with the papers' defaults: NPO β = 0.1; SimNPO β = 4.5, δ = 0, retain weight
#: 0.125; GradDiff γ = α = 1; FLAT with TV. Add an entry to make a name of your own available to
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

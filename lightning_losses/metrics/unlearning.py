r"""Unlearning metrics as torchmetrics ``Metric`` classes: per-sample statistics, membership-inference AUC, forget
quality (KS-test p-value) and truth ratio, all reduced across processes.

Per-sample states are gathered (``dist_reduce_fx="cat"``) with each sample's ``index``, and duplicates are dropped at
``compute`` (a ``DistributedSampler`` repeats samples to even out the shards), so a multi-process evaluation equals
the single-process one exactly.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from lightning_losses.functional.unlearning import membership_scores, truth_ratio
from lightning_losses.utilities.checks import check_targets

__all__ = [
    "DedupedAccuracy",
    "ForgetQuality",
    "LossMembershipInference",
    "MembershipInferenceAUC",
    "TruthRatio",
    "UnlearningSplitStatistics",
    "auc_score",
    "classification_losses",
    "ks_2samp_pvalue",
    "ks_statistic",
    "zlib_length",
]


def auc_score(scores: Tensor, members: Tensor) -> Tensor:
    r"""Area under the ROC curve of ``scores`` separating ``members`` (True) from non-members, ties counted half.

    .. math::

        \mathrm{AUC} = \frac{1}{n_1 n_0} \sum_{i \in M} \sum_{j \notin M}
            \big(\mathbb{1}[s_i > s_j] + \tfrac12 \mathbb{1}[s_i = s_j]\big)

    Computed by torchmetrics' ``binary_auroc`` (the exact ROC curve, trapezoidal, in float64) on the scores' ranks
    scaled to [0, 1]: ``binary_auroc`` reads values outside [0, 1] as logits and applies a sigmoid, which merges
    distinct scores of large magnitude into ties (the sigmoids of 20 and of 30 are both 1 in float32, those of
    -110 and -120 both 0); the ranks keep the order and the ties of the scores, so the AUC is theirs.

    Raises:
        ValueError: When there are no members or no non-members.

    Example:
        >>> auc_score(torch.tensor([0.9, 0.8, 0.1, 0.8]), torch.tensor([True, True, False, False])).item()
        0.875
    """
    members = members.bool().flatten()
    scores = scores.flatten()
    n1 = int(members.sum())
    n0 = members.numel() - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUC needs both members and non-members, got {n1} members and {n0} non-members.")
    _, ranks = torch.unique(scores, sorted=True, return_inverse=True)  # dense ranks: equal scores, equal ranks
    unit = ranks.double() / max(int(ranks.max()), 1)
    return binary_auroc(unit, members.long(), validate_args=False).float()


def ks_statistic(a: Tensor, b: Tensor) -> Tensor:
    r"""Two-sample Kolmogorov–Smirnov statistic :math:`D = \sup_x |F_a(x) - F_b(x)|`.

    Example:
        >>> ks_statistic(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])).item()
        1.0
    """
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("The KS test needs two non-empty samples.")
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a.sort().values, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b.sort().values, grid, right=True).double() / b.numel()
    return (fa - fb).abs().max()


def ks_2samp_pvalue(a: Tensor, b: Tensor) -> Tensor:
    r"""Two-sided two-sample KS-test p-value from the asymptotic Kolmogorov distribution.

    .. math::

        p = 2 \sum_{k \ge 1} (-1)^{k-1} e^{-2 k^2 \lambda^2}, \qquad
        \lambda = D \sqrt{\frac{n m}{n + m}}

    This is TOFU's forget quality when ``a`` holds the unlearned model's per-sample statistic on the forget set and
    ``b`` that of a model never trained on it: high (near 1) when the two are indistinguishable.

    Example:
        >>> x = torch.linspace(0, 1, 50)
        >>> ks_2samp_pvalue(x, x).item()
        1.0
        >>> ks_2samp_pvalue(x, x + 10).item() < 1e-10
        True
    """
    d = float(ks_statistic(a, b))
    n, m = a.numel(), b.numel()
    lam = d * math.sqrt(n * m / (n + m))
    if lam < 1e-3:
        return torch.tensor(1.0)
    total = 0.0
    for k in range(1, 101):
        term = (-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-16:
            break
    return torch.tensor(min(max(2.0 * total, 0.0), 1.0))


def zlib_length(ids: Tensor, mask: Tensor, tokenizer: Any | None = None) -> Tensor:
    """Length in bytes of the zlib-compressed answer text of each sequence (the zlib attack's normaliser).

    The text is decoded with ``tokenizer`` when given, else the token ids themselves are compressed.
    """
    out = []
    for row, keep in zip(ids.tolist(), mask.tolist()):
        tokens = [t for t, k in zip(row, keep) if k]
        if tokenizer is not None:
            data = tokenizer.decode(tokens).encode("utf-8")
        else:
            data = b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens)
        out.append(len(zlib.compress(data)))
    return torch.tensor(out, dtype=torch.float32)


def _append(metric: Metric, state: str, value: Tensor) -> None:
    getattr(metric, state).append(value)


def _cat(metric: Metric, state: str) -> Tensor:
    """A list state as one tensor (it is already one after a distributed sync)."""
    value: Any = getattr(metric, state)
    if isinstance(value, Tensor):
        return value
    return torch.cat(value) if value else torch.empty(0, device=metric.device)


class _ListStateMetric(Metric):
    """A metric whose states (``_states``) are lists of per-batch tensors, concatenated across processes."""

    full_state_update = False
    _states: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._states:
            self.add_state(name, default=[], dist_reduce_fx="cat")


def _dedupe(index: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Keep the first occurrence of each index, sorted by index."""
    if index.numel() == 0:
        return (index, *values)
    unique, inverse = torch.unique(index, return_inverse=True)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, inverse, torch.arange(index.numel(), device=index.device), reduce="amin")
    return (unique, *(v[first] for v in values))


class UnlearningSplitStatistics(_ListStateMetric):
    """Per-sample statistics of one evaluation split: NLL, token count and membership scores, keyed by sample index.

    ``update(log_probs, mask, index, mu=None, sigma=None, zlib=None, truth_ratios=None)`` with per-token
    log-probabilities ``(B, T)``; ``compute()`` returns a dict of per-sample tensors sorted by index (``"index"``,
    ``"nll_sum"``, ``"tokens"``, ``"loss"``, ``"min_k"``, ``"min_k_plus_plus"``, ``"zlib"``, ``"truth_ratio"``; NaN
    where not given) plus ``"nll"``, the token-mean NLL of the split.

    Example:
        >>> stats = UnlearningSplitStatistics(k=0.5)
        >>> lp = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
        >>> stats.update(lp, torch.ones(2, 2, dtype=torch.bool), torch.tensor([4, 7]))
        >>> stats.update(lp[:1], torch.ones(1, 2, dtype=torch.bool), torch.tensor([4]))   # a padded duplicate
        >>> out = stats.compute()
        >>> out["index"].tolist(), out["nll"].item(), out["min_k"].tolist()
        ([4, 7], 2.0, [-3.0, -2.0])
    """

    _keys = ("nll_sum", "tokens", "loss", "min_k", "min_k_plus_plus", "zlib", "truth_ratio")
    _states = ("index", *_keys)

    def __init__(self, k: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < k <= 1:
            raise ValueError(f"`k` must lie in (0, 1], got {k}.")
        self.k = k

    def update(
        self,
        log_probs: Tensor,
        mask: Tensor,
        index: Tensor,
        mu: Tensor | None = None,
        sigma: Tensor | None = None,
        zlib: Tensor | None = None,
        truth_ratios: Tensor | None = None,
    ) -> None:
        if log_probs.shape != mask.shape or index.shape != log_probs.shape[:1]:
            raise ValueError(
                f"Expected log_probs and mask of one shape (B, T) and index of shape (B,), got {tuple(log_probs.shape)}"
                f", {tuple(mask.shape)} and {tuple(index.shape)}."
            )
        scores = membership_scores(log_probs.float(), mask, mu, sigma, self.k)
        nll_sum = -(log_probs.float() * mask).sum(-1)
        tokens = mask.sum(-1).float()
        _append(self, "index", index.long())
        _append(self, "nll_sum", nll_sum)
        _append(self, "tokens", tokens)
        _append(self, "loss", scores["loss"])
        _append(self, "min_k", scores["min_k"])
        nan = torch.full_like(tokens, float("nan"))
        _append(self, "min_k_plus_plus", scores.get("min_k_plus_plus", nan))
        z = nan if zlib is None else -nll_sum / zlib.to(nll_sum).clamp(min=1)
        _append(self, "zlib", z)
        if truth_ratios is not None and truth_ratios.shape != tokens.shape:
            raise ValueError(f"`truth_ratios` must have shape {tuple(tokens.shape)}, got {tuple(truth_ratios.shape)}.")
        _append(self, "truth_ratio", nan if truth_ratios is None else truth_ratios.to(tokens))

    def compute(self) -> dict[str, Tensor]:
        values = [_cat(self, key) for key in self._keys]
        index, *deduped = _dedupe(_cat(self, "index").long(), *values)
        out = dict(zip(self._keys, deduped))
        out["index"] = index
        tokens = out["tokens"].sum()
        out["nll"] = out["nll_sum"].sum() / tokens.clamp(min=1)
        return out


class MembershipInferenceAUC(_ListStateMetric):
    """Streaming AUC of a membership score: ``update(scores, members)`` with ``members`` True for training samples.

    0.5 means the attack cannot tell members from non-members (the goal of unlearning on the forget set).

    Example:
        >>> auc = MembershipInferenceAUC()
        >>> auc.update(torch.tensor([0.9, 0.2]), torch.tensor([True, False]))
        >>> auc.compute().item()
        1.0
    """

    _states = ("scores", "members")

    def update(self, scores: Tensor, members: Tensor) -> None:
        if scores.shape != members.shape:
            raise ValueError(f"`scores` and `members` must have one shape, got {scores.shape} and {members.shape}.")
        _append(self, "scores", scores.float())
        _append(self, "members", members.bool())

    def compute(self) -> Tensor:
        scores = _cat(self, "scores")
        members = _cat(self, "members")
        return auc_score(scores, members)


class ForgetQuality(_ListStateMetric):
    """KS-test p-value between a per-sample statistic of the unlearned model and a reference distribution.

    Args:
        reference: the same statistic from a model never trained on the forget data (the "retain model").

    Example:
        >>> fq = ForgetQuality(reference=torch.linspace(0, 1, 40))
        >>> fq.update(torch.linspace(0, 1, 40))
        >>> fq.compute().item()
        1.0
    """

    _states = ("values",)

    def __init__(self, reference: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reference.numel() == 0:
            raise ValueError("`reference` is empty: pass the retain model's statistic on the forget set.")
        self.reference = reference.detach().flatten().float().cpu()

    def update(self, values: Tensor) -> None:
        _append(self, "values", values.detach().flatten().float())

    def compute(self) -> Tensor:
        values = _cat(self, "values")
        return ks_2samp_pvalue(values.cpu(), self.reference)


class TruthRatio(_ListStateMetric):
    r"""TOFU's truth ratio where paraphrased and perturbed answers exist.

    For each question, with :math:`\bar\ell` the mean token log-probability of an answer,

    .. math::

        R = \exp\Big(\frac{1}{K}\sum_{k=1}^{K} \bar\ell(\tilde y_k) - \bar\ell(\hat y)\Big),

    the geometric mean over the :math:`K` perturbed (wrong) answers :math:`\tilde y_k` of their normalised
    probability relative to the paraphrased (correct) answer :math:`\hat y`. ``compute()`` returns the mean of
    :math:`\min(R, 1/R)` (1 when the model cannot tell right from wrong); :meth:`values` the per-question ratios
    (the distribution whose KS test against the retain model is TOFU's forget quality).

    Example:
        >>> tr = TruthRatio()
        >>> tr.update(torch.tensor([-1.0]), torch.tensor([[-2.0, -2.0]]))
        >>> round(tr.values().item(), 4) == round(math.exp(-1.0), 4)
        True
    """

    _states = ("ratios",)

    def update(self, paraphrased_mean_logps: Tensor, perturbed_mean_logps: Tensor) -> None:
        _append(self, "ratios", truth_ratio(paraphrased_mean_logps, perturbed_mean_logps))

    def values(self) -> Tensor:
        """Per-question truth ratios (synchronised across processes)."""
        self.sync()
        try:
            ratios = _cat(self, "ratios")
        finally:
            self.unsync(should_unsync=self._is_synced)
        return ratios

    def compute(self) -> Tensor:
        ratios = _cat(self, "ratios")
        return torch.minimum(ratios, 1 / ratios).mean()


def _check_classification(logits: Tensor, target: Tensor, index: Tensor | None) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`logits` must be floating-point logits of shape (N, num_classes), got {shape}.")
    check_targets(target, logits.shape[1], logits.shape[0])
    bad_index = not isinstance(index, Tensor) or index.shape != target.shape or index.is_floating_point()
    if index is not None and bad_index:
        shape = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(
            f"`index` must be an integer tensor of shape {tuple(target.shape)} (one dataset index per sample), got "
            f"{shape}."
        )


def classification_losses(logits: Tensor, target: Tensor) -> Tensor:
    r"""Per-sample cross-entropy :math:`-\log p(y \mid x)` in float32, checked: the statistic of a loss-based
    membership-inference attack on a classifier.

    Example:
        >>> [round(v, 4) for v in classification_losses(torch.zeros(2, 4), torch.tensor([0, 3])).tolist()]
        [1.3863, 1.3863]
    """
    _check_classification(logits, target, None)
    return torch.nn.functional.cross_entropy(logits.detach().float(), target.long(), reduction="none")


class LossMembershipInference(_ListStateMetric):
    r"""Loss-based membership inference on a classifier: the AUC with which the per-sample loss tells members
    (samples the model was trained on, e.g. the forget set) from non-members (held-out samples).

    The attack scores a sample by its negated cross-entropy :math:`-\ell(x, y)` (members have lower loss, Yeom et
    al. 2018); ``compute()`` is the AUC of that score (:func:`auc_score`, i.e. torchmetrics' ``binary_auroc``):
    1 when every member has a lower loss than every non-member, 0.5 when the losses are indistinguishable. After
    unlearning, the forget set's AUC against held-out data should be that of a model retrained without it, which is
    near 0.5 when the forget and the held-out samples come from one distribution (and below it when a whole class
    was forgotten and the retrained model fails on both alike).

    ``update(logits, target, members, index=None)``: ``members`` is one bool for the whole batch or one per sample.
    With ``index`` (each sample's dataset index) a sample counted twice (the padding a ``DistributedSampler`` adds)
    counts once, so several processes give the single-process AUC; members and non-members must then have distinct
    indices.

    Example:
        >>> mia = LossMembershipInference()
        >>> mia.update(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 1]), members=True)
        >>> mia.update(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1]), members=False)
        >>> mia.compute().item()
        1.0
    """

    _states = ("losses", "members", "index")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._indexed: bool | None = None

    def update(self, logits: Tensor, target: Tensor, members: bool | Tensor, index: Tensor | None = None) -> None:
        _check_classification(logits, target, index)
        if isinstance(members, bool):
            flags = torch.full(target.shape, members, dtype=torch.bool, device=target.device)
        elif isinstance(members, Tensor) and members.dtype == torch.bool and members.shape in (target.shape, ()):
            flags = members.expand(target.shape)
        else:
            got = (
                f"a {members.dtype} tensor of shape {tuple(members.shape)}"
                if isinstance(members, Tensor)
                else (type(members).__name__)
            )
            raise ValueError(
                f"`members` must be a bool or a bool tensor of shape {tuple(target.shape)} (True: trained on), got "
                f"{got}."
            )
        if self._indexed is not None and self._indexed != (index is not None):
            raise ValueError("Pass `index` with every update or with none (duplicates are dropped by index).")
        self._indexed = index is not None
        _append(self, "losses", classification_losses(logits, target))
        _append(self, "members", flags.clone())
        if index is not None:
            _append(self, "index", index.long())

    def compute(self) -> Tensor:
        losses, members, index = _cat(self, "losses"), _cat(self, "members").bool(), _cat(self, "index")
        if index.numel():
            index, losses, members = _dedupe(index.long(), losses, members)
        return auc_score(-losses, members)

    def reset(self) -> None:
        super().reset()
        self._indexed = None


class DedupedAccuracy(_ListStateMetric):
    """Top-1 accuracy counting each sample once by its dataset ``index``: multi-process evaluation with a
    ``DistributedSampler`` (which repeats samples to even out the shards) equals the single-process accuracy.

    ``update(logits, target, index)``; ``compute()`` is the fraction of distinct samples classified correctly
    (the first occurrence of an index counts).

    Example:
        >>> acc = DedupedAccuracy()
        >>> acc.update(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), torch.tensor([5, 6]))
        >>> acc.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), torch.tensor([5]))  # a padded repeat of 5
        >>> acc.compute().item()
        0.5
    """

    _states = ("correct", "index")

    def update(self, logits: Tensor, target: Tensor, index: Tensor) -> None:
        if index is None:
            raise ValueError("`index` is required: one dataset index per sample (the embedded data modules give it).")
        _check_classification(logits, target, index)
        _append(self, "correct", (logits.detach().argmax(-1) == target).float())
        _append(self, "index", index.long())

    def compute(self) -> Tensor:
        _, correct = _dedupe(_cat(self, "index").long(), _cat(self, "correct"))
        if correct.numel() == 0:
            raise ValueError("DedupedAccuracy has no sample: call `update` before `compute`.")
        return correct.mean()

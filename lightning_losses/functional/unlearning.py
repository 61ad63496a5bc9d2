r"""Unlearning losses for language models: NPO, SimNPO, FLAT, IdkDPO, gradient ascent, GradDiff, and their pieces.

Every loss reads **per-sequence answer log-probabilities** :math:`\log \pi(y \mid x) = \sum_{t \in A} \log
\pi(y_t \mid x, y_{<t})` over the answer tokens :math:`A` (prompt and padding positions carry the label
``ignore_index``), computed in float32 by :func:`sequence_log_probs` from logits, or by
:func:`~lightning_losses.functional.chunked.linear_sequence_log_probs` from hidden states and the head.

Hyperparameters (``beta``, ``delta``) are Python numbers or tensors, scalar or one value per sequence, so that
schedules, PBT and STN can drive them.

Bad input raises a ``TypeError`` (not a tensor, wrong dtype) or a ``ValueError`` (shape, range, empty batch) naming
the argument. ``validate_args=True`` (the default) also checks tensor values: finite logits and log-probabilities,
token ids within the vocabulary, non-negative lengths, tensor hyperparameters finite and in range; these checks are
read with one host synchronisation per call, and ``validate_args=False`` skips them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.utilities.checks import (
    DeferredChecks,
    check_hyperparameter,
    check_int,
    check_labels,
    check_num_items,
    check_same_shape,
    check_tensor,
    start_checks,
)
from lightning_losses.utilities.numerics import (
    NumItems,
    as_float32,
    compute_dtype,
    divide_by_items,
    hyperparameter_tensor,
    kl_from_log_probs,
)

__all__ = [
    "FLAT_DIVERGENCES",
    "altpo_loss",
    "ceu_loss",
    "ceu_target_labels",
    "flat_loss",
    "flat_variational_pair",
    "gradient_ascent_loss",
    "idk_dpo_loss",
    "mean_token_probs",
    "membership_scores",
    "npo_loss",
    "retain_kl_loss",
    "retain_nll_loss",
    "rmu_control_vector",
    "rmu_loss",
    "satimp_loss",
    "sequence_log_probs",
    "simnpo_loss",
    "token_log_probs",
    "token_logprob_statistics",
    "truth_ratio",
    "undial_loss",
    "wga_loss",
]

Divergence = Literal["kl", "reverse_kl", "pearson", "tv", "js", "hellinger"]
FLAT_DIVERGENCES: tuple[str, ...] = ("kl", "reverse_kl", "pearson", "tv", "js", "hellinger")
_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------------------------
# Log-probabilities of the answer tokens
# --------------------------------------------------------------------------------------------------------------------


def _check_logits_labels(
    logits: Tensor, labels: Tensor, shift: bool, logits_name: str = "logits"
) -> tuple[Tensor, Tensor]:
    check_tensor(logits, logits_name)
    check_tensor(labels, "labels", floating=False)
    if not isinstance(shift, bool):
        raise TypeError(f"`shift` must be a bool, got {type(shift).__name__}.")
    if logits.ndim != 3:
        if logits_name != "logits":
            raise ValueError(f"`{logits_name}` must have shape (B, T, V), got {tuple(logits.shape)}.")
        raise ValueError(f"`logits` must have shape (B, T, V), got {tuple(logits.shape)}.")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`labels` must have shape (B, T) = {tuple(logits.shape[:2])} to match the logits, got "
            f"{tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must hold integer token ids, got dtype {labels.dtype}.")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def token_log_probs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = False, *, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    r"""Per-token log-probabilities of the labels, in float32, one sequence at a time.

    .. math::

        \ell_{bt} = z_{bt y_{bt}} - \operatorname{logsumexp}_j z_{btj}

    Only one sequence's float32 log-normaliser is formed at a time (no ``B × T × V`` float32 copy of half-precision
    logits), as TRL's ``selective_log_softmax`` does.

    Args:
        logits: ``(B, T, V)`` logits (any float dtype).
        labels: ``(B, T)`` token ids; ``ignore_index`` marks positions that do not count.
        ignore_index: label of positions left out.
        shift: Hugging Face causal-LM convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        validate_args: Check that the logits are finite and the labels are token ids in ``[0, V)`` or
            ``ignore_index`` (one host synchronisation); ``False`` skips both checks.

    Returns:
        ``(log_probs, mask)``: float32 ``(B, T')`` log-probabilities (0 at ignored positions) and the bool mask of
        counted positions (``T' = T - 1`` when ``shift``).

    Example:
        >>> logits = torch.randn(2, 4, 7)
        >>> labels = torch.tensor([[1, 2, -100, 3], [-100, 0, 6, 5]])
        >>> lp, mask = token_log_probs(logits, labels)
        >>> bool(torch.allclose(lp[0, 1], logits[0, 1].log_softmax(-1)[2])), mask[0].tolist()
        (True, [True, True, False, True])
    """
    logits, labels = _check_logits_labels(logits, labels, shift)
    check_int(ignore_index, "ignore_index")
    mask = labels != ignore_index
    vocab = logits.shape[-1]
    checks = start_checks(validate_args, (logits, "logits"))
    if validate_args:
        check_labels(labels, vocab, ignore_index, checks)
    checks.run()
    safe = labels.masked_fill(~mask, 0)
    dtype = compute_dtype(logits.dtype)
    rows = []
    for b in range(logits.shape[0]):
        z = logits[b].to(dtype)
        picked = z.gather(-1, safe[b].unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    out = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=dtype)
    return out.masked_fill(~mask, 0.0), mask


def sequence_log_probs(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    average: bool = False,
    shift: bool = False,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Per-sequence sum (or mean) of the answer-token log-probabilities, in float32.

    .. math::

        \log \pi(y_b \mid x_b) = \sum_{t \in A_b} \log \operatorname{softmax}(z_{bt})_{y_{bt}},
        \qquad A_b = \{t : y_{bt} \ne \text{ignore\_index}\},

    divided by :math:`|A_b|` when ``average`` (SimNPO's length normalisation; 0 for a sequence with no counted
    token).

    Args:
        logits: ``(B, T, V)`` logits.
        labels: ``(B, T)`` labels, prompt and padding set to ``ignore_index``.
        ignore_index: label of positions left out.
        average: divide by the number of counted tokens.
        shift: Hugging Face convention (``labels`` are the input ids; ``logits[:, t]`` predicts ``labels[:, t+1]``).
        validate_args: Check finite logits and labels in the vocabulary (see :func:`token_log_probs`).

    Returns:
        ``(B,)`` float32 tensor.

    Example:
        >>> logits = torch.zeros(1, 3, 4)                    # uniform over 4 tokens
        >>> labels = torch.tensor([[-100, 1, 2]])
        >>> torch.allclose(sequence_log_probs(logits, labels), torch.tensor([2 * math.log(0.25)]))
        True
        >>> torch.allclose(sequence_log_probs(logits, labels, average=True), torch.tensor([math.log(0.25)]))
        True
    """
    if not isinstance(average, bool):
        raise TypeError(f"`average` must be a bool, got {type(average).__name__}.")
    lp, mask = token_log_probs(logits, labels, ignore_index, shift, validate_args=validate_args)
    total = lp.sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1).to(total.dtype)
    return total


def mean_token_probs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = False, *, validate_args: bool = True
) -> Tensor:
    r"""FLAT's per-sequence statistic: the mean over real answer tokens of the probability of each token.

    .. math::

        P_b = \frac{1}{|A_b|} \sum_{t \in A_b} \pi(y_{bt} \mid x_b, y_{b,<t})

    Padding does not count (FLAT's official code divides by the padded length, so its loss scale depends on the
    padding; this does not). A sequence with no counted token gives 0. ``validate_args`` is that of
    :func:`token_log_probs`.

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> float(mean_token_probs(logits, torch.tensor([[-100, 1, 2]])))
        0.25
    """
    lp, mask = token_log_probs(logits, labels, ignore_index, shift, validate_args=validate_args)
    probs = lp.exp() * mask
    return probs.sum(-1) / mask.sum(-1).clamp(min=1).to(probs.dtype)


def token_logprob_statistics(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = False, *, validate_args: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Per-token log-probability, and the mean and standard deviation of :math:`\log p` under the model's own
    next-token distribution, for the min-k%++ membership attack.

    .. math::

        \mu_{bt} = \sum_j p_{btj} \log p_{btj}, \qquad
        \sigma_{bt}^2 = \sum_j p_{btj} (\log p_{btj})^2 - \mu_{bt}^2

    ``validate_args`` is that of :func:`token_log_probs`.

    Returns:
        ``(log_probs, mu, sigma, mask)``, each ``(B, T')`` float32, 0 at ignored positions.

    Example:
        >>> lp, mu, sigma, mask = token_logprob_statistics(torch.zeros(1, 2, 4), torch.tensor([[0, 1]]))
        >>> bool(torch.allclose(mu, lp)), bool((sigma.abs() < 1e-3).all())   # uniform: every token equals the mean
        (True, True)
    """
    lp, mask = token_log_probs(logits, labels, ignore_index, shift, validate_args=validate_args)
    logits, _ = _check_logits_labels(logits, labels, shift)
    mus, sigmas = [], []
    for b in range(logits.shape[0]):
        log_p = torch.log_softmax(logits[b].float(), dim=-1)
        p = log_p.exp()
        mu = (p * log_p).sum(-1)
        var = (p * log_p.square()).sum(-1) - mu.square()
        mus.append(mu)
        sigmas.append(var.clamp(min=0).sqrt())
    mu_t = torch.stack(mus).masked_fill(~mask, 0.0)
    sigma_t = torch.stack(sigmas).masked_fill(~mask, 0.0)
    return lp, mu_t, sigma_t, mask


def truth_ratio(paraphrased_mean_logps: Tensor, perturbed_mean_logps: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""TOFU's truth ratio per question, from mean token log-probabilities of the answers.

    .. math::

        R_b = \exp\Big(\frac{1}{K}\sum_{k=1}^{K} \bar\ell(\tilde y_{bk}) - \bar\ell(\hat y_b)\Big)
            = \frac{\big(\prod_k \bar p(\tilde y_{bk})\big)^{1/K}}{\bar p(\hat y_b)}

    with :math:`\bar\ell` the mean log-probability over an answer's tokens, :math:`\tilde y_{bk}` the perturbed
    (wrong) answers and :math:`\hat y_b` the paraphrased (correct) one. :math:`R < 1` when the model prefers the
    correct answer; a model that cannot tell them apart gives 1.

    Args:
        paraphrased_mean_logps: ``(B,)`` mean token log-probability of each correct answer.
        perturbed_mean_logps: ``(B, K)`` mean token log-probability of each perturbed answer.
        validate_args: Check that both inputs are finite.

    Returns:
        ``(B,)`` float32 ratios.

    Example:
        >>> r = truth_ratio(torch.tensor([-1.0]), torch.tensor([[-2.0, -4.0]]))
        >>> round(float(r), 6) == round(math.exp(-2.0), 6)
        True
    """
    check_tensor(paraphrased_mean_logps, "paraphrased_mean_logps")
    check_tensor(perturbed_mean_logps, "perturbed_mean_logps")
    if perturbed_mean_logps.ndim != 2 or paraphrased_mean_logps.ndim != 1:
        raise ValueError(
            "`perturbed_mean_logps` must be (B, K) and `paraphrased_mean_logps` (B,), got "
            f"{tuple(perturbed_mean_logps.shape)} and {tuple(paraphrased_mean_logps.shape)}."
        )
    if perturbed_mean_logps.shape[0] != paraphrased_mean_logps.shape[0] or perturbed_mean_logps.shape[1] == 0:
        raise ValueError(
            "`perturbed_mean_logps` needs one row per question of `paraphrased_mean_logps` and at least one perturbed "
            f"answer, got {tuple(perturbed_mean_logps.shape)} and {tuple(paraphrased_mean_logps.shape)}."
        )
    start_checks(
        validate_args,
        (paraphrased_mean_logps, "paraphrased_mean_logps"),
        (perturbed_mean_logps, "perturbed_mean_logps"),
    ).run()
    perturbed, paraphrased = as_float32(perturbed_mean_logps, paraphrased_mean_logps)
    return torch.exp(perturbed.mean(-1) - paraphrased).float()


def membership_scores(
    log_probs: Tensor,
    mask: Tensor,
    mu: Tensor | None = None,
    sigma: Tensor | None = None,
    k: float = 0.2,
    *,
    validate_args: bool = True,
) -> dict[str, Tensor]:
    r"""Per-sequence membership-inference scores (higher = more likely a training member).

    * ``"loss"``: mean token log-probability (the negated LOSS attack);
    * ``"min_k"``: mean of the :math:`\lceil k |A| \rceil` lowest token log-probabilities (Min-K% Prob);
    * ``"min_k_plus_plus"``: the same over :math:`(\log p_t - \mu_t)/\sigma_t` (Min-K%++), when ``mu`` and
      ``sigma`` are given.

    Args:
        log_probs: ``(B, T)`` token log-probabilities.
        mask: ``(B, T)`` bool mask of counted tokens.
        mu: optional ``(B, T)`` expected log-probability under the model.
        sigma: optional ``(B, T)`` standard deviation of the log-probability under the model.
        k: fraction of the lowest tokens kept, in ``(0, 1]``.
        validate_args: Check that the log-probabilities (and ``mu``, ``sigma``) are finite at counted tokens.

    ``mu`` and ``sigma`` are given together or not at all.

    Example:
        >>> lp = torch.tensor([[-1.0, -3.0, -2.0, -4.0]])
        >>> s = membership_scores(lp, torch.ones(1, 4, dtype=torch.bool), k=0.5)
        >>> float(s["loss"]), float(s["min_k"])
        (-2.5, -3.5)
    """
    check_hyperparameter(k, "k", validate=False)
    if isinstance(k, Tensor) or not 0 < k <= 1:
        raise ValueError(f"`k` must be a number in (0, 1], got {k!r}.")
    _check_token_mask(log_probs, mask, "log_probs")
    if (mu is None) != (sigma is None):
        raise ValueError("`mu` and `sigma` go together (Min-K%++): pass both or neither.")
    named = [(log_probs, "log_probs")]
    for extra, name in ((mu, "mu"), (sigma, "sigma")):
        if extra is not None:
            check_tensor(extra, name)
            if extra.shape != log_probs.shape:
                raise ValueError(
                    f"`{name}` must have the shape of `log_probs` {tuple(log_probs.shape)}, got {tuple(extra.shape)}."
                )
            named.append((extra, name))
    if validate_args:
        start_checks(True, *[(t.masked_fill(~mask, 0.0), name) for t, name in named]).run()
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("Every sequence needs at least one counted token for membership scores; got an empty one.")
    lengths = counts.to(log_probs.dtype)
    scores = {"loss": (log_probs * mask).sum(-1) / lengths, "min_k": _lowest_mean(log_probs, mask, k)}
    if mu is not None and sigma is not None:
        z = (log_probs - mu) / sigma.clamp(min=1e-6)
        scores["min_k_plus_plus"] = _lowest_mean(z, mask, k)
    return scores


def _lowest_mean(values: Tensor, mask: Tensor, k: float) -> Tensor:
    out = []
    for b in range(values.shape[0]):
        v = values[b][mask[b]]
        n = max(1, math.ceil(k * v.numel()))
        out.append(torch.topk(v, n, largest=False).values.mean())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------------


def _check_vector(t: Tensor, name: str, *, floating: bool = True) -> None:
    check_tensor(t, name, floating=floating)
    if t.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D tensor with one value per sequence, got shape {tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError(f"`{name}` is empty: the batch has no sequence. Pass at least one forget example.")


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str, *, floating_b: bool = True) -> None:
    _check_vector(a, name_a)
    check_tensor(b, name_b, floating=floating_b)
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape (one value per sequence), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )


def _check_pairs(first: tuple[Tensor, str], *others: tuple[Tensor, str]) -> None:
    """:func:`_check_pair` of the first ``(tensor, name)`` with each of the others."""
    for t, name in others:
        _check_pair(first[0], t, first[1], name)


def _check_lengths(lengths: Tensor, name: str, checks: DeferredChecks, validate: bool, *, positive: bool) -> None:
    """Token counts: integer or floating (not bool), finite and ``> 0`` (``>= 0`` unless ``positive``)."""
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"`{name}` must hold token counts (integers), got dtype {lengths.dtype}.")
    if not validate:
        return
    ok = (lengths > 0) if positive else (lengths >= 0)
    if lengths.is_floating_point():
        ok = ok & torch.isfinite(lengths)
    bound = "positive" if positive else "non-negative"

    def error() -> Exception:
        extra = (
            " A forget example whose labels are all masked has nothing to forget: check the prompt masking."
            if positive
            else ""
        )
        return ValueError(f"`{name}` must be {bound} (answer tokens per sequence), got {lengths.tolist()[:8]}.{extra}")

    checks.require(ok.all(), error)


def npo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    beta: float | Tensor = 0.1,
    *,
    lengths: Tensor | None = None,
    length_normalize: bool = False,
    validate_args: bool = True,
) -> Tensor:
    r"""Negative Preference Optimization (Zhang et al., 2024).

    .. math::

        \mathcal{L}_{\mathrm{NPO}} = -\frac{2}{\beta}\,\mathbb{E}\Big[\log \sigma\Big(-\beta
            \log \frac{\pi_\theta(y \mid x)}{\pi_{\mathrm{ref}}(y \mid x)}\Big)\Big]
        = \frac{2}{\beta}\,\mathbb{E}\Big[\operatorname{softplus}\Big(\beta \log
            \frac{\pi_\theta}{\pi_{\mathrm{ref}}}\Big)\Big]

    Its gradient with respect to :math:`\log \pi_\theta` is :math:`2\sigma(\beta \log(\pi_\theta/\pi_{\mathrm{ref}}))
    \in (0, 2)` per sequence (gradient ascent's is 1 but unbounded in effect); as :math:`\beta \to 0` it becomes
    gradient ascent up to a constant.

    **Length normalisation** (``length_normalize=True``, off by default as in the paper and its code): the
    log-ratio is divided by the answer length, :math:`r_b = \log(\pi_\theta(y_b)/\pi_{\mathrm{ref}}(y_b))/|y_b|`,
    as SimNPO normalises its NLL. The reason: the paper's gradient weight :math:`2\sigma(\beta \sum_t
    \log(\pi_\theta/\pi_{\mathrm{ref}})(y_t))` sums the log-ratio over the tokens, so on long answers it vanishes
    after a small per-token change (127 tokens at β = 0.1: 0.0185 after −0.37 nats per token, 2e-9 at the
    level of a model never trained on the answers), and NPO stops far from the retain model; the paper's TOFU
    answers are tens of tokens. With the normalisation the weight is :math:`2\sigma(\beta\,\bar r_b)` of the
    per-token mean log-ratio, the same for every length (each token's gradient is then divided by :math:`|y_b|`, as
    in a token mean). With all lengths 1 it equals plain NPO.

    Args:
        policy_logps: ``(B,)`` sequence log-probabilities of the forget answers under the model being unlearned.
        reference_logps: ``(B,)`` the same under the reference (the model before unlearning); no gradient flows.
        beta: inverse temperature :math:`\beta > 0`, scalar or per sequence.
        lengths: ``(B,)`` answer tokens :math:`|y_b| > 0` (needed with ``length_normalize``).
        length_normalize: divide the log-ratio by ``lengths``.
        validate_args: Check that the log-probabilities are finite, ``lengths`` positive and a tensor ``beta`` is
            finite and positive.

    Returns:
        Scalar loss (batch mean), float32.

    Example:
        >>> ref = torch.tensor([-10.0, -12.0])
        >>> round(float(npo_loss(ref.clone(), ref, beta=0.1)), 4) == round(2 / 0.1 * math.log(2), 4)   # π_θ = π_ref
        True
        >>> float(npo_loss(ref - 1000.0, ref, beta=0.1)) < 1e-6                     # fully forgotten: no loss
        True
        >>> lengths = torch.tensor([4, 4])
        >>> torch.allclose(npo_loss(ref - 4.0, ref, lengths=lengths, length_normalize=True), npo_loss(ref - 1.0, ref))
        True
    """
    _check_pair(policy_logps, reference_logps, "policy_logps", "reference_logps")
    if not isinstance(length_normalize, bool):
        raise TypeError(f"`length_normalize` must be a bool, got {type(length_normalize).__name__}.")
    checks = start_checks(validate_args, (policy_logps, "policy_logps"), (reference_logps, "reference_logps"))
    policy, reference = as_float32(policy_logps, reference_logps.detach())
    ratio = policy - reference
    if length_normalize:
        if lengths is None:
            raise ValueError(
                "`length_normalize=True` divides the log-ratio by the answer lengths: pass `lengths` (answer tokens "
                "per sequence)."
            )
        _check_pair(policy_logps, lengths, "policy_logps", "lengths", floating_b=False)
        _check_lengths(lengths, "lengths", checks, validate_args, positive=True)
        ratio = ratio / lengths.to(ratio.dtype)
    b = hyperparameter_tensor(beta, policy, "beta", positive=True, validate=validate_args, checks=checks)
    checks.run()
    return (2.0 / b * F.softplus(b * ratio)).mean()


def simnpo_loss(
    policy_logps: Tensor,
    lengths: Tensor,
    beta: float | Tensor = 4.5,
    delta: float | Tensor = 0.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""SimNPO (Fan et al., 2024): NPO without a reference model, with length normalisation and a margin.

    .. math::

        \mathcal{L}_{\mathrm{SimNPO}} = -\frac{2}{\beta}\,\mathbb{E}\Big[\log \sigma\Big(\beta\Big(
            \frac{-\log \pi_\theta(y \mid x)}{|y|} - \delta\Big)\Big)\Big]

    Args:
        policy_logps: ``(B,)`` summed answer log-probabilities.
        lengths: ``(B,)`` number of answer tokens :math:`|y|` of each sequence (all > 0).
        beta: :math:`\beta > 0`, scalar or per sequence.
        delta: margin :math:`\delta`, scalar or per sequence.
        validate_args: Check that ``policy_logps`` is finite, ``lengths`` positive and tensor hyperparameters
            finite (``beta`` positive).

    Example:
        >>> logps, lengths = torch.tensor([-8.0, -20.0]), torch.tensor([4, 10])
        >>> # both sequences have the same per-token NLL (2), hence the same loss term
        >>> expected = -2 / 4.5 * torch.nn.functional.logsigmoid(torch.tensor(4.5 * 2.0))
        >>> torch.allclose(simnpo_loss(logps, lengths), expected)
        True
    """
    _check_pair(policy_logps, lengths, "policy_logps", "lengths", floating_b=False)
    checks = start_checks(validate_args, (policy_logps, "policy_logps"))
    _check_lengths(lengths, "lengths", checks, validate_args, positive=True)
    (policy,) = as_float32(policy_logps)
    b = hyperparameter_tensor(beta, policy, "beta", positive=True, validate=validate_args, checks=checks)
    d = hyperparameter_tensor(delta, policy, "delta", validate=validate_args, checks=checks)
    checks.run()
    nll_per_token = -policy / lengths.to(policy.dtype)
    return (-2.0 / b * F.logsigmoid(b * (nll_per_token - d))).mean()


def gradient_ascent_loss(
    forget_logps: Tensor,
    lengths: Tensor | None = None,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Gradient ascent on the forget data: minimise the log-likelihood, i.e. the negated NLL.

    .. math::

        \mathcal{L}_{\mathrm{GA}} = \frac{\sum_b \log \pi_\theta(y_b \mid x_b)}{\sum_b |y_b|}

    (the negated token-mean NLL of the batch; with ``lengths=None`` the per-sequence mean of ``forget_logps``).

    Args:
        forget_logps: ``(B,)`` summed answer log-probabilities of the forget sequences.
        lengths: ``(B,)`` answer tokens per sequence (``>= 0``, at least one in total), or ``None``.
        num_items_in_batch: The number of items of the whole batch (tokens with ``lengths``, sequences without) over
            every micro-batch of the optimizer step and every rank, divided by the factor the gradients are later
            divided by. When given the loss is :math:`\sum_b \log \pi_\theta(y_b \mid x_b) / n_{\text{items}}`,
            so that the micro-batch losses sum to the whole batch's mean; ``None`` divides by this call's items.
        validate_args: Check that ``forget_logps`` is finite and ``lengths`` non-negative.

    Example:
        >>> float(gradient_ascent_loss(torch.tensor([-4.0, -2.0]), torch.tensor([2, 1])))
        -2.0
    """
    return -_token_mean_nll(forget_logps, lengths, "forget_logps", num_items_in_batch, validate_args)


def retain_nll_loss(
    retain_logps: Tensor,
    lengths: Tensor | None = None,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""The retain term of GradDiff / NPO-RT / SimNPO: token-mean negative log-likelihood on retain data.

    .. math::

        \mathcal{L}_{\mathrm{retain}} = -\frac{\sum_b \log \pi_\theta(y_b \mid x_b)}{\sum_b |y_b|}

    With ``num_items_in_batch`` the denominator is that number instead (see below); with ``lengths=None`` it is the
    number of sequences.

    Args:
        retain_logps: ``(B,)`` summed answer log-probabilities of the retain sequences.
        lengths: ``(B,)`` answer tokens per sequence (``>= 0``, at least one in total), or ``None`` (mean over
            sequences).
        num_items_in_batch: The number of items of the whole batch (tokens with ``lengths``, sequences without) over
            every micro-batch of the optimizer step and every rank, divided by the factor the gradients are later
            divided by: the loss is then :math:`-\sum_b \log \pi_\theta(y_b \mid x_b) / n_{\text{items}}`, and the
            micro-batch losses sum to the token mean of the whole batch. ``None`` divides by this call's items.
        validate_args: Check that ``retain_logps`` is finite and ``lengths`` non-negative.

    Example:
        >>> float(retain_nll_loss(torch.tensor([-4.0, -2.0]), torch.tensor([2, 1])))
        2.0
    """
    return _token_mean_nll(retain_logps, lengths, "retain_logps", num_items_in_batch, validate_args)


def _token_mean_nll(
    logps: Tensor, lengths: Tensor | None, name: str, num_items_in_batch: NumItems, validate_args: bool
) -> Tensor:
    """``-Σ logps / Σ lengths`` (``/ B`` without lengths, ``/ num_items_in_batch`` when given)."""
    _check_vector(logps, name)
    check_num_items(num_items_in_batch, validate=False)
    checks = start_checks(validate_args, (logps, name))
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    (values,) = as_float32(logps)
    if lengths is None:
        checks.run()
        return -divide_by_items(values.sum(), values.shape[0], num_items_in_batch)
    _check_pair(logps, lengths, name, "lengths", floating_b=False)
    _check_lengths(lengths, "lengths", checks, validate_args, positive=False)
    total = lengths.sum()
    if num_items_in_batch is None and validate_args:
        checks.require(
            total > 0,
            lambda: ValueError(
                "The batch has no counted token (`lengths` sums to 0: every label is ignore_index): nothing to "
                "average over."
            ),
        )
    checks.run()
    return -divide_by_items(values.sum(), total, num_items_in_batch)


def retain_kl_loss(
    policy_logits: Tensor,
    reference_logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    shift: bool = False,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""The retain term of NPO-KL / GradDiff-KL: :math:`\mathrm{KL}(\pi_{\mathrm{ref}} \,\|\, \pi_\theta)` per token,
    averaged over the counted (non-padding) positions only.

    .. math::

        \mathcal{L}_{\mathrm{KL}} = \frac{1}{|A|} \sum_{(b,t) \in A} \sum_j
            p^{\mathrm{ref}}_{btj} \big(\log p^{\mathrm{ref}}_{btj} - \log p^{\theta}_{btj}\big)

    Computed in float32 (float64 for float64 logits, and returned in that dtype).

    Args:
        policy_logits: ``(B, T, V)`` logits of the model being unlearned.
        reference_logits: ``(B, T, V)`` logits of the reference model (no gradient flows).
        labels: ``(B, T)`` labels; positions equal to ``ignore_index`` do not count.
        ignore_index: Label of positions left out.
        shift: Hugging Face causal-LM convention (``logits[:, t]`` predicts ``labels[:, t + 1]``).
        num_items_in_batch: The number of counted positions of the whole batch (every micro-batch of the optimizer
            step on every rank, divided by the factor the gradients are later divided by). When given, :math:`|A|`
            above is replaced by it, so that the micro-batch losses sum to the token mean of the whole batch (a
            micro-batch with no counted position then gives 0); ``None`` divides by this call's :math:`|A|`.
        validate_args: Check that both logits are finite.

    Example:
        >>> z = torch.randn(2, 3, 5)
        >>> float(retain_kl_loss(z, z, torch.zeros(2, 3, dtype=torch.long)))
        0.0
    """
    check_tensor(policy_logits, "policy_logits")
    check_tensor(reference_logits, "reference_logits")
    check_same_shape(policy_logits, reference_logits, "policy_logits", "reference_logits")
    check_int(ignore_index, "ignore_index")
    check_num_items(num_items_in_batch, validate=False)
    policy_logits, labels_s = _check_logits_labels(policy_logits, labels, shift, "policy_logits")
    reference_logits, _ = _check_logits_labels(reference_logits, labels, shift, "reference_logits")
    checks = start_checks(validate_args, (policy_logits, "policy_logits"), (reference_logits, "reference_logits"))
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    checks.run()
    mask = labels_s != ignore_index
    n = int(mask.sum())
    if n == 0 and num_items_in_batch is None:
        raise ValueError("The retain batch has no counted token (every label is ignore_index): nothing to average.")
    dtype = compute_dtype(policy_logits.dtype)
    total = policy_logits.new_zeros((), dtype=dtype)
    for b in range(policy_logits.shape[0]):
        rows = mask[b]
        if not bool(rows.any()):
            continue
        log_p = torch.log_softmax(policy_logits[b][rows].to(dtype), dim=-1)
        log_r = torch.log_softmax(reference_logits[b][rows].detach().to(dtype), dim=-1)
        total = total + kl_from_log_probs(log_r, log_p, dim=None)
    return divide_by_items(total, n, num_items_in_batch)


def idk_dpo_loss(
    policy_idk_logps: Tensor,
    reference_idk_logps: Tensor,
    policy_forget_logps: Tensor,
    reference_forget_logps: Tensor,
    beta: float | Tensor = 0.1,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""IdkDPO: DPO preferring an "I don't know" answer to the forget answer.

    .. math::

        \mathcal{L} = -\frac{2}{\beta}\,\mathbb{E}\Big[\log\sigma\Big(\beta\Big[\log\frac{\pi_\theta(y_{\mathrm{idk}})}
            {\pi_{\mathrm{ref}}(y_{\mathrm{idk}})} - \log\frac{\pi_\theta(y_f)}{\pi_{\mathrm{ref}}(y_f)}\Big]\Big)\Big]

    ``validate_args`` checks that the four log-probability vectors are finite and a tensor ``beta`` is positive.

    Example:
        >>> z = torch.tensor([-5.0])
        >>> torch.allclose(idk_dpo_loss(z, z, z, z, beta=0.5), torch.tensor(2 / 0.5 * math.log(2)))
        True
    """
    named = (
        (policy_idk_logps, "policy_idk_logps"),
        (reference_idk_logps, "reference_idk_logps"),
        (policy_forget_logps, "policy_forget_logps"),
        (reference_forget_logps, "reference_forget_logps"),
    )
    _check_pairs(*named)
    checks = start_checks(validate_args, *named)
    policy_idk, reference_idk, policy_forget, reference_forget = as_float32(
        policy_idk_logps, reference_idk_logps.detach(), policy_forget_logps, reference_forget_logps.detach()
    )
    win, lose = policy_idk - reference_idk, policy_forget - reference_forget
    b = hyperparameter_tensor(beta, win, "beta", positive=True, validate=validate_args, checks=checks)
    checks.run()
    return (-2.0 / b * F.logsigmoid(b * (win - lose))).mean()


def _flat_functions(divergence: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(g, f* ∘ g)`` of the f-divergence (both take the raw input :math:`x`)."""
    if not isinstance(divergence, str):
        raise ValueError(f"`divergence` must be one of {', '.join(FLAT_DIVERGENCES)}, got {divergence!r}.")
    if divergence not in FLAT_DIVERGENCES:
        raise ValueError(
            f"Unknown f-divergence {divergence!r} for `divergence`: expected one of {', '.join(FLAT_DIVERGENCES)}."
        )
    if divergence == "kl":
        return (lambda x: x), (lambda x: torch.exp(x - 1))
    if divergence == "reverse_kl":
        return (lambda x: -torch.exp(x)), (lambda x: -1 - x)
    if divergence == "pearson":
        return (lambda x: x), (lambda x: x.square() / 4 + x)
    if divergence == "tv":
        return (lambda x: torch.tanh(x) / 2), (lambda x: torch.tanh(x) / 2)
    if divergence == "js":
        return (lambda x: _LOG2 - F.softplus(-x)), (lambda x: F.softplus(x) - _LOG2)
    if divergence == "hellinger":
        return (lambda x: 1 - torch.exp(x)), (lambda x: (1 - torch.exp(x)) * torch.exp(-x))
    raise ValueError(f"Unknown f-divergence {divergence!r}: expected one of {', '.join(FLAT_DIVERGENCES)}.")


def flat_variational_pair(
    x: Tensor, divergence: Divergence = "tv", *, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    r"""The activation :math:`g(x)` and the conjugate term :math:`f^*(g(x))` of an f-divergence (FLAT, Table 1).

    ============== ======================== ==========================
    divergence     :math:`g(x)`             :math:`f^*(g(x))`
    ============== ======================== ==========================
    ``kl``         :math:`x`                :math:`e^{x-1}`
    ``reverse_kl`` :math:`-e^{x}`           :math:`-1-x`
    ``pearson``    :math:`x`                :math:`x^2/4 + x`
    ``tv``         :math:`\tanh(x)/2`       :math:`\tanh(x)/2`
    ``js``         :math:`\log 2 - \operatorname{softplus}(-x)` :math:`\operatorname{softplus}(x) - \log 2`
    ``hellinger``  :math:`1 - e^{x}`        :math:`(1 - e^{x})/e^{x}`
    ============== ======================== ==========================

    ``validate_args`` checks that ``x`` is finite (one host synchronisation); ``False`` skips it.

    Example:
        >>> g, conj = flat_variational_pair(torch.tensor([0.0]), "kl")
        >>> float(g), round(float(conj), 4)
        (0.0, 0.3679)
    """
    g, conj = _flat_functions(divergence)
    check_tensor(x, "x")
    start_checks(validate_args, (x, "x")).run()
    return g(x), conj(x)


def flat_loss(
    forget_probs: Tensor, template_probs: Tensor, divergence: Divergence = "tv", *, validate_args: bool = True
) -> Tensor:
    r"""FLAT (Wang et al., 2025): loss adjustment with only forget data, through an f-divergence's variational form.

    With :math:`P_f` and :math:`P_g` the mean token probabilities (:func:`mean_token_probs`) of the forget answer and
    of a template ("good", e.g. refusal) answer for the same prompt,

    .. math::

        \mathcal{L}_{\mathrm{FLAT}} = \mathbb{E}\big[-g(P_g) + f^*(g(P_f))\big],

    the negated variational lower bound of :math:`D_f(\text{good} \,\|\, \text{forget})`. For the divergences
    whose activation :math:`g` increases (``kl``, ``pearson``, ``tv``, ``js``) minimising it raises the template
    answer's probability and lowers the forget answer's. ``reverse_kl`` and ``hellinger`` have decreasing
    activations (:math:`-e^x`, :math:`1-e^x`, as in f-GAN's table), so with the probabilities as input they push
    the other way; use them only to reproduce the paper's ablation.

    Args:
        forget_probs: ``(B,)`` mean token probabilities of the forget answers, in ``[0, 1]``.
        template_probs: ``(B,)`` mean token probabilities of the template answers.
        divergence: one of ``"kl"``, ``"reverse_kl"``, ``"pearson"``, ``"tv"`` (default), ``"js"``, ``"hellinger"``.
        validate_args: Check that both inputs are probabilities (finite, in ``[0, 1]``).

    Example:
        >>> p = torch.tensor([0.3, 0.6])
        >>> float(flat_loss(p, p, "tv"))           # identical answers: the TV bound is 0
        0.0
        >>> high, low = torch.tensor([0.9]), torch.tensor([0.1])
        >>> bool(flat_loss(high, low) > flat_loss(low, high))   # remembering the forget answer costs more
        True
    """
    _check_pair(forget_probs, template_probs, "forget_probs", "template_probs")
    g, conj = _flat_functions(divergence)
    pf, pg = as_float32(forget_probs, template_probs)
    if validate_args:
        inside = ((pf >= 0) & (pf <= 1)).all() & ((pg >= 0) & (pg <= 1)).all()  # False for NaN too
        if not bool(inside):
            raise ValueError(
                "`forget_probs` and `template_probs` must be probabilities in [0, 1] (mean token probabilities "
                "from `mean_token_probs`), not log-probabilities, and finite."
            )
    return (-g(pg) + conj(pf)).mean()


# --------------------------------------------------------------------------------------------------------------------
# Token-level and representation methods (open-unlearning's WGA, SatImp, CE-U, UNDIAL, RMU) and AltPO
# --------------------------------------------------------------------------------------------------------------------


def _check_token_mask(values: Tensor, mask: Tensor, name: str) -> None:
    """``values`` a ``(B, T)`` floating-point tensor named ``name`` and ``mask`` the bool mask of its counted tokens."""
    check_tensor(values, name)
    check_tensor(mask, "mask", floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor of counted tokens, got dtype {mask.dtype}. Pass `mask.bool()`.")
    if values.ndim != 2 or mask.shape != values.shape:
        raise ValueError(
            f"`{name}` and `mask` must both have shape (B, T), got {tuple(values.shape)} and {tuple(mask.shape)}."
        )


def _check_token_pair(token_logps: Tensor, mask: Tensor) -> None:
    _check_token_mask(token_logps, mask, "token_logps")
    if token_logps.shape[0] == 0:
        raise ValueError("`token_logps` is empty: the batch has no sequence. Pass at least one forget example.")


def _weighted_ascent(
    token_logps: Tensor,
    mask: Tensor,
    weight: Callable[[Tensor], Tensor],
    num_items_in_batch: NumItems,
    checks: DeferredChecks,
    validate_args: bool,
) -> Tensor:
    """``Σ_A sg(w(p)) · log p / |A|`` (or ``/ num_items_in_batch``): weighted gradient ascent over answer tokens."""
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    if validate_args:
        checks.require(
            (token_logps.detach().masked_fill(~mask, 0.0) <= 0).all(),
            lambda: ValueError("`token_logps` must be log-probabilities (<= 0) at the counted tokens."),
        )
        if num_items_in_batch is None:
            checks.require(
                mask.any(), lambda: ValueError("`mask` counts no token: the batch has no answer token to forget.")
            )
    checks.run()
    (lp,) = as_float32(token_logps)
    lp = lp.masked_fill(~mask, 0.0)
    w = weight(lp.detach().exp()).masked_fill(~mask, 0.0)
    return divide_by_items((w * lp).sum(), mask.sum(), num_items_in_batch)


def wga_loss(
    token_logps: Tensor,
    mask: Tensor,
    beta: float | Tensor = 1.0,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Weighted gradient ascent (WGA, Wang et al., 2025): gradient ascent with each answer token weighted by its
    own (detached) probability to the power :math:`\beta`.

    .. math::

        \mathcal{L}_{\mathrm{WGA}} = \frac{1}{|A|} \sum_{(b,t) \in A} \operatorname{sg}\big(p_{bt}^{\beta}\big)
            \log p_{bt}, \qquad p_{bt} = \pi_\theta(y_{bt} \mid x_b, y_{b,<t})

    (the negated weighted token NLL, averaged over the answer tokens :math:`A` of the whole batch). Tokens the model
    has already forgotten (:math:`p \to 0`) stop contributing, which bounds the ascent; :math:`\beta = 0` is plain
    gradient ascent. As open-unlearning computes it (``src/trainer/unlearn/wga.py``, ``compute_wga_loss`` in
    ``src/trainer/utils.py``): the weight carries no gradient (``.detach()``) and the mean runs over the answer
    tokens of the whole batch (a token mean, not a mean of per-sequence means); where the paper's notation leaves
    the weight's gradient and the reduction implicit, this follows the code.

    Args:
        token_logps: ``(B, T)`` per-token log-probabilities of the forget answers (:func:`token_log_probs`).
        mask: ``(B, T)`` bool mask of the answer tokens.
        beta: weight exponent :math:`\beta \ge 0`, scalar or per sequence (default 1, open-unlearning's).
        num_items_in_batch: the answer tokens of the whole optimizer step (see :func:`gradient_ascent_loss`);
            ``None``: this call's.
        validate_args: Check finite log-probabilities ``<= 0``, at least one counted token and a valid ``beta``.

    Example:
        >>> lp, mask = torch.log(torch.tensor([[0.5, 0.25]])), torch.tensor([[True, True]])
        >>> torch.allclose(wga_loss(lp, mask, beta=1.0), (0.5 * lp[0, 0] + 0.25 * lp[0, 1]) / 2)
        True
    """
    _check_token_pair(token_logps, mask)
    checks = start_checks(validate_args, (token_logps.masked_fill(~mask, 0.0), "token_logps"))
    b = hyperparameter_tensor(beta, token_logps, "beta", low=0.0, validate=validate_args, checks=checks)
    return _weighted_ascent(token_logps, mask, lambda p: p.pow(b), num_items_in_batch, checks, validate_args)


def satimp_loss(
    token_logps: Tensor,
    mask: Tensor,
    beta1: float | Tensor = 5.0,
    beta2: float | Tensor = 1.0,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""SatImp (Yang et al., 2025): gradient ascent with each answer token weighted by saturation
    :math:`p^{\beta_1}` times importance :math:`(1 - p)^{\beta_2}` (both detached).

    .. math::

        \mathcal{L}_{\mathrm{SatImp}} = \frac{1}{|A|} \sum_{(b,t) \in A}
            \operatorname{sg}\big(p_{bt}^{\beta_1} (1 - p_{bt})^{\beta_2}\big) \log p_{bt}

    The weight is small both for tokens already forgotten (:math:`p \to 0`) and for tokens the model is certain of
    (:math:`p \to 1`), and peaks at :math:`p = \beta_1/(\beta_1 + \beta_2)`. As open-unlearning computes it
    (``src/trainer/unlearn/satimp.py``, ``compute_satimp_loss`` in ``src/trainer/utils.py``): detached weights, mean
    over the answer tokens of the whole batch; where the paper leaves these implicit, this follows the code.
    :math:`\beta_2 = 0` is :func:`wga_loss`.

    Args:
        token_logps: ``(B, T)`` per-token log-probabilities of the forget answers.
        mask: ``(B, T)`` bool mask of the answer tokens.
        beta1: saturation exponent :math:`\beta_1 \ge 0` (default 5, open-unlearning's).
        beta2: importance exponent :math:`\beta_2 \ge 0` (default 1).
        num_items_in_batch: the answer tokens of the whole optimizer step; ``None``: this call's.
        validate_args: as for :func:`wga_loss`.

    Example:
        >>> lp, mask = torch.log(torch.tensor([[0.5]])), torch.tensor([[True]])
        >>> torch.allclose(satimp_loss(lp, mask, beta1=1.0, beta2=1.0), 0.5 * 0.5 * lp[0, 0])
        True
    """
    _check_token_pair(token_logps, mask)
    checks = start_checks(validate_args, (token_logps.masked_fill(~mask, 0.0), "token_logps"))
    b1 = hyperparameter_tensor(beta1, token_logps, "beta1", low=0.0, validate=validate_args, checks=checks)
    b2 = hyperparameter_tensor(beta2, token_logps, "beta2", low=0.0, validate=validate_args, checks=checks)
    return _weighted_ascent(
        token_logps, mask, lambda p: p.pow(b1) * (1 - p).pow(b2), num_items_in_batch, checks, validate_args
    )


def ceu_target_labels(labels: Tensor, ignore_index: int = -100, shift: bool = False, ignore_first: int = 1) -> Tensor:
    """The labels CE-U trains on: ``labels`` with the first ``ignore_first`` answer tokens of each row masked, then
    shifted when ``shift`` (as open-unlearning's ``compute_batch_ceu`` does, before its shift).

    Example:
        >>> ceu_target_labels(torch.tensor([[-100, 5, 6, 7]]), ignore_first=1).tolist()
        [[-100, -100, 6, 7]]
    """
    check_int(ignore_first, "ignore_first", low=0)
    counted = labels != ignore_index
    first = (counted.cumsum(-1) <= ignore_first) & counted
    out = labels.masked_fill(first, ignore_index)
    return out[:, 1:] if shift else out


def ceu_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    shift: bool = False,
    ignore_first: int = 1,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""CE-U, cross-entropy unlearning (Yang et al., 2025): cross-entropy toward the model's own next-token
    distribution with the answer token removed.

    .. math::

        q_{btj} = \frac{\operatorname{sg}(p_{btj})\,[j \ne y_{bt}]}{1 - \operatorname{sg}(p_{bt y_{bt}})}, \qquad
        \mathcal{L}_{\mathrm{CE\text{-}U}} = -\frac{1}{|A|} \sum_{(b,t) \in A} \sum_j q_{btj} \log p_{btj}

    i.e. :math:`q = \operatorname{softmax}(z)` of the detached logits with :math:`z_y = -\infty`. Its gradient in
    the logits is :math:`p - q`: it lowers the answer token and leaves the ranking of the others as it was, with no
    unbounded ascent. As open-unlearning computes it (``src/trainer/unlearn/ceu.py``): the mean over the counted
    positions, the first ``ignore_first`` answer tokens of each sequence left out (the paper's footnote: the first
    answer token often carries no knowledge); this follows that code (:func:`ceu_target_labels`).

    Args:
        logits: ``(B, T, V)`` logits, ``V >= 2``.
        labels: ``(B, T)`` labels, prompt and padding at ``ignore_index``.
        ignore_index: label of positions left out.
        shift: Hugging Face causal-LM convention (``logits[:, t]`` predicts ``labels[:, t + 1]``).
        ignore_first: answer tokens left out at the start of each sequence (default 1).
        num_items_in_batch: the counted positions of the whole optimizer step; ``None``: this call's.
        validate_args: Check finite logits and labels in the vocabulary.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0, 0.0]]])
        >>> q = torch.tensor([0.0, 0.5, 0.5])                         # the answer token 0 removed
        >>> expected = -(q * z[0, 0].log_softmax(-1)).sum()
        >>> torch.allclose(ceu_loss(z, torch.tensor([[0]]), ignore_first=0), expected)
        True
    """
    check_int(ignore_index, "ignore_index")
    check_int(ignore_first, "ignore_first", low=0)
    _check_logits_labels(logits, labels, shift)
    if logits.shape[-1] < 2:
        raise ValueError(f"CE-U needs a vocabulary of at least 2 tokens, got `logits` of shape {tuple(logits.shape)}.")
    target = ceu_target_labels(labels, ignore_index, shift, ignore_first)
    z = logits[:, :-1] if shift else logits
    mask = target != ignore_index
    checks = start_checks(validate_args, (logits, "logits"))
    if validate_args:
        check_labels(target, logits.shape[-1], ignore_index, checks)
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    checks.run()
    rows = z[mask].to(compute_dtype(z.dtype))
    y = target[mask].unsqueeze(-1)
    log_p = torch.log_softmax(rows, dim=-1)
    q = torch.softmax(rows.detach().scatter(-1, y, float("-inf")), dim=-1)
    return divide_by_items(-(q * log_p).sum(), mask.sum(), num_items_in_batch)


def undial_loss(
    logits: Tensor,
    reference_logits: Tensor,
    labels: Tensor,
    gamma: float | Tensor = 10.0,
    ignore_index: int = -100,
    shift: bool = False,
    *,
    num_items_in_batch: NumItems = None,
    validate_args: bool = True,
) -> Tensor:
    r"""UNDIAL (Dong et al., 2024): self-distillation toward the reference model's logits with the answer token's
    logit lowered by :math:`\gamma`.

    .. math::

        q_{bt} = \operatorname{softmax}\big(z^{\mathrm{ref}}_{bt} - \gamma\, e_{y_{bt}}\big), \qquad
        \mathcal{L}_{\mathrm{UNDIAL}} = -\frac{1}{|A|} \sum_{(b,t) \in A} \sum_j q_{btj} \log p^{\theta}_{btj}

    The cross-entropy to the adjusted teacher; it differs from :math:`\mathrm{KL}(q \,\|\, p^\theta)` by the
    teacher's entropy, a constant, so the gradients are those of the KL, and with :math:`\gamma = 0` it is
    self-distillation toward the reference. The target is a fixed distribution (no gradient through the reference),
    so unlike gradient ascent the loss is bounded below.

    Paper and code: open-unlearning (``compute_undial_loss`` in ``src/trainer/utils.py``; strength named ``beta``,
    10 in ``configs/trainer/UNDIAL.yaml``) averages over every position of the padded batch, prompt and padding
    included, and writes the adjustment at index ``labels`` even where the label is −100 (the 100th-last vocabulary
    entry). Here the mean runs over the answer tokens only and masked positions are left out, so the loss does not
    depend on padding; on fully labelled sequences the two agree.

    Args:
        logits: ``(B, T, V)`` logits of the model being unlearned.
        reference_logits: ``(B, T, V)`` logits of the reference model (no gradient flows).
        labels: ``(B, T)`` labels, prompt and padding at ``ignore_index``.
        gamma: adjustment strength :math:`\gamma \ge 0`, scalar or per sequence.
        ignore_index: label of positions left out.
        shift: Hugging Face causal-LM convention.
        num_items_in_batch: the answer tokens of the whole optimizer step; ``None``: this call's.
        validate_args: Check finite logits, labels in the vocabulary and a valid ``gamma``.

    Example:
        >>> z = torch.randn(1, 3, 5)
        >>> y = torch.tensor([[1, 2, 3]])
        >>> kl_plus_entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean()   # γ = 0, policy = reference
        >>> torch.allclose(undial_loss(z, z, y, gamma=0.0), kl_plus_entropy)
        True
    """
    check_int(ignore_index, "ignore_index")
    z, target = _check_logits_labels(logits, labels, shift)
    check_tensor(reference_logits, "reference_logits")
    check_same_shape(logits, reference_logits, "logits", "reference_logits")
    z_ref = reference_logits[:, :-1] if shift else reference_logits
    mask = target != ignore_index
    checks = start_checks(validate_args, (logits, "logits"), (reference_logits, "reference_logits"))
    if validate_args:
        check_labels(target, logits.shape[-1], ignore_index, checks)
    check_num_items(num_items_in_batch, checks=checks, validate=validate_args)
    dtype = compute_dtype(z.dtype)
    g = hyperparameter_tensor(
        gamma,
        z,
        "gamma",
        low=0.0,
        dtype=dtype,
        layout="position",
        lead_shape=mask.shape,
        validate=validate_args,
        checks=checks,
    )
    checks.run()
    y = target[mask].unsqueeze(-1)
    log_p = torch.log_softmax(z[mask].to(dtype), dim=-1)
    adjusted = z_ref[mask].detach().to(dtype).scatter_add(-1, y, -g[mask].detach().unsqueeze(-1))
    q = torch.softmax(adjusted, dim=-1)
    return divide_by_items(-(q * log_p).sum(), mask.sum(), num_items_in_batch)


def rmu_control_vector(
    dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    r"""RMU's fixed random direction :math:`u`: entries drawn uniformly from :math:`[0, 1)`, scaled to unit norm.

    Drawn from a generator seeded with ``seed`` (not the global one), so every process of a distributed run and every
    resumed run draws the same :math:`u` (open-unlearning draws it from the global generator at the first step).

    Example:
        >>> u = rmu_control_vector(8, seed=3)
        >>> round(float(u.norm()), 5), bool((u >= 0).all()), torch.equal(u, rmu_control_vector(8, seed=3))
        (1.0, True, True)
    """
    check_int(dim, "dim", low=1)
    check_int(seed, "seed")
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).to(dtype=dtype, device=device)


def rmu_loss(activations: Tensor, target: Tensor, mask: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""RMU's activation loss (Li et al., 2024, WMDP): the mean squared distance of a layer's activations to a target.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_b \frac{1}{|A_b|} \sum_{t \in A_b} \frac{1}{D} \big\lVert h_{bt} -
            \tau_{bt} \big\rVert_2^2

    with :math:`h` the activations ``(B, T, D)`` at the chosen layer and :math:`A_b` the positions of ``mask``. The
    forget term takes :math:`\tau = c\,u` (:func:`rmu_control_vector` scaled by the steering coefficient :math:`c`),
    the retain term the frozen model's activations on the retain batch. As open-unlearning computes it
    (``compute_activation_loss`` in ``src/trainer/unlearn/rmu.py``): mean over the hidden dimension, token mean per
    sequence over the answer positions, then the batch mean; the paper (and the WMDP code) write the squared norm
    (a factor :math:`D`, absorbed by :math:`c` and the weights) over every token of the forget text. This follows
    open-unlearning.

    Args:
        activations: ``(B, T, D)`` activations of the model being unlearned.
        target: a tensor broadcastable to ``activations``: ``(D,)`` (the scaled control vector) or ``(B, T, D)``;
            no gradient flows into it.
        mask: ``(B, T)`` bool mask of the positions that count (each sequence needs one).
        validate_args: Check finite activations and target, and that each sequence has a counted position.

    Example:
        >>> h = torch.zeros(1, 2, 4)
        >>> float(rmu_loss(h, torch.full((4,), 2.0), torch.tensor([[True, False]])))
        4.0
    """
    check_tensor(activations, "activations")
    check_tensor(target, "target")
    check_tensor(mask, "mask", floating=False)
    if activations.ndim != 3:
        raise ValueError(f"`activations` must have shape (B, T, D), got {tuple(activations.shape)}.")
    if mask.dtype != torch.bool or mask.shape != activations.shape[:2]:
        raise ValueError(
            f"`mask` must be a bool tensor of shape (B, T) = {tuple(activations.shape[:2])}, got dtype {mask.dtype} "
            f"and shape {tuple(mask.shape)}."
        )
    try:
        torch.broadcast_shapes(target.shape, activations.shape)
    except RuntimeError:
        raise ValueError(
            f"`target` of shape {tuple(target.shape)} does not broadcast to the activations' "
            f"{tuple(activations.shape)}: pass (D,) or (B, T, D)."
        ) from None
    if activations.shape[0] == 0:
        raise ValueError("`activations` is empty: the batch has no sequence.")
    checks = start_checks(validate_args, (activations, "activations"), (target, "target"))
    counts = mask.sum(-1)
    if validate_args:
        checks.require(
            (counts > 0).all(),
            lambda: ValueError(f"Every sequence needs a counted position in `mask`, got counts {counts.tolist()[:8]}."),
        )
    checks.run()
    h, tau = as_float32(activations, target.detach())
    per_position = (h - tau).square().mean(-1) * mask
    return (per_position.sum(-1) / counts.clamp(min=1).to(per_position.dtype)).mean()


def altpo_loss(
    policy_alternate_logps: Tensor,
    reference_alternate_logps: Tensor,
    policy_forget_logps: Tensor,
    reference_forget_logps: Tensor,
    beta: float | Tensor = 0.1,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""AltPO (Mekala et al., 2025): DPO with a plausible alternate answer preferred to the forget answer.

    .. math::

        \mathcal{L}_{\mathrm{AltPO}} = -\frac{2}{\beta}\,\mathbb{E}\Big[\log\sigma\Big(\beta\Big[
            \log\frac{\pi_\theta(\tilde y)}{\pi_{\mathrm{ref}}(\tilde y)}
            - \log\frac{\pi_\theta(y_f)}{\pi_{\mathrm{ref}}(y_f)}\Big]\Big)\Big]

    The formula of :func:`idk_dpo_loss` with an alternate answer :math:`\tilde y` (generated to be plausible but
    wrong) instead of a refusal. As the official code (molereddy/Alternate-Preference-Optimization,
    ``dataloader.py``, loss ``"dpo"`` with the alternate dataset) and open-unlearning's ``DPO`` trainer
    (``src/trainer/unlearn/dpo.py``, ``compute_dpo_loss``) compute it: summed answer log-probabilities, a batch mean
    over (alternate, forget) pairs. The paper averages over several alternates per question; the official code does
    so by repeating each forget example once per alternate (``augment_k``), which is what a batch of such pairs
    gives here.

    Example:
        >>> z = torch.tensor([-4.0])
        >>> torch.allclose(altpo_loss(z, z, z, z, beta=0.5), torch.tensor(2 / 0.5 * math.log(2)))
        True
    """
    _check_pairs(
        (policy_alternate_logps, "policy_alternate_logps"),
        (reference_alternate_logps, "reference_alternate_logps"),
        (policy_forget_logps, "policy_forget_logps"),
        (reference_forget_logps, "reference_forget_logps"),
    )
    return idk_dpo_loss(
        policy_alternate_logps,
        reference_alternate_logps,
        policy_forget_logps,
        reference_forget_logps,
        beta,
        validate_args=validate_args,
    )

"""Unlearning losses against plain-Python references, closed forms and limits; loss modules; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses import get_hyperparameter, set_hyperparameter
from lightning_losses.functional.chunked import linear_sequence_log_probs
from lightning_losses.functional.unlearning import (
    FLAT_DIVERGENCES,
    flat_loss,
    flat_variational_pair,
    gradient_ascent_loss,
    idk_dpo_loss,
    mean_token_probs,
    membership_scores,
    npo_loss,
    retain_kl_loss,
    retain_nll_loss,
    sequence_log_probs,
    simnpo_loss,
    token_logprob_statistics,
)
from lightning_losses.losses.unlearning import FLATLoss, GradientAscentLoss, IdkDPOLoss, NPOLoss, SimNPOLoss


def _naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Explicit loops in float64 Python math: log softmax of each counted label."""
    out = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(logits.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            z = [float(v) for v in logits[b, t]]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            row.append(z[y] - lse)
        out.append(row)
    return out


@pytest.fixture
def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, 0] = -100
    return logits, labels


def test_sequence_log_probs_matches_loops(lm_batch):
    logits, labels = lm_batch
    naive = _naive_token_logps(logits, labels)
    total = sequence_log_probs(logits, labels)
    mean = sequence_log_probs(logits, labels, average=True)
    for b, row in enumerate(naive):
        assert total[b].item() == pytest.approx(sum(row), abs=1e-4)
        assert mean[b].item() == pytest.approx(sum(row) / len(row), abs=1e-5)
    assert total.dtype == torch.float32


def test_sequence_log_probs_shift_and_bf16(lm_batch):
    logits, labels = lm_batch
    shifted = sequence_log_probs(logits, labels, shift=True)
    manual = sequence_log_probs(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(shifted, manual)
    low = sequence_log_probs(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sequence_log_probs(logits.bfloat16().float(), labels))


def test_sequence_log_probs_gradient_matches_log_softmax(lm_batch):
    logits, labels = lm_batch
    a = logits.clone().requires_grad_(True)
    sequence_log_probs(a, labels).sum().backward()
    b = logits.clone().requires_grad_(True)
    lsm = torch.log_softmax(b, -1)
    mask = labels != -100
    lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_sequence_log_probs_agrees_with_chunked_path():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, :2] = -100
    torch.testing.assert_close(
        sequence_log_probs(hidden @ weight.T, labels, shift=True),
        linear_sequence_log_probs(hidden, weight, labels, shift=True, chunk_size=3),
    )


def test_mean_token_probs_ignores_padding(lm_batch):
    logits, labels = lm_batch
    naive = _naive_token_logps(logits, labels)
    p = mean_token_probs(logits, labels)
    for b, row in enumerate(naive):
        assert p[b].item() == pytest.approx(sum(math.exp(v) for v in row) / len(row), abs=1e-6)
    # more padding after the answer does not change the statistic
    padded_logits = torch.cat([logits, torch.randn(3, 4, 11)], dim=1)
    padded_labels = torch.cat([labels, torch.full((3, 4), -100)], dim=1)
    torch.testing.assert_close(mean_token_probs(padded_logits, padded_labels), p)


def _npo_reference(policy: list[float], reference: list[float], beta: float) -> float:
    vals = [-(2 / beta) * math.log(1 / (1 + math.exp(-beta * (r - p)))) for p, r in zip(policy, reference)]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 5.0])
def test_npo_value_and_gradient(beta):
    policy = torch.tensor([-12.0, -7.5, -30.0, -3.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-10.0, -9.0, -25.0, -3.0], dtype=torch.float64)
    loss = npo_loss(policy, reference, beta)
    assert loss.item() == pytest.approx(_npo_reference(policy.tolist(), reference.tolist(), beta), rel=1e-6)
    loss.backward()
    # d/dlogπ of (2/β)·softplus(β(logπ − logπ_ref)) / N = 2σ(β(logπ − logπ_ref)) / N
    for i, (p, r) in enumerate(zip(policy.tolist(), reference.tolist())):
        expected = 2 / (1 + math.exp(-beta * (p - r))) / 4
        assert policy.grad[i].item() == pytest.approx(expected, rel=1e-5)


def test_npo_gradient_weight_bounded_by_two():
    policy = torch.linspace(-50, 50, 101, requires_grad=True)
    npo_loss(policy, torch.zeros(101), beta=0.3).backward()
    weights = policy.grad * 101
    assert bool((weights > 0).all()) and bool((weights < 2).all())
    assert weights.max().item() > 1.99  # the bound is approached when π_θ ≫ π_ref


def test_npo_limits():
    ref = torch.tensor([-5.0, -8.0])
    # policy = reference scaled towards zero probability: the loss vanishes
    assert npo_loss(ref - 500.0, ref, 0.1).item() < 1e-6
    # policy = reference: (2/β)·log 2
    assert npo_loss(ref, ref, 0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    # β → 0: NPO − (2/β)·log 2 → mean log(π_θ/π_ref), the gradient-ascent objective (up to the 1/|y| scale)
    policy = ref + torch.tensor([0.7, -1.3])
    beta = 1e-4
    shifted = npo_loss(policy.double(), ref.double(), beta).item() - 2 / beta * math.log(2)
    assert shifted == pytest.approx((policy - ref).mean().item(), abs=1e-3)
    # the reference gets no gradient
    r = ref.clone().requires_grad_(True)
    npo_loss(policy.requires_grad_(True), r).backward()
    assert r.grad is None


def test_npo_per_sample_beta():
    policy, ref = torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -6.0])
    per = npo_loss(policy, ref, torch.tensor([0.1, 2.0]))
    expected = (npo_loss(policy[:1], ref[:1], 0.1) + npo_loss(policy[1:], ref[1:], 2.0)) / 2
    torch.testing.assert_close(per, expected)


def test_simnpo_value_gradient_and_length_normalisation():
    logps = torch.tensor([-6.0, -40.0, -3.0], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 10, 6])
    beta, delta = 4.5, 0.5
    loss = simnpo_loss(logps, lengths, beta, delta)
    ref = 0.0
    for lp, n in zip(logps.tolist(), lengths.tolist()):
        ref += -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (-lp / n - delta))))
    assert loss.item() == pytest.approx(ref / 3, rel=1e-6)
    loss.backward()
    for i, (lp, n) in enumerate(zip(logps.detach().tolist(), lengths.tolist())):
        s = 1 / (1 + math.exp(-beta * (-lp / n - delta)))
        assert logps.grad[i].item() == pytest.approx(2 * (1 - s) / n / 3, rel=1e-5)
    # doubling a sequence (same per-token NLL, twice the length) leaves its loss unchanged
    one = simnpo_loss(torch.tensor([-5.0]), torch.tensor([5]))
    two = simnpo_loss(torch.tensor([-10.0]), torch.tensor([10]))
    torch.testing.assert_close(one, two)


def test_gradient_ascent_and_retain_nll():
    logps, lengths = torch.tensor([-6.0, -2.0]), torch.tensor([4, 1])
    assert retain_nll_loss(logps, lengths).item() == pytest.approx(8 / 5)
    assert gradient_ascent_loss(logps, lengths).item() == pytest.approx(-8 / 5)
    assert gradient_ascent_loss(logps).item() == pytest.approx(-4.0)


def test_retain_kl_matches_loops_and_masks_padding(lm_batch):
    logits, labels = lm_batch
    other = torch.randn_like(logits)
    value = retain_kl_loss(logits, other, labels)
    total, n = 0.0, 0
    for b in range(3):
        for t in range(6):
            if labels[b, t] == -100:
                continue
            p = torch.softmax(other[b, t].double(), -1).tolist()
            q = torch.softmax(logits[b, t].double(), -1).tolist()
            total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            n += 1
    assert value.item() == pytest.approx(total / n, rel=1e-5)
    a = logits.clone().requires_grad_(True)
    retain_kl_loss(a, other, labels).backward()
    assert a.grad[1, 4:].abs().max().item() == 0.0  # padding gets no gradient


def test_idk_dpo_value_and_sign():
    pi, ri = torch.tensor([-3.0]), torch.tensor([-5.0])
    pf, rf = torch.tensor([-4.0]), torch.tensor([-2.0])
    beta = 0.1
    margin = (-3 + 5) - (-4 + 2)
    expected = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * margin)))
    assert idk_dpo_loss(pi, ri, pf, rf, beta).item() == pytest.approx(expected, rel=1e-6)
    # swapping the roles of the two answers raises the loss
    assert idk_dpo_loss(pf, rf, pi, ri, beta) > idk_dpo_loss(pi, ri, pf, rf, beta)


# f generators of each divergence, written from their definitions (f-GAN, Table 1 / FLAT)
_GENERATORS = {
    "kl": lambda u: u * math.log(u),
    "reverse_kl": lambda u: -math.log(u),
    "pearson": lambda u: (u - 1) ** 2,
    "tv": lambda u: abs(u - 1) / 2,
    "js": lambda u: u * math.log(u) - (u + 1) * math.log((u + 1) / 2),
    "hellinger": lambda u: (math.sqrt(u) - 1) ** 2,
}


@pytest.mark.parametrize("divergence", FLAT_DIVERGENCES)
def test_flat_conjugate_pairs(divergence):
    """f*(t) = sup_u (t·u − f(u)), checked numerically on a fine grid at t = g(x)."""
    f = _GENERATORS[divergence]
    grid = [math.exp(k / 400) for k in range(-4000, 2400)]  # u from 4.5e-5 to 403
    for x in (-1.0, -0.3, 0.0, 0.2, 0.6):
        g, conj = flat_variational_pair(torch.tensor(x, dtype=torch.float64), divergence)
        t = g.item()
        sup = max(t * u - f(u) for u in grid)
        assert conj.item() == pytest.approx(sup, abs=2e-3), (divergence, x)


@pytest.mark.parametrize("divergence", FLAT_DIVERGENCES)
def test_flat_loss_value_gradient_and_direction(divergence):
    pf = torch.tensor([0.2, 0.7, 0.05], dtype=torch.float64, requires_grad=True)
    pg = torch.tensor([0.4, 0.1, 0.3], dtype=torch.float64, requires_grad=True)
    loss = flat_loss(pf, pg, divergence)
    g_g, _ = flat_variational_pair(pg.detach(), divergence)
    _, c_f = flat_variational_pair(pf.detach(), divergence)
    assert loss.item() == pytest.approx((-g_g + c_f).mean().item(), rel=1e-9)
    loss.backward()
    if divergence in ("reverse_kl", "hellinger"):
        # g is decreasing for these two (g = −eˣ, 1 − eˣ): with the probabilities themselves as the variational
        # function's input, minimising pushes the other way. Documented in `flat_loss`.
        assert bool((pf.grad < 0).all()) and bool((pg.grad > 0).all())
    else:
        # minimising lowers the forget answer's probability and raises the template's
        assert bool((pf.grad > 0).all()) and bool((pg.grad < 0).all())


def test_flat_tv_zero_on_identical_answers():
    p = torch.rand(5)
    assert flat_loss(p, p, "tv").abs().item() < 1e-7


def test_membership_scores_against_loops():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 9, generator=g)
    labels = torch.randint(0, 9, (2, 7), generator=g)
    labels[1, 5:] = -100
    lp, mu, sigma, mask = token_logprob_statistics(logits, labels)
    scores = membership_scores(lp, mask, mu, sigma, k=0.3)
    for b in range(2):
        vals, zs = [], []
        for t in range(7):
            if labels[b, t] == -100:
                continue
            probs = torch.softmax(logits[b, t].double(), -1).tolist()
            logs = [math.log(p) for p in probs]
            m = sum(p * lg for p, lg in zip(probs, logs))
            s = math.sqrt(sum(p * lg * lg for p, lg in zip(probs, logs)) - m * m)
            v = logs[int(labels[b, t])]
            vals.append(v)
            zs.append((v - m) / s)
        k = math.ceil(0.3 * len(vals))
        assert scores["loss"][b].item() == pytest.approx(sum(vals) / len(vals), abs=1e-5)
        assert scores["min_k"][b].item() == pytest.approx(sum(sorted(vals)[:k]) / k, abs=1e-5)
        assert scores["min_k_plus_plus"][b].item() == pytest.approx(sum(sorted(zs)[:k]) / k, abs=1e-4)


def test_loss_modules_hyperparameters_and_combination():
    npo = NPOLoss(beta=0.2, retain_weight=0.5)
    assert get_hyperparameter(npo, "beta").item() == pytest.approx(0.2)
    policy, ref, retain = torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor(1.5)
    torch.testing.assert_close(npo(policy, ref, retain), npo_loss(policy, ref, 0.2) + 0.5 * retain)
    set_hyperparameter(npo, "beta", 1.0)
    torch.testing.assert_close(npo(policy, ref, retain), npo_loss(policy, ref, 1.0) + 0.5 * retain)
    sim = SimNPOLoss()
    assert sim.retain_weight.item() == pytest.approx(0.125) and sim.beta.item() == pytest.approx(4.5)
    assert "beta" in dict(sim.state_dict()) and "retain_weight" in dict(sim.state_dict())
    ga = GradientAscentLoss(retain_weight=1.0)
    torch.testing.assert_close(ga(torch.tensor([-4.0]), torch.tensor([2]), torch.tensor(3.0)), torch.tensor(1.0))
    flat = FLATLoss("kl")
    pf, pg = torch.tensor([0.3]), torch.tensor([0.6])
    torch.testing.assert_close(flat(pf, pg), flat_loss(pf, pg, "kl"))
    assert IdkDPOLoss().needs_reference and IdkDPOLoss().needs_template


def test_bad_inputs():
    with pytest.raises(ValueError, match="is empty: the batch has no sequence"):
        npo_loss(torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="must have the same shape"):
        npo_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        npo_loss(torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="all masked has nothing to forget"):
        simnpo_loss(torch.zeros(2), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="no counted token"):
        retain_nll_loss(torch.zeros(2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="Unknown f-divergence 'chi'"):
        flat_loss(torch.zeros(1), torch.zeros(1), "chi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not log-probabilities"):
        flat_loss(torch.tensor([-1.0]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"labels. must have shape \(B, T\)"):
        sequence_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        sequence_log_probs(torch.zeros(1, 2, 4), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match=r"retain_weight.*no retain loss"):
        NPOLoss(retain_weight=1.0)(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="Unknown f-divergence"):
        FLATLoss("bogus")  # type: ignore[arg-type]


# ---------------------------------------------------------------- token normalisation by the whole batch's count


@pytest.mark.parametrize("fn", [retain_nll_loss, gradient_ascent_loss])
@pytest.mark.parametrize("with_lengths", [True, False])
def test_token_mean_nll_micro_batches_over_the_global_count_sum_to_the_whole_batch(fn, with_lengths):
    g = torch.Generator().manual_seed(0)
    logps = [-10 * torch.rand(n, generator=g, dtype=torch.float64) for n in (3, 5)]
    lengths = [torch.tensor([4, 0, 2]), torch.tensor([1, 7, 3, 3, 2])]
    counts = [int(n.sum()) if with_lengths else n.numel() for n in lengths]
    leaves = [x.clone().requires_grad_(True) for x in logps]
    split = sum(fn(x, n if with_lengths else None, num_items_in_batch=sum(counts)) for x, n in zip(leaves, lengths))
    whole_x = torch.cat(logps).requires_grad_(True)
    whole = fn(whole_x, torch.cat(lengths) if with_lengths else None)
    torch.testing.assert_close(split, whole, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(
        torch.cat(torch.autograd.grad(split, leaves)), torch.autograd.grad(whole, whole_x)[0], rtol=1e-14, atol=1e-15
    )
    local_lengths = lengths[0] if with_lengths else None
    torch.testing.assert_close(
        fn(logps[0], local_lengths, num_items_in_batch=counts[0]), fn(logps[0], local_lengths), rtol=0, atol=0
    )


def test_retain_kl_micro_batches_over_the_global_count_sum_to_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    policy = [torch.randn(b, 6, 11, generator=g, dtype=torch.float64) for b in (2, 3)]
    reference = [torch.randn(b, 6, 11, generator=g, dtype=torch.float64) for b in (2, 3)]
    labels = [torch.randint(0, 11, (b, 6), generator=g) for b in (2, 3)]
    labels[0][:, :4] = -100
    labels[1][1] = -100
    counts = [int((lab[:, 1:] != -100).sum()) for lab in labels]  # shift=True: labels[:, 1:] count
    assert counts[0] != counts[1]
    leaves = [p.clone().requires_grad_(True) for p in policy]
    split = sum(
        retain_kl_loss(p, r, lab, shift=True, num_items_in_batch=torch.tensor(sum(counts)))
        for p, r, lab in zip(leaves, reference, labels)
    )
    whole_p = torch.cat(policy).requires_grad_(True)
    whole = retain_kl_loss(whole_p, torch.cat(reference), torch.cat(labels), shift=True)
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(
        torch.cat(torch.autograd.grad(split, leaves)), torch.autograd.grad(whole, whole_p)[0], rtol=1e-12, atol=1e-15
    )
    local = retain_kl_loss(policy[0], reference[0], labels[0], shift=True, num_items_in_batch=counts[0])
    torch.testing.assert_close(local, retain_kl_loss(policy[0], reference[0], labels[0], shift=True))


def test_gradient_ascent_module_takes_the_global_count():
    logps, lengths = torch.tensor([-6.0, -2.0]), torch.tensor([4, 1])
    loss = GradientAscentLoss()
    torch.testing.assert_close(loss(logps, lengths, num_items_in_batch=10), logps.sum() / 10)
    torch.testing.assert_close(loss(logps, lengths, num_items_in_batch=5), loss(logps, lengths))


def test_retain_kl_keeps_float64():
    g = torch.Generator().manual_seed(2)
    policy, reference = torch.randn(2, 4, 7, generator=g, dtype=torch.float64), torch.randn(2, 4, 7, generator=g)
    reference = reference.double()
    labels = torch.randint(0, 7, (2, 4), generator=g)
    value = retain_kl_loss(policy, reference, labels)
    log_p, log_r = policy.log_softmax(-1), reference.log_softmax(-1)
    want = (log_r.exp() * (log_r - log_p)).sum(-1).mean()
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, want, rtol=1e-14, atol=1e-15)

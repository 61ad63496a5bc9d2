"""The KL-DRO loss, LDR-KL and ALDR-KL against plain loops and their mathematical properties."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses.functional import (
    aldr_kl_lambda,
    aldr_kl_loss,
    dro_temperature_loss,
    ldr_kl_loss,
    tempered_kl_to_uniform,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def naive_dro(logits, target, tau, rho, ignore_index=-100):
    """Per position: tau * log((1/V) * sum_j exp((z_j - z_y) / tau)) + tau * rho, mean over counted positions."""
    flat_z = logits.reshape(-1, logits.shape[-1])
    flat_y = target.reshape(-1)
    flat_tau = tau.reshape(-1) if torch.is_tensor(tau) else [tau] * len(flat_y)
    total, count = 0.0, 0
    for z, y, t in zip(flat_z, flat_y, flat_tau):
        if int(y) == ignore_index:
            continue
        acc = 0.0
        for j in range(len(z)):
            acc = acc + torch.exp((z[j] - z[y]) / t)
        total = total + t * torch.log(acc / len(z)) + t * rho
        count += 1
    return total / count


def naive_ldr(logits, target, lam, margin):
    rows = []
    for f, y, lam_i in zip(logits, target, lam):
        acc = 0.0
        for k in range(len(f)):
            ell = (margin if k != int(y) else 0.0) + f[k] - f[y]
            acc = acc + torch.exp(ell / lam_i)
        rows.append(lam_i * torch.log(acc / len(f)))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dro_value_and_gradient_match_the_closed_form_loop(dtype):
    logits = torch.randn(2, 3, 7, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 7, (2, 3))
    target[0, 1] = -100
    tau = (0.5 + torch.rand(2, 3, dtype=dtype)).requires_grad_(True)
    got = dro_temperature_loss(logits, target, tau, rho=0.7)
    want = naive_dro(logits, target, tau, 0.7)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    g_got = torch.autograd.grad(got, (logits, tau))
    g_want = torch.autograd.grad(want, (logits, tau))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])
    assert g_got[0][0, 1].abs().max() == 0 and g_got[1][0, 1] == 0  # the ignored position gets nothing


def _solve_tau(fn, lo=1e-3, hi=1e3, iters=200):
    """Bisection in log space for the root of a decreasing function of tau."""
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if fn(mid) > 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def test_dro_is_the_worst_case_over_the_kl_ball_by_strong_duality():
    torch.manual_seed(1)
    vocab, rho = 5, 0.4
    z = torch.randn(1, vocab, dtype=torch.float64) * 2
    y = torch.tensor([2])
    a = (z - z[0, y]).squeeze(0)  # margins z_j - z_y
    # primal: the maximiser of <p, a> on {KL(p||U) <= rho} is softmax(a / tau*) with KL = rho
    tau_star = _solve_tau(lambda t: float(tempered_kl_to_uniform(a[None], t)) - rho)
    p_star = torch.softmax(a / tau_star, 0)
    primal = float((p_star * a).sum())
    kl_star = float((p_star * (p_star * vocab).log()).sum())
    assert abs(kl_star - rho) < 1e-9
    # no feasible random distribution does better
    for _ in range(2000):
        p = torch.distributions.Dirichlet(torch.ones(vocab, dtype=torch.float64) * 0.7).sample()
        if float((p * (p * vocab).log()).sum()) <= rho:
            assert float((p * a).sum()) <= primal + 1e-9
    # the loss at tau* equals the primal; at any other tau it is larger (weak duality)
    at_star = float(dro_temperature_loss(z, y, tau_star, rho))
    assert abs(at_star - primal) < 1e-8
    for tau in (0.1, 0.5, 2.0, 10.0):
        assert float(dro_temperature_loss(z, y, tau, rho)) >= primal - 1e-12


def test_at_the_optimal_tau_the_tempered_softmax_sits_on_the_kl_ball():
    z = torch.randn(1, 11, dtype=torch.float64) * 3
    y = torch.tensor([4])
    rho = 1.3

    def slope(t: float) -> float:
        tau = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(dro_temperature_loss(z, y, tau, rho), tau)
        return -float(g)  # the loss is convex in tau: -slope is decreasing

    tau_opt = _solve_tau(slope)
    assert abs(float(tempered_kl_to_uniform(z, tau_opt)) - rho) < 1e-7


def test_dro_limits_and_closed_forms():
    z = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (4,))
    ce = torch.nn.functional.cross_entropy(z, y)
    # tau = 1: CE + rho - log V
    torch.testing.assert_close(dro_temperature_loss(z, y, 1.0, 0.5), ce + 0.5 - math.log(6))
    # tau -> infinity with rho = 0: the mean margin
    mean_margin = (z - z.gather(1, y[:, None])).mean()
    torch.testing.assert_close(dro_temperature_loss(z, y, 1e7, 0.0), mean_margin, atol=1e-6, rtol=0)
    # tau -> 0: the largest margin (0 when y is the arg-max)
    top = (z - z.gather(1, y[:, None])).max(dim=1).values.mean()
    torch.testing.assert_close(dro_temperature_loss(z, y, 1e-4, 0.0), top, atol=2e-3, rtol=0)
    # a uniform prediction gives tau * rho
    assert abs(float(dro_temperature_loss(torch.zeros(3, 6), torch.tensor([0, 1, 2]), 2.0, 0.25)) - 0.5) < 1e-6


def test_dro_computes_in_float32_under_half_inputs():
    z = (torch.randn(3, 50) * 20).half()
    y = torch.randint(0, 50, (3,))
    got = dro_temperature_loss(z, y, torch.full((3,), 0.5, dtype=torch.half), 2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, dro_temperature_loss(z.float(), y, 0.5, 2.0))


def test_dro_gradients_follow_their_closed_forms_for_every_input():
    torch.manual_seed(3)
    z = (torch.randn(5, 9, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, 9, (5,))
    y[2] = -100
    tau = (0.3 + torch.rand(5, dtype=torch.float64)).requires_grad_(True)
    rho = torch.full((5,), 0.8, dtype=torch.float64, requires_grad=True)
    loss = dro_temperature_loss(z, y, tau, rho, reduction="sum")
    g_z, g_tau, g_rho = torch.autograd.grad(loss, (z, tau, rho))
    keep = (y != -100).to(z.dtype)
    p = torch.softmax(z.detach() / tau.detach()[:, None], dim=1)
    onehot = torch.zeros_like(p)
    onehot[keep.bool(), y[keep.bool()]] = 1.0
    torch.testing.assert_close(g_z, (p - onehot) * keep[:, None])  # softmax(z / tau) - e_y: tau cancels
    kl = tempered_kl_to_uniform(z.detach(), tau.detach())
    torch.testing.assert_close(g_tau, (rho.detach() - kl) * keep)  # zero on the KL-ball boundary
    torch.testing.assert_close(g_rho, tau.detach() * keep)


def test_dro_backward_twice_with_a_retained_graph_and_half_input_gradients():
    z = torch.randn(4, 6, requires_grad=True)
    y = torch.randint(0, 6, (4,))
    loss = dro_temperature_loss(z, y, 0.7, 0.5)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    (second,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(first, second)  # the saved softmax is not overwritten by the first backward
    half = z.detach().bfloat16().requires_grad_(True)
    (g_half,) = torch.autograd.grad(dro_temperature_loss(half, y, 0.7, 0.5), half)
    assert g_half.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="grad"):  # no silent, wrong second derivatives
        (g,) = torch.autograd.grad(dro_temperature_loss(z, y, 0.7, 0.5), z, create_graph=True)
        torch.autograd.grad(g.sum(), z)


def test_dro_rejects_bad_input():
    z, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"rho.*\[0, log V\)"):
        dro_temperature_loss(z, y, 1.0, math.log(4))
    with pytest.raises(ValueError, match="target"):
        dro_temperature_loss(z, torch.tensor([0, 1, 2]), 1.0, 0.1)
    with pytest.raises(ValueError, match=r"tau.*> 0"):
        dro_temperature_loss(z, y, torch.tensor([1.0, 0.0]), 0.1)
    with pytest.raises(ValueError, match=r"tau.*shape"):
        dro_temperature_loss(z, y, torch.ones(3), 0.1)


@pytest.mark.parametrize("rescale", [False, True])
def test_ldr_kl_matches_the_loop_value_and_gradient(rescale):
    f = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    lam = torch.rand(5, dtype=torch.float64) + 0.3
    got = ldr_kl_loss(f, y, lam, margin=0.2, rescale_logits=rescale, reduction="none")
    scaled = f / f.abs().mean(1, keepdim=True) if rescale else f
    want = naive_ldr(scaled, y, lam, 0.2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), f)[0], torch.autograd.grad(want.sum(), f)[0])


def test_ldr_kl_limits_hinge_and_mean():
    f = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    margins = 0.1 * (1 - torch.nn.functional.one_hot(y, 5)) + f - f.gather(1, y[:, None])
    small = ldr_kl_loss(f, y, 1e-4, 0.1, reduction="none")
    torch.testing.assert_close(small, margins.max(1).values, atol=1e-3, rtol=0)
    large = ldr_kl_loss(f, y, 1e6, 0.1, reduction="none")
    torch.testing.assert_close(large, margins.mean(1), atol=1e-5, rtol=0)


def test_aldr_lambda_stays_in_its_interval_and_follows_the_formula():
    lam0, alpha = 10.0, 2.0
    for scale in (0.01, 1.0, 30.0, 1e4):
        f = torch.randn(64, 10, dtype=torch.float64) * scale
        prev = lam0 * (0.5 + 0.5 * torch.rand(64, dtype=torch.float64))
        lam = aldr_kl_lambda(f, prev, lam0, alpha)
        assert bool((lam >= lam0 * (1 - 1 / alpha) - 1e-9).all() and (lam <= lam0 + 1e-9).all())
    f = torch.randn(3, 4, dtype=torch.float64)
    prev = torch.tensor([10.0, 7.0, 5.5], dtype=torch.float64)
    want = []
    for row, lp in zip(f, prev):
        p = torch.softmax(row / lp, 0) + 1e-5
        p = p / p.sum()
        kl = sum(float(p[k]) * math.log(float(p[k]) * 4) for k in range(4))
        want.append(lam0 * (1 - kl / (alpha * math.log(4))))
    torch.testing.assert_close(aldr_kl_lambda(f, prev, lam0, alpha), torch.tensor(want, dtype=torch.float64))


def test_aldr_loss_is_ldr_minus_the_penalty_and_lambda_gets_no_gradient():
    f = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    lam = aldr_kl_lambda(f, 10.0)
    got = aldr_kl_loss(f, y, lam, 10.0, 2.0, 0.1, reduction="none")
    penalty = 2.0 * math.log(4) / 20.0 * (lam - 10.0) ** 2
    torch.testing.assert_close(got, naive_ldr(f, y, lam, 0.1) - penalty)
    # at lam = lam0 the penalty vanishes and ALDR-KL is LDR-KL
    torch.testing.assert_close(aldr_kl_loss(f, y, torch.full((5,), 10.0, dtype=torch.float64)), ldr_kl_loss(f, y))
    with pytest.raises(ValueError, match=r"alpha.*> 1"):
        aldr_kl_lambda(f, 10.0, alpha=1.0)


# ---------------------------------------------------------------- token normalisation by the whole batch's count


def _dro_micro_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 for n in (5, 8)]
    targets = [torch.randint(0, 6, (n,), generator=g) for n in (5, 8)]
    targets[0][:2] = -100
    targets[1][-1] = -100
    taus = [0.3 + torch.rand(n, generator=g, dtype=torch.float64) for n in (5, 8)]
    return logits, targets, taus


@pytest.mark.parametrize("as_tensor", [False, True])
def test_dro_micro_batches_over_the_global_token_count_sum_to_the_whole_batch(as_tensor):
    logits, targets, taus = _dro_micro_batches()
    counts = [int((y != -100).sum()) for y in targets]
    assert counts[0] != counts[1]
    items = torch.tensor(float(sum(counts))) if as_tensor else sum(counts)
    z_leaves = [z.clone().requires_grad_(True) for z in logits]
    tau_leaves = [t.clone().requires_grad_(True) for t in taus]
    split = sum(
        dro_temperature_loss(z, y, t, 0.4, num_items_in_batch=items) for z, y, t in zip(z_leaves, targets, tau_leaves)
    )
    whole_z, whole_tau = torch.cat(logits).requires_grad_(True), torch.cat(taus).requires_grad_(True)
    whole = dro_temperature_loss(whole_z, torch.cat(targets), whole_tau, 0.4)
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    grads = torch.autograd.grad(split, z_leaves + tau_leaves)
    want = torch.autograd.grad(whole, (whole_z, whole_tau))
    torch.testing.assert_close(torch.cat(grads[:2]), want[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.cat(grads[2:]), want[1], rtol=1e-12, atol=1e-15)
    local = dro_temperature_loss(logits[0], targets[0], taus[0], 0.4, num_items_in_batch=counts[0])
    torch.testing.assert_close(local, dro_temperature_loss(logits[0], targets[0], taus[0], 0.4))
    with pytest.raises(ValueError, match=r"num_items_in_batch.*reduction='mean'"):
        dro_temperature_loss(logits[0], targets[0], 1.0, 0.4, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        dro_temperature_loss(logits[0], targets[0], 1.0, 0.4, num_items_in_batch=torch.tensor(-1.0))

"""AMCL (adaptive multi-head contrastive learning): the loss, its temperatures, the projector, and DDP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_losses import AMCLLoss, HeadTemperature, MultiHeadProjection, PairTemperature
from lightning_losses.functional import amcl_loss, amcl_temperature_penalty, robust_contrastive_loss
from tests.helpers.distributed import run_distributed
from tests.helpers.loss_tester import assert_value_and_gradient

CONFIGS = [
    ("all", "max", False, 1),
    ("all", "max", True, 2),
    ("all", "logsumexp", False, 1),
    ("cross", "logsumexp", True, 1),
    ("cross", "max", False, 3),
]


# ---------------------------------------------------------------------------------------------------------- references
def ref_amcl(
    a: Tensor,
    b: Tensor,
    tau: Tensor,
    beta: float,
    negatives: str,
    aggregate: str,
    include_positive: bool,
    topk: int,
) -> Tensor:
    """Naive loops over heads, anchors and candidates; ``tau`` is the full ``(H, 2B, M)`` pair matrix."""
    batch, heads, dim = a.shape
    a = a / a.pow(2).sum(-1, keepdim=True).sqrt()
    b = b / b.pow(2).sum(-1, keepdim=True).sqrt()
    total = a.new_zeros(())
    for h in range(heads):
        rows = []
        for r in range(2 * batch):
            i = r % batch
            anchor = a[i, h] if r < batch else b[i, h]
            if negatives == "all":
                columns = torch.cat([a[:, h], b[:, h]])
                pool = [n for n in range(2 * batch) if n != r]
                positive = i + batch if r < batch else i
            else:
                columns = b[:, h] if r < batch else a[:, h]
                pool = list(range(batch))
                positive = i

            def term(n: int, h: int = h, r: int = r, anchor: Tensor = anchor, columns: Tensor = columns) -> Tensor:
                t = tau[h, r, n]
                return (anchor * columns[n]).sum() / t - beta * (dim / 2 * torch.log(t) + 1 / t)

            if not include_positive:
                pool = [n for n in pool if n != positive]
            if aggregate == "logsumexp":
                agg = torch.log(torch.stack([torch.exp(term(n)) for n in pool]).sum())
            else:
                ranked = sorted(pool, key=lambda n: -float((anchor * columns[n]).sum().detach()))
                agg = torch.stack([term(n) for n in ranked[:topk]]).mean()
            rows.append(agg - term(positive))
        total = total + torch.stack(rows).mean()
    return total


def official_ntxent_amcl(a: Tensor, b: Tensor, temperature: PairTemperature, beta: float, topk: int) -> Tensor:
    """``AMCLNTXentLoss`` of LeiWangR/cl, amcl/losses.py (v2.0), written out: per head and direction, the top-k
    negatives' mean of sim/τ, β·Ω(τ⁺) for the positive and β·Σ_k(log τ_k + 1/τ_k) subtracted for the negatives."""
    batch, heads, dim = a.shape
    eye = torch.eye(batch, dtype=torch.bool)
    losses = []
    for h in range(heads):
        same = a[:, h].unsqueeze(0).expand(batch, -1, -1)[~eye].view(batch, batch - 1, dim)
        other = b[:, h].unsqueeze(0).expand(batch, -1, -1)[~eye].view(batch, batch - 1, dim)
        for anchor, positive, negs in ((a[:, h], b[:, h], torch.cat([same, other], 1)),
                                       (b[:, h], a[:, h], torch.cat([other, same], 1))):  # fmt: skip
            anchor, positive, negs = (
                F.normalize(anchor, dim=-1),
                F.normalize(positive, dim=-1),
                F.normalize(negs, dim=-1),
            )
            pos_sim = (anchor * positive).sum(-1)
            pa = temperature.phi(anchor)
            tau_pos = temperature.tau_min + (temperature.tau_max - temperature.tau_min) * torch.sigmoid(
                -(pa * temperature.phi(positive)).sum(-1)
            )
            scores = torch.einsum("bd,bnd->bn", pa, temperature.phi(negs))
            tau_neg = temperature.tau_min + (temperature.tau_max - temperature.tau_min) * torch.sigmoid(-scores)
            sim_neg = (anchor[:, None, :] * negs).sum(-1)
            vals, idx = sim_neg.topk(k=topk, dim=1)
            tau_top = tau_neg.gather(1, idx)
            neg = (vals / tau_top).mean(dim=1)
            reg_pos = beta * (0.5 * dim * torch.log(tau_pos) + 1 / tau_pos)
            reg_neg = beta * (torch.log(tau_top).sum(1) + (1 / tau_top).sum(1))
            losses.append((-pos_sim / tau_pos + neg + reg_pos - reg_neg).mean())
    return torch.stack(losses).view(heads, 2).mean(dim=1).sum()


def _views(batch: int = 5, heads: int = 2, dim: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, dim, generator=g), torch.randn(batch, heads, dim, generator=g)


def _pair_tau(batch: int, heads: int, negatives: str, seed: int = 1) -> Tensor:
    m = 2 * batch if negatives == "all" else batch
    return 0.05 + torch.rand(heads, 2 * batch, m, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize(("negatives", "aggregate", "include_positive", "topk"), CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradient_against_naive_reference(
    negatives: str, aggregate: str, include_positive: bool, topk: int, dtype: torch.dtype
) -> None:
    a, b = _views()
    tau = _pair_tau(5, 2, negatives)
    options = {"negatives": negatives, "aggregate": aggregate, "include_positive": include_positive, "topk": topk}
    assert_value_and_gradient(
        lambda x, y, t: amcl_loss(x, y, t, beta=0.1, **options),  # type: ignore[arg-type]
        lambda x, y, t: ref_amcl(x, y, t, 0.1, negatives, aggregate, include_positive, topk),
        a,
        b,
        tau,
        dtype=dtype,
    )


@pytest.mark.parametrize(("negatives", "aggregate", "include_positive", "topk"), CONFIGS[:3])
def test_gradient_in_the_temperatures(negatives: str, aggregate: str, include_positive: bool, topk: int) -> None:
    a, b = _views()
    tau = _pair_tau(5, 2, negatives).double().requires_grad_(True)
    options = {"negatives": negatives, "aggregate": aggregate, "include_positive": include_positive, "topk": topk}
    (grad,) = torch.autograd.grad(amcl_loss(a.double(), b.double(), tau, beta=0.3, **options), tau)  # type: ignore[arg-type]
    (expected,) = torch.autograd.grad(
        ref_amcl(a.double(), b.double(), tau, 0.3, negatives, aggregate, include_positive, topk), tau
    )
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("topk", [1, 3])
def test_against_the_official_code(topk: int) -> None:
    """Same value and gradients as the official AMCLNTXentLoss with β = 0; with β > 0 they differ exactly by the
    official code's negative regulariser, β·Σ_k(log τ_k + 1/τ_k) where the paper has β·mean_k Ω(τ_k)."""
    torch.manual_seed(0)
    temperature = PairTemperature(embed_dim=4, tau_min=0.05, tau_max=2.0).double()
    a, b = (v.double().requires_grad_(True) for v in _views(batch=6, heads=3))
    ours = AMCLLoss(3, 4, temperature=temperature, beta=0.0, topk=topk).double()
    loss, official = ours(a, b), official_ntxent_amcl(a, b, temperature, 0.0, topk)
    torch.testing.assert_close(loss, official)
    params = [a, b, *temperature.parameters()]
    for g, g_ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(official, params)):
        torch.testing.assert_close(g, g_ref)
    beta = 0.05
    with torch.no_grad():
        an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        difference = a.new_zeros(())
        for h in range(3):
            z = torch.cat([an[:, h], bn[:, h]])
            tau = temperature(z.unsqueeze(0), z.unsqueeze(0))[0]
            sim = z @ z.T
            rows = torch.arange(12)
            sim[rows, rows] = -math.inf
            sim[rows, (rows + 6) % 12] = -math.inf  # negatives only
            top = tau.gather(1, sim.topk(topk, dim=1).indices)
            paper = (0.5 * 4 * top.log() + 1 / top).mean(1)
            code = (top.log() + 1 / top).sum(1)
            difference += beta * (code - paper).mean()
        ours_beta = AMCLLoss(3, 4, temperature=temperature, beta=beta, topk=topk).double()(a, b)
        torch.testing.assert_close(ours_beta - official_ntxent_amcl(a, b, temperature, beta, topk), difference)


# ---------------------------------------------------------------------------------------------------------- properties
def test_one_head_fixed_temperature_is_ntxent_and_infonce() -> None:
    a, b = _views(batch=6, heads=1, dim=8)
    an, bn = F.normalize(a[:, 0], dim=1), F.normalize(b[:, 0], dim=1)
    # SimCLR's NT-Xent with the positive in the denominator (official NTXentLoss): 2B x 2B logits, diagonal out
    z = torch.cat([an, bn])
    logits = (z @ z.T / 0.2).fill_diagonal_(-math.inf)
    ntxent = F.cross_entropy(logits, (torch.arange(12) + 6) % 12)
    torch.testing.assert_close(amcl_loss(a, b, 0.2, aggregate="logsumexp", include_positive=True), ntxent)
    # CLIP-style InfoNCE over the other view, both directions
    labels = torch.arange(6)
    clip = (F.cross_entropy(an @ bn.T / 0.2, labels) + F.cross_entropy(bn @ an.T / 0.2, labels)) / 2
    got = amcl_loss(a, b, 0.2, negatives="cross", aggregate="logsumexp", include_positive=True)
    torch.testing.assert_close(got, clip)
    # with one fixed temperature β cancels, whatever the aggregate
    for aggregate in ("max", "logsumexp"):
        lo, hi = (amcl_loss(a, b, 0.2, beta=v, aggregate=aggregate) for v in (0.0, 5.0))  # type: ignore[arg-type]
        torch.testing.assert_close(lo, hi)


def test_one_head_fixed_temperature_is_the_robust_contrastive_loss() -> None:
    """Negatives only, other view: τ·(row) − τ·log(B − 1) is the KL-DRO contrastive term at ρ = 0."""
    a, b = _views(batch=7, heads=1, dim=5)
    an, bn = F.normalize(a[:, 0], dim=1), F.normalize(b[:, 0], dim=1)
    tau = 0.3
    rows = amcl_loss(a, b, tau, negatives="cross", aggregate="logsumexp", reduction="none")[:, 0]
    robust = robust_contrastive_loss(an, bn, tau, tau, rho=0.0, reduction="none")  # (B, 2): image, text anchors
    torch.testing.assert_close(tau * rows - tau * math.log(6), robust.T.reshape(-1))


def test_heads_add_up_and_features_are_normalised() -> None:
    a, b = _views(batch=5, heads=3, dim=4)
    tau = _pair_tau(5, 3, "all")
    whole = amcl_loss(a, b, tau, beta=0.2)
    parts = sum(amcl_loss(a[:, h : h + 1], b[:, h : h + 1], tau[h : h + 1], beta=0.2) for h in range(3))
    torch.testing.assert_close(whole, parts)
    torch.testing.assert_close(amcl_loss(3.0 * a, 0.5 * b, tau, beta=0.2), whole)
    torch.testing.assert_close(amcl_loss(a, b, tau, reduction="none").mean(0).sum(), amcl_loss(a, b, tau))
    assert amcl_loss(a, b, tau, reduction="none").shape == (10, 3)


def test_penalty_and_max_aggregate() -> None:
    tau = torch.linspace(0.05, 2.0, 400, dtype=torch.float64)
    # Ω(τ) = d/2 log τ + 1/τ is minimal at τ = 2/d
    assert float(tau[amcl_temperature_penalty(tau, dim=4).argmin()]) == pytest.approx(0.5, abs=0.01)
    # "max" with top-k over every negative is their mean; logsumexp is at least the max
    a, b = _views(batch=4, heads=1, dim=3)
    every = amcl_loss(a, b, 0.5, aggregate="max", topk=6)
    an, bn = F.normalize(a[:, 0], dim=1), F.normalize(b[:, 0], dim=1)
    z = torch.cat([an, bn])
    sim = z @ z.T / 0.5
    mask = torch.eye(8, dtype=torch.bool) | torch.eye(8, dtype=torch.bool).roll(4, dims=1)
    mean_neg = sim.masked_fill(mask, 0.0).sum(1) / 6
    torch.testing.assert_close(every, (mean_neg - sim.diagonal(4).repeat(2)).mean())
    assert float(amcl_loss(a, b, 0.5, aggregate="logsumexp")) >= float(amcl_loss(a, b, 0.5, aggregate="max"))


def test_loss_module_temperatures() -> None:
    a, b = _views(batch=4, heads=2, dim=6)
    head = AMCLLoss(2, 6, temperature="head")
    assert isinstance(head.temperature, HeadTemperature)
    with torch.no_grad():
        head.temperature.raw.copy_(torch.tensor([0.3, -0.4]))
    tau = head.temperature(torch.zeros(2, 1, 6), torch.zeros(2, 1, 6)).flatten()
    torch.testing.assert_close(head(a, b), amcl_loss(a, b, tau, beta=0.01))
    fixed = AMCLLoss(2, 6, temperature=0.25, aggregate="logsumexp", negatives="cross", beta=0.5)
    torch.testing.assert_close(fixed(a, b), amcl_loss(a, b, 0.25, 0.5, "cross", "logsumexp"))
    pair = AMCLLoss(2, 6)
    assert isinstance(pair.temperature, PairTemperature)
    value = pair(a, b)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pair.temperature.parameters())
    assert pair.get_submodule("temperature") is pair.temperature and float(pair.beta) == pytest.approx(0.01)


def test_multi_head_projection() -> None:
    torch.manual_seed(0)
    proj = MultiHeadProjection(10, 4, num_heads=3, hidden_dim=7)
    x = torch.randn(5, 10)
    out = proj(x)
    assert out.shape == (5, 3, 4)
    for h in range(3):  # each head is its own MLP
        torch.testing.assert_close(out[:, h], proj.heads[h](x))
    assert not torch.allclose(out[:, 0], out[:, 1])
    loss = AMCLLoss(3, 4)(out, proj(x + 0.1 * torch.randn(5, 10)))
    loss.backward()
    assert all(p.grad is not None for p in proj.parameters())


def test_temperature_bounds() -> None:
    temp = PairTemperature(embed_dim=3, tau_min=0.1, tau_max=0.5)
    with torch.no_grad():
        temp.phi[2].bias.fill_(10.0)  # alike pairs: large score, temperature near tau_min
    tau = temp(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3))
    assert tau.shape == (1, 2, 4) and bool(((tau >= 0.1) & (tau <= 0.5)).all())
    assert float(tau.max()) < 0.11


# ---------------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs() -> None:
    a, b = _views(batch=4, heads=2, dim=3)
    with pytest.raises(ValueError, match=r"shape \(B, H, d\)"):
        amcl_loss(a[:, 0], b[:, 0], 0.1)
    with pytest.raises(ValueError, match=r"shape \(B, H, d\)"):
        amcl_loss(a, b[:3], 0.1)
    with pytest.raises(ValueError, match="`negatives`"):
        amcl_loss(a, b, 0.1, negatives="same")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`aggregate`"):
        amcl_loss(a, b, 0.1, aggregate="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fewer than topk = 7"):
        amcl_loss(a, b, 0.1, topk=7)
    with pytest.raises(ValueError, match="fewer than topk = 1"):
        amcl_loss(a[:1], b[:1], 0.1, negatives="cross")
    with pytest.raises(ValueError, match="one temperature per head"):
        amcl_loss(a, b, torch.ones(3))
    with pytest.raises(ValueError, match="`tau` must be > 0"):
        amcl_loss(a, b, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="`tau` must be > 0"):
        amcl_loss(a, b, 0.0)
    with pytest.raises(ValueError, match="`beta` must be >= 0"):
        amcl_loss(a, b, 0.1, beta=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        amcl_loss(a.index_fill(0, torch.tensor([1]), float("nan")), b, 0.1)
    with pytest.raises(TypeError, match="`include_positive` must be a bool"):
        amcl_loss(a, b, 0.1, include_positive=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="built for 2 heads of width 4"):
        AMCLLoss(2, 4)(a, b)
    with pytest.raises(ValueError, match="`temperature` must be 'pair', 'head'"):
        AMCLLoss(2, 3, temperature="adaptive")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        AMCLLoss(2, 3, temperature=-0.1)
    with pytest.raises(ValueError, match="`init` must lie strictly between"):
        HeadTemperature(2, init=5.0)
    with pytest.raises(ValueError, match="built for 3 heads"):
        HeadTemperature(3)(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="projections of width 3"):
        PairTemperature(3)(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"embeddings of shape \(B, 10\)"):
        MultiHeadProjection(10, 4)(torch.zeros(2, 3, 10))


# ---------------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world_size: int, a: Tensor, b: Tensor) -> list[dict[str, Tensor]]:
    torch.manual_seed(0)
    losses = [
        AMCLLoss(2, 3, temperature="pair", topk=2),
        AMCLLoss(2, 3, "head", negatives="cross", aggregate="logsumexp"),
    ]
    local = a.shape[0] // world_size
    results = []
    for loss_fn in losses:
        x = a[rank * local : (rank + 1) * local].clone().requires_grad_(True)
        y = b[rank * local : (rank + 1) * local].clone().requires_grad_(True)
        value = loss_fn(x, y)
        value.backward()
        assert loss_fn.temperature is not None
        grads = [p.grad.clone() for p in loss_fn.temperature.parameters()]  # type: ignore[union-attr]
        for g in grads:
            dist.all_reduce(g)
            g /= world_size
        total = value.detach().clone()
        dist.all_reduce(total)
        results.append({"loss": total / world_size, "a": x.grad, "b": y.grad, "params": grads})  # type: ignore[dict-item]
    return results


def test_two_process_ddp_equals_one_process() -> None:
    a, b = _views(batch=8, heads=2, dim=3, seed=3)
    torch.manual_seed(0)
    losses = [
        AMCLLoss(2, 3, temperature="pair", topk=2),
        AMCLLoss(2, 3, "head", negatives="cross", aggregate="logsumexp"),
    ]
    per_rank = run_distributed(_ddp_worker, a, b, world_size=2)
    for k, loss_fn in enumerate(losses):
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        value = loss_fn(x, y)
        value.backward()
        assert loss_fn.temperature is not None
        for rank, results in enumerate(per_rank):
            got = results[k]
            rows = slice(rank * 4, (rank + 1) * 4)
            torch.testing.assert_close(got["loss"], value.detach())
            # each rank's rows receive the gradient of every rank's loss: world_size × that of the global mean
            torch.testing.assert_close(got["a"] / 2, x.grad[rows])  # type: ignore[index]
            torch.testing.assert_close(got["b"] / 2, y.grad[rows])  # type: ignore[index]
            for g, p in zip(got["params"], loss_fn.temperature.parameters()):
                torch.testing.assert_close(g, p.grad)

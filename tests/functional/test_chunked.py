"""Chunked large-vocabulary losses: value and gradients against naive references, properties, memory, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses.functional import chunked
from lightning_losses.functional.chunked import (
    default_chunk_size,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_sequence_log_probs,
)
from lightning_losses.losses import GeneralizedJSDLoss
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import assert_close, tolerance

# Odd sizes: rows not a multiple of the chunk, vocabulary not a power of two.
N, D, V, CHUNK = 37, 13, 101, 8


# --------------------------------------------------------------------------------------------------------------------
# Naive references, written with explicit formulas (no F.cross_entropy / F.kl_div / log_softmax)
# --------------------------------------------------------------------------------------------------------------------


def naive_logits(hidden, weight, bias=None, softcap=None):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def naive_log_softmax(z):
    m = z.max(dim=-1, keepdim=True).values.detach()
    return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))


def naive_ce_rows(hidden, weight, target, bias=None, softcap=None, z_loss=0.0, temperature=1.0, ignore_index=-100):
    """Per-row cross-entropy with a Python loop over the rows (0 for ignored rows)."""
    z = naive_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap)
    t = target.reshape(-1)
    temp = (
        torch.as_tensor(temperature, dtype=z.dtype).expand(z.shape[0])
        if not torch.is_tensor(temperature)
        else (temperature.reshape(-1).to(z.dtype).expand(z.shape[0]))
    )
    rows = []
    for i in range(z.shape[0]):
        if int(t[i]) == ignore_index:
            rows.append(z.new_zeros(()))
            continue
        zi = z[i] / temp[i]
        lse = zi.max() + torch.log(torch.exp(zi - zi.max()).sum())
        rows.append(lse - zi[int(t[i])] + z_loss * lse**2)
    return torch.stack(rows).reshape(target.shape)


def naive_ce(hidden, weight, target, bias=None, reduction="mean", ignore_index=-100, **kw):
    rows = naive_ce_rows(hidden, weight, target, bias, ignore_index=ignore_index, **kw)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = (target != ignore_index).sum()
    return rows.sum() / count.clamp(min=1)


def naive_gjsd_rows(zs, zt, beta, temperature=1.0):
    """Generalized JSD per row with probabilities written out: m = β q + (1 − β) p."""
    p = torch.exp(naive_log_softmax(zs / temperature))
    q = torch.exp(naive_log_softmax(zt / temperature))
    if beta == 0:
        return (q * (q.log() - p.log())).sum(-1)
    if beta == 1:
        return (p * (p.log() - q.log())).sum(-1)
    m = beta * q + (1 - beta) * p
    return beta * (q * (q.log() - m.log())).sum(-1) + (1 - beta) * (p * (p.log() - m.log())).sum(-1)


def make_head(dtype=torch.float64, n=N, d=D, v=V, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    target[[1, 4, 9, n - 1]] = -100
    return hidden, weight, b, target


def grads(out, inputs):
    return torch.autograd.grad(out.sum(), [x for x in inputs if x is not None])


# --------------------------------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_cross_entropy_matches_naive(dtype, reduction, softcap):
    hidden, weight, bias, target = make_head(dtype)
    loss = linear_cross_entropy(hidden, weight, target, bias, reduction=reduction, chunk_size=CHUNK, softcap=softcap)
    expected = naive_ce(hidden, weight, target, bias, reduction=reduction, softcap=softcap)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == expected.shape
    assert_close(loss, expected, dtype)
    for g, e in zip(grads(loss, [hidden, weight, bias]), grads(expected, [hidden, weight, bias])):
        assert g.dtype == dtype
        assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_cross_entropy_beyond_the_softmax_precision_is_recomputed_exactly(dtype, bias):
    # The fast path reads the loss off the softmax as −log p_y; a target probability below the smallest normal
    # number (a loss above ~87 nats in float32, ~708 in float64) must still give the exact, finite loss.
    hidden, weight, b, target = make_head(dtype, bias=bias)
    far = 150.0 if dtype == torch.float32 else 900.0
    with torch.no_grad():  # row 2: the target's logit is −far, every other logit within about ±1
        hidden[2] = 0.0
        hidden[2, 0] = 1.0
        weight[int(target[2])] = 0.0
        weight[int(target[2]), 0] = -far
    target[[5, 6]] = int(target[2])  # rows whose loss under this head is large or small, depending on their hidden
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(hidden, weight, target, b, reduction=reduction, chunk_size=CHUNK)
        expected = naive_ce(hidden, weight, target, b, reduction=reduction)
        assert bool(torch.isfinite(loss).all())
        assert_close(loss, expected, dtype)
        # The hidden gradient Σ_j p_j W_j − W_y cancels terms of size `far`: one rounding of those is far·eps.
        atol = 4 * far * torch.finfo(dtype).eps
        for g, e in zip(grads(loss, [hidden, weight, b]), grads(expected, [hidden, weight, b])):
            torch.testing.assert_close(g, e, rtol=tolerance(dtype)["rtol"], atol=atol)
    row = linear_cross_entropy(hidden[2:3], weight, target[2:3], b, reduction="none")
    assert float(row) > far - 2


def test_cross_entropy_three_dimensional_hidden_and_chunk_invariance():
    hidden, weight, bias, target = make_head(torch.float64, n=3 * 11)
    h3, t3 = hidden.reshape(3, 11, D), target.reshape(3, 11)
    expected = naive_ce(hidden, weight, target, bias)
    for chunk_size in (1, 5, 11, 1000, None):
        loss = linear_cross_entropy(h3, weight, t3, bias, chunk_size=chunk_size)
        assert_close(loss, expected, torch.float64)
    per_token = linear_cross_entropy(h3, weight, t3, bias, reduction="none", chunk_size=4)
    assert per_token.shape == (3, 11)
    assert bool((per_token[t3 == -100] == 0).all())


def test_cross_entropy_z_loss_and_tensor_temperature_gradients():
    hidden, weight, bias, target = make_head(torch.float64)
    temperature = (0.5 + torch.rand(N, dtype=torch.float64)).requires_grad_()
    z_loss = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy(
        hidden, weight, target, bias, chunk_size=CHUNK, z_loss=z_loss, temperature=temperature, softcap=4.0
    )
    expected = naive_ce(hidden, weight, target, bias, softcap=4.0, z_loss=z_loss, temperature=temperature)
    assert_close(loss, expected, torch.float64)
    inputs = [hidden, weight, bias, temperature, z_loss]
    for g, e in zip(grads(loss, inputs), grads(expected, inputs)):
        assert_close(g, e, torch.float64)


def test_cross_entropy_properties():
    hidden, weight, _, target = make_head(torch.float64, bias=False)
    # Zero weight: uniform distribution, loss log V for every counted token.
    zero = torch.zeros_like(weight)
    assert_close(
        linear_cross_entropy(hidden, zero, target), torch.tensor(math.log(V), dtype=torch.float64), torch.float64
    )
    # Adding the same constant to every logit (through the bias) changes nothing.
    shift = torch.full((V,), 7.0, dtype=torch.float64)
    assert_close(
        linear_cross_entropy(hidden, weight, target, shift), linear_cross_entropy(hidden, weight, target), torch.float64
    )
    # A temperature of 1 is the plain loss; the loss is non-negative.
    plain = linear_cross_entropy(hidden, weight, target, reduction="none")
    assert_close(linear_cross_entropy(hidden, weight, target, temperature=1.0, reduction="none"), plain, torch.float64)
    assert bool((plain >= 0).all())


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients():
    hidden, weight, bias, target = make_head(torch.float32)
    target = torch.full_like(target, -100)
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(hidden, weight, target, bias, reduction=reduction)
        assert float(loss.detach()) == 0.0
        for g in grads(loss, [hidden, weight, bias]):
            assert torch.isfinite(g).all() and bool((g == 0).all())
    logps = linear_sequence_log_probs(hidden.reshape(1, N, D), weight, target.reshape(1, N), average=True)
    assert logps.tolist() == [0.0]
    kd = linear_distillation_loss(hidden, weight, hidden.detach(), weight.detach(), labels=target)
    assert float(kd.detach()) == 0.0


def test_ignored_rows_do_not_influence_the_loss():
    hidden, weight, bias, target = make_head(torch.float64)
    poisoned = hidden.detach().clone()
    poisoned[target == -100] = float("nan")  # ignored rows may hold anything, even NaN
    poisoned.requires_grad_()
    loss = linear_cross_entropy(poisoned, weight, target, bias, chunk_size=CHUNK)
    assert_close(loss, naive_ce(hidden, weight, target, bias), torch.float64)
    (g_h,) = torch.autograd.grad(loss, [poisoned])
    assert bool((g_h[target == -100] == 0).all())


def test_deterministic():
    hidden, weight, bias, target = make_head(torch.float32, n=64, v=257)
    runs = []
    for _ in range(2):
        loss = linear_cross_entropy(hidden, weight, target, bias, chunk_size=7, z_loss=1e-3)
        runs.append((loss, *grads(loss, [hidden, weight, bias])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_autocast_bfloat16_keeps_float32_loss():
    hidden, weight, bias, target = make_head(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target, bias, chunk_size=CHUNK)
        expected = naive_ce(hidden.bfloat16(), weight.bfloat16(), target, bias.bfloat16())
    assert loss.dtype == torch.float32
    assert_close(loss, expected, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bfloat16 backbone output with a float32 head is fine here
        mixed = linear_cross_entropy(hidden.bfloat16(), weight, target, bias, chunk_size=CHUNK)
    torch.testing.assert_close(mixed, loss)
    for g, e in zip(grads(loss, [hidden, weight, bias]), grads(expected, [hidden, weight, bias])):
        assert g.dtype == torch.float32
        assert_close(g, e, torch.bfloat16)


def _saved_numel(fn):
    """Run ``fn`` (forward and backward) and return the largest and the total number of elements autograd saved."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes), sum(sizes)


def test_never_holds_the_full_logits():
    n, v, chunk = 96, 500, 16
    hidden, weight, bias, target = make_head(torch.float32, n=n, v=v)
    # Track every tensor the chunk computations create: none may reach tokens × V elements.
    created = []
    original = chunked.F.linear

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        created.append(out.numel())
        return out

    chunked.F.linear = spy
    try:
        for reduction, softcap in (("mean", None), ("none", None), ("mean", 3.0)):
            largest, total = _saved_numel(
                lambda r=reduction, c=softcap: grads(
                    linear_cross_entropy(hidden, weight, target, bias, reduction=r, chunk_size=chunk, softcap=c),
                    [hidden, weight, bias],
                )
            )
            assert largest < n * v
            if softcap is None:  # closed-form path: no chunk leaves anything behind for autograd
                assert total < n * v // 4
    finally:
        chunked.F.linear = original
    assert created and max(created) == chunk * v


def test_second_backward_raises():
    hidden, weight, bias, target = make_head(torch.float32)
    loss = linear_cross_entropy(hidden, weight, target, bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used by a previous backward"):
        loss.backward()


def test_no_grad_and_frozen_head():
    hidden, weight, bias, target = make_head(torch.float64)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, bias)
    assert loss.grad_fn is None
    assert_close(loss, naive_ce(hidden, weight, target, bias), torch.float64)
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, target)
    (g,) = torch.autograd.grad(loss, [hidden])
    (e,) = torch.autograd.grad(naive_ce(hidden, frozen, target), [hidden])
    assert_close(g, e, torch.float64)


def test_default_chunk_size_bounds_one_chunk():
    for vocab in (1, 50257, 131072, 262144):
        rows = default_chunk_size(vocab)
        assert 1 <= rows <= 4096 and (rows * vocab <= 1 << 24 or rows == 1)


# --------------------------------------------------------------------------------------------------------------------
# linear_sequence_log_probs
# --------------------------------------------------------------------------------------------------------------------


def naive_sequence_log_probs(hidden, weight, labels, average=False, ignore_index=-100):
    out = []
    for b in range(hidden.shape[0]):
        logp = naive_log_softmax(naive_logits(hidden[b], weight))
        total, count = hidden.new_zeros((), dtype=logp.dtype), 0
        for t in range(hidden.shape[1]):
            if int(labels[b, t]) != ignore_index:
                total = total + logp[t, int(labels[b, t])]
                count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.stack(out)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_log_probs_value_and_weighted_gradient(average):
    g = torch.Generator().manual_seed(1)
    b, t = 3, 9
    hidden = torch.randn(b, t, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2] = -100  # nothing to score
    logps = linear_sequence_log_probs(hidden, weight, labels, average=average, chunk_size=5)
    expected = naive_sequence_log_probs(hidden, weight, labels, average=average)
    assert_close(logps, expected, torch.float64)
    assert float(logps[2]) == 0.0 and bool((logps[:2] < 0).all())
    # NPO weights each sequence differently: the per-row backward path must honour the weights.
    seq_weights = torch.tensor([0.3, -1.7, 2.0], dtype=torch.float64)
    got = torch.autograd.grad((logps * seq_weights).sum(), [hidden, weight])
    want = torch.autograd.grad((expected * seq_weights).sum(), [hidden, weight])
    for a, e in zip(got, want):
        assert_close(a, e, torch.float64)


def test_sequence_log_probs_shift_follows_causal_lm_labels():
    hidden, weight, _, _ = make_head(torch.float64, n=2 * 6, bias=False)
    h = hidden.reshape(2, 6, D)
    input_ids = torch.randint(0, V, (2, 6))
    labels = input_ids.clone()
    labels[:, :2] = -100
    shifted = linear_sequence_log_probs(h, weight, labels, shift=True)
    aligned = linear_sequence_log_probs(h[:, :-1], weight, labels[:, 1:])
    assert_close(shifted, aligned, torch.float64)
    assert_close(aligned, naive_sequence_log_probs(h[:, :-1], weight, labels[:, 1:]), torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# linear_distillation_loss
# --------------------------------------------------------------------------------------------------------------------


def make_pair(dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ws = (torch.randn(V, D, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    bs = (0.1 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    ht = torch.randn(N, 5, generator=g, dtype=torch.float64).to(dtype)
    wt = (torch.randn(V, 5, generator=g, dtype=torch.float64) / 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 3, 17]] = -100
    return hs, ws, bs, ht, wt, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_distillation_matches_naive(dtype, beta):
    hs, ws, bs, ht, wt, labels = make_pair(dtype)
    temperature = 2.0
    loss = linear_distillation_loss(
        hs, ws, ht, wt, beta=beta, temperature=temperature, labels=labels, student_bias=bs, chunk_size=CHUNK
    )
    rows = naive_gjsd_rows(naive_logits(hs, ws, bs), naive_logits(ht, wt), beta, temperature)
    mask = labels != -100
    expected = rows[mask].sum() / mask.sum()
    assert_close(loss, expected, dtype)
    for g, e in zip(grads(loss, [hs, ws, bs]), grads(expected, [hs, ws, bs])):
        assert_close(g, e, dtype)


def test_distillation_properties():
    hs, ws, _bs, ht, wt, _labels = make_pair()
    # Identical student and teacher: zero for every β.
    for beta in (0.0, 0.5, 1.0):
        assert abs(float(linear_distillation_loss(hs, ws, hs.detach(), ws.detach(), beta=beta))) < 1e-12
    # β = 1/2 is symmetric in the two models; β and 1 − β swap roles.
    proj = torch.randn(D, 5, dtype=torch.float64)
    hs2 = ht @ proj.t()  # a student with the teacher's width
    a = linear_distillation_loss(hs2, ws, ht, wt, beta=0.5)
    b = linear_distillation_loss(ht, wt, hs2, ws, beta=0.5)
    assert_close(a, b, torch.float64)
    c = linear_distillation_loss(hs2, ws, ht, wt, beta=0.3)
    d = linear_distillation_loss(ht, wt, hs2, ws, beta=0.7)
    assert_close(c, d, torch.float64)
    # JSD is bounded by log 2 (for β = 1/2) and non-negative.
    per_token = linear_distillation_loss(hs, ws, ht, wt, beta=0.5, reduction="none")
    assert bool((per_token >= -1e-12).all()) and bool((per_token <= math.log(2) + 1e-12).all())
    # The teacher never receives a gradient.
    ht_req, wt_req = ht.clone().requires_grad_(), wt.clone().requires_grad_()
    loss = linear_distillation_loss(hs, ws, ht_req, wt_req)
    loss.backward()
    assert ht_req.grad is None and wt_req.grad is None and hs.grad is not None


def test_distillation_per_token_beta_and_temperature_tensor():
    hs, ws, _, ht, wt, labels = make_pair()
    beta = torch.tensor([0.0, 1.0, 0.4] * (N // 3) + [0.6] * (N % 3), dtype=torch.float64)
    temperature = (0.5 + torch.rand(N, dtype=torch.float64)).requires_grad_()
    loss = linear_distillation_loss(
        hs, ws, ht, wt, beta=beta, temperature=temperature, labels=labels, reduction="sum", chunk_size=CHUNK
    )
    zs, zt = naive_logits(hs, ws), naive_logits(ht, wt)
    rows = [
        naive_gjsd_rows(zs[i : i + 1], zt[i : i + 1], float(beta[i]), temperature[i])[0]
        for i in range(N)
        if int(labels[i]) != -100
    ]
    expected = torch.stack(rows).sum()
    assert_close(loss, expected, torch.float64)
    for g, e in zip(grads(loss, [hs, ws, temperature]), grads(expected, [hs, ws, temperature])):
        assert_close(g, e, torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_distillation_closed_form_gradient_equals_autograd_path(beta):
    # A temperature that needs a gradient sends the rows through autograd; without it the closed form is used.
    hs, ws, bs, ht, wt, labels = make_pair()
    per_token_t = 0.5 + torch.rand(N, dtype=torch.float64)
    results = []
    for needs_grad in (False, True):
        t = per_token_t.clone().requires_grad_(needs_grad)
        loss = linear_distillation_loss(
            hs, ws, ht, wt, beta=torch.full((N,), beta), temperature=t, labels=labels, student_bias=bs, chunk_size=5
        )
        results.append((loss, *grads(loss, [hs, ws, bs])))
    for a, b in zip(*results):
        assert_close(a, b, torch.float64)


def _fused_equals_eager(beta, reduction, temperature):
    hs, ws, _, ht, wt, labels = make_pair()
    hs, ws, ht, wt = (x.float().detach().requires_grad_(x.requires_grad) for x in (hs, ws, ht, wt))
    results = []
    for fused in (False, True):
        loss = linear_distillation_loss(
            hs, ws, ht, wt, beta=beta, temperature=temperature, labels=labels, chunk_size=5, reduction=reduction,
            fused=fused,
        )  # fmt: skip
        upstream = torch.linspace(-1, 1, loss.numel()).reshape(loss.shape)
        results.append((loss, *torch.autograd.grad((loss * upstream).sum(), [hs, ws])))
    for a, b in zip(*results):
        assert_close(a, b, torch.float32)


def test_distillation_fused_chunks_equal_eager():
    # One compilation (the JSD with a per-token temperature and per-row upstream gradients, the widest case).
    _fused_equals_eager(0.5, "none", 0.5 + torch.rand(N))


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distillation_fused_chunks_equal_eager_every_mode(beta, reduction):
    _fused_equals_eager(beta, reduction, 2.0)


def test_distillation_fused_must_be_a_bool():
    hs, ws, _, ht, wt, _ = make_pair()
    with pytest.raises(TypeError, match="`fused` must be a bool"):
        linear_distillation_loss(hs, ws, ht, wt, fused="yes")


def test_distillation_equals_generalized_jsd_on_full_logits():
    from lightning_losses.functional import distillation

    if not hasattr(distillation, "generalized_jsd_loss"):
        pytest.skip("generalized_jsd_loss is not available yet")
    hs, ws, bs, ht, wt, labels = make_pair(torch.float32)
    h3, t3, l3 = hs.reshape(1, N, D), ht.reshape(1, N, 5), labels.reshape(1, N)
    for beta in (0.0, 0.5, 1.0):
        loss = linear_distillation_loss(
            h3, ws, t3, wt, beta=beta, temperature=1.5, labels=l3, student_bias=bs, chunk_size=CHUNK
        )
        full = distillation.generalized_jsd_loss(
            torch.nn.functional.linear(h3, ws, bs), t3 @ wt.t(), beta=beta, temperature=1.5, labels=l3
        )
        assert_close(loss, full, torch.float32)
        for g, e in zip(grads(loss, [hs, ws, bs]), grads(full, [hs, ws, bs])):
            assert_close(g, e, torch.float32)


@pytest.mark.slow
def test_distillation_equals_trl_generalized_jsd():
    pytest.importorskip("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    hs, ws, bs, ht, wt, labels = make_pair(torch.float32)
    for beta in (0.0, 0.5, 1.0):
        loss = linear_distillation_loss(hs, ws, ht, wt, beta=beta, temperature=2.0, labels=labels, student_bias=bs)
        ref = GKDTrainer.generalized_jsd_loss(
            torch.nn.functional.linear(hs, ws, bs)[None], (ht @ wt.t())[None], labels=labels[None], beta=beta,
            temperature=2.0,
        )  # fmt: skip
        assert_close(loss, ref, torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    hidden, weight, bias, target = make_head(torch.float32)
    with pytest.raises(ValueError, match=r"shape \(V, d\) with d = 13.*not its transpose"):
        linear_cross_entropy(hidden, weight.t(), target)
    with pytest.raises(ValueError, match="must share one dtype"):
        linear_cross_entropy(hidden.double(), weight, target)
    with pytest.raises(ValueError, match=r"bias` must have shape \(V,\)"):
        linear_cross_entropy(hidden, weight, target, bias[:-1])
    with pytest.raises(ValueError, match=r"outside \[0, 101\)"):
        linear_cross_entropy(hidden, weight, torch.full_like(target, V))
    with pytest.raises(ValueError, match="integer token ids"):
        linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(ValueError, match=r"must have shape \(37,\)"):
        linear_cross_entropy(hidden, weight, target[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, target, reduction="batchmean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, target, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, target, softcap=-1.0)
    with pytest.raises(ValueError, match="temperature` must be > 0"):
        linear_cross_entropy(hidden, weight, target, temperature=torch.zeros(N))
    with pytest.raises(ValueError, match="one value per sample"):
        linear_cross_entropy(hidden, weight, target, temperature=torch.ones(5))
    with pytest.raises(ValueError, match=r"shape \(B, T, d\)"):
        linear_sequence_log_probs(hidden, weight, target)
    hs, ws, _, ht, wt, _labels = make_pair(torch.float32)
    with pytest.raises(ValueError, match="Vocabulary mismatch: the student head has 101 rows and the teacher head 102"):
        linear_distillation_loss(hs, ws, ht, torch.cat([wt, wt[:1]]))
    with pytest.raises(ValueError, match="same leading shape"):
        linear_distillation_loss(hs, ws, ht[:-1], wt)
    with pytest.raises(ValueError, match=r"beta` must lie in \[0, 1\]"):
        linear_distillation_loss(hs, ws, ht, wt, beta=1.5)


# --------------------------------------------------------------------------------------------------------------------
# Distributed: DDP over a head trained with the chunked loss equals one process on the whole batch
# --------------------------------------------------------------------------------------------------------------------


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.proj = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        ce = linear_cross_entropy(h, self.head.weight, target, self.head.bias, chunk_size=3)
        kd = linear_distillation_loss(h, self.head.weight, teacher, self.head.weight.detach() * 0.5, chunk_size=3)
        return ce + 0.5 * kd


def _ddp_data():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, D, generator=g)
    target = torch.randint(0, V, (16,), generator=g)
    teacher = torch.randn(16, D, generator=g)
    return x, target, teacher


def _ddp_worker(rank: int, world_size: int) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(_Head())
    x, target, teacher = _ddp_data()
    shard = slice(rank * 8, (rank + 1) * 8)
    loss = model(x[shard], target[shard], teacher[shard])
    loss.backward()
    return {n: p.grad for n, p in model.module.named_parameters()}


@pytest.mark.ddp
def test_ddp_gradients_equal_single_process():
    model = _Head()
    x, target, teacher = _ddp_data()
    # Every token counts and the shards are equal, so the DDP average of shard means is the global mean.
    model(x, target, teacher).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    for result in run_distributed(_ddp_worker):
        for name, grad in result.items():
            torch.testing.assert_close(grad, expected[name], **tolerance(torch.float32))


# --------------------------------------------------------------------------------------------------------------------
# Token normalisation by the whole batch's token count (gradient accumulation, DDP)
# --------------------------------------------------------------------------------------------------------------------


def _split_rows(hidden, target, at=15):
    """Two micro-batches of rows with different numbers of counted tokens."""
    h = hidden.detach()
    parts = [h[:at].clone().requires_grad_(True), h[at:].clone().requires_grad_(True)]
    labels = [target[:at], target[at:]]
    counts = [int((lab != -100).sum()) for lab in labels]
    assert counts[0] != counts[1]
    return parts, labels, counts


@pytest.mark.parametrize("variant", ["closed_form", "temperature", "z_loss"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_linear_cross_entropy_micro_batches_over_the_global_count_sum_to_the_whole_batch(variant, as_tensor):
    hidden, weight, bias, target = make_head(torch.float64)
    kw = {"temperature": {"temperature": 0.7}, "z_loss": {"z_loss": 1e-2}}.get(variant, {})
    parts, labels, counts = _split_rows(hidden, target)
    items = torch.tensor(sum(counts)) if as_tensor else sum(counts)
    split = sum(
        linear_cross_entropy(h, weight, lab, bias, chunk_size=4, num_items_in_batch=items, **kw)
        for h, lab in zip(parts, labels)
    )
    whole_h = torch.cat(parts).detach().requires_grad_(True)
    whole = linear_cross_entropy(whole_h, weight, target, bias, chunk_size=4, **kw)
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    split_grads = torch.autograd.grad(split, [*parts, weight, bias])
    whole_grads = torch.autograd.grad(whole, [whole_h, weight, bias])
    torch.testing.assert_close(torch.cat(split_grads[:2]), whole_grads[0], rtol=1e-12, atol=1e-15)
    for a, b in zip(split_grads[2:], whole_grads[1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    local = linear_cross_entropy(parts[0], weight, labels[0], bias, num_items_in_batch=counts[0], **kw)
    torch.testing.assert_close(local, linear_cross_entropy(parts[0], weight, labels[0], bias, **kw))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_linear_distillation_micro_batches_over_the_global_count_sum_to_the_whole_batch(beta):
    hidden, weight, _, target = make_head(torch.float64, bias=False)
    g = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(N, 7, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, 7, generator=g, dtype=torch.float64) / math.sqrt(7)
    parts, labels, counts = _split_rows(hidden, target)
    teachers = [teacher_hidden[:15], teacher_hidden[15:]]
    split = sum(
        linear_distillation_loss(
            h, weight, th, teacher_weight, beta=beta, temperature=1.5, labels=lab, chunk_size=4,
            num_items_in_batch=sum(counts),
        )
        for h, th, lab in zip(parts, teachers, labels)
    )  # fmt: skip
    whole_h = torch.cat(parts).detach().requires_grad_(True)
    whole = linear_distillation_loss(
        whole_h, weight, teacher_hidden, teacher_weight, beta=beta, temperature=1.5, labels=target, chunk_size=4
    )
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    split_grads = torch.autograd.grad(split, [*parts, weight])
    whole_grads = torch.autograd.grad(whole, [whole_h, weight])
    torch.testing.assert_close(torch.cat(split_grads[:2]), whole_grads[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(split_grads[2], whole_grads[1], rtol=1e-12, atol=1e-15)
    local = linear_distillation_loss(
        parts[0], weight, teachers[0], teacher_weight, beta=beta, labels=labels[0], num_items_in_batch=counts[0]
    )
    torch.testing.assert_close(
        local, linear_distillation_loss(parts[0], weight, teachers[0], teacher_weight, beta=beta, labels=labels[0])
    )


def test_num_items_in_batch_needs_the_mean_and_a_positive_count():
    hidden, weight, _, target = make_head(torch.float64)
    with pytest.raises(ValueError, match=r"num_items_in_batch.*reduction='mean'"):
        linear_cross_entropy(hidden, weight, target, reduction="none", num_items_in_batch=3)
    for bad in (0, -1.0, float("nan"), torch.tensor(0)):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            linear_cross_entropy(hidden, weight, target, num_items_in_batch=bad)


# --------------------------------------------------------------------------------------------------------------------
# Python-number hyperparameters follow the input dtype (no float32 rounding for float64 inputs)
# --------------------------------------------------------------------------------------------------------------------


def test_python_hyperparameters_are_not_rounded_to_float32_for_float64_inputs():
    hidden, weight, bias, target = make_head(torch.float64)
    got = linear_cross_entropy(hidden, weight, target, bias, temperature=0.7, z_loss=1e-4, chunk_size=CHUNK)
    want = naive_ce(hidden, weight, target, bias, temperature=0.7, z_loss=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    g = torch.Generator().manual_seed(3)
    ht, wt = torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randn(V, 5, generator=g, dtype=torch.float64)
    kd = linear_distillation_loss(hidden, weight, ht, wt, beta=0.3, temperature=0.7, chunk_size=CHUNK)
    zs, zt = naive_logits(hidden, weight), naive_logits(ht, wt)
    torch.testing.assert_close(kd, naive_gjsd_rows(zs, zt, 0.3, 0.7).mean(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    ("weight", "reduction", "num_items"),
    [(0.3, "mean", None), (0.3, "sum", None), (0.3, "mean", 50.0), (torch.tensor([0.5, 2.0]), "mean", None)],
)
def test_jsd_loss_from_hidden_equals_the_loss_on_the_logits(weight, reduction, num_items):
    # A scalar weight takes the reduced chunked path (gradients during the forward pass), a per-sample weight the
    # per-token one: both must be the module's loss on the full logits, value and gradients.
    from lightning_losses.losses.distillation import GeneralizedJSDLoss

    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 7, D, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(2, 7, 5, generator=g, dtype=torch.float64), torch.randn(V, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[0, :3] = -100
    loss = GeneralizedJSDLoss(beta=0.3, temperature=1.5, weight=weight, reduction=reduction).double()
    chunked_value = loss.from_hidden(hs, ws, ht, wt, labels, chunk_size=4, num_items_in_batch=num_items)
    full_value = loss(hs @ ws.T, ht @ wt.T, labels, num_items_in_batch=num_items)
    assert_close(chunked_value, full_value, torch.float64)
    for a, e in zip(grads(chunked_value, [hs, ws]), grads(full_value, [hs, ws])):
        assert_close(a, e, torch.float64)


@pytest.mark.parametrize("upstream", [1.0, -2.5, 0.0])
def test_scalar_losses_scale_their_gradients_by_the_upstream_gradient(upstream):
    # The gradients are computed in the forward pass and scaled in backward (a gradient of exactly one skips it).
    hidden, weight, bias, target = make_head(torch.float64)
    hs, ws, _, ht, wt, _ = make_pair()

    def ce():
        return linear_cross_entropy(hidden, weight, target, bias, chunk_size=CHUNK)

    def jsd():
        return linear_distillation_loss(hs, ws, ht, wt, beta=0.5, chunk_size=CHUNK)

    for make, leaves in ((ce, [hidden, weight, bias]), (jsd, [hs, ws])):
        g = torch.tensor(upstream, dtype=torch.float64)
        got = torch.autograd.grad(make(), leaves, grad_outputs=g)
        ref = torch.autograd.grad(make(), leaves)
        for a, e in zip(got, ref):
            assert_close(a, upstream * e, torch.float64)


def test_generalized_jsd_loss_from_hidden_fused_equals_eager():
    # The loss module's `fused=True` reaches the chunked function: same value and gradients as the eager path.
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(2, 9, 6, generator=g), torch.randn(29, 6, generator=g)
    ht, wt = torch.randn(2, 9, 5, generator=g), torch.randn(29, 5, generator=g)
    labels = torch.randint(0, 29, (2, 9), generator=g)
    labels[0, :3] = -100
    results = []
    for fused in (False, True):
        loss_fn = GeneralizedJSDLoss(beta=0.3, temperature=1.5, weight=0.7, fused=fused)
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss = loss_fn.from_hidden(h, w, ht, wt, labels, chunk_size=5)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="`fused` must be True or False"):
        GeneralizedJSDLoss(fused=1)  # type: ignore[arg-type]

"""TempNet, the moving-average robust contrastive loss and ALDR-KL's stored λ: references, state, resume, DDP."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_losses import ALDRKLLoss, ContrastiveTempNet, DROTemperatureLoss, RobustContrastiveLoss, TempNet
from lightning_losses.functional import dro_temperature_loss, robust_contrastive_loss
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import tolerance


def naive_contrastive(x, t, tau_i, tau_t, rho):
    """Both directions, per anchor, written as loops over the negatives."""
    b = x.shape[0]
    total = 0.0
    for i in range(b):
        for anchor_tau, sims in (
            (tau_i[i], [x[i] @ t[j] - x[i] @ t[i] for j in range(b)]),
            (tau_t[i], [x[j] @ t[i] - x[i] @ t[i] for j in range(b)]),
        ):
            acc = sum(torch.exp(sims[j] / anchor_tau) for j in range(b) if j != i)
            total = total + anchor_tau * torch.log(acc / (b - 1)) + anchor_tau * rho
    return total / b


# ---------------------------------------------------------------- TempNet


def test_tempnet_output_stays_inside_its_bounds_for_any_logits():
    net = TempNet(vocab_size=9, tau_min=0.3, tau_max=2.0, hidden_dim=8)
    with torch.no_grad():
        net.head.weight.mul_(1e4)  # push the pre-activation far into saturation
    for logits in (torch.zeros(4, 9), torch.randn(4, 9) * 1e6, -torch.randn(3, 5, 9) * 1e-6, torch.randn(2, 9)):
        tau = net(logits)
        assert tau.shape == logits.shape[:-1] and tau.dtype == torch.float32
        assert bool(((tau >= 0.3) & (tau <= 2.0)).all())
    contrastive = ContrastiveTempNet(embed_dim=4, tau_min=0.005, tau_max=0.05, num_prototypes=6)
    tau = contrastive(torch.randn(10, 4) * 100)
    assert bool(((tau >= 0.005) & (tau <= 0.05)).all())


def test_gradient_reaches_tempnet_only_through_tau_and_the_model_only_through_logits():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 13)
    net = TempNet(vocab_size=13, hidden_dim=8, dropout=0.0)
    x, y = torch.randn(6, 5), torch.randint(0, 13, (6,))
    logits = model(x)
    tau = net(logits)
    loss = dro_temperature_loss(logits, y, tau, rho=1.0)
    grads = torch.autograd.grad(loss, [*model.parameters(), *net.parameters()])
    model_grads, net_grads = grads[:2], grads[2:]
    # model: the same gradient as with tau a constant -> nothing flows back through TempNet's input
    const = torch.autograd.grad(dro_temperature_loss(model(x), y, tau.detach(), rho=1.0), list(model.parameters()))
    for a, b in zip(model_grads, const):
        torch.testing.assert_close(a, b)
    # TempNet: the same gradient as with detached logits -> it learns only through tau
    tau2 = net(logits.detach())
    only_tau = torch.autograd.grad(dro_temperature_loss(logits.detach(), y, tau2, rho=1.0), list(net.parameters()))
    for a, b in zip(net_grads, only_tau):
        torch.testing.assert_close(a, b)
    assert any(float(g.abs().sum()) > 0 for g in net_grads)


@pytest.mark.parametrize("bias", [False, True])
def test_factorised_tempnet_equals_the_logits_path_in_value_and_gradient(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 17, bias=bias).double()
    features = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    net = TempNet(vocab_size=17, hidden_dim=8, dropout=0.0).double()
    logits = head(features)

    def tau_and_grads(**kwargs):
        tau = net(logits, **kwargs)
        weights = torch.linspace(0.5, 2.0, tau.numel(), dtype=tau.dtype).view_as(tau)
        return tau, torch.autograd.grad((tau * weights).sum(), list(net.parameters()), retain_graph=True)

    want, want_grads = tau_and_grads()
    calls = []
    hook = net.proj[0].register_forward_hook(lambda *_: calls.append(1))
    got, got_grads = tau_and_grads(features=features, head_weight=head.weight, head_bias=head.bias)
    assert not calls  # 12 tokens x V=17 > (12 + 17) x d=6: the first layer ran factorised
    net(logits[:1, :2], features=features[:1, :2], head_weight=head.weight, head_bias=head.bias)
    assert calls == [1]  # 2 tokens: cheaper through the logits
    hook.remove()
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    # detached inputs: neither the features nor the head receive a gradient through TempNet
    assert not got.requires_grad or all(
        g is None for g in torch.autograd.grad(got.sum(), [features, head.weight], allow_unused=True)
    )


def test_factorised_tempnet_rejects_mismatched_head_and_features():
    net = TempNet(vocab_size=10, hidden_dim=4)
    logits, features = torch.randn(2, 10), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"head_weight.*\(V=10, d\)"):
        net(logits, features=features)
    with pytest.raises(ValueError, match=r"head_weight.*\(V=10, d\)"):
        net(logits, features=features, head_weight=torch.randn(9, 3))
    with pytest.raises(ValueError, match=r"features.*\(2,\) \+ \(d=3,\)"):
        net(logits, features=torch.randn(2, 4), head_weight=torch.randn(10, 3))


def test_tempnet_rejects_bad_bounds_and_widths():
    with pytest.raises(ValueError, match="tau_min < tau_max"):
        TempNet(vocab_size=10, tau_min=2.0, tau_max=2.0)
    with pytest.raises(ValueError, match="tau_min < tau_max"):
        ContrastiveTempNet(embed_dim=4, tau_min=0.0, tau_max=0.05)
    with pytest.raises(ValueError, match="vocab_size=7"):
        TempNet(vocab_size=10)(torch.randn(2, 7))


def test_contrastive_tempnet_prototypes_come_from_the_other_modality_once():
    net = ContrastiveTempNet(embed_dim=3, num_prototypes=5)
    text = torch.randn(2, 3)
    net.init_prototypes(text)
    want = F.normalize(text[[0, 1, 0, 1, 0]], dim=1)
    torch.testing.assert_close(net.prototypes.data, want)
    net.init_prototypes(torch.randn(2, 3))  # ignored
    torch.testing.assert_close(net.prototypes.data, want)
    assert bool(net.state_dict()["prototypes_initialized"])


def test_dro_module_holds_rho_as_a_hyperparameter():
    loss = DROTemperatureLoss(rho=0.5)
    assert "rho" in loss.state_dict()
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    torch.testing.assert_close(loss(z, y, 1.2), dro_temperature_loss(z, y, 1.2, 0.5))
    with pytest.raises(ValueError, match="rho"):
        DROTemperatureLoss(rho=2.0)(z, y, 1.0)  # log 4 = 1.386


# ---------------------------------------------------------------- robust contrastive loss


def test_exact_contrastive_loss_matches_the_loop():
    x = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    t = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    tau_i = (0.05 + torch.rand(5, dtype=torch.float64)).requires_grad_(True)
    tau_t = 0.05 + torch.rand(5, dtype=torch.float64)
    got = robust_contrastive_loss(x, t, tau_i, tau_t, rho=0.6)
    want = naive_contrastive(x, t, tau_i, tau_t, 0.6)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (x, t, tau_i)), torch.autograd.grad(want, (x, t, tau_i))):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def _features(batch=6, dim=4, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=gen), dim=1) * scale
    t = F.normalize(torch.randn(batch, dim, generator=gen), dim=1) * scale
    return x.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize("tau_value", [0.3, 0.005])
def test_moving_average_with_gamma_one_equals_the_exact_full_batch_loss(tau_value):
    loss = RobustContrastiveLoss(num_samples=20, rho=0.8, gamma=1.0)
    for step in range(2):  # the second visit must still be exact (no memory with gamma = 1)
        x, t = _features(seed=step)
        tau_i = torch.full((6,), tau_value, requires_grad=True)
        tau_t = (tau_value * (1 + torch.rand(6))).requires_grad_(True)
        index = torch.arange(6) + 3
        got = loss(x, t, index, tau_i, tau_t)
        want = robust_contrastive_loss(x, t, tau_i, tau_t, rho=0.8)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        for a, b in zip(
            torch.autograd.grad(got, (x, t, tau_i, tau_t)), torch.autograd.grad(want, (x, t, tau_i, tau_t))
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 / tau_value)


def test_moving_average_follows_the_recursion_and_survives_tiny_tau():
    gamma, rho = 0.8, 0.5
    loss = RobustContrastiveLoss(num_samples=6, rho=rho, gamma=gamma)
    index = torch.arange(6)
    expected_log_total = None  # log of the unnormalised moving average S_i = s_i * exp(b_i), tracked in float64
    for step, (tau, scale) in enumerate(((0.3, 1.0), (0.005, 1.0), (0.5, 1.0))):
        x, t = _features(seed=step, scale=scale)
        value = loss(x, t, index, torch.full((6,), tau), torch.full((6,), tau))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(t.grad).all()
        xd, td = x.detach().double(), t.detach().double()
        sim = xd @ td.T
        h = (sim - sim.diagonal()[:, None]) / tau
        h.fill_diagonal_(float("-inf"))
        batch_log = torch.logsumexp(h, dim=1)
        if expected_log_total is None:
            expected_log_total = batch_log
        else:
            expected_log_total = torch.logaddexp(math.log(1 - gamma) + expected_log_total, math.log(gamma) + batch_log)
        got_log_total = loss.image_s.double().log() + loss.image_b.double()
        torch.testing.assert_close(got_log_total, expected_log_total, rtol=1e-5, atol=1e-4)
        assert bool((loss.image_s >= gamma - 1e-6).all())


def test_contrastive_state_resumes_from_a_state_dict():
    def step(module, seed):
        x, t = _features(seed=seed)
        taus = torch.full((6,), 0.1)
        value = module(x, t, torch.arange(6) * 2, taus, taus)
        return value.detach(), torch.autograd.grad(value, (x, t))

    first = RobustContrastiveLoss(num_samples=12, rho=0.5, gamma=0.5)
    step(first, 0)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    after_uninterrupted = step(first, 1)
    resumed = RobustContrastiveLoss(num_samples=12, rho=0.5, gamma=0.5)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    after_resume = step(resumed, 1)
    torch.testing.assert_close(after_resume, after_uninterrupted)
    fresh = step(RobustContrastiveLoss(num_samples=12, rho=0.5, gamma=0.5), 1)
    assert not torch.allclose(fresh[0], after_uninterrupted[0])  # the state matters, so the test can fail


def test_contrastive_loss_rejects_bad_input():
    loss = RobustContrastiveLoss(num_samples=6, rho=0.5)
    x, t = _features(batch=4)
    taus = torch.full((4,), 0.1)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        loss(x, t, torch.tensor([0, 1, 2, 6]), taus, taus)
    with pytest.raises(ValueError, match=r"rho.*below log\(m\) = log\(3\)"):
        RobustContrastiveLoss(num_samples=6, rho=1.2)(x, t, torch.arange(4), taus, taus)
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        loss(x, t[:3], torch.arange(4), taus, taus)


# ---------------------------------------------------------------- ALDR-KL module


def test_aldr_module_stores_lambda_by_index_only_in_training():
    loss = ALDRKLLoss(num_samples=10, lam0=10.0, alpha=2.0, rescale_logits=False)
    logits = torch.tensor([[400.0, -400.0, 0.0], [0.0, 0.0, 0.0]])
    loss(logits, torch.tensor([0, 1]), torch.tensor([7, 2]))
    assert float(loss.lambdas[7]) < 6.0 and abs(float(loss.lambdas[2]) - 10.0) < 1e-4
    assert bool((loss.lambdas[[0, 1, 3, 4, 5, 6, 8, 9]] == 10.0).all())
    snapshot = loss.lambdas.clone()
    loss.eval()
    loss(torch.randn(2, 3) * 50, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert torch.equal(snapshot, loss.lambdas)
    loss.train()
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        loss(logits, torch.tensor([0, 1]), torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="index"):
        loss(logits, torch.tensor([0, 1]))


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, x_full, t_full, state):
    """Each rank takes its half; loss and gradients averaged like DDP does."""
    torch.manual_seed(0)
    local = x_full.shape[0] // world_size
    sl = slice(rank * local, (rank + 1) * local)
    encoder = torch.nn.Linear(x_full.shape[1], 3, bias=False)
    tempnet = ContrastiveTempNet(embed_dim=3, num_prototypes=4, dropout=0.0)
    loss = RobustContrastiveLoss(num_samples=20, rho=1.0, gamma=0.7)
    loss.load_state_dict(state)
    index = torch.arange(x_full.shape[0])[sl] * 2
    img = F.normalize(encoder(x_full[sl]), dim=1)
    txt = F.normalize(encoder(t_full[sl]), dim=1)
    value = loss(img, txt, index, tempnet(img), tempnet(txt))
    value.backward()
    grads = [p.grad.clone() for p in [*encoder.parameters(), *tempnet.parameters()]]
    for g in grads:
        dist.all_reduce(g)
        g /= world_size
    out = value.detach().clone()
    dist.all_reduce(out)
    aldr = ALDRKLLoss(num_samples=20)
    aldr(img.detach() @ torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)), index % 4, index)
    return out / world_size, grads, loss.state_dict(), aldr.lambdas


@pytest.mark.ddp
def test_ddp_contrastive_equals_single_process_on_the_concatenated_batch():
    gen = torch.Generator().manual_seed(3)
    x_full, t_full = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    # a state already holding values for some samples, so the moving average is exercised too
    warm = RobustContrastiveLoss(num_samples=20, rho=1.0, gamma=0.7)
    warm(*_features(batch=8, dim=3, seed=9), torch.arange(8) * 2, torch.full((8,), 0.2), torch.full((8,), 0.2))
    state = {k: v.clone() for k, v in warm.state_dict().items()}
    results = run_distributed(_ddp_worker, x_full, t_full, state, world_size=2)

    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 3, bias=False)
    tempnet = ContrastiveTempNet(embed_dim=3, num_prototypes=4, dropout=0.0)
    loss = RobustContrastiveLoss(num_samples=20, rho=1.0, gamma=0.7)
    loss.load_state_dict(state)
    img, txt = F.normalize(encoder(x_full), dim=1), F.normalize(encoder(t_full), dim=1)
    value = loss(img, txt, torch.arange(8) * 2, tempnet(img), tempnet(txt))
    value.backward()
    grads = [p.grad for p in [*encoder.parameters(), *tempnet.parameters()]]
    for r_value, r_grads, r_state, _ in results:
        torch.testing.assert_close(r_value, value.detach(), **tolerance(torch.float32))
        for a, b in zip(r_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for key, tensor in loss.state_dict().items():
            torch.testing.assert_close(r_state[key], tensor, **tolerance(torch.float32))
    # ALDR-KL: both ranks hold every rank's lambdas
    torch.testing.assert_close(results[0][3], results[1][3])
    assert int((results[0][3] != 10.0).sum()) == 8


def test_dro_module_micro_batches_over_the_global_token_count_sum_to_the_whole_batch():
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(2, n, 5, generator=g, dtype=torch.float64) for n in (3, 3)]
    targets = [torch.randint(0, 5, (2, 3), generator=g) for _ in range(2)]
    targets[0][0] = -100
    loss = DROTemperatureLoss(rho=0.5, ignore_index=-100).double()
    counts = [int((y != -100).sum()) for y in targets]
    leaves = [z.clone().requires_grad_(True) for z in logits]
    split = sum(loss(z, y, 0.8, num_items_in_batch=sum(counts)) for z, y in zip(leaves, targets))
    whole_z = torch.cat(logits).requires_grad_(True)
    whole = loss(whole_z, torch.cat(targets), 0.8)
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(
        torch.cat(torch.autograd.grad(split, leaves)), torch.autograd.grad(whole, whole_z)[0], rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        loss(logits[0], targets[0], 0.8, num_items_in_batch=counts[0]), loss(logits[0], targets[0], 0.8)
    )


def test_robust_contrastive_similarities_are_float32_under_bf16_autocast():
    x, t = _features(batch=8, dim=16, seed=4)
    tau_i, tau_t = torch.full((8,), 0.05), torch.full((8,), 0.07)
    want = robust_contrastive_loss(x, t, tau_i, tau_t, rho=0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = robust_contrastive_loss(x, t, tau_i, tau_t, rho=0.8)
        module_got = RobustContrastiveLoss(num_samples=8, rho=0.8, gamma=1.0)(x, t, torch.arange(8), tau_i, tau_t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module_got, want, rtol=1e-5, atol=1e-5)

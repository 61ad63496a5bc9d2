"""Functional distillation losses: value and gradient against naive references, properties, bad inputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.functional import (
    binary_kl_loss,
    dkd_components,
    dkd_loss,
    generalized_jsd_loss,
    kd_loss,
    nd_loss,
    project_conflicting_gradient,
)
from tests.helpers.references import (
    log_cosh_float64,
    ref_binary_kl,
    ref_dkd_parts,
    ref_dkd_shift_mask,
    ref_jsd_tokens,
    ref_kd,
    ref_nd,
    ref_project,
)
from tests.helpers.tolerances import tolerance

N, C = 7, 13
B, T, V = 3, 5, 11
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"atol": 3e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}


def _logits(*shape: int, scale: float = 3.0) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64) * scale


def _value_and_grad(fn: Callable[[Tensor], Tensor], x: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Value of ``fn(x)`` and the gradient of ``sum(weights * fn(x))`` w.r.t. ``x`` (both float64)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    objective = out if weights is None else out * weights.to(out.dtype)
    (grad,) = torch.autograd.grad(objective.sum(), x)
    return out.detach().double(), grad.double()


def _assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def _compare(
    impl: Callable[[Tensor], Tensor],
    ref: Callable[[Tensor], Tensor],
    x: Tensor,
    dtype: torch.dtype,
    weights: Tensor | None = None,
) -> None:
    value, grad = _value_and_grad(impl, x.to(dtype), weights)
    ref_value, ref_grad = _value_and_grad(ref, x.double(), weights)
    assert value.shape == ref_value.shape
    _assert_close(value, ref_value, dtype)
    _assert_close(grad, ref_grad, dtype)


# ------------------------------------------------------------------------------------------------------------------
# KD
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0, "per-sample"])
def test_kd_matches_reference_value_and_gradient(dtype: torch.dtype, temperature: object) -> None:
    s, t = _logits(N, C), _logits(N, C)
    temp = torch.linspace(0.5, 6.0, N) if temperature == "per-sample" else temperature
    weights = torch.rand(N)
    _compare(
        lambda x: kd_loss(x, t.to(dtype), temp, reduction="none"),  # type: ignore[arg-type]
        lambda x: ref_kd(x, t, temp),  # type: ignore[arg-type]
        s,
        dtype,
        weights,
    )
    _compare(
        lambda x: kd_loss(x, t.to(dtype), temp),  # type: ignore[arg-type]
        lambda x: ref_kd(x, t, temp).sum() / N,  # type: ignore[arg-type]
        s,
        dtype,
    )
    out = kd_loss(s.to(dtype), t.to(dtype), temp, reduction="sum")  # type: ignore[arg-type]
    _assert_close(out, ref_kd(s, t, temp).sum(), dtype)  # type: ignore[arg-type]
    assert out.dtype == dtype


def test_kd_zero_with_zero_gradient_when_student_equals_teacher() -> None:
    z = _logits(N, C)
    value, grad = _value_and_grad(lambda x: kd_loss(x, z.clone(), temperature=2.5), z)
    assert abs(float(value)) < 1e-12
    assert float(grad.abs().max()) < 1e-12


def test_kd_is_the_tempered_kl_times_t_squared() -> None:
    s, t = _logits(N, C), _logits(N, C)
    for temp in (0.5, 2.0, 8.0):
        kl = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean", log_target=True)
        torch.testing.assert_close(kd_loss(s, t, temp) / temp**2, kl, atol=1e-12, rtol=1e-10)


def test_kd_gradient_stays_order_one_as_temperature_grows() -> None:
    # Closed form: with d = s - t, T^2 KL(softmax(t/T) || softmax(s/T)) -> (1/2C) sum_c (d_c - mean d)^2
    # as T -> inf, with gradient (d - mean d) / C per sample (divided by N under batchmean).
    s, t = _logits(N, C), _logits(N, C)
    d = s - t
    centred = d - d.mean(dim=1, keepdim=True)
    limit = (centred**2).sum(dim=1) / (2 * C)
    value, grad = _value_and_grad(lambda x: kd_loss(x, t, temperature=1e6, reduction="none"), s)
    torch.testing.assert_close(value, limit, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grad, centred / C, rtol=1e-3, atol=1e-6)
    _, grad_batchmean = _value_and_grad(lambda x: kd_loss(x, t, temperature=1e6), s)
    torch.testing.assert_close(grad_batchmean, centred / (C * N), rtol=1e-3, atol=1e-6)


def test_kd_per_sample_temperature_equals_separate_calls() -> None:
    s, t = _logits(N, C), _logits(N, C)
    temps = torch.linspace(1.0, 5.0, N)
    per_sample = kd_loss(s, t, temps, reduction="none")
    for i in range(N):
        single = kd_loss(s[i : i + 1], t[i : i + 1], float(temps[i]), reduction="sum")
        torch.testing.assert_close(per_sample[i], single, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------------------------------
# DKD
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0, "per-sample"])
def test_dkd_components_match_reference(dtype: torch.dtype, temperature: object) -> None:
    s, t = _logits(N, C), _logits(N, C)
    y = torch.randint(0, C, (N,))
    temp = torch.linspace(0.5, 6.0, N) if temperature == "per-sample" else temperature
    weights = torch.rand(N)
    for part in (0, 1):
        _compare(
            lambda x, part=part: dkd_components(x, t.to(dtype), y, temp, reduction="none")[part],  # type: ignore[misc,arg-type]
            lambda x, part=part: ref_dkd_parts(x, t, y, temp)[part],  # type: ignore[misc,arg-type]
            s,
            dtype,
            weights,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dkd_loss_matches_reference_with_per_sample_weights(dtype: torch.dtype) -> None:
    s, t = _logits(N, C), _logits(N, C)
    y = torch.randint(0, C, (N,))
    alpha, beta, temp = torch.rand(N) * 2, torch.rand(N) * 8, torch.linspace(1.0, 4.0, N)

    def ref(x: Tensor) -> Tensor:
        tckd, nckd = ref_dkd_parts(x, t, y, temp)
        return (alpha.double() * tckd + beta.double() * nckd).sum() / N

    _compare(lambda x: dkd_loss(x, t.to(dtype), y, alpha, beta, temp), ref, s, dtype)


def test_dkd_equals_the_official_shifted_mask_formula() -> None:
    s, t = _logits(N, C), _logits(N, C)
    y = torch.randint(0, C, (N,))
    _compare(
        lambda x: dkd_loss(x, t, y, alpha=1.0, beta=8.0, temperature=4.0),
        lambda x: ref_dkd_shift_mask(x, t, y, 1.0, 8.0, 4.0),
        s,
        torch.float64,
    )


def test_dkd_decomposition_identity_at_unit_temperature() -> None:
    # KL(p^t || p^s) = TCKD + (1 - p^t_y) NCKD per sample (the DKD paper's reformulation, T = 1).
    s, t = _logits(N, C), _logits(N, C)
    y = torch.randint(0, C, (N,))
    tckd, nckd = dkd_components(s, t, y, temperature=1.0, reduction="none")
    p_target = torch.softmax(t, dim=1).gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="none", log_target=True).sum(1)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kl, atol=1e-12, rtol=1e-10)
    total = dkd_loss(s, t, y, alpha=1.0, beta=1.0, temperature=1.0, reduction="none")
    torch.testing.assert_close(total, tckd + nckd, atol=1e-12, rtol=1e-10)


def test_dkd_zero_when_equal_and_reductions_consistent() -> None:
    z = _logits(N, C)
    y = torch.randint(0, C, (N,))
    value, grad = _value_and_grad(lambda x: dkd_loss(x, z.clone(), y), z)
    assert abs(float(value)) < 1e-12 and float(grad.abs().max()) < 1e-12
    s = _logits(N, C)
    per_sample = dkd_loss(s, z, y, reduction="none")
    torch.testing.assert_close(dkd_loss(s, z, y, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(dkd_loss(s, z, y), per_sample.mean())
    assert bool((per_sample >= 0).all())


def test_dkd_stays_finite_for_extreme_logits() -> None:
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]]).requires_grad_(True)
    t = torch.tensor([[-80.0, 80.0, 0.0], [300.0, 0.0, -300.0]])
    out = dkd_loss(s, t, torch.tensor([0, 0]), temperature=1.0)
    (grad,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and bool(torch.isfinite(grad).all())


# ------------------------------------------------------------------------------------------------------------------
# Binary KL (dual-head KD)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [2.0, "per-sample"])
def test_binary_kl_matches_bernoulli_reference(dtype: torch.dtype, temperature: object) -> None:
    # Moderate gaps: the Bernoulli form's log(1 - d) loses digits when d -> 1, the log-cosh form does not.
    s, t = _logits(N, C, scale=1.5), _logits(N, C, scale=1.5)
    temp = torch.linspace(0.5, 4.0, N) if temperature == "per-sample" else temperature
    _compare(
        lambda x: binary_kl_loss(x, t.to(dtype), temp, reduction="none"),  # type: ignore[arg-type]
        lambda x: ref_binary_kl(x, t, temp),  # type: ignore[arg-type]
        s,
        dtype,
        torch.rand(N),
    )
    _compare(
        lambda x: binary_kl_loss(x, t.to(dtype), temp),  # type: ignore[arg-type]
        lambda x: ref_binary_kl(x, t, temp).sum() / N,  # type: ignore[arg-type]
        s,
        dtype,
    )


def test_binary_kl_equals_log_cosh_exactly_and_is_stable() -> None:
    s, t = torch.tensor([[0.3, -5.0, 12.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0, -3.0]], dtype=torch.float64)
    expected = sum(log_cosh_float64((a - b) / 2.0) for a, b in zip(s[0].tolist(), t[0].tolist()))
    assert math.isclose(float(binary_kl_loss(s, t, temperature=1.0)), expected, rel_tol=1e-12)
    # A logit gap of 1e4 would overflow cosh and saturate the sigmoid; log cosh x ~ |x| - log 2.
    big = torch.tensor([[1e4]], requires_grad=True)
    out = binary_kl_loss(big, torch.zeros(1, 1), temperature=1.0)
    (grad,) = torch.autograd.grad(out, big)
    assert math.isclose(float(out.detach()), 5e3 - math.log(2.0), rel_tol=1e-6)
    assert math.isclose(float(grad), 0.5, rel_tol=1e-6)  # d/dz log cosh(z/2) = tanh(z/2)/2
    z = _logits(N, C)
    value, grad0 = _value_and_grad(lambda x: binary_kl_loss(x, z.clone()), z)
    assert float(value) == 0.0 and float(grad0.abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# ND
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_nd_matches_reference(dtype: torch.dtype) -> None:
    d, k = 6, 5
    fs, ft = _logits(N, d), _logits(N, d)
    means = _logits(k, d)
    y = torch.randint(0, k, (N,))
    _compare(
        lambda x: nd_loss(x, ft.to(dtype), means.to(dtype), y, reduction="none"),
        lambda x: ref_nd(x, ft, means, y),
        fs,
        dtype,
        torch.rand(N),
    )
    _compare(
        lambda x: nd_loss(x, ft.to(dtype), means.to(dtype), y), lambda x: ref_nd(x, ft, means, y).mean(), fs, dtype
    )


def test_nd_is_one_minus_cosine_when_student_norm_is_larger() -> None:
    d, k = 6, 4
    means = _logits(k, d)
    y = torch.randint(0, k, (N,))
    fs = _logits(N, d)
    ft = F.normalize(_logits(N, d), dim=1) * fs.norm(dim=1, keepdim=True) * torch.rand(N, 1)
    cosine = F.cosine_similarity(fs, means[y], dim=1)
    torch.testing.assert_close(nd_loss(fs, ft, means, y, reduction="none"), 1 - cosine)


def test_nd_zero_at_class_mean_and_pushes_small_norms_up() -> None:
    means = _logits(4, 6)
    y = torch.tensor([0, 1, 2, 3])
    ft = F.normalize(_logits(4, 6), dim=1) * means.norm(dim=1, keepdim=True) * 0.5
    value, grad = _value_and_grad(lambda x: nd_loss(x, ft, means, y, reduction="none"), means[y])
    assert float(value.abs().max()) < 1e-12
    assert float(grad.abs().max()) < 1e-12  # 1 - cos is at its minimum there
    # Aligned with the class mean but shorter than the teacher: loss 1 - |f_s| / |f_t| > 0.
    fs = F.normalize(means[y], dim=1) * ft.norm(dim=1, keepdim=True) * 0.25
    torch.testing.assert_close(nd_loss(fs, ft, means, y, reduction="none"), torch.full((4,), 0.75, dtype=fs.dtype))


# ------------------------------------------------------------------------------------------------------------------
# Generalized JSD
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_matches_reference(dtype: torch.dtype, beta: float) -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, 1] = labels[2, 4] = -100
    mask = (labels != -100).double()
    weights = torch.rand(B, T)
    _compare(
        lambda x: generalized_jsd_loss(x, t.to(dtype), beta=beta, temperature=2.0, labels=labels, reduction="none"),
        lambda x: ref_jsd_tokens(x, t, beta, temperature=2.0) * mask,
        s,
        dtype,
        weights,
    )
    _compare(
        lambda x: generalized_jsd_loss(x, t.to(dtype), beta=beta, temperature=2.0, labels=labels),
        lambda x: (ref_jsd_tokens(x, t, beta, temperature=2.0) * mask).sum() / mask.sum(),
        s,
        dtype,
    )


def test_jsd_per_sample_beta_tensor_with_endpoints_equals_loop() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    beta = torch.tensor([0.0, 0.7, 1.0])
    _compare(
        lambda x: generalized_jsd_loss(x, t, beta=beta, reduction="none"),
        lambda x: ref_jsd_tokens(x, t, beta),
        s,
        torch.float64,
        torch.rand(B, T),
    )
    two_d = generalized_jsd_loss(s[:, 0], t[:, 0], beta=beta, reduction="none")
    torch.testing.assert_close(two_d, ref_jsd_tokens(s[:, 0], t[:, 0], beta))


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    forward = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    reverse = F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    for beta in (0.0, torch.tensor(0.0)):
        torch.testing.assert_close(generalized_jsd_loss(s, t, beta=beta, reduction="none"), forward, atol=0, rtol=1e-12)
    for beta in (1.0, torch.tensor(1.0)):
        torch.testing.assert_close(generalized_jsd_loss(s, t, beta=beta, reduction="none"), reverse, atol=0, rtol=1e-12)


def test_jsd_symmetric_at_half_and_zero_on_identical_inputs() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.5), generalized_jsd_loss(t, s, beta=0.5))
    # and beta <-> 1 - beta with the roles swapped, in general
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.2), generalized_jsd_loss(t, s, beta=0.8))
    for beta in (0.0, 0.4, 1.0):
        value, grad = _value_and_grad(lambda x, beta=beta: generalized_jsd_loss(x, s.clone(), beta=beta), s)
        assert abs(float(value)) < 1e-12 and float(grad.abs().max()) < 1e-12
    # JSD at 1/2 is bounded by log 2.
    assert float(generalized_jsd_loss(s * 50, -t * 50, beta=0.5, reduction="none").max()) <= math.log(2) + 1e-9


def test_jsd_masked_tokens_change_nothing_and_get_no_gradient() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[1] = -100
    labels[0, 0] = -100
    base = generalized_jsd_loss(s, t, labels=labels)
    s2, t2 = s.clone(), t.clone()
    s2[labels == -100] = _logits(int((labels == -100).sum()), V) * 10
    t2[labels == -100] = 0.0
    torch.testing.assert_close(generalized_jsd_loss(s2, t2, labels=labels), base)
    kept = labels != -100
    torch.testing.assert_close(base, generalized_jsd_loss(s[kept], t[kept]))
    _, grad = _value_and_grad(lambda x: generalized_jsd_loss(x, t, labels=labels), s)
    assert float(grad[labels == -100].abs().max()) == 0.0
    assert float(grad[kept].abs().max()) > 0.0
    # Another ignore_index works the same way (labels above are < V = 11, so 99 never occurs naturally).
    custom = generalized_jsd_loss(s, t, labels=torch.where(kept, labels, 99), ignore_index=99)
    torch.testing.assert_close(custom, base)


def test_jsd_all_masked_gives_zero_with_finite_zero_gradient() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    labels = torch.full((B, T), -100)
    for reduction in ("mean", "sum"):
        value, grad = _value_and_grad(
            lambda x, r=reduction: generalized_jsd_loss(x, t, labels=labels, reduction=r),  # type: ignore[misc]
            s,
        )
        assert float(value) == 0.0
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


def test_jsd_sum_and_unlabelled_mean() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V)
    per_token = generalized_jsd_loss(s, t, beta=0.3, reduction="none")
    assert per_token.shape == (B, T)
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.3, reduction="sum"), per_token.sum())
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.3), per_token.mean())


def test_jsd_vocabulary_mismatch_error_and_slice() -> None:
    s, t = _logits(B, T, V), _logits(B, T, V + 4)
    with pytest.raises(
        ValueError, match=rf"student's logits have {V} entries, the teacher's {V + 4}.*vocab_mismatch='slice'"
    ):
        generalized_jsd_loss(s, t)
    sliced = generalized_jsd_loss(s, t, vocab_mismatch="slice")
    torch.testing.assert_close(sliced, generalized_jsd_loss(s, t[..., :V]))
    torch.testing.assert_close(generalized_jsd_loss(t, s, vocab_mismatch="slice"), generalized_jsd_loss(t[..., :V], s))


# ------------------------------------------------------------------------------------------------------------------
# Gradient projection
# ------------------------------------------------------------------------------------------------------------------
def test_projection_removes_the_conflicting_component() -> None:
    r = _logits(4, 5)
    g = -r + 0.3 * _logits(4, 5)  # strongly conflicting
    assert float((g * r).sum()) < 0
    out = project_conflicting_gradient(g, r)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert abs(float((out * r).sum())) < 1e-10
    removed = g - out
    assert abs(float(F.cosine_similarity(removed.flatten(), r.flatten(), dim=0))) == pytest.approx(1.0)
    torch.testing.assert_close(out, ref_project(g, r))


def test_projection_leaves_non_conflicting_gradients_unchanged() -> None:
    r = _logits(10)
    g = r + 0.3 * _logits(10)
    assert torch.equal(project_conflicting_gradient(g, r), g)
    orthogonal = torch.tensor([1.0, 0.0])
    assert torch.equal(project_conflicting_gradient(orthogonal, torch.tensor([0.0, 1.0])), orthogonal)
    assert torch.equal(project_conflicting_gradient(g, torch.zeros(10, dtype=g.dtype)), g)
    flat = project_conflicting_gradient(torch.tensor([1.0, -3.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(flat, torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------------------------------------------------------
# Autocast
# ------------------------------------------------------------------------------------------------------------------
def test_bf16_autocast_gives_float32_results_close_to_float32() -> None:
    s, t = _logits(N, C).bfloat16(), _logits(N, C).bfloat16()
    y = torch.randint(0, C, (N,))
    fs, ft, means = _logits(N, 6).bfloat16(), _logits(N, 6).bfloat16(), _logits(4, 6).bfloat16()
    ys = torch.randint(0, 4, (N,))
    st, tt = _logits(B, T, V).bfloat16(), _logits(B, T, V).bfloat16()
    calls: list[Callable[[Tensor, Tensor], Tensor]] = [
        lambda a, b: kd_loss(a, b),
        lambda a, b: dkd_loss(a, b, y),
        lambda a, b: binary_kl_loss(a, b),
    ]
    for call in calls:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = call(s, t)
        high = call(s.float(), t.float())
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, high, **tolerance(torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_nd = nd_loss(fs, ft, means, ys)
        low_jsd = generalized_jsd_loss(st, tt, beta=0.5)
    assert low_nd.dtype == low_jsd.dtype == torch.float32
    torch.testing.assert_close(low_nd, nd_loss(fs.float(), ft.float(), means.float(), ys), **tolerance(torch.float32))
    torch.testing.assert_close(
        low_jsd, generalized_jsd_loss(st.float(), tt.float(), beta=0.5), **tolerance(torch.float32)
    )


def test_autocast_logits_from_a_linear_layer() -> None:
    layer = torch.nn.Linear(8, C)
    x, teacher = torch.randn(N, 8), torch.randn(N, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = kd_loss(logits, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kd_loss(logits.float(), teacher), **tolerance(torch.float32))
    loss.backward()
    assert layer.weight.grad is not None and bool(torch.isfinite(layer.weight.grad).all())


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------
def test_bad_logits_are_rejected_with_clear_messages() -> None:
    s, t = torch.randn(N, C), torch.randn(N, C)
    y = torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=r"same shape, got \(7, 13\) and \(6, 13\)"):
        kd_loss(s, t[:6])
    with pytest.raises(ValueError, match=r"student has 13 classes, the teacher 12"):
        kd_loss(s, t[:, :12])
    with pytest.raises(ValueError, match=r"student has 13 classes, the teacher 12"):
        binary_kl_loss(s, t[:, :12])
    with pytest.raises(ValueError, match=r"must be 2-D of shape \(N, C\).*flatten"):
        kd_loss(s.reshape(1, N, C), t.reshape(1, N, C))
    with pytest.raises(ValueError, match=r"must be 2-D"):
        dkd_loss(s[0], t[0], y[:1])
    with pytest.raises(TypeError, match=r"floating-point tensor"):
        kd_loss(torch.ones(N, C, dtype=torch.long), t)
    with pytest.raises(ValueError, match=r"`reduction` must be one of"):
        kd_loss(s, t, reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"at least 2 classes"):
        dkd_loss(s[:, :1], t[:, :1], torch.zeros(N, dtype=torch.long))


@pytest.mark.parametrize("bad", [0.0, -1.0, torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0])])
def test_non_positive_temperature_is_rejected(bad: object) -> None:
    s, t = torch.randn(N, C), torch.randn(N, C)
    y = torch.randint(0, C, (N,))
    for call in (
        lambda: kd_loss(s, t, bad),  # type: ignore[arg-type]
        lambda: dkd_loss(s, t, y, temperature=bad),  # type: ignore[arg-type]
        lambda: binary_kl_loss(s, t, bad),  # type: ignore[arg-type]
        lambda: generalized_jsd_loss(s, t, temperature=bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=r"`temperature` must be > 0"):
            call()
    with pytest.raises(ValueError, match=r"one value per sample"):
        kd_loss(s, t, torch.ones(3))


def test_bad_targets_and_weights_are_rejected() -> None:
    s, t = torch.randn(N, C), torch.randn(N, C)
    with pytest.raises(ValueError, match=r"outside \[0, 13\)"):
        dkd_loss(s, t, torch.full((N,), C))
    with pytest.raises(ValueError, match=r"1-D integer tensor of 7 class indices, got dtype torch.float32"):
        dkd_loss(s, t, torch.zeros(N))
    with pytest.raises(ValueError, match=r"1-D integer tensor of 7"):
        dkd_loss(s, t, torch.zeros(N - 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`alpha` must be >= 0"):
        dkd_loss(s, t, torch.zeros(N, dtype=torch.long), alpha=-1.0)
    with pytest.raises(ValueError, match=r"`beta` must be >= 0"):
        dkd_loss(s, t, torch.zeros(N, dtype=torch.long), beta=torch.tensor(-0.5))


def test_bad_jsd_arguments_are_rejected() -> None:
    s, t = torch.randn(B, T, V), torch.randn(B, T, V)
    for beta in (-0.1, 1.5, torch.tensor([0.5, 1.2, 0.0])):
        with pytest.raises(ValueError, match=r"`beta` must lie in \[0, 1\]"):
            generalized_jsd_loss(s, t, beta=beta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`labels` must be an integer tensor of shape \(3, 5\)"):
        generalized_jsd_loss(s, t, labels=torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`labels` must be an integer tensor"):
        generalized_jsd_loss(s, t, labels=torch.zeros(B, T))
    with pytest.raises(ValueError, match=r"\(B, T, V\) or \(N, V\)"):
        generalized_jsd_loss(s[0, 0], t[0, 0])
    with pytest.raises(ValueError, match=r"`vocab_mismatch` must be one of"):
        generalized_jsd_loss(s, t, vocab_mismatch="pad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"same shape"):
        generalized_jsd_loss(s, t[:2])


def test_bad_nd_arguments_are_rejected() -> None:
    fs, ft, means = torch.randn(N, 6), torch.randn(N, 6), torch.randn(4, 6)
    y = torch.randint(0, 4, (N,))
    with pytest.raises(ValueError, match=r"`class_means` must have shape \(num_classes, 6\).*got \(4, 5\)"):
        nd_loss(fs, ft, means[:, :5], y)
    with pytest.raises(ValueError, match=r"same shape"):
        nd_loss(fs, ft[:, :5], means, y)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        nd_loss(fs, ft, means, torch.full((N,), 4))
    with pytest.raises(ValueError, match=r"must be 2-D of shape \(B, D\)"):
        nd_loss(fs[0], ft[0], means, y[:1])
    with pytest.raises(ValueError, match=r"same shape"):
        project_conflicting_gradient(torch.randn(3), torch.randn(4))


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_agrees_with_trl_gkd(beta: float) -> None:
    # Cross-check against the TRL implementation the convention follows (importing TRL takes ~20 s: slow).
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t = _logits(B, T, V), _logits(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[1, 2:] = -100

    def theirs(x: Tensor) -> Tensor:
        return gkd.GKDTrainer.generalized_jsd_loss(x, t, labels=labels, beta=beta, temperature=1.5)

    _compare(lambda x: generalized_jsd_loss(x, t, beta=beta, temperature=1.5, labels=labels), theirs, s, torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# Token normalisation by the whole batch's token count (gradient accumulation, DDP)
# --------------------------------------------------------------------------------------------------------------------
def _two_micro_batches(seed: int = 0) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Student and teacher logits and labels of two micro-batches with different numbers of counted tokens."""
    g = torch.Generator().manual_seed(seed)
    students = [torch.randn(b, T, V, generator=g, dtype=torch.float64) * 2 for b in (2, 3)]
    teachers = [torch.randn(b, T, V, generator=g, dtype=torch.float64) * 2 for b in (2, 3)]
    labels = [torch.randint(0, V, (b, T), generator=g) for b in (2, 3)]
    labels[0][0, :3] = -100
    labels[1][:, :1] = -100
    labels[1][2] = -100
    return students, teachers, labels


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_jsd_micro_batches_over_the_global_token_count_sum_to_the_whole_batch(beta: float, as_tensor: bool) -> None:
    students, teachers, labels = _two_micro_batches()
    counts = [int((lab != -100).sum()) for lab in labels]
    assert counts[0] != counts[1]
    total = sum(counts)
    items: object = torch.tensor(total) if as_tensor else total
    leaves = [s.clone().requires_grad_(True) for s in students]
    split = sum(
        generalized_jsd_loss(s, t, beta, 1.3, labels=lab, num_items_in_batch=items)  # type: ignore[arg-type]
        for s, t, lab in zip(leaves, teachers, labels)
    )
    whole_s = torch.cat(students).requires_grad_(True)
    whole = generalized_jsd_loss(whole_s, torch.cat(teachers), beta, 1.3, labels=torch.cat(labels))
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    grads = torch.autograd.grad(split, leaves)
    (whole_grad,) = torch.autograd.grad(whole, whole_s)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=1e-12, atol=1e-15)
    # The local count gives the default local mean.
    local = generalized_jsd_loss(students[0], teachers[0], beta, labels=labels[0], num_items_in_batch=counts[0])
    torch.testing.assert_close(local, generalized_jsd_loss(students[0], teachers[0], beta, labels=labels[0]))


def test_jsd_num_items_in_batch_is_validated() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    for bad in (0, -3.0, float("nan"), float("inf"), torch.tensor(0.0)):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            generalized_jsd_loss(s, t, num_items_in_batch=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_items_in_batch.*scalar"):
        generalized_jsd_loss(s, t, num_items_in_batch=torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError, match="num_items_in_batch"):
        generalized_jsd_loss(s, t, num_items_in_batch=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_items_in_batch.*reduction='mean'"):
        generalized_jsd_loss(s, t, reduction="sum", num_items_in_batch=6)

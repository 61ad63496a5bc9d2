"""Distillation loss modules: named hyperparameters, warm-up, weights, per-sample values, bad configuration."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_losses.functional import binary_kl_loss, dkd_loss, generalized_jsd_loss, kd_loss, nd_loss
from lightning_losses.hyperparameters import get_hyperparameter, named_hyperparameters, set_hyperparameter
from lightning_losses.losses import (
    BinaryKLLoss,
    DistillationLoss,
    DKDLoss,
    GeneralizedJSDLoss,
    KDLoss,
    NDLoss,
)
from lightning_losses.mixins.base import HyperparameterMixin
from tests.helpers.loss_tester import (
    assert_module_equals_functional,
    assert_per_sample_equals_scalar_loop,
    assert_value_and_gradient,
)
from tests.helpers.references import ref_binary_kl, ref_dkd_parts, ref_jsd_tokens, ref_kd, ref_nd
from tests.helpers.tolerances import TOLERANCES

N, C = 7, 13


def _holder() -> nn.Module:
    holder = nn.Module()
    holder.kd = KDLoss(temperature=3.0, weight=0.5)
    holder.dkd = DKDLoss(alpha=2.0, beta=4.0, temperature=2.0)
    holder.bkl = BinaryKLLoss(temperature=1.5)
    holder.nd = NDLoss(weight=0.25)
    holder.jsd = GeneralizedJSDLoss(beta=0.3, temperature=1.2)
    return holder


def test_hyperparameters_are_float32_buffers_reachable_by_name() -> None:
    holder = _holder()
    names = set(named_hyperparameters(holder))
    assert names == {
        "kd.temperature",
        "kd.weight",
        "dkd.alpha",
        "dkd.beta",
        "dkd.temperature",
        "dkd.weight",
        "bkl.temperature",
        "bkl.weight",
        "nd.weight",
        "jsd.beta",
        "jsd.temperature",
        "jsd.weight",
    }
    state = holder.state_dict()
    for name in names:
        assert name in state
        value = get_hyperparameter(holder, name)
        assert value.dtype == torch.float32 and value is dict(holder.named_buffers())[name]
    assert float(get_hyperparameter(holder, "kd.temperature")) == 3.0
    assert float(get_hyperparameter(holder, "dkd.beta")) == 4.0
    assert not list(holder.parameters())


def test_hyperparameters_round_trip_through_state_dict() -> None:
    source = _holder()
    set_hyperparameter(source, "kd.temperature", 7.0)
    set_hyperparameter(source, "jsd.beta", 0.9)
    set_hyperparameter(source, "dkd.weight", torch.linspace(0.0, 1.0, N))
    target = _holder()
    target.dkd.weight = torch.ones(N)  # per-sample shapes must match before loading
    target.load_state_dict(source.state_dict())
    assert float(target.kd.temperature) == 7.0
    assert float(target.jsd.beta) == pytest.approx(0.9)
    torch.testing.assert_close(target.dkd.weight, torch.linspace(0.0, 1.0, N))


def test_lightning_module_reaches_the_loss_hyperparameters() -> None:
    class Student(HyperparameterMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.kd = KDLoss()

    model = Student()
    model.set_hyperparameter("kd.temperature", 2.0)
    assert float(model.get_hyperparameter("kd.temperature")) == 2.0
    with pytest.raises(ValueError, match=r"temperature' must lie in \(0, inf\)"):
        model.set_hyperparameter("kd.temperature", 0.0)
    with pytest.raises(ValueError, match=r"beta' must lie in \[0, 1\]"):
        set_hyperparameter(_holder(), "jsd.beta", 1.5)


def test_warmup_factor_values() -> None:
    dkd = DKDLoss()
    assert dkd.warmup_epochs == 20
    assert dkd.warmup_factor(0) == pytest.approx(1 / 20)
    assert dkd.warmup_factor(9) == pytest.approx(0.5)
    assert dkd.warmup_factor(19) == 1.0 and dkd.warmup_factor(50) == 1.0
    assert dkd.warmup_factor(None) == 1.0
    assert dkd.warmup_factor(1.5) == pytest.approx(2.5 / 20)
    kd = KDLoss()
    assert kd.warmup_epochs == 0 and kd.warmup_factor(0) == 1.0
    # mdistiller's 1-based epoch e gives min(e / warmup, 1): here e = current_epoch + 1.
    three = KDLoss(warmup_epochs=3)
    assert [three.warmup_factor(e) for e in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_forward_is_weight_times_warmup_times_functional() -> None:
    s, t = torch.randn(N, C), torch.randn(N, C)
    y = torch.randint(0, C, (N,))
    kd = KDLoss(temperature=3.0, weight=0.5, warmup_epochs=4)
    assert_module_equals_functional(kd, lambda s, t: 0.5 * 0.5 * kd_loss(s, t, 3.0), s, t, epoch=1)
    assert_module_equals_functional(kd, lambda s, t: 0.5 * kd_loss(s, t, 3.0), s, t)
    dkd = DKDLoss(alpha=2.0, beta=4.0, temperature=2.0, weight=3.0)
    assert_module_equals_functional(
        dkd, lambda s, t, y: 3.0 * 5 / 20 * dkd_loss(s, t, y, 2.0, 4.0, 2.0), s, t, y, epoch=4
    )
    assert_module_equals_functional(BinaryKLLoss(1.5, weight=2.0), lambda s, t: 2.0 * binary_kl_loss(s, t, 1.5), s, t)
    fs, ft, means = torch.randn(N, 6), torch.randn(N, 6), torch.randn(4, 6)
    ys = torch.randint(0, 4, (N,))
    assert_module_equals_functional(NDLoss(weight=0.25), lambda *a: 0.25 * nd_loss(*a), fs, ft, means, ys)
    st, tt = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[1, :3] = -100
    jsd = GeneralizedJSDLoss(beta=0.3, temperature=1.2, weight=2.0)
    assert_module_equals_functional(
        jsd, lambda s, t, lab: 2.0 * generalized_jsd_loss(s, t, 0.3, 1.2, lab), st, tt, labels
    )
    assert_module_equals_functional(jsd, lambda s, t: 2.0 * generalized_jsd_loss(s, t, 0.3, 1.2), st, tt)


def _reference_cases() -> list[tuple[nn.Module, tuple[Tensor, ...], Callable[..., Tensor]]]:
    t = torch.randn(N, C, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,))
    return [
        (KDLoss(temperature=2.0, weight=0.75), (t,), lambda x, t: 0.75 * ref_kd(x, t, 2.0).mean()),
        (
            DKDLoss(alpha=1.5, beta=3.0, temperature=2.0, warmup_epochs=0),
            (t, y),
            lambda x, t, y: (1.5 * ref_dkd_parts(x, t, y, 2.0)[0] + 3.0 * ref_dkd_parts(x, t, y, 2.0)[1]).mean(),
        ),
        (BinaryKLLoss(temperature=2.0, weight=0.5), (t,), lambda x, t: 0.5 * ref_binary_kl(x, t, 2.0).mean()),
    ]


def test_modules_against_naive_references_with_gradients() -> None:
    s = torch.randn(N, C, dtype=torch.float64) * 3
    for module, rest, ref in _reference_cases():
        assert_value_and_gradient(module, ref, s, *rest, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_modules_against_naive_references_in_each_dtype(dtype: torch.dtype) -> None:
    s = torch.randn(N, C, dtype=torch.float64) * 3
    for module, rest, ref in _reference_cases():
        assert_value_and_gradient(module, ref, s, *rest, dtype=dtype)


def test_per_sample_hyperparameter_tensors_equal_loops() -> None:
    s, t = torch.randn(N, C, dtype=torch.float64) * 2, torch.randn(N, C, dtype=torch.float64) * 2
    weights, temps = torch.rand(N), torch.linspace(0.5, 5.0, N)
    kd = KDLoss()
    kd.weight = weights.clone()  # assignment of a buffer keeps it registered
    set_hyperparameter(kd, "temperature", temps)
    assert "temperature" in dict(kd.named_buffers()) and kd.temperature.shape == (N,)
    expected = sum(float(weights[i]) * float(ref_kd(s[i : i + 1], t[i : i + 1], float(temps[i]))) for i in range(N)) / N
    assert float(kd(s, t)) == pytest.approx(expected, rel=1e-6)
    per_sample = KDLoss(reduction="none")
    set_hyperparameter(per_sample, "weight", weights)
    torch.testing.assert_close(per_sample(s, t), weights.double() * ref_kd(s, t, 4.0))

    y = torch.randint(0, C, (N,))
    alphas, betas = torch.rand(N), torch.rand(N) * 8
    dkd = DKDLoss(warmup_epochs=0)
    set_hyperparameter(dkd, "alpha", alphas)
    set_hyperparameter(dkd, "beta", betas)
    set_hyperparameter(dkd, "temperature", temps)
    tckd, nckd = ref_dkd_parts(s, t, y, temps)
    torch.testing.assert_close(dkd(s, t, y), (alphas.double() * tckd + betas.double() * nckd).mean())

    fs, ft, means = torch.randn(N, 6, dtype=torch.float64), torch.randn(N, 6, dtype=torch.float64), torch.randn(4, 6)
    ys = torch.randint(0, 4, (N,))
    nd = NDLoss()
    set_hyperparameter(nd, "weight", weights)
    torch.testing.assert_close(nd(fs, ft, means.double(), ys), (weights.double() * ref_nd(fs, ft, means, ys)).mean())

    bkl = BinaryKLLoss(reduction="sum")
    set_hyperparameter(bkl, "temperature", temps)
    torch.testing.assert_close(bkl(s, t), ref_binary_kl(s, t, temps).sum())

    # the same tensors against the scalar value applied to each sample alone
    assert_per_sample_equals_scalar_loop(KDLoss, {"weight": weights, "temperature": temps}, s, t)
    assert_per_sample_equals_scalar_loop(
        lambda: DKDLoss(warmup_epochs=0), {"alpha": alphas, "beta": betas, "temperature": temps}, s, t, y
    )
    assert_per_sample_equals_scalar_loop(NDLoss, {"weight": weights}, fs, ft, means.double(), ys, shared={2})
    assert_per_sample_equals_scalar_loop(BinaryKLLoss, {"temperature": temps, "weight": weights}, s, t)


def test_jsd_module_per_sample_beta_and_weight_with_masking() -> None:
    st, tt = torch.randn(3, 5, 11, dtype=torch.float64), torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    labels[2, 4] = -100
    mask = (labels != -100).double()
    jsd = GeneralizedJSDLoss()
    set_hyperparameter(jsd, "beta", torch.tensor([0.0, 0.5, 1.0]))
    set_hyperparameter(jsd, "weight", torch.tensor([1.0, 2.0, 3.0]))
    per_token = (
        ref_jsd_tokens(st, tt, [0.0, 0.5, 1.0]) * mask * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(jsd(st, tt, labels), per_token.sum() / mask.sum())
    none = GeneralizedJSDLoss(reduction="none")
    assert none(st, tt, labels).shape == (3, 5)
    all_masked = torch.full((3, 5), -100)
    x = st.clone().requires_grad_(True)
    out = jsd(x, tt, all_masked)
    (grad,) = torch.autograd.grad(out, x)
    assert float(out.detach()) == 0.0 and bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


def test_jsd_module_vocab_mismatch_settings() -> None:
    st, tt = torch.randn(2, 3, 10), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match=r"10 entries, the teacher's 12"):
        GeneralizedJSDLoss()(st, tt)
    sliced = GeneralizedJSDLoss(vocab_mismatch="slice")(st, tt)
    torch.testing.assert_close(sliced, generalized_jsd_loss(st, tt[..., :10]))


def test_buffers_follow_module_dtype_and_gradients_do_not_touch_them() -> None:
    kd = KDLoss(temperature=2.0).double()
    assert kd.temperature.dtype == torch.float64
    s = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    kd(s, torch.randn(N, C, dtype=torch.float64)).backward()
    assert s.grad is not None and not kd.temperature.requires_grad


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: KDLoss(temperature=0.0), r"`temperature` must be > 0"),
        (lambda: KDLoss(temperature=-2.0), r"`temperature` must be > 0"),
        (lambda: KDLoss(weight=-1.0), r"`weight` must be >= 0"),
        (lambda: KDLoss(warmup_epochs=-1), r"`warmup_epochs` must be an integer >= 0.*Pass 0"),
        (lambda: KDLoss(warmup_epochs=1.5), r"`warmup_epochs` must be an integer"),  # type: ignore[arg-type]
        (lambda: KDLoss(warmup_epochs=True), r"`warmup_epochs` must be an integer"),
        (lambda: KDLoss(reduction="mean"), r"`reduction` must be one of"),  # type: ignore[arg-type]
        (lambda: DKDLoss(alpha=-0.1), r"`alpha` must be >= 0"),
        (lambda: DKDLoss(beta=-8.0), r"`beta` must be >= 0"),
        (lambda: DKDLoss(temperature=torch.tensor(0.0)), r"'temperature' must lie in \(0, inf\)"),
        (lambda: BinaryKLLoss(temperature=0.0), r"`temperature` must be > 0"),
        (lambda: NDLoss(weight=-2.0), r"`weight` must be >= 0"),
        (lambda: NDLoss(reduction="batchmean"), r"`reduction` must be one of"),  # type: ignore[arg-type]
        (lambda: GeneralizedJSDLoss(beta=1.5), r"`beta` must be in \[0, 1\]"),
        (lambda: GeneralizedJSDLoss(beta=-0.5), r"`beta` must be in \[0, 1\]"),
        (lambda: GeneralizedJSDLoss(vocab_mismatch="pad"), r"'error' or 'slice'"),  # type: ignore[arg-type]
        (lambda: GeneralizedJSDLoss(temperature=float("nan")), r"must be finite|must be > 0"),
        (lambda: DistillationLoss(weight=float("inf")), r"must be finite"),
    ],
)
def test_bad_configuration_is_rejected(factory: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()  # type: ignore[operator]


def test_repr_names_hyperparameters() -> None:
    text = repr(DKDLoss(alpha=2.0))
    assert "alpha=2" in text and "beta=8" in text and "warmup_epochs=20" in text


def test_jsd_module_micro_batches_over_the_global_token_count_sum_to_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(b, 4, 9, generator=g, dtype=torch.float64) for b in (3, 2)]
    teachers = [torch.randn(b, 4, 9, generator=g, dtype=torch.float64) for b in (3, 2)]
    labels = [torch.randint(0, 9, (b, 4), generator=g) for b in (3, 2)]
    labels[0][:, :2] = -100
    labels[1][0, 0] = -100
    loss = GeneralizedJSDLoss(beta=0.3, temperature=0.8, weight=0.7).double()
    counts = [int((lab != -100).sum()) for lab in labels]
    leaves = [s.clone().requires_grad_(True) for s in students]
    split = sum(loss(s, t, lab, num_items_in_batch=sum(counts)) for s, t, lab in zip(leaves, teachers, labels))
    whole_s = torch.cat(students).requires_grad_(True)
    whole = loss(whole_s, torch.cat(teachers), torch.cat(labels))
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(
        torch.cat(torch.autograd.grad(split, leaves)), torch.autograd.grad(whole, whole_s)[0], rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        loss(students[0], teachers[0], labels[0], num_items_in_batch=counts[0]),
        loss(students[0], teachers[0], labels[0]),
    )
    with pytest.raises(ValueError, match=r"num_items_in_batch.*reduction='mean'"):
        GeneralizedJSDLoss(reduction="sum")(students[0], teachers[0], labels[0], num_items_in_batch=5)

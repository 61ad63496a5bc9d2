"""The cheaper per-step paths of KD and the KL-DRO loss give the same values, gradients and errors as before.

* ``kd_loss`` checks the finiteness of both logits through its ``(N,)`` per-sample loss (one reduction instead of
  two passes over the ``(N, C)`` logits) and reads the logits only to name the culprit;
* ``DistillationLoss`` skips the warm-up product once the factor is 1 and divides by the batch size as a number;
* the KL-DRO forward works on the shifted tempered logits ``(z - max z) / τ`` (softmax in one pass, entropy as a sum of
  non-negative terms) instead of ``log_softmax``, ``exp`` and a product.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lightning_losses.functional.distillation as distillation_functional
from lightning_losses import KDLoss
from lightning_losses.functional import dro_temperature_loss, kd_loss
from lightning_losses.utilities.numerics import hyperparameter_tensor

# --------------------------------------------------------------------------------------------------------------------
# KD: one finiteness check on the per-sample loss, the same errors
# --------------------------------------------------------------------------------------------------------------------


def test_kd_loss_checks_finiteness_on_the_per_sample_loss_not_on_the_logits(monkeypatch):
    seen: list[tuple[int, ...]] = []
    original = distillation_functional.finite_flag

    def recording(tensor):
        seen.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(distillation_functional, "finite_flag", recording)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    kd_loss(s, t, temperature=2.0)
    assert seen == [(6,)]  # one reduction of the (N,) loss; the (N, C) logits are not read
    seen.clear()
    kd_loss(s, t, temperature=2.0, validate_args=False)
    assert seen == []


def _bad(name: str, value: float, column: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    (s if name == "student_logits" else t)[1, column] = value
    return s, t


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("name", ["student_logits", "teacher_logits"])
def test_kd_loss_names_the_non_finite_logits_as_before(name, value, standardize):
    s, t = _bad(name, value, column=2)
    with pytest.raises(ValueError, match=rf"`{name}` holds 1 non-finite values \(NaN or inf\) of 20"):
        kd_loss(s, t, temperature=2.0, logit_standardization=standardize)
    with pytest.raises(ValueError, match=rf"`{name}` holds 1 non-finite"):
        KDLoss(temperature=2.0, logit_standardization=standardize)(s, t)


def test_kd_loss_catches_a_minus_infinite_student_logit_where_the_teacher_gives_no_mass():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    t[0, 1] = -1e4  # the teacher's probability underflows to exactly 0 there
    s[0, 1] = float("-inf")
    with pytest.raises(ValueError, match="`student_logits` holds 1 non-finite"):
        kd_loss(s, t, temperature=1.0)


def test_kd_loss_error_order_and_per_sample_temperature_checks_are_kept():
    s, t = _bad("student_logits", float("nan"), column=0)
    t[2, 2] = float("inf")
    with pytest.raises(ValueError, match="`student_logits` holds 1 non-finite"):  # the student first, as before
        kd_loss(s, t)
    bad_temperature = torch.tensor([1.0, -2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="`student_logits` holds 1 non-finite"):  # the logits before the temperature
        kd_loss(s, torch.randn(4, 5), bad_temperature)
    with pytest.raises(ValueError, match=r"`temperature` must be > 0 and finite, got \[1.0, -2.0, 1.0, 1.0\]"):
        kd_loss(torch.randn(4, 5), torch.randn(4, 5), bad_temperature)
    with pytest.raises(ValueError, match=r"`temperature` must be > 0 and finite, got -1\.0"):
        kd_loss(torch.randn(4, 5), torch.randn(4, 5), -1.0, validate_args=False)  # numbers are always checked
    loss = kd_loss(s, t, validate_args=False)  # unchecked: the non-finite values propagate
    assert not torch.isfinite(loss)


def test_kd_loss_overflowing_by_itself_raises_nothing():
    s = torch.tensor([[3e38, -3e38]])  # finite logits whose difference overflows
    loss = kd_loss(s, torch.zeros(1, 2), temperature=1.0)
    assert not torch.isfinite(loss)  # as before: finite inputs are not an error


def test_hyperparameter_messages_are_unchanged():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"`tau` must lie in \[0, 1\], got 2.0. Pass a value in that range."):
        hyperparameter_tensor(2.0, x, "tau", low=0.0, high=1.0)
    with pytest.raises(ValueError, match=r"`tau` must be >= 0 and finite, got \[-1.0, 1.0\]. Pass values in that"):
        hyperparameter_tensor(torch.tensor([-1.0, 1.0]), x, "tau", low=0.0)


# --------------------------------------------------------------------------------------------------------------------
# KDLoss: the same values and gradients as KD written inline
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [None, 0, 1, 5])
def test_kd_module_equals_inline_kd_with_and_without_warm_up(epoch):
    torch.manual_seed(1)
    s, t = torch.randn(16, 10, requires_grad=True), torch.randn(16, 10)
    loss = KDLoss(temperature=4.0, weight=0.9, warmup_epochs=4)(s, t, epoch=epoch)
    (grad,) = torch.autograd.grad(loss, s)
    factor = 1.0 if epoch is None else min((epoch + 1) / 4, 1.0)
    s_ref = s.detach().double().requires_grad_()
    inline = F.kl_div(
        F.log_softmax(s_ref / 4, -1), F.log_softmax(t.double() / 4, -1), reduction="batchmean", log_target=True
    )
    ref = factor * 0.9 * 16 * inline
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-8)


def test_kd_module_batchmean_of_an_empty_batch_is_zero_with_a_zero_gradient():
    s = torch.zeros(0, 3, requires_grad=True)
    loss = KDLoss()(s, torch.zeros(0, 3))
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad is not None and s.grad.shape == (0, 3)


# --------------------------------------------------------------------------------------------------------------------
# KL-DRO: the shifted-logits forward against the log-softmax form it replaces
# --------------------------------------------------------------------------------------------------------------------


def _log_softmax_dro(z, target, tau, rho, ignore_index=-100):
    """The former forward, in autograd ops: τ·(-log softmax(z/τ)_y) + (ρ - log V)·τ over the kept positions."""
    log_p = torch.log_softmax(z / tau.unsqueeze(-1), dim=-1)
    keep = target != ignore_index
    nll = -log_p.gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    per = torch.where(keep, tau * nll + (rho - math.log(z.shape[-1])) * tau, torch.zeros_like(nll))
    return per.sum() / keep.sum().clamp_min(1)


@pytest.mark.parametrize("scale, tau_low", [(1.0, 0.5), (30.0, 0.5), (3.0, 1e-3), (3.0, 50.0)])
def test_dro_forward_matches_the_log_softmax_form_in_value_and_gradients(scale, tau_low):
    torch.manual_seed(2)
    z = (scale * torch.randn(40, 33)).requires_grad_()
    target = torch.randint(0, 33, (40,))
    target[::5] = -100
    tau = (tau_low * (1 + torch.rand(40))).requires_grad_()
    loss = dro_temperature_loss(z, target, tau, rho=0.8)
    gz, gt = torch.autograd.grad(loss, (z, tau))
    z64, tau64 = z.detach().double().requires_grad_(), tau.detach().double().requires_grad_()
    ref = _log_softmax_dro(z64, target, tau64, 0.8)
    rz, rt = torch.autograd.grad(ref, (z64, tau64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5 * max(scale / tau_low, 1.0))
    torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-4, atol=1e-5)


def test_dro_forward_in_float64_agrees_with_the_log_softmax_form_to_rounding():
    torch.manual_seed(3)
    z = torch.randn(7, 2, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (7, 2))
    tau = torch.rand(7, 2, dtype=torch.float64).add(0.3).requires_grad_()
    loss = dro_temperature_loss(z, target, tau, rho=1.1)
    ref = _log_softmax_dro(z.reshape(-1, 9), target.reshape(-1), tau.reshape(-1), 1.1)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (z, tau)), torch.autograd.grad(ref, (z, tau))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_dro_forward_propagates_non_finite_logits_as_before_when_unchecked():
    z = torch.randn(3, 5, requires_grad=True)
    tau = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        z[0, 2] = float("-inf")  # not the target: the loss stays finite, the τ gradient does not (p log p = 0 · -inf)
        z[1, 0] = float("nan")
    target = torch.tensor([1, 3, 4])
    per = dro_temperature_loss(z, target, tau, rho=0.5, reduction="none", validate_args=False)
    assert torch.isfinite(per[0]) and torch.isnan(per[1]) and torch.isfinite(per[2])
    (g,) = torch.autograd.grad(per.sum(), tau)
    assert torch.isnan(g[0]) and torch.isnan(g[1]) and torch.isfinite(g[2])
    with pytest.raises(ValueError, match="`logits` holds 2 non-finite"):
        dro_temperature_loss(z, target, tau, rho=0.5)


def test_dro_on_a_sliced_lm_view_equals_the_flattened_copy():
    torch.manual_seed(4)
    full = torch.randn(3, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6))
    ids[0, 2] = -100
    tau = torch.rand(3, 5).add(0.5).requires_grad_()
    view = full[:, :-1]  # not contiguous: taken as it is
    loss = dro_temperature_loss(view, ids[:, 1:], tau, rho=0.9)
    grads = torch.autograd.grad(loss, (full, tau))
    flat = full.detach()[:, :-1].reshape(-1, 11).requires_grad_()
    tau_flat = tau.detach().reshape(-1).requires_grad_()
    ref = dro_temperature_loss(flat, ids[:, 1:].reshape(-1), tau_flat, rho=0.9)
    ref_z, ref_tau = torch.autograd.grad(ref, (flat, tau_flat))
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(grads[0][:, :-1].reshape(-1, 11), ref_z, rtol=0, atol=0)
    assert bool((grads[0][:, -1] == 0).all())
    torch.testing.assert_close(grads[1].reshape(-1), ref_tau, rtol=0, atol=0)
    per = dro_temperature_loss(view, ids[:, 1:], tau, rho=0.9, reduction="none")
    assert per.shape == (3, 5) and float(per[0, 1].detach()) == 0.0


def test_dro_checks_the_logits_through_the_entropies_not_by_reading_them(monkeypatch):
    import lightning_losses.utilities.checks as checks_module

    seen: list[tuple[int, ...]] = []
    original = checks_module.finite_flag

    def recording(tensor):
        seen.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(checks_module, "finite_flag", recording)
    z, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    dro_temperature_loss(z, y, torch.ones(6), rho=0.5)
    assert (6, 7) not in seen  # the (M, V) logits are not reduced for the check


@pytest.mark.parametrize("row", [0, 3])  # row 3 is an ignored position: checked all the same, as before
@pytest.mark.parametrize("column", [1, 2])  # 2 is the row's target in row 0
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_dro_names_non_finite_logits_as_before(value, column, row):
    z = torch.randn(4, 5)
    z[row, column] = value
    y = torch.tensor([2, 0, 1, -100])
    with pytest.raises(ValueError, match=r"`logits` holds 1 non-finite values \(NaN or inf\) of 20"):
        dro_temperature_loss(z, y, torch.ones(4), rho=0.5)


def test_dro_bad_targets_are_reported_by_their_check_in_the_same_order():
    z = torch.randn(4, 5)
    for bad in (5, -5):
        y = torch.tensor([0, bad, 1, -100])
        with pytest.raises(ValueError, match=rf"`target` holds class indices outside \[0, 5\) .*: \[{bad}\]"):
            dro_temperature_loss(z, y, 1.0, rho=0.5)
    y = torch.tensor([0, 5, 1, -100])
    z_bad = z.clone()
    z_bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="`logits` holds 1 non-finite"):  # the logits first, as before
        dro_temperature_loss(z_bad, y, 1.0, rho=0.5)
    with pytest.raises(ValueError, match=r"`tau` must be > 0 and finite, got \[1.0, -1.0, 1.0, 1.0\]"):
        dro_temperature_loss(z, torch.tensor([0, 1, 1, 2]), torch.tensor([1.0, -1.0, 1.0, 1.0]), rho=0.5)
    with pytest.raises(RuntimeError, match="out of bounds"):  # unchecked: the gather fails, as before
        dro_temperature_loss(z, y, 1.0, rho=0.5, validate_args=False)


def test_dro_validated_and_unvalidated_calls_agree():
    torch.manual_seed(5)
    z = torch.randn(5, 2, 6, requires_grad=True)
    y = torch.randint(0, 6, (5, 2))
    tau = torch.rand(5, 2).add(0.4).requires_grad_()
    a = dro_temperature_loss(z, y, tau, rho=0.7)
    b = dro_temperature_loss(z, y, tau, rho=0.7, validate_args=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ga, gb in zip(torch.autograd.grad(a, (z, tau)), torch.autograd.grad(b, (z, tau))):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)

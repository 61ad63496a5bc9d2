"""PLD, DIST, logit standardisation, Margin-MSE and MTARD's balanced multi-teacher KD.

Each loss is compared, value and gradient, with a naive loop reference and with its official code's formula
(tests/helpers/references_distillation_methods.py); properties state the mathematics (invariances, limits, zeros);
bad inputs are checked by message; PLD and DIST train a tiny student through ``DistillationMixin``.
"""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.functional import (
    dist_loss,
    dkd_loss,
    entropy_balance_step,
    kd_loss,
    loss_balance_step,
    margin_mse_loss,
    multi_teacher_kd_loss,
    multi_teacher_kd_losses,
    pld_loss,
    standardize_logits,
    teacher_entropies,
)
from lightning_losses.hyperparameters import named_hyperparameters, set_hyperparameter
from lightning_losses.losses import (
    BalancedMultiTeacherKDLoss,
    DISTLoss,
    DKDLoss,
    KDLoss,
    MarginMSELoss,
    PLDLoss,
)
from lightning_losses.mixins import DistillationMixin
from tests.helpers.distributed import run_distributed
from tests.helpers.loss_tester import assert_per_sample_equals_scalar_loop, assert_value_and_gradient
from tests.helpers.references import ref_kd
from tests.helpers.references_distillation_methods import (
    official_dist,
    official_dkd_standardized,
    official_kd_standardized,
    official_margin_mse,
    official_mtard_kl,
    official_pld,
    official_two_teacher_run,
    ref_dist,
    ref_dist_parts,
    ref_margin_mse,
    ref_multi_teacher,
    ref_pld,
)
from tests.helpers.trainer import cpu_trainer

N, C = 6, 7
DTYPES = (torch.float64, torch.float32)


def _logits(seed: int = 0, n: int = N, c: int = C) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=g) * 2,
        torch.randn(n, c, generator=g) * 2,
        torch.randint(0, c, (n,), generator=g),
    )


# ============================================================================================================ PLD
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_pld_value_and_gradient_against_naive_loop(dtype: torch.dtype, temperature: float) -> None:
    s, t, y = _logits(1)
    assert_value_and_gradient(
        lambda a, b, c: pld_loss(a, b, c, temperature, reduction="none"),
        lambda a, b, c: ref_pld(a, b, c, temperature),
        s,
        t,
        y,
        dtype=dtype,
    )


def test_pld_equals_the_papers_appendix_code() -> None:
    s, t, y = _logits(2)
    assert_value_and_gradient(
        lambda a, b, c: pld_loss(a, b, c, 2.0), lambda a, b, c: official_pld(a, b, c, 2.0), s, t, y
    )


def test_pld_is_translation_invariant_per_sample() -> None:
    s, t, y = _logits(3)
    shift_s, shift_t = torch.randn(N, 1) * 10, torch.randn(N, 1) * 10
    torch.testing.assert_close(
        pld_loss(s + shift_s, t + shift_t, y, reduction="none"), pld_loss(s, t, y, reduction="none")
    )


def test_pld_with_an_agreeing_teacher_is_minimal_for_the_student_following_its_ranking() -> None:
    """Among all orderings of the same student logit values, the one that follows π* (label, then the teacher's
    descending order) has the lowest loss when the teacher's arg-max is the label (weights non-increasing)."""
    c = 5
    teacher = torch.tensor([[3.0, 0.5, 1.5, -1.0, 0.0]])  # arg-max 0
    target = torch.tensor([0])
    values = torch.tensor([2.0, 1.0, 0.3, -0.4, -2.0])  # descending
    pi_star = [0, 2, 1, 4, 3]
    best = torch.empty(1, c)
    best[0, pi_star] = values
    best_loss = pld_loss(best, teacher, target)
    for perm in itertools.permutations(range(c)):
        student = values[list(perm)].unsqueeze(0)
        assert float(pld_loss(student, teacher, target)) >= float(best_loss) - 1e-6
    # and it keeps decreasing as the student grows more confident in that ranking
    assert float(pld_loss(3.0 * best, teacher, target)) < float(best_loss)


def test_pld_with_a_one_hot_teacher_is_cross_entropy() -> None:
    s, _, y = _logits(4)
    teacher = 60.0 * F.one_hot(y, C).double()  # all the teacher's mass on the label: α = (1, 0, ..., 0)
    torch.testing.assert_close(pld_loss(s.double(), teacher, y), F.cross_entropy(s.double(), y))


def test_pld_module_per_sample_temperature_and_weight_equal_scalar_loop() -> None:
    s, t, y = _logits(5)
    assert_per_sample_equals_scalar_loop(
        lambda: PLDLoss(), {"temperature": torch.rand(N) + 0.5, "weight": torch.rand(N)}, s, t, y
    )
    holder = nn.Module()
    holder.kd = PLDLoss(temperature=2.0, weight=0.5)
    assert set(named_hyperparameters(holder)) == {"kd.temperature", "kd.weight"}
    torch.testing.assert_close(holder.kd(s, t, y), 0.5 * pld_loss(s, t, y, 2.0))


def test_pld_bad_inputs() -> None:
    s, t, y = _logits(6)
    with pytest.raises(ValueError, match=r"class indices outside \[0, 7\)"):
        pld_loss(s, t, torch.full((N,), 7))
    with pytest.raises(ValueError, match="same classes"):
        pld_loss(s, t[:, :-1], y)
    with pytest.raises(ValueError, match="temperature"):
        pld_loss(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        pld_loss(s, t, y, temperature=-torch.ones(N))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        pld_loss(s, t, y.float())
    with pytest.raises(ValueError, match="temperature"):
        PLDLoss(temperature=-1.0)


# =========================================================================================================== DIST
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_value_and_gradient_against_naive_loop(dtype: torch.dtype, beta: float, gamma: float, tau: float) -> None:
    s, t, _ = _logits(7)
    assert_value_and_gradient(
        lambda a, b: dist_loss(a, b, beta, gamma, tau), lambda a, b: ref_dist(a, b, beta, gamma, tau), s, t, dtype=dtype
    )


def test_dist_equals_the_official_code() -> None:
    s, t, _ = _logits(8, n=9)
    assert_value_and_gradient(
        lambda a, b: dist_loss(a, b, 2.0, 2.0, 4.0), lambda a, b: official_dist(a, b, 2.0, 2.0, 4.0), s, t
    )


def test_dist_per_sample_values_average_to_the_loss() -> None:
    s, t, _ = _logits(9)
    inter, intra = ref_dist_parts(s, t, 2.0)
    per_sample = dist_loss(s.double(), t.double(), 1.5, 0.5, 2.0, reduction="none")
    torch.testing.assert_close(per_sample, 1.5 * inter + 0.5 * intra)
    torch.testing.assert_close(per_sample.mean(), dist_loss(s.double(), t.double(), 1.5, 0.5, 2.0))


def test_dist_zero_for_identical_predictions_and_invariant_to_per_sample_shifts() -> None:
    s, t, _ = _logits(10)
    assert float(dist_loss(t, t)) < 1e-5
    shift = torch.randn(N, 1) * 5
    torch.testing.assert_close(dist_loss(s + shift, t - shift), dist_loss(s, t), rtol=1e-5, atol=1e-6)


def test_dist_anticorrelated_predictions_reach_the_maximum() -> None:
    """ρ = -1 for every sample and every class gives (β + γ)·τ²·2."""
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 3
    loss = dist_loss(base, base.flip(-1), beta=1.0, gamma=1.0, temperature=1.0)
    torch.testing.assert_close(loss, torch.tensor(4.0), rtol=1e-5, atol=1e-5)


def test_dist_per_sample_beta_and_weight() -> None:
    s, t, _ = _logits(11)
    beta, weight = torch.rand(N) * 2, torch.rand(N)
    inter, intra = ref_dist_parts(s, t, 1.0)
    module = DISTLoss()
    set_hyperparameter(module, "beta", beta)
    set_hyperparameter(module, "weight", weight)
    expected = (weight.double() * (beta.double() * inter + intra)).mean()
    torch.testing.assert_close(module(s.double(), t.double()), expected)


def test_dist_bad_inputs() -> None:
    s, t, _ = _logits(12)
    with pytest.raises(ValueError, match="`gamma` weights the intra-class relation"):
        dist_loss(s, t, gamma=torch.ones(N))
    with pytest.raises(ValueError, match="beta"):
        dist_loss(s, t, beta=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        dist_loss(s.unsqueeze(0), t.unsqueeze(0))
    with pytest.raises(ValueError, match="finite"):
        dist_loss(s, torch.full_like(t, float("nan")))
    with pytest.raises(ValueError, match="gamma"):
        DISTLoss(gamma=-0.5)


# ========================================================================================== logit standardisation
@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_with_logit_standardization_equals_the_official_code(dtype: torch.dtype) -> None:
    s, t, _ = _logits(13)
    assert_value_and_gradient(
        lambda a, b: kd_loss(a, b, 2.0, logit_standardization=True),
        lambda a, b: official_kd_standardized(a, b, 2.0),
        s,
        t,
        dtype=dtype,
    )


def test_kd_with_logit_standardization_equals_kd_of_the_z_scores() -> None:
    s, t, _ = _logits(14)
    z = lambda v: (v - v.mean(-1, keepdim=True)) / (1e-7 + v.std(-1, keepdim=True))  # noqa: E731
    assert_value_and_gradient(
        lambda a, b: kd_loss(a, b, 3.0, reduction="none", logit_standardization=True),
        lambda a, b: ref_kd(z(a), z(b), 3.0),
        s,
        t,
    )


def test_dkd_with_logit_standardization_equals_the_official_code() -> None:
    s, t, y = _logits(15)
    assert_value_and_gradient(
        lambda a, b, c: dkd_loss(a, b, c, 1.0, 8.0, 2.0, logit_standardization=True),
        lambda a, b, c: official_dkd_standardized(a, b, c, 1.0, 8.0, 2.0),
        s,
        t,
        y,
    )


def test_logit_standardization_is_invariant_to_positive_affine_maps_per_sample() -> None:
    s, t, y = _logits(16)
    s, t = s.double(), t.double()
    a_s, b_s = torch.rand(N, 1).double() * 5 + 0.1, torch.randn(N, 1).double() * 10
    a_t, b_t = torch.rand(N, 1).double() * 5 + 0.1, torch.randn(N, 1).double() * 10
    for fn in (
        lambda u, v: kd_loss(u, v, 2.0, reduction="none", logit_standardization=True),
        lambda u, v: dkd_loss(u, v, y, reduction="none", logit_standardization=True),
    ):
        torch.testing.assert_close(fn(a_s * s + b_s, a_t * t + b_t), fn(s, t), rtol=1e-6, atol=1e-8)
    # without the option KD is not scale invariant (so the test above is not vacuous)
    assert not torch.allclose(kd_loss(3.0 * s, t), kd_loss(s, t))


def test_logit_standardization_is_off_by_default_and_the_modules_pass_it() -> None:
    s, t, y = _logits(17)
    assert not KDLoss().logit_standardization and not DKDLoss().logit_standardization
    torch.testing.assert_close(KDLoss(temperature=2.0)(s, t), kd_loss(s, t, 2.0))
    torch.testing.assert_close(
        KDLoss(temperature=2.0, weight=9.0, logit_standardization=True)(s, t),
        9.0 * kd_loss(s, t, 2.0, logit_standardization=True),
    )
    torch.testing.assert_close(
        DKDLoss(temperature=2.0, warmup_epochs=0, logit_standardization=True)(s, t, y),
        dkd_loss(s, t, y, 1.0, 8.0, 2.0, logit_standardization=True),
    )
    assert "logit_standardization=True" in repr(KDLoss(logit_standardization=True))


def test_standardized_kd_per_sample_temperature_and_weight_equal_scalar_loop() -> None:
    s, t, _ = _logits(32)
    assert_per_sample_equals_scalar_loop(
        lambda: KDLoss(logit_standardization=True),
        {"temperature": torch.rand(N) * 3 + 0.5, "weight": torch.rand(N)},
        s,
        t,
    )


def test_standardize_logits_constant_rows_and_bad_inputs() -> None:
    z = torch.full((2, 4), 3.0, requires_grad=True)
    out = standardize_logits(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, 4)) and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="at least 2 classes"):
        kd_loss(torch.randn(3, 1), torch.randn(3, 1), logit_standardization=True)
    with pytest.raises(TypeError, match="True or False"):
        KDLoss(logit_standardization=1)  # type: ignore[arg-type]


# ===================================================================================================== Margin-MSE
def _scores(seed: int, negatives: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if negatives is None else (N, negatives)
    return (
        torch.randn(N, generator=g),
        torch.randn(*shape, generator=g),
        torch.randn(N, generator=g) * 5,
        (torch.randn(*shape, generator=g) * 5),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negatives", [None, 3])
def test_margin_mse_value_and_gradient_against_naive_loop(dtype: torch.dtype, negatives: int | None) -> None:
    sp, sn, tp, tn = _scores(18, negatives)
    assert_value_and_gradient(
        lambda a, b, c, d: margin_mse_loss(a, b, c, d, reduction="none"), ref_margin_mse, sp, sn, tp, tn, dtype=dtype
    )
    assert_value_and_gradient(
        lambda a, b, c, d: margin_mse_loss(b, a, c, d, reduction="none"),
        lambda a, b, c, d: ref_margin_mse(b, a, c, d),
        sn,
        sp,
        tp,
        tn,
        dtype=dtype,
    )  # gradient in the negative scores too


@pytest.mark.parametrize("negatives", [None, 4])
def test_margin_mse_equals_the_official_code(negatives: int | None) -> None:
    sp, sn, tp, tn = _scores(19, negatives)
    if negatives is None:
        expected = official_margin_mse(sp, sn, tp, tn)
    else:  # the official loss on equal-size tensors: repeat each positive for its negatives
        expected = official_margin_mse(sp[:, None].expand_as(sn), sn, tp[:, None].expand_as(tn), tn)
    torch.testing.assert_close(margin_mse_loss(sp, sn, tp, tn), expected)


def test_margin_mse_is_zero_when_the_margins_agree() -> None:
    sp, sn, _, _ = _scores(20, 3)
    offset = torch.randn(N) * 100  # the teacher scores on another scale offset, per query
    loss = margin_mse_loss(sp, sn, sp + offset, sn + offset[:, None])
    assert float(loss) < 1e-9
    assert float(margin_mse_loss(sp, sn, sp + 1.0, sn)) == pytest.approx(1.0)


def test_margin_mse_module_per_query_weight() -> None:
    sp, sn, tp, tn = _scores(21, None)
    weight = torch.rand(N)
    module = MarginMSELoss()
    set_hyperparameter(module, "weight", weight)
    torch.testing.assert_close(module(sp, sn, tp, tn), (weight * ref_margin_mse(sp, sn, tp, tn).float()).mean())


def test_margin_mse_bad_inputs() -> None:
    sp, sn, tp, tn = _scores(22, None)
    with pytest.raises(ValueError, match=r"one score per query, shape \(N,\)"):
        margin_mse_loss(sp[:, None], sn, tp, tn)
    with pytest.raises(ValueError, match="M negatives per query"):
        margin_mse_loss(sp, sn[:-1], tp, tn)
    with pytest.raises(ValueError, match="same shape"):
        margin_mse_loss(sp, sn, tp[:-1], tn)
    with pytest.raises(ValueError, match="finite"):
        margin_mse_loss(sp, sn, tp, torch.full_like(tn, float("inf")))
    with pytest.raises(TypeError, match="student_negative"):
        margin_mse_loss(sp, sn.long(), tp, tn)


# ========================================================================================== multi-teacher (MTARD)
def _teachers(seed: int, k: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 4.0, k).reshape(-1, 1, 1)
    return torch.randn(N, C, generator=g), torch.randn(k, N, C, generator=g) * scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_teacher_student", [False, True])
def test_multi_teacher_kd_against_naive_loop(dtype: torch.dtype, per_teacher_student: bool) -> None:
    s, t = _teachers(23)
    if per_teacher_student:
        s = s + torch.randn(3, N, C)
    temps = [1.0, 2.5, 4.0]
    weights = torch.tensor([0.2, 0.5, 0.3])
    assert_value_and_gradient(
        lambda a, b: multi_teacher_kd_losses(a, b, torch.tensor(temps), reduction="none"),
        lambda a, b: ref_multi_teacher(a, b, temps),
        s,
        t,
        dtype=dtype,
    )
    assert_value_and_gradient(
        lambda a, b: multi_teacher_kd_loss(a, b, torch.tensor(temps), weights),
        lambda a, b: (weights.double()[:, None] * ref_multi_teacher(a, b, temps)).sum(0).mean(),
        s,
        t,
        dtype=dtype,
    )


def test_multi_teacher_kd_equals_the_official_kl_times_classes() -> None:
    """MTARD averages the elementwise KL over samples and classes (and adds 1e-5 in the log): ours / C."""
    s, t = _teachers(24, k=2)
    ours = multi_teacher_kd_losses(s.double(), t.double(), torch.tensor([1.0, 3.0]))
    for k, temp in enumerate((1.0, 3.0)):
        torch.testing.assert_close(ours[k] / C, official_mtard_kl(s.double(), t[k].double(), temp, eps=0.0))
        torch.testing.assert_close(ours[k] / C, official_mtard_kl(s.double(), t[k].double(), temp), atol=1e-4, rtol=0)


def test_entropy_balance_step_follows_the_official_two_teacher_sign_rule() -> None:
    _, t = _teachers(25, k=2)
    temps = torch.tensor([1.5, 2.0])
    h = teacher_entropies(t, temps)
    new = entropy_balance_step(h, temps, step_size=0.1)
    h_adv, h_nat = float(h[0]), float(h[1])
    sign = (h_adv / h_nat > 1) - (h_adv / h_nat < 1)
    torch.testing.assert_close(new, torch.tensor([1.5 - 0.1 * sign, 2.0 + 0.1 * sign]))
    clipped = entropy_balance_step(h, torch.tensor([1.0, 10.0]), step_size=5.0, min_temperature=1.0)
    assert clipped.min() >= 1.0 and clipped.max() <= 10.0
    equal = entropy_balance_step(torch.tensor([0.7, 0.7, 0.7]), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(equal, torch.tensor([1.0, 2.0, 3.0]))  # entropies matched: nothing moves


def test_teacher_entropies_against_a_loop() -> None:
    _, t = _teachers(26)
    temps = torch.tensor([1.0, 2.0, 0.5])
    expected = []
    for k in range(3):
        p = torch.softmax(t[k].double() / temps[k], dim=-1)
        expected.append(-(p * p.log()).sum(-1).mean())
    torch.testing.assert_close(teacher_entropies(t.double(), temps.double()), torch.stack(expected))


def test_loss_balance_step_matches_the_official_update() -> None:
    losses, initial, weights = torch.tensor([0.9, 0.3]), torch.tensor([1.0, 1.2]), torch.tensor([0.6, 0.4])
    lhat = [0.9 / 1.0, 0.3 / 1.2]
    avg = sum(lhat) / 2
    inv = [v / avg for v in lhat]
    w = [0.6 - 0.025 * (0.6 - inv[0] / sum(inv)), 0.4 - 0.025 * (0.4 - inv[1] / sum(inv))]
    w = [v / sum(w) for v in w]
    torch.testing.assert_close(loss_balance_step(losses, initial, weights), torch.tensor(w))
    # the conference version for two teachers: w_nat <- w_nat - η (w_nat - r_nat), w_adv = 1 - w_nat
    w_nat = 0.4 - 0.025 * (0.4 - lhat[1] / sum(lhat))
    torch.testing.assert_close(loss_balance_step(losses, initial, weights)[1], torch.tensor(w_nat))


def test_balanced_module_replays_the_official_training_loop() -> None:
    """Five training steps of two teachers (robust teacher on adversarial inputs, clean one on natural inputs): the
    loss values, weights and temperatures follow the official loop's bookkeeping step by step."""
    g = torch.Generator().manual_seed(27)
    steps = []
    for _ in range(5):
        s_adv, s_nat = torch.randn(N, C, generator=g).double(), torch.randn(N, C, generator=g).double()
        t_adv, t_nat = torch.randn(N, C, generator=g).double() * 0.7, torch.randn(N, C, generator=g).double() * 3
        steps.append(((s_adv, s_nat), (t_adv, t_nat)))
    # the step sizes are float32 hyperparameter buffers (0.3 is stored as 0.30000001): replay with those values
    temp_lr, weight_lr = float(torch.tensor(0.3)), float(torch.tensor(0.025))
    history = official_two_teacher_run(
        [st for st, _ in steps], [te for _, te in steps], weight_lr=weight_lr, temp_lr=temp_lr
    )
    loss = BalancedMultiTeacherKDLoss(num_teachers=2, temperature_step=0.3).double()
    for ((s_adv, s_nat), (t_adv, t_nat)), (total, w_adv, w_nat, temp_adv, temp_nat) in zip(steps, history):
        value = loss(torch.stack([s_adv, s_nat]).double(), torch.stack([t_adv, t_nat]).double())
        assert float(value) == pytest.approx(total, rel=1e-9)
        assert loss.teacher_weights.tolist() == pytest.approx([w_adv, w_nat], rel=1e-9)
        assert loss.teacher_temperatures.tolist() == pytest.approx([temp_adv, temp_nat], rel=1e-9)
    assert loss.teacher_temperatures[1] > 1.0  # the sharp clean teacher was softened towards the other's entropy


def test_balanced_module_eval_mode_and_disabled_balances_keep_the_state() -> None:
    s, t = _teachers(28, k=2)
    loss = BalancedMultiTeacherKDLoss(num_teachers=2, temperature=2.0).eval()
    loss(s, t)
    assert loss.teacher_temperatures.tolist() == [2.0, 2.0] and loss.teacher_weights.tolist() == [0.5, 0.5]
    assert torch.isnan(loss.initial_losses).all()
    frozen = BalancedMultiTeacherKDLoss(
        num_teachers=2, teacher_weights=[1.0, 3.0], balance_temperatures=False, balance_losses=False
    )
    value = frozen(s, t)
    torch.testing.assert_close(frozen.teacher_weights, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(value, multi_teacher_kd_loss(s, t, 1.0, torch.tensor([0.25, 0.75])))


def test_balanced_module_state_is_checkpointed_and_steps_are_hyperparameters() -> None:
    s, t = _teachers(29, k=2)
    loss = BalancedMultiTeacherKDLoss(num_teachers=2, temperature_step=0.2)
    for _ in range(3):
        loss(s, t)
    restored = BalancedMultiTeacherKDLoss(num_teachers=2)
    restored.load_state_dict(loss.state_dict())
    for name in ("teacher_temperatures", "teacher_weights", "initial_losses", "temperature_step"):
        torch.testing.assert_close(getattr(restored, name), getattr(loss, name))
    holder = nn.Module()
    holder.kd = restored
    assert set(named_hyperparameters(holder)) == {
        "kd.weight",
        "kd.temperature_step",
        "kd.weight_step",
        "kd.min_temperature",
        "kd.max_temperature",
    }


def test_multi_teacher_bad_inputs() -> None:
    s, t = _teachers(30, k=2)
    with pytest.raises(ValueError, match=r"stacked as \(K, N, C\)"):
        multi_teacher_kd_losses(s, t.mean(0))
    with pytest.raises(ValueError, match="one student output for every teacher"):
        multi_teacher_kd_losses(s[:-1], t)
    with pytest.raises(ValueError, match=r"one value per teacher, shape \(2,\)"):
        multi_teacher_kd_losses(s, t, torch.ones(3))
    with pytest.raises(ValueError, match="temperatures"):
        multi_teacher_kd_losses(s, t, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="built for 3 teachers"):
        BalancedMultiTeacherKDLoss(num_teachers=3)(s, t)
    with pytest.raises(ValueError, match="Swap them"):
        BalancedMultiTeacherKDLoss(num_teachers=2, min_temperature=5.0, max_temperature=2.0)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        BalancedMultiTeacherKDLoss(num_teachers=2, teacher_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="weight_step"):
        BalancedMultiTeacherKDLoss(num_teachers=2, weight_step=1.5)
    with pytest.raises(ValueError, match="`teacher_logits` holds 1 non-finite"):
        teacher_entropies(t.index_put((torch.tensor(0), torch.tensor(0), torch.tensor(0)), torch.tensor(float("nan"))))
    with pytest.raises(ValueError, match="`losses`"):
        loss_balance_step(torch.tensor([1.0, -1.0]), torch.ones(2), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"shape \(K,\), one value per teacher"):
        loss_balance_step(torch.ones(2), torch.ones(3), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="`temperatures`"):
        entropy_balance_step(torch.ones(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="`logits` holds"):
        standardize_logits(torch.tensor([[1.0, float("inf")]]))


def _ddp_balance(rank: int, world_size: int, s: Tensor, t: Tensor) -> dict[str, Tensor]:
    half = s.shape[0] // world_size
    rows = slice(rank * half, (rank + 1) * half)
    loss = BalancedMultiTeacherKDLoss(num_teachers=t.shape[0], temperature_step=0.1)
    for _ in range(3):
        loss(s[rows], t[:, rows])
    return {"temperatures": loss.teacher_temperatures, "weights": loss.teacher_weights}


@pytest.mark.ddp
def test_balanced_module_under_two_processes_matches_one_process_on_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(31)
    s = torch.randn(8, C, generator=g)
    t = torch.randn(2, 8, C, generator=g) * torch.tensor([0.5, 3.0]).reshape(-1, 1, 1)
    single = BalancedMultiTeacherKDLoss(num_teachers=2, temperature_step=0.1)
    for _ in range(3):
        single(s, t)
    results = run_distributed(_ddp_balance, s, t)
    for result in results:  # every process holds the same state, the single-process one
        torch.testing.assert_close(result["temperatures"], single.teacher_temperatures)
        torch.testing.assert_close(result["weights"], single.teacher_weights)


# ================================================================================= training through the mixin
class _Student(DistillationMixin, pl.LightningModule):
    def __init__(self, teacher: nn.Module, loss: nn.Module, cross_entropy: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.cross_entropy = cross_entropy
        self.configure_distillation(teacher, loss=loss)
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = self.distillation_loss(logits, self.teacher_forward(x), y)
        if self.cross_entropy:
            loss = loss + F.cross_entropy(logits, y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)


@pytest.mark.parametrize(
    ("loss", "cross_entropy"),
    [(PLDLoss(temperature=1.0), False), (DISTLoss(beta=1.0, gamma=1.0, temperature=1.0), True)],
    ids=["pld", "dist"],
)
def test_short_training_run_through_the_mixin(tmp_path, loss: nn.Module, cross_entropy: bool) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(64, 8)
    y = teacher(x).argmax(-1).detach()
    model = _Student(teacher, loss, cross_entropy)
    assert model.kd is loss
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    cpu_trainer(tmp_path, max_epochs=6).fit(model, loader)
    first, last = sum(model.losses[:4]) / 4, sum(model.losses[-4:]) / 4
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert last < 0.8 * first, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    with torch.no_grad():
        agreement = (model.net(x).argmax(-1) == y).float().mean()
    assert agreement > 0.6


# ---------------------------------------------------------------------------------------- presets of the module
LOGIT_PRESETS = {
    "pld": (PLDLoss, 0.0),
    "dist": (DISTLoss, 1.0),
    "kd_ls": (KDLoss, 1.0),
    "dkd_ls": (DKDLoss, 1.0),
}


@pytest.mark.parametrize("method", sorted(LOGIT_PRESETS))
def test_logit_presets_build_their_loss_and_train_through_the_module(tmp_path, method):
    from lightning_losses.demos import ConvNet
    from lightning_losses.modules.distillation import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule(ConvNet(width=4), ConvNet(width=8), method=method, num_classes=10, scheduler="none")
    loss_cls, ce_weight = LOGIT_PRESETS[method]
    assert type(module.kd) is loss_cls and float(module.get_hyperparameter("ce_weight")) == ce_weight
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    terms, logits, _ = module.compute_losses((x, y))
    with torch.no_grad():
        teacher_logits = module.teacher(x)
    extras = {"target": y} if method in ("pld", "dkd_ls") else {}
    torch.testing.assert_close(terms["kd"], module.kd(logits, teacher_logits, **extras))  # as the mixin calls it
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))


def test_module_refuses_settings_a_preset_does_not_have():
    from lightning_losses.demos import ConvNet
    from lightning_losses.modules.distillation import DistillationModule

    with pytest.raises(ValueError, match=r"method='kd' has no setting \['alpha'\]"):
        DistillationModule(ConvNet(width=4), ConvNet(width=8), method="kd", alpha=2.0)
    with pytest.raises(ValueError, match=r"method='pld' has no setting \['warmup_epochs'\]"):
        DistillationModule(ConvNet(width=4), ConvNet(width=8), method="pld", warmup_epochs=3)

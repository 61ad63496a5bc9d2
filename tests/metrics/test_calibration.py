"""Calibration metrics: against hand-written loops, sklearn, netcal and torchmetrics; streaming; bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_losses.functional.calibration import (
    average_calibration_error,
    brier_score,
    calibration_bins,
    classwise_calibration_error,
    debiased_calibration_error,
    expected_calibration_error,
    ks_calibration_error,
    negative_log_likelihood,
    to_probabilities,
)
from lightning_losses.metrics.calibration import (
    AverageCalibrationError,
    BrierScore,
    CalibrationError,
    ClasswiseCalibrationError,
    DebiasedCalibrationError,
    KSCalibrationError,
    NegativeLogLikelihood,
)


def _random(n: int = 3000, c: int = 5, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target


# ----------------------------------------------------------------------------- naive references (plain loops)


def _naive_bins(conf: list[float], correct: list[float], n_bins: int) -> list[list[tuple[float, float]]]:
    bins: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for s, c in zip(conf, correct):
        b = n_bins - 1 if s >= 1.0 else math.floor(s * n_bins)
        bins[b].append((s, c))
    return bins


def _naive_ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int, norm: str = "l1") -> float:
    conf, correct = [], []
    for row, y in zip(probs.tolist(), target.tolist()):
        k = max(range(len(row)), key=lambda j: row[j])
        conf.append(row[k])
        correct.append(1.0 if k == y else 0.0)
    return _naive_error(conf, correct, n_bins, norm)


def _naive_error(conf: list[float], correct: list[float], n_bins: int, norm: str) -> float:
    n = len(conf)
    total, worst = 0.0, 0.0
    for members in _naive_bins(conf, correct, n_bins):
        if not members:
            continue
        gap = abs(sum(c for _, c in members) / len(members) - sum(s for s, _ in members) / len(members))
        worst = max(worst, gap)
        total += len(members) / n * (gap if norm == "l1" else gap**2)
    return {"l1": total, "l2": math.sqrt(total), "max": worst}[norm]


# ----------------------------------------------------------------------------- hand-computed small cases


def test_ece_hand_case_with_confidence_one_and_empty_bins() -> None:
    # confidences 1.0 (correct), 1.0 (wrong), 0.55 (correct); 10 bins: bin 9 holds both 1.0, bin 5 holds 0.55,
    # the other 8 bins are empty.
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.55, 0.45]])
    target = torch.tensor([0, 0, 0])
    count, _, _ = calibration_bins(probs, target, 10)
    assert count.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    # bin 9: acc 0.5, conf 1.0 -> gap 0.5, weight 2/3; bin 5: acc 1, conf 0.55 -> gap 0.45, weight 1/3
    expected = 2 / 3 * 0.5 + 1 / 3 * 0.45
    assert float(expected_calibration_error(probs, target, 10)) == pytest.approx(expected, abs=1e-6)
    assert float(expected_calibration_error(probs, target, 10, norm="max")) == pytest.approx(0.5, abs=1e-6)
    l2 = math.sqrt(2 / 3 * 0.25 + 1 / 3 * 0.45**2)
    assert float(expected_calibration_error(probs, target, 10, norm="l2")) == pytest.approx(l2, abs=1e-6)
    assert float(average_calibration_error(probs, target, 10)) == pytest.approx((0.5 + 0.45) / 2, abs=1e-6)


def test_streaming_metric_puts_confidence_one_in_last_bin() -> None:
    metric = CalibrationError(n_bins=4)
    metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert metric.count.tolist() == [0, 0, 0, 1]
    assert float(metric.compute()) == 0.0  # perfectly confident and right


def test_perfectly_calibrated_bins_give_zero() -> None:
    # In each bin the accuracy equals the confidence exactly: 4 samples at 0.75 with 3 right.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    target = torch.tensor([0, 0, 0, 1])
    assert float(expected_calibration_error(probs, target, 15)) == pytest.approx(0.0, abs=1e-7)
    assert float(classwise_calibration_error(probs, target, 15)) == pytest.approx(0.0, abs=1e-7)
    assert float(ks_calibration_error(probs, target)) == pytest.approx(0.0, abs=1e-7)


def test_binary_input_is_two_column_form() -> None:
    p = torch.tensor([0.9, 0.2, 0.6, 0.45])
    y = torch.tensor([1, 0, 0, 1])
    two = torch.stack([1 - p, p], 1)
    for fn in (expected_calibration_error, classwise_calibration_error, average_calibration_error):
        assert torch.equal(fn(p, y, n_bins=5), fn(two, y, n_bins=5))
    # top-label confidence of a binary problem is max(p, 1 - p): 0.9, 0.8, 0.6, 0.55, correct 1, 1, 0, 0
    assert float(expected_calibration_error(p, y, 5)) == pytest.approx(_naive_ece(two, y, 5), abs=1e-6)
    # binary Brier is mean (p - y)^2
    assert float(brier_score(p, y)) == pytest.approx(float(((p - y) ** 2).mean()), abs=1e-7)
    # logits path: sigmoid
    z = torch.logit(p)
    assert torch.allclose(expected_calibration_error(z, y, 5, input_type="logits"), expected_calibration_error(p, y, 5))


def test_equal_mass_bins_hand_case() -> None:
    # confidences 0.55 .. 0.95, 2 bins of 3: {0.55, 0.6, 0.7} and {0.8, 0.9, 0.95}
    conf = torch.tensor([0.9, 0.55, 0.8, 0.6, 0.95, 0.7])
    probs = torch.stack([conf, 1 - conf], 1)
    target = torch.tensor([0, 1, 0, 0, 1, 0])  # correct: 1, 0, 1, 1, 0, 1
    low_gap = abs(2 / 3 - (0.55 + 0.6 + 0.7) / 3)
    high_gap = abs(2 / 3 - (0.8 + 0.9 + 0.95) / 3)
    got = expected_calibration_error(probs, target, 2, binning="quantile")
    assert float(got) == pytest.approx(0.5 * low_gap + 0.5 * high_gap, abs=1e-6)
    metric = CalibrationError(n_bins=2, binning="quantile")
    metric.update(probs[:4], target[:4])
    metric.update(probs[4:], target[4:])
    assert float(metric.compute()) == pytest.approx(float(got), abs=1e-6)
    assert metric.memory_per_sample_bytes == 8 and CalibrationError().memory_per_sample_bytes == 0


def test_ks_hand_case() -> None:
    # sorted confidences 0.6 (wrong), 0.8 (right), 0.9 (right): cumsum of (c - s)/3 = -0.2, -0.133, -0.1
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]])
    target = torch.tensor([0, 0, 0])
    assert float(ks_calibration_error(probs, target)) == pytest.approx(0.6 / 3, abs=1e-6)


def test_debiased_estimator_hand_case_and_bias_reduction() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    target = torch.tensor([0, 1, 1, 1])
    # bin of 0.9: acc 0.5, (0.5-0.9)^2 - 0.25/1 = -0.09; bin of 0.6: acc 1, 0.16 - 0; weights 1/2 each
    squared = 0.5 * (-0.09) + 0.5 * 0.16
    assert float(debiased_calibration_error(probs, target, 10, squared=True)) == pytest.approx(squared, abs=1e-6)
    assert float(debiased_calibration_error(probs, target, 10)) == pytest.approx(math.sqrt(squared), abs=1e-6)
    # On a perfectly calibrated model the plug-in l2 error is biased upwards; the debiased one much less.
    g = torch.Generator().manual_seed(1)
    conf = 0.5 + 0.5 * torch.rand(400, generator=g)
    correct = torch.bernoulli(conf, generator=g)
    probs = torch.stack([conf, 1 - conf], 1)
    target = (1 - correct).long()
    plug_in = float(expected_calibration_error(probs, target, 15, norm="l2")) ** 2
    debiased = float(debiased_calibration_error(probs, target, 15, squared=True))
    assert abs(debiased) < plug_in / 3


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_matches_naive_loop(norm: str, n_bins: int) -> None:
    logits, target = _random(500)
    probs = logits.softmax(1)
    got = expected_calibration_error(probs, target, n_bins, norm=norm)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(_naive_ece(probs, target, n_bins, norm), abs=1e-12)


def test_classwise_matches_naive_loop() -> None:
    logits, target = _random(400, 4)
    probs = logits.softmax(1)
    per_class = [
        _naive_error(probs[:, k].tolist(), (target == k).double().tolist(), 10, "l1") for k in range(probs.shape[1])
    ]
    got = classwise_calibration_error(probs, target, 10)
    assert float(got) == pytest.approx(sum(per_class) / len(per_class), abs=1e-12)


def test_against_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    logits, target = _random(3000, 6)
    probs = logits.float().softmax(1)
    for norm in ("l1", "l2", "max"):
        ref = tm.multiclass_calibration_error(probs, target, 6, n_bins=15, norm=norm)
        assert torch.allclose(expected_calibration_error(probs, target, 15, norm=norm), ref, atol=1e-6)  # type: ignore[arg-type]


def test_against_netcal() -> None:
    metrics = pytest.importorskip("netcal.metrics")
    logits, target = _random(3000, 5)
    probs = logits.softmax(1)
    p, y = probs.numpy(), target.numpy()
    assert float(expected_calibration_error(probs, target, 15)) == pytest.approx(metrics.ECE(bins=15).measure(p, y))
    mce = metrics.MCE(bins=15).measure(p, y)
    assert float(expected_calibration_error(probs, target, 15, norm="max")) == pytest.approx(mce)
    assert float(average_calibration_error(probs, target, 15)) == pytest.approx(metrics.ACE(bins=15).measure(p, y))


def test_against_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    calibration = pytest.importorskip("sklearn.calibration")
    logits, target = _random(2000, 4)
    probs = logits.softmax(1)
    assert float(negative_log_likelihood(probs, target)) == pytest.approx(sk.log_loss(target, probs, labels=range(4)))
    assert float(negative_log_likelihood(logits, target, "logits")) == pytest.approx(
        sk.log_loss(target, probs, labels=range(4))
    )
    onehot = F.one_hot(target, 4).double()
    assert float(brier_score(probs, target)) == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()))
    p_bin = probs[:, 0] / probs[:, :2].sum(1)
    y_bin = (torch.rand(2000) < p_bin).long()
    assert float(brier_score(p_bin, y_bin)) == pytest.approx(sk.brier_score_loss(y_bin.numpy(), p_bin.numpy()))
    # reliability curve of one class: sklearn's non-empty bins = our per-bin means
    prob_true, prob_pred = calibration.calibration_curve((target == 2).numpy(), probs[:, 2].numpy(), n_bins=10)
    count, conf, acc = calibration_bins(probs, target, 10, classwise=True)
    filled = count[2] > 0
    np.testing.assert_allclose((acc[2] / count[2])[filled].numpy(), prob_true, atol=1e-12)
    np.testing.assert_allclose((conf[2] / count[2])[filled].numpy(), prob_pred, atol=1e-12)


def test_torch_uncertainty_reference() -> None:
    tu = pytest.importorskip(
        "torch_uncertainty.metrics", reason="torch-uncertainty needs torchvision, not installable beside this torch"
    )
    logits, target = _random(1000, 5)
    ref = tu.CalibrationError(task="multiclass", num_classes=5, n_bins=15)
    ref.update(logits.float().softmax(1), target)
    assert float(expected_calibration_error(logits.float().softmax(1), target, 15)) == pytest.approx(
        float(ref.compute())
    )


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    ("metric", "fn"),
    [
        (lambda: CalibrationError(n_bins=15), lambda p, y: expected_calibration_error(p, y, 15)),
        (lambda: CalibrationError(10, norm="l2"), lambda p, y: expected_calibration_error(p, y, 10, norm="l2")),
        (lambda: CalibrationError(10, norm="max"), lambda p, y: expected_calibration_error(p, y, 10, norm="max")),
        (
            lambda: CalibrationError(10, binning="quantile"),
            lambda p, y: expected_calibration_error(p, y, 10, binning="quantile"),
        ),
        (lambda: ClasswiseCalibrationError(5, 10), lambda p, y: classwise_calibration_error(p, y, 10)),
        (lambda: AverageCalibrationError(10), lambda p, y: average_calibration_error(p, y, 10)),
        (lambda: DebiasedCalibrationError(10), lambda p, y: debiased_calibration_error(p, y, 10)),
        (lambda: KSCalibrationError(), ks_calibration_error),
        (lambda: BrierScore(), brier_score),
        (lambda: NegativeLogLikelihood(), negative_log_likelihood),
    ],
)
def test_streaming_equals_all_at_once(metric, fn) -> None:  # type: ignore[no-untyped-def]
    logits, target = _random(2000, 5)
    probs = logits.float().softmax(1)
    m = metric()
    for chunk_p, chunk_y in zip(probs.split(333), target.split(333)):
        m.update(chunk_p, chunk_y)
    torch.testing.assert_close(m.compute().double(), fn(probs, target).double(), atol=1e-6, rtol=0)


def test_streaming_state_is_constant_memory() -> None:
    metric = CalibrationError(n_bins=15)
    logits, target = _random(5000, 10)
    sizes = []
    for p, y in zip(logits.softmax(1).split(1000), target.split(1000)):
        metric.update(p, y)
        sizes.append(sum(t.numel() for t in (metric.count, metric.confidence_sum, metric.correct_sum)))
    assert sizes == [45] * 5
    # the per-bin sums hold exactly the all-samples statistics
    count, conf, acc = calibration_bins(logits.softmax(1), target, 15)
    assert torch.equal(metric.count, count)
    torch.testing.assert_close(metric.confidence_sum, conf, atol=1e-9, rtol=0)
    assert torch.equal(metric.correct_sum, acc)


def test_logits_and_probs_agree() -> None:
    logits, target = _random(300, 4)
    for fn in (expected_calibration_error, classwise_calibration_error, brier_score, negative_log_likelihood):
        torch.testing.assert_close(fn(logits, target, input_type="logits"), fn(logits.softmax(1), target))
    m = CalibrationError(input_type="logits")
    m.update(logits, target)
    torch.testing.assert_close(
        m.compute().double(), expected_calibration_error(logits.softmax(1), target), atol=1e-6, rtol=0
    )


def test_float16_inputs_are_upcast() -> None:
    logits, target = _random(300, 4)
    half = expected_calibration_error(logits.half(), target, input_type="logits")
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(
        float(expected_calibration_error(logits.half().float(), target, input_type="logits"))
    )


# ----------------------------------------------------------------------------- bad input


def test_logits_given_as_probs_raise() -> None:
    with pytest.raises(ValueError, match="look like logits: pass input_type='logits'"):
        expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


def test_probs_given_as_logits_raise() -> None:
    with pytest.raises(ValueError, match="look like probabilities"):
        expected_calibration_error(torch.tensor([[0.3, 0.7]]), torch.tensor([0]), input_type="logits")


def test_unnormalised_probs_raise() -> None:
    with pytest.raises(ValueError, match="rows do not sum to 1"):
        brier_score(torch.tensor([[0.3, 0.3]]), torch.tensor([0]))


def test_nan_and_shapes_raise() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        expected_calibration_error(torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"shape \(N, C\) with C >= 2"):
        expected_calibration_error(torch.rand(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D integer tensor of 2 class indices"):
        expected_calibration_error(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="`n_bins` must be a positive integer"):
        expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), n_bins=0)
    with pytest.raises(ValueError, match="`norm` must be"):
        CalibrationError(norm="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected predictions for 3 classes"):
        ClasswiseCalibrationError(3).update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="input_type"):
        to_probabilities(torch.rand(2, 2), "scores")  # type: ignore[arg-type]


def test_validate_args_false_gives_the_same_value_and_still_checks_shapes() -> None:
    logits, target = _random(500, 4)
    for input_type, preds in (("logits", logits), ("probs", logits.softmax(1)), ("logits", logits[:, 0])):
        fast, checked = (
            CalibrationError(validate_args=False, input_type=input_type),
            CalibrationError(input_type=input_type),
        )  # type: ignore[arg-type]
        binary_target = target.clamp(max=1) if preds.ndim == 1 else target
        fast.update(preds, binary_target)
        checked.update(preds, binary_target)
        assert torch.equal(fast.compute(), checked.compute())
    with pytest.raises(ValueError, match=r"`target` must be a 1-D integer tensor of 500 class indices"):
        CalibrationError(validate_args=False).update(logits.softmax(1), target[:10])

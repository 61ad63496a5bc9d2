"""The fast top-label path of the binned calibration metrics (numpy argmax + bincount on CPU, torch elsewhere)
against a naive per-sample reference: the same bins, counts and float64 sums bit for bit, and the same errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import lightning_losses.functional.calibration as fc
from lightning_losses.functional.calibration import _binned_sums, _top_label, _top_label_bins, to_probabilities
from lightning_losses.metrics.calibration import (
    AverageCalibrationError,
    CalibrationError,
    DebiasedCalibrationError,
)


@pytest.fixture(params=["numpy", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force the numpy argmax (any thread count) or torch.max."""
    monkeypatch.setattr(fc, "_NUMPY_ARGMAX_MAX_THREADS", 10**6 if request.param == "numpy" else -1)
    return str(request.param)


def _inputs(n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows, rows whose maximum sits exactly on bin edges k / 15 and k / 10, one-hot rows (confidence 1),
    uniform rows and rows with two equal maxima (the first one is the prediction)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.softmax(3 * torch.randn(64, n_classes, generator=g, dtype=torch.float64), dim=1)]
    for m in (15, 10, 5):
        for k in range(1, m + 1):
            v = k / m
            if v < 1 / n_classes:
                continue
            r = torch.full((n_classes,), (1 - v) / (n_classes - 1), dtype=torch.float64)
            r[k % n_classes] = v
            rows.append(r[None])
    rows.append(torch.eye(n_classes, dtype=torch.float64))
    rows.append(torch.full((3, n_classes), 1 / n_classes, dtype=torch.float64))
    tie = torch.full((2 * n_classes, n_classes), 0.2 / (n_classes - 2), dtype=torch.float64)
    for i in range(2 * n_classes):
        a, b = i % n_classes, (i * 7 + 1) % n_classes
        tie[i, a] = tie[i, (a + 1) % n_classes if a == b else b] = 0.4
    rows.append(tie)
    probs = torch.cat(rows)
    target = torch.randint(0, n_classes, (probs.shape[0],), generator=g)
    # targets on the first and on the second of two tied maxima
    first = probs.shape[0] - tie.shape[0]
    for i in range(tie.shape[0]):
        hits = (tie[i] == tie[i].max()).nonzero().flatten()
        target[first + i] = hits[i % 2]
    return probs, target


def _naive_state(
    batches: list[tuple[torch.Tensor, torch.Tensor]], n_bins: int
) -> tuple[list[float], list[float], list[float]]:
    """Per-sample loops: first index of the row maximum, bin min(floor(s * M), M - 1) in the compute dtype, and
    the float64 sums added sample by sample within a batch, batch sums added to the running state."""
    count, conf_sum, correct_sum = [0.0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for probs, target in batches:
        p = probs.float() if probs.dtype != torch.float64 else probs
        scalar = np.float32 if p.dtype == torch.float32 else np.float64
        c, s, a = [0.0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
        for row, y in zip(p.tolist(), target.tolist()):
            best = 0
            for j, v in enumerate(row):
                if v > row[best]:
                    best = j
            conf = row[best]
            b = min(max(math.floor(float(scalar(conf) * scalar(n_bins))), 0), n_bins - 1)
            c[b] += 1.0
            s[b] += float(scalar(conf))
            a[b] += float(best == y)
        for b in range(n_bins):
            count[b] += c[b]
            conf_sum[b] += s[b]
            correct_sum[b] += a[b]
    return count, conf_sum, correct_sum


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n_bins", [1, 15])
@pytest.mark.parametrize("validate_args", [True, False])
def test_binned_state_matches_naive_reference(path: str, dtype: torch.dtype, n_bins: int, validate_args: bool) -> None:
    probs, target = _inputs(5, seed=n_bins)
    probs = probs.to(dtype)
    if dtype in (torch.float16, torch.bfloat16):  # renormalise in the low precision so rows pass the sum check
        probs = (probs.float() / probs.float().sum(1, keepdim=True)).to(dtype)
    batches = [(probs[i : i + 37], target[i : i + 37]) for i in range(0, probs.shape[0], 37)]
    metric = CalibrationError(n_bins=n_bins, validate_args=validate_args)
    for p, y in batches:
        metric.update(p, y)
    count, conf_sum, correct_sum = _naive_state(batches, n_bins)
    assert metric.count.tolist() == count
    assert metric.correct_sum.tolist() == correct_sum
    assert metric.confidence_sum.tolist() == conf_sum  # bit for bit: the same additions in the same order
    expected = fc.calibration_error_from_bins(
        torch.tensor(count, dtype=torch.float64),
        torch.tensor(conf_sum, dtype=torch.float64),
        torch.tensor(correct_sum, dtype=torch.float64),
    ).float()
    assert torch.equal(metric.compute(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_label_is_torch_max_with_ties_and_nan(path: str, dtype: torch.dtype) -> None:
    probs, _ = _inputs(7, seed=3)
    probs = probs.to(dtype)
    probs[5, 2] = float("nan")  # NaN counts as the maximum (first NaN), as in torch.max
    probs[6, [1, 4]] = float("nan")
    probs[7] = 0.0  # confidence exactly 0 (validate_args=False input)
    probs[8, 3] = float("inf")
    confidence, prediction = _top_label(probs)
    ref_conf, ref_pred = probs.max(dim=1)
    assert torch.equal(prediction, ref_pred)
    assert torch.equal(confidence, ref_conf) or torch.allclose(confidence, ref_conf, rtol=0, atol=0, equal_nan=True)
    assert prediction[5] == 2 and prediction[6] == 1 and prediction[7] == 0 and prediction[8] == 3


@pytest.mark.parametrize("n_bins", [1, 15])
def test_top_label_bins_equal_binned_sums_bit_for_bit(path: str, n_bins: int) -> None:
    g = torch.Generator().manual_seed(0)
    # float64 confidences of very different magnitudes: the sums depend on the order of the additions
    confidence = torch.cat(
        [torch.rand(500, generator=g, dtype=torch.float64) ** 8, torch.tensor([0.0, 1.0, 0.5, 1 / 15, 14 / 15])]
    )
    prediction = torch.randint(0, 3, confidence.shape, generator=g)
    target = torch.randint(0, 3, confidence.shape, generator=g)
    sums = _top_label_bins(confidence, prediction, target, n_bins)
    ref = _binned_sums(confidence, (prediction == target).double(), n_bins)
    for got, want in zip(sums, ref):
        assert torch.equal(got, want)
    assert sums[0, 0] >= 1 and sums[0, -1] >= 1  # confidences 0 and 1 land in the first and the last bin


def test_confidence_zero_rows_without_validation(path: str) -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.7, 0.1], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 2])
    metric = CalibrationError(n_bins=4, validate_args=False)
    metric.update(probs, target)
    count, conf_sum, correct_sum = _naive_state([(probs, target)], 4)
    assert metric.count.tolist() == count == [2.0, 0.0, 1.0, 0.0]
    assert metric.correct_sum.tolist() == correct_sum == [1.0, 0.0, 1.0, 0.0]
    assert metric.confidence_sum.tolist() == conf_sum


@pytest.mark.parametrize("metric_cls", [AverageCalibrationError, DebiasedCalibrationError])
def test_other_binned_metrics_share_the_state(path: str, metric_cls: type) -> None:
    probs, target = _inputs(4, seed=1)
    probs = probs.float()
    metric = metric_cls(n_bins=15)
    metric.update(probs, target)
    count, conf_sum, correct_sum = _naive_state([(probs, target)], 15)
    assert metric.count.tolist() == count
    assert metric.confidence_sum.tolist() == conf_sum
    assert metric.correct_sum.tolist() == correct_sum


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[0.9, 0.2, -0.1], [0.5, 0.25, 0.25]]),  # sums to 1, largest value <= 1, one negative value
        torch.tensor([[1.2, -0.1, -0.1], [0.5, 0.25, 0.25]]),
        torch.tensor([[0.5, 0.3, 0.3], [0.5, 0.25, 0.25]]),
        torch.tensor([[float("nan"), 0.5, 0.5], [0.5, 0.25, 0.25]]),
        torch.tensor([[0.5, float("-inf"), 0.5], [0.5, 0.25, 0.25]]),
    ],
)
def test_value_checks_raise_as_to_probabilities(path: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError) as expected:
        to_probabilities(bad)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        CalibrationError().update(bad, torch.tensor([0, 1]))
    CalibrationError(validate_args=False).update(bad, torch.tensor([0, 1]))  # no check, no error


def test_bfloat16_sum_tolerance_follows_the_input_dtype(path: str) -> None:
    # a bfloat16 row that sums to 1 only within bfloat16's precision (deviation above 1e-3, below 2 eps)
    probs = torch.tensor([[0.3359375, 0.3359375, 0.3359375]], dtype=torch.bfloat16)
    assert 1e-3 < abs(float(probs.float().sum()) - 1) < 2 * torch.finfo(torch.bfloat16).eps
    CalibrationError().update(probs, torch.tensor([0]))
    with pytest.raises(ValueError, match="rows do not sum to 1"):
        CalibrationError().update(probs.float(), torch.tensor([0]))


def test_target_out_of_range_raises(path: str) -> None:
    with pytest.raises(ValueError, match=r"class indices outside \[0, 2\)"):
        CalibrationError().update(torch.tensor([[0.6, 0.4]]), torch.tensor([2]))


def test_strided_and_grad_requiring_inputs(path: str) -> None:
    probs, target = _inputs(6, seed=2)
    column_major = probs.float().t().contiguous().t().requires_grad_()  # strides (1, N), and a leaf with grad
    metric = CalibrationError(n_bins=15)
    metric.update(column_major, target)
    count, conf_sum, correct_sum = _naive_state([(probs.float(), target)], 15)
    assert metric.count.tolist() == count
    assert metric.confidence_sum.tolist() == conf_sum
    assert metric.correct_sum.tolist() == correct_sum

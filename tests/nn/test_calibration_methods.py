"""Beta calibration and BBQ (against netcal), the CA calibrator's weighting and initialisation, the smooth ECE
(functional and streaming metric against a naive reference), and the value checks of the bin helpers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_losses.callbacks.calibration import CALIBRATORS, PostHocCalibration
from lightning_losses.functional.calibration import (
    calibration_error_from_bins,
    smooth_calibration_error,
    to_probabilities,
)
from lightning_losses.metrics.calibration import SmoothCalibrationError
from lightning_losses.nn.calibration import BBQCalibrator, BetaCalibrator, CorrectnessAwareCalibrator


def _netcal(module: str):  # type: ignore[no-untyped-def]
    """netcal's ``scaling`` or ``binning`` package (the reference implementations; skip where not installed)."""
    return pytest.importorskip(f"netcal.{module}")


def _multiclass(n: int = 600, c: int = 4, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, c, generator=g)).double()
    target = torch.multinomial((logits / scale).softmax(1), 1, generator=g).squeeze(1)
    return logits, target


def _binary(n: int = 600, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(n, generator=g)).double()
    return z, torch.bernoulli(torch.sigmoid(z / 2 + 0.3), generator=g).long()


# ----------------------------------------------------------------------------------------------- beta calibration


def test_beta_multiclass_equals_netcal() -> None:
    logits, target = _multiclass()
    p = logits.softmax(1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _netcal("scaling").BetaCalibration(method="mle").fit(p, target.numpy()).transform(p)
    ours = BetaCalibrator().fit(logits, target)
    np.testing.assert_allclose(ours.predict_proba(logits).numpy(), reference, atol=2e-4)
    assert bool((ours.a >= 0).all() and (ours.b >= 0).all())


def test_beta_binary_equals_netcal_and_is_monotone() -> None:
    z, y = _binary()
    p = torch.sigmoid(z).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _netcal("scaling").BetaCalibration(method="mle").fit(p, y.numpy()).transform(p)
    ours = BetaCalibrator().fit(z, y)
    out = ours.predict_proba(z)
    assert out.shape == z.shape
    np.testing.assert_allclose(out.numpy(), reference, atol=2e-4)
    order = z.argsort()
    assert bool((out[order].diff() >= -1e-12).all())  # a, b >= 0: a non-decreasing map


def test_beta_active_set_holds_kkt() -> None:
    """At the constrained optimum every free parameter has zero gradient and every one at 0 a non-negative one."""
    logits, target = _multiclass(seed=3)
    beta = BetaCalibrator().fit(logits, target)
    log_p = F.log_softmax(logits, 1)
    log_q = torch.log(-torch.expm1(log_p))
    a, b, c = (t.clone().requires_grad_(True) for t in (beta.a, beta.b, beta.c))
    F.cross_entropy(a * log_p - b * log_q + c, target).backward()
    for value, grad in ((beta.a, a.grad), (beta.b, b.grad)):
        assert grad is not None
        free = value > 0
        assert torch.allclose(grad[free], torch.zeros_like(grad[free]), atol=1e-5)
        assert bool((grad[~free] >= -1e-5).all())
    assert torch.allclose(c.grad, torch.zeros_like(c.grad), atol=1e-5)  # type: ignore[arg-type]


def test_beta_and_bbq_state_restores_exactly_into_fresh_instances() -> None:
    logits, target = _multiclass(n=300)
    for fitted, fresh in ((BetaCalibrator().fit(logits, target), BetaCalibrator()),
                          (BBQCalibrator().fit(logits, target), BBQCalibrator())):  # fmt: skip
        fresh.load_state_dict(fitted.state_dict())
        assert fresh.is_fitted
        assert torch.equal(fresh(logits), fitted(logits))


def test_beta_bbq_bad_inputs() -> None:
    with pytest.raises(ValueError, match="`max_iter` must be an integer >= 1"):
        BetaCalibrator(max_iter=0)
    with pytest.raises(RuntimeError, match="BetaCalibrator is not fitted"):
        BetaCalibrator()(torch.randn(4, 3))
    logits, target = _multiclass(n=100)
    with pytest.raises(ValueError, match="fitted on 4 classes, got logits with 3"):
        BetaCalibrator().fit(logits, target)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="fitted on 4 classes, got logits with 3"):
        BBQCalibrator().fit(logits, target)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="`binning` must be 'uniform' or 'quantile'"):
        BBQCalibrator(binning="width")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`score` must be 'bic', 'aic' or 'bayesian'"):
        BBQCalibrator(score="mdl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="these are probabilities, not logits"):
        BBQCalibrator().fit(logits.softmax(1), target)


# ----------------------------------------------------------------------------------------------------------- BBQ


def test_bbq_multiclass_and_binary_equal_netcal() -> None:
    logits, target = _multiclass()
    p = logits.softmax(1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _netcal("binning").BBQ().fit(p, target.numpy()).transform(p)
    np.testing.assert_allclose(BBQCalibrator().fit(logits, target).predict_proba(logits).numpy(), reference, atol=1e-5)
    z, y = _binary()
    pb = torch.sigmoid(z).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _netcal("binning").BBQ().fit(pb, y.numpy()).transform(pb)
    np.testing.assert_allclose(BBQCalibrator().fit(z, y).predict_proba(z).numpy(), reference, atol=1e-5)


def test_bbq_bin_range_is_the_papers() -> None:
    for n in (10, 600, 5000):
        r = BBQCalibrator.bin_range(n)
        root = n ** (1 / 3)
        assert r.start == max(1, math.floor(root / 10))
        assert r.stop - 1 == min(math.ceil(n / 5), math.ceil(10 * root))


def _naive_bayesian_log_score(p: list[float], y: list[int], b: int) -> float:
    """Beta-binomial marginal likelihood of equal-frequency bins, N' = 2, written as the paper states it."""
    edges = np.quantile(np.array(p), np.linspace(0, 1, b + 1))
    edges[0], edges[-1] = 0.0, 1.0
    total = 0.0
    for k in range(b):
        lo, hi = edges[k], edges[k + 1]
        inside = [yy for pp, yy in zip(p, y) if (lo < pp <= hi) or (k == 0 and pp <= lo)]
        n_b, m_b = len(inside), sum(inside)
        prior = 2.0 / b
        mid = 0.5 * (lo + hi)
        a_b, b_b = prior * mid, prior * (1 - mid)
        total += math.lgamma(prior) - math.lgamma(n_b + prior)
        total += math.lgamma(m_b + a_b) - math.lgamma(a_b) + math.lgamma(n_b - m_b + b_b) - math.lgamma(b_b)
    return total


def test_bbq_paper_mode_weights_are_the_normalised_marginal_likelihoods() -> None:
    logits, target = _multiclass(n=250, c=3)
    bbq = BBQCalibrator(binning="quantile", score="bayesian").fit(logits, target)
    p = logits.softmax(1)[:, 0].tolist()
    y = (target == 0).long().tolist()
    sizes = list(BBQCalibrator.bin_range(250))
    scores = torch.tensor([_naive_bayesian_log_score(p, y, b) for b in sizes], dtype=torch.float64)
    torch.testing.assert_close(bbq.weights[0], scores.softmax(0), rtol=1e-6, atol=1e-9)
    out = bbq.predict_proba(logits)
    torch.testing.assert_close(out.sum(1), torch.ones(250, dtype=torch.float64))


def test_new_calibrators_are_name_presets_of_posthoc_calibration() -> None:
    assert isinstance(PostHocCalibration("beta").calibrator, BetaCalibrator)
    bbq = PostHocCalibration("bbq_paper").calibrator
    assert isinstance(bbq, BBQCalibrator) and (bbq.binning, bbq.score) == ("quantile", "bayesian")
    ca = CALIBRATORS["ca_unweighted"]()
    assert isinstance(ca, CorrectnessAwareCalibrator) and ca.weighting == "none"


# ------------------------------------------------------------------------------------------------- CA calibrator


def _ca_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """~90 % accuracy, calibrated logits: a correct calibrator keeps the mean confidence near the accuracy."""
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(n, 5, generator=g)
    logits[:, 0] += 6.0
    target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    copies = logits + 0.3 * torch.randn(3, n, 5, generator=g)
    return logits, target, copies


def test_ca_balanced_weighting_understates_confidence_and_none_does_not() -> None:
    logits, target, copies = _ca_data()
    accuracy = float((logits.argmax(1) == target).float().mean())
    assert accuracy > 0.85
    settings = dict(epochs=150, lr=3e-2, batch_size=512)
    balanced = CorrectnessAwareCalibrator(weighting="balanced", **settings).fit(logits, target, copies)  # type: ignore[arg-type]
    plain = CorrectnessAwareCalibrator(weighting="none", **settings).fit(logits, target, copies)  # type: ignore[arg-type]
    conf_balanced = float(balanced.predict_proba(logits, copies).amax(1).mean())
    conf_plain = float(plain.predict_proba(logits, copies).amax(1).mean())
    assert conf_balanced < accuracy - 0.1  # the balanced posterior: pulled toward 0.5
    assert abs(conf_plain - accuracy) < 0.05


def test_ca_identity_init_starts_at_one_with_gradient_official_can_start_dead() -> None:
    logits, target, copies = _ca_data(n=256)
    ca = CorrectnessAwareCalibrator(epochs=1, batch_size=256, lr=1e-2)
    assert torch.equal(ca.temperatures(logits, copies), torch.ones(256))
    before = [p.detach().clone() for p in ca.net.parameters()]
    ca.fit(logits, target, copies)  # one Adam step: parameters move only with a non-zero gradient
    assert any(not torch.equal(b, p) for b, p in zip(before, ca.net.parameters()))
    dead = None
    for seed in range(40):
        torch.manual_seed(seed)
        official = CorrectnessAwareCalibrator(epochs=1, batch_size=256, init="official")
        if bool((official.temperatures(logits, copies) == official.t_min).all()):
            dead = official
            break
    assert dead is not None, "PyTorch's default initialisation starts clamped for some seed"
    frozen = [p.detach().clone() for p in dead.net.parameters()]
    dead.epochs = 20
    dead.fit(logits, target, copies)
    assert all(torch.equal(b, p) for b, p in zip(frozen, dead.net.parameters()))  # zero gradient: never moves


def test_ca_bad_settings() -> None:
    with pytest.raises(ValueError, match="`weighting` must be 'balanced'"):
        CorrectnessAwareCalibrator(weighting="class")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`init` must be 'identity'"):
        CorrectnessAwareCalibrator(init="zeros")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- smooth ECE


def _naive_kernel(t: np.ndarray, f: np.ndarray, sigma: float) -> np.ndarray:
    out = np.zeros((t.size, f.size))
    for m in range(-4, 5):
        out += np.exp(-0.5 * ((t[:, None] - f[None, :] - 2 * m) / sigma) ** 2)
        out += np.exp(-0.5 * ((t[:, None] + f[None, :] - 2 * m) / sigma) ** 2)
    return out / (sigma * math.sqrt(2 * math.pi))


def _naive_smece(f: np.ndarray, r: np.ndarray, sigma: float) -> float:
    t = np.linspace(0, 1, 4001)
    return float(np.trapezoid(np.abs(_naive_kernel(t, f, sigma) @ r) / f.size, t))


def _naive_fixed_point(f: np.ndarray, r: np.ndarray) -> float:
    from scipy.optimize import brentq

    return float(brentq(lambda s: _naive_smece(f, r, s) - s, 1e-2, float(np.abs(r).mean()), xtol=1e-9))


def _wiggly(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Confidences whose accuracy crosses the diagonal several times (the smoothing matters)."""
    g = torch.Generator().manual_seed(seed)
    f = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.bernoulli((f + 0.15 * torch.sin(15 * f)).clamp(0, 1), generator=g)
    probs = torch.stack([f, 1 - f], dim=1)
    target = (1 - y).long()  # the top class 0 is correct when y = 1
    return probs, target, f.numpy(), (y - f).numpy()


def test_smooth_ece_equals_naive_reference() -> None:
    probs, target, f, r = _wiggly()
    for sigma in (0.02, 0.1, 0.4):
        ours = float(smooth_calibration_error(probs, target, bandwidth=sigma))
        assert ours == pytest.approx(_naive_smece(f, r, sigma), abs=1e-5)
    value, bandwidth = smooth_calibration_error(probs, target, return_bandwidth=True)
    reference = _naive_fixed_point(f, r)
    assert float(value) == pytest.approx(reference, abs=1e-5)
    assert float(value) == pytest.approx(float(bandwidth), abs=1e-6)  # the fixed point: smECE_σ* = σ*


def _relplot_smece(f: np.ndarray, y: np.ndarray) -> float:
    """relplot's ``smECE_fast`` (apple/ml-calibration ``relplot/metrics.py``, ``kernels.py``) as it computes it:
    samples rounded onto a 200-point grid (refined 4x while 20/σ exceeds it), the Gaussian sampled on that grid and
    reflected once at each end, and 10 bisection steps of the bandwidth from 1."""
    from scipy.signal import convolve

    def to_grid(points: int) -> np.ndarray:
        values = np.zeros(points)
        bins = (f * (points - 1)).astype(int).clip(0, points - 2)
        frac = f * (points - 1) - bins
        np.add.at(values, bins, (1 - frac) * (f - y))
        np.add.at(values, bins + 1, frac * (f - y))
        return values / len(f)

    state = {"points": 200}
    state["grid"] = to_grid(200)  # type: ignore[assignment]

    def smece(sigma: float) -> float:
        while round(20 / sigma) > state["points"]:
            state["points"] *= 4
            state["grid"] = to_grid(state["points"])  # type: ignore[assignment]
        v, m = state["grid"], state["points"]
        t = np.linspace(0, 1, m)
        kernel = np.exp(-((t - 0.5) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
        ext = np.concatenate([np.flip(v)[:-1], v, np.flip(v)[1:]])  # type: ignore[arg-type]
        rs = convolve(ext, kernel, "valid")[m // 2 : m // 2 + m]
        return float(np.abs(rs).sum() / m)

    def small(alpha: float) -> bool:
        return alpha < 1e-3 or alpha < smece(alpha)

    start, end = 1.0, 0.0
    if not small(start):
        for _ in range(10):
            mid = (start + end) / 2
            if small(mid):
                end = mid
            else:
                start = mid
    return smece(start)


def test_smooth_ece_agrees_with_relplot_to_its_discretisation() -> None:
    probs, target, f, r = _wiggly(n=300, seed=2)
    y = r + f
    assert float(smooth_calibration_error(probs, target)) == pytest.approx(_relplot_smece(f, y), abs=2e-3)


def test_smooth_ece_metric_streams_within_its_bound() -> None:
    probs, target, f, r = _wiggly(seed=1)
    reference = _naive_fixed_point(f, r)
    metric = SmoothCalibrationError()
    for chunk in range(0, 300, 70):
        metric.update(probs[chunk : chunk + 70], target[chunk : chunk + 70])
    h = 1 / (metric.grid_size - 1)
    bound = 0.24 * h**2 / reference**2 * float(np.abs(r).mean())
    assert float(metric.compute()) == pytest.approx(reference, abs=bound + 1e-5)
    coarse = SmoothCalibrationError(grid_size=65)  # a coarse grid: the approximation shows, within the bound
    coarse.update(probs, target)
    h = 1 / 64
    assert abs(float(coarse.compute()) - reference) <= 0.24 * h**2 / reference**2 * float(np.abs(r).mean()) + 2e-4


def test_smooth_ece_properties() -> None:
    g = torch.Generator().manual_seed(0)
    conf = 0.5 + 0.5 * torch.rand(3000, generator=g)
    correct = torch.bernoulli(conf, generator=g).long()
    probs = torch.stack([conf, 1 - conf], 1)
    assert float(smooth_calibration_error(probs, 1 - correct)) < 0.03  # calibrated
    # over-confident everywhere: the smoothed residual never changes sign, smECE_σ = |mean residual| for all σ
    over = torch.stack([0.99 * torch.ones(50), 0.01 * torch.ones(50)], 1)
    target = torch.cat([torch.zeros(25), torch.ones(25)]).long()
    for sigma in (0.05, 0.5):
        assert float(smooth_calibration_error(over, target, bandwidth=sigma)) == pytest.approx(0.49, abs=1e-6)


def test_smooth_ece_bad_inputs() -> None:
    probs, target = torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="`bandwidth`"):
        smooth_calibration_error(probs, target, bandwidth=0.0)
    with pytest.raises(ValueError, match="`grid_size` must be an integer >= 3"):
        smooth_calibration_error(probs, target, grid_size=2)
    with pytest.raises(ValueError, match="`grid_size` must be an integer >= 3"):
        SmoothCalibrationError(grid_size=1)
    with pytest.raises(ValueError, match="lie outside"):
        smooth_calibration_error(torch.full((4, 2), 2.0), target)


# ------------------------------------------------------------------------------------- validate_args of the helpers


def test_to_probabilities_validate_args_and_deprecated_name() -> None:
    bad = torch.tensor([[0.7, 0.7]])
    with pytest.raises(ValueError, match="rows do not sum to 1"):
        to_probabilities(bad)
    assert torch.equal(to_probabilities(bad, validate_args=False), bad)  # the value pass is skipped
    with pytest.warns(DeprecationWarning, match="validate_args"):
        assert torch.equal(to_probabilities(bad, validate=False), bad)
    with pytest.raises(TypeError, match="`validate_args` must be True or False"):
        to_probabilities(bad, validate_args="no")  # type: ignore[arg-type]


def test_calibration_error_from_bins_checks_values() -> None:
    count, conf, acc = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.5]), torch.tensor([1.0, 1.0])
    expected = calibration_error_from_bins(count, conf, acc)
    assert float(expected) == pytest.approx((2 * 0.25 + 1 * 0.5) / 3)
    with pytest.raises(ValueError, match="`count` must be >= 0"):
        calibration_error_from_bins(-count, conf, acc)
    with pytest.raises(ValueError, match="`acc_sum` must lie in \\[0, count\\]"):
        calibration_error_from_bins(count, conf, acc + 5)
    with pytest.raises(ValueError, match="`conf_sum` must lie in \\[0, count\\]"):
        calibration_error_from_bins(count, -conf, acc)
    with pytest.raises(ValueError, match="`conf_sum` holds non-finite"):
        calibration_error_from_bins(count, torch.tensor([float("nan"), 0.5]), acc)
    calibration_error_from_bins(count, conf, acc + 5, validate_args=False)  # skipped: no error

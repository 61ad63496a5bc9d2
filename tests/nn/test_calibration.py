"""Post-hoc calibrators: recovery of known parameters, argmax preservation, state_dict round trips, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_losses.functional.calibration import expected_calibration_error, negative_log_likelihood
from lightning_losses.nn.calibration import (
    Calibrator,
    CorrectnessAwareCalibrator,
    DirichletCalibrator,
    HistogramBinningCalibrator,
    IsotonicCalibrator,
    MatrixScaler,
    PlattScaler,
    TemperatureScaler,
    VectorScaler,
    default_image_transforms,
)


def _synthetic(n: int = 4000, c: int = 5, temperature: float = 2.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose calibrated version is ``logits / temperature``: labels drawn from softmax(logits / T)."""
    g = torch.Generator().manual_seed(seed)
    true = 3 * torch.randn(n, c, generator=g)
    target = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    return temperature * true, target


def _naive_best_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Grid search, then golden-section refinement of the NLL over log T (independent of LBFGS)."""
    grid = torch.linspace(-2, 3, 201)
    nll = torch.stack([F.cross_entropy(logits / t.exp(), target) for t in grid])
    lo, hi = float(grid[max(int(nll.argmin()) - 1, 0)]), float(grid[min(int(nll.argmin()) + 1, 200)])
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if F.cross_entropy(logits.double() / math.exp(a), target) < F.cross_entropy(
            logits.double() / math.exp(b), target
        ):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def test_temperature_scaling_recovers_known_temperature() -> None:
    logits, target = _synthetic(temperature=2.5)
    scaler = TemperatureScaler().fit(logits, target)
    assert scaler.temperature == pytest.approx(2.5, rel=0.05)
    # converged: equals the independent 1-D minimiser of the same objective
    assert scaler.temperature == pytest.approx(_naive_best_temperature(logits, target), rel=1e-4)
    assert float(scaler.log_temperature.grad.abs()) < 1e-4  # type: ignore[union-attr]
    out = scaler(logits)
    assert torch.allclose(out, logits / scaler.temperature)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    before = float(expected_calibration_error(logits, target, input_type="logits"))
    after = float(expected_calibration_error(out, target, input_type="logits"))
    assert after < before / 3


def test_temperature_scaling_underconfident_and_binary() -> None:
    logits, target = _synthetic(temperature=0.5)
    assert TemperatureScaler().fit(logits, target).temperature == pytest.approx(0.5, rel=0.05)
    # binary problem given as one logit per sample: same fit as the two-column form [0, z]
    z = 4 * torch.randn(3000)
    y = torch.bernoulli(torch.sigmoid(z / 4)).long()
    one = TemperatureScaler().fit(z, y)
    two = TemperatureScaler().fit(torch.stack([torch.zeros_like(z), z], 1), y)
    assert one.temperature == pytest.approx(two.temperature, rel=1e-5)
    assert one.temperature == pytest.approx(4.0, rel=0.1)
    assert one(z).shape == z.shape
    assert torch.allclose(one.predict_proba(z), torch.sigmoid(z / one.temperature))


def test_vector_and_matrix_scaling_lower_nll_and_identity_limit() -> None:
    logits, target = _synthetic(2000, 4, temperature=2.0)
    base = float(F.cross_entropy(logits, target))
    ts = float(F.cross_entropy(TemperatureScaler().fit(logits, target)(logits), target))
    vs = VectorScaler().fit(logits, target)
    ms = MatrixScaler().fit(logits, target)
    # nested families fitted on the same data: each at least as good as the smaller one
    assert float(F.cross_entropy(vs(logits), target)) <= ts + 1e-4 < base
    assert float(F.cross_entropy(ms(logits), target)) <= float(F.cross_entropy(vs(logits), target)) + 1e-4
    # vector scaling without bias is a per-class scale: the fitted output is w * z + b
    assert torch.allclose(vs(logits), logits * vs.weight + vs.bias, atol=1e-6)
    # heavy ODIR regularisation pins the off-diagonal weights and bias to zero
    reg = MatrixScaler(off_diagonal_reg=1e6, intercept_reg=1e6).fit(logits, target)
    off = reg.weight - torch.diag(torch.diagonal(reg.weight))
    assert float(off.abs().max()) < 1e-3 and float(reg.bias.detach().abs().max()) < 1e-3


def test_dirichlet_on_log_probs() -> None:
    logits, target = _synthetic(2000, 3, temperature=2.0)
    cal = DirichletCalibrator().fit(logits, target)
    expected = F.log_softmax(logits, 1) @ cal.weight.detach().t() + cal.bias.detach()
    assert torch.allclose(cal(logits), expected, atol=1e-5)
    assert float(F.cross_entropy(cal(logits), target)) < float(F.cross_entropy(logits, target))
    # with W = I, b = 0 Dirichlet calibration is the identity on probabilities
    with torch.no_grad():
        cal.weight.copy_(torch.eye(3))
        cal.bias.zero_()
    assert torch.allclose(cal.predict_proba(logits), logits.softmax(1), atol=1e-6)


def test_platt_recovers_slope_and_intercept() -> None:
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, generator=g)
    y = torch.bernoulli(torch.sigmoid(0.5 * z - 1.0), generator=g).long()
    platt = PlattScaler().fit(z, y)
    assert float(platt.slope.detach()) == pytest.approx(0.5, abs=0.05)
    assert float(platt.intercept.detach()) == pytest.approx(-1.0, abs=0.08)
    two = platt(torch.stack([torch.zeros_like(z), z], 1))
    assert torch.allclose(two[:, 1] - two[:, 0], platt(z))
    with pytest.raises(ValueError, match="PlattScaler is for binary problems"):
        PlattScaler().fit(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))


def _naive_histogram(p: torch.Tensor, target: torch.Tensor, n_bins: int) -> list[list[float]]:
    values = []
    for k in range(p.shape[1]):
        row = []
        for b in range(n_bins):
            members = [
                int(target[i]) == k
                for i in range(p.shape[0])
                if min(math.floor(float(p[i, k]) * n_bins), n_bins - 1) == b
            ]
            row.append(sum(members) / len(members) if members else (b + 0.5) / n_bins)
        values.append(row)
    return values


def test_histogram_binning_matches_loop() -> None:
    logits, target = _synthetic(300, 3, temperature=2.0)
    cal = HistogramBinningCalibrator(8).fit(logits, target)
    ref = torch.tensor(_naive_histogram(logits.softmax(1), target, 8))
    assert torch.allclose(cal.bin_values, ref, atol=1e-6)
    q = cal.predict_proba(logits)
    assert torch.allclose(q.sum(1), torch.ones(300), atol=1e-5)


def test_isotonic_is_monotone_and_matches_sklearn() -> None:
    isotonic = pytest.importorskip("sklearn.isotonic")
    logits, target = _synthetic(500, 3, temperature=2.0)
    cal = IsotonicCalibrator().fit(logits, target)
    p = logits.softmax(1)
    for k in range(3):
        ref = isotonic.IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, k].double(), target == k)
        grid = torch.linspace(0, 1, 101)
        got = cal._interpolate(k, grid)
        assert torch.allclose(got.double(), torch.as_tensor(ref.predict(grid.double())), atol=1e-5)
        assert bool((got[1:] >= got[:-1] - 1e-7).all())
    # binary: the positive class only
    z, y = torch.randn(400), torch.randint(0, 2, (400,))
    assert IsotonicCalibrator().fit(z, y)(z).shape == (400,)


def test_ca_calibrator_improves_and_keeps_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 1000, 5
    true = 2 * torch.randn(n, c, generator=g)
    target = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    logits = 3 * true  # over-confident
    # transformed copies agree with the original more when the prediction is right
    copies = logits + 4 * torch.randn(3, n, c, generator=g)
    ca = CorrectnessAwareCalibrator(epochs=40, lr=2e-2, batch_size=250).fit(logits, target, copies)
    out = ca(logits, copies)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    t = ca.temperatures(logits, copies)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 10
    assert float(t.mean()) > 1.5  # the over-confident model is cooled down
    assert torch.allclose(out, logits / t[:, None])
    before = float(expected_calibration_error(logits, target, 15, input_type="logits"))
    after = float(expected_calibration_error(out, target, 15, input_type="logits"))
    assert after < 0.75 * before
    with pytest.raises(ValueError, match=r"must have shape \(3, N, C\)"):
        ca(logits, copies[:2])
    with pytest.raises(ValueError, match="needs `transformed_logits`"):
        ca(logits)


def test_ca_transformed_logits_from_model() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    x = torch.randn(6, 1, 8, 8)
    ca = CorrectnessAwareCalibrator()
    copies = ca.transformed_logits(model, x)
    assert copies.shape == (3, 6, 4)
    for t, copy in zip(default_image_transforms(), copies):
        assert torch.allclose(copy, model(t(x)))
    rgb = default_image_transforms()[1](torch.rand(2, 3, 5, 5))
    assert torch.allclose(rgb[:, 0], rgb[:, 1])


CALIBRATORS = [
    TemperatureScaler,
    VectorScaler,
    MatrixScaler,
    DirichletCalibrator,
    HistogramBinningCalibrator,
    IsotonicCalibrator,
]


@pytest.mark.parametrize("cls", CALIBRATORS)
def test_state_dict_round_trip_into_fresh_instance(cls: type[Calibrator]) -> None:
    if cls is IsotonicCalibrator:
        pytest.importorskip("sklearn")
    logits, target = _synthetic(600, 4)
    fitted = cls().fit(logits, target)
    fresh = cls()
    assert not fresh.is_fitted
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.is_fitted
    assert torch.equal(fresh(logits), fitted(logits))
    assert torch.allclose(fresh.predict_proba(logits).sum(1), torch.ones(600), atol=1e-5)
    if cls.preserves_argmax:
        assert torch.equal(fresh(logits).argmax(1), logits.argmax(1))


def test_ca_and_platt_state_dict_round_trip() -> None:
    logits, target = _synthetic(300, 4)
    copies = logits + torch.randn(3, 300, 4)
    ca = CorrectnessAwareCalibrator(epochs=2).fit(logits, target, copies)
    fresh = CorrectnessAwareCalibrator()
    fresh.load_state_dict(ca.state_dict())
    assert torch.equal(fresh(logits, copies), ca(logits, copies))
    z, y = torch.randn(200), torch.randint(0, 2, (200,))
    platt = PlattScaler().fit(z, y)
    other = PlattScaler()
    other.load_state_dict(platt.state_dict())
    assert torch.equal(other(z), platt(z))


def test_fit_inside_inference_mode() -> None:
    logits, target = _synthetic(500, 3)
    with torch.inference_mode():
        frozen_logits, frozen_target = logits.clone(), target.clone()
        scaler = TemperatureScaler().fit(frozen_logits, frozen_target)
    assert scaler.temperature == pytest.approx(TemperatureScaler().fit(logits, target).temperature, rel=1e-6)


def test_calibrator_bad_inputs() -> None:
    with pytest.raises(ValueError, match="these are probabilities, not logits"):
        TemperatureScaler().fit(torch.tensor([[0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        TemperatureScaler().fit(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"shape \(N, C\) with C >= 2"):
        VectorScaler().fit(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        TemperatureScaler().fit(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(RuntimeError, match="not fitted: call fit"):
        TemperatureScaler()(torch.randn(2, 3))
    with pytest.raises(ValueError, match="Fitted for 3 classes"):
        VectorScaler().fit(torch.randn(50, 3), torch.randint(0, 3, (50,)))(torch.randn(2, 4))
    with pytest.raises(ValueError, match="zero samples"):
        TemperatureScaler().fit(torch.empty(0, 3), torch.empty(0, dtype=torch.long))


def test_calibrated_nll_never_worse_than_identity_on_fit_data() -> None:
    logits, target = _synthetic(1000, 4, temperature=1.7)
    base = float(negative_log_likelihood(logits, target, "logits"))
    for cls in (TemperatureScaler, VectorScaler, MatrixScaler, DirichletCalibrator):
        cal = cls().fit(logits, target)
        assert float(negative_log_likelihood(cal(logits), target, "logits")) <= base + 1e-5, cls.__name__

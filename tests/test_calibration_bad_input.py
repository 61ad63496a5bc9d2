"""Bad input across the whole public calibration API: every bad call raises a ValueError / TypeError whose message
names the argument (never a torch-internal error, never a silent NaN or garbage value).

The table is built from generators: every bad prediction and every bad target against every metric function, loss
function, loss module, streaming metric and calibrator ``fit``, plus each component's invalid settings. Valid edge
cases that must *not* raise (empty input, bfloat16 probabilities, float64 logits) are checked as properties.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import lightning_losses.functional.calibration as Fc
from lightning_losses.callbacks.calibration import CalibrationMonitor, PostHocCalibration
from lightning_losses.losses.calibration import (
    AdaptiveFocalLoss,
    DCALoss,
    FocalLoss,
    LabelSmoothingLoss,
    MDCALoss,
    MMCELoss,
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
from lightning_losses.nn.calibration import (
    CorrectnessAwareCalibrator,
    DirichletCalibrator,
    HistogramBinningCalibrator,
    IsotonicCalibrator,
    MatrixScaler,
    PlattScaler,
    TemperatureScaler,
    VectorScaler,
)

N, C = 8, 3
_G = torch.Generator().manual_seed(0)
Z = 2 * torch.randn(N, C, generator=_G)  # logits
P = Z.softmax(1)  # probabilities
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
NAN = float("nan")

Case = tuple[str, Callable[[], Any], str]  # (id, call, regex the message must match)

# ----------------------------------------------------------------------------- targets and predictions

_BAD_TARGETS: dict[str, tuple[Any, str]] = {
    "target-float": (Y.float(), r"`target` must be a 1-D integer tensor"),
    "target-bool": (Y > 0, r"`target` must be a 1-D integer tensor .*bool"),
    "target-2d": (Y[:, None], r"`target` must be a 1-D integer tensor"),
    "target-short": (Y[:5], r"`target` must be a 1-D integer tensor of 8"),
    "target-too-large": (torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]), r"`target` holds class indices outside \[0, 3\)"),
    "target-negative": (torch.tensor([0, 1, -1, 0, 1, 2, 0, 1]), r"`target` holds class indices outside \[0, 3\)"),
    "target-list": ([0, 1, 2, 0, 1, 2, 0, 1], r"`target` must be a tensor"),
}

_BAD_PROBS: dict[str, tuple[Any, str]] = {
    "probs-int": (Y[:, None].expand(N, C).contiguous(), r"`probs`.*floating-point"),
    "probs-list": (P.tolist(), r"`probs`.*floating-point tensor"),
    "probs-3d": (P[None], r"`probs`.*shape \(N, C\)"),
    "probs-one-column": (P[:, :1], r"`probs`.*C >= 2"),
    "probs-nan": (P.masked_fill(torch.eye(N, C, dtype=torch.bool), NAN), r"`probs` holds \d+ non-finite"),
    "probs-inf": (P.masked_fill(torch.eye(N, C, dtype=torch.bool), math.inf), r"`probs` holds \d+ non-finite"),
    "probs-are-logits": (Z, r"`probs` with `input_type='probs'` lie outside \[0, 1\]"),
    "probs-unnormalised": (0.5 * P, r"`probs` with `input_type='probs'`: rows do not sum to 1"),
}

_METRIC_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "expected_calibration_error": Fc.expected_calibration_error,
    "classwise_calibration_error": Fc.classwise_calibration_error,
    "average_calibration_error": Fc.average_calibration_error,
    "debiased_calibration_error": Fc.debiased_calibration_error,
    "ks_calibration_error": Fc.ks_calibration_error,
    "brier_score": Fc.brier_score,
    "negative_log_likelihood": Fc.negative_log_likelihood,
    "calibration_bins": Fc.calibration_bins,
}

_METRIC_CLASSES: dict[str, Callable[..., Any]] = {
    "CalibrationError": CalibrationError,
    "CalibrationError-quantile": lambda **kw: CalibrationError(binning="quantile", **kw),
    "AverageCalibrationError": AverageCalibrationError,
    "DebiasedCalibrationError": DebiasedCalibrationError,
    "KSCalibrationError": KSCalibrationError,
    "ClasswiseCalibrationError": lambda **kw: ClasswiseCalibrationError(C, **kw),
    "BrierScore": BrierScore,
    "NegativeLogLikelihood": NegativeLogLikelihood,
}

_LOSS_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "focal_loss": Fc.focal_loss,
    "adaptive_focal_loss": Fc.adaptive_focal_loss,
    "label_smoothing_loss": Fc.label_smoothing_loss,
    "mmce_loss": Fc.mmce_loss,
    "mdca_loss": Fc.mdca_loss,
    "dca_loss": Fc.dca_loss,
}

_LOSS_MODULES: dict[str, Callable[[], torch.nn.Module]] = {
    "FocalLoss": FocalLoss,
    "AdaptiveFocalLoss": AdaptiveFocalLoss,
    "LabelSmoothingLoss": LabelSmoothingLoss,
    "MMCELoss": MMCELoss,
    "MDCALoss": MDCALoss,
    "DCALoss": DCALoss,
    "MDCALoss-focal-base": lambda: MDCALoss(base=FocalLoss()),
}

_CALIBRATORS: dict[str, Callable[[], Any]] = {
    "TemperatureScaler": lambda: TemperatureScaler(max_iter=20),
    "VectorScaler": lambda: VectorScaler(max_iter=20),
    "MatrixScaler": lambda: MatrixScaler(max_iter=20),
    "DirichletCalibrator": lambda: DirichletCalibrator(max_iter=20),
    "HistogramBinningCalibrator": lambda: HistogramBinningCalibrator(5),
    "IsotonicCalibrator": IsotonicCalibrator,
}

_BAD_LOGITS: dict[str, tuple[Any, str]] = {
    "logits-int": (Y[:, None].expand(N, C).contiguous(), r"`logits` must be a floating-point tensor"),
    "logits-list": (Z.tolist(), r"`logits` must be a floating-point tensor"),
    "logits-3d": (Z[None], r"`logits` must have shape \(N, C\)"),
    "logits-nan": (Z.masked_fill(torch.eye(N, C, dtype=torch.bool), NAN), r"`logits` holds.*non-finite"),
    "logits-inf": (Z.masked_fill(torch.eye(N, C, dtype=torch.bool), -math.inf), r"`logits` holds.*non-finite"),
}


def _data_cases() -> list[Case]:
    cases: list[Case] = []
    for fname, f in _METRIC_FUNCTIONS.items():
        for bname, (bad, match) in _BAD_PROBS.items():
            cases.append((f"{fname}-{bname}", lambda f=f, bad=bad: f(bad, Y), match))
        for bname, (bad, match) in _BAD_TARGETS.items():
            cases.append((f"{fname}-{bname}", lambda f=f, bad=bad: f(P, bad), match))
        cases.append((f"{fname}-logits-nan", lambda f=f: f(Z.masked_fill(Z > 1, NAN), Y, input_type="logits"),
                      r"`probs` holds \d+ non-finite"))  # fmt: skip
        cases.append((f"{fname}-input_type", lambda f=f: f(P, Y, input_type="probabilities"), r"`input_type`"))
    cases.append(("to_probabilities-input_type", lambda: Fc.to_probabilities(P, "softmax"), r"`input_type`"))  # type: ignore[arg-type]
    for bname, (bad, match) in _BAD_PROBS.items():
        cases.append((f"to_probabilities-{bname}", lambda bad=bad: Fc.to_probabilities(bad), match))
    for mname, make in _METRIC_CLASSES.items():
        for bname, (bad, match) in _BAD_PROBS.items():
            cases.append((f"{mname}-{bname}", lambda make=make, bad=bad: make().update(bad, Y), match))
        for bname, (bad, match) in _BAD_TARGETS.items():
            cases.append((f"{mname}-{bname}", lambda make=make, bad=bad: make().update(P, bad), match))
    for lname, f in _LOSS_FUNCTIONS.items():
        for bname, (bad, match) in _BAD_LOGITS.items():
            cases.append((f"{lname}-{bname}", lambda f=f, bad=bad: f(bad, Y), match))
        for bname, (bad, match) in _BAD_TARGETS.items():
            cases.append((f"{lname}-{bname}", lambda f=f, bad=bad: f(Z, bad), match))
    for lname, make in _LOSS_MODULES.items():
        for bname, (bad, match) in _BAD_LOGITS.items():
            cases.append((f"{lname}-{bname}", lambda make=make, bad=bad: make()(bad, Y), match))
        for bname, (bad, match) in _BAD_TARGETS.items():
            cases.append((f"{lname}-{bname}", lambda make=make, bad=bad: make()(Z, bad), match))
    for cname, make in _CALIBRATORS.items():
        for bname, (bad, match) in _BAD_LOGITS.items():
            cases.append((f"{cname}.fit-{bname}", lambda make=make, bad=bad: make().fit(bad, Y), match))
        for bname, (bad, match) in _BAD_TARGETS.items():
            cases.append((f"{cname}.fit-{bname}", lambda make=make, bad=bad: make().fit(Z, bad), match))
        cases.append((f"{cname}.fit-probabilities", lambda make=make: make().fit(P, Y), r"`logits`.*probabilities"))
        cases.append((f"{cname}.fit-empty", lambda make=make: make().fit(Z[:0], Y[:0]), r"`logits` holds zero"))
        nan_forward = r"`logits` holds.*non-finite"
        cases.append((f"{cname}.forward-nan", lambda make=make: make().fit(Z, Y)(Z * NAN), nan_forward))
    ca = lambda: CorrectnessAwareCalibrator(transforms=[lambda x: x], top_k=2, epochs=1)  # noqa: E731
    copies = Z[None] + 0.1
    cases += [
        ("CA.fit-no-copies", lambda: ca().fit(Z, Y), r"needs `transformed_logits`"),
        ("CA.fit-copies-shape", lambda: ca().fit(Z, Y, copies[:, :4]), r"`transformed_logits` must have shape"),
        ("CA.fit-copies-nan", lambda: ca().fit(Z, Y, copies * NAN), r"`transformed_logits` holds non-finite"),
        ("CA.fit-copies-int", lambda: ca().fit(Z, Y, copies.long()), r"`transformed_logits` must be a floating"),
        ("CA.fit-target", lambda: ca().fit(Z, Y + 3, copies), r"`target` holds class indices outside"),
        ("Platt.fit-multiclass", lambda: PlattScaler().fit(Z, Y), r"PlattScaler is for binary problems"),
        ("Platt.fit-target", lambda: PlattScaler().fit(Z[:, 0], Y), r"`target` holds class indices outside \[0, 2\)"),
    ]
    return cases


# ----------------------------------------------------------------------------- invalid settings


def _config_cases() -> list[Case]:
    cases: list[Case] = []
    for fname, f in _METRIC_FUNCTIONS.items():
        if "n_bins" in f.__code__.co_varnames:
            for bad in (0, -3, 2.5, True, "15"):
                cases.append((f"{fname}-n_bins={bad!r}", lambda f=f, bad=bad: f(P, Y, n_bins=bad), r"`n_bins`"))
    for fname in ("expected_calibration_error", "classwise_calibration_error"):
        f = _METRIC_FUNCTIONS[fname]
        cases.append((f"{fname}-norm", lambda f=f: f(P, Y, norm="l3"), r"`norm`"))
        cases.append((f"{fname}-binning", lambda f=f: f(P, Y, binning="median"), r"`binning`"))
    for bad in (-0.1, 1.5, NAN):
        cases.append((f"nll-eps={bad}", lambda bad=bad: Fc.negative_log_likelihood(P, Y, eps=bad), r"`eps`"))
    counts, from_bins = torch.ones(4), Fc.calibration_error_from_bins
    cases += [
        ("calibration_error_from_bins-norm", lambda: from_bins(counts, counts, counts, "l0"), r"`norm`"),  # type: ignore[arg-type]
        ("calibration_error_from_bins-shapes", lambda: from_bins(counts, counts[:3], counts), r"`count`, `conf"),
        ("calibration_error_from_bins-scalar", lambda: from_bins(counts, torch.tensor(1.0), counts), r"`conf_sum`"),
        ("smooth_calibration_error-bandwidth", lambda: Fc.smooth_calibration_error(P, Y, bandwidth=-1), "`bandwidth`"),
        ("conformal_class_scores-method", lambda: Fc.conformal_class_scores(P, "lac"), r"`method`"),  # type: ignore[arg-type]
        ("conformal_scores-target", lambda: Fc.conformal_scores(P, Y + 9), r"`target`"),
        ("conformal_quantile-alpha", lambda: Fc.conformal_quantile(torch.rand(5), 1.5), r"`alpha`"),
        ("prediction_sets-threshold", lambda: Fc.prediction_sets(P, NAN), r"`threshold` is NaN"),
    ]
    # loss hyperparameters: Python numbers and tensors, NaN and out of range
    hyper: list[tuple[str, Callable[..., Any], str, list[Any]]] = [
        ("focal_loss", Fc.focal_loss, "gamma", [-1.0, NAN, math.inf, torch.tensor(-1.0), torch.tensor(NAN),
                                                 torch.full((N,), NAN), "3"]),
        ("adaptive_focal_loss", Fc.adaptive_focal_loss, "gamma_low", [-1.0, NAN, torch.tensor(-2.0)]),
        ("adaptive_focal_loss", Fc.adaptive_focal_loss, "gamma_high", [-1.0, NAN]),
        ("adaptive_focal_loss", Fc.adaptive_focal_loss, "threshold", [-0.1, 1.5, NAN, torch.tensor(2.0)]),
        ("label_smoothing_loss", Fc.label_smoothing_loss, "smoothing", [-0.1, 1.5, NAN, torch.full((N,), 2.0)]),
        ("mmce_loss", Fc.mmce_loss, "bandwidth", [0.0, -1.0, NAN, math.inf, torch.tensor(0.0), torch.ones(2), "a"]),
    ]  # fmt: skip
    for fname, f, arg, values in hyper:
        for bad in values:
            cases.append((f"{fname}-{arg}={bad!r}", lambda f=f, arg=arg, bad=bad: f(Z, Y, **{arg: bad}), rf"`{arg}`"))
    cases.append(("focal_loss-gamma-shape", lambda: Fc.focal_loss(Z, Y, torch.ones(3)), r"`gamma`"))
    modules: list[tuple[str, Callable[[], Any], str]] = [
        ("FocalLoss(gamma=-1)", lambda: FocalLoss(-1.0), "gamma"),
        ("FocalLoss(gamma=nan)", lambda: FocalLoss(NAN), "gamma"),
        ("AdaptiveFocalLoss(threshold=2)", lambda: AdaptiveFocalLoss(threshold=2.0), "threshold"),
        ("LabelSmoothingLoss(1.5)", lambda: LabelSmoothingLoss(1.5), "smoothing"),
        ("MMCELoss(bandwidth=0)", lambda: MMCELoss(bandwidth=0.0), "bandwidth"),
        ("MMCELoss(weight=-1)", lambda: MMCELoss(weight=-1.0), "weight"),
        ("MDCALoss(weight=nan)", lambda: MDCALoss(weight=NAN), "weight"),
        ("DCALoss(base='ce')", lambda: DCALoss(base="ce"), "base"),  # type: ignore[arg-type]
    ]
    cases += [(name, make, rf"{arg}") for name, make, arg in modules]
    metric_configs: list[tuple[str, Callable[[], Any], str]] = [
        ("CalibrationError(n_bins=0)", lambda: CalibrationError(n_bins=0), "`n_bins`"),
        ("CalibrationError(norm)", lambda: CalibrationError(norm="l3"), "`norm`"),  # type: ignore[arg-type]
        ("CalibrationError(binning)", lambda: CalibrationError(binning="x"), "`binning`"),  # type: ignore[arg-type]
        ("CalibrationError(input_type)", lambda: CalibrationError(input_type="x"), "`input_type`"),  # type: ignore[arg-type]
        ("AverageCalibrationError(n_bins)", lambda: AverageCalibrationError(n_bins=-1), "`n_bins`"),
        ("DebiasedCalibrationError(squared)", lambda: DebiasedCalibrationError(squared="yes"), "`squared`"),  # type: ignore[arg-type]
        ("KSCalibrationError(input_type)", lambda: KSCalibrationError(input_type="x"), "`input_type`"),  # type: ignore[arg-type]
        ("Classwise(num_classes=1)", lambda: ClasswiseCalibrationError(1), "`num_classes`"),
        ("Classwise(num_classes=True)", lambda: ClasswiseCalibrationError(True), "`num_classes`"),
        ("Classwise(n_bins=0)", lambda: ClasswiseCalibrationError(3, n_bins=0), "`n_bins`"),
        ("Classwise(norm)", lambda: ClasswiseCalibrationError(3, norm="x"), "`norm`"),  # type: ignore[arg-type]
        ("Classwise-wrong-classes", lambda: ClasswiseCalibrationError(4).update(P, Y), "4 classes"),
        ("BrierScore(input_type)", lambda: BrierScore(input_type="x"), "`input_type`"),  # type: ignore[arg-type]
        ("NLL(eps=-1)", lambda: NegativeLogLikelihood(eps=-1.0), "`eps`"),
    ]
    cases += metric_configs
    calibrator_configs: list[tuple[str, Callable[[], Any], str]] = [
        *[(f"TemperatureScaler(init_temperature={v})", lambda v=v: TemperatureScaler(v), "`init_temperature`")
          for v in (0.0, -1.0, NAN, math.inf)],
        *[(f"TemperatureScaler(max_iter={v})", lambda v=v: TemperatureScaler(max_iter=v), "`max_iter`")
          for v in (0, -1, 2.5)],
        ("VectorScaler(max_iter=0)", lambda: VectorScaler(max_iter=0), "`max_iter`"),
        ("VectorScaler(intercept_reg=-1)", lambda: VectorScaler(intercept_reg=-1.0), "`intercept_reg`"),
        ("MatrixScaler(off_diagonal_reg=nan)", lambda: MatrixScaler(off_diagonal_reg=NAN), "`off_diagonal_reg`"),
        ("DirichletCalibrator(max_iter=-5)", lambda: DirichletCalibrator(max_iter=-5), "`max_iter`"),
        ("Dirichlet(intercept_reg=inf)", lambda: DirichletCalibrator(intercept_reg=math.inf), "`intercept_reg`"),
        ("PlattScaler(max_iter=0)", lambda: PlattScaler(max_iter=0), "`max_iter`"),
        ("Histogram(n_bins=0)", lambda: HistogramBinningCalibrator(0), "`n_bins`"),
        ("Histogram(n_bins=2.5)", lambda: HistogramBinningCalibrator(2.5), "`n_bins`"),  # type: ignore[arg-type]
        *[(f"CA({k}={v})", lambda k=k, v=v: CorrectnessAwareCalibrator(**{k: v}), f"`{k}`")
          for k, values in {"epochs": (0, -1), "lr": (0.0, -1e-3, NAN), "batch_size": (0,), "top_k": (0,),
                            "hidden": (0,), "t_min": (0.0, NAN)}.items() for v in values],
        ("CA(t_max<t_min)", lambda: CorrectnessAwareCalibrator(t_min=2.0, t_max=1.0), "t_min < t_max"),
        ("CA(transforms=[])", lambda: CorrectnessAwareCalibrator(transforms=[]), "`transforms`"),
        ("CA(transforms=[1])", lambda: CorrectnessAwareCalibrator(transforms=[1]), "`transforms`"),  # type: ignore[list-item]
    ]  # fmt: skip
    cases += calibrator_configs
    callback_configs: list[tuple[str, Callable[[], Any], str]] = [
        ("PostHoc(n_bins=0)", lambda: PostHocCalibration(n_bins=0), "`n_bins`"),
        ("PostHoc(module='1net')", lambda: PostHocCalibration(module="1net"), "`module`"),
        ("PostHoc(logits_fn=3)", lambda: PostHocCalibration(logits_fn=3), "`logits_fn`"),  # type: ignore[arg-type]
        ("PostHoc(apply_to='test')", lambda: PostHocCalibration(apply_to="test"), "`apply_to`"),  # type: ignore[arg-type]
        ("PostHoc(apply_to=('fit',))", lambda: PostHocCalibration(apply_to=("fit",)), "`apply_to`"),  # type: ignore[arg-type]
        ("Monitor(n_bins=0)", lambda: CalibrationMonitor(n_bins=0, num_classes=3), "`n_bins`"),
        ("Monitor(num_classes=1)", lambda: CalibrationMonitor(num_classes=1), "`num_classes`"),
        ("Monitor(metrics='ece')", lambda: CalibrationMonitor(metrics="ece"), "`metrics`"),
        ("Monitor(every_n_epochs=0)", lambda: CalibrationMonitor(every_n_epochs=0, num_classes=3), "`every_n_epochs`"),
        ("Monitor(module='a b')", lambda: CalibrationMonitor(module="a b", num_classes=3), "`module`"),
    ]
    cases += callback_configs
    return cases


_CASES = _data_cases() + _config_cases()


@pytest.mark.parametrize(("call", "match"), [(c, m) for _, c, m in _CASES], ids=[i for i, _, _ in _CASES])
def test_bad_call_raises_a_clear_error(call: Callable[[], Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_the_fuzz_covers_the_whole_public_calibration_api() -> None:
    public = set(Fc.__all__) - {"InputType"}
    covered = {i.split("-")[0] for i, _, _ in _CASES}
    assert public <= covered, sorted(public - covered)
    assert len(_CASES) > 500


# ----------------------------------------------------------------------------- valid edge cases (properties)


@pytest.mark.parametrize("name", sorted(_LOSS_FUNCTIONS))
def test_empty_batch_gives_a_graph_connected_zero_not_nan(name: str) -> None:
    z = torch.zeros(0, C, requires_grad=True)
    value = _LOSS_FUNCTIONS[name](z, Y[:0])
    value.backward()
    assert value.item() == 0.0 and z.grad is not None and z.grad.shape == (0, C)


@pytest.mark.parametrize("name", sorted(_LOSS_MODULES))
def test_empty_batch_loss_modules_give_zero(name: str) -> None:
    z = torch.zeros(0, C, requires_grad=True)
    value = _LOSS_MODULES[name]()(z, Y[:0])
    value.backward()
    assert value.item() == 0.0


@pytest.mark.parametrize("name", sorted(_METRIC_FUNCTIONS))
def test_empty_input_metric_functions_give_zero(name: str) -> None:
    out = _METRIC_FUNCTIONS[name](P[:0], Y[:0])
    for t in out if isinstance(out, tuple) else (out,):
        assert bool(torch.isfinite(t).all()) and float(t.sum()) == 0.0


def test_empty_input_streaming_metrics_give_zero() -> None:
    for name, make in _METRIC_CLASSES.items():
        metric = make()
        metric.update(P[:0], Y[:0])
        assert float(metric.compute()) == 0.0, name


def test_bf16_probabilities_are_accepted_by_every_calibration_metric() -> None:
    g = torch.Generator().manual_seed(1)
    p16 = (3 * torch.randn(400, 10, generator=g)).softmax(1).bfloat16()
    y = torch.randint(0, 10, (400,), generator=g)
    assert float((p16.float().sum(1) - 1).abs().max()) > 1e-3  # beyond the float32 tolerance
    for name, f in _METRIC_FUNCTIONS.items():  # equal to the same numbers in float32, value checks off
        ours, ref = f(p16, y), f(p16.float(), y, validate_args=False)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), ref if isinstance(ref, tuple) else (ref,)):
            assert torch.equal(a, b), name
    for name, make in _METRIC_CLASSES.items():
        classwise = "Classwise" in name
        metric = ClasswiseCalibrationError(10) if classwise else make()
        reference = ClasswiseCalibrationError(10, validate_args=False) if classwise else make(validate_args=False)
        metric.update(p16, y)
        reference.update(p16.float(), y)
        assert torch.equal(metric.compute(), reference.compute()), name
    with pytest.raises(ValueError, match="rows do not sum to 1"):  # the bf16 tolerance still rejects real errors
        Fc.expected_calibration_error((0.95 * p16.float()).bfloat16(), y)


@pytest.mark.parametrize("name", [*sorted(_CALIBRATORS), "PlattScaler", "CorrectnessAwareCalibrator"])
def test_calibrators_fit_and_apply_float64_logits(name: str) -> None:
    z, y = Z.double() * 1.5, Y
    if name == "PlattScaler":
        cal, z, y = PlattScaler(max_iter=20), z[:, 1] - z[:, 0], (Y > 0).long()
        cal.fit(z, y)
        out = cal(z)
    elif name == "CorrectnessAwareCalibrator":
        cal = CorrectnessAwareCalibrator(transforms=[lambda x: x], top_k=2, epochs=2)
        copies = z[None] + 0.1
        cal.fit(z, y, copies)
        out = cal(z, copies)
    else:
        cal = _CALIBRATORS[name]()
        cal.fit(z, y)
        out = cal(z)
        assert torch.allclose(cal(z.float()).double(), out, atol=1e-4)  # fitted in float64, applied to float32
    assert out.dtype == torch.float64 and out.shape == z.shape and bool(torch.isfinite(out).all())
    assert cal.is_fitted


def test_validate_args_false_skips_the_value_checks_only() -> None:
    nan_logits = Z.masked_fill(Z > 1, NAN)
    assert torch.isnan(Fc.mdca_loss(nan_logits, Y, validate_args=False))  # documented: no value pass
    with pytest.raises(ValueError, match="`target` must be a 1-D integer tensor"):  # types/shapes still checked
        Fc.mdca_loss(Z, Y.float(), validate_args=False)
    metric = CalibrationError(validate_args=False)
    metric.update(P, Y)
    with pytest.raises(ValueError, match="`target` must be a 1-D integer tensor"):
        metric.update(P, Y[:3])
    cal = TemperatureScaler(max_iter=20, validate_args=False).fit(Z, Y)
    assert torch.isnan(cal(nan_logits)).any()
    with pytest.raises(ValueError, match="non-finite"):  # fit always checks its data
        TemperatureScaler(validate_args=False).fit(nan_logits, Y)


def test_a_failed_fit_never_reports_fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_losses.nn.calibration as nn_cal

    cal = TemperatureScaler(max_iter=20).fit(Z, Y)
    assert cal.is_fitted

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("optimiser failed")

    monkeypatch.setattr(nn_cal, "_lbfgs", broken)
    with pytest.raises(RuntimeError, match="optimiser failed"):
        cal.fit(Z, Y)
    assert not cal.is_fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        cal(Z)
    monkeypatch.undo()
    # a fit whose parameters end non-finite raises and stays unfitted
    ca = CorrectnessAwareCalibrator(transforms=[lambda x: x], top_k=2, epochs=1)

    def nan_step(self: Any, closure: Any = None) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(NAN)

    monkeypatch.setattr(torch.optim.Adam, "step", nan_step)
    with pytest.raises(RuntimeError, match=r"diverged.*stays unfitted"):
        ca.fit(Z, Y, Z[None] + 0.1)
    assert not ca.is_fitted

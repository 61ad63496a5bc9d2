"""Post-hoc calibrators: fitted on held-out logits, then applied to new logits.

Every calibrator has ``fit(logits, target)`` (tensors in, returns ``self``), ``forward(logits)`` returning
calibrated logits of the input's shape (``(N, C)``, or ``(N,)`` for a binary problem given as one logit per
sample), ``predict_proba(logits)``, and a ``state_dict`` that restores it exactly (also into a fresh, unfitted
instance: shapes learnt at ``fit`` are resized on load). Methods that output probabilities (histogram binning,
isotonic regression) return their log-probabilities as logits, so ``softmax(forward(z))`` is the calibrated
distribution. ``preserves_argmax`` says whether the method keeps every prediction's class.

Fitting runs with gradients enabled and outside inference mode, so it may be called from any Lightning hook.

Settings are checked at construction (positive iteration counts, epochs, learning rate, batch size, bins;
non-negative regularisation; a ``ValueError`` naming the setting otherwise). ``fit`` always checks its data
(shapes, integer targets in range, finite logits, logits that are not probabilities) and works in the logits'
dtype (float32, float64; half precision is upcast to float32); a fit that raises, or ends with non-finite
parameters, leaves the calibrator unfitted (``is_fitted`` is ``False``, and ``forward`` refuses to run).
``forward`` checks that the logits are finite when ``validate_args`` is on (the default; ``False`` skips that pass
and its device synchronisation, as in torchmetrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.functional.calibration import _check_predictions
from lightning_losses.utilities.checks import check_targets
from lightning_losses.utilities.imports import require
from lightning_losses.utilities.numerics import as_float32

__all__ = [
    "BBQCalibrator",
    "BetaCalibrator",
    "Calibrator",
    "CorrectnessAwareCalibrator",
    "DirichletCalibrator",
    "HistogramBinningCalibrator",
    "IsotonicCalibrator",
    "MatrixScaler",
    "PlattScaler",
    "TemperatureScaler",
    "VectorScaler",
    "default_image_transforms",
]


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


def _check_float(name: str, value: object, low: float = 0.0, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if low_open else value < low):  # type: ignore[operator]
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


def _as_logits(logits: Tensor, name: str = "logits", validate: bool = True) -> tuple[Tensor, bool]:
    """Validate logits and return them as ``(N, C)`` (half precision upcast to float32) plus whether the input was
    binary ``(N,)``."""
    _check_predictions(logits, f"`{name}`")
    if validate and not bool(torch.isfinite(logits).all()):
        raise ValueError(f"`{name}` holds non-finite values (NaN or inf). Calibrators need finite logits.")
    (x,) = as_float32(logits.detach())
    if x.ndim == 1:
        return torch.stack([torch.zeros_like(x), x], dim=1), True
    return x, False


def _check_fit_logits(logits: Tensor, target: Tensor) -> tuple[Tensor, bool]:
    x, binary = _as_logits(logits)
    check_targets(target, x.shape[1], x.shape[0])
    if x.shape[0] == 0:
        raise ValueError("`logits` holds zero samples: cannot fit a calibrator. Pass held-out validation logits.")
    if x.ndim == 2 and bool(((x >= 0) & (x <= 1)).all()) and bool(((x.sum(1) - 1).abs() < 1e-3).all()):
        raise ValueError(
            "`logits` holds rows in [0, 1] summing to 1: these are probabilities, not logits. "
            "Pass the model's logits (before softmax)."
        )
    return x, binary


def _binary_output(z: Tensor, binary: bool) -> Tensor:
    return z[:, 1] - z[:, 0] if binary else z


def _lbfgs(params: list[nn.Parameter], loss_fn: Callable[[], Tensor], max_iter: int) -> int:
    """Minimise ``loss_fn`` over ``params`` with strong-Wolfe LBFGS; return the number of function evaluations."""
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    return evaluations


class Calibrator(nn.Module):
    """Base class of the post-hoc calibrators (see the module docstring for the interface)."""

    preserves_argmax: bool = False
    needs_transformed_logits: bool = False
    fitted: Tensor

    def __init__(self, validate_args: bool = True) -> None:
        super().__init__()
        self.validate_args = bool(validate_args)
        self.register_buffer("fitted", torch.tensor(False))

    def _start_fit(self) -> None:
        """Called once the data are checked, before any parameter changes: unfitted until :meth:`_end_fit`."""
        self._make_trainable()
        self.fitted.fill_(False)

    def _end_fit(self) -> None:
        """Mark fitted when every floating parameter and buffer is finite; raise otherwise (stays unfitted)."""
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise RuntimeError(
                    f"{type(self).__name__}.fit diverged: `{name}` is not finite. The calibrator stays unfitted; "
                    "check the logits (scale, outliers) or lower the learning rate / iteration count."
                )
        self.fitted.fill_(True)

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run (or a fitted state was loaded)."""
        return bool(self.fitted)

    def _make_trainable(self) -> None:
        """Replace inference-mode parameters and buffers (a calibrator built under ``torch.inference_mode``)."""
        with torch.inference_mode(False):
            for module in self.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.is_inference():
                        module._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                for name, b in list(module._buffers.items()):
                    if b is not None and b.is_inference():
                        module._buffers[name] = b.clone()

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(logits, target) first.")

    def fit(self, logits: Tensor, target: Tensor) -> Calibrator:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, logits: Tensor, *args: Any) -> Tensor:
        """Calibrated probabilities: ``(N, C)``, or ``(N,)`` (positive class) for a binary ``(N,)`` input."""
        out = self(logits, *args)
        return torch.sigmoid(out) if out.ndim == 1 else torch.softmax(out, dim=1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Shapes learnt at fit time (number of classes, isotonic breakpoints) follow the checkpoint.
        for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
            key = prefix + name
            if tensor is not None and key in state_dict and state_dict[key].shape != tensor.shape:
                new = torch.empty_like(state_dict[key], device=tensor.device, dtype=tensor.dtype)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(new, requires_grad=tensor.requires_grad)
                else:
                    self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TemperatureScaler(Calibrator):
    r"""Temperature scaling (Guo et al., 2017): one positive temperature dividing every logit.

    ``log T`` is fitted by minimising the negative log-likelihood with strong-Wolfe LBFGS until convergence
    (gradient below ``1e-9`` or ``max_iter`` iterations). The argmax never changes.

    .. math::
        \hat{z} = z / T,\qquad T = \arg\min_{T > 0} -\frac{1}{N}\sum_i \log \mathrm{softmax}(z_i / T)_{y_i}

    Args:
        init_temperature: Starting temperature.
        max_iter: Maximum LBFGS iterations.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> true_logits = 3 * torch.randn(4000, 5, generator=g)
        >>> target = torch.multinomial(true_logits.softmax(-1), 1, generator=g).squeeze(1)
        >>> scaler = TemperatureScaler().fit(2.5 * true_logits, target)  # over-confident by 2.5
        >>> abs(scaler.temperature - 2.5) < 0.15
        True
    """

    preserves_argmax = True

    def __init__(self, init_temperature: float = 1.0, max_iter: int = 200, validate_args: bool = True) -> None:
        super().__init__(validate_args)
        _check_float("init_temperature", init_temperature)
        _check_int("max_iter", max_iter)
        self.init_temperature, self.max_iter = init_temperature, max_iter
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    @property
    def temperature(self) -> float:
        """The fitted temperature ``T``."""
        return float(self.log_temperature.detach().exp())

    def fit(self, logits: Tensor, target: Tensor) -> TemperatureScaler:
        """Fit ``log T`` on the NLL of ``(logits, target)``; returns ``self``."""
        x, _ = _check_fit_logits(logits, target)
        self._start_fit()
        with torch.inference_mode(False), torch.enable_grad():
            x, y = x.clone(), target.clone()
            with torch.no_grad():
                self.log_temperature.fill_(math.log(self.init_temperature))
            _lbfgs(
                [self.log_temperature], lambda: F.cross_entropy(x * torch.exp(-self.log_temperature), y), self.max_iter
            )
        self._end_fit()
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """Return ``logits / T`` (same shape as the input)."""
        x, binary = _as_logits(logits, validate=self.validate_args)
        self._check_fitted()
        return _binary_output(x * torch.exp(-self.log_temperature.detach()), binary).to(logits.dtype)


class _AffineCalibrator(Calibrator):
    """``W z + b`` on logits (or on log-probabilities), fitted on NLL (+ off-diagonal / intercept L2)."""

    on_log_probs = False
    diagonal = False

    def __init__(
        self, off_diagonal_reg: float = 0.0, intercept_reg: float = 0.0, max_iter: int = 500, validate_args: bool = True
    ) -> None:
        super().__init__(validate_args)
        _check_float("off_diagonal_reg", off_diagonal_reg, low_open=False)
        _check_float("intercept_reg", intercept_reg, low_open=False)
        _check_int("max_iter", max_iter)
        self.off_diagonal_reg, self.intercept_reg, self.max_iter = off_diagonal_reg, intercept_reg, max_iter
        self.weight = nn.Parameter(torch.empty(0))
        self.bias = nn.Parameter(torch.empty(0))

    def _inputs(self, x: Tensor) -> Tensor:
        return F.log_softmax(x, dim=1) if self.on_log_probs else x

    def _affine(self, u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return u * weight + bias if self.diagonal else u @ weight.t() + bias

    def fit(self, logits: Tensor, target: Tensor) -> _AffineCalibrator:
        """Fit ``W`` and ``b`` on the NLL of ``(logits, target)``; returns ``self``."""
        x, _ = _check_fit_logits(logits, target)
        self._start_fit()
        c = x.shape[1]
        with torch.inference_mode(False), torch.enable_grad():
            u, y = self._inputs(x.clone()), target.clone()
            # the parameters live in the logits' dtype during the fit (float64 logits fit in float64)
            weight = torch.ones(c, dtype=x.dtype) if self.diagonal else torch.eye(c, dtype=x.dtype)
            self.weight = nn.Parameter(weight.to(x.device))
            self.bias = nn.Parameter(torch.zeros(c, device=x.device, dtype=x.dtype))
            off = ~torch.eye(c, dtype=torch.bool, device=x.device)

            def loss() -> Tensor:
                value = F.cross_entropy(self._affine(u, self.weight, self.bias), y)
                if self.off_diagonal_reg and not self.diagonal:
                    value = value + self.off_diagonal_reg * self.weight[off].pow(2).sum() / (c * (c - 1))
                if self.intercept_reg:
                    value = value + self.intercept_reg * self.bias.pow(2).sum() / c
                return value

            _lbfgs([self.weight, self.bias], loss, self.max_iter)
        self._end_fit()
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """Return the calibrated logits (same shape as the input)."""
        x, binary = _as_logits(logits, validate=self.validate_args)
        self._check_fitted()
        if x.shape[1] != self.bias.shape[0]:
            raise ValueError(f"Fitted for {self.bias.shape[0]} classes, got logits with {x.shape[1]}.")
        u = self._inputs(x)
        out = self._affine(u, self.weight.detach().to(u.dtype), self.bias.detach().to(u.dtype))
        return _binary_output(out, binary).to(logits.dtype)


class VectorScaler(_AffineCalibrator):
    r"""Vector scaling (Guo et al., 2017): a per-class scale and bias, :math:`\hat{z} = w \odot z + b`.

    Example:
        >>> logits, target = torch.randn(300, 3), torch.randint(0, 3, (300,))
        >>> VectorScaler().fit(logits, target)(logits).shape
        torch.Size([300, 3])
    """

    diagonal = True

    def __init__(self, intercept_reg: float = 0.0, max_iter: int = 500, validate_args: bool = True) -> None:
        super().__init__(0.0, intercept_reg, max_iter, validate_args)


class MatrixScaler(_AffineCalibrator):
    r"""Matrix scaling (Guo et al., 2017): :math:`\hat{z} = W z + b`, with optional ODIR regularisation
    :math:`\frac{\lambda}{C(C-1)}\sum_{i \ne j} W_{ij}^2 + \frac{\mu}{C}\sum_j b_j^2`.

    Example:
        >>> logits, target = torch.randn(300, 3), torch.randint(0, 3, (300,))
        >>> MatrixScaler(off_diagonal_reg=1e-2).fit(logits, target)(logits).shape
        torch.Size([300, 3])
    """


class DirichletCalibrator(_AffineCalibrator):
    r"""Dirichlet calibration (Kull et al., 2019): a linear layer on log-probabilities, with ODIR
    (off-diagonal and intercept) regularisation.

    .. math::
        \hat{z} = W \log \mathrm{softmax}(z) + b,\qquad
        \mathcal{L} = \mathrm{NLL} + \frac{\lambda}{C(C-1)}\sum_{i\ne j}W_{ij}^2 + \frac{\mu}{C}\sum_j b_j^2

    Example:
        >>> logits, target = torch.randn(300, 3), torch.randint(0, 3, (300,))
        >>> DirichletCalibrator().fit(logits, target).predict_proba(logits).sum(1).allclose(torch.ones(300))
        True
    """

    on_log_probs = True

    def __init__(
        self,
        off_diagonal_reg: float = 1e-3,
        intercept_reg: float = 1e-3,
        max_iter: int = 500,
        validate_args: bool = True,
    ) -> None:
        super().__init__(off_diagonal_reg, intercept_reg, max_iter, validate_args)


class PlattScaler(Calibrator):
    r"""Platt scaling for binary problems: :math:`\hat{z} = a z + b` on the logit of the positive class.

    Accepts ``(N,)`` logits or ``(N, 2)`` logits (whose logit difference is used). The argmax is kept when
    ``a > 0`` and ``b = 0`` only; in general the decision threshold moves.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(2000, generator=g)
        >>> y = torch.bernoulli(torch.sigmoid(z / 3), generator=g).long()
        >>> scaler = PlattScaler().fit(z, y)
        >>> abs(float(scaler.slope.detach()) - 1 / 3) < 0.15
        True
    """

    def __init__(self, max_iter: int = 200, validate_args: bool = True) -> None:
        super().__init__(validate_args)
        _check_int("max_iter", max_iter)
        self.max_iter = max_iter
        self.slope = nn.Parameter(torch.tensor(1.0))
        self.intercept = nn.Parameter(torch.tensor(0.0))

    def _margin(self, logits: Tensor, validate: bool = True) -> tuple[Tensor, bool]:
        x, binary = _as_logits(logits, validate=validate)
        if x.shape[1] != 2:
            raise ValueError(
                f"PlattScaler is for binary problems (C = 2), got {x.shape[1]} classes. Use TemperatureScaler, "
                "VectorScaler or DirichletCalibrator for multiclass logits."
            )
        return x[:, 1] - x[:, 0], binary

    def fit(self, logits: Tensor, target: Tensor) -> PlattScaler:
        """Fit slope and intercept by logistic regression on the logit; returns ``self``."""
        _check_fit_logits(logits, target)
        z, _ = self._margin(logits)
        self._start_fit()
        with torch.inference_mode(False), torch.enable_grad():
            z, y = z.clone(), target.clone().float()
            with torch.no_grad():
                self.slope.fill_(1.0)
                self.intercept.fill_(0.0)
            _lbfgs(
                [self.slope, self.intercept],
                lambda: F.binary_cross_entropy_with_logits(self.slope * z + self.intercept, y),
                self.max_iter,
            )
        self._end_fit()
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """Calibrated logits: ``(N,)`` for ``(N,)`` input, ``[0, a z + b]`` for ``(N, 2)`` input."""
        self._check_fitted()
        z, binary = self._margin(logits, self.validate_args)
        out = self.slope.detach() * z + self.intercept.detach()
        return (out if binary else torch.stack([torch.zeros_like(out), out], dim=1)).to(logits.dtype)


def _one_vs_rest_output(q: Tensor, binary: bool) -> Tensor:
    """Turn per-class calibrated probabilities into log-probabilities (renormalised), or a binary logit."""
    if binary:
        p = q[:, 1].clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)
    total = q.sum(dim=1, keepdim=True)
    q = torch.where(total > 0, q / total.clamp_min(1e-12), torch.full_like(q, 1.0 / q.shape[1]))
    return q.clamp_min(1e-12).log()


class HistogramBinningCalibrator(Calibrator):
    r"""Histogram binning (Zadrozny & Elkan, 2001), one-vs-rest: each class's probability is replaced by the
    frequency of that class among the validation samples in the same equal-width bin, then renormalised.

    .. math::
        \hat{p}_k = \frac{\theta_{k, b(p_k)}}{\sum_j \theta_{j, b(p_j)}},\qquad
        \theta_{k,b} = \frac{\sum_i \mathbb{1}[y_i = k,\ b(p_{ik}) = b]}{\sum_i \mathbb{1}[b(p_{ik}) = b]}

    Empty bins keep their centre. Binary ``(N,)`` inputs map the positive class only.

    Example:
        >>> logits, target = torch.randn(400, 3), torch.randint(0, 3, (400,))
        >>> HistogramBinningCalibrator(10).fit(logits, target).predict_proba(logits).shape
        torch.Size([400, 3])
    """

    bin_values: Tensor

    def __init__(self, n_bins: int = 15, validate_args: bool = True) -> None:
        super().__init__(validate_args)
        _check_int("n_bins", n_bins)
        self.n_bins = n_bins
        self.register_buffer("bin_values", torch.empty(0, n_bins))

    def _bins(self, p: Tensor) -> Tensor:
        return (p * self.n_bins).floor().long().clamp_(0, self.n_bins - 1)

    def fit(self, logits: Tensor, target: Tensor) -> HistogramBinningCalibrator:
        """Estimate the per-class, per-bin frequencies; returns ``self``."""
        x, _ = _check_fit_logits(logits, target)
        self._start_fit()
        p = torch.softmax(x, dim=1).t()  # (C, N)
        idx = self._bins(p)
        onehot = F.one_hot(target, x.shape[1]).t().double()
        shape = (x.shape[1], self.n_bins)
        count = torch.zeros(shape, dtype=torch.float64, device=x.device).scatter_add_(1, idx, torch.ones_like(onehot))
        hits = torch.zeros_like(count).scatter_add_(1, idx, onehot)
        centres = (torch.arange(self.n_bins, dtype=torch.float64, device=x.device) + 0.5) / self.n_bins
        self.bin_values = torch.where(count > 0, hits / count.clamp_min(1), centres.expand_as(count)).float()
        self._end_fit()
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """Return the log of the calibrated probabilities (or a binary logit)."""
        x, binary = _as_logits(logits, validate=self.validate_args)
        self._check_fitted()
        p = torch.softmax(x, dim=1)
        q = self.bin_values.gather(1, self._bins(p).t()).t().to(p.dtype)
        return _one_vs_rest_output(q, binary).to(logits.dtype)


class IsotonicCalibrator(Calibrator):
    r"""Isotonic regression (Zadrozny & Elkan, 2002), one-vs-rest: a non-decreasing step-wise-linear map of each
    class's probability fitted by pool-adjacent-violators (scikit-learn), then renormalised.

    .. math::
        \hat{f}_k = \arg\min_{f \uparrow} \sum_i \big(\mathbb{1}[y_i = k] - f(p_{ik})\big)^2

    The breakpoints are stored as buffers, so the fitted map is checkpointed and applied with torch alone.
    Fitting needs scikit-learn (the ``data`` extra).

    Example:
        >>> logits, target = torch.randn(400, 3), torch.randint(0, 3, (400,))
        >>> iso = IsotonicCalibrator().fit(logits, target)
        >>> bool((iso.predict_proba(logits).sum(1) - 1).abs().max() < 1e-5)
        True
    """

    x_thresholds: Tensor
    y_thresholds: Tensor
    n_thresholds: Tensor

    def __init__(self, validate_args: bool = True) -> None:
        super().__init__(validate_args)
        self.register_buffer("x_thresholds", torch.empty(0, 0))
        self.register_buffer("y_thresholds", torch.empty(0, 0))
        self.register_buffer("n_thresholds", torch.empty(0, dtype=torch.long))

    def fit(self, logits: Tensor, target: Tensor) -> IsotonicCalibrator:
        """Fit one isotonic map per class; returns ``self``."""
        isotonic = require("sklearn.isotonic", "data")
        x, _ = _check_fit_logits(logits, target)
        self._start_fit()
        p = torch.softmax(x, dim=1).double().cpu().numpy()
        y = F.one_hot(target.cpu(), x.shape[1]).double().numpy()
        xs, ys = [], []
        for k in range(x.shape[1]):
            reg = isotonic.IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p[:, k], y[:, k])
            xs.append(torch.as_tensor(reg.X_thresholds_, dtype=torch.float32))
            ys.append(torch.as_tensor(reg.y_thresholds_, dtype=torch.float32))
        m = max(t.numel() for t in xs)
        self.n_thresholds = torch.tensor([t.numel() for t in xs])
        self.x_thresholds = torch.stack([F.pad(t, (0, m - t.numel()), value=float(t[-1])) for t in xs])
        self.y_thresholds = torch.stack([F.pad(t, (0, m - t.numel()), value=float(t[-1])) for t in ys]).to(x.device)
        self.x_thresholds, self.n_thresholds = self.x_thresholds.to(x.device), self.n_thresholds.to(x.device)
        self._end_fit()
        return self

    def _interpolate(self, k: int, p: Tensor) -> Tensor:
        n = int(self.n_thresholds[k])
        xk, yk = self.x_thresholds[k, :n], self.y_thresholds[k, :n]
        if n == 1:
            return yk.expand_as(p).clone()
        p = p.clamp(float(xk[0]), float(xk[-1]))
        hi = torch.searchsorted(xk, p, right=True).clamp(1, n - 1)
        lo = hi - 1
        x0, x1, y0, y1 = xk[lo], xk[hi], yk[lo], yk[hi]
        span = x1 - x0
        t = torch.where(span > 0, (p - x0) / span.clamp_min(1e-12), torch.zeros_like(p))
        return y0 + t * (y1 - y0)

    def forward(self, logits: Tensor) -> Tensor:
        """Return the log of the calibrated probabilities (or a binary logit)."""
        x, binary = _as_logits(logits, validate=self.validate_args)
        self._check_fitted()
        p = torch.softmax(x, dim=1)
        q = torch.stack([self._interpolate(k, p[:, k].float()) for k in range(p.shape[1])], dim=1)
        return _one_vs_rest_output(q, binary).to(logits.dtype)


def _rotate(x: Tensor, degrees: float) -> Tensor:
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="border")


def default_image_transforms() -> list[Callable[[Tensor], Tensor]]:
    """The CA calibrator's default transformed copies for ``(N, C, H, W)`` image batches (deterministic).

    A 15-degree rotation, a greyscale copy (channel mean; for 1-channel images a contrast reduction instead,
    since they are already grey) and a brightness/contrast jitter, the three kinds of the official code.

    Example:
        >>> [t(torch.zeros(2, 1, 8, 8)).shape for t in default_image_transforms()][0]
        torch.Size([2, 1, 8, 8])
    """

    def rotation(x: Tensor) -> Tensor:
        return _rotate(x, 15.0)

    def greyscale(x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            mean = x.mean(dim=(2, 3), keepdim=True)
            return mean + 0.6 * (x - mean)
        return x.mean(dim=1, keepdim=True).expand_as(x).clone()

    def jitter(x: Tensor) -> Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return 1.2 * (mean + 1.3 * (x - mean))

    return [rotation, greyscale, jitter]


class CorrectnessAwareCalibrator(Calibrator):
    r"""Correctness-aware (CA) calibrator (Liu et al., 2024): a per-sample temperature predicted from how the
    model's top classes fare on transformed copies of the input.

    Features: the ``top_k`` classes of the original logits; the softmax probabilities of each transformed copy
    at those classes (``top_k × A`` numbers). A network ``Linear(top_k·A → hidden) → ReLU → Linear(hidden → 1)``,
    clamped to ``[t_min, t_max]``, gives :math:`T_i`; the output is :math:`z_i / T_i` (argmax unchanged). With
    :math:`c_i` the correctness of the top-1 prediction, :math:`\hat{s}_i = \max \mathrm{softmax}(z_i / T_i)` and
    ``acc`` the batch accuracy, the loss is

    .. math::
        w_i = \begin{cases} 1 - \mathrm{acc} & c_i = 1 \\ \mathrm{acc} & c_i = 0 \end{cases},\qquad
        \mathcal{L} = \frac{\sum_i w_i (\hat{s}_i - c_i)^2}{\sum_i w_i}

    ``fit`` and ``forward`` take the logits of the transformed copies, shape ``(A, N, C)``, as a further
    argument; :meth:`transformed_logits` computes them from a model and an input batch. The official code uses
    Adam at lr 1e-4 for 10 epochs on large validation sets; the defaults here (lr 1e-2, 100 epochs) suit the
    few thousand validation samples of small data sets.

    **Weighting.** ``weighting="balanced"`` is the official loss above: correct and wrong samples get equal total
    weight, so its minimiser is the posterior of correctness under a 50/50 prior,
    :math:`\hat s^* = \frac{(1-\mathrm{acc})\,P(c=1 \mid x)}{(1-\mathrm{acc})\,P(c=1 \mid x) +
    \mathrm{acc}\,P(c=0 \mid x)}`, not :math:`P(c=1 \mid x)`: when the validation accuracy is far above 0.5 it
    under-states the confidence (at ``acc = 0.9`` a sample that is right 90 % of the time is pushed to
    :math:`\hat s = 0.5`), and the ECE after calibration grows with the accuracy. ``weighting="none"`` takes
    :math:`w_i = 1` (the Brier score of the top-label confidence, a proper scoring rule whose minimiser is
    :math:`P(c = 1 \mid x)`).

    **Initialisation.** The official temperature head is ``nn.Linear(hidden, 1)`` with PyTorch's default
    initialisation (weight and bias uniform in :math:`\pm 1/\sqrt{\mathrm{hidden}}`), clamped to
    ``[0.1, 10]``. Its inputs are ReLU features of probabilities, small and non-negative, so the raw temperature
    is close to the bias; whenever it lies below ``t_min`` for every sample (a negative bias, roughly half of the
    seeds), every sample sits on the clamp, whose gradient is zero there, so the loss has zero gradient with
    respect to every parameter and Adam never moves: the calibrator stays at :math:`T = 0.1` (logits times 10).
    ``init="identity"`` (default) starts at :math:`T_i = 1` for every sample (head weight 0, bias 1), inside the
    clamp range, where the first step already has a gradient; ``init="official"`` keeps PyTorch's default.

    Args:
        transforms: Callables mapping an input batch to a transformed batch (default:
            :func:`default_image_transforms`).
        top_k: Number of top classes read from each copy.
        hidden: Width of the hidden layer.
        t_min, t_max: Temperature range.
        epochs, lr, batch_size: Adam training settings.
        weighting: ``"balanced"`` (official: ``w = 1 - acc`` on correct samples, ``acc`` on wrong ones) or
            ``"none"`` (``w = 1``); see **Weighting**.
        init: ``"identity"`` (start at ``T = 1``) or ``"official"`` (PyTorch's default, may start clamped with no
            gradient); see **Initialisation**.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> logits, target = 4 * torch.randn(256, 5, generator=g), torch.randint(0, 5, (256,), generator=g)
        >>> copies = logits + torch.randn(3, 256, 5, generator=g)
        >>> ca = CorrectnessAwareCalibrator(epochs=5).fit(logits, target, copies)
        >>> bool((ca(logits, copies).argmax(1) == logits.argmax(1)).all())
        True
    """

    preserves_argmax = True
    needs_transformed_logits = True

    def __init__(
        self,
        transforms: Sequence[Callable[[Tensor], Tensor]] | None = None,
        top_k: int = 4,
        hidden: int = 5,
        t_min: float = 0.1,
        t_max: float = 10.0,
        epochs: int = 100,
        lr: float = 1e-2,
        batch_size: int = 1000,
        validate_args: bool = True,
        weighting: Literal["balanced", "none"] = "balanced",
        init: Literal["identity", "official"] = "identity",
    ) -> None:
        super().__init__(validate_args)
        if weighting not in ("balanced", "none"):
            raise ValueError(f"`weighting` must be 'balanced' (the official loss) or 'none', got {weighting!r}.")
        if init not in ("identity", "official"):
            raise ValueError(f"`init` must be 'identity' (start at T = 1) or 'official', got {init!r}.")
        self.weighting, self.init = weighting, init
        self.transforms = list(transforms) if transforms is not None else default_image_transforms()
        if not self.transforms or not all(callable(t) for t in self.transforms):
            raise ValueError("`transforms` must hold at least one callable (input batch -> transformed batch).")
        _check_float("t_min", t_min)
        _check_float("t_max", t_max)
        if not t_min < t_max:
            raise ValueError(f"Need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}.")
        for name, value in (("top_k", top_k), ("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size)):
            _check_int(name, value)
        _check_float("lr", lr)
        self.top_k, self.t_min, self.t_max = top_k, t_min, t_max
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        head = nn.Linear(hidden, 1)
        if init == "identity":
            with torch.no_grad():  # T = 1 for every sample: no change, inside the clamp range where gradients flow
                head.weight.zero_()
                head.bias.fill_(1.0)
        self.net = nn.Sequential(nn.Linear(top_k * len(self.transforms), hidden), nn.ReLU(), head)

    @torch.no_grad()
    def transformed_logits(self, model: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
        """Run ``model`` on each transformed copy of ``inputs``; returns ``(A, N, C)`` logits."""
        return torch.stack([model(t(inputs)) for t in self.transforms])

    def _features(self, x: Tensor, copies: Tensor) -> Tensor:
        if copies.ndim != 3 or copies.shape[0] != len(self.transforms) or copies.shape[1:] != x.shape:
            raise ValueError(
                f"`transformed_logits` must have shape ({len(self.transforms)}, N, C) = "
                f"({len(self.transforms)}, {x.shape[0]}, {x.shape[1]}), got {tuple(copies.shape)}."
            )
        k = min(self.top_k, x.shape[1])
        top = x.topk(k, dim=1).indices  # (N, k)
        probs = torch.softmax(copies.float(), dim=2)  # (A, N, C)
        picked = probs.gather(2, top.unsqueeze(0).expand(probs.shape[0], -1, -1))  # (A, N, k)
        if k < self.top_k:
            picked = F.pad(picked, (0, self.top_k - k))
        return picked.permute(1, 0, 2).reshape(x.shape[0], -1)

    def temperatures(self, logits: Tensor, transformed_logits: Tensor) -> Tensor:
        """Per-sample temperatures ``(N,)``."""
        x, _ = _as_logits(logits, validate=self.validate_args)
        return self.net(self._features(x, transformed_logits)).squeeze(1).clamp(self.t_min, self.t_max)

    def fit(
        self, logits: Tensor, target: Tensor, transformed_logits: Tensor | None = None
    ) -> CorrectnessAwareCalibrator:
        """Train the temperature network with the correctness-aware loss; returns ``self``."""
        if transformed_logits is None:
            raise ValueError("CorrectnessAwareCalibrator.fit needs `transformed_logits` (A, N, C).")
        x, _ = _check_fit_logits(logits, target)
        if not isinstance(transformed_logits, Tensor) or not transformed_logits.is_floating_point():
            raise ValueError("`transformed_logits` must be a floating-point tensor (A, N, C).")
        if not bool(torch.isfinite(transformed_logits).all()):
            raise ValueError("`transformed_logits` holds non-finite values (NaN or inf).")
        self._features(x, transformed_logits)  # shape check before anything changes
        self._start_fit()
        with torch.inference_mode(False), torch.enable_grad():
            feats = self._features(x, transformed_logits.detach()).clone()
            x, y = x.clone(), target.clone()
            correct = (x.argmax(1) == y).float()
            optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
            g = torch.Generator().manual_seed(0)
            for _ in range(self.epochs):
                for idx in torch.randperm(x.shape[0], generator=g).split(self.batch_size):
                    t = self.net(feats[idx]).squeeze(1).clamp(self.t_min, self.t_max)
                    s = torch.softmax(x[idx] / t[:, None], dim=1).amax(dim=1)
                    c = correct[idx]
                    acc = c.mean()
                    w = torch.where(c > 0, 1 - acc, acc) if self.weighting == "balanced" else torch.ones_like(c)
                    loss = (w * (s - c) ** 2).sum() / w.sum().clamp_min(1e-12)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self._end_fit()
        return self

    def forward(self, logits: Tensor, transformed_logits: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Return ``logits / T_i`` (same shape as ``logits``)."""
        if transformed_logits is None:
            raise ValueError("CorrectnessAwareCalibrator needs `transformed_logits` (A, N, C) at forward.")
        self._check_fitted()
        x, binary = _as_logits(logits, validate=self.validate_args)
        with torch.no_grad():
            t = self.temperatures(x, transformed_logits)
        return _binary_output(x / t[:, None], binary).to(logits.dtype)


def _log_p_and_log_1mp(x: Tensor) -> tuple[Tensor, Tensor]:
    """``log p`` and ``log(1 - p)`` of ``p = softmax(x)`` (stable: ``log(1 - p_k) = logsumexp_{j≠k} x_j - lse``)."""
    log_p = F.log_softmax(x, dim=1)
    return log_p, torch.log(-torch.expm1(log_p.clamp_max(-1e-12)))


class BetaCalibrator(Calibrator):
    r"""Beta calibration (Kull, Silva Filho & Flach, 2017), multiclass as in netcal: one beta map per class inside a
    softmax.

    .. math::
        \hat{z}_k = a_k \ln p_k - b_k \ln(1 - p_k) + c_k,\qquad a_k, b_k \ge 0,

    fitted by maximum likelihood (cross-entropy of :math:`\mathrm{softmax}(\hat z)`; for a binary ``(N,)`` logit,
    :math:`\hat z = a \ln p - b \ln(1 - p) + c` with the logistic loss). The problem is convex; the constraint
    :math:`a, b \ge 0` (which makes the map monotone) is enforced by an active set: LBFGS on the free
    parameters, parameters that end negative are fixed at 0, and a fixed parameter whose gradient points inward
    is released, until the KKT conditions hold. :math:`a = 1, b = c = 0` is the identity, the starting point.
    The argmax may change.

    Source: the paper (binary beta calibration, "refit with the negative parameter fixed at 0") and netcal's
    ``netcal/scaling/BetaCalibration.py`` (EFS-OpenSource/calibration-framework), whose multiclass form (the
    multinomial extension, ``method="mle"``: L-BFGS-B with the bounds ``a, b >= 0``) this follows. netcal clips
    the probabilities to ``[eps, 1 - eps]`` (machine epsilon); here ``ln p`` and ``ln(1 - p)`` come from the
    logits directly.

    Args:
        max_iter: Maximum LBFGS iterations per active-set round.
        max_rounds: Maximum active-set rounds.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = 2 * torch.randn(3000, 4, generator=g)
        >>> target = torch.multinomial((logits / 2).softmax(1), 1, generator=g).squeeze(1)  # over-confident by 2
        >>> beta = BetaCalibrator().fit(logits, target)
        >>> nll = lambda z: float(F.cross_entropy(z, target))
        >>> nll(beta(logits)) < nll(logits)
        True
        >>> bool((beta.a >= 0).all() and (beta.b >= 0).all())
        True
    """

    a: Tensor
    b: Tensor
    c: Tensor

    def __init__(self, max_iter: int = 200, max_rounds: int = 10, validate_args: bool = True) -> None:
        super().__init__(validate_args)
        _check_int("max_iter", max_iter)
        _check_int("max_rounds", max_rounds)
        self.max_iter, self.max_rounds = max_iter, max_rounds
        for name in ("a", "b", "c"):  # float64: a checkpoint of a float32 or float64 fit loads exactly
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))

    @staticmethod
    def _features(x: Tensor, binary: bool) -> tuple[Tensor, Tensor]:
        if binary:
            z = x[:, 1] - x[:, 0]
            return F.logsigmoid(z)[:, None], F.logsigmoid(-z)[:, None]
        return _log_p_and_log_1mp(x)

    @staticmethod
    def _map(log_p: Tensor, log_q: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return a * log_p - b * log_q + c

    def fit(self, logits: Tensor, target: Tensor) -> BetaCalibrator:
        """Fit ``a, b >= 0`` and ``c`` by constrained maximum likelihood; returns ``self``."""
        x, binary = _check_fit_logits(logits, target)
        self._start_fit()
        k = 1 if binary else x.shape[1]
        with torch.inference_mode(False), torch.enable_grad():
            log_p, log_q = (t.clone() for t in self._features(x.clone(), binary))
            y = target.clone()
            yf = y.to(x.dtype)

            def nll(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
                z = self._map(log_p, log_q, a, b, c)
                return F.binary_cross_entropy_with_logits(z[:, 0], yf) if binary else F.cross_entropy(z, y)

            a = torch.ones(k, dtype=x.dtype, device=x.device)
            b, c = torch.zeros_like(a), torch.zeros_like(a)
            free_a, free_b = torch.ones(k, dtype=torch.bool), torch.ones(k, dtype=torch.bool)
            for _ in range(self.max_rounds):
                pa = nn.Parameter(a.clone())
                pb = nn.Parameter(b.clone())
                pc = nn.Parameter(c.clone())
                ma, mb = free_a.to(x.device, x.dtype), free_b.to(x.device, x.dtype)

                def loss(pa: Tensor = pa, pb: Tensor = pb, pc: Tensor = pc, ma: Tensor = ma, mb: Tensor = mb) -> Tensor:
                    return nll(pa * ma, pb * mb, pc)

                _lbfgs([pa, pb, pc], loss, self.max_iter)
                a, b, c = (pa * ma).detach(), (pb * mb).detach(), pc.detach()
                negative_a, negative_b = (a < 0).cpu(), (b < 0).cpu()
                if negative_a.any() or negative_b.any():  # fix the negative ones at the bound and refit
                    free_a &= ~negative_a
                    free_b &= ~negative_b
                    a, b = a.clamp_min(0), b.clamp_min(0)
                    continue
                # KKT: a parameter held at 0 stays there only if the loss increases when it moves inward
                ga, gb = (nn.Parameter(a.clone()), nn.Parameter(b.clone()))
                nll(ga, gb, c).backward()
                assert ga.grad is not None and gb.grad is not None
                release_a, release_b = (~free_a) & (ga.grad.cpu() < 0), (~free_b) & (gb.grad.cpu() < 0)
                if not (release_a.any() or release_b.any()):
                    break
                free_a |= release_a
                free_b |= release_b
        self.a, self.b, self.c = a.double(), b.double(), c.double()
        self._end_fit()
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """Calibrated logits ``a ln p - b ln(1 - p) + c`` (``(N,)`` for a binary ``(N,)`` input)."""
        x, binary = _as_logits(logits, validate=self.validate_args)
        self._check_fitted()
        if not binary and x.shape[1] != self.a.shape[0]:
            raise ValueError(f"BetaCalibrator was fitted on {self.a.shape[0]} classes, got logits with {x.shape[1]}.")
        log_p, log_q = self._features(x, binary)
        z = self._map(log_p, log_q, self.a.to(x), self.b.to(x), self.c.to(x))
        return (z[:, 0] if binary else z).to(logits.dtype)


class BBQCalibrator(Calibrator):
    r"""Bayesian binning into quantiles (Naeini, Cooper & Hauskrecht, 2015), one-vs-rest: an average of histogram
    binnings of every class's probability, with ``B`` from :math:`\lfloor N^{1/3}/10 \rfloor` to
    :math:`\min(\lceil N/5 \rceil, \lceil 10 N^{1/3} \rceil)` bins, weighted by a score of each binning.

    .. math::
        \hat p_k(x) = \frac{\sum_M w_M\, \theta^{(M)}_{k, b_M(p_k)}}{\sum_M w_M},\qquad
        w_M \propto \begin{cases}
            \exp(-\mathrm{BIC}_M / 2),\ \mathrm{BIC}_M = -2 \log L_M + B_M \log N & \text{``bic'' (netcal)} \\
            \exp(-\mathrm{AIC}_M / 2),\ \mathrm{AIC}_M = -2 \log L_M + 2 B_M & \text{``aic''} \\
            \prod_b \frac{\Gamma(N'/B)}{\Gamma(n_b + N'/B)} \frac{\Gamma(m_b + \alpha_b)}{\Gamma(\alpha_b)}
            \frac{\Gamma(n_b - m_b + \beta_b)}{\Gamma(\beta_b)} & \text{``bayesian'' (the paper)}
        \end{cases}

    then renormalised over the classes. :math:`n_b, m_b` are a bin's sample and positive counts,
    :math:`\alpha_b = N' \bar p_b / B`, :math:`\beta_b = N'(1 - \bar p_b) / B` with :math:`N' = 2` and
    :math:`\bar p_b` the bin's midpoint. With the BIC/AIC scores a bin's value is its frequency :math:`m_b/n_b`
    (the bin's midpoint when empty) and the models are pruned by netcal's elbow rule (sorted weights are kept
    while consecutive gaps, divided by their variance, exceed ``1e-3``); with the Bayesian score it is the
    posterior mean :math:`(m_b + \alpha_b) / (n_b + \alpha_b + \beta_b)` and every model is kept.

    Source: the paper (equal-frequency bins, the Bayesian score) and netcal's ``netcal/binning/BBQ.py``
    (EFS-OpenSource/calibration-framework), which uses equal-width bins with the BIC score and the elbow rule:
    ``BBQCalibrator(binning="uniform", score="bic")`` (the default) follows netcal, and
    ``BBQCalibrator(binning="quantile", score="bayesian")`` the paper. A probability on a bin edge goes to the
    bin on its left (netcal's ``np.digitize(..., right=True)`` at transform time; netcal's fit assigns edge values
    to the right bin, which matters only for samples exactly on an edge). A class with no validation sample gets
    its bins' frequencies (zero) where netcal drops the class. Memory: the edges and values of every binning,
    ``C × M × B_max`` floats (``M ≈ 10 N^{1/3}`` binnings).

    Args:
        binning: ``"uniform"`` (equal-width bins) or ``"quantile"`` (equal-frequency bins).
        score: ``"bic"``, ``"aic"`` or ``"bayesian"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = 3 * torch.randn(2000, 3, generator=g)
        >>> target = torch.multinomial((logits / 3).softmax(1), 1, generator=g).squeeze(1)
        >>> bbq = BBQCalibrator().fit(logits, target)
        >>> nll = lambda z: float(F.cross_entropy(z, target))
        >>> nll(bbq(logits)) < nll(logits)
        True
    """

    edges: Tensor
    values: Tensor
    weights: Tensor
    n_bins: Tensor

    def __init__(
        self,
        binning: Literal["uniform", "quantile"] = "uniform",
        score: Literal["bic", "aic", "bayesian"] = "bic",
        validate_args: bool = True,
    ) -> None:
        super().__init__(validate_args)
        if binning not in ("uniform", "quantile"):
            raise ValueError(f"`binning` must be 'uniform' or 'quantile', got {binning!r}.")
        if score not in ("bic", "aic", "bayesian"):
            raise ValueError(f"`score` must be 'bic', 'aic' or 'bayesian', got {score!r}.")
        self.binning, self.score = binning, score
        f64 = torch.float64
        self.register_buffer("edges", torch.empty(0, 0, 0, dtype=f64))  # (C, M, B_max + 1), padded with 2.0 > p
        self.register_buffer("values", torch.empty(0, 0, 0, dtype=f64))  # (C, M, B_max)
        self.register_buffer("weights", torch.empty(0, 0, dtype=f64))  # (C, M), zero for pruned models
        self.register_buffer("n_bins", torch.empty(0, dtype=torch.long))  # (M,)

    @staticmethod
    def bin_range(n: int) -> range:
        """The numbers of bins tried for ``n`` samples (the paper's and netcal's range)."""
        root = n ** (1.0 / 3.0)
        low = int(max(1, math.floor(root / 10.0)))
        high = int(min(math.ceil(n / 5.0), math.ceil(root * 10.0)))
        return range(low, max(high, low) + 1)

    @staticmethod
    def _bin_of(edges: Tensor, n_bins: Tensor, p: Tensor) -> Tensor:
        """Bin index of ``p`` (N,) under each model's edges (M, B_max + 1): ``(M, N)``; intervals ``(lo, hi]``."""
        idx = torch.searchsorted(edges.contiguous(), p.expand(edges.shape[0], -1).contiguous(), right=False) - 1
        return torch.minimum(idx.clamp_min(0), (n_bins - 1)[:, None])

    def _fit_class(self, p: Tensor, y: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        n, b_max = p.shape[0], max(sizes)
        n_bins = torch.tensor(sizes, device=p.device)
        edges = torch.full((len(sizes), b_max + 1), 2.0, dtype=torch.float64, device=p.device)  # 2: padding
        for m, b in enumerate(sizes):
            grid = torch.linspace(0, 1, b + 1, dtype=torch.float64, device=p.device)
            if self.binning == "quantile":
                grid = torch.quantile(p, grid)
                grid[0], grid[-1] = 0.0, 1.0
            edges[m, : b + 1] = grid
        idx = self._bin_of(edges, n_bins, p)  # (M, N)
        count = torch.zeros(len(sizes), b_max, dtype=torch.float64, device=p.device)
        count.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        hits = torch.zeros_like(count).scatter_add_(1, idx, y.double().expand(len(sizes), -1).contiguous())
        real = torch.arange(b_max, device=p.device)[None, :] < n_bins[:, None]
        mid = torch.where(real, 0.5 * (edges[:, :-1].clamp_max(1.0) + edges[:, 1:].clamp_max(1.0)), 0.5)
        if self.score == "bayesian":
            prior = 2.0 / n_bins.double()[:, None]
            alpha, beta = prior * mid, prior * (1 - mid)
            values = (hits + alpha) / (count + prior)
            log_ml = (
                torch.lgamma(prior) - torch.lgamma(count + prior)
                + torch.lgamma(hits + alpha) - torch.lgamma(alpha)
                + torch.lgamma(count - hits + beta) - torch.lgamma(beta)
            )  # fmt: skip
            log_score = torch.where(real, log_ml, torch.zeros_like(log_ml)).sum(1)
            weights = torch.softmax(log_score, dim=0)
        else:
            values = torch.where(count > 0, hits / count.clamp_min(1), mid)
            q = values.gather(1, idx)  # (M, N) calibrated probabilities of the samples
            log_q = torch.log(q).clamp_min(-100.0)
            log_1q = torch.log1p(-q).clamp_min(-100.0)  # torch's binary cross-entropy clamps the logs at -100
            log_lik = (y.double() * log_q + (1 - y.double()) * log_1q).sum(1)
            dof = n_bins.double()
            penalty = dof * math.log(n) if self.score == "bic" else 2.0 * dof
            criterion = -2.0 * log_lik + penalty
            weights = torch.exp((criterion.min() - criterion) / 2.0)
            weights = self._elbow(weights)
        values = torch.where(real, values, torch.zeros_like(values))
        return edges, values, weights

    @staticmethod
    def _elbow(scores: Tensor, alpha: float = 0.001) -> Tensor:
        """netcal's model pruning: keep the best models while the score drops (over their variance) exceed ``alpha``."""
        order = scores.argsort(descending=True, stable=True)
        s = scores[order]
        variance = float(scores.var(unbiased=False))
        k, m = 0, s.shape[0]
        while k < m - 1 and float(s[k]) == float(s[k + 1]):
            k += 1
        while k < m - 1 and variance > 0 and (float(s[k]) - float(s[k + 1])) / variance > alpha:
            k += 1
        keep = torch.zeros_like(scores)
        keep[order[: k + 1]] = s[: k + 1]
        return keep / keep.sum()

    def fit(self, logits: Tensor, target: Tensor) -> BBQCalibrator:
        """Fit every binning of every class and their weights; returns ``self``."""
        x, _ = _check_fit_logits(logits, target)
        self._start_fit()
        p = torch.softmax(x.double(), dim=1)
        sizes = list(self.bin_range(x.shape[0]))
        fitted = [self._fit_class(p[:, k].contiguous(), (target == k).double(), sizes) for k in range(x.shape[1])]
        self.edges = torch.stack([f[0] for f in fitted])
        self.values = torch.stack([f[1] for f in fitted])
        self.weights = torch.stack([f[2] for f in fitted])
        self.n_bins = torch.tensor(sizes, device=x.device)
        self._end_fit()
        return self

    def calibrated_class_probabilities(self, probs: Tensor) -> Tensor:
        """The per-class BBQ estimates ``(N, C)`` of probabilities ``probs`` (before the renormalisation)."""
        out = []
        for k in range(probs.shape[1]):
            idx = self._bin_of(self.edges[k], self.n_bins, probs[:, k].double().contiguous())  # (M, N)
            q = self.values[k].gather(1, idx)  # (M, N)
            out.append((self.weights[k][:, None] * q).sum(0))
        return torch.stack(out, dim=1).clamp(0, 1)

    def forward(self, logits: Tensor) -> Tensor:
        """Return the log of the calibrated probabilities (or a binary logit)."""
        x, binary = _as_logits(logits, validate=self.validate_args)
        self._check_fitted()
        if x.shape[1] != self.edges.shape[0]:
            raise ValueError(
                f"BBQCalibrator was fitted on {self.edges.shape[0]} classes, got logits with {x.shape[1]}."
            )
        q = self.calibrated_class_probabilities(torch.softmax(x.double(), dim=1))
        return _one_vs_rest_output(q, binary).to(logits.dtype)

r"""Self-Tuning Network building blocks: hyper-layers, hyperparameter transforms and the perturbation distribution.

A Self-Tuning Network (MacKay et al., 2019) approximates the best response :math:`w^*(\lambda)` of the weights to
the hyperparameters by a network whose units are gated by a linear map of the hyperparameters:

.. math::
    y = (W x + b) + s_W(h) \odot (V x) + s_b(h) \odot c, \qquad [s_W, s_b] = G\, h

where :math:`h` is the (unconstrained) hyperparameter vector of each example. With :math:`G = 0` or
:math:`V = 0, c = 0` a hyper-layer is exactly a plain layer with weights :math:`(W, b)`. Each of :math:`(W, b)`,
:math:`(V, c)` and :math:`G` is read only inside the forward of the submodule that owns it, so the layers work when
their parts are sharded (FSDP, ``fully_shard``, DeepSpeed ZeRO-3 gather a module's parameters in its own forward).

Hyperparameters are kept unconstrained and mapped to their admissible range by a transform (bounded: stretched
sigmoid, positive: softplus, discrete: floor of a stretched sigmoid). During training they are perturbed,
:math:`\hat u = u + \operatorname{softplus}(\sigma)\,\varepsilon`, and the perturbation scale is learnt with an
entropy bonus :math:`H = \sum_j \log\big(\operatorname{softplus}(\sigma_j)\sqrt{2\pi e}\big)`.

Example:
    >>> import torch
    >>> layer = HyperLinear(3, 2, num_hyperparameters=1)
    >>> hp = PerturbedHyperparameters({"ls.amount": BoundedTransform(0.0, 0.5)}, {"ls.amount": 0.1})
    >>> u = hp.sample(4)
    >>> n = condition_hyper_layers(layer, hp.hypernet_input(u))
    >>> tuple(layer(torch.randn(4, 3)).shape), n
    ((4, 2), 1)
    >>> bool(((hp.values(u)["ls.amount"] > 0) & (hp.values(u)["ls.amount"] < 0.5)).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BoundedTransform",
    "DiscreteTransform",
    "GatedConv2d",
    "GatedLinear",
    "HyperConv2d",
    "HyperLinear",
    "HyperparameterTransform",
    "PerturbedHyperparameters",
    "PositiveTransform",
    "condition_hyper_layers",
    "hyper_layers",
]


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class HyperparameterTransform:
    """Maps an unconstrained real ``u`` to an admissible hyperparameter value, and back."""

    def __call__(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, value: float) -> float:
        """The unconstrained ``u`` whose transform is ``value``."""
        raise NotImplementedError

    def hypernet_input(self, u: Tensor) -> Tensor:
        r"""What the hyper-layers see of ``u``: the position inside the range, in :math:`(-1, 1)`.

        Default :math:`2\,\mathrm{sigmoid}(u) - 1`. A bounded input keeps the gates' scale (and their training
        gradients) independent of how wide the hyperparameter's range is.
        """
        return 2.0 * torch.sigmoid(u) - 1.0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class BoundedTransform(HyperparameterTransform):
    r"""A value in the open interval ``(low, high)``: :math:`v = a + (b - a)\,\mathrm{sigmoid}(u)`.

    Example:
        >>> t = BoundedTransform(1.0, 3.0)
        >>> float(t(torch.tensor(0.0))), round(float(t(torch.tensor(t.inverse(2.5)))), 5)
        (2.0, 2.5)
    """

    def __init__(self, low: float, high: float) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"BoundedTransform needs finite low < high, got low={low}, high={high}.")
        self.low, self.high = float(low), float(high)

    def __call__(self, u: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(u)

    def inverse(self, value: float) -> float:
        if not self.low < value < self.high:
            raise ValueError(
                f"Initial value {value} lies outside the open interval ({self.low:g}, {self.high:g}) of its "
                "transform. Start strictly inside the bounds."
            )
        p = (value - self.low) / (self.high - self.low)
        return math.log(p) - math.log1p(-p)


class PositiveTransform(HyperparameterTransform):
    r"""A value above ``low`` (default 0): :math:`v = a + \operatorname{softplus}(u)`.

    Example:
        >>> t = PositiveTransform()
        >>> round(float(t(torch.tensor(t.inverse(4.0)))), 5)
        4.0
    """

    def __init__(self, low: float = 0.0) -> None:
        if not math.isfinite(low):
            raise ValueError(f"PositiveTransform needs a finite lower bound, got {low}.")
        self.low = float(low)

    def __call__(self, u: Tensor) -> Tensor:
        return self.low + F.softplus(u)

    def hypernet_input(self, u: Tensor) -> Tensor:
        """The softsign ``u / (1 + |u|)``: unbounded above, so a slower squashing than the sigmoid."""
        return u / (1.0 + u.abs())

    def inverse(self, value: float) -> float:
        if not value > self.low:
            raise ValueError(f"Initial value {value} must be > {self.low:g} for a PositiveTransform.")
        return _inverse_softplus(value - self.low)


class DiscreteTransform(HyperparameterTransform):
    r"""An integer in ``[low, high]``: the floor of a sigmoid stretched over ``[low, high + 1)``.

    .. math:: v = \min\big(\lfloor a + (b - a + 1)\,\mathrm{sigmoid}(u) \rfloor,\; b\big)

    Each integer owns an equal share of the sigmoid's range. The hypernetwork sees the continuous ``u``; only the
    value used by the model is floored.

    Example:
        >>> t = DiscreteTransform(1, 4)
        >>> [int(t(torch.tensor(t.inverse(k)))) for k in (1, 2, 3, 4)]
        [1, 2, 3, 4]
    """

    def __init__(self, low: int, high: int) -> None:
        if int(low) != low or int(high) != high or not low <= high:
            raise ValueError(f"DiscreteTransform needs integers low <= high, got low={low}, high={high}.")
        self.low, self.high = int(low), int(high)

    def continuous(self, u: Tensor) -> Tensor:
        """The stretched sigmoid before flooring, in ``(low, high + 1)``."""
        return self.low + (self.high - self.low + 1) * torch.sigmoid(u)

    def __call__(self, u: Tensor) -> Tensor:
        return torch.clamp(torch.floor(self.continuous(u)), max=float(self.high))

    def inverse(self, value: float) -> float:
        if not self.low <= value <= self.high:
            raise ValueError(f"Initial value {value} must lie in [{self.low}, {self.high}].")
        p = (math.floor(value) + 0.5 - self.low) / (self.high - self.low + 1)  # middle of the integer's share
        return math.log(p) - math.log1p(-p)


class GatedLinear(nn.Linear):
    r"""The hyper path of :class:`HyperLinear`: :math:`s_W \odot (V x) + s_b \odot c` with per-unit scales.

    A ``nn.Linear`` (same parameters, initialisation and ``state_dict``) whose forward takes the scales, so that
    :math:`V` and :math:`c` are only read inside its own forward.

    Example:
        >>> path = GatedLinear(3, 2)
        >>> x, s_w, s_b = torch.randn(4, 3), torch.rand(4, 2), torch.rand(4, 2)
        >>> torch.allclose(path(x, s_w, s_b), s_w * (x @ path.weight.T) + s_b * path.bias)
        True
    """

    def forward(self, x: Tensor, s_w: Tensor, s_b: Tensor) -> Tensor:  # type: ignore[override]
        out = s_w * F.linear(x, self.weight)
        if self.bias is not None:
            out = out + s_b * self.bias
        return out


class GatedConv2d(nn.Conv2d):
    r"""The hyper path of :class:`HyperConv2d`: :math:`s_W \odot (V * x) + s_b \odot c`, scales per channel.

    A ``nn.Conv2d`` (same parameters and ``state_dict``) whose forward takes the scales, already shaped to broadcast
    over ``(N, C, H, W)``.

    Example:
        >>> path = GatedConv2d(1, 2, 3, padding=1)
        >>> x, s = torch.randn(2, 1, 5, 5), torch.rand(2, 2, 1, 1)
        >>> ref = s * F.conv2d(x, path.weight, None, padding=1) + s * path.bias.reshape(-1, 1, 1)
        >>> torch.allclose(path(x, s, s), ref)
        True
    """

    def forward(self, x: Tensor, s_w: Tensor, s_b: Tensor) -> Tensor:  # type: ignore[override]
        out = s_w * self._conv_forward(x, self.weight, None)
        if self.bias is not None:
            out = out + s_b * self.bias.reshape(-1, 1, 1)
        return out


class _HyperLayer(nn.Module):
    """Shared machinery: the gate ``G`` (hyperparameters → per-unit scales) and the stored condition."""

    condition: Tensor | None

    def _init_gate(self, num_hyperparameters: int, out_units: int, gate_init_std: float) -> None:
        if num_hyperparameters < 1:
            raise ValueError(f"`num_hyperparameters` must be >= 1, got {num_hyperparameters}.")
        self.num_hyperparameters = num_hyperparameters
        self.gate = nn.Linear(num_hyperparameters, 2 * out_units, bias=False)
        with torch.no_grad():
            if gate_init_std > 0:
                self.gate.weight.normal_(0.0, gate_init_std)
            else:
                self.gate.weight.zero_()
        self.condition = None

    def _scales(self, x: Tensor, condition: Tensor | None, out_units: int) -> tuple[Tensor, Tensor]:
        h = self.condition if condition is None else condition
        if h is None:
            raise RuntimeError(
                f"{type(self).__name__} has no hyperparameter condition. Call "
                "`condition_hyper_layers(model, h)` (the SelfTuning callback does it) or pass `condition=`."
            )
        if h.shape[-1] != self.num_hyperparameters or h.ndim > 2:
            raise ValueError(
                f"The condition must have shape ({self.num_hyperparameters},) or (batch, {self.num_hyperparameters}),"
                f" got {tuple(h.shape)}."
            )
        if h.ndim == 2 and h.shape[0] != x.shape[0]:
            raise ValueError(
                f"The condition holds {h.shape[0]} rows but the input batch has {x.shape[0]} examples; "
                "condition on one row per example or on a single vector."
            )
        s = self.gate(h.to(dtype=x.dtype) if x.is_floating_point() else h)
        s_w, s_b = s[..., :out_units], s[..., out_units:]
        return s_w, s_b


class HyperLinear(_HyperLayer):
    r"""STN linear layer: an elementwise linear map plus a hyper path gated by the hyperparameters.

    .. math:: y = (W x + b) + s_W(h) \odot (V x) + s_b(h) \odot c, \qquad [s_W, s_b] = G h

    Args:
        in_features: Input width.
        out_features: Output width.
        num_hyperparameters: Length of the condition vector ``h``.
        bias: Whether the layer has the biases ``b`` and ``c``.
        gate_init_std: Standard deviation of the initial gate ``G`` (0 starts as a plain layer).

    Example:
        >>> layer = HyperLinear(3, 2, num_hyperparameters=2, gate_init_std=0.0)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(layer(x, condition=torch.ones(2)), layer.elementwise(x))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_hyperparameters: int,
        bias: bool = True,
        gate_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.elementwise = nn.Linear(in_features, out_features, bias=bias)
        self.hyper = GatedLinear(in_features, out_features, bias=bias)
        self.out_features = out_features
        self._init_gate(num_hyperparameters, out_features, gate_init_std)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        s_w, s_b = self._scales(x, condition, self.out_features)
        if s_w.ndim == 2 and x.ndim > 2:  # (N, ..., in): broadcast the per-example scales over the middle dims
            shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (self.out_features,)
            s_w, s_b = s_w.reshape(shape), s_b.reshape(shape)
        return self.elementwise(x) + self.hyper(x, s_w, s_b)


class HyperConv2d(_HyperLayer):
    r"""STN 2-D convolution: per output channel, the hyper convolution is scaled by a linear map of ``h``.

    .. math:: y = (W * x + b) + s_W(h) \odot (V * x) + s_b(h) \odot c

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        num_hyperparameters: Length of the condition vector ``h``.
        stride: Convolution stride.
        padding: Convolution padding.
        bias: Whether the layer has the biases ``b`` and ``c``.
        gate_init_std: Standard deviation of the initial gate ``G``.

    Example:
        >>> conv = HyperConv2d(1, 4, 3, num_hyperparameters=1, padding=1)
        >>> tuple(conv(torch.randn(2, 1, 8, 8), condition=torch.zeros(2, 1)).shape)
        (2, 4, 8, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        num_hyperparameters: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        gate_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.elementwise = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.hyper = GatedConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.out_channels = out_channels
        self._init_gate(num_hyperparameters, out_channels, gate_init_std)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        s_w, s_b = self._scales(x, condition, self.out_channels)
        shape = (-1, self.out_channels, 1, 1) if s_w.ndim == 2 else (self.out_channels, 1, 1)
        s_w, s_b = s_w.reshape(shape), s_b.reshape(shape)
        return self.elementwise(x) + self.hyper(x, s_w, s_b)


def hyper_layers(module: nn.Module) -> Iterator[_HyperLayer]:
    """Every STN hyper-layer inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, _HyperLayer):
            yield sub


def condition_hyper_layers(module: nn.Module, condition: Tensor | None) -> int:
    """Set the condition ``h`` (shape ``(k,)`` or ``(batch, k)``) of every hyper-layer in ``module``.

    Returns:
        The number of hyper-layers conditioned.
    """
    count = 0
    for layer in hyper_layers(module):
        layer.condition = condition
        count += 1
    return count


class PerturbedHyperparameters(nn.Module):
    r"""The STN hyperparameters: unconstrained values ``u``, a learnable perturbation scale, and their transforms.

    .. math::
        \hat u = u + \operatorname{softplus}(\sigma) \odot \varepsilon,\ \varepsilon \sim \mathcal N(0, I), \qquad
        H = \sum_j \log\big(\operatorname{softplus}(\sigma_j) \sqrt{2 \pi e}\big)

    Args:
        transforms: Mapping from hyperparameter name to its transform (the order fixes the condition vector).
        initial: Initial admissible value of every hyperparameter.
        perturb_scale: Initial perturbation scale ``softplus(σ)`` in unconstrained space.
        per_example: Names drawn once per example (the others once per batch, e.g. dropout rates and scalar
            loss coefficients). ``None``: every name per example.

    Example:
        >>> hp = PerturbedHyperparameters({"t": PositiveTransform()}, {"t": 4.0}, perturb_scale=0.5)
        >>> round(float(hp.scale()[0]), 4), round(hp.current()["t"], 4)
        (0.5, 4.0)
    """

    per_example_mask: Tensor

    def __init__(
        self,
        transforms: Mapping[str, HyperparameterTransform],
        initial: Mapping[str, float],
        perturb_scale: float = 0.5,
        per_example: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not transforms:
            raise ValueError("PerturbedHyperparameters needs at least one hyperparameter.")
        missing = set(transforms) - set(initial)
        if missing:
            raise ValueError(f"No initial value for {sorted(missing)}; give one for every tuned hyperparameter.")
        if not perturb_scale > 0:
            raise ValueError(f"`perturb_scale` must be > 0, got {perturb_scale}.")
        self.names = list(transforms)
        self.transforms = [transforms[n] for n in self.names]
        per = set(self.names if per_example is None else per_example)
        unknown = per - set(self.names)
        if unknown:
            raise ValueError(f"`per_example` names {sorted(unknown)} are not tuned hyperparameters {self.names}.")
        self._per_example = [n in per for n in self.names]  # read on every draw: kept on the host, no sync
        self.register_buffer("per_example_mask", torch.tensor(self._per_example), persistent=False)
        u0 = [t.inverse(float(initial[n])) for n, t in zip(self.names, self.transforms)]
        self.unconstrained = nn.Parameter(torch.tensor(u0, dtype=torch.float32))
        self.scale_raw = nn.Parameter(torch.full((len(self.names),), _inverse_softplus(perturb_scale)))

    def scale(self) -> Tensor:
        """The perturbation scale ``softplus(σ)``, one per hyperparameter."""
        return F.softplus(self.scale_raw)

    def entropy(self) -> Tensor:
        """Entropy of the Gaussian perturbation, up to the constant of the dimension."""
        return torch.log(self.scale() * math.sqrt(2 * math.pi * math.e)).sum()

    def sample(self, batch_size: int | None, generator: torch.Generator | None = None, perturb: bool = True) -> Tensor:
        """Perturbed unconstrained values: ``(batch_size, k)``, or ``(k,)`` when ``batch_size`` is ``None``.

        Per-batch hyperparameters share one draw across the rows. Gradients flow to ``u`` and ``σ``.
        """
        k = len(self.names)
        rows = 1 if batch_size is None else batch_size
        u = self.unconstrained
        if not perturb:
            out = u.expand(rows, k)
        else:
            shared = torch.randn(1, k, generator=generator)  # drawn first: identical whatever the batch size
            eps = torch.randn(rows, k, generator=generator)
            eps = torch.where(torch.tensor(self._per_example), eps, shared.expand_as(eps)).to(u.device)
            out = u + self.scale() * eps
        return out[0] if batch_size is None else out

    def hypernet_input(self, u: Tensor) -> Tensor:
        """The condition of the hyper-layers for unconstrained ``u`` (``(k,)`` or ``(batch, k)``), in (-1, 1)."""
        return torch.stack([t.hypernet_input(u[..., j]) for j, t in enumerate(self.transforms)], dim=-1)

    def values(self, u: Tensor) -> dict[str, Tensor]:
        """Admissible values of each hyperparameter from unconstrained ``u`` of shape ``(k,)`` or ``(batch, k)``.

        A per-batch hyperparameter is returned as a scalar.
        """
        out: dict[str, Tensor] = {}
        for j, (name, transform) in enumerate(zip(self.names, self.transforms)):
            column = u[..., j]
            if column.ndim == 1 and not self._per_example[j]:
                column = column[0]
            out[name] = transform(column)
        return out

    def current(self) -> dict[str, float]:
        """The current (unperturbed) admissible value of each hyperparameter."""
        with torch.no_grad():
            return {k: float(v) for k, v in self.values(self.unconstrained.detach()).items()}

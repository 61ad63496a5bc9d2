"""Named loss hyperparameters: tensors reachable by dotted name, checkpointed with the module.

Every family stores the hyperparameters that a schedule, Population Based Training or a Self-Tuning Network may
change as **persistent buffers** registered through :func:`register_hyperparameter`. They are then:

* reachable by dotted name from any enclosing module (``"kd.temperature"`` is the buffer ``temperature`` of the
  submodule ``kd``), through :func:`get_hyperparameter` / :func:`set_hyperparameter`;
* saved in, and restored from, every checkpoint (they are ``state_dict`` entries);
* moved to the right device with the module and broadcast from rank 0 by DDP like any buffer.

Plain float attributes of standard modules (``nn.Dropout.p``) are reachable by the same names, so one mechanism
drives dropout rates too; those are not buffers and are therefore not checkpointed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Loss(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         register_hyperparameter(self, "temperature", 4.0, low=0.0, low_inclusive=False)
    >>> model = nn.Module()
    >>> model.kd = Loss()
    >>> model.drop = nn.Dropout(0.1)
    >>> sorted(named_hyperparameters(model))
    ['drop.p', 'kd.temperature']
    >>> set_hyperparameter(model, "kd.temperature", 2.0)
    >>> float(get_hyperparameter(model, "kd.temperature"))
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "HyperparameterSpec",
    "get_hyperparameter",
    "hyperparameter_spec",
    "named_hyperparameters",
    "register_hyperparameter",
    "set_hyperparameter",
]

_REGISTRY_ATTR = "_loss_hyperparameters"
# Float attributes of standard torch modules that behave as hyperparameters.
_FLOAT_ATTRIBUTES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Dropout: ("p",),
    nn.Dropout1d: ("p",),
    nn.Dropout2d: ("p",),
    nn.Dropout3d: ("p",),
    nn.AlphaDropout: ("p",),
}


@dataclass(frozen=True)
class HyperparameterSpec:
    """The admissible range of a named hyperparameter.

    Args:
        low: Lower bound, or ``None`` for unbounded.
        high: Upper bound, or ``None`` for unbounded.
        low_inclusive: Whether ``low`` itself is admissible.
        high_inclusive: Whether ``high`` itself is admissible.
    """

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def describe(self) -> str:
        """Return the range in interval notation, e.g. ``(0, inf)``."""
        left = "[" if self.low is not None and self.low_inclusive else "("
        right = "]" if self.high is not None and self.high_inclusive else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"

    def check(self, name: str, value: Tensor) -> None:
        """Raise ``ValueError`` when ``value`` is non-finite or outside the range."""
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"Hyperparameter {name!r} must be finite, got {value.tolist()}.")
        bad = torch.zeros_like(value, dtype=torch.bool)
        if self.low is not None:
            bad |= value < self.low if self.low_inclusive else value <= self.low
        if self.high is not None:
            bad |= value > self.high if self.high_inclusive else value >= self.high
        if bool(bad.any()):
            raise ValueError(
                f"Hyperparameter {name!r} must lie in {self.describe()}, got {value.tolist()}. "
                "Pass a value inside that range."
            )


def register_hyperparameter(
    module: nn.Module,
    name: str,
    value: float | Tensor,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Register ``value`` as a named, checkpointed hyperparameter (a float32 persistent buffer) of ``module``.

    Args:
        module: The module that owns the hyperparameter (usually a loss module).
        name: Attribute name, without dots.
        value: Initial value: a Python number or a tensor (scalar or per-sample).
        low: Lower bound checked on every :func:`set_hyperparameter`, or ``None``.
        high: Upper bound, or ``None``.
        low_inclusive: Whether ``low`` is admissible.
        high_inclusive: Whether ``high`` is admissible.

    Raises:
        ValueError: When ``name`` contains a dot or ``value`` is outside the bounds.
    """
    if "." in name or not name:
        raise ValueError(f"Hyperparameter name must be a non-empty attribute name without dots, got {name!r}.")
    spec = HyperparameterSpec(low, high, low_inclusive, high_inclusive)
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    spec.check(name, tensor)
    registry: dict[str, HyperparameterSpec] = module.__dict__.setdefault(_REGISTRY_ATTR, {})
    registry[name] = spec
    if name in module._buffers:
        module._buffers[name] = tensor.to(module._buffers[name].device)  # type: ignore[union-attr]
    else:
        module.register_buffer(name, tensor, persistent=True)


def named_hyperparameters(module: nn.Module) -> dict[str, Tensor]:
    """Return every hyperparameter reachable from ``module``, by dotted name.

    Frozen teachers held outside the module tree are not visited (they have no loss hyperparameters).
    """
    found: dict[str, Tensor] = {}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name in sub.__dict__.get(_REGISTRY_ATTR, {}):
            found[dot + name] = sub._buffers[name]  # type: ignore[assignment]
        for cls, attrs in _FLOAT_ATTRIBUTES.items():
            if type(sub) is cls:
                for attr in attrs:
                    found[dot + attr] = torch.tensor(float(getattr(sub, attr)))
    return found


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        owner = None
    if owner is not None:
        if attr in owner.__dict__.get(_REGISTRY_ATTR, {}):
            return owner, attr
        if attr in _FLOAT_ATTRIBUTES.get(type(owner), ()):
            return owner, attr
    available = ", ".join(sorted(named_hyperparameters(module))) or "none"
    raise KeyError(
        f"No hyperparameter named {name!r} on {type(module).__name__}. Available: {available}. "
        "Loss modules register theirs with `register_hyperparameter`; use the dotted path of the submodule."
    )


def hyperparameter_spec(module: nn.Module, name: str) -> HyperparameterSpec:
    """Return the admissible range of the hyperparameter ``name`` (dotted) of ``module``."""
    owner, attr = _resolve(module, name)
    if attr in owner.__dict__.get(_REGISTRY_ATTR, {}):
        return owner.__dict__[_REGISTRY_ATTR][attr]
    return HyperparameterSpec(0.0, 1.0)  # dropout probabilities


def get_hyperparameter(module: nn.Module, name: str) -> Tensor:
    """Return the current value of the hyperparameter ``name`` (dotted path) of ``module``.

    Raises:
        KeyError: With the list of available names, when ``name`` is unknown.
    """
    owner, attr = _resolve(module, name)
    if attr in owner._buffers:
        return owner._buffers[attr]  # type: ignore[return-value]
    return torch.tensor(float(getattr(owner, attr)))


def set_hyperparameter(module: nn.Module, name: str, value: float | Tensor) -> None:
    """Set the hyperparameter ``name`` (dotted path) of ``module`` in place, after checking its range.

    A buffer keeps its device; its shape follows ``value`` (a scalar may become per-sample and back).

    Raises:
        KeyError: When ``name`` is unknown.
        ValueError: When ``value`` is non-finite or outside the registered range.
    """
    owner, attr = _resolve(module, name)
    tensor = torch.as_tensor(value, dtype=torch.float32).detach()
    hyperparameter_spec(module, name).check(name, tensor)
    if attr in owner._buffers:
        buffer = owner._buffers[attr]
        assert buffer is not None
        if buffer.shape == tensor.shape:
            with torch.no_grad():
                buffer.copy_(tensor)
        else:
            owner._buffers[attr] = tensor.to(device=buffer.device, dtype=buffer.dtype).clone()
        return
    if tensor.numel() != 1:
        raise ValueError(f"Hyperparameter {name!r} is a plain float attribute; it takes a scalar, got {tensor.shape}.")
    value_f = float(tensor)
    if not math.isfinite(value_f):  # pragma: no cover - checked above
        raise ValueError(f"Hyperparameter {name!r} must be finite.")
    setattr(owner, attr, value_f)

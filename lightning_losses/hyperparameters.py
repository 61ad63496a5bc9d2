"""Named loss hyperparameters: tensors reachable by dotted name, checkpointed with the module.

Every family stores the hyperparameters that a schedule, Population Based Training or a Self-Tuning Network may
change as **persistent buffers** registered through :func:`register_hyperparameter`. They are then:

* reachable by dotted name from any enclosing module (``"kd.temperature"`` is the buffer ``temperature`` of the
  submodule ``kd``), through :func:`get_hyperparameter` / :func:`set_hyperparameter`; a submodule compiled in place
  (``self.kd = torch.compile(KDLoss())``) keeps the names of the module it wraps;
* saved in, and restored from, every checkpoint (they are ``state_dict`` entries). A value may change shape (a
  scalar becomes one value per sample and back); loading takes the saved shape, so a checkpoint always loads,
  strictly, into a freshly built module (Lightning checkpoints, ``ddp_spawn`` result recovery, plain
  ``load_state_dict``), whichever driver (a schedule, PBT, STN, user code) changed it;
* moved to the right device with the module and broadcast from rank 0 by DDP like any buffer.

Only what a module registers is discovered. A float attribute of a module the library does not own (the rate ``p``
of an ``nn.Dropout``, anywhere in a user's network or inside a TempNet) becomes a hyperparameter when it is exposed
by name, :func:`expose_hyperparameter` (``module.expose_hyperparameter("student.drop.p")`` on a LightningModule);
it is then read and written by the same names, range-checked, but not checkpointed (it is not a buffer). So PBT over
:func:`named_hyperparameters` tunes the losses' hyperparameters, not a submodule's internals;
``named_hyperparameters(module, include_attributes=True)`` also lists the dropout rates that are not exposed. The
names ``"lr"`` and ``"weight_decay"`` belong to the optimizers: :func:`apply_hyperparameters` writes them into every
param group.

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
    >>> sorted(named_hyperparameters(model))  # a dropout rate is not discovered on its own
    ['kd.temperature']
    >>> expose_hyperparameter(model, "drop.p")  # opt in: range [0, 1] for a dropout rate
    >>> sorted(named_hyperparameters(model))
    ['drop.p', 'kd.temperature']
    >>> set_hyperparameter(model, "kd.temperature", torch.tensor([2.0, 3.0]))  # one value per sample
    >>> fresh = nn.Module()
    >>> fresh.kd = Loss()
    >>> fresh.load_state_dict(model.state_dict())  # the saved shape is taken: strict load
    <All keys matched successfully>
    >>> get_hyperparameter(fresh, "kd.temperature").tolist()
    [2.0, 3.0]
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.utilities.checkpoints import follow_saved_shapes
from lightning_losses.utilities.checks import interval_text

__all__ = [
    "OPTIMIZER_HYPERPARAMETERS",
    "HyperparameterSpec",
    "apply_hyperparameters",
    "expose_hyperparameter",
    "get_hyperparameter",
    "hyperparameter_buffer_name",
    "hyperparameter_spec",
    "named_hyperparameters",
    "read_hyperparameters",
    "register_hyperparameter",
    "require_hyperparameters",
    "set_hyperparameter",
]

#: Names written into the optimizer param groups rather than into module buffers.
OPTIMIZER_HYPERPARAMETERS = ("lr", "weight_decay")

_FLOAT32 = struct.Struct("f")
_REGISTRY_ATTR = "_loss_hyperparameters"
# Float attributes of modules the library does not own, exposed by name (`expose_hyperparameter`): name -> range.
_EXPOSED_ATTR = "_exposed_hyperparameters"
_HOOK_ATTR = "_loss_hyperparameters_load_hook"
# A compiled module (``torch.compile(module)``) holds the module it compiles under this child name.
_COMPILED_CHILD = "_orig_mod"
# Float attributes of standard torch modules that look like hyperparameters: listed only on request
# (``include_attributes=True``), exposed with the range [0, 1] by default.
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
        return interval_text(self.low, self.high, self.low_inclusive, self.high_inclusive)

    def admissible(self, value: Tensor) -> Tensor:
        """A 0-d bool tensor: every entry of ``value`` is finite and inside the range (no host synchronisation)."""
        ok = torch.isfinite(value)
        if self.low is not None:
            ok = ok & ((value >= self.low) if self.low_inclusive else (value > self.low))
        if self.high is not None:
            ok = ok & ((value <= self.high) if self.high_inclusive else (value < self.high))
        return ok.all()

    def admits_float32(self, value: float) -> bool:
        """Whether the Python number ``value`` is admissible once stored as a float32, with no tensor work.

        The same test as :meth:`admissible` on ``torch.as_tensor(value, dtype=torch.float32)``: the value and the
        bounds are both rounded to float32 first (torch compares a float32 tensor with a Python number in float32).
        """
        v = _float32(value)
        if not math.isfinite(v):
            return False
        if self.low is not None:
            low = _float32(self.low)
            if not (v >= low if self.low_inclusive else v > low):
                return False
        if self.high is not None:
            high = _float32(self.high)
            if not (v <= high if self.high_inclusive else v < high):
                return False
        return True

    def check(self, name: str, value: Tensor) -> None:
        """Raise ``ValueError`` when ``value`` is non-finite or outside the range.

        One host synchronisation in eager mode; inside a compiled region the check is an asynchronous assertion, so
        it does not break the graph.
        """
        ok = self.admissible(value)
        if torch.compiler.is_compiling():
            torch._assert_async(ok, f"Hyperparameter {name!r} must be finite and lie in {self.describe()}.")
            return
        if bool(ok):
            return
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"Hyperparameter {name!r} must be finite, got {value.tolist()}.")
        raise ValueError(
            f"Hyperparameter {name!r} must lie in {self.describe()}, got {value.tolist()}. "
            "Pass a value inside that range."
        )


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (an infinity beyond the float32 range, as torch rounds it)."""
    try:
        return float(_FLOAT32.unpack(_FLOAT32.pack(value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def _follow_hyperparameter_shapes(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of every module owning hyperparameters: take the saved shapes before the load."""
    follow_saved_shapes(module, state_dict, prefix, module.__dict__.get(_REGISTRY_ATTR, {}))


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

    The buffer may later change shape (:func:`set_hyperparameter` with a per-sample value): ``module`` loads any
    state dict whose entry has another shape, taking the saved one (a load-state-dict pre-hook registered here), so
    its checkpoints always load strictly into a fresh module.

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
    if not module.__dict__.get(_HOOK_ATTR, False):
        module.register_load_state_dict_pre_hook(_follow_hyperparameter_shapes)
        module.__dict__[_HOOK_ATTR] = True


def _compiled_type() -> type[nn.Module] | None:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded as soon as anything was compiled
    return getattr(eval_frame, "OptimizedModule", None)


def _unwrap(module: nn.Module, compiled: type[nn.Module] | None) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles (itself when it is not one)."""
    while compiled is not None and isinstance(module, compiled):
        module = module._modules[_COMPILED_CHILD]  # type: ignore[assignment]
    return module


def _walk(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` but seeing through compiled wrappers: the names are those of the modules they wrap."""
    compiled = _compiled_type()
    seen: set[int] = set()
    stack = [("", module)]
    while stack:
        prefix, sub = stack.pop()
        sub = _unwrap(sub, compiled)
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        yield prefix, sub
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in sub._modules.items() if c is not None]
        stack.extend(reversed(children))


def _exposed(module: nn.Module) -> dict[str, HyperparameterSpec]:
    return module.__dict__.get(_EXPOSED_ATTR, {})


def _standard_attributes(module: nn.Module) -> tuple[str, ...]:
    """The float attributes of a standard torch module that look like hyperparameters (``nn.Dropout.p``)."""
    return _FLOAT_ATTRIBUTES.get(type(module), ())


def named_hyperparameters(module: nn.Module, *, include_attributes: bool = False) -> dict[str, Tensor]:
    """Return every hyperparameter reachable from ``module``, by dotted name.

    These are the registered ones (:func:`register_hyperparameter`) and the float attributes exposed by name
    (:func:`expose_hyperparameter`). Compiled submodules are seen through: ``torch.compile(KDLoss())`` stored as
    ``kd`` gives ``"kd.temperature"``. Frozen teachers held outside the module tree are not visited.

    Args:
        module: The module to search, with its submodules.
        include_attributes: Also list the rate ``p`` of every standard dropout module (``nn.Dropout``,
            ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``) that is not exposed, for inspection. Those are a network's
            internals (a TempNet's dropout, say): reading or writing one by name needs :func:`expose_hyperparameter`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        >>> named_hyperparameters(net), sorted(named_hyperparameters(net, include_attributes=True))
        ({}, ['1.p'])
    """
    found: dict[str, Tensor] = {}
    for prefix, sub in _walk(module):
        dot = f"{prefix}." if prefix else ""
        for name in sub.__dict__.get(_REGISTRY_ATTR, {}):
            found[dot + name] = sub._buffers[name]  # type: ignore[assignment]
        exposed = _exposed(sub)
        for attr in exposed:
            found[dot + attr] = torch.tensor(float(getattr(sub, attr)))
        if include_attributes:
            for attr in _standard_attributes(sub):
                if attr not in exposed:
                    found[dot + attr] = torch.tensor(float(getattr(sub, attr)))
    return found


def _owner(module: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The submodule at the dotted path of ``name`` (``None`` when there is none) and the attribute name."""
    owner_path, _, attr = name.rpartition(".")
    compiled = _compiled_type()
    owner: nn.Module | None = _unwrap(module, compiled)
    # ``_orig_mod`` components (names read from a compiled module's state dict) are accepted and skipped
    for part in [p for p in owner_path.split(".") if p and p != _COMPILED_CHILD]:
        child = owner._modules.get(part) if owner is not None else None
        owner = None if child is None else _unwrap(child, compiled)
    return owner, attr


def _expose_hint(module: nn.Module, name: str) -> str:
    return (
        f"Expose it first: `expose_hyperparameter(module, {name!r})` from lightning_losses.hyperparameters, or "
        f"`self.expose_hyperparameter({name!r})` in the `__init__` of a LightningModule with HyperparameterMixin "
        "(every fresh module a factory builds then has it). A dropout rate gets the range [0, 1]; pass `low=` / "
        "`high=` to narrow it."
    )


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, attr = _owner(module, name)
    if owner is not None and (attr in owner.__dict__.get(_REGISTRY_ATTR, {}) or attr in _exposed(owner)):
        return owner, attr
    available = ", ".join(sorted(named_hyperparameters(module))) or "none"
    if name in OPTIMIZER_HYPERPARAMETERS:
        hint = (
            f" {name!r} is an optimizer hyperparameter: `apply_hyperparameters(module, {{{name!r}: value}}, trainer)` "
            "writes it into the param groups."
        )
    elif owner is not None and attr in _standard_attributes(owner):
        hint = (
            f" {name!r} is the rate of the {type(owner).__name__} at {name.rpartition('.')[0]!r}, which is not a "
            "hyperparameter until it is exposed (the attributes of modules the library does not own are not "
            f"discovered automatically). {_expose_hint(module, name)}"
        )
    elif owner is not None and isinstance(owner.__dict__.get(attr), (int, float)):
        hint = f" {name!r} is a plain attribute of a {type(owner).__name__}. {_expose_hint(module, name)}"
    else:
        hint = ""
    raise KeyError(
        f"No hyperparameter named {name!r} on {type(module).__name__}. Available: {available}. "
        "Loss modules register theirs with `register_hyperparameter`; use the dotted path of the submodule." + hint
    )


def expose_hyperparameter(
    module: nn.Module,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Make the float attribute ``name`` (a dotted path, e.g. ``"student.drop.p"``) a named hyperparameter.

    For attributes of modules the library does not own, which are never discovered on their own: a dropout rate of
    the user's network, say. Afterwards :func:`get_hyperparameter` / :func:`set_hyperparameter`, schedules, PBT and
    STN reach it by ``name``, and :func:`named_hyperparameters` lists it; writes are range-checked and take a
    scalar. The value stays a plain Python attribute: it is not saved in checkpoints (expose it again in the
    module's ``__init__``, so every freshly built or restored module has it). The exposure travels with the module
    when it is pickled or copied (spawn strategies, Ray workers).

    Args:
        module: The enclosing module.
        name: Dotted path of the attribute.
        low: Lower bound; ``None`` gives 0 for the rate of a standard dropout module, else unbounded.
        high: Upper bound; ``None`` gives 1 for the rate of a standard dropout module, else unbounded.
        low_inclusive: Whether ``low`` is admissible.
        high_inclusive: Whether ``high`` is admissible.

    Raises:
        KeyError: When the path names no submodule or the submodule has no such attribute.
        ValueError: When the attribute is a registered hyperparameter, a buffer, a parameter, a submodule or not a
            real number, or its current value is outside the bounds.

    Example:
        >>> net = nn.Module()
        >>> net.drop = nn.Dropout(0.1)
        >>> expose_hyperparameter(net, "drop.p", high=0.5)
        >>> set_hyperparameter(net, "drop.p", 0.3)
        >>> net.drop.p, hyperparameter_spec(net, "drop.p").describe()
        (0.3, '[0, 0.5]')
    """
    owner, attr = _owner(module, name)
    if owner is None or not attr:
        raise KeyError(
            f"Cannot expose {name!r}: {type(module).__name__} has no submodule at {name.rpartition('.')[0]!r}. "
            "Give the dotted path of the attribute, e.g. 'student.drop.p'."
        )
    if attr in owner.__dict__.get(_REGISTRY_ATTR, {}):
        raise ValueError(f"{name!r} is already a registered hyperparameter; it needs no exposing.")
    if attr in owner._buffers or attr in owner._parameters or attr in owner._modules:
        raise ValueError(
            f"Cannot expose {name!r}: it is a buffer, parameter or submodule of {type(owner).__name__}, not a float "
            "attribute. Register a tensor hyperparameter with `register_hyperparameter` instead."
        )
    if attr not in owner.__dict__:
        raise KeyError(f"Cannot expose {name!r}: {type(owner).__name__} has no attribute {attr!r}.")
    value = owner.__dict__[attr]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Cannot expose {name!r}: only a real-number attribute can be a hyperparameter, got {type(value).__name__}."
        )
    if attr in _standard_attributes(owner):  # a dropout rate: [0, 1] unless narrowed
        low = 0.0 if low is None else low
        high = 1.0 if high is None else high
    spec = HyperparameterSpec(low, high, low_inclusive, high_inclusive)
    spec.check(name, torch.tensor(float(value)))
    owner.__dict__.setdefault(_EXPOSED_ATTR, {})[attr] = spec


def require_hyperparameters(module: nn.Module, names: Sequence[str], *, user: str = "This driver") -> None:
    """Check that every name is a hyperparameter of ``module`` (or an optimizer name) before a driver uses it.

    Schedules, PBT and STN call this when they start. A name that only automatic discovery used to reach (the rate
    of a standard dropout module that is not exposed) is exposed here, with a ``DeprecationWarning``: that
    discovery is deprecated, expose the rate in the module instead (:func:`expose_hyperparameter`).

    Args:
        module: The module the driver writes to.
        names: The driver's names (dotted; ``"lr"`` / ``"weight_decay"`` are skipped).
        user: The driver's name, for the messages.

    Raises:
        KeyError: For a name that is not a hyperparameter, listing the available ones (and how to expose one).
    """
    for name in names:
        if name in OPTIMIZER_HYPERPARAMETERS:
            continue
        owner, attr = _owner(module, name)
        if (
            owner is not None
            and attr in _standard_attributes(owner)
            and attr not in _exposed(owner)
            and attr not in owner.__dict__.get(_REGISTRY_ATTR, {})
        ):
            warnings.warn(
                f"{user} reaches {name!r}, the rate of a {type(owner).__name__}, through automatic discovery, which "
                f"is deprecated: expose it in the module, `self.expose_hyperparameter({name!r})` (or "
                f"`expose_hyperparameter(module, {name!r})`). It is exposed now with the range [0, 1].",
                DeprecationWarning,
                stacklevel=3,
            )
            expose_hyperparameter(module, name)
        _resolve(module, name)  # KeyError listing the available names


def hyperparameter_spec(module: nn.Module, name: str) -> HyperparameterSpec:
    """Return the admissible range of the hyperparameter ``name`` (dotted) of ``module``."""
    owner, attr = _resolve(module, name)
    registry = owner.__dict__.get(_REGISTRY_ATTR, {})
    return registry[attr] if attr in registry else _exposed(owner)[attr]


def hyperparameter_buffer_name(module: nn.Module, name: str) -> str | None:
    """The ``state_dict`` key (as ``module.named_buffers()`` spells it) of the hyperparameter ``name``.

    It differs from ``name`` under compiled submodules (``"kd._orig_mod.temperature"`` for ``"kd.temperature"``);
    ``None`` for an exposed float attribute (``nn.Dropout.p``), which is not a buffer.

    Raises:
        KeyError: When ``name`` is unknown.
    """
    owner, attr = _resolve(module, name)
    if attr not in owner._buffers:
        return None
    for buffer_name, buffer in module.named_buffers():
        if buffer is owner._buffers[attr]:
            return buffer_name
    return None  # pragma: no cover - a registered buffer is always reachable


def get_hyperparameter(module: nn.Module, name: str) -> Tensor:
    """Return the current value of the hyperparameter ``name`` (dotted path) of ``module``.

    Raises:
        KeyError: With the list of available names, when ``name`` is unknown (and how to expose a dropout rate,
            when it names one).
    """
    owner, attr = _resolve(module, name)
    if attr in owner._buffers:
        return owner._buffers[attr]  # type: ignore[return-value]
    return torch.tensor(float(getattr(owner, attr)))


def set_hyperparameter(module: nn.Module, name: str, value: float | Tensor) -> None:
    """Set the hyperparameter ``name`` (dotted path) of ``module`` in place, after checking its range.

    A buffer keeps its device and dtype; its shape follows ``value`` (a scalar may become per-sample and back), and
    a checkpoint taken in either shape loads into a fresh module. An exposed float attribute takes a scalar.

    Raises:
        KeyError: When ``name`` is unknown (and how to expose a dropout rate, when it names one).
        ValueError: When ``value`` is non-finite or outside the registered range.
    """
    owner, attr = _resolve(module, name)
    registry = owner.__dict__.get(_REGISTRY_ATTR, {})
    spec = registry[attr] if attr in registry else _exposed(owner)[attr]
    buffer = owner._buffers.get(attr)
    if (
        # a Python number (not a bool; an int exactly a double): checked and written with no tensor built
        (type(value) is float or (type(value) is int and abs(value) <= 2**53))
        and (buffer is None or (buffer.ndim == 0 and buffer.dtype == torch.float32))
        and not torch.compiler.is_compiling()
        and spec.admits_float32(value)  # type: ignore[arg-type]
    ):
        if buffer is not None:
            with torch.no_grad():
                buffer.fill_(value)  # the same float32 rounding as copying torch.as_tensor(value, torch.float32)
        else:
            setattr(owner, attr, float(value))
        return
    tensor = torch.as_tensor(value, dtype=torch.float32).detach()
    spec.check(name, tensor)
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
    value_f = float(value) if isinstance(value, (int, float)) else float(tensor)  # a Python number keeps its digits
    if not math.isfinite(value_f):  # pragma: no cover - checked above
        raise ValueError(f"Hyperparameter {name!r} must be finite.")
    setattr(owner, attr, value_f)


# ------------------------------------------------------------------------------------- optimizer names
def _optimizers(trainer: Any) -> list[torch.optim.Optimizer]:
    if trainer is None:
        return []
    try:
        return list(trainer.optimizers)
    except (AttributeError, RuntimeError):  # pragma: no cover - trainer without a strategy yet
        return []


def apply_hyperparameters(pl_module: nn.Module, values: Mapping[str, float | Tensor], trainer: Any = None) -> None:
    """Write hyperparameter values into ``pl_module`` (by dotted name) and the optimizer param groups.

    ``"lr"`` and ``"weight_decay"`` (:data:`OPTIMIZER_HYPERPARAMETERS`) go into every param group of every optimizer
    of ``trainer`` (a ``lightning.pytorch.Trainer``); any other name goes through ``set_hyperparameter`` (the
    module's method when present, else :func:`set_hyperparameter`).

    Raises:
        RuntimeError: When an optimizer hyperparameter is given but the trainer has no optimizer yet (apply it in
            ``on_train_start`` or later).
        KeyError: When a name is not a hyperparameter of the module.
    """
    setter = getattr(pl_module, "set_hyperparameter", None)
    for name, value in values.items():
        if name in OPTIMIZER_HYPERPARAMETERS:
            optimizers = _optimizers(trainer)
            if not optimizers:
                raise RuntimeError(
                    f"Cannot set {name!r}: the trainer has no optimizer yet. Optimizer hyperparameters are applied "
                    "from `on_train_start` on, after Lightning has set up (and restored) the optimizers."
                )
            scalar = float(value)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group[name] = scalar
        elif callable(setter):
            setter(name, value)
        else:
            set_hyperparameter(pl_module, name, value)


def read_hyperparameters(pl_module: nn.Module, names: Sequence[str], trainer: Any = None) -> dict[str, float]:
    """Read the current scalar value of each name (``"lr"``/``"weight_decay"`` from the first param group).

    A per-sample value is read as its mean; an optimizer name without an optimizer as NaN.
    """
    out: dict[str, float] = {}
    for name in names:
        if name in OPTIMIZER_HYPERPARAMETERS:
            optimizers = _optimizers(trainer)
            out[name] = float(optimizers[0].param_groups[0][name]) if optimizers else math.nan
        else:
            out[name] = float(get_hyperparameter(pl_module, name).float().mean())
    return out

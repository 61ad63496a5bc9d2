"""Hyperparameter schedules: any named hyperparameter (or the optimizer's learning rate) follows a curve.

A schedule is a function of a position ``t`` (the optimizer step, or the epoch) returning a float. The
:class:`HyperparameterSchedule` callback evaluates every schedule at the trainer's current position and writes the
value through the named-hyperparameter mechanism (``pl_module.set_hyperparameter("kd.temperature", v)``). The
reserved names ``"lr"`` and ``"weight_decay"`` are written into every optimizer param group instead.

Because the value depends only on the position, which Lightning restores from a checkpoint, a resumed run continues
exactly where the interrupted one stopped; the callback applies the current value again in ``on_train_start``
(after Lightning has restored the module, the optimizers and the loops), so a restored checkpoint never overrides it.

Example:
    >>> warmup_then_decay = ChainedSchedule(
    ...     [LinearSchedule(0.0, 1.0, duration=10), CosineSchedule(1.0, 0.0, duration=90)], boundaries=[10]
    ... )
    >>> [round(warmup_then_decay(t), 3) for t in (0, 5, 10, 55, 100)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import bisect
import copy
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import Self, override

from lightning_losses import hyperparameters as _hp
from lightning_losses.hyperparameters import OPTIMIZER_HYPERPARAMETERS, apply_hyperparameters, read_hyperparameters

__all__ = [
    "OPTIMIZER_HYPERPARAMETERS",
    "ChainedSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "HyperparameterSchedule",
    "LambdaSchedule",
    "LinearSchedule",
    "PiecewiseSchedule",
    "Schedule",
    "StepSchedule",
    "apply_hyperparameters",
    "read_hyperparameters",
]

_PICKLABLE_FORMS = (
    "a Schedule class (ConstantSchedule, LinearSchedule, CosineSchedule, ExponentialSchedule, StepSchedule, "
    "PiecewiseSchedule, ChainedSchedule), or LambdaSchedule(fn) / functools.partial(fn, ...) of a function `fn` "
    "defined at module level"
)


def _require_picklable(owner: str, functions: Mapping[str, object], forms: str = _PICKLABLE_FORMS) -> None:
    """Raise a TypeError naming every entry of ``functions`` that cannot be pickled.

    Spawn strategies (``strategy="ddp_spawn"``, ``"ddp_notebook"`` with spawn, Ray workers) pickle the Trainer and
    its callbacks to start the processes; a lambda or a function defined inside another function cannot be pickled.
    """
    bad = []
    for name, fn in functions.items():
        try:
            pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            bad.append(f"{name!r} ({type(err).__name__}: {err})")
    if bad:
        raise TypeError(
            f"{owner} cannot be sent to the worker processes of a spawn strategy (strategy='ddp_spawn' pickles the "
            f"Trainer and its callbacks): the function of {', '.join(bad)} cannot be pickled (a lambda, or a "
            f"function defined inside another function, cannot). Use {forms}; or strategy='ddp', which starts "
            "the processes without pickling."
        )


class _SpawnPicklable:
    """A callback holding user functions, sent to the worker processes of a spawn strategy.

    Pickling checks that every function of :meth:`_functions` pickles (:func:`_require_picklable`, naming
    ``_picklable_forms``); ``copy.copy`` and ``copy.deepcopy`` copy the instance dictionary instead, so that a copy
    never needs picklable functions. The ``_transient`` attributes are neither pickled nor deep-copied: the copy
    holds ``None``.
    """

    _picklable_forms = _PICKLABLE_FORMS
    _transient: tuple[str, ...] = ()

    def _functions(self) -> Mapping[str, object]:
        """The user functions, by the name an error message gives them."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to start the processes of a spawn strategy): every function must be picklable."""
        _require_picklable(type(self).__name__, self._functions(), self._picklable_forms)
        state = self.__dict__.copy()
        state.update(dict.fromkeys(self._transient))
        return state

    def __copy__(self) -> Self:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in self._transient}
        new.__dict__.update(copy.deepcopy(state, memo))
        new.__dict__.update(dict.fromkeys(self._transient))
        return new


class Schedule:
    """A hyperparameter value as a function of the position ``t`` (step or epoch): ``schedule(t) -> float``."""

    def __call__(self, t: float) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _RampSchedule(Schedule):
    r"""From ``start`` to ``end`` over ``duration`` positions after ``offset`` (flat outside): the value at the
    progress :math:`p = \operatorname{clip}\big((t - t_0) / D, 0, 1\big)` is the subclass's ``_at(p)``."""

    def __init__(self, start: float, end: float, duration: float, offset: float = 0.0) -> None:
        if not duration > 0:
            raise ValueError(f"`duration` must be > 0, got {duration}. Give the number of steps (or epochs) it lasts.")
        if offset < 0:
            raise ValueError(f"`offset` must be >= 0, got {offset}.")
        self.start, self.end, self.duration, self.offset = float(start), float(end), float(duration), float(offset)

    def __call__(self, t: float) -> float:
        return self._at(min(max((t - self.offset) / self.duration, 0.0), 1.0))

    def _at(self, p: float) -> float:
        raise NotImplementedError


class ConstantSchedule(Schedule):
    """Always ``value``.

    Example:
        >>> ConstantSchedule(4.0)(123)
        4.0
    """

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __call__(self, t: float) -> float:
        return self.value


class LinearSchedule(_RampSchedule):
    r"""Linear ramp from ``start`` to ``end`` over ``duration`` positions after ``offset`` (flat outside).

    .. math:: v(t) = s + (e - s)\, p, \qquad p = \operatorname{clip}\big((t - t_0) / D, 0, 1\big)

    Example:
        >>> LinearSchedule(1.0, 3.0, duration=4)(2)
        2.0
    """

    def _at(self, p: float) -> float:
        return self.start + (self.end - self.start) * p


class CosineSchedule(_RampSchedule):
    r"""Half-cosine from ``start`` to ``end`` over ``duration`` positions after ``offset`` (warm-up or decay).

    .. math:: v(t) = e + (s - e)\,\tfrac{1}{2}\big(1 + \cos(\pi p)\big)

    Example:
        >>> CosineSchedule(1.0, 0.0, duration=10)(5)
        0.5
    """

    def _at(self, p: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


class ExponentialSchedule(_RampSchedule):
    r"""Geometric interpolation from ``start`` to ``end`` (same sign, non-zero) over ``duration`` positions.

    .. math:: v(t) = s \,(e / s)^{p}

    Example:
        >>> round(ExponentialSchedule(1.0, 100.0, duration=2)(1), 6)
        10.0
    """

    def __init__(self, start: float, end: float, duration: float, offset: float = 0.0) -> None:
        super().__init__(start, end, duration, offset)
        if start == 0 or end == 0 or (start > 0) != (end > 0):
            raise ValueError(
                f"ExponentialSchedule needs non-zero `start` and `end` of the same sign, got {start} and {end}. "
                "Use LinearSchedule or CosineSchedule to reach zero."
            )

    def _at(self, p: float) -> float:
        return self.start * (self.end / self.start) ** p


class StepSchedule(Schedule):
    r"""``initial`` multiplied by ``gamma`` at each milestone reached.

    .. math:: v(t) = v_0\, \gamma^{\#\{m_i \le t\}}

    Example:
        >>> s = StepSchedule(1.0, milestones=[10, 20], gamma=0.1)
        >>> [round(s(t), 4) for t in (9, 10, 25)]
        [1.0, 0.1, 0.01]
    """

    def __init__(self, initial: float, milestones: Sequence[float], gamma: float = 0.1) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"`milestones` must be increasing, got {list(milestones)}.")
        self.initial, self.milestones, self.gamma = float(initial), [float(m) for m in milestones], float(gamma)

    def __call__(self, t: float) -> float:
        return self.initial * self.gamma ** bisect.bisect_right(self.milestones, t)


class PiecewiseSchedule(Schedule):
    """Through the points ``[(t0, v0), (t1, v1), ...]``: linear between them, or constant (the last point reached).

    Before the first point the first value holds; after the last, the last value. A schedule discovered by PBT is a
    ``"constant"`` piecewise schedule.

    Example:
        >>> s = PiecewiseSchedule([(0, 1.0), (10, 2.0)], interpolation="linear")
        >>> s(5), PiecewiseSchedule([(0, 1.0), (10, 2.0)], interpolation="constant")(9)
        (1.5, 1.0)
    """

    def __init__(
        self, points: Sequence[tuple[float, float]], interpolation: Literal["linear", "constant"] = "linear"
    ) -> None:
        if not points:
            raise ValueError("`points` must hold at least one (position, value) pair.")
        positions = [float(p[0]) for p in points]
        if positions != sorted(positions):
            raise ValueError(f"The positions of `points` must be non-decreasing, got {positions}.")
        if interpolation not in ("linear", "constant"):
            raise ValueError(f"`interpolation` must be 'linear' or 'constant', got {interpolation!r}.")
        self.points = [(float(t), float(v)) for t, v in points]
        self.interpolation = interpolation

    def __call__(self, t: float) -> float:
        positions = [p[0] for p in self.points]
        i = bisect.bisect_right(positions, t)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points) or self.interpolation == "constant":
            return self.points[i - 1][1]
        (t0, v0), (t1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


class ChainedSchedule(Schedule):
    """One schedule after another: schedule ``k`` runs from ``boundaries[k-1]`` on, seeing ``t - boundaries[k-1]``.

    Example:
        >>> s = ChainedSchedule([ConstantSchedule(1.0), LinearSchedule(1.0, 0.0, duration=10)], boundaries=[5])
        >>> s(4), s(10)
        (1.0, 0.5)
    """

    def __init__(self, schedules: Sequence[Schedule | Callable[[float], float]], boundaries: Sequence[float]) -> None:
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"ChainedSchedule needs one boundary fewer than schedules: got {len(schedules)} schedules and "
                f"{len(boundaries)} boundaries."
            )
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"`boundaries` must be increasing, got {list(boundaries)}.")
        self.schedules, self.boundaries = list(schedules), [float(b) for b in boundaries]

    def __call__(self, t: float) -> float:
        k = bisect.bisect_right(self.boundaries, t)
        start = self.boundaries[k - 1] if k else 0.0
        return float(self.schedules[k](t - start))


class LambdaSchedule(Schedule):
    """A user function of the position.

    Under a spawn strategy (``strategy="ddp_spawn"``) the function is pickled: give a function defined at module level
    (or a ``functools.partial`` of one), not a lambda; the schedule classes above are always picklable.

    Example:
        >>> LambdaSchedule(lambda t: 2.0 ** -t)(3)
        0.125
        >>> import functools, math, pickle
        >>> s = pickle.loads(pickle.dumps(LambdaSchedule(functools.partial(math.pow, 0.5))))  # picklable form
        >>> s(3)
        0.125
    """

    def __init__(self, fn: Callable[[float], float]) -> None:
        if not callable(fn):
            raise TypeError(f"LambdaSchedule needs a callable t -> value, got {type(fn).__name__}.")
        self.fn = fn

    def __call__(self, t: float) -> float:
        return float(self.fn(t))


class HyperparameterSchedule(_SpawnPicklable, Callback):
    r"""Drive named hyperparameters (and ``"lr"`` / ``"weight_decay"``) by schedules, per step or per epoch.

    With ``interval="step"`` the value at the trainer's ``global_step`` (optimizer steps taken) is applied before
    every training batch; with ``"epoch"`` the value at ``current_epoch`` is applied at the start of every epoch.
    Values are logged as ``"<prefix><name>"``. The value is applied again in ``on_train_start``, after a
    checkpoint has been restored, so a resumed run continues exactly and never runs a step with a stale value.

    Spawn strategies (``strategy="ddp_spawn"``) pickle the callback: each schedule must then be picklable (the
    schedule classes, or ``LambdaSchedule`` / ``functools.partial`` of a function defined at module level); a lambda
    raises a TypeError naming these forms when the processes start.

    .. math:: \lambda_{\text{name}} \leftarrow s_{\text{name}}(t), \qquad t = \text{global step or epoch}

    Args:
        schedules: Mapping from a dotted hyperparameter name (``"kd.temperature"``, ``"lr"``, or an exposed
            dropout rate such as ``"drop.p"``: ``pl_module.expose_hyperparameter("drop.p")``) to a
            :class:`Schedule` or any callable ``t -> float``.
        interval: ``"step"`` or ``"epoch"``.
        log: Whether to log the applied values.
        prefix: Prefix of the logged names.

    Example:
        >>> cb = HyperparameterSchedule({"kd.temperature": LinearSchedule(4.0, 1.0, duration=100)})
        >>> cb.value_at(50)
        {'kd.temperature': 2.5}
    """

    def __init__(
        self,
        schedules: Mapping[str, Schedule | Callable[[float], float]],
        interval: Literal["step", "epoch"] = "step",
        log: bool = True,
        prefix: str = "hp/",
    ) -> None:
        super().__init__()
        if not schedules:
            raise ValueError("HyperparameterSchedule needs at least one schedule, e.g. {'kd.temperature': ...}.")
        for name, schedule in schedules.items():
            if not callable(schedule):
                raise TypeError(
                    f"The schedule of {name!r} must be a Schedule or a callable t -> value, "
                    f"got {type(schedule).__name__}. Wrap a constant as ConstantSchedule(value)."
                )
        if interval not in ("step", "epoch"):
            raise ValueError(f"`interval` must be 'step' or 'epoch', got {interval!r}.")
        self.schedules = dict(schedules)
        self.interval = interval
        # not ``self.log``: Lightning sets ``callback.log`` to the module's ``log`` method when ``fit`` starts
        self.log_values = log
        self.prefix = prefix
        self.last_position: int | None = None
        self.last_values: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(names=sorted(self.schedules), interval=self.interval)

    @override
    def _functions(self) -> Mapping[str, object]:
        return self.schedules

    def value_at(self, t: float) -> dict[str, float]:
        """The value of every schedule at position ``t``."""
        return {name: float(schedule(t)) for name, schedule in self.schedules.items()}

    def _position(self, trainer: pl.Trainer) -> int:
        return int(trainer.global_step if self.interval == "step" else trainer.current_epoch)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        t = self._position(trainer)
        values = self.value_at(t)
        apply_hyperparameters(pl_module, values, trainer)
        self.last_position, self.last_values = t, values
        if log and self.log_values:
            for name, value in values.items():
                pl_module.log(
                    self.prefix + name,
                    value,
                    on_step=self.interval == "step",
                    on_epoch=self.interval == "epoch",
                    batch_size=1,
                )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # raises KeyError listing the available names (and how to expose a dropout rate)
        _hp.require_hyperparameters(pl_module, list(self.schedules), user=type(self).__name__)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module, log=False)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(trainer, pl_module, log=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":
            self._apply(trainer, pl_module, log=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_position": self.last_position, "last_values": dict(self.last_values)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_position = state_dict.get("last_position")
        self.last_values = dict(state_dict.get("last_values", {}))

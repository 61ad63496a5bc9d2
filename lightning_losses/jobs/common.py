"""Shared pieces of the main jobs: quiet trainers, timers and result tables.

The demo models the jobs train live in :mod:`lightning_losses.demos`; ``ConvNet``, ``pick_image_datamodule`` and
``ClassifierModule`` are re-exported here for the import paths of earlier releases.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_losses.demos import ConvNet
from lightning_losses.demos import image_datamodule as pick_image_datamodule
from lightning_losses.modules.classification import ClassificationModule
from lightning_losses.tuning.common import segment_trainer

__all__ = [
    "ClassifierModule",
    "ConvNet",
    "MeanStd",
    "PairedDifference",
    "ResultsTable",
    "TimeSplit",
    "Timer",
    "bootstrap_interval",
    "make_trainer",
    "mean_std",
    "pick_image_datamodule",
    "quiet_lightning",
    "report",
]

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
# Lightning's per-run hints that say nothing about the job's results
_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*GPU available but not used.*",
    ".*The number of training batches.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*`training_step` returned `None`.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-run banner lines ("GPU available: ...", the LitLogger tip, "`Trainer.fit`
    stopped: ...") and its data-loader hints inside the block; warnings and errors still show.

    A job's ``run`` is decorated with ``@quiet_lightning()`` to run quietly as a whole.

    Example:
        >>> with quiet_lightning():
        ...     logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.WARNING
        True
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def make_trainer(max_epochs: int, *, progress: bool = True, **kwargs: Any) -> pl.Trainer:
    """A CPU-friendly Trainer for the jobs: no checkpoints, no logger, no model summary unless asked."""
    return segment_trainer({"enable_progress_bar": progress, "deterministic": False, **kwargs}, max_epochs, [])


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation of repeated measurements: ``97.00 ± 0.21`` in a table, numbers in JSON.

    Example:
        >>> m = MeanStd.of([0.97, 0.98], scale=100)
        >>> str(m), m.to_json()["n"]
        ('97.50 ± 0.71', 2)
    """

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> MeanStd:
        """Mean and std of ``values`` times ``scale`` (std 0 for one value, NaN for none)."""
        if not values:
            return cls(math.nan, math.nan, 0)
        mean = scale * statistics.fmean(values)
        std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(mean, std, len(values))

    def __str__(self) -> str:
        return "n/a" if self.n == 0 else f"{self.mean:.2f} ± {self.std:.2f}"

    def to_json(self) -> dict[str, Any]:
        return {"mean": _number(self.mean), "std": _number(self.std), "n": self.n}


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.960).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences ``a_i − b_i`` with its 95 % Student-t interval: paired by seed, so the noise the
    two runs of one seed share (initialisation, data order, test set) cancels.

    ``+1.20 [+0.31, +2.09]`` in a table; ``(noise)`` is appended when the interval contains 0, so a difference the
    seeds cannot resolve is never read as a gain.

    Example:
        >>> d = PairedDifference.of([0.95, 0.96, 0.97], [0.94, 0.95, 0.95], scale=100)
        >>> str(d)
        '+1.33 [-0.10, +2.77] (noise)'
        >>> d.resolved
        False
    """

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, a: Sequence[float], b: Sequence[float], scale: float = 1.0) -> PairedDifference:
        """The paired difference of ``a`` and ``b`` (same seeds in the same order) times ``scale``."""
        if len(a) != len(b):
            raise ValueError(f"Paired values need as many entries on each side, got {len(a)} and {len(b)}.")
        diffs = [scale * (x - y) for x, y in zip(a, b)]
        if not diffs:
            return cls(math.nan, math.nan, math.nan, 0)
        mean = statistics.fmean(diffs)
        if len(diffs) == 1:
            return cls(mean, math.nan, math.nan, 1)
        dof = len(diffs) - 1
        half = (_T975[dof - 1] if dof <= len(_T975) else 1.960) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return cls(mean, mean - half, mean + half, len(diffs))

    @property
    def resolved(self) -> bool:
        """Whether the 95 % interval excludes 0."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]" + ("" if self.resolved else " (noise)")

    def to_json(self) -> dict[str, Any]:
        return {"mean": _number(self.mean), "low": _number(self.low), "high": _number(self.high), "n": self.n}


def bootstrap_interval(
    statistic: Callable[[Tensor], float], n: int, *, rounds: int = 200, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``statistic(indices)`` over resamples of ``n`` items with replacement.

    Example:
        >>> import torch
        >>> x = torch.arange(100.0)
        >>> low, high = bootstrap_interval(lambda i: x[i].mean().item(), 100)
        >>> low < 49.5 < high
        True
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    values = sorted(statistic(torch.randint(n, (n,), generator=generator)) for _ in range(rounds))
    return values[int(0.025 * (rounds - 1))], values[math.ceil(0.975 * (rounds - 1))]


def mean_std(values: Sequence[float]) -> str:
    """Format ``mean ± std`` in percent of a list of accuracies in [0, 1]."""
    return str(MeanStd.of(values, scale=100.0))


class Timer:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


class TimeSplit:
    """Where a job's wall time went: seconds per phase, printed as one line at the end (:meth:`line`).

    Phases named ``"group/detail"`` (e.g. ``"training/KD"``) are summed under their group with the details in
    parentheses; the time since the process started before this object existed is reported as start-up (imports).

    Example:
        >>> split = TimeSplit()
        >>> with split.phase("training/KD"):
        ...     pass
        >>> split.add("evaluation", 0.5)
        >>> split.line().startswith("time split (s): ")
        True
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.startup = _seconds_since_process_start()
        self.phases: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase``."""
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def train(self, method: str, seconds: float) -> None:
        """Add ``seconds`` of training ``method`` (the phase ``"training/<method>"``)."""
        self.add(f"training/{method}", seconds)

    @contextmanager
    def phase(self, phase: str) -> Iterator[Timer]:
        """Time the ``with`` block and add it to ``phase``; yields the :class:`Timer`."""
        with Timer() as timer:
            yield timer
        self.add(phase, timer.seconds)

    def line(self) -> str:
        """``time split (s): start-up … · <phase> … · other … · total …``."""
        elapsed = time.perf_counter() - self.start
        groups: dict[str, dict[str, float]] = {}
        for name, seconds in self.phases.items():
            group, _, detail = name.partition("/")
            groups.setdefault(group, {})[detail] = groups.get(group, {}).get(detail, 0.0) + seconds
        parts = [] if math.isnan(self.startup) else [f"start-up (imports) {self.startup:.1f}"]
        for group, details in groups.items():
            named = {k: v for k, v in details.items() if k}
            inner = f" ({', '.join(f'{k} {v:.1f}' for k, v in named.items())})" if named else ""
            parts.append(f"{group} {sum(details.values()):.1f}{inner}")
        other = elapsed - sum(self.phases.values())
        total = elapsed + (0.0 if math.isnan(self.startup) else self.startup)
        return "time split (s): " + " · ".join([*parts, f"other {other:.1f}", f"total {total:.1f}"])


def _seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return math.nan


def _number(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (MeanStd, PairedDifference)):
        return value.to_json()
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


Format = str | Callable[[Any], str]


class ResultsTable:
    """Rows of results printed as a Markdown table and written as ``.md`` and ``.json`` files.

    Rows keep their values as numbers; ``formats`` gives the format spec (or a function) of a column in the
    Markdown table. Missing values (``None``, NaN) show as ``-`` and are ``null`` in the JSON file.

    Example:
        >>> t = ResultsTable("demo", ["method", "accuracy %"], formats={"accuracy %": ".1f"})
        >>> t.add(method="kd", accuracy=97.04)
        Traceback (most recent call last):
            ...
        ValueError: Row lacks columns ['accuracy %'].
        >>> t.add(**{"method": "kd", "accuracy %": 97.04})
        >>> print(t.markdown())
        | method | accuracy % |
        |---|---|
        | kd | 97.0 |
        >>> t.json_rows()
        [{'method': 'kd', 'accuracy %': 97.04}]
    """

    def __init__(self, title: str, columns: Sequence[str], formats: Mapping[str, Format] | None = None) -> None:
        self.title, self.columns = title, list(columns)
        self.formats = dict(formats or {})
        unknown = sorted(set(self.formats) - set(self.columns))
        if unknown:
            raise ValueError(f"`formats` names columns {unknown} that the table does not have ({self.columns}).")
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        missing = set(self.columns) - set(row)
        if missing:
            raise ValueError(f"Row lacks columns {sorted(missing)}.")
        self.rows.append(row)

    def cell(self, column: str, value: Any) -> str:
        """The Markdown text of ``value`` in ``column``."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, Tensor):
            value = value.item()
        fmt = self.formats.get(column)
        if fmt is None or isinstance(value, (str, MeanStd, PairedDifference)):
            return str(value)
        return fmt(value) if callable(fmt) else format(value, fmt)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(self.cell(c, r[c]) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)

    def json_rows(self) -> list[dict[str, Any]]:
        """The rows with their values as JSON numbers (``null`` for missing ones)."""
        return [{c: _jsonable(r[c]) for c in self.columns} for r in self.rows]

    def write(self, directory: str | Path, stem: str, preamble: str = "") -> Path:
        """Write ``<stem>.md`` (with a title and optional preamble) and ``<stem>.json``; return the .md path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem}.md"
        text = f"# {self.title}\n\n" + (preamble.strip() + "\n\n" if preamble else "") + self.markdown() + "\n"
        path.write_text(text)
        (directory / f"{stem}.json").write_text(json.dumps(self.json_rows(), indent=2, ensure_ascii=False) + "\n")
        return path


def report(table: ResultsTable, preamble: str, written: Sequence[Path | str], split: TimeSplit | None = None) -> None:
    """Print a job's result: the preamble, the table, where the results (and plots) were written, the time split."""
    print()
    if preamble:
        print(preamble)
        print()
    print(table.markdown())
    print()
    for path in written:
        print(f"written: {path}")
    if split is not None:
        print(split.line())


class ClassifierModule(ClassificationModule):
    """Cross-entropy training with SGD and cosine decay: :class:`~lightning_losses.ClassificationModule`'s defaults.

    Kept for the import path of earlier releases; use ``ClassificationModule(model)``.

    Example:
        >>> import torch
        >>> module = ClassifierModule(ConvNet(width=4), lr=0.01)
        >>> module(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, model: nn.Module, lr: float = 0.05, weight_decay: float = 5e-4, num_classes: int = 10) -> None:
        super().__init__(model, num_classes=num_classes, lr=lr, weight_decay=weight_decay)

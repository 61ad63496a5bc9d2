"""Shared benchmark harness: time and peak memory of one case per fresh subprocess, Markdown tables, result files.

Peak memory of torch on CPU cannot be read from ``tracemalloc`` (torch allocates outside the Python allocator), so
each case runs in its own interpreter: the case's inputs are built, the resident set size (RSS) is read, the step is
run, and the peak is the process's high-water mark (``VmHWM``; ``ru_maxrss`` where there is no ``/proc``) minus that
RSS. On CUDA the peak is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.

A case is a function ``setup(**params) -> step`` in a benchmark script; ``step()`` runs what is measured (for
example forward and backward) and must leave no state behind between calls (reset ``.grad`` itself).

Usage from a benchmark script::

    from _harness import run_case, markdown_table, write_result
    m = run_case(__file__, "ce_case", {"impl": "chunked", "n": 4096}, repeats=2)
    print(m.time_s, m.peak_mib)

Timing without memory runs in one process with :func:`interleave`: every step once per round, rounds interleaved,
and ratios read round by round (``timings["chunked"].over(timings["floor"])`` → median and min–max). Each table
names the machine (:func:`machine_description`) and, where one exists, the floor: the least work any exact
implementation must do on this machine (for a loss on the logits, the matrix products it cannot avoid).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_MARKER = "@@harness-result@@"


@dataclass
class Measurement:
    """Result of one case: median time of the timed repeats and peak memory above the pre-step baseline."""

    params: dict[str, Any]
    time_s: float = float("nan")
    times_s: list[float] = field(default_factory=list)
    peak_mib: float = float("nan")
    baseline_mib: float = float("nan")
    device: str = "cpu"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    # VmHWM is this process image's own high-water mark; ru_maxrss would also count the parent's peak (Linux keeps
    # it across fork and exec), which a benchmark that already allocated large tensors would report as ours.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def _load(script: str) -> Any:
    spec = importlib.util.spec_from_file_location("_bench_case_module", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look classes up by their module's name
    sys.path.insert(0, str(Path(script).resolve().parent))
    spec.loader.exec_module(module)
    return module


def _worker(script: str, function: str, params: dict[str, Any], repeats: int, warmup: int) -> dict[str, Any]:
    import gc

    import torch

    step = getattr(_load(script), function)(**params)
    cuda = torch.cuda.is_available() and params.get("device", "cpu") == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
        if _max_rss_bytes() > before + (64 << 20):
            # The setup's own transient peak would hide the step's peak: report it rather than a wrong number.
            raise RuntimeError("setup left a high-water mark above the baseline; build inputs without temporaries")
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes()) - before
    return {
        "times_s": times,
        "peak_mib": max(peak, 0) / 2**20,
        "baseline_mib": before / 2**20,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def run_case(
    script: str,
    function: str,
    params: dict[str, Any],
    *,
    repeats: int = 1,
    warmup: int = 0,
    timeout: float | None = None,
) -> Measurement:
    """Run ``function(**params)()`` from ``script`` in a fresh interpreter and measure it.

    Args:
        script: path of the benchmark script defining the case's setup function (usually ``__file__``).
        function: name of the setup function; it returns the zero-argument step to measure.
        params: keyword arguments of the setup function (JSON-serialisable).
        repeats: timed runs of the step; the reported time is their median.
        warmup: untimed runs before them (they count towards the peak memory, which is the same step).
        timeout: seconds before the subprocess is killed (the measurement then holds the error).
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", script, function, json.dumps(params)]
    command += [str(repeats), str(warmup)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Measurement(params, error=f"timed out after {timeout} s")
    for line in done.stdout.splitlines():
        if line.startswith(_MARKER):
            r = json.loads(line[len(_MARKER) :])
            return Measurement(
                params,
                time_s=statistics.median(r["times_s"]),
                times_s=r["times_s"],
                peak_mib=r["peak_mib"],
                baseline_mib=r["baseline_mib"],
                device=r["device"],
            )
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return Measurement(params, error=f"exit code {done.returncode}: " + " | ".join(tail))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render ``rows`` (dicts) as a Markdown table with the given columns; floats get 3 significant digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    """Write ``text`` to ``benchmarks/results/<name>.md`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def machine_description() -> str:
    """One line naming the machine: CPU count, torch version and threads, GPU if any."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {gpu}"
    )


# --------------------------------------------------------------------------------------------------------------------
# In-process timing: interleaved rounds, medians, min–max spread, ratios to a floor
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Times of one step over interleaved rounds (one entry per round: the median of that round's repeats)."""

    name: str
    times_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    @property
    def low(self) -> float:
        return min(self.times_s)

    @property
    def high(self) -> float:
        return max(self.times_s)

    def over(self, other: Timing) -> Spread:
        """Ratio of this step's time to ``other``'s, paired round by round (both ran in the same round)."""
        return Spread([a / b for a, b in zip(self.times_s, other.times_s)])


@dataclass
class Spread:
    """Per-round values (usually ratios): their median and min–max."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        lo, hi = min(self.values), max(self.values)
        return f"{self.median:{spec}} ({lo:{spec}}–{hi:{spec}})"


def interleave(
    steps: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 5,
    repeats: int = 1,
    warmup: int = 1,
    synchronize: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time several steps in one process, interleaved: round r runs every step ``repeats`` times, in turn.

    Machine noise (another process, frequency changes) then hits every step of a round alike, so ratios between
    steps are read per round (:meth:`Timing.over`) rather than between medians taken at different moments. The order
    of the steps alternates between rounds so that none always runs first.

    Args:
        steps: name → zero-argument step (it must reset any state it leaves, e.g. ``.grad``).
        rounds: timed rounds.
        repeats: runs of each step per round; the round's time is their median.
        warmup: untimed runs of each step before the first round.
        synchronize: called after each run before the clock is read (``torch.cuda.synchronize`` on a GPU).
        clock: the clock read around each run: wall time by default; ``time.process_time`` (CPU time of this
            process, all threads) measures the work done and is steadier on a machine shared with other jobs.

    Example:
        >>> t = interleave({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, rounds=3)
        >>> sorted(t), len(t["a"].times_s)
        (['a', 'b'], 3)
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    if synchronize is not None:
        synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            runs = []
            for _ in range(repeats):
                start = clock()
                steps[name]()
                if synchronize is not None:
                    synchronize()
                runs.append(clock() - start)
            times[name].append(statistics.median(runs))
    return {name: Timing(name, t) for name, t in times.items()}


def interleave_cases(
    script: str,
    function: str,
    cases: Mapping[str, dict[str, Any]],
    *,
    rounds: int = 3,
    repeats: int = 1,
    warmup: int = 0,
    timeout: float | None = None,
) -> dict[str, Measurement]:
    """:func:`run_case` for several cases, interleaved over ``rounds`` (each run a fresh process).

    Each case's ``times_s`` holds one median per round, its ``time_s`` their median and its ``peak_mib`` the median
    peak; a case that fails in any round keeps that round's error.
    """
    runs: dict[str, list[Measurement]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in list(cases) if r % 2 == 0 else reversed(list(cases)):
            runs[name].append(run_case(script, function, cases[name], repeats=repeats, warmup=warmup, timeout=timeout))
    out = {}
    for name, ms in runs.items():
        failed = [m for m in ms if not m.ok]
        if failed:
            out[name] = failed[0]
            continue
        out[name] = Measurement(
            cases[name],
            time_s=statistics.median(m.time_s for m in ms),
            times_s=[m.time_s for m in ms],
            peak_mib=statistics.median(m.peak_mib for m in ms),
            baseline_mib=statistics.median(m.baseline_mib for m in ms),
            device=ms[0].device,
        )
    return out


def spread(values: Sequence[float], spec: str = ".3g") -> str:
    """``median (min–max)`` of ``values``."""
    return format(Spread(list(values)), spec)


def attach_trainer(module: Any, *, training_state: bool = True) -> None:
    """Give ``module`` a Trainer without fitting, so that a hand-called ``training_step`` sees ``current_epoch`` (for
    timing steps outside ``Trainer.fit``); with ``training_state`` the Trainer is also in the training state, so
    that the step logs and counts tokens as it does in a fit."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.trainer = trainer
    if training_state:
        trainer.training = True
        trainer.strategy._lightning_module = module
        module._current_fx_name = "training_step"
    module.train()


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        _, _, script_arg, function_arg, params_arg, repeats_arg, warmup_arg = sys.argv
        result = _worker(script_arg, function_arg, json.loads(params_arg), int(repeats_arg), int(warmup_arg))
        print(_MARKER + json.dumps(result), flush=True)
    # Run directly (e.g. by `make bench`, which runs every script): nothing to benchmark in the harness itself.

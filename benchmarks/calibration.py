"""Calibration benchmarks, side by side in one run.

1. Streaming ECE (:class:`lightning_losses.metrics.CalibrationError`, per-bin sums) against torchmetrics
   ``MulticlassCalibrationError`` (keeps every confidence) on N samples × 100 classes fed in batches of 10 000:
   time of all updates plus ``compute``, peak memory above the inputs, and the metric state at ``compute``.
2. Temperature-scaling fit on 100 000 × 100 logits: ours (strong-Wolfe LBFGS on log T until convergence), the
   common recipe (LBFGS lr 0.01, 50 iterations on T, as in the CA and gpleiss code), netcal's
   ``TemperatureScaling`` and torch-uncertainty's ``TemperatureScaler`` when it imports: time, fitted T, test NLL.

Each case runs in a fresh interpreter (``_harness.run_case``). ``--quick`` uses 100 000 samples for part 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_description, markdown_table, run_case, write_result

CHUNK = 10_000
CLASSES = 100
TRUE_T = 2.0


def _probabilities(n: int, c: int, seed: int) -> torch.Tensor:
    """Softmax of random logits, built in place (no transient copy of the N × C tensor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).mul_(3.0)
    x.sub_(x.amax(dim=1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=1, keepdim=True))


def ece_case(impl: str, n: int, out: str) -> Callable[[], None]:
    """Setup of part 1: returns the step (every update, then compute)."""
    probs = _probabilities(n, CLASSES, 0)
    target = torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(1))

    # imports happen in the setup, so that the measured peak is the metric's, not the modules'
    from torchmetrics.classification import MulticlassCalibrationError

    from lightning_losses.metrics.calibration import CalibrationError

    def step() -> None:
        if impl.startswith("streaming"):
            metric: Any = CalibrationError(n_bins=15, validate_args=impl == "streaming-validated")
        else:
            metric = MulticlassCalibrationError(num_classes=CLASSES, n_bins=15, validate_args=False)
        for start in range(0, n, CHUNK):
            metric.update(probs[start : start + CHUNK], target[start : start + CHUNK])
        value = float(metric.compute())
        state = 0
        for name in metric._defaults:
            held = getattr(metric, name)
            tensors = held if isinstance(held, list) else [held]
            state += sum(t.numel() * t.element_size() for t in tensors)
        Path(out).write_text(json.dumps({"ece": value, "state_bytes": state}))

    return step


def _temperature_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits over-confident by TRUE_T: labels drawn from softmax(logits / TRUE_T), in chunks (no big temporaries)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, CLASSES, generator=g).mul_(3.0)
    target = torch.cat(
        [torch.multinomial(F.softmax(rows, dim=1), 1, generator=g).squeeze(1) for rows in true.split(CHUNK)]
    )
    return true.mul_(TRUE_T), target


def ts_case(impl: str, n: int, out: str) -> Callable[[], None]:
    """Setup of part 2: returns the step (one fit), which records the fitted T and the held-out NLL."""
    logits, target = _temperature_data(n, 0)
    test_logits, test_target = _temperature_data(n // 5, 1)
    probs = F.softmax(logits, dim=1).numpy() if impl == "netcal" else None
    labels = target.numpy()

    def record(temperature: float) -> None:
        nll = float(F.cross_entropy(test_logits / temperature, test_target))
        Path(out).write_text(json.dumps({"temperature": temperature, "nll": nll}))

    from lightning_losses.nn.calibration import TemperatureScaler

    def step() -> None:
        if impl == "ours":
            record(TemperatureScaler().fit(logits, target).temperature)
        elif impl == "lbfgs-50":
            t = torch.nn.Parameter(torch.tensor(1.5))
            optimizer = torch.optim.LBFGS([t], lr=0.01, max_iter=50)

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(logits / t, target)
                loss.backward()
                return loss

            optimizer.step(closure)
            record(float(t.detach()))
        elif impl == "netcal":
            from netcal.scaling import TemperatureScaling

            scaler = TemperatureScaling()
            scaler.fit(probs, labels)
            record(_netcal_temperature(scaler))
        elif impl == "torch-uncertainty":
            from torch_uncertainty.post_processing import TemperatureScaler as TUScaler

            dataset = torch.utils.data.TensorDataset(logits, target)
            scaler = TUScaler(model=None)
            scaler.fit(torch.utils.data.DataLoader(dataset, batch_size=10_000))
            record(float(scaler.temperature[0]))
        else:
            raise ValueError(impl)

    return step


def _netcal_temperature(scaler: Any) -> float:
    """netcal stores the inverse temperature as the weight of its logit model; read it back as T."""
    weights = scaler.weights
    w = float(weights[0]) if hasattr(weights, "__len__") else float(weights)
    return 1.0 / w if w else math.inf


def _read(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 000 samples for the ECE part")
    args = parser.parse_args()
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    tmp = tempfile.mkdtemp()

    ece_rows = []
    for n in sizes:
        for impl in ("streaming", "streaming-validated", "torchmetrics"):
            out = f"{tmp}/ece_{impl}_{n}.json"
            m = run_case(__file__, "ece_case", {"impl": impl, "n": n, "out": out}, repeats=3, warmup=1, timeout=1200)
            r = _read(out)
            ece_rows.append(
                {
                    "samples": f"{n:,}",
                    "implementation": {
                        "streaming": "lightning-losses CalibrationError (validate_args=False)",
                        "streaming-validated": "lightning-losses CalibrationError (validate_args=True)",
                        "torchmetrics": "torchmetrics MulticlassCalibrationError (validate_args=False)",
                    }[impl],
                    "time s": m.time_s,
                    "peak MiB above inputs": m.peak_mib,
                    "state bytes at compute": r.get("state_bytes", "n/a"),
                    "ECE": f"{r['ece']:.6f}" if "ece" in r else (m.error or "n/a"),
                }
            )
    for n in sizes:
        *ours, theirs = (row for row in ece_rows if row["samples"] == f"{n:,}")
        for row in ours:
            row["speed-up"] = f"{theirs['time s'] / row['time s']:.1f}×" if row["time s"] == row["time s"] else "n/a"
        theirs["speed-up"] = "1.0×"

    ts_rows = []
    n_ts = 100_000
    for impl in ("ours", "lbfgs-50", "netcal", "torch-uncertainty"):
        out = f"{tmp}/ts_{impl}.json"
        m = run_case(__file__, "ts_case", {"impl": impl, "n": n_ts, "out": out}, repeats=1, timeout=1200)
        r = _read(out)
        note = ""
        if impl == "netcal" and abs(r.get("temperature", 0.0) - 1.0) < 1e-6:
            note = "default method 'mle' left T = 1 (uncalibrated output; netcal issue #48)"
        if not m.ok:
            note = "could not run: " + (
                "torch-uncertainty needs torchvision, not installable beside this CPU torch"
                if impl == "torch-uncertainty"
                else str(m.error)
            )
        ts_rows.append(
            {
                "implementation": {
                    "ours": "lightning-losses TemperatureScaler",
                    "lbfgs-50": "LBFGS lr 0.01, 50 iterations (common recipe)",
                    "netcal": "netcal TemperatureScaling",
                    "torch-uncertainty": "torch-uncertainty TemperatureScaler",
                }[impl],
                "fit s": m.time_s,
                "fitted T": r.get("temperature", float("nan")),
                "held-out NLL": r.get("nll", float("nan")),
                "note": note,
            }
        )
    ours_time = ts_rows[0]["fit s"]
    for row in ts_rows:
        row["time vs ours"] = f"{row['fit s'] / ours_time:.1f}×" if row["fit s"] == row["fit s"] else "n/a"
    _, true_test = _temperature_data(n_ts // 5, 1)
    logits_test, _ = _temperature_data(n_ts // 5, 1)
    oracle = float(F.cross_entropy(logits_test / TRUE_T, true_test))

    text = "\n\n".join(
        [
            "# Calibration benchmarks",
            machine_description(),
            f"## Streaming ECE vs torchmetrics ({CLASSES} classes, batches of {CHUNK:,}, 15 bins, median of 3)",
            markdown_table(
                ece_rows,
                [
                    "samples",
                    "implementation",
                    "time s",
                    "speed-up",
                    "peak MiB above inputs",
                    "state bytes at compute",
                    "ECE",
                ],
            ),
            f"## Temperature scaling fit ({n_ts:,} × {CLASSES} logits, true T = {TRUE_T}; held-out NLL on "
            f"{n_ts // 5:,} samples; NLL at the true T = {oracle:.4f})",
            markdown_table(ts_rows, ["implementation", "fit s", "time vs ours", "fitted T", "held-out NLL", "note"]),
        ]
    )
    print(text)
    path = write_result("calibration" + ("_quick" if args.quick else ""), text)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

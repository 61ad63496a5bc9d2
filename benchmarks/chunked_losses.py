"""Chunked large-vocabulary losses vs the naive computation: time and peak memory of forward + backward.

Each case runs in a fresh subprocess (see ``_harness.py``); peak memory is the high-water mark of the step above the
memory held once the inputs exist (hidden states, head weight, targets). Results go to
``benchmarks/results/chunked_losses.md`` and a plot of peak memory against the vocabulary size to
``benchmarks/results/chunked_losses_memory.png``.

Run ``python benchmarks/chunked_losses.py`` (add ``--quick`` for a smoke run with small sizes, ``--device cuda`` on a
GPU machine).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (
    RESULTS_DIR,
    Measurement,
    machine_description,
    markdown_table,
    run_case,
    write_result,
)

from lightning_losses.functional.chunked import (
    default_chunk_size,
    linear_cross_entropy,
    linear_distillation_loss,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(n: int, d: int, v: int, dtype: str, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and a head weight created in place (no temporaries that would raise the memory baseline)."""
    torch.manual_seed(seed)
    hidden = torch.empty(n, d, dtype=DTYPES[dtype], device=device).normal_().requires_grad_()
    weight = torch.empty(v, d, dtype=DTYPES[dtype], device=device).normal_(0, d**-0.5).requires_grad_()
    return hidden, weight


def ce_case(
    impl: str, n: int, d: int, v: int, dtype: str = "float32", chunk_size: int | None = None, device: str = "cpu"
) -> Callable[[], None]:
    """Cross-entropy of ``hidden @ weight.T`` against random targets; forward and backward."""
    hidden, weight = _inputs(n, d, v, dtype, device)
    target = torch.randint(0, v, (n,), device=device)

    def naive() -> None:
        hidden.grad = weight.grad = None
        F.cross_entropy(F.linear(hidden, weight).float(), target).backward()

    def chunked() -> None:
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size).backward()

    return naive if impl == "naive" else chunked


def _naive_jsd(zs: torch.Tensor, zt: torch.Tensor, beta: float) -> torch.Tensor:
    log_s, log_t = zs.log_softmax(-1), zt.log_softmax(-1)
    log_m = torch.logaddexp(log_s + torch.log1p(torch.tensor(-beta)), log_t + torch.log(torch.tensor(beta)))
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def jsd_case(
    impl: str, n: int, d: int, v: int, dtype: str = "float32", chunk_size: int | None = None, device: str = "cpu"
) -> Callable[[], None]:
    """Generalized JSD (β = 0.5) between a trained student head and a frozen teacher head of the same size."""
    hidden, weight = _inputs(n, d, v, dtype, device)
    teacher_hidden, teacher_weight = _inputs(n, d, v, dtype, device, seed=1)
    teacher_hidden.requires_grad_(False)
    teacher_weight.requires_grad_(False)

    def naive() -> None:
        hidden.grad = weight.grad = None
        with torch.no_grad():
            zt = F.linear(teacher_hidden, teacher_weight).float()
        _naive_jsd(F.linear(hidden, weight).float(), zt, 0.5).backward()

    def chunked() -> None:
        hidden.grad = weight.grad = None
        loss = linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, beta=0.5, chunk_size=chunk_size)
        loss.backward()

    return naive if impl == "naive" else chunked


def _row(loss: str, n: int, d: int, v: int, dtype: str, naive: Measurement, chunked: Measurement) -> dict:
    def ms(m: Measurement, what: str) -> float | str:
        return getattr(m, what) if m.ok else f"failed ({m.error})"

    both = naive.ok and chunked.ok
    return {
        "loss": loss,
        "N": n,
        "d": d,
        "V": v,
        "dtype": dtype,
        "chunk rows": default_chunk_size(v) if loss == "ce" else max(1, default_chunk_size(v) // 2),
        "naive s": ms(naive, "time_s"),
        "chunked s": ms(chunked, "time_s"),
        "time chunked/naive": chunked.time_s / naive.time_s if both else float("nan"),
        "naive peak MiB": ms(naive, "peak_mib"),
        "chunked peak MiB": ms(chunked, "peak_mib"),
        "memory naive/chunked": naive.peak_mib / chunked.peak_mib if both else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    script = str(Path(__file__).resolve())
    if args.quick:
        sweep = [("ce", 512, 64, v, "float32") for v in (2048, 4096, 8192)]
        headline = [("ce", 1024, 128, 16384, "float32"), ("jsd", 512, 64, 8192, "float32")]
    else:
        # Vocabulary sweep at N = 4096, d = 512, then the target point and one distillation case.
        sweep = [("ce", 4096, 512, v, "float32") for v in (32768, 65536, 131072)]
        headline = [("ce", 8192, 1024, 131072, "float32"), ("jsd", 4096, 512, 32768, "float32")]
    cases = {"ce": "ce_case", "jsd": "jsd_case"}
    rows = []
    for loss, n, d, v, dtype in sweep + headline:
        params = {"n": n, "d": d, "v": v, "dtype": dtype, "device": args.device}
        naive = run_case(script, cases[loss], {"impl": "naive", **params})
        chunked = run_case(script, cases[loss], {"impl": "chunked", **params})
        rows.append(_row(loss, n, d, v, dtype, naive, chunked))
        print(f"done {loss} N={n} d={d} V={v}: {rows[-1]}", flush=True)
    columns = list(rows[0])
    header = (
        "# Chunked large-vocabulary losses: forward + backward, naive vs chunked\n\n"
        f"Machine: {machine_description()}; device: {args.device}. One run per cell, each in a fresh process; "
        "peak = high-water mark above the memory held once inputs exist (hidden states, head weight). "
        "`ce`: cross-entropy; `jsd`: generalized JSD (β = 0.5) against a frozen teacher head.\n\n"
    )
    table = markdown_table(rows, columns)
    print(table)
    name = "chunked_losses" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    path = write_result(name, header + table)
    print(f"wrote {path}")
    _plot([r for r in rows if r["loss"] == "ce" and r["N"] == sweep[0][1]], name)
    return 0


def _plot(rows: list[dict], name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    usable = [r for r in rows if isinstance(r["naive peak MiB"], float) and isinstance(r["chunked peak MiB"], float)]
    if not usable:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    vs = [r["V"] for r in usable]
    ax.plot(vs, [r["naive peak MiB"] for r in usable], "o-", label="naive")
    ax.plot(vs, [r["chunked peak MiB"] for r in usable], "s-", label="chunked")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("peak memory above inputs (MiB)")
    ax.set_title(f"cross-entropy fwd+bwd, N={usable[0]['N']}, d={usable[0]['d']}")
    ax.legend()
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}_memory.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())

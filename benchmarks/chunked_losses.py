"""Chunked large-vocabulary losses against their floor and the naive computation: time and peak memory.

The floor is the least work any exact implementation must do on this machine: the matrix products it cannot avoid,
timed as one call of the BLAS each on the full batch (no softmax, no loss, no chunking):

* ``linear_cross_entropy`` and ``linear_sequence_log_probs`` forward + backward: three products — the logits
  ``h Wᵀ``, the gradient of the hidden states ``G W`` and of the head ``Gᵀ h``. (The sequence log-probabilities
  return one value per sequence whose gradient is only known in backward, so a memory-bounded implementation
  computes the logits twice: four products. The table's floor is still three.)
* ``linear_distillation_loss`` forward + backward: four — the student's and the teacher's logits and the two
  gradients.

Part 1 times floor, naive and chunked in one process, interleaved round by round (``_harness.interleave``), and
reports the per-round ratio to the floor as ``median (min–max)``. Part 2 measures peak memory, one fresh process per
case (``_harness.interleave_cases``): the high-water mark above the memory held once the inputs exist.

Run ``python benchmarks/chunked_losses.py`` (``--quick``: small sizes, a smoke run; ``--clock cpu`` times CPU time,
steadier on a shared machine; ``--device cuda`` on a GPU machine). Results: ``benchmarks/results/chunked_losses.md``
and the plot ``chunked_losses_memory.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (
    RESULTS_DIR,
    interleave,
    interleave_cases,
    machine_description,
    markdown_table,
    write_result,
)

from lightning_losses.functional.chunked import (
    default_chunk_size,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_sequence_log_probs,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOSSES = ("ce", "logps", "jsd")
IMPLS = {"ce": ("floor", "naive", "chunked"), "logps": ("floor", "naive", "chunked")}
IMPLS["jsd"] = ("floor", "naive", "chunked", "chunked, fused")


def _inputs(n: int, d: int, v: int, dtype: str, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and a head weight created in place (no temporaries that would raise the memory baseline)."""
    torch.manual_seed(seed)
    hidden = torch.empty(n, d, dtype=DTYPES[dtype], device=device).normal_().requires_grad_()
    weight = torch.empty(v, d, dtype=DTYPES[dtype], device=device).normal_(0, d**-0.5).requires_grad_()
    return hidden, weight


def _naive_jsd(zs: torch.Tensor, zt: torch.Tensor, beta: float) -> torch.Tensor:
    log_s, log_t = zs.log_softmax(-1), zt.log_softmax(-1)
    log_m = torch.logaddexp(log_s + torch.log1p(torch.tensor(-beta)), log_t + torch.log(torch.tensor(beta)))
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def loss_case(
    loss: str, impl: str, n: int, d: int, v: int, dtype: str = "float32", device: str = "cpu"
) -> Callable[[], None]:
    """One forward + backward of ``loss`` (``ce``, ``logps``, ``jsd``) by ``impl`` (``floor``, ``naive``, ``chunked``;
    for ``jsd`` also ``chunked, fused``: each chunk's work compiled with ``torch.compile``).

    ``logps`` scores ``n`` tokens as 8 sequences with per-sequence upstream weights (as NPO uses them); ``jsd`` is
    the generalized JSD (β = 0.5) against a frozen teacher head of the same size.
    """
    hidden, weight = _inputs(n, d, v, dtype, device)
    target = torch.randint(0, v, (n,), device=device)
    teacher_hidden, teacher_weight = _inputs(n, d, v, dtype, device, seed=1)
    teacher_hidden.requires_grad_(False)
    teacher_weight.requires_grad_(False)
    seq_weights = torch.linspace(-1.0, 1.0, 8, device=device)

    if impl == "floor":
        # Output buffers allocated once: the floor is the products themselves, not the allocator.
        h, w = hidden.detach(), weight.detach()
        logits = torch.empty(n, v, dtype=h.dtype, device=device)
        teacher_logits = torch.empty_like(logits)
        grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)

        def floor() -> None:
            torch.mm(h, w.t(), out=logits)
            if loss == "jsd":
                torch.mm(teacher_hidden, teacher_weight.t(), out=teacher_logits)
            torch.mm(logits, w, out=grad_h)
            torch.mm(logits.t(), h, out=grad_w)

        return floor

    def step() -> None:
        hidden.grad = weight.grad = None
        if loss == "ce":
            if impl == "naive":
                out = F.cross_entropy(F.linear(hidden, weight).float(), target)
            else:
                out = linear_cross_entropy(hidden, weight, target)
        elif loss == "logps":
            labels = target.reshape(8, -1)
            if impl == "naive":
                logp = F.linear(hidden, weight).float().log_softmax(-1).gather(1, target[:, None]).reshape(8, -1)
                out = (logp.sum(1) * seq_weights).sum()
            else:
                out = (linear_sequence_log_probs(hidden.reshape(8, -1, d), weight, labels) * seq_weights).sum()
        else:
            if impl == "naive":
                with torch.no_grad():
                    zt = F.linear(teacher_hidden, teacher_weight).float()
                out = _naive_jsd(F.linear(hidden, weight).float(), zt, 0.5)
            else:
                fused = impl == "chunked, fused"
                out = linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, beta=0.5, fused=fused)
        out.backward()

    return step


def _time_table(sizes: tuple[int, int, int], dtype: str, device: str, rounds: int, clock: str) -> str:
    n, d, v = sizes
    steps = {(loss, impl): loss_case(loss, impl, n, d, v, dtype, device) for loss in LOSSES for impl in IMPLS[loss]}
    sync = torch.cuda.synchronize if device == "cuda" else None
    timings = interleave(
        {f"{k[0]}/{k[1]}": s for k, s in steps.items()},
        rounds=rounds,
        synchronize=sync,
        clock=time.process_time if clock == "cpu" else time.perf_counter,
    )
    rows = []
    for loss in LOSSES:
        floor = timings[f"{loss}/floor"]
        for impl in IMPLS[loss]:
            t = timings[f"{loss}/{impl}"]
            rows.append(
                {
                    "loss": loss,
                    "impl": impl,
                    "ms (median)": 1e3 * t.median,
                    "ms min–max": f"{1e3 * t.low:.0f}–{1e3 * t.high:.0f}",
                    "× floor": format(t.over(floor), ".3f"),
                }
            )
    header = (
        f"## Time: forward + backward, N = {n}, d = {d}, V = {v}, {dtype}\n\n"
        f"{rounds} interleaved rounds in one process ({'CPU' if clock == 'cpu' else 'wall'} time); × floor is the "
        "per-round ratio, median (min–max). Floor: the products no exact implementation avoids (three for `ce` and "
        "`logps`, four for `jsd`), each one BLAS call on the full batch. Chunk rows: "
        f"{default_chunk_size(v)} for `ce`/`logps`, {max(1, default_chunk_size(v) // 2)} for `jsd`. The fused row's "
        "compilation runs in the untimed warm-up.\n\n"
    )
    return header + markdown_table(rows, list(rows[0]))


def _memory_table(cases: list[tuple[str, int, int, int]], dtype: str, device: str) -> tuple[str, list[dict]]:
    script = str(Path(__file__).resolve())
    rows = []
    for loss, n, d, v in cases:
        params = {"loss": loss, "n": n, "d": d, "v": v, "dtype": dtype, "device": device}
        m = interleave_cases(
            script,
            "loss_case",
            {impl: {"impl": impl, **params} for impl in ("naive", "chunked")},
            rounds=1,
            timeout=1200,
        )
        naive, chunked = m["naive"], m["chunked"]
        both = naive.ok and chunked.ok
        rows.append(
            {
                "loss": loss,
                "N": n,
                "d": d,
                "V": v,
                "logits MiB": n * v * 4 / 2**20,
                "naive peak MiB": naive.peak_mib if naive.ok else f"failed ({naive.error})",
                "chunked peak MiB": chunked.peak_mib if chunked.ok else f"failed ({chunked.error})",
                "naive / chunked": naive.peak_mib / chunked.peak_mib if both else float("nan"),
            }
        )
        print(f"memory {loss} N={n} V={v}: {rows[-1]}", flush=True)
    header = (
        f"## Peak memory: forward + backward, {dtype}\n\n"
        "One fresh process per case; peak = high-water mark above the memory held once the inputs exist (hidden "
        "states, heads, targets). `logits MiB`: one float32 copy of the logits, which the chunked losses never "
        "form.\n\n"
    )
    return header + markdown_table(rows, list(rows[0])), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall or CPU time")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if args.quick:
        sizes, memory = (512, 64, 4096), [("ce", 512, 64, v) for v in (2048, 8192)] + [("jsd", 256, 64, 4096)]
    else:
        n, d = 2048, 512
        sizes = (n, d, 32768)
        memory = [("ce", n, d, v) for v in (32768, 65536, 131072)] + [("logps", n, d, 32768), ("jsd", n, d, 32768)]
    start = time.perf_counter()
    time_text = _time_table(sizes, "float32", args.device, args.rounds, args.clock)
    print(time_text, flush=True)
    memory_text, memory_rows = _memory_table(memory, "float32", args.device)
    print(memory_text)
    text = (
        "# Chunked large-vocabulary losses: floor, naive and chunked\n\n"
        f"Machine: {machine_description()}; device: {args.device}; this run took "
        f"{time.perf_counter() - start:.0f} s.\n\n{time_text}\n\n{memory_text}\n"
    )
    name = "chunked_losses" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    print(f"wrote {write_result(name, text)}")
    _plot([r for r in memory_rows if r["loss"] == "ce"], name)
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
    if len(usable) < 2:
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

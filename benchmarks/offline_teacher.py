"""Offline teacher logits vs a live teacher: peak memory and step time against the floor, and quality of the top-k
loss as k grows.

A GPT-2 teacher and a smaller GPT-2 student, both built from configs (random weights; the teacher's embedding is
scaled so its next-token distributions are peaked, as a trained LM's are), on random token ids. The teacher's top-k
log-probabilities are precomputed once into a memory-mapped cache (float16 values, int32 ids).

* Memory and time (one fresh process per case, the cases interleaved over rounds, ``_harness.interleave_cases``):
  a training step (forward + backward of the student and the loss) with the live teacher (its forward under
  ``no_grad`` plus the full-vocabulary forward KL), against the same step reading the teacher's top-k from the cache
  (``SparseGeneralizedJSDLoss``, β = 0). The floor is the student's step with no teacher term at all (cross-entropy
  on the labels only): the least work any distillation step must also do. The resident memory before the step
  (``baseline``, which holds the teacher's weights in the live case) and the step's peak above it are reported.
* Quality (in this process): on one batch, the sparse loss against the full-vocabulary loss (forward KL and the
  JSD with β = 0.5), and the cosine between the two gradients with respect to the student's parameters.

Run: ``python benchmarks/offline_teacher.py`` (``--quick`` for a smoke run: small sizes, every case in this process,
time only, written to ``results/offline_teacher_quick.md``, which git ignores). Writes
``benchmarks/results/offline_teacher.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import Timing, interleave, interleave_cases, machine_description, markdown_table, spread, write_result

SIZES = {
    "full": {"vocab": 8192, "batch": 4, "seq": 128, "teacher": (6, 512), "student": (2, 128), "sequences": 16},
    "quick": {"vocab": 1024, "batch": 2, "seq": 32, "teacher": (2, 64), "student": (1, 32), "sequences": 4},
}


def _lm(vocab: int, layers: int, width: int, seed: int, peak: float = 1.0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the default GPT-2 bos/eos ids lie outside a small vocabulary: harmless here
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_layer=layers, n_embd=width, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(peak)
    return model


def _ids(size: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, size["vocab"], (size["sequences"], size["seq"]), generator=g)


def _teacher(size: dict[str, Any]) -> torch.nn.Module:
    return _lm(size["vocab"], *size["teacher"], seed=1, peak=2.5).eval()


def _student(size: dict[str, Any]) -> torch.nn.Module:
    return _lm(size["vocab"], *size["student"], seed=2)


def _imports() -> None:
    # Every case imports the same modules before its baseline is read, so the baselines differ by what the case
    # holds (the teacher, the cache), not by library code.
    import lightning_losses.data.teacher_logits
    import lightning_losses.losses.sparse_distillation  # noqa: F401
    from lightning_losses import GeneralizedJSDLoss  # noqa: F401

    torch.set_num_threads(1)  # one thread: less interference from other processes on a shared machine


def floor_case(size_name: str) -> Callable[[], None]:
    """The floor: the student's step with no teacher term, cross-entropy on the labels only."""
    _imports()
    size = SIZES[size_name]
    student = _student(size)
    batch = _ids(size)[: size["batch"]]

    def step() -> None:
        s = student(input_ids=batch).logits[:, :-1]
        torch.nn.functional.cross_entropy(s.flatten(0, 1), batch[:, 1:].flatten()).backward()
        student.zero_grad(set_to_none=True)

    return step


def live_case(size_name: str) -> Callable[[], None]:
    """Step with the teacher in memory: teacher forward (no grad) + student forward/backward + full forward KL."""
    _imports()
    from lightning_losses import GeneralizedJSDLoss

    size = SIZES[size_name]
    teacher, student, loss = _teacher(size), _student(size), GeneralizedJSDLoss(beta=0.0)
    batch = _ids(size)[: size["batch"]]

    def step() -> None:
        with torch.no_grad():
            t = teacher(input_ids=batch).logits[:, :-1]
        s = student(input_ids=batch).logits[:, :-1]
        loss(s, t, batch[:, 1:]).backward()
        student.zero_grad(set_to_none=True)

    return step


def offline_case(size_name: str, cache_dir: str) -> Callable[[], None]:
    """The same step reading the teacher's top-k from the memory-mapped cache; no teacher is built."""
    _imports()
    from lightning_losses.data.teacher_logits import TeacherLogitsCache
    from lightning_losses.losses.sparse_distillation import SparseGeneralizedJSDLoss

    size = SIZES[size_name]
    cache, student, loss = TeacherLogitsCache(cache_dir), _student(size), SparseGeneralizedJSDLoss(beta=0.0)
    batch = _ids(size)[: size["batch"]]
    rows = torch.arange(size["batch"])

    def step() -> None:
        top = cache[rows]  # read from the memory map every step, as a data loader would
        s = student(input_ids=batch).logits[:, :-1]
        loss(s, (top.log_probs[:, :-1], top.indices[:, :-1]), batch[:, 1:]).backward()
        student.zero_grad(set_to_none=True)

    return step


def _name(case: str) -> str:
    return "floor (CE on the labels only)" if case == "floor" else case


def step_case(kind: str, size_name: str, cache_dir: str | None = None, k: int | None = None) -> Callable[[], None]:
    """The step of one case: ``floor``, ``live`` or ``offline`` (reading the cache in ``cache_dir``, top-``k``)."""
    if kind == "floor":
        return floor_case(size_name)
    if kind == "live":
        return live_case(size_name)
    assert cache_dir is not None
    return offline_case(size_name, cache_dir)


def _quality(size: dict[str, Any], caches: dict[int, str]) -> list[dict[str, Any]]:
    from lightning_losses.data.teacher_logits import TeacherLogitsCache
    from lightning_losses.functional import generalized_jsd_loss
    from lightning_losses.functional.sparse_distillation import sparse_generalized_jsd_loss

    teacher, student = _teacher(size), _student(size)
    batch = _ids(size)[: size["batch"]]
    with torch.no_grad():
        t = teacher(input_ids=batch).logits[:, :-1]
    params = [p for p in student.parameters() if p.requires_grad]

    def grads(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params, retain_graph=True)])

    rows = []
    for k, folder in caches.items():
        top = TeacherLogitsCache(folder)[torch.arange(size["batch"])]
        lp, idx = top.log_probs[:, :-1], top.indices[:, :-1]
        row: dict[str, Any] = {"k": k if k < size["vocab"] else f"V = {k}"}
        row["teacher mass in top-k"] = float(lp.float().exp().sum(-1).mean())
        for beta, name in ((0.0, "KL"), (0.5, "JSD")):
            s = student(input_ids=batch).logits[:, :-1]
            full = generalized_jsd_loss(s, t, beta=beta)
            sparse = sparse_generalized_jsd_loss(s, lp, idx, beta=beta)
            g_full, g_sparse = grads(full), grads(sparse)
            row[f"{name} sparse / full"] = float(sparse.detach() / full.detach())
            row[f"{name} grad cosine"] = float(torch.nn.functional.cosine_similarity(g_full, g_sparse, dim=0))
        rows.append(row)
    return rows


def _precompute(size: dict[str, Any], ks: list[int], root: Path) -> dict[int, tuple[float, float]]:
    """Write one cache per k under ``root``; return k → (seconds, MiB on disk)."""
    from lightning_losses.data.teacher_logits import precompute_teacher_logits

    teacher, ids = _teacher(size), _ids(size)
    out = {}
    for k in ks:
        folder = root / f"k{k}"
        start = time.perf_counter()
        precompute_teacher_logits(teacher, ids, folder, k=k, batch_size=size["batch"])
        seconds = time.perf_counter() - start
        out[k] = (seconds, sum(f.stat().st_size for f in folder.iterdir()) / 2**20)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, every case in this process (smoke run)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--inline-rounds", type=int, default=5, help="interleaved rounds in one process")
    args = parser.parse_args()
    start = time.perf_counter()
    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    vocab = size["vocab"]
    ks = [k for k in (1, 8, 64, 512) if k < vocab] + [vocab]
    timed_ks = [k for k in (64, 512) if k < vocab] + [vocab]  # k = 1 and 8 step like k = 64
    if args.quick:
        args.inline_rounds = 1
    speed_rows: list[dict[str, Any]] = []
    script = str(Path(__file__).resolve())

    with tempfile.TemporaryDirectory() as root:
        precompute = _precompute(size, ks, Path(root))
        caches = {k: str(Path(root) / f"k{k}") for k in ks}
        cases: dict[str, dict[str, Any]] = {
            "floor": {"kind": "floor", "size_name": size_name},
            "live teacher": {"kind": "live", "size_name": size_name},
        }
        for k in timed_ks:
            cases[f"offline k={k}"] = {"kind": "offline", "size_name": size_name, "cache_dir": caches[k], "k": k}
        if not args.quick:
            measured = interleave_cases(
                script, "step_case", cases, rounds=args.rounds, repeats=args.repeats, warmup=1, timeout=600
            )
            failed = {name: m.error for name, m in measured.items() if not m.ok}
            if failed:
                raise SystemExit(f"cases failed: {failed}")
            timing = {name: Timing(name, m.times_s) for name, m in measured.items()}
            floor_total = measured["floor"].baseline_mib + measured["floor"].peak_mib
            for name, m in measured.items():
                k = cases[name].get("k")
                row: dict[str, Any] = {
                    "case": _name(name),
                    "step s": spread(timing[name].times_s),
                    "× floor": format(timing[name].over(timing["floor"]), ".2f"),
                    "baseline MiB": m.baseline_mib,
                    "step peak MiB": m.peak_mib,
                    "total MiB": m.baseline_mib + m.peak_mib,
                    "above floor MiB": m.baseline_mib + m.peak_mib - floor_total,
                }
                if k:
                    row["cache MiB"], row["precompute s"] = precompute[k][1], precompute[k][0]
                speed_rows.append(row)
                print(row, flush=True)
        # Time in one process: every case's step in turn, round by round (steadier ratios on a shared machine).
        steps = {name: step_case(**params) for name, params in cases.items()}
        inline = interleave(steps, rounds=args.inline_rounds, repeats=1, warmup=1)
        del steps
        inline_rows = [
            {
                "case": _name(name),
                "step s": spread(t.times_s),
                "× floor": format(t.over(inline["floor"]), ".2f"),
            }
            for name, t in inline.items()
        ]
        quality_rows = _quality(size, caches)

    t_layers, t_width = size["teacher"]
    s_layers, s_width = size["student"]
    memory_section: list[str] = []
    if speed_rows:
        columns = ["case", "step s", "× floor", "baseline MiB", "step peak MiB", "total MiB", "above floor MiB"]
        memory_section = [
            "## Memory and step time, one fresh process per case",
            "",
            f"{args.rounds} interleaved rounds of one process per case, {args.repeats} timed steps after a warm-up "
            "(a round's time: their median). `baseline`: resident memory once the case is built (the live case "
            "holds the teacher; every case has imported the same modules); `step peak`: the step's high-water mark "
            "above it; `above floor`: total minus the floor's total.",
            "",
            markdown_table(speed_rows, [*columns, "cache MiB", "precompute s"]),
            "",
        ]
    text = "\n".join(
        [
            "# Offline teacher logits",
            "",
            f"Teacher GPT-2 {t_layers}×{t_width}, student GPT-2 {s_layers}×{s_width}, vocabulary {vocab}, batch "
            f"{size['batch']}×{size['seq']} tokens, cache of {size['sequences']} sequences "
            f"(float16 values, int32 ids); the steps on one thread{' (smoke run: time only)' if args.quick else ''}. "
            f"Machine: {machine_description()}; this run took {time.perf_counter() - start:.0f} s.",
            "",
            "Floor: the student's step with no teacher term at all (cross-entropy on the labels only), the least work "
            "any distillation step must also do. `step s`: median (min–max) over rounds; `× floor`: per-round "
            "ratio, median (min–max). The steps of k = 1 and k = 8 are not timed (they run like k = 64).",
            "",
            *memory_section,
            "## Step time, every case in one process",
            "",
            f"{args.inline_rounds} interleaved rounds (one step of each case per round, after a warm-up step); the "
            "ratios are paired within a round.",
            "",
            markdown_table(inline_rows, ["case", "step s", "× floor"]),
            "",
            "## Quality of the top-k loss (one batch)",
            "",
            markdown_table(
                quality_rows,
                [
                    "k",
                    "teacher mass in top-k",
                    "KL sparse / full",
                    "KL grad cosine",
                    "JSD sparse / full",
                    "JSD grad cosine",
                ],
            ),
            "",
            "Sparse loss: top-k plus the teacher's remaining mass as one bucket (forward KL β = 0, JSD β = 0.5); "
            "gradients with respect to all student parameters.",
        ]
    )
    path = write_result("offline_teacher" + ("_quick" if args.quick else ""), text)
    print(text)
    print(f"\nWritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

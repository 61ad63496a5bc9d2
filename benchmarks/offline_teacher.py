"""Offline teacher logits vs a live teacher: peak memory and step time, and quality of the top-k loss as k grows.

A GPT-2 teacher and a smaller GPT-2 student, both built from configs (random weights; the teacher's embedding is
scaled so its next-token distributions are peaked, as a trained LM's are), on random token ids. The teacher's top-k
log-probabilities are precomputed once into a memory-mapped cache (float16 values, int32 ids).

* Memory and time (one fresh process per case, ``_harness.run_case``): a training step (forward + backward of the
  student and the loss) with the live teacher (its forward under ``no_grad`` plus the full-vocabulary forward KL),
  against the same step reading the teacher's top-k from the cache (``SparseGeneralizedJSDLoss``, β = 0). The
  resident memory before the step (``baseline``, which holds the teacher's weights in the live case) and the step's
  peak above it are reported.
* Quality (in this process): on one batch, the sparse loss against the full-vocabulary loss (forward KL and the
  JSD with β = 0.5), and the cosine between the two gradients with respect to the student's parameters.

Run: ``python benchmarks/offline_teacher.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/offline_teacher.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import machine_description, markdown_table, run_case, write_result

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


def live_case(size_name: str) -> Any:
    """Step with the teacher in memory: teacher forward (no grad) + student forward/backward + full forward KL."""
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


def offline_case(size_name: str, cache_dir: str) -> Any:
    """The same step reading the teacher's top-k from the memory-mapped cache; no teacher is built."""
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


def _precompute(size_name: str, ks: list[int], root: Path) -> None:
    from lightning_losses.data.teacher_logits import precompute_teacher_logits

    size = SIZES[size_name]
    teacher, ids = _teacher(size), _ids(size)
    timings = {}
    for k in ks:
        folder = root / f"k{k}"
        start = time.perf_counter()
        precompute_teacher_logits(teacher, ids, folder, k=k, batch_size=size["batch"])
        seconds = time.perf_counter() - start
        timings[k] = {"seconds": seconds, "mib": sum(f.stat().st_size for f in folder.iterdir()) / 2**20}
    (root / "precompute.json").write_text(json.dumps(timings))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    parser.add_argument("--precompute", help=argparse.SUPPRESS)  # internal: write the caches into this folder
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size_name = args.size or ("quick" if args.quick else "full")
    size = SIZES[size_name]
    vocab = size["vocab"]
    ks = [k for k in (1, 8, 64, 512) if k < vocab] + [vocab]
    repeats = 1 if args.quick else 3
    script = str(Path(__file__).resolve())
    if args.precompute:
        _precompute(size_name, ks, Path(args.precompute))
        return 0

    with tempfile.TemporaryDirectory() as root:
        # The caches are written by a child process: a worker's ru_maxrss starts from its parent's resident size
        # (Linux keeps it across fork and exec), so this process must stay small while the cases run.
        command = [sys.executable, script, "--precompute", root, "--size", size_name]
        subprocess.run(command, check=True)
        timings = json.loads((Path(root) / "precompute.json").read_text())
        precompute = {int(k): (v["seconds"], v["mib"]) for k, v in timings.items()}
        caches = {k: str(Path(root) / f"k{k}") for k in ks}

        speed_rows = []
        live = run_case(script, "live_case", {"size_name": size_name}, repeats=repeats, warmup=1)
        cases = [("live teacher", live, None)]
        for k in ks:
            m = run_case(
                script, "offline_case", {"size_name": size_name, "cache_dir": caches[k]}, repeats=repeats, warmup=1
            )
            cases.append((f"offline k={k}", m, k))
        for name, m, k in cases:
            row: dict[str, Any] = {"case": name}
            if m.ok:
                row.update(
                    {
                        "step s": m.time_s,
                        "baseline MiB": m.baseline_mib,
                        "step peak MiB": m.peak_mib,
                        "total MiB": m.baseline_mib + m.peak_mib,
                    }
                )
            else:
                row["step s"] = m.error
            if k is not None:
                row["cache MiB"], row["precompute s"] = precompute[k][1], precompute[k][0]
            speed_rows.append(row)
        quality_rows = _quality(size, caches)

    t_layers, t_width = size["teacher"]
    s_layers, s_width = size["student"]
    text = "\n".join(
        [
            "# Offline teacher logits",
            "",
            f"Teacher GPT-2 {t_layers}×{t_width}, student GPT-2 {s_layers}×{s_width}, vocabulary {vocab}, batch "
            f"{size['batch']}×{size['seq']} tokens, cache of {size['sequences']} sequences "
            "(float16 values, int32 ids). "
            f"{machine_description()}.",
            "",
            "## Memory and step time (one process per case)",
            "",
            markdown_table(
                speed_rows,
                ["case", "step s", "baseline MiB", "step peak MiB", "total MiB", "cache MiB", "precompute s"],
            ),
            "",
            "`baseline`: resident memory once the case is built (the live case holds the teacher); `step peak`: the "
            "step's high-water mark above it.",
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
    path = write_result("offline_teacher", text)
    print(text)
    print(f"\nWritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

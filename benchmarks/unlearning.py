"""NPO step time and peak memory with three ways of getting the reference model, against the floor (no reference).

One training step of NPO (forward and backward of the LoRA policy on a forget batch, AdamW step on the adapter) on
a GPT-2 large enough for its weights to dominate memory, with the reference log-probabilities from:

* ``deepcopy``: a deep-copied frozen reference model (what open-unlearning does), ``reference="model"``;
* ``disabled_adapter``: the same model with its fresh LoRA adapter disabled (no second copy);
* ``precomputed``: reference log-probabilities computed once before training, looked up by sample index.

The floor is the same policy step with no reference at all: the forward of the LoRA policy, the answer tokens'
log-probabilities from its logits (plain ``log_softmax`` and gather), NPO's softplus against the policy's own
detached value, the backward and the AdamW step: the least work any implementation with a reference must also do.

Memory and time: each case runs in a fresh interpreter (``_harness.interleave_cases``), the cases interleaved over
rounds. Peak memory is the process's high-water mark minus its resident size after the imports and the inputs,
before the model is built, so it counts the weights, the reference, the optimizer state and the step. A round's
time is the median of the timed steps (after one warm-up step) on one thread; the table gives the median over
rounds and its min–max, and the ratios are paired round by round. Time again, every case in one process
(``_harness.interleave``): one step of each case per round, so the ratios are paired within seconds.

Run: ``python benchmarks/unlearning.py [--layers 12] [--width 768] [--repeats 3] [--rounds 2]`` (``--quick``: a
small model, every case in one process, time only, written to ``results/unlearning_quick.md``, which git
ignores).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    Measurement,
    Timing,
    interleave,
    interleave_cases,
    machine_description,
    markdown_table,
    spread,
    write_result,
)

MODES = ("deepcopy", "disabled_adapter", "precomputed")
CASES = ("floor", *MODES)
BETA = 0.1  # NPO's default inverse temperature (the module's and the floor's)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def npo_case(mode: str, layers: int, width: int, vocab: int, batch: int, seq: int, report: str) -> Callable[[], None]:
    """One NPO step in ``mode`` (``floor`` or one of :data:`MODES`).

    ``report`` is a file to which the case appends one JSON line: the resident size before the model is built, the
    model's parameter count and the first step's loss (recorded in the untimed warm-up step).
    """
    import peft  # noqa: F401  (imported before the baseline so that library code is not counted)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_losses.data.unlearning import UnlearningBatchCollator
    from lightning_losses.demos import build_gpt2
    from lightning_losses.integrations.peft import lora_model
    from lightning_losses.modules.unlearning import UnlearningModule

    torch.set_num_threads(1)  # one thread: less interference from other processes on a shared machine
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    items = [(ids[i], ids[i].clone(), torch.tensor(i)) for i in range(batch)]
    forget = UnlearningBatchCollator(prompt_tokens=0)(items)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))  # warm the lazy imports
    start_rss = _rss_mib()
    base = build_gpt2(vocab, n_layer=layers, n_embd=width, n_head=8, block_size=seq)
    n_params = sum(p.numel() for p in base.parameters())
    loss_fn: Callable[[], torch.Tensor]
    if mode == "floor":
        policy = lora_model(base, r=8)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)  # UnlearningModule's defaults
        labels = forget["labels"][:, 1:]

        def loss_fn() -> torch.Tensor:
            logits = policy(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits[:, :-1]
            counted = labels != -100
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            logps = (lp * counted).sum(-1)
            return torch.nn.functional.softplus(BETA * (logps - logps.detach())).mean() * (2 / BETA)

    else:
        reference = copy.deepcopy(base).requires_grad_(False).eval() if mode == "deepcopy" else None
        policy = lora_model(base, r=8)
        module = UnlearningModule(
            policy, method="npo", reference="model" if mode == "deepcopy" else mode, reference_model=reference
        )
        if mode == "precomputed":
            module.precompute_reference([forget])
        optimizer = module.configure_optimizers()

        def loss_fn() -> torch.Tensor:
            return module.unlearning_loss(forget)

    first: list[float] = []

    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not first:  # the warm-up step: the policy still equals its reference
            first.append(float(loss.detach()))
            with open(report, "a") as f:
                f.write(json.dumps({"start_mib": start_rss, "params_m": n_params / 1e6, "loss": first[0]}) + "\n")

    return step


def _reports(path: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not lines:
        return {"start_mib": float("nan"), "params_m": float("nan"), "loss": float("nan")}
    return {k: statistics.median(r[k] for r in lines) for k in lines[0]}


def _time_columns(timing: dict[str, Timing], c: str) -> dict[str, str]:
    t = timing[c]
    return {
        "step s": spread(t.times_s),
        "× floor": format(t.over(timing["floor"]), ".2f"),
        "speed vs deepcopy": format(timing["deepcopy"].over(t), ".2f"),
    }


def _name(c: str) -> str:
    return "floor (no reference)" if c == "floor" else c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the fresh processes")
    parser.add_argument("--inline-rounds", type=int, default=5, help="interleaved rounds in one process")
    parser.add_argument("--quick", action="store_true", help="a small model, one process, time only (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.vocab, args.seq, args.inline_rounds = 2, 64, 1024, 32, 1
    start = time.perf_counter()
    script = str(Path(__file__).resolve())
    config = {"layers": args.layers, "width": args.width, "vocab": args.vocab, "batch": args.batch, "seq": args.seq}
    sections = []
    with tempfile.TemporaryDirectory() as folder:
        if not args.quick:
            report = {c: Path(folder) / f"{c}.jsonl" for c in CASES}
            cases = {c: {"mode": c, **config, "report": str(report[c])} for c in CASES}
            m: dict[str, Measurement] = interleave_cases(
                script, "npo_case", cases, rounds=args.rounds, repeats=args.repeats, warmup=1, timeout=600
            )
            failed = {c: r.error for c, r in m.items() if not r.ok}
            if failed:
                raise SystemExit(f"cases failed: {failed}")
            extra = {c: _reports(report[c]) for c in CASES}
            timing = {c: Timing(c, m[c].times_s) for c in CASES}
            total = {c: m[c].baseline_mib + m[c].peak_mib - extra[c]["start_mib"] for c in CASES}
            rows = [
                {
                    "case": _name(c),
                    **_time_columns(timing, c),
                    "peak MiB": total[c],
                    "above floor MiB": total[c] - total["floor"],
                    "memory vs deepcopy": total[c] / total["deepcopy"],
                    "initial NPO loss": extra[c]["loss"],
                }
                for c in CASES
            ]
            sections.append(
                "## Memory and time, one fresh process per case\n\n"
                f"{args.rounds} interleaved rounds of one process per case, {args.repeats} timed steps after a warm-up "
                "(a round's time: their median). `peak MiB`: high-water mark above the resident size before the "
                "model is built (weights, reference, optimizer state and step); `above floor MiB`: what the "
                "reference costs (the floor forms the full logits; the module scores from the hidden states in "
                "chunks, so it may sit a few MiB below the floor).\n\n" + markdown_table(rows, list(rows[0]))
            )
            print(sections[-1], flush=True)
        # Time in one process: every case's step in turn, round by round (steadier ratios on a shared machine).
        inline_report = {c: Path(folder) / f"inline-{c}.jsonl" for c in CASES}
        steps = {c: npo_case(c, **config, report=str(inline_report[c])) for c in CASES}
        inline = interleave(steps, rounds=args.inline_rounds, repeats=1, warmup=1)
        inline_extra = {c: _reports(inline_report[c]) for c in CASES}
        del steps
    rows = [{"case": _name(c), **_time_columns(inline, c), "initial NPO loss": inline_extra[c]["loss"]} for c in CASES]
    sections.append(
        "## Time, every case in one process\n\n"
        f"{args.inline_rounds} interleaved rounds (one step of each case per round, after a warm-up step); the "
        "ratios are paired within a round.\n\n" + markdown_table(rows, list(rows[0]))
    )
    print(sections[-1], flush=True)
    params = inline_extra["floor"]["params_m"]
    text = (
        "# NPO reference: deep copy vs disabled adapter vs precomputed log-probabilities, against the floor\n\n"
        f"GPT-2 {args.layers} layers x {args.width} wide, vocabulary {args.vocab} ({params:.1f} M parameters), "
        f"LoRA r=8 on c_attn, forget batch {args.batch} x {args.seq} tokens, one NPO step (forward, backward, AdamW) "
        f"on one thread{' (smoke run: time only)' if args.quick else ''}. Machine: {machine_description()}; this "
        f"run took {time.perf_counter() - start:.0f} s.\n\n"
        "Floor: the same policy step with no reference at all (LoRA policy forward, answer log-probabilities by "
        "`log_softmax` and gather, NPO's softplus against the policy's own detached value, backward, AdamW): the "
        "least work any implementation with a reference must also do. `step s`: median (min–max) over rounds; "
        "`× floor` and `speed vs deepcopy`: per-round ratios, median (min–max).\n\n"
        + "\n\n".join(sections)
        + "\n\nTargets: precomputed >= 1.4x faster per step than deepcopy; disabled_adapter <= 0.6x the peak memory "
        f"of deepcopy. The initial NPO loss is the same in every case (2/beta * log 2 = {2 / BETA * math.log(2):.2f}: "
        "the policy equals its reference before the first step).\n"
    )
    print(f"written to {write_result('unlearning' + ('_quick' if args.quick else ''), text)}")


if __name__ == "__main__":
    main()

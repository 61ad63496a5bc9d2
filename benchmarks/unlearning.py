"""NPO step time and peak memory with three ways of getting the reference model.

One training step of NPO (forward and backward of the LoRA policy on a forget batch, AdamW step on the adapter) on
a GPT-2 large enough for its weights to dominate memory, with the reference log-probabilities from:

* ``deepcopy``: a deep-copied frozen reference model (what open-unlearning does), ``reference="model"``;
* ``disabled_adapter``: the same model with its fresh LoRA adapter disabled (no second copy);
* ``precomputed``: reference log-probabilities computed once before training, looked up by sample index.

Each case runs in its own interpreter. Peak memory is the process's high-water mark minus its resident size after
the imports and before the model is built, so it counts the weights, the reference, the optimizer state and the
step. Times are the fastest timed step (after one warm-up step) on one thread, the most stable figure on a shared
machine.

Run: ``python benchmarks/unlearning.py [--layers 12] [--width 768] [--repeats 3] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_description, markdown_table, write_result

MODES = ("deepcopy", "disabled_adapter", "precomputed")
_MARK = "@@unlearning-bench@@"


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(mode: str, layers: int, width: int, vocab: int, batch: int, seq: int, repeats: int) -> dict:
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
    start_rss = _rss_bytes()
    base = build_gpt2(vocab, n_layer=layers, n_embd=width, n_head=8, block_size=seq)
    reference = None
    if mode == "deepcopy":
        reference = copy.deepcopy(base).requires_grad_(False).eval()
    policy = lora_model(base, r=8)
    module = UnlearningModule(
        policy, method="npo", reference="model" if mode == "deepcopy" else mode, reference_model=reference
    )
    if mode == "precomputed":
        module.precompute_reference([forget])
    optimizer = module.configure_optimizers()
    n_params = sum(p.numel() for p in base.parameters())

    def step() -> float:
        loss = module.unlearning_loss(forget)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    times, losses = [], []
    for i in range(1 + repeats):
        t0 = time.perf_counter()
        losses.append(step())
        if i > 0:
            times.append(time.perf_counter() - t0)
    peak = _max_rss_bytes() - start_rss
    return {"times": times, "peak_mib": peak / 2**20, "first_loss": losses[0], "params_m": n_params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the modes (min is kept)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = [args.layers, args.width, args.vocab, args.batch, args.seq, args.repeats]
    if args.worker:
        print(_MARK + json.dumps(worker(args.worker, *config)), flush=True)
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleaved, so that a busy machine slows every mode alike
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode] + [
                f"--{k}={v}" for k, v in zip(("layers", "width", "vocab", "batch", "seq", "repeats"), config)
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = done.stdout.splitlines()
            result = next((json.loads(ln[len(_MARK) :]) for ln in lines if ln.startswith(_MARK)), None)
            if result is None:
                raise SystemExit(f"{mode} failed: {done.stderr.strip().splitlines()[-3:]}")
            result["mode"] = mode
            result["step_s"] = min(result["times"])
            print(f"{mode}: {result['step_s']:.3f} s/step, peak {result['peak_mib']:.0f} MiB", flush=True)
            if mode not in best or result["step_s"] < best[mode]["step_s"]:
                peak = min(result["peak_mib"], best.get(mode, result)["peak_mib"])
                best[mode] = dict(result, peak_mib=peak)
    rows = [best[mode] for mode in MODES]
    a = rows[0]
    for r in rows:
        r["speed_vs_deepcopy"] = a["step_s"] / r["step_s"]
        r["memory_vs_deepcopy"] = r["peak_mib"] / a["peak_mib"]
        r["initial_npo_loss"] = r["first_loss"]
    columns = ["mode", "step_s", "speed_vs_deepcopy", "peak_mib", "memory_vs_deepcopy", "initial_npo_loss"]
    table = markdown_table(rows, columns)
    params = rows[0]["params_m"]
    text = (
        "# NPO reference: deep copy vs disabled adapter vs precomputed log-probabilities\n\n"
        f"GPT-2 {args.layers} layers x {args.width} wide, vocabulary {args.vocab} ({params:.1f} M parameters), "
        f"LoRA r=8 on c_attn, forget batch {args.batch} x {args.seq} tokens, one NPO step (forward, backward, AdamW), "
        f"fastest of {args.repeats} steps after a warm-up on one thread, each mode in a fresh process, best of "
        f"{args.rounds} interleaved rounds. Machine: "
        f"{machine_description()}.\n\n{table}\n\n"
        "Targets: precomputed >= 1.4x faster per step than deepcopy; disabled_adapter <= 0.6x the peak memory of "
        "deepcopy. The initial NPO loss is the same in every mode (2/beta * log 2 = 13.86: the policy equals its "
        "reference before the first step).\n"
    )
    print(table)
    print(f"written to {write_result('unlearning', text)}")


if __name__ == "__main__":
    main()

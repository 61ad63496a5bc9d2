"""TempNet's overhead per LM training step: time and memory of TempNet + KL-DRO vs plain cross-entropy (fixed τ).

One full step each (forward, backward, AdamW update) on a GPT-2-style model built from a config, the variants
interleaved so that all see the same machine load; the median over the timed steps is reported. Variants:

* ``fixed``: cross-entropy at τ = 1;
* ``logits``: TempNet reading the logits (first layer ``V × H`` per token) + the DRO loss;
* ``factorised``: TempNet's factorised first layer on the LM head's inputs (``d × H`` per token) + the DRO loss
  (what ``TempNetModule`` runs on a linear-head LM);
* ``factorised, autograd DRO``: the same with the DRO loss written as ``τ·CE(z/τ) + (ρ − log V)·τ`` in autograd
  ops instead of the library's closed-form-gradient function;
* ``TempNetModule.training_step``: the ready module's whole step (factorised TempNet, DRO loss, τ statistics) with
  its own AdamW parameter groups.
 Memory is the
peak CUDA allocation on a GPU and, on CPU, the bytes the forward saves for the backward (activations) measured with
saved-tensor hooks. Target: TempNet step ≤ 1.15 × the fixed-τ step.

Run: ``python benchmarks/temperature.py [--steps 10]``; writes ``benchmarks/results/temperature.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_losses.demos import build_gpt2
from lightning_losses.functional import dro_temperature_loss
from lightning_losses.integrations.transformers import causal_lm_hidden_states
from lightning_losses.jobs.common import ResultsTable
from lightning_losses.modules import TempNetModule
from lightning_losses.nn import TempNet


@dataclass
class Setting:
    name: str
    n_layer: int
    n_embd: int
    vocab: int
    batch: int
    length: int
    tempnet_hidden: int


CPU_SETTINGS = [
    Setting("job LM (4×128, V=2k), TempNet H=128 (the job's)", 4, 128, 2048, 16, 128, 128),
    Setting("job LM (4×128, V=2k), TempNet H=256", 4, 128, 2048, 16, 128, 256),
    Setting("6×256, V=8k, TempNet H=256", 6, 256, 8192, 8, 128, 256),
    Setting("GPT-2 small shape (12×768, V=50k), H=256", 12, 768, 50257, 2, 128, 256),
]
GPU_SETTINGS = [
    *CPU_SETTINGS[:-1],
    Setting("GPT-2 small shape (12×768, V=50k), H=256", 12, 768, 50257, 8, 512, 256),
]


VARIANTS = ("fixed", "logits", "factorised", "factorised, autograd DRO", "TempNetModule.training_step")


def _autograd_dro(logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, rho: float) -> torch.Tensor:
    vocab = logits.shape[-1]
    scaled = (logits.float() / tau.unsqueeze(-1)).reshape(-1, vocab)
    ce = F.cross_entropy(scaled, target.reshape(-1), reduction="none").view_as(tau)
    return (tau * ce + (rho - math.log(vocab)) * tau).mean()


def _step_fn(setting: Setting, variant: str, device: torch.device) -> tuple[Callable[[], None], Callable[[], int]]:
    model = build_gpt2(setting.vocab, setting.n_layer, setting.n_embd, max(setting.n_embd // 64, 2), setting.length)
    model = model.to(device)
    use_tempnet = variant != "fixed"
    tempnet = TempNet(setting.vocab, 0.5, 5.0, setting.tempnet_hidden).to(device) if use_tempnet else None
    groups = [{"params": list(model.parameters()), "lr": 1e-4}]
    if tempnet is not None:
        groups.append({"params": list(tempnet.parameters()), "lr": 1e-5})
    opt = torch.optim.AdamW(groups)
    ids = torch.randint(0, setting.vocab, (setting.batch, setting.length), device=device)
    module = None
    if variant == "TempNetModule.training_step":
        module = TempNetModule(
            model, setting.vocab, "causal_lm", rho=2.0, hidden_dim=setting.tempnet_hidden, lr=1e-4, tempnet_lr=1e-5
        ).to(device)
        opt = module.configure_optimizers()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()  # each storage once, however many views are saved
        return t

    def step() -> None:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            target = ids[:, 1:]
            if module is not None:
                loss = module.training_step((ids, ids), 0)
            elif tempnet is None:
                logits = model(ids).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, setting.vocab).float(), target.reshape(-1))
            elif variant == "logits":
                logits = model(ids).logits[:, :-1]
                loss = dro_temperature_loss(logits, target, tempnet(logits), rho=2.0, validate_args=False)
            else:
                hidden, head = causal_lm_hidden_states(model, ids)
                logits = F.linear(hidden, head.weight, head.bias)[:, :-1]
                tau = tempnet(logits, features=hidden[:, :-1], head_weight=head.weight, head_bias=head.bias)
                if variant == "factorised":
                    loss = dro_temperature_loss(logits, target, tau, rho=2.0, validate_args=False)
                else:
                    loss = _autograd_dro(logits, target, tau, rho=2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: sum(saved.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(setting: Setting, steps: int, warmup: int, device: torch.device) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    runs = {variant: _step_fn(setting, variant, device) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    peak: dict[str, float] = {}
    for step, _ in runs.values():
        for _ in range(warmup):
            step()
        _sync(device)
    for variant, (step, saved) in runs.items():  # memory, one variant at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            peak[variant] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            step()
            peak[variant] = saved() / 2**20
    for _ in range(steps):  # time, interleaved
        for variant, (step, _) in runs.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[variant].append(time.perf_counter() - start)
    return {v: {"ms": 1e3 * statistics.median(times[v]), "mem": peak[v]} for v in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = GPU_SETTINGS if device.type == "cuda" else CPU_SETTINGS
    what = "peak CUDA MiB" if device.type == "cuda" else "saved activations MiB"
    table = ResultsTable(
        "TempNet + KL-DRO vs fixed-τ cross-entropy: one LM training step",
        ["setting", "tokens", "variant", "step (ms)", "time ratio", what, "mem ratio"],
    )
    for setting in settings:
        r = measure(setting, args.steps, args.warmup, device)
        for variant in VARIANTS:
            table.add(
                setting=setting.name,
                tokens=f"{setting.batch}×{setting.length}",
                variant=variant,
                **{
                    "step (ms)": f"{r[variant]['ms']:.1f}",
                    "time ratio": f"{r[variant]['ms'] / r['fixed']['ms']:.3f}",
                    what: f"{r[variant]['mem']:.1f}",
                    "mem ratio": f"{r[variant]['mem'] / r['fixed']['mem']:.3f}",
                },
            )
            print(table.rows[-1], flush=True)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    note = (
        f"Device: {device_name}. Median of {args.steps} interleaved steps after {args.warmup} warm-up steps. "
        "Ratios against the fixed-τ step of the same setting, same run. Target time ratio ≤ 1.15."
    )
    print(table.markdown())
    stem = "temperature" if device.type == "cpu" else "temperature_gpu"
    table.write(args.output, stem, preamble=note)


if __name__ == "__main__":
    main()

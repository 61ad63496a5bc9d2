"""TempNet's overhead per LM training step: ``TempNetModule`` against the fixed-τ cross-entropy step (the floor).

One full step each (forward, backward, AdamW update) on a GPT-2-style model built from a config, interleaved in one
process (``benchmarks/_harness.py``), ratios read round by round. Variants:

* ``floor: fixed τ``: cross-entropy at τ = 1 on the model's logits (the least any TempNet step must do);
* ``DRO loss at τ = 1``: the closed-form KL-DRO loss in place of the cross-entropy, no TempNet (the loss's share);
* ``TempNet + DRO``: TempNet's factorised first layer on the LM head's inputs (``d × H`` per token) and the
  closed-form KL-DRO loss, written out by hand (no module, no logging);
* ``TempNetModule``: the ready module's ``training_step`` with a Trainer attached as in a fit (τ statistics and the
  loss logged) and its own AdamW parameter groups.

``both`` is the whole step; ``forward`` (the loss computation) and ``backward`` (backward, optimizer step,
``zero_grad``) are its two parts, timed within the same runs. Memory (default run only): the peak
resident memory of one step above the set-up model, each case in a fresh process (``interleave_cases``), and the
bytes the forward saves for the backward (saved-tensor hooks, in-process). Target: ``TempNetModule`` ≤ 1.10× the
floor.

Run: ``python benchmarks/temperature.py [--rounds 10] [--quick]``; writes ``benchmarks/results/temperature.md``
(``temperature_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from _harness import (
    Timing,
    attach_trainer,
    interleave,
    interleave_cases,
    machine_description,
    markdown_table,
    spread,
    write_result,
)

from lightning_losses.demos import build_gpt2
from lightning_losses.functional import dro_temperature_loss
from lightning_losses.integrations.transformers import causal_lm_hidden_states
from lightning_losses.modules import TempNetModule
from lightning_losses.nn import TempNet


class Setting(NamedTuple):  # not a dataclass: the harness's fresh-process loader leaves the module out of sys.modules
    name: str
    n_layer: int
    n_embd: int
    vocab: int
    batch: int
    length: int
    tempnet_hidden: int


SETTINGS = [
    Setting("the temperature job's LM (4×128, V = 2k), TempNet H = 128", 4, 128, 2048, 16, 128, 128),
    Setting("6×256, V = 8k, TempNet H = 256", 6, 256, 8192, 8, 128, 256),
]
VARIANTS = {
    "fixed": "floor: fixed τ",
    "dro": "DRO loss at τ = 1",
    "factorised": "TempNet + DRO",
    "module": "TempNetModule",
}


logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no Trainer banner per module


def _model_macs(s: Setting) -> float:
    """Multiply-adds of one training step of the LM: 3× the forward's (blocks, attention scores, head)."""
    tokens = s.batch * s.length
    blocks = s.n_layer * (12 * s.n_embd**2 * tokens + 2 * s.batch * s.length**2 * s.n_embd)
    return 3.0 * (blocks + tokens * s.vocab * s.n_embd)


def _tempnet_macs(s: Setting) -> float:
    """Multiply-adds of TempNet's factorised step: 2·H·V·d (W₁·W_o and its gradient), ~3× the per-token layers."""
    tokens, h = s.batch * (s.length - 1), s.tempnet_hidden
    return 2.0 * h * s.vocab * s.n_embd + 3.0 * tokens * (s.n_embd * h + h * h)


def setup(variant: str, **params: Any) -> Callable[[], None]:
    """One step of ``variant`` on ``Setting(**params)`` (also the setup function of the fresh-process memory cases)."""
    return _parts(Setting(**params), variant)["both"]


def _parts(setting: Setting, variant: str) -> dict[str, Any]:
    torch.manual_seed(0)
    s = setting
    model = build_gpt2(s.vocab, s.n_layer, s.n_embd, max(s.n_embd // 64, 2), s.length)
    ids = torch.randint(0, s.vocab, (s.batch, s.length))
    module: TempNetModule | None = None
    tempnet: TempNet | None = None
    if variant == "module":
        module = TempNetModule(
            model, s.vocab, "causal_lm", rho=2.0, hidden_dim=s.tempnet_hidden, lr=1e-4, tempnet_lr=1e-5
        )
        attach_trainer(module)
        opt = module.configure_optimizers()
    else:
        groups = [{"params": list(model.parameters()), "lr": 1e-4}]
        if variant == "factorised":
            tempnet = TempNet(s.vocab, 0.5, 5.0, s.tempnet_hidden)
            groups.append({"params": list(tempnet.parameters()), "lr": 1e-5})
        opt = torch.optim.AdamW(groups)
    target = ids[:, 1:]

    def forward() -> torch.Tensor:
        if module is not None:
            return module.training_step((ids, ids), 0)
        if tempnet is None:
            logits = model(ids).logits[:, :-1]
            if variant == "dro":
                return dro_temperature_loss(logits, target, 1.0, rho=2.0, validate_args=False)
            return F.cross_entropy(logits.reshape(-1, s.vocab).float(), target.reshape(-1))
        hidden, head = causal_lm_hidden_states(model, ids)
        logits = F.linear(hidden, head.weight, head.bias)[:, :-1]
        tau = tempnet(logits, features=hidden[:, :-1], head_weight=head.weight, head_bias=head.bias)
        return dro_temperature_loss(logits, target, tau, rho=2.0, validate_args=False)

    splits: list[tuple[float, float]] = []  # (forward, rest) of every call of `both`, in order

    def rest(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def both() -> None:
        start = time.perf_counter()
        loss = forward()
        middle = time.perf_counter()
        rest(loss)
        splits.append((middle - start, time.perf_counter() - middle))

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()  # each storage once, however many views are saved
        return t

    def saved_mib() -> float:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        rest(loss)
        return sum(saved.values()) / 2**20

    return {"both": both, "splits": splits, "saved": saved_mib}


def split_timings(splits: list[tuple[float, float]], warmup: int, rounds: int, repeats: int) -> list[list[float]]:
    """Per-round medians of the forward and of the rest of the step, from the runs ``interleave`` made."""
    timed = splits[warmup:]
    assert len(timed) == rounds * repeats
    out: list[list[float]] = [[], []]
    for r in range(rounds):
        chunk = timed[r * repeats : (r + 1) * repeats]
        for i in (0, 1):
            out[i].append(statistics.median(c[i] for c in chunk))
    return out


def measure(setting: Setting, rounds: int, repeats: int) -> list[dict[str, Any]]:
    parts = {v: _parts(setting, v) for v in VARIANTS}
    warmup = 2
    both = interleave({v: p["both"] for v, p in parts.items()}, rounds=rounds, repeats=repeats, warmup=warmup)
    fwd, bwd = {}, {}
    for v, p in parts.items():
        f, b = split_timings(p["splits"], warmup, rounds, repeats)
        fwd[v], bwd[v] = Timing(v, f), Timing(v, b)
    saved = {v: p["saved"]() for v, p in parts.items()}
    rows = []
    for v, label in VARIANTS.items():
        row: dict[str, Any] = {"setting": setting.name, "tokens": f"{setting.batch}×{setting.length}", "variant": label}
        for part, t in (("both", both), ("forward", fwd), ("backward", bwd)):
            row[f"{part} (ms)"] = 1e3 * t[v].median
            row[f"{part} ratio"] = f"{t[v].over(t['fixed']):.3f}"
        row["saved MiB"] = saved[v]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the job's LM only, a few rounds (under 30 s)")
    args = parser.parse_args()
    started = time.perf_counter()
    settings = SETTINGS[:1] if args.quick else SETTINGS
    rounds = 3 if args.quick else args.rounds
    rows = []
    for setting in settings:
        rows += measure(setting, rounds, args.repeats)
        print(markdown_table(rows[-len(VARIANTS) :], list(rows[0])), flush=True)
    # The module's own work (batch unpacking, token count, checks, τ statistics and logging) apart from the models:
    # the module against the hand-written TempNet + DRO step on a tiny LM, where the models cost next to nothing.
    tiny = Setting("tiny", 1, 32, 512, 2, 16, 16)
    own = {v: _parts(tiny, v)["both"] for v in ("factorised", "module")}
    own_t = interleave(own, rounds=rounds, repeats=20, warmup=5)
    extra_ms = [1e3 * (a - b) for a, b in zip(own_t["module"].times_s, own_t["factorised"].times_s)]
    own_rows = []
    for row in rows:
        if row["variant"] == VARIANTS["fixed"]:
            own_rows.append(
                {
                    "setting": row["setting"],
                    "module's own work (ms), median (min–max)": spread(extra_ms, ".2f"),
                    "as a share of the floor step": spread([e / row["both (ms)"] for e in extra_ms], ".4f"),
                }
            )
    own_table = "\n".join(
        [
            "",
            "The module's own work per step (batch unpacking, token count, value checks, τ statistics and logging): "
            f"TempNetModule minus the hand-written TempNet + DRO step on a tiny LM (1×32, V = 512, 2×16 tokens: "
            f"{1e3 * own_t['factorised'].median:.1f} ms and {1e3 * own_t['module'].median:.1f} ms a step):",
            "",
            markdown_table(own_rows, list(own_rows[0])),
        ]
    )
    bound_rows = [
        {
            "setting": st.name,
            "TempNet GEMMs (G MAC)": _tempnet_macs(st) / 1e9,
            "model step GEMMs (G MAC)": _model_macs(st) / 1e9,
            "share": f"{_tempnet_macs(st) / _model_macs(st):.3f}",
        }
        for st in settings
    ]
    bound_table = "\n".join(
        [
            "",
            "What bounds TempNet's share: the multiply-adds of its matrix products (the factorised first layer's "
            "W₁·W_o forward and ∂W₁ = ∂M·W_oᵀ backward, 2·H·V·d, which no exact implementation avoids since W₁ is a "
            "dense H × V parameter; plus the per-token layers) against those of the model's step (forward and "
            "backward, about 3× the forward), counted analytically:",
            "",
            markdown_table(bound_rows, list(bound_rows[0])),
        ]
    )
    columns = ["setting", "tokens", "variant"]
    columns += [f"{part} {what}" for part in ("both", "forward", "backward") for what in ("(ms)", "ratio")]
    columns += ["saved MiB"]
    memory = ""
    if not args.quick:
        mem_rows = []
        for setting in settings:
            params = setting._asdict()
            cases = {v: {"variant": v, **params} for v in ("fixed", "module")}
            m = interleave_cases(__file__, "setup", cases, rounds=1, repeats=1, timeout=300)
            for v in cases:
                mem_rows.append(
                    {
                        "setting": setting.name,
                        "variant": VARIANTS[v],
                        "peak MiB": m[v].peak_mib if m[v].ok else m[v].error,
                        "ratio to floor": f"{m[v].peak_mib / m['fixed'].peak_mib:.3f}" if m[v].ok else "n/a",
                    }
                )
        memory = "\n".join(
            [
                "",
                "Peak resident memory of the first step above the set-up model (one fresh process per case):",
                "",
                markdown_table(mem_rows, list(mem_rows[0])),
            ]
        )
    text = "\n".join(
        [
            "# TempNet + KL-DRO vs fixed-τ cross-entropy: one LM training step",
            "",
            f"Machine: {machine_description()}.",
            "",
            f"{rounds} interleaved rounds × {args.repeats} runs; ratios to the fixed-τ floor of the same round, "
            "`median (min–max)`. Target: TempNetModule ≤ 1.10× the floor.",
            "",
            markdown_table(rows, columns),
            own_table,
            bound_table,
            memory,
            "",
            f"Took {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(text)
    write_result("temperature_quick" if args.quick else "temperature", text)


if __name__ == "__main__":
    main()

"""Training-step overhead of ``DistillationMixin`` against the same KD written inline, and teacher-caching speed-up.

Both modules train the same student (ConvNet width 8) from the same weights on the same MNIST-shaped batches
(128 × 1 × 28 × 28) with the same teacher (ConvNet width 32), loss (0.1·CE + 0.9·KD at T = 4) and optimizer (SGD,
momentum 0.9). The floor is the inline KD step: the teacher frozen by hand, its forward under ``no_grad``, one
``F.kl_div`` on the two log-softmaxes. Every step runs ``training_step`` (with a Trainer attached, as in a fit),
``backward`` and the optimizer step, interleaved in one process (``benchmarks/_harness.py``); ``forward``
(``training_step``) and ``backward`` (backward, optimizer step, ``zero_grad``) are the two parts of the same runs.

Both run the teacher before the student, as the inline form naturally does: the order is the user's, not the
mixin's, and on this CPU running the teacher while the student's graph is alive costs about 2–3 % more in either
form (a mixin step written student-first against a teacher-first inline step reads 1.02–1.03× from that alone).

A third table measures the mixin's own work per step apart from the models (a linear student and teacher), and a
last one times the mixin with teacher outputs cached by sample index (every sample already cached) against the
teacher run every step, and against the floor of a cached step (the student alone with the stored logits).

Run: ``python benchmarks/distillation_overhead.py [--rounds 40] [--repeats 3] [--quick]``; writes
``benchmarks/results/distillation_overhead.md`` (``distillation_overhead_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _harness import Spread, Timing, attach_trainer, interleave, machine_description, markdown_table, write_result

from lightning_losses import DistillationMixin, KDLoss
from lightning_losses.demos import ConvNet

BATCH = 128


class InlineKD(pl.LightningModule):
    """KD as users write it by hand: the teacher an attribute frozen by hand."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        kd = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True)
        return 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * kd

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9)


class CachedInlineKD(InlineKD):
    """The floor of a cached step: the student alone, the teacher's logits read from a table by index."""

    def __init__(self, student: torch.nn.Module, teacher_logits: torch.Tensor) -> None:
        super().__init__(student, torch.nn.Identity())
        self.stored = teacher_logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        t = self.stored[index]
        s = self.student(x)
        kd = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True)
        return 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * kd


class MixinKD(DistillationMixin, pl.LightningModule):
    """The same with the mixin and its helpers."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, cache: bool = False) -> None:
        super().__init__()
        self.student = student
        self.configure_distillation(teacher, loss=KDLoss(temperature=4.0, weight=0.9), cache_teacher_outputs=cache)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        t = self.teacher_forward(x, index=index)  # teacher first, as in InlineKD (see the module docstring)
        s = self.student(x)
        return 0.1 * F.cross_entropy(s, y) + self.distillation_loss(s, t)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no Trainer banner per module


def _steps(module: pl.LightningModule, batches: list[Any]) -> tuple[Callable[[], None], list[tuple[float, float]]]:
    """The whole step of ``module`` over ``batches``, and the (forward, rest) times of each of its calls."""
    attach_trainer(module, training_state=False)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer)
    splits: list[tuple[float, float]] = []
    count = [0]

    def step() -> None:
        i = count[0] = (count[0] + 1) % len(batches)
        start = time.perf_counter()
        loss = module.training_step(batches[i], i)
        middle = time.perf_counter()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        splits.append((middle - start, time.perf_counter() - middle))

    return step, splits


def _split(splits: list[tuple[float, float]], warmup: int, rounds: int, repeats: int) -> tuple[Timing, Timing]:
    """Per-round medians of the forward and of the rest of the step, from the runs ``interleave`` made."""
    timed = splits[warmup:]
    assert len(timed) == rounds * repeats
    parts: list[list[float]] = [[], []]
    for r in range(rounds):
        chunk = timed[r * repeats : (r + 1) * repeats]
        for i in (0, 1):
            parts[i].append(statistics.median(c[i] for c in chunk))
    return Timing("forward", parts[0]), Timing("backward", parts[1])


def _data(n_batches: int) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n_batches):
        x = torch.randn(BATCH, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (BATCH,), generator=g)
        batches.append((x, y, torch.arange(b * BATCH, (b + 1) * BATCH)))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few rounds, as a smoke test (under 30 s)")
    args = parser.parse_args()
    rounds, repeats = (4, 2) if args.quick else (args.rounds, args.repeats)
    torch.manual_seed(0)
    teacher = ConvNet(width=32).eval()
    init = ConvNet(width=8).state_dict()

    def student() -> ConvNet:
        net = ConvNet(width=8)
        net.load_state_dict(init)
        return net

    batches = _data(8)
    started = time.perf_counter()
    warmup = 2
    (inline, inline_splits), (mixin, mixin_splits) = (
        _steps(InlineKD(student(), teacher), batches),
        _steps(MixinKD(student(), teacher), batches),
    )
    both = interleave({"inline": inline, "mixin": mixin}, rounds=rounds, repeats=repeats, warmup=warmup)
    fwd, bwd = {}, {}
    for name, splits in (("inline", inline_splits), ("mixin", mixin_splits)):
        fwd[name], bwd[name] = _split(splits, warmup, rounds, repeats)

    def row(part: str, t: dict[str, Timing]) -> dict[str, Any]:
        return {
            "part": part,
            "floor: inline KD (ms)": 1e3 * t["inline"].median,
            "DistillationMixin (ms)": 1e3 * t["mixin"].median,
            "ratio to floor, median (min–max)": f"{t['mixin'].over(t['inline']):.3f}",
            "extra (ms)": f"{Spread([1e3 * (a - b) for a, b in zip(t['mixin'].times_s, t['inline'].times_s)]):.2f}",
        }

    rows = [row("whole step", both), row("forward (training_step)", fwd), row("backward + optimizer step", bwd)]
    columns = list(rows[0])
    table = markdown_table(rows, columns)

    # teacher-output caching: every sample is cached after one pass
    cached_mixin = MixinKD(student(), teacher, cache=True)
    with torch.no_grad():
        for x, _, index in batches:
            cached_mixin.teacher_forward(x, index=index)
    stored = torch.cat([teacher(x).detach() for x, _, _ in batches])
    c = interleave(
        {
            "floor": _steps(CachedInlineKD(student(), stored), batches)[0],
            "cached": _steps(cached_mixin, batches)[0],
            "plain": _steps(MixinKD(student(), teacher), batches)[0],
        },
        rounds=max(3, rounds // 3),
        repeats=repeats,
        warmup=2,
    )
    cache_rows = [
        {
            "step": "teacher every step (mixin)",
            "ms": 1e3 * c["plain"].median,
            "ratio to cached floor": f"{c['plain'].over(c['floor']):.2f}",
        },
        {
            "step": "teacher outputs cached by index (mixin)",
            "ms": 1e3 * c["cached"].median,
            "ratio to cached floor": f"{c['cached'].over(c['floor']):.2f}",
        },
        {
            "step": "floor: student alone, stored logits (inline)",
            "ms": 1e3 * c["floor"].median,
            "ratio to cached floor": "1.00",
        },
    ]
    cache_table = markdown_table(cache_rows, list(cache_rows[0]))

    # The mixin's own work, free of the models' noise: the same two modules on a linear student and teacher.
    def linear() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))

    own = interleave(
        {
            "inline": _steps(InlineKD(linear(), linear()), batches)[0],
            "mixin": _steps(MixinKD(linear(), linear()), batches)[0],
        },
        rounds=rounds,
        repeats=10 * repeats,
        warmup=5,
    )
    extra_us = Spread([1e6 * (a - b) for a, b in zip(own["mixin"].times_s, own["inline"].times_s)])
    share = Spread([v / 1e6 / both["inline"].median for v in extra_us.values])
    own_rows = [
        {
            "linear inline step (µs)": 1e6 * own["inline"].median,
            "linear mixin step (µs)": 1e6 * own["mixin"].median,
            "mixin's own work (µs), median (min–max)": f"{extra_us:.0f}",
            "as a share of the ConvNet floor step": f"{share:.4f}",
        }
    ]
    own_table = markdown_table(own_rows, list(own_rows[0]))
    elapsed = time.perf_counter() - started
    text = "\n".join(
        [
            "# Distillation overhead",
            "",
            f"Machine: {machine_description()}.",
            "",
            f"Teacher ConvNet width 32, student width 8, batch {BATCH}, loss 0.1·CE + 0.9·KD (T = 4), SGD. "
            f"{rounds} interleaved rounds × {repeats} runs (each round's time the median of its runs); ratios per "
            "round, `median (min–max)`. Target: the mixin ≤ 1.02× the inline floor.",
            "",
            table,
            "",
            "The mixin's own work per step (teacher resolution, loss call, checks): the same modules with a linear "
            "student and teacher (784 → 10), so that the difference is not drowned by the ConvNets' noise:",
            "",
            own_table,
            "",
            "Teacher outputs cached by sample index (all samples cached), whole step:",
            "",
            cache_table,
            "",
            f"Took {elapsed:.0f} s.",
        ]
    )
    print(text)
    write_result("distillation_overhead_quick" if args.quick else "distillation_overhead", text)


if __name__ == "__main__":
    main()

"""``lightning-losses temperature``: adaptive temperatures on Shakespeare and robust losses on noisy MNIST 5k.

1. A small GPT-2-style model trained on the plays with a fixed τ = 1 (plain cross-entropy) and with TempNet + the
   KL-DRO loss (joint training, TempNet in its own parameter group): held-out perplexity and τ statistics.
2. TempNet trained alone on the frozen τ = 1 model.
3. CE vs LDR-KL vs ALDR-KL on MNIST 5k with 0 %, 20 % and 40 % symmetric label noise: clean test accuracy.

Everything runs offline on the embedded data; ``--quick`` is a smoke run of well under a minute once the tokenizer
is cached.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lightning_losses.demos import ConvNet, symmetric_label_noise
from lightning_losses.jobs.common import ResultsTable, TimeSplit, make_trainer, quiet_lightning, report
from lightning_losses.losses.temperature import ALDRKLLoss, LDRKLLoss
from lightning_losses.modules.classification import ClassificationModule
from lightning_losses.utilities.checks import check_choice

__all__ = ["NoisyLabelClassifier", "add_arguments", "run", "symmetric_label_noise"]

LossName = Literal["ce", "ldr_kl", "aldr_kl"]
# TempNet's official LLM recipe trains TempNet at lr 2e-6 for 50 k iterations (V = 50 k, ρ = 8) and evaluates at τ = 1.
OFFICIAL_TEMPNET_LR = 2e-6


def _robust_loss(loss: LossName, num_samples: int, lam: float, lam0: float, alpha: float, margin: float) -> Any:
    check_choice("loss", loss, ("ce", "ldr_kl", "aldr_kl"))
    if loss == "ldr_kl":
        return LDRKLLoss(lam=lam, margin=margin)
    if loss == "aldr_kl":
        return ALDRKLLoss(num_samples, lam0=lam0, alpha=alpha, margin=margin)
    return None  # cross-entropy


def _num_outputs(model: torch.nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("Cannot infer the number of classes of a model without an nn.Linear: pass `num_classes`.")
    return linears[-1].out_features


class NoisyLabelClassifier(ClassificationModule):
    """:class:`~lightning_losses.ClassificationModule` with CE, LDR-KL or ALDR-KL (per-sample λ by dataset index)
    and Adam at a constant learning rate: the classifier of the noisy-label part of the job.

    ``num_classes`` defaults to the width of the model's last linear layer.

    Example:
        >>> module = NoisyLabelClassifier(torch.nn.Linear(4, 3), loss="aldr_kl", num_samples=10)
        >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5))
        >>> bool(torch.isfinite(module.training_step(batch, 0)))
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossName = "ce",
        num_samples: int = 5000,
        lr: float = 1e-3,
        lam: float = 1.0,
        lam0: float = 10.0,
        alpha: float = 2.0,
        margin: float = 0.1,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            model,
            loss=_robust_loss(loss, num_samples, lam, lam0, alpha, margin),
            num_classes=_num_outputs(model) if num_classes is None else num_classes,
            optimizer="adam",
            lr=lr,
            weight_decay=0.0,
            scheduler="none",
        )
        self.loss_name = loss

    @property
    def aldr(self) -> ALDRKLLoss:
        """The ALDR-KL loss (with its per-sample λ) of a ``loss="aldr_kl"`` classifier."""
        if not isinstance(self.loss, ALDRKLLoss):
            raise AttributeError(f"This classifier trains with {self.loss_name!r}, not 'aldr_kl'.")
        return self.loss


@torch.no_grad()
def _accuracy(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    for x, y, _ in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def _lm_part(args: argparse.Namespace, out: Path) -> ResultsTable:
    from lightning_losses.data.shakespeare import ShakespeareDataModule
    from lightning_losses.demos import CausalLMModule, build_gpt2
    from lightning_losses.modules.temperature import TempNetModule

    quick = args.quick
    block_size, batch_size = (64, 8) if quick else (args.block_size, args.batch_size)
    dm = ShakespeareDataModule(
        block_size=block_size,
        batch_size=batch_size,
        vocab_size=args.vocab_size,
        plays=["The Tempest", "Macbeth"] if quick else None,
        seed=args.seed,
        cache_dir=str(Path(args.output) / "cache"),
    )
    dm.setup()
    layers, width = (2, 64) if quick else (args.n_layer, args.n_embd)
    steps, frozen_steps = (12, 8) if quick else (args.lm_steps, args.frozen_steps)
    val_batches = 4 if quick else args.val_batches
    log_v = math.log(args.vocab_size)
    rho = args.rho if args.rho is not None else max(0.5, log_v - 2.5)
    frozen_rho = args.frozen_rho if args.frozen_rho is not None else max(0.5, log_v - 4.2)
    tempnet_kwargs: dict[str, Any] = dict(
        num_classes=args.vocab_size,
        task="causal_lm",
        tau_min=0.5,
        tau_max=5.0,
        hidden_dim=128,
        lr=args.lr,
        tempnet_lr=args.tempnet_lr,
    )
    table = ResultsTable(
        "Shakespeare LM: fixed temperature vs TempNet + KL-DRO",
        ["method", "steps", "val ppl (τ=1)", "val ppl (at its τ)", "τ mean", "τ min", "τ max", "s/step"],
        formats={
            "val ppl (τ=1)": ".2f",
            "val ppl (at its τ)": ".2f",
            "τ mean": ".3f",
            "τ min": ".3f",
            "τ max": ".3f",
            "s/step": ".3f",
        },
    )

    def fit(module: pl.LightningModule, n_steps: int) -> tuple[dict[str, float], float]:
        pl.seed_everything(args.seed, verbose=False)
        trainer = make_trainer(
            max_epochs=-1, max_steps=n_steps, progress=False, limit_val_batches=0, num_sanity_val_steps=0
        )
        start = time.perf_counter()
        trainer.fit(module, dm.train_dataloader())
        per_step = (time.perf_counter() - start) / max(n_steps, 1)
        evaluator = make_trainer(max_epochs=1, progress=False, limit_val_batches=val_batches or None)
        evaluator.validate(module, dm.val_dataloader(), verbose=False)
        return {k: float(v) for k, v in evaluator.callback_metrics.items()}, per_step

    def row(name: str, n_steps: int, metrics: dict[str, float], per_step: float) -> None:
        table.add(
            method=name,
            steps=n_steps,
            **{
                "val ppl (τ=1)": metrics.get("val/ppl"),
                "val ppl (at its τ)": metrics.get("val/ppl_tempnet"),
                "τ mean": metrics.get("val/tau_mean"),
                "τ min": metrics.get("val/tau_min"),
                "τ max": metrics.get("val/tau_max"),
                "s/step": per_step,
            },
        )

    model_kwargs = dict(n_layer=layers, n_embd=width, n_head=4, block_size=block_size, seed=args.seed)
    baseline = CausalLMModule(build_gpt2(args.vocab_size, **model_kwargs), lr=args.lr)
    metrics, per_step = fit(baseline, steps)
    row("fixed τ = 1 (cross-entropy)", steps, metrics, per_step)

    joint = TempNetModule(build_gpt2(args.vocab_size, **model_kwargs), rho=rho, **tempnet_kwargs)
    metrics, per_step = fit(joint, steps)
    row(f"TempNet + DRO, joint (ρ={rho:.2f})", steps, metrics, per_step)
    # The control: the same training at TempNet's mean τ held fixed. DRO at a constant τ is τ·CE(z/τ, y) plus a
    # constant, which Adam follows as CE(z/τ, y): what training at a large τ alone costs, without the adaptivity.
    tau_mean = metrics.get("val/tau_mean", 1.0)
    control = CausalLMModule(build_gpt2(args.vocab_size, **model_kwargs), lr=args.lr, temperature=tau_mean)
    metrics, per_step = fit(control, steps)
    # its validation divides the logits by its own τ: that perplexity belongs in the "at its τ" column
    metrics = {"val/ppl_tempnet": metrics["val/ppl"], "val/tau_mean": tau_mean, "val/tau_min": tau_mean}
    metrics["val/tau_max"] = tau_mean
    row(f"control: fixed τ = {tau_mean:.2f} (TempNet's mean τ)", steps, metrics, per_step)
    if not quick:  # TempNet's own regime: TempNet lr 2e-6 (its code trains 50 k iterations at it)
        official_kwargs = {**tempnet_kwargs, "tempnet_lr": OFFICIAL_TEMPNET_LR}
        official = TempNetModule(build_gpt2(args.vocab_size, **model_kwargs), rho=rho, **official_kwargs)
        metrics, per_step = fit(official, steps)
        row(f"TempNet + DRO, joint, TempNet lr {OFFICIAL_TEMPNET_LR:g}", steps, metrics, per_step)

    frozen = TempNetModule(
        copy.deepcopy(baseline.model),
        rho=frozen_rho,
        train_base=False,
        **{**tempnet_kwargs, "tempnet_lr": args.frozen_tempnet_lr},
    )
    metrics, per_step = fit(frozen, frozen_steps)
    row(f"TempNet on the frozen τ = 1 model (ρ={frozen_rho:.2f})", frozen_steps, metrics, per_step)
    return table


# ALDR-KL's λ lies in [λ0(1 - 1/α), λ0]; with rescaled logits and λ0 = 10 the optimum sits at the top of that
# range for 10 classes (λ cannot go below 9.84), so no adaptivity can show. The paper's grid of λ0 lets it.
ALDR_LAMBDA0_GRID = (0.1, 1.0, 10.0)
ALDR_ALPHA = 2.0


def _spread(values: torch.Tensor) -> str:
    mean, std, low, high = (float(v) for v in (values.mean(), values.std(), values.min(), values.max()))
    return f"{mean:.3g} ± {std:.2g} [{low:.3g}, {high:.3g}]"


def _mnist_part(args: argparse.Namespace) -> tuple[ResultsTable, ResultsTable]:
    from lightning_losses.data.vision import MNIST5kDataModule

    dm = MNIST5kDataModule(batch_size=128, seed=args.seed, train_subset=500 if args.quick else None)
    dm.setup()
    train = dm.dataset("train")
    clean = train.targets.clone()
    epochs = 1 if args.quick else args.mnist_epochs
    rates = [0.0, 0.2, 0.4]
    columns = [f"{int(100 * r)} % noise" for r in rates]
    grid = (1.0,) if args.quick else ALDR_LAMBDA0_GRID
    losses: dict[str, tuple[LossName, float]] = {"cross-entropy": ("ce", 10.0), "LDR-KL (λ=1)": ("ldr_kl", 10.0)}
    losses.update({f"ALDR-KL (λ0={lam0:g}, α=2)": ("aldr_kl", lam0) for lam0 in grid})
    accuracy = ResultsTable(
        "MNIST 5k with symmetric label noise: clean test accuracy (%)",
        ["loss", *columns],
        formats=dict.fromkeys(columns, ".2f"),
    )
    spread = ResultsTable(
        "ALDR-KL: final per-sample λ on the training samples (mean ± std [min, max])",
        ["λ0", "range of λ", *columns],
    )
    results: dict[str, dict[str, float]] = {label: {} for label in losses}
    lambdas: dict[float, dict[str, str]] = {lam0: {} for lam0 in grid}
    for rate, column in zip(rates, columns):
        train.targets = symmetric_label_noise(clean, rate, 10, seed=args.seed)
        for label, (name, lam0) in losses.items():
            pl.seed_everything(args.seed, verbose=False)
            net = ConvNet(width=16, num_classes=10)
            module = NoisyLabelClassifier(net, loss=name, num_samples=5000, lr=2e-3, lam0=lam0, alpha=ALDR_ALPHA)
            make_trainer(epochs, progress=False, num_sanity_val_steps=0, limit_val_batches=0).fit(
                module, dm.train_dataloader()
            )
            results[label][column] = 100 * _accuracy(net, dm.test_dataloader())
            if name == "aldr_kl":
                lambdas[lam0][column] = _spread(module.aldr.lambdas[train.indices])
    train.targets = clean
    for label, scores in results.items():
        accuracy.add(loss=label, **scores)
    for lam0, spreads in lambdas.items():
        spread.add(**{"λ0": f"{lam0:g}", "range of λ": f"[{lam0 * (1 - 1 / ALDR_ALPHA):g}, {lam0:g}]"}, **spreads)
    return accuracy, spread


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``temperature`` subcommand."""
    parser.add_argument("--quick", action="store_true", help="a smoke run (2 plays, tiny model, 1 epoch)")
    parser.add_argument("--output", default="results/temperature", help="folder of the result tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-lm", action="store_true", help="skip the Shakespeare parts (1) and (2)")
    parser.add_argument("--skip-mnist", action="store_true", help="skip the noisy MNIST part (3)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--lm-steps", type=int, default=500)
    parser.add_argument("--frozen-steps", type=int, default=150)
    parser.add_argument("--val-batches", type=int, default=20, help="held-out batches to evaluate (0: all)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tempnet-lr", type=float, default=1e-3)
    parser.add_argument("--frozen-tempnet-lr", type=float, default=3e-2)
    parser.add_argument("--rho", type=float, default=None, help="KL radius of the joint run (default: log V - 2.5)")
    parser.add_argument(
        "--frozen-rho",
        type=float,
        default=None,
        help="KL radius of the frozen-base run (default: log V - 4.2, the entropy of the τ = 1 model's predictions)",
    )
    parser.add_argument("--mnist-epochs", type=int, default=6)


def run(args: argparse.Namespace) -> int:
    """Run the job and write ``lm.md`` / ``mnist.md`` (and JSON) under ``--output``."""
    split = TimeSplit()
    out = Path(args.output)
    torch.set_float32_matmul_precision("high")
    parts: list[tuple[ResultsTable, str, str]] = []
    with quiet_lightning():
        if not args.skip_lm:
            note = (
                "Validation = held-out tails of the plays; ppl (at its τ) divides the logits by the τ the model was "
                "trained with (TempNet's per token, the control's fixed one); ppl (τ = 1) is TempNet's own protocol."
            )
            with split.phase("language model (TempNet, fixed-τ control)"):
                parts.append((_lm_part(args, out), "lm", note))
        if not args.skip_mnist:
            with split.phase("MNIST (LDR-KL, ALDR-KL)"):
                accuracy, spread = _mnist_part(args)
            parts.append((accuracy, "mnist", "Training labels corrupted; test labels clean."))
            note = (
                "λ0 from the paper's grid: with λ0 = 10 the per-sample λ cannot leave the top of its range for 10 "
                "classes, with λ0 = 0.1 or 1 it adapts to each sample's loss."
            )
            parts.append((spread, "mnist_lambda", note))
    for i, (table, stem, note) in enumerate(parts):
        path = table.write(out, stem, preamble=note)
        print(f"\n## {table.title}" if i else f"## {table.title}")
        report(table, note, [path, path.with_suffix(".json")], split if i == len(parts) - 1 else None)
    return 0

"""Forget one MNIST digit (or a random set of samples) from a CNN: GA, GradDiff, NPO, NPO-KL and Blindspot against
the original model and the "gold" model retrained without the forget set.

    python examples/unlearning/classification.py                  # forget the digit 0 of MNIST 5k
    python examples/unlearning/classification.py --forget random  # forget 10 % of the training samples
    python examples/unlearning/classification.py --quick          # scikit-learn digits, small CNN: seconds

The script trains the original CNN on the whole training split, the gold model on the retain split only (what
unlearning should approach), and the blindspot model (a fresh CNN trained for a few steps on the retain split);
each method then unlearns a copy of the original with ``ClassificationUnlearningModule`` on forget and retain
batches combined per step. One table: accuracy on the forget / retain / test samples (the test samples of the
retained classes when a class is forgotten), the loss-based membership-inference AUC of the forget samples against
held-out test samples drawn alike, and the forget quality (KS-test p-value of the per-sample forget losses against
the gold model's; 1: indistinguishable from retraining).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_losses import ClassificationUnlearningModule, evaluate_classification_unlearning, train_classifier
from lightning_losses.data import ClassificationUnlearningDataModule
from lightning_losses.demos import ConvNet

METHODS = ("ga", "graddiff", "npo", "npo_kl", "blindspot")
#: Adam learning rate of every method, by data set (MNIST has 3× the forget samples, so 3× the steps per epoch),
#: and the epochs (passes over the forget set)
LR, EPOCHS = {"digits": 5e-4, "mnist": 3e-4}, 2
LAYERS = ("backbone.2", "backbone.6")  # the two convolution blocks' activations (attention transfer)
COLUMNS = ("forget_acc", "retain_acc", "test_acc", "mia_auc", "forget_quality")


def unlearn(method: str, original: torch.nn.Module, datamodule: ClassificationUnlearningDataModule, **kwargs: Any):
    """Unlearn a copy of ``original`` with ``method``; return the unlearned model."""
    lr = LR[datamodule.dataset_name]
    module = ClassificationUnlearningModule(copy.deepcopy(original), loss=method, lr=lr, **kwargs)
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)  # no per-run banner lines
    with warnings.catch_warnings():
        # the frozen reference is in eval mode on purpose; the tiny data sets need no loader workers
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*|.*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer = pl.Trainer(
            max_epochs=EPOCHS,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            limit_val_batches=0,
        )
        try:
            trainer.fit(module, datamodule=datamodule)
        finally:
            lightning_logger.setLevel(level)
    return module.model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scikit-learn digits instead of MNIST 5k")
    parser.add_argument("--forget", default="class", choices=("class", "random"))
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="any of CLASSIFICATION_UNLEARNING_METHODS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset, width, epochs, blindspot_steps = ("digits", 8, 8, 10) if args.quick else ("mnist", 8, 5, 30)
    start = time.perf_counter()

    pl.seed_everything(args.seed, verbose=False)
    datamodule = ClassificationUnlearningDataModule(
        dataset, forget=args.forget, forget_class=args.forget_class, batch_size=32 if args.quick else 64, seed=args.seed
    )
    datamodule.setup()
    loaders = {name: datamodule.dataloader(name) for name in ("forget", "retain", "test", "heldout")}

    def fresh(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return ConvNet(width=width)

    # the original (all training data), the gold model (retain data only) and the blindspot model (a few steps)
    original = train_classifier(fresh(args.seed), datamodule.dataloader("train", shuffle=True), epochs=epochs, lr=3e-3)
    gold = train_classifier(fresh(args.seed), datamodule.dataloader("retain", shuffle=True), epochs=epochs, lr=3e-3)
    blindspot = train_classifier(
        fresh(args.seed + 1), datamodule.dataloader("retain", shuffle=True), max_steps=blindspot_steps, lr=3e-3
    )
    gold_result = evaluate_classification_unlearning(gold, loaders)
    gold_losses, gold_mia = gold_result["forget_losses"], gold_result["mia_auc"]

    results: dict[str, dict[str, float]] = {}
    results["original"] = evaluate_classification_unlearning(original, loaders, gold_losses, gold_mia)
    results["gold (retrained)"] = evaluate_classification_unlearning(gold, loaders, gold_losses, gold_mia)
    for method in args.methods:
        extra = dict(blindspot_model=blindspot, blindspot_layers=LAYERS) if method == "blindspot" else {}
        model = unlearn(method, original, datamodule, **extra)
        results[method] = evaluate_classification_unlearning(model, loaders, gold_losses, gold_mia)
    results = {name: {k: float(r[k]) for k in (*COLUMNS, "mia_gap") if k in r} for name, r in results.items()}

    what = f"digit {args.forget_class}" if args.forget == "class" else f"{len(datamodule.dataset('forget'))} samples"
    name = "MNIST 5k" if dataset == "mnist" else "scikit-learn digits"
    print(f"Forgetting {what} of {name} ({time.perf_counter() - start:.0f} s)")
    header = ["method", "forget acc", "retain acc", "test acc", "MIA AUC", "forget quality"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, r in results.items():
        cells = [f"{100 * r[k]:.1f}" for k in COLUMNS[:3]] + [f"{r['mia_auc']:.3f}", f"{r['forget_quality']:.2g}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()

"""Train a CNN with a calibration loss, then fit temperature scaling on the validation split.

    python examples/calibration/train.py                 # MNIST 5k, MDCA loss, 10 epochs
    python examples/calibration/train.py --loss focal    # focal loss (γ = 3) instead
    python examples/calibration/train.py --quick         # scikit-learn digits, 2 epochs: a few seconds

``ClassificationModule`` takes any classification loss; ``PostHocCalibration`` fits the calibrator after training
and calibrates every later test / predict output (and the checkpoints); ``CalibrationMonitor`` logs ECE each
validation epoch. The same run through LightningCLI:

    lightning-losses lightning fit --config examples/calibration/config.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_losses import (
    CalibrationMonitor,
    ClassificationModule,
    FocalLoss,
    LabelSmoothingLoss,
    MDCALoss,
    PostHocCalibration,
)
from lightning_losses.demos import ConvNet, image_datamodule
from lightning_losses.functional import expected_calibration_error

LOSSES = {"mdca": MDCALoss, "focal": FocalLoss, "label_smoothing": LabelSmoothingLoss}


@torch.no_grad()
def _logits(module: pl.LightningModule, loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    pairs = [(module(x), y) for x, y, _ in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 2 epochs")
    parser.add_argument("--loss", default="mdca", choices=sorted(LOSSES))
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    datamodule = image_datamodule("digits" if args.quick else "mnist", batch_size=64)
    # SGD without weight decay at a constant rate: a setting that leaves plain cross-entropy over-confident
    module = ClassificationModule(
        ConvNet(width=8), loss=LOSSES[args.loss](), lr=0.1, weight_decay=0.0, scheduler="none"
    )
    calibration = PostHocCalibration("temperature")
    trainer = pl.Trainer(
        max_epochs=2 if args.quick else 10,
        callbacks=[calibration, CalibrationMonitor(num_classes=10)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)

    # the trainer's test outputs are calibrated; outside the Trainer the module returns the raw logits
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    logits, target = _logits(module, datamodule.test_dataloader())
    ece_raw = float(expected_calibration_error(logits, target, input_type="logits"))
    ece_calibrated = float(expected_calibration_error(calibration.calibrator(logits), target, input_type="logits"))
    temperature = float(calibration.calibrator.temperature)
    print(
        f"{type(module.loss).__name__}: test accuracy {100 * metrics['test/acc']:.2f} %, fitted T = {temperature:.3f}, "
        f"test ECE {100 * ece_raw:.2f} % -> {100 * ece_calibrated:.2f} % after temperature scaling"
    )
    return {"accuracy": float(metrics["test/acc"]), "temperature": temperature, **calibration.metrics}


if __name__ == "__main__":
    main()

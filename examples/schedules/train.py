"""Drive loss hyperparameters and the learning rate with schedules: focal loss whose γ decays as training goes.

    python examples/schedules/train.py           # MNIST 5k, 6 epochs
    python examples/schedules/train.py --quick   # scikit-learn digits, 2 epochs: a few seconds

Every loss hyperparameter is a named tensor of the LightningModule (``ClassificationModule`` keeps its loss at
``loss``, so focal loss's γ is ``"loss.gamma"``); ``HyperparameterSchedule`` sets it, and ``"lr"`` in every optimizer
param group, before each step, as a function of the step alone, so a resumed run continues exactly. Population
Based Training and Self-Tuning Networks drive the same names (``lightning-losses tune``). Through LightningCLI:

    lightning-losses lightning fit --config examples/schedules/config.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_losses import ClassificationModule, CosineSchedule, FocalLoss, HyperparameterSchedule, LinearSchedule
from lightning_losses.demos import ConvNet, image_datamodule


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 2 epochs")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else 6

    pl.seed_everything(0, verbose=False)
    datamodule = image_datamodule("digits" if args.quick else "mnist", batch_size=64)
    datamodule.setup("fit")
    steps = epochs * len(datamodule.train_dataloader())
    module = ClassificationModule(ConvNet(width=8), loss=FocalLoss(gamma=3.0), lr=0.05, scheduler="none")
    schedule = HyperparameterSchedule(
        {
            "loss.gamma": LinearSchedule(3.0, 0.0, duration=steps),  # focal γ from 3 down to 0 (cross-entropy)
            "lr": CosineSchedule(0.05, 0.0, duration=steps),
        }
    )
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[schedule], logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=datamodule)
    gamma = float(module.get_hyperparameter("loss.gamma"))
    lr = float(trainer.optimizers[0].param_groups[0]["lr"])
    accuracy = float(trainer.callback_metrics["val/acc"])
    print(
        f"after {trainer.global_step} steps: focal γ = {gamma:.3f}, lr = {lr:.4f}, val accuracy {100 * accuracy:.2f} %"
    )
    return {"gamma": gamma, "lr": lr, "steps": float(trainer.global_step), "total_steps": float(steps)}


if __name__ == "__main__":
    main()

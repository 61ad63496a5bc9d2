"""Distil a CNN teacher into a small student with DKD (or KD, DHKD, ND) on MNIST 5k.

    python examples/distillation/train.py            # MNIST 5k: teacher 5 epochs, student 8 epochs
    python examples/distillation/train.py --quick    # scikit-learn digits, a few epochs: seconds

The teacher is trained with ``ClassificationModule`` (cross-entropy) and saved to ``<output>/teacher.pt``, the file
``examples/distillation/config.yaml`` loads:

    lightning-losses lightning fit --config examples/distillation/config.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_losses import ClassificationModule, DistillationModule
from lightning_losses.demos import ConvNet, image_datamodule


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 3 teacher and 2 student epochs")
    parser.add_argument("--method", default="dkd", choices=["kd", "dkd", "nd", "dkd+nd"])
    parser.add_argument("--output", default="results/examples/distillation", help="folder of teacher.pt")
    args = parser.parse_args(argv)
    teacher_epochs, student_epochs = (3, 2) if args.quick else (5, 8)

    pl.seed_everything(0, verbose=False)
    datamodule = image_datamodule("digits" if args.quick else "mnist", batch_size=128)
    trainer_options = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)

    # 1. the teacher: a wider ConvNet trained with cross-entropy
    teacher = ConvNet(width=32)
    pl.Trainer(max_epochs=teacher_epochs, **trainer_options).fit(ClassificationModule(teacher), datamodule=datamodule)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), output / "teacher.pt")

    # 2. the student: a 4-wide ConvNet distilled with the paper's loss weights (warm-up shortened to one epoch)
    student = DistillationModule(
        ConvNet(width=4),
        teacher,
        method=args.method,
        num_classes=10,
        warmup_epochs=1,
        student_feature_dim=16,  # ND compares embeddings: ConvNet(width).feature_dim = 4 * width
        teacher_feature_dim=128,
        cache_teacher_outputs=True,  # the data modules give sample indices: each teacher output computed once
    )
    trainer = pl.Trainer(max_epochs=student_epochs, gradient_clip_val=5.0, **trainer_options)
    trainer.fit(student, datamodule=datamodule)
    student_acc = trainer.test(student, datamodule=datamodule, verbose=False)[0]["test/acc"]
    teacher_acc = trainer.test(ClassificationModule(teacher), datamodule=datamodule, verbose=False)[0]["test/acc"]
    print(f"teacher test accuracy {100 * teacher_acc:.2f} %, {args.method} student {100 * student_acc:.2f} %")
    print(f"teacher weights written to {output / 'teacher.pt'}")
    return {"teacher_acc": float(teacher_acc), "student_acc": float(student_acc)}


if __name__ == "__main__":
    main()

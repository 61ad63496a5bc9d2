"""LightningDataModules over the embedded real data (MNIST 5k, digits, Shakespeare plays)."""

from lightning_losses.data.shakespeare import (
    LMBlockDataset,
    ShakespeareDataModule,
    load_plays,
    plays_directory,
    shakespeare_tokenizer,
)
from lightning_losses.data.unlearning import PerturbedAnswers, UnlearningBatchCollator, UnlearningDataModule
from lightning_losses.data.vision import DigitsDataModule, IndexedTensorDataset, MNIST5kDataModule, load_image_dataset

__all__ = ["DigitsDataModule", "IndexedTensorDataset", "MNIST5kDataModule", "load_image_dataset"]
__all__ += ["LMBlockDataset", "ShakespeareDataModule", "load_plays", "plays_directory", "shakespeare_tokenizer"]
__all__ += ["PerturbedAnswers", "UnlearningBatchCollator", "UnlearningDataModule"]

"""LightningDataModules over the embedded real data (MNIST 5k, digits, Shakespeare plays)."""

from lightning_losses.data.shakespeare import (
    LMBlockDataset,
    ShakespeareDataModule,
    load_plays,
    play_exchanges,
    plays_directory,
    shakespeare_examples,
    shakespeare_hf_tokenizer,
    shakespeare_tokenizer,
)
from lightning_losses.data.text import TextCollator, TextDataModule, dataset_format, load_examples
from lightning_losses.data.unlearning import (
    PerturbedAnswers,
    TokenizedExamples,
    UnlearningBatchCollator,
    UnlearningDataModule,
)
from lightning_losses.data.unlearning_vision import ClassificationUnlearningDataModule, EpochShuffle
from lightning_losses.data.vision import DigitsDataModule, IndexedTensorDataset, MNIST5kDataModule, load_image_dataset

__all__ = ["DigitsDataModule", "IndexedTensorDataset", "MNIST5kDataModule", "load_image_dataset"]
__all__ += ["LMBlockDataset", "ShakespeareDataModule", "load_plays", "plays_directory", "shakespeare_tokenizer"]
__all__ += ["PerturbedAnswers", "UnlearningBatchCollator", "UnlearningDataModule"]
__all__ += ["TextCollator", "TextDataModule", "TokenizedExamples", "dataset_format", "load_examples"]
__all__ += ["play_exchanges", "shakespeare_examples", "shakespeare_hf_tokenizer"]
__all__ += ["ClassificationUnlearningDataModule", "EpochShuffle"]

"""Small synthetic datasets shared by the tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def three_class_data(n: int, seed: int) -> TensorDataset:
    """``n`` samples of 6 features and 3 classes (overlapping: a classifier is neither perfect nor at chance)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.7 * torch.randn(n, generator=g) > 0).long() + (x[:, 1] > 0.8).long()
    return TensorDataset(x, y)

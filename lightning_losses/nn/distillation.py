r"""Trainable blocks for knowledge distillation: a dual-head classifier, projectors and embedding heads.

* :class:`DualHeadClassifier` — dual-head KD: a main head trained with cross-entropy and an auxiliary head
  trained with the logit-level loss, both on the same backbone feature; inference uses the main head only.
* :class:`FeatureProjector` — ``BatchNorm1d → Dropout → Linear``, maps a student embedding to the teacher's width
  for the ND loss.
* :class:`HintRegressor` — FitNets' regressor: a 1×1 convolution (a linear map of the channels) with batch norm and
  ReLU, mapping a student hint to the teacher's channels.
* :class:`NormalizedEmbedding` — CRD's embedding head: ``Linear`` then L2 normalisation.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DualHeadClassifier", "DualHeadOutput", "FeatureProjector", "HintRegressor", "NormalizedEmbedding"]


class DualHeadOutput(NamedTuple):
    """What :meth:`DualHeadClassifier.forward_heads` returns.

    Attributes:
        logits: Main-head logits ``(N, C)`` (cross-entropy, inference).
        aux_logits: Auxiliary-head logits ``(N, C)`` (logit-level distillation loss).
        features: The shared backbone features ``(N, D)``.
    """

    logits: Tensor
    aux_logits: Tensor
    features: Tensor


def _positive_int_validation(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _dropout_validation(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`dropout` must lie in [0, 1), got {value}. Pass 0 to disable dropout.")


class DualHeadClassifier(nn.Module):
    r"""A backbone with two classification heads on the same feature (dual-head knowledge distillation).

    .. math::

        f = \mathrm{backbone}(x), \qquad z = W f + b \ (\texttt{fc}), \qquad
        z^{aux} = \texttt{fc\_aux}(f)

    The main head ``fc`` receives the cross-entropy (and any probability-level KD) loss; the auxiliary head
    ``fc_aux`` receives the logit-level loss (:class:`~lightning_losses.losses.BinaryKLLoss`). Splitting the
    classifier keeps the two losses from conflicting in one linear layer while both train the backbone. As in the
    official code (penghui-yang/DHKD), ``fc_aux`` is a ``Linear`` layer, or for ``auxiliary="mlp"``
    ``Linear(D, hidden) → Dropout → BatchNorm1d → ReLU → Linear(hidden, C)``.

    :meth:`forward` returns the main logits only, so the model drops into any classification pipeline;
    :meth:`forward_heads` returns both heads and the features from one backbone pass, and every parameter gets a
    gradient when both heads' losses are used (no unused parameters under DDP).

    Args:
        backbone: Module mapping inputs to features ``(N, feature_dim)`` (extra dimensions are flattened).
        feature_dim: Width ``D`` of the backbone features.
        num_classes: Number of classes ``C``.
        auxiliary: ``"linear"`` or ``"mlp"`` auxiliary head.
        hidden_dim: Hidden width of the ``"mlp"`` head (default 200).
        dropout: Dropout of the ``"mlp"`` head (default 0.1).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = DualHeadClassifier(nn.Flatten(), feature_dim=12, num_classes=3, auxiliary="mlp")
        >>> out = model.eval().forward_heads(torch.randn(2, 3, 4))
        >>> tuple(out.logits.shape), tuple(out.aux_logits.shape), tuple(out.features.shape)
        ((2, 3), (2, 3), (2, 12))
        >>> bool(torch.equal(model(torch.ones(2, 12)), model.forward_heads(torch.ones(2, 12)).logits))
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        auxiliary: Literal["linear", "mlp"] = "linear",
        hidden_dim: int = 200,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _positive_int_validation("feature_dim", feature_dim)
        _positive_int_validation("num_classes", num_classes)
        _positive_int_validation("hidden_dim", hidden_dim)
        _dropout_validation(dropout)
        if auxiliary not in ("linear", "mlp"):
            raise ValueError(f"`auxiliary` must be 'linear' or 'mlp', got {auxiliary!r}.")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.auxiliary = auxiliary
        self.fc = nn.Linear(feature_dim, num_classes)
        self.fc_aux: nn.Module
        if auxiliary == "linear":
            self.fc_aux = nn.Linear(feature_dim, num_classes)
        else:
            self.fc_aux = nn.Sequential(
                nn.Linear(feature_dim, hidden_dim),
                nn.Dropout(dropout),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(),
                nn.Linear(hidden_dim, num_classes),
            )

    def features(self, x: Tensor) -> Tensor:
        """Return the backbone features ``(N, feature_dim)``."""
        features = self.backbone(x)
        if features.ndim > 2:
            features = torch.flatten(features, 1)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"The backbone returned features of shape {tuple(features.shape)}, expected (N, {self.feature_dim}). "
                "Set `feature_dim` to the backbone's output width (after pooling)."
            )
        return features

    def forward(self, x: Tensor) -> Tensor:
        """Return the main-head logits (the auxiliary head is not evaluated)."""
        return self.fc(self.features(x))

    def forward_heads(self, x: Tensor) -> DualHeadOutput:
        """Return main logits, auxiliary logits and features from a single backbone pass."""
        features = self.features(x)
        return DualHeadOutput(self.fc(features), self.fc_aux(features), features)


class FeatureProjector(nn.Module):
    r"""Project student embeddings to the teacher's width: ``BatchNorm1d → Dropout → Linear``.

    .. math::

        g(f) = W\, \mathrm{Dropout}_p\big(\mathrm{BN}(f)\big) + b

    Used by the ND loss when student and teacher embeddings differ in width (official ND code, dropout 0.5).

    Args:
        in_features: Student embedding width.
        out_features: Teacher embedding width.
        dropout: Dropout probability in ``[0, 1)`` (default 0.5).

    Example:
        >>> import torch
        >>> proj = FeatureProjector(8, 16).eval()
        >>> tuple(proj(torch.randn(4, 8)).shape)
        (4, 16)
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.5) -> None:
        super().__init__()
        _positive_int_validation("in_features", in_features)
        _positive_int_validation("out_features", out_features)
        _dropout_validation(dropout)
        self.norm = nn.BatchNorm1d(in_features)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features: Tensor) -> Tensor:
        """Return the projected features ``(N, out_features)``."""
        if features.ndim != 2 or features.shape[1] != self.norm.num_features:
            raise ValueError(
                f"FeatureProjector expects features of shape (N, {self.norm.num_features}), "
                f"got {tuple(features.shape)}."
            )
        return self.linear(self.dropout(self.norm(features)))


class HintRegressor(nn.Module):
    r"""FitNets' regressor: map a student hint to the teacher's channel count (1×1 convolution → BN → ReLU).

    .. math::

        r(f)_{c} = \mathrm{ReLU}\Big(\mathrm{BN}\big(\textstyle\sum_{c'} W_{c c'} f_{c'} + b_c\big)\Big)

    The same weights act on embeddings ``(N, C)`` and on feature maps ``(N, C, *spatial)`` (a 1×1 convolution),
    as RepDistiller's ``ConvReg`` for hints of equal spatial size (``Conv2d → BatchNorm2d → ReLU``). Pass
    ``normalize=False, activation=False`` for a plain linear regressor (the teacher hint may be negative, e.g. taken
    before a ReLU).

    Args:
        in_channels: Student channels (or embedding width).
        out_channels: Teacher channels.
        normalize: Batch-normalise the regressed hint (default ``True``).
        activation: Apply a ReLU last (default ``True``).

    Example:
        >>> import torch
        >>> regressor = HintRegressor(4, 6).eval()
        >>> tuple(regressor(torch.randn(2, 4, 5, 5)).shape), tuple(regressor(torch.randn(2, 4)).shape)
        ((2, 6, 5, 5), (2, 6))
    """

    def __init__(self, in_channels: int, out_channels: int, normalize: bool = True, activation: bool = True) -> None:
        super().__init__()
        _positive_int_validation("in_channels", in_channels)
        _positive_int_validation("out_channels", out_channels)
        self.linear = nn.Linear(in_channels, out_channels)
        self.norm: nn.Module = nn.BatchNorm1d(out_channels) if normalize else nn.Identity()
        self.activation: nn.Module = nn.ReLU() if activation else nn.Identity()

    def forward(self, features: Tensor) -> Tensor:
        """Return the regressed hint, ``(N, out_channels, *spatial)``."""
        if features.ndim < 2 or features.shape[1] != self.linear.in_features:
            raise ValueError(
                f"HintRegressor expects features of shape (N, {self.linear.in_features}, ...), "
                f"got {tuple(features.shape)}. Set `in_channels` to the student hint's channel count."
            )
        shape = features.shape
        flat = features.reshape(shape[0], shape[1], -1)  # (N, C, L)
        out = self.linear(flat.transpose(1, 2)).transpose(1, 2)  # (N, C_out, L)
        out = self.activation(self.norm(out))
        return out.reshape(shape[0], -1, *shape[2:])


class NormalizedEmbedding(nn.Module):
    r"""CRD's embedding head: flatten, ``Linear``, L2-normalise.

    .. math::

        v = \frac{W \operatorname{flatten}(f) + b}{\lVert W \operatorname{flatten}(f) + b \rVert_2}

    The official ``Embed`` (HobbitLong/RepDistiller, ``crd/criterion.py``).

    Args:
        in_features: Width of the flattened input features.
        out_features: Embedding width (official 128).

    Example:
        >>> import torch
        >>> v = NormalizedEmbedding(12, 4)(torch.randn(3, 3, 2, 2))
        >>> tuple(v.shape), bool(torch.allclose(v.norm(dim=1), torch.ones(3)))
        ((3, 4), True)
    """

    def __init__(self, in_features: int, out_features: int = 128) -> None:
        super().__init__()
        _positive_int_validation("in_features", in_features)
        _positive_int_validation("out_features", out_features)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features: Tensor) -> Tensor:
        """Return unit-norm embeddings ``(N, out_features)``."""
        flat = features.reshape(features.shape[0], -1)
        if flat.shape[1] != self.linear.in_features:
            raise ValueError(
                f"NormalizedEmbedding expects {self.linear.in_features} features per sample, got {flat.shape[1]} "
                f"(input shape {tuple(features.shape)}). Set `in_features` (the student_dim / teacher_dim of CRDLoss) "
                "to the flattened feature width."
            )
        return F.normalize(self.linear(flat), p=2.0, dim=1)

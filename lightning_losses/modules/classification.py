"""``ClassificationModule``: a ready LightningModule training a classifier with any classification loss."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.modules._optimizers import optimizer_and_schedule
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_choice, check_number, check_targets

__all__ = ["ClassificationModule"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` computed in float32 under autocast (the default loss of ``ClassificationModule``)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return super().forward(input.float() if input.dtype in (torch.float16, torch.bfloat16) else input, target)


def _takes_index(loss: Callable[..., Tensor]) -> bool:
    """Whether ``loss`` (a module's ``forward`` or a plain function) has a parameter named ``index``."""
    function = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        return "index" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


class ClassifierEvaluation(pl.LightningModule):
    """The accuracy metrics and the validation and test steps shared by the classifier modules.

    Each evaluation batch logs ``{stage}/loss`` (the cross-entropy, 0 on an empty batch) and ``{stage}/acc`` (the
    ``val_accuracy`` / ``test_accuracy`` metric, per epoch) of the logits and targets that the subclass's
    :meth:`_evaluation_outputs` returns.
    """

    def add_accuracy_metrics(self, num_classes: int) -> None:
        """Create ``train_accuracy``, ``val_accuracy`` and ``test_accuracy``: micro-averaged top-1 accuracy."""
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def _evaluation_outputs(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        """The logits and the class targets of an evaluation batch of ``stage`` (``"val"`` or ``"test"``)."""
        raise NotImplementedError

    def _evaluate(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> None:
        logits, y = self._evaluation_outputs(batch, stage)
        metric(logits, y)
        loss = F.cross_entropy(logits.float(), y) if y.numel() else logits.sum() * 0.0
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=y.shape[0])
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test")


class ClassificationModule(HyperparameterMixin, ClassifierEvaluation):
    r"""Train ``model`` (inputs → logits) with ``loss(logits, target)``, logging loss and accuracy per stage.

    ``loss`` is any classification loss: cross-entropy by default, or the library's
    :class:`~lightning_losses.FocalLoss`, :class:`~lightning_losses.AdaptiveFocalLoss`,
    :class:`~lightning_losses.LabelSmoothingLoss`, :class:`~lightning_losses.MMCELoss`,
    :class:`~lightning_losses.MDCALoss`, :class:`~lightning_losses.DCALoss`, :class:`~lightning_losses.LDRKLLoss`,
    :class:`~lightning_losses.ALDRKLLoss`, or a user's own module or function of ``(logits, target)``. A loss whose
    ``forward`` takes an ``index`` argument (ALDR-KL's per-sample λ) is given the batch's sample indices, so such a
    loss needs batches ``(x, y, index)`` (the embedded data modules yield them) or dicts with an ``"index"`` key.

    The loss lives at ``self.loss``: its hyperparameters are ``"loss.<name>"`` (``"loss.gamma"`` for focal loss),
    reachable by schedules, PBT and STN through :meth:`get_hyperparameter` / :meth:`set_hyperparameter`, and saved in
    checkpoints. Logged: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
    (``val/loss`` and ``test/loss`` are the cross-entropy, i.e. the NLL, whatever the training loss, so runs with
    different losses compare, and evaluation never updates a loss's state such as ALDR-KL's λ; accuracy is the
    micro-averaged top-1 accuracy).

    Args:
        model: the network, mapping a batch of inputs to logits ``(N, num_classes)``.
        loss: the training loss (``None``: cross-entropy in float32).
        num_classes: number of classes (``>= 2``), for the accuracy metrics and the target check.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
        lr: learning rate (``> 0``).
        momentum: SGD momentum in ``[0, 1)``.
        weight_decay: weight decay (``>= 0``; coupled for SGD and Adam, decoupled for AdamW).
        scheduler: ``"cosine"`` anneals the learning rate to 0 over ``max_epochs`` (per epoch), ``"none"`` keeps it.

    Example:
        >>> from lightning_losses import FocalLoss
        >>> module = ClassificationModule(nn.Linear(4, 3), loss=FocalLoss(gamma=2.0), num_classes=3)
        >>> module.get_hyperparameter("loss.gamma")
        tensor(2.)
        >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> module.training_step(batch, 0).ndim
        0
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | Callable[[Tensor, Tensor], Tensor] | None = None,
        num_classes: int = 10,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: Literal["none", "cosine"] = "cosine",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module mapping inputs to logits; got {type(model).__name__}.")
        if loss is not None and not callable(loss):
            raise TypeError(
                f"`loss` must be a loss module or function taking (logits, target), or None for cross-entropy; "
                f"got {type(loss).__name__}."
            )
        check_number("num_classes", num_classes, low=2, integer=True)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        check_choice("scheduler", scheduler, SCHEDULERS)
        self.save_hyperparameters(ignore=["model", "loss"])
        self.model = model
        self.loss: Callable[..., Tensor] = CrossEntropyLoss() if loss is None else loss
        self.num_classes = num_classes
        self.loss_takes_index = _takes_index(self.loss)
        self.add_accuracy_metrics(num_classes)

    def forward(self, x: Any) -> Tensor:
        """The model's logits."""
        return self.model(x)

    def compute_loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Return the loss of a batch ``(x, y)``, ``(x, y, index)`` or dict, the logits and the targets."""
        x, y, index = unpack_batch(batch)
        if y is None:
            raise ValueError("ClassificationModule needs class targets in every batch: (x, y), (x, y, index) or dict.")
        logits = self(x)
        if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"The model must return logits of shape (N, {self.num_classes}) (num_classes={self.num_classes}); "
                f"got {tuple(logits.shape)}. Set `num_classes` to the model's number of outputs."
            )
        check_targets(y, self.num_classes, logits.shape[0])
        if self.loss_takes_index:
            if index is None:
                raise ValueError(
                    f"The loss {type(self.loss).__name__} takes the samples' dataset indices: give batches "
                    "(x, y, index) or dicts with an 'index' key (the embedded data modules yield them)."
                )
            loss = self.loss(logits, y, index=index)
        else:
            loss = self.loss(logits, y)
        return loss, logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, y = self.compute_loss(batch)
        if self._trainer is not None:
            self.train_accuracy(logits.detach(), y)
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=y.shape[0])
            self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=y.shape[0])
        return loss

    def _evaluation_outputs(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        x, y, _ = unpack_batch(batch)
        if y is None:
            raise ValueError(f"ClassificationModule needs class targets in every {stage} batch.")
        logits = self(x)
        check_targets(y, self.num_classes, logits.shape[0])
        return logits, y

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, dict):
            return self(unpack_batch(batch)[0])
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def configure_optimizers(self) -> Any:
        return optimizer_and_schedule(self)

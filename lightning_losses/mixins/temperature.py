"""``TempNetMixin``: TempNet and the KL-DRO robust loss inside any LightningModule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.losses.temperature import DROTemperatureLoss, RobustContrastiveLoss
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.nn.tempnet import ContrastiveTempNet, TempNet
from lightning_losses.utilities.checks import check_number

__all__ = ["TempNetMixin"]


def _check_rho(rho: float, count: int, what: str) -> None:
    if not 0 <= rho < math.log(count):
        raise ValueError(
            f"TempNet's rho must lie in [0, log m) with m = {count} {what} (log m = {math.log(count):.4f}), got "
            f"{rho}. At rho >= log m the best temperature is always tau_min; lower rho (the reference uses about "
            "log m - 2 for large vocabularies)."
        )


class TempNetMixin(HyperparameterMixin):
    """Adds TempNet and its KL-DRO loss to a LightningModule (put the mixin before ``pl.LightningModule``).

    The concrete class calls :meth:`configure_tempnet` (classification / LLM tokens) and/or
    :meth:`configure_contrastive_tempnet` in its ``__init__``, computes its logits in ``training_step`` and calls
    :meth:`tempnet_loss` (or :meth:`tempnet_contrastive_loss`); ``configure_optimizers`` uses
    :meth:`tempnet_parameter_groups` so TempNet has its own learning rate. With ``train_base=False`` the base model
    is frozen at fit start and only TempNet learns (the reference's LLaMA setting).

    Logged: ``<stage>/tau_mean``, ``tau_min``, ``tau_max`` and, with a TensorBoard logger, a histogram of τ.
    The KL radius is the hyperparameter ``"tempnet_dro.rho"``; ``rho < log(num_classes)`` is checked at
    configuration and again at fit start.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Classifier(TempNetMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 10)
        ...         self.configure_tempnet(num_classes=10, rho=1.0, hidden_dim=16)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return self.tempnet_loss(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.tempnet_parameter_groups(lr=1e-3))
        >>> m = Classifier()
        >>> float(m.get_hyperparameter("tempnet_dro.rho"))
        1.0
        >>> [len(g["params"]) for g in m.tempnet_parameter_groups(lr=1e-3)]
        [2, 7]
    """

    tempnet: nn.Module
    tempnet_dro: DROTemperatureLoss

    def configure_tempnet(
        self,
        num_classes: int,
        *,
        rho: float = 1.0,
        tau_min: float = 0.5,
        tau_max: float = 5.0,
        hidden_dim: int = 256,
        dropout: float = 0.5,
        tempnet_lr: float = 1e-4,
        train_base: bool = True,
        ignore_index: int = -100,
        tempnet: nn.Module | None = None,
        histogram_every_n_steps: int = 50,
    ) -> None:
        """Create TempNet (unless one is given) and the DRO loss; validate ``rho`` against ``num_classes``.

        Args:
            num_classes: Number of classes / vocabulary size ``V`` of the logits TempNet reads.
            rho: KL-ball radius in ``[0, log V)``.
            tau_min: Lower bound of τ.
            tau_max: Upper bound of τ.
            hidden_dim: TempNet width.
            dropout: TempNet dropout.
            tempnet_lr: Learning rate of TempNet's parameter group.
            train_base: ``False`` freezes every parameter outside TempNet at fit start.
            ignore_index: Target value of positions that do not count.
            tempnet: A ready temperature network mapping ``(..., V)`` logits to ``(...)`` temperatures.
            histogram_every_n_steps: How often a τ histogram goes to a TensorBoard logger (0: never).
        """
        assert isinstance(self, nn.Module)
        _check_rho(rho, num_classes, "classes")
        check_number("tempnet_lr", tempnet_lr, low=0.0, low_inclusive=False)
        check_number("histogram_every_n_steps", histogram_every_n_steps, low=0, integer=True)
        if tempnet is None:  # TempNet checks its τ bounds itself
            check_number("hidden_dim", hidden_dim, low=1, integer=True)
            check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.tempnet = tempnet if tempnet is not None else TempNet(num_classes, tau_min, tau_max, hidden_dim, dropout)
        self.tempnet_dro = DROTemperatureLoss(rho, ignore_index)
        self._tempnet_settings: dict[str, Any] = {
            "num_classes": num_classes,
            "tempnet_lr": tempnet_lr,
            "train_base": train_base,
            "histogram_every_n_steps": histogram_every_n_steps,
        }

    def configure_contrastive_tempnet(
        self,
        embed_dim: int,
        num_samples: int,
        *,
        rho: float = 7.0,
        gamma: float = 0.8,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        num_prototypes: int = 256,
        dropout: float = 0.5,
        tempnet_lr: float = 3e-5,
        train_base: bool = True,
    ) -> None:
        """Create one :class:`ContrastiveTempNet` per modality and the moving-average robust contrastive loss.

        ``rho < log(B_global - 1)`` is checked on every call of :meth:`tempnet_contrastive_loss`.
        """
        assert isinstance(self, nn.Module)
        check_number("tempnet_lr", tempnet_lr, low=0.0, low_inclusive=False)
        self.image_tempnet = ContrastiveTempNet(embed_dim, tau_min, tau_max, num_prototypes, dropout)
        self.text_tempnet = ContrastiveTempNet(embed_dim, tau_min, tau_max, num_prototypes, dropout)
        self.tempnet_contrastive = RobustContrastiveLoss(num_samples, rho, gamma)
        settings = self.__dict__.setdefault("_tempnet_settings", {})
        settings.setdefault("tempnet_lr", tempnet_lr)
        settings.setdefault("train_base", train_base)
        settings.setdefault("histogram_every_n_steps", 50)

    # ------------------------------------------------------------------ helpers called from the user's steps

    def tempnet_loss(
        self,
        logits: Tensor,
        target: Tensor,
        *,
        features: Tensor | None = None,
        head_weight: Tensor | None = None,
        head_bias: Tensor | None = None,
        stage: str = "train",
        log: bool = True,
        num_items_in_batch: Tensor | float | None = None,
    ) -> Tensor:
        """TempNet's per-position τ on the (detached) logits, then the DRO loss (float32); logs τ statistics.

        When the logits are ``features @ head_weight.T + head_bias`` (an LM head), pass those three as well:
        TempNet then runs its factorised first layer, ``d × H`` per token instead of ``V × H`` (same τ).
        ``num_items_in_batch`` divides the summed loss instead of this batch's count of positions (see
        :func:`~lightning_losses.utilities.tokens.step_num_items`).
        """
        tau = self.tempnet_temperatures(logits, features=features, head_weight=head_weight, head_bias=head_bias)
        if num_items_in_batch is None:
            loss = self.tempnet_dro(logits, target, tau)
        else:
            loss = self.tempnet_dro(logits, target, tau, num_items_in_batch=num_items_in_batch)
        if log:
            self.log_tau_statistics(tau, target != self.tempnet_dro.ignore_index, stage)
        return loss

    def tempnet_temperatures(
        self,
        logits: Tensor,
        *,
        features: Tensor | None = None,
        head_weight: Tensor | None = None,
        head_bias: Tensor | None = None,
    ) -> Tensor:
        """TempNet's τ for ``logits``, through the factorised first layer when ``features`` and the head are given."""
        if features is None:
            return self.tempnet(logits)
        return self.tempnet(logits, features=features, head_weight=head_weight, head_bias=head_bias)

    def tempnet_contrastive_loss(
        self, image_features: Tensor, text_features: Tensor, index: Tensor, *, stage: str = "train"
    ) -> Tensor:
        """Robust contrastive loss with per-anchor τ from the two TempNets (prototypes from the first batch)."""
        self.image_tempnet.init_prototypes(text_features)
        self.text_tempnet.init_prototypes(image_features)
        tau_image = self.image_tempnet(image_features)
        tau_text = self.text_tempnet(text_features)
        loss = self.tempnet_contrastive(image_features, text_features, index, tau_image, tau_text)
        self.log_tau_statistics(torch.cat([tau_image, tau_text]), None, stage)
        return loss

    def tempnet_modules(self) -> list[nn.Module]:
        """The temperature networks this module holds."""
        return [m for name in ("tempnet", "image_tempnet", "text_tempnet") if (m := getattr(self, name, None))]

    def tempnet_parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the base model (``lr``; absent when frozen) and TempNet (``tempnet_lr``)."""
        assert isinstance(self, nn.Module)
        settings = self._tempnet_settings
        temp_params = [p for m in self.tempnet_modules() for p in m.parameters()]
        temp_ids = {id(p) for p in temp_params}
        groups: list[dict[str, Any]] = []
        if settings["train_base"]:
            base = [p for p in self.parameters() if id(p) not in temp_ids and p.requires_grad]
            if base:
                groups.append({"params": base, "lr": lr, "weight_decay": weight_decay, "name": "base"})
        groups.append({"params": temp_params, "lr": settings["tempnet_lr"], "weight_decay": 0.0, "name": "tempnet"})
        return groups

    def log_tau_statistics(self, tau: Tensor, mask: Tensor | None = None, stage: str = "train") -> None:
        """Log mean / min / max of τ over the counted positions, and a histogram to TensorBoard."""
        values = tau.detach().float()
        values = values[mask] if mask is not None else values.flatten()
        if values.numel() == 0:
            return
        log = getattr(self, "log", None)
        trainer = getattr(self, "_trainer", None)
        if log is None or trainer is None:
            return
        batch = int(values.numel())
        log(f"{stage}/tau_mean", values.mean(), sync_dist=True, batch_size=batch)
        log(f"{stage}/tau_min", values.min(), sync_dist=True, reduce_fx="min", batch_size=batch)
        log(f"{stage}/tau_max", values.max(), sync_dist=True, reduce_fx="max", batch_size=batch)
        every = self._tempnet_settings.get("histogram_every_n_steps", 0)
        step = trainer.global_step
        logger = getattr(trainer, "logger", None)
        experiment = getattr(logger, "experiment", None) if logger is not None else None
        add_histogram = getattr(experiment, "add_histogram", None)
        if stage == "train" and every and step % every == 0 and add_histogram is not None:
            add_histogram(f"{stage}/tau", values.cpu(), step)

    # ------------------------------------------------------------------ hooks (all chain to super)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        assert isinstance(self, nn.Module)
        settings = self._tempnet_settings
        if hasattr(self, "tempnet_dro"):
            _check_rho(float(self.tempnet_dro.rho), settings["num_classes"], "classes")
        if not settings["train_base"]:
            temp_ids = {id(p) for m in self.tempnet_modules() for p in m.parameters()}
            for p in self.parameters():
                if id(p) not in temp_ids:
                    p.requires_grad_(False)

"""The optimizer and learning-rate schedule of the ready classification-style modules."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


def optimizer_and_schedule(module: pl.LightningModule) -> Any:
    """``configure_optimizers`` from the module's ``hparams``: ``optimizer`` ("sgd", "adam" or "adamw"), ``lr``,
    ``momentum`` (SGD), ``weight_decay`` and ``scheduler`` ("none" or a per-epoch "cosine" over ``max_epochs``)."""
    hp: Any = module.hparams
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if hp.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    elif hp.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.scheduler == "none":
        return optimizer
    trainer = module.trainer
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

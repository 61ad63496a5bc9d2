"""Trainer callbacks."""

from lightning_losses.callbacks.distillation import *

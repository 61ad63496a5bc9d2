r"""The ``SelfTuning`` callback: Self-Tuning Networks (MacKay et al., 2019) for any named hyperparameter.

The model holds STN hyper-layers (:class:`~lightning_losses.nn.stn.HyperLinear`,
:class:`~lightning_losses.nn.stn.HyperConv2d`) so that its weights are a function of the hyperparameters. The
callback alternates, after a warm-up:

* ``train_steps`` ordinary training steps (Lightning's own): before each, it draws perturbed hyperparameters
  :math:`\hat\lambda = \lambda + \operatorname{softplus}(\sigma)\varepsilon` per example, writes them into the module
  (``set_hyperparameter``: a per-sample KD temperature or label smoothing, a per-batch dropout rate) and conditions
  the hyper-layers on them; the module's optimizer updates the weights only;
* ``valid_steps`` hyper-steps on validation batches, model in eval mode: the validation loss (which does not use the
  loss hyperparameters) depends on :math:`\lambda` only through the hyper-layers; Adam updates
  :math:`(\lambda, \sigma)` on

.. math:: \mathcal L_{\text{val}}\big(w_\phi(\hat\lambda)\big) - \tau\, H\big[p(\varepsilon \mid \sigma)\big].

The hyper-optimizer lives in the callback (not in ``configure_optimizers``; DeepSpeed allows one optimizer) and is
checkpointed with it. Under DDP the hyper-gradients are averaged over the ranks, so every rank keeps the same
hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_losses import hyperparameters as _hp
from lightning_losses._utils import unpack_batch
from lightning_losses.callbacks.schedules import apply_hyperparameters
from lightning_losses.nn.stn import (
    BoundedTransform,
    DiscreteTransform,
    HyperparameterTransform,
    PerturbedHyperparameters,
    PositiveTransform,
    condition_hyper_layers,
    hyper_layers,
)

__all__ = ["SelfTuning", "TunedHyperparameter", "best_response_step", "classification_validation_loss"]


@dataclass(frozen=True)
class TunedHyperparameter:
    """How one hyperparameter is tuned by :class:`SelfTuning`.

    Args:
        initial: Starting value; ``None`` reads the module's current value.
        low: Lower bound; ``None`` takes the registered range's bound.
        high: Upper bound; ``None`` takes the registered range's bound (unbounded above: softplus transform).
        discrete: Integer-valued (floor of a stretched sigmoid over ``[low, high]``).
        per_example: One draw per example (needs a loss that accepts per-sample values); ``False`` draws once per
            batch (dropout rates, plain float attributes).
    """

    initial: float | None = None
    low: float | None = None
    high: float | None = None
    discrete: bool = False
    per_example: bool = True


def classification_validation_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """Default STN validation objective: cross-entropy of ``pl_module(inputs)`` against the targets."""
    x, y, _ = unpack_batch(batch)
    if y is None:
        raise ValueError("The default STN validation loss needs batches with targets; pass `validation_loss=`.")
    return F.cross_entropy(pl_module(x).float(), y)


def best_response_step(
    hyperparameters: PerturbedHyperparameters,
    optimizer: torch.optim.Optimizer,
    objective: Callable[[Tensor], Tensor],
    entropy_weight: float,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""One STN hyper-step: sample :math:`\hat u`, minimise ``objective(û) - τ H`` over :math:`(u, \sigma)` only.

    ``objective`` receives the perturbed unconstrained values (``(batch_size, k)``) and returns the validation loss
    computed through the hyper-layers. Gradients go to the hyperparameters only (``torch.autograd.grad``), never to
    the weights; in a ``torch.distributed`` group they are averaged over the ranks.

    Returns:
        The validation loss (detached).
    """
    u_hat = hyperparameters.sample(batch_size, generator=generator)
    loss = objective(u_hat)
    total = loss - entropy_weight * hyperparameters.entropy()
    params = [hyperparameters.unconstrained, hyperparameters.scale_raw]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for p, g in zip(params, grads):
        g = torch.zeros_like(p) if g is None else g.detach().clone()
        if distributed:
            dist.all_reduce(g)
            g /= dist.get_world_size()
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _cycle(loader: Iterable[Any], skip: int) -> Iterator[Any]:
    skipped = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            if skipped < skip:
                skipped += 1
                continue
            yield batch
        if empty:
            raise ValueError("The STN validation dataloader is empty; it needs at least one batch.")


class SelfTuning(Callback):
    r"""Tune named hyperparameters online with a Self-Tuning Network (best-response approximation).

    The module must contain STN hyper-layers whose ``num_hyperparameters`` equals the number of tuned names (in
    the order given); without them the validation loss does not depend on the hyperparameters.

    .. math::
        \phi \leftarrow \phi - \alpha \nabla_\phi \mathcal L_{\text{train}}(\hat\lambda, w_\phi(\hat\lambda)), \qquad
        (\lambda, \sigma) \leftarrow (\lambda, \sigma) - \beta \nabla_{\lambda, \sigma}
        \big[\mathcal L_{\text{val}}(w_\phi(\hat\lambda)) - \tau H\big]

    Args:
        hyperparameters: Mapping from a dotted name (``"kd.temperature"``, ``"ls.amount"``, ``"drop.p"``) to a
            :class:`TunedHyperparameter` (or ``None`` for the defaults: current value, registered bounds).
        warmup_steps: Training steps before the first hyper-step (weights still see perturbed hyperparameters).
        train_steps: Training steps between two rounds of hyper-steps.
        valid_steps: Hyper-steps per round.
        hyper_lr: Adam learning rate of the hyperparameters and the perturbation scale.
        perturb_scale: Initial perturbation scale (unconstrained space).
        entropy_weight: Weight :math:`\tau` of the entropy bonus.
        val_dataloader: Batches for the hyper-steps; ``None`` uses the datamodule's (or trainer's) validation
            dataloader. It is cycled; use an unshuffled loader for an exact resume.
        validation_loss: ``fn(pl_module, batch) -> loss``; defaults to cross-entropy of ``pl_module(x)``. It must
            not use the tuned loss hyperparameters.
        derived: Names set from the tuned values, e.g. ``{"ce_weight": lambda v: 1 - v["kd.weight"]}``.
        log: Log the current hyperparameters (``"stn/<name>"``) after every hyper-step round.
        seed: Seed of the perturbation noise.

    Example:
        >>> cb = SelfTuning({"ls.amount": TunedHyperparameter(initial=0.1, low=0.0, high=0.5)}, warmup_steps=10)
        >>> cb.names
        ['ls.amount']
    """

    def __init__(
        self,
        hyperparameters: Mapping[str, TunedHyperparameter | None],
        *,
        warmup_steps: int = 0,
        train_steps: int = 2,
        valid_steps: int = 1,
        hyper_lr: float = 3e-3,
        perturb_scale: float = 0.5,
        entropy_weight: float = 1e-3,
        val_dataloader: Iterable[Any] | None = None,
        validation_loss: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        derived: Mapping[str, Callable[[Mapping[str, Tensor]], Tensor | float]] | None = None,
        log: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not hyperparameters:
            raise MisconfigurationException("SelfTuning needs at least one hyperparameter name to tune.")
        for label, value, minimum in (("warmup_steps", warmup_steps, 0), ("train_steps", train_steps, 1)):
            if int(value) != value or value < minimum:
                raise MisconfigurationException(f"`{label}` must be an integer >= {minimum}, got {value}.")
        if int(valid_steps) != valid_steps or valid_steps < 1:
            raise MisconfigurationException(f"`valid_steps` must be an integer >= 1, got {valid_steps}.")
        if not hyper_lr > 0 or not perturb_scale > 0 or entropy_weight < 0:
            raise MisconfigurationException(
                f"`hyper_lr` and `perturb_scale` must be > 0 and `entropy_weight` >= 0, got {hyper_lr}, "
                f"{perturb_scale} and {entropy_weight}."
            )
        self.specs = {name: spec or TunedHyperparameter() for name, spec in hyperparameters.items()}
        self.names = list(self.specs)
        self.warmup_steps, self.train_steps, self.valid_steps = int(warmup_steps), int(train_steps), int(valid_steps)
        self.hyper_lr, self.perturb_scale, self.entropy_weight = hyper_lr, perturb_scale, entropy_weight
        self.val_dataloader = val_dataloader
        self.validation_loss = validation_loss or classification_validation_loss
        self.derived = dict(derived or {})
        self.log = log
        self.seed = seed
        self.hyperparameters: PerturbedHyperparameters | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.hyper_steps = 0
        self.val_batches_seen = 0
        self.history: list[dict[str, float]] = []
        self._pending_state: dict[str, Any] | None = None
        self._val_iter: Iterator[Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(names=self.names)

    # ----------------------------------------------------------------------------------------------- set-up
    def _transform(self, pl_module: nn.Module, name: str, spec: TunedHyperparameter) -> HyperparameterTransform:
        registered = _hp.hyperparameter_spec(pl_module, name)  # KeyError lists the available names
        low = spec.low if spec.low is not None else registered.low
        high = spec.high if spec.high is not None else registered.high
        if spec.discrete:
            if low is None or high is None:
                raise MisconfigurationException(f"Discrete hyperparameter {name!r} needs both `low` and `high`.")
            return DiscreteTransform(math.ceil(low), math.floor(high))
        if low is not None and high is not None:
            return BoundedTransform(low, high)
        if low is not None:
            return PositiveTransform(low)
        raise MisconfigurationException(
            f"Hyperparameter {name!r} has no lower bound; give `TunedHyperparameter(low=..., high=...)` so it can be "
            "mapped to its range."
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.hyperparameters is not None:
            return
        layers = list(hyper_layers(pl_module))
        if not layers:
            raise MisconfigurationException(
                "SelfTuning found no STN hyper-layer (HyperLinear / HyperConv2d) in the module: the validation loss "
                "would not depend on the hyperparameters. Build the network with hyper-layers conditioned on "
                f"{len(self.names)} hyperparameter(s)."
            )
        wrong = {layer.num_hyperparameters for layer in layers} - {len(self.names)}
        if wrong:
            raise MisconfigurationException(
                f"The hyper-layers expect {sorted(wrong)} hyperparameter(s) but SelfTuning tunes {len(self.names)} "
                f"({self.names}). Build them with num_hyperparameters={len(self.names)}."
            )
        transforms = {n: self._transform(pl_module, n, s) for n, s in self.specs.items()}
        initial = {
            n: float(s.initial) if s.initial is not None else float(_hp.get_hyperparameter(pl_module, n).float().mean())
            for n, s in self.specs.items()
        }
        per_example = [n for n, s in self.specs.items() if s.per_example]
        hp = PerturbedHyperparameters(transforms, initial, self.perturb_scale, per_example).to(pl_module.device)
        with torch.no_grad():  # identical start on every rank
            for p in hp.parameters():
                p.copy_(trainer.strategy.broadcast(p.detach().clone(), src=0))
        self.hyperparameters = hp
        self.optimizer = torch.optim.Adam(hp.parameters(), lr=self.hyper_lr)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def _require(self) -> tuple[PerturbedHyperparameters, torch.optim.Optimizer]:
        if self.hyperparameters is None or self.optimizer is None:
            raise RuntimeError("SelfTuning is not set up; it is used as a Trainer callback during `fit`.")
        return self.hyperparameters, self.optimizer

    # ------------------------------------------------------------------------------------------- applying
    def _apply(self, pl_module: pl.LightningModule, u: Tensor, trainer: pl.Trainer | None = None) -> None:
        hp, _ = self._require()
        values: dict[str, Any] = {k: v.detach() for k, v in hp.values(u.detach()).items()}
        for name, fn in self.derived.items():
            values[name] = fn(values)
        apply_hyperparameters(pl_module, values, trainer)
        condition_hyper_layers(pl_module, hp.hypernet_input(u))

    def _apply_current(self, pl_module: pl.LightningModule) -> None:
        hp, _ = self._require()
        self._apply(pl_module, hp.unconstrained.detach())

    def current(self) -> dict[str, float]:
        """The current (unperturbed) value of every tuned hyperparameter."""
        hp, _ = self._require()
        return hp.current()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_current(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        hp, _ = self._require()
        with torch.no_grad():
            u_hat = hp.sample(extract_batch_size(batch), generator=self.generator)
        self._apply(pl_module, u_hat)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps += 1
        after_warmup = self.steps - self.warmup_steps
        if after_warmup <= 0 or after_warmup % self.train_steps:
            return
        for _ in range(self.valid_steps):
            self._hyper_step(trainer, pl_module)
        self.history.append({"step": float(trainer.global_step), **self.current()})
        self._apply_current(pl_module)
        if self.log:
            hp, _ = self._require()
            scales = hp.scale().detach()
            for j, (name, value) in enumerate(self.current().items()):
                pl_module.log(f"stn/{name}", value, on_step=True, on_epoch=False, batch_size=1)
                pl_module.log(f"stn/{name}.scale", float(scales[j]), on_step=True, on_epoch=False, batch_size=1)

    def _val_batches(self, trainer: pl.Trainer) -> Iterator[Any]:
        if self._val_iter is None:
            loader: Any = self.val_dataloader
            datamodule = getattr(trainer, "datamodule", None)
            if loader is None and datamodule is not None:
                loader = datamodule.val_dataloader()
            if loader is None:
                loader = trainer.val_dataloaders
            if loader is None:
                raise MisconfigurationException(
                    "SelfTuning needs validation batches: pass `val_dataloader=` or give the Trainer a datamodule "
                    "with `val_dataloader()`."
                )
            self._val_iter = _cycle(loader, skip=self.val_batches_seen)
        return self._val_iter

    def _hyper_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hp, optimizer = self._require()
        batch = next(self._val_batches(trainer))
        self.val_batches_seen += 1
        batch = trainer.strategy.batch_to_device(batch)
        was_training = pl_module.training
        pl_module.eval()

        def objective(u_hat: Tensor) -> Tensor:
            self._apply(pl_module, u_hat.detach())
            # the only path from the hyperparameters to the loss
            condition_hyper_layers(pl_module, hp.hypernet_input(u_hat))
            return self.validation_loss(pl_module, batch)

        try:
            with torch.inference_mode(False), torch.enable_grad():
                best_response_step(
                    hp, optimizer, objective, self.entropy_weight, extract_batch_size(batch), self.generator
                )
        finally:
            pl_module.train(was_training)
        self.hyper_steps += 1

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hyperparameters is not None:
            self._apply_current(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_current(pl_module)

    # ---------------------------------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Save the unperturbed values, not the per-sample draw of the current batch (whose shape would not load)."""
        if self.hyperparameters is None or "state_dict" not in checkpoint:
            return
        values: dict[str, Any] = dict(self.hyperparameters.values(self.hyperparameters.unconstrained.detach()))
        for name, fn in self.derived.items():
            values[name] = fn(values)
        state = checkpoint["state_dict"]
        for name, value in values.items():
            if name in state:
                state[name] = torch.as_tensor(value, dtype=torch.float32).detach().cpu().clone()

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "steps": self.steps,
            "hyper_steps": self.hyper_steps,
            "val_batches_seen": self.val_batches_seen,
            "generator": self.generator.get_state(),
            "history": list(self.history),
        }
        if self.hyperparameters is not None and self.optimizer is not None:
            state["hyperparameters"] = {k: v.detach().cpu() for k, v in self.hyperparameters.state_dict().items()}
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _load(self, state: dict[str, Any]) -> None:
        hp, optimizer = self._require()
        hp.load_state_dict(state["hyperparameters"])
        optimizer.load_state_dict(state["optimizer"])

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.hyper_steps = int(state_dict["hyper_steps"])
        self.val_batches_seen = int(state_dict["val_batches_seen"])
        self.generator.set_state(state_dict["generator"])
        self.history = list(state_dict["history"])
        self._val_iter = None
        if "hyperparameters" in state_dict:
            if self.hyperparameters is None:
                self._pending_state = state_dict
            else:
                self._load(state_dict)

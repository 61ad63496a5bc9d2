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
checkpointed with it.

Under DDP every rank draws its own perturbations (each rank's batch is a sample of the same distribution: the noise of
draw ``k`` on rank ``r`` is seeded from ``(seed, r, k)``), the tuned buffers are kept out of DDP's buffer broadcast
(so the loss on each rank uses the values its hyper-layers are conditioned on), and the hyper-gradients are averaged
over the ranks, so every rank keeps the same hyperparameters. The callback holds no ``torch.Generator``: it is
picklable (``strategy="ddp_spawn"``) and its checkpoint stores only counters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_losses import hyperparameters as _hp
from lightning_losses.callbacks.schedules import _SpawnPicklable
from lightning_losses.hyperparameters import OPTIMIZER_HYPERPARAMETERS, apply_hyperparameters
from lightning_losses.nn.stn import (
    BoundedTransform,
    DiscreteTransform,
    HyperparameterTransform,
    PerturbedHyperparameters,
    PositiveTransform,
    condition_hyper_layers,
    hyper_layers,
)
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.distributed import all_reduce

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
    """Default STN validation objective: cross-entropy of ``pl_module(inputs)`` against the targets.

    :class:`SelfTuning` runs it inside the forward of the strategy's wrapper when the strategy has one that shards
    the root (FSDP, DeepSpeed), so ``pl_module(x)`` sees gathered parameters.
    """
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
    for p, g in zip(params, grads):
        p.grad = all_reduce(torch.zeros_like(p) if g is None else g.detach(), "mean")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _noise_seed(seed: int, rank: int, draw: int) -> int:
    """A well-mixed 63-bit seed for draw ``draw`` on rank ``rank``: independent streams per rank and per draw."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_OBJECTIVE_ATTR = "_self_tuning_objective"


def _through_strategy(trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` (which calls ``pl_module``) the way Lightning runs a step under the strategy's wrapper.

    A wrapper that shards the root module's parameters (FSDP, DeepSpeed) gathers them in its own forward: ``fn`` then
    runs inside it, through Lightning's forward redirection (as ``training_step`` does). DDP's wrapper adds only the
    weights' gradient reduction and buffer broadcast, neither wanted by a hyper-step, and FSDP2 (``fully_shard``)
    hooks the modules themselves: there ``fn`` runs directly.
    """
    strategy = trainer.strategy
    wrapper = getattr(strategy, "model", None)
    redirect = getattr(strategy, "_forward_redirection", None)
    if wrapper is None or wrapper is pl_module or redirect is None:
        return fn()
    if isinstance(wrapper, nn.parallel.DistributedDataParallel) or not any(m is pl_module for m in wrapper.modules()):
        return fn()
    pl_module.__dict__[_OBJECTIVE_ATTR] = fn
    try:
        return redirect(wrapper, pl_module, _OBJECTIVE_ATTR)
    finally:
        pl_module.__dict__.pop(_OBJECTIVE_ATTR, None)


_PICKLABLE_FUNCTIONS = "a function defined at module level, or functools.partial(fn, ...) of one"


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


class SelfTuning(_SpawnPicklable, Callback):
    r"""Tune named hyperparameters online with a Self-Tuning Network (best-response approximation).

    The module must contain STN hyper-layers whose ``num_hyperparameters`` equals the number of tuned names (in
    the order given); without them the validation loss does not depend on the hyperparameters.

    .. math::
        \phi \leftarrow \phi - \alpha \nabla_\phi \mathcal L_{\text{train}}(\hat\lambda, w_\phi(\hat\lambda)), \qquad
        (\lambda, \sigma) \leftarrow (\lambda, \sigma) - \beta \nabla_{\lambda, \sigma}
        \big[\mathcal L_{\text{val}}(w_\phi(\hat\lambda)) - \tau H\big]

    Args:
        hyperparameters: Mapping from a dotted name (``"kd.temperature"``, ``"ls.amount"``, an exposed dropout
            rate ``"drop.p"``) to a :class:`TunedHyperparameter` (or ``None`` for the defaults: current value,
            registered bounds).
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
        seed: Base seed of the perturbation noise; rank ``r`` draws its ``k``-th perturbation from a generator seeded
            by ``(seed, r, k)``.

    Checkpoints are snapshots of the module: one written between two training steps holds the perturbed draw then in
    effect (it loads into a fresh module whatever its shape). The unperturbed values live in this callback's state;
    they are applied on resume, before validation and at the end of training (so the fitted module, and the one a
    ``ddp_spawn`` run returns to the main process, hold them). Under ``ddp_spawn`` the workers run copies of the
    callback: the tuned values come back in the module and in ``trainer.callback_metrics["stn/<name>"]``;
    ``derived`` and ``validation_loss`` must then be picklable (functions defined at module level, not lambdas).

    Example:
        >>> cb = SelfTuning({"ls.amount": TunedHyperparameter(initial=0.1, low=0.0, high=0.5)}, warmup_steps=10)
        >>> cb.names
        ['ls.amount']
    """

    _picklable_forms = _PICKLABLE_FUNCTIONS
    #: A Python generator; rebuilt lazily, skipping the batches already seen.
    _transient = ("_val_iter",)

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
        # not ``self.log``: Lightning sets ``callback.log`` to the module's ``log`` method when ``fit`` starts
        self.log_values = log
        self.seed = int(seed)
        self.hyperparameters: PerturbedHyperparameters | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rank = 0
        self.draws = 0
        self.steps = 0
        self.hyper_steps = 0
        self.val_batches_seen = 0
        self.history: list[dict[str, float]] = []
        self._pending_state: dict[str, Any] | None = None
        self._val_iter: Iterator[Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(names=self.names)

    def _generator(self) -> torch.Generator:
        """The generator of the next perturbation draw of this rank (a fresh one per draw, seeded by the counters)."""
        generator = torch.Generator().manual_seed(_noise_seed(self.seed, self.rank, self.draws))
        self.draws += 1
        return generator

    @override
    def _functions(self) -> Mapping[str, object]:
        functions: dict[str, object] = {f"derived[{k!r}]": fn for k, fn in self.derived.items()}
        functions["validation_loss"] = self.validation_loss
        return functions

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
        if stage != "fit":
            return
        self.rank = int(trainer.global_rank)
        # KeyError listing the available names (and how to expose a dropout rate)
        _hp.require_hyperparameters(pl_module, [*self.names, *self.derived], user=type(self).__name__)
        self._keep_out_of_buffer_broadcast(pl_module)
        if self.hyperparameters is not None:
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

    def _keep_out_of_buffer_broadcast(self, pl_module: pl.LightningModule) -> None:
        """Exclude the buffers this callback writes from DDP's broadcast of rank 0's buffers before each forward.

        Each rank writes its own perturbed values; a broadcast would replace them by rank 0's while the hyper-layers
        stay conditioned on the rank's own draw. DDP reads ``_ddp_params_and_buffers_to_ignore`` when it wraps the
        module, after the callbacks' ``setup``.
        """
        names = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
        for name in [*self.names, *self.derived]:
            if name in OPTIMIZER_HYPERPARAMETERS:
                continue
            buffer_name = _hp.hyperparameter_buffer_name(pl_module, name)  # KeyError lists the available names
            if buffer_name is not None:
                names.add(buffer_name)
        pl_module.__dict__["_ddp_params_and_buffers_to_ignore"] = sorted(names)

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
            u_hat = hp.sample(extract_batch_size(batch), generator=self._generator())
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
        if self.log_values:
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
            return _through_strategy(trainer, pl_module, lambda: self.validation_loss(pl_module, batch))

        try:
            with torch.inference_mode(False), torch.enable_grad():
                best_response_step(
                    hp, optimizer, objective, self.entropy_weight, extract_batch_size(batch), self._generator()
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
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "steps": self.steps,
            "hyper_steps": self.hyper_steps,
            "val_batches_seen": self.val_batches_seen,
            "draws": self.draws,
            "seed": self.seed,
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
        # one draw per training batch and per hyper-step: the count of checkpoints written before the counter existed
        self.draws = int(state_dict.get("draws", self.steps + self.hyper_steps))
        self.seed = int(state_dict.get("seed", self.seed))
        self.history = list(state_dict["history"])
        self._val_iter = None
        if "hyperparameters" in state_dict:
            if self.hyperparameters is None:
                self._pending_state = state_dict
            else:
                self._load(state_dict)

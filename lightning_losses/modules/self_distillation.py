r"""Iterative ground-truth-weighted self-distillation: generations of one architecture, each taught by the last.

Generation 0 trains on the labels. Generation :math:`t \ge 1` trains a fresh copy of the architecture on
:math:`\xi_t\,\mathrm{onehot}(y) + (1 - \xi_t)\,p^{(t-1)}`, where :math:`p^{(t-1)}` are the predictions of the
frozen generation :math:`t-1` (Borup & Andersen, "Even your teacher needs guidance", NeurIPS 2021; official
code ``Kennethborup/self_distillation``, ``self_distiller.py``, whose loop this follows: a new model per step, the
previous one frozen as its teacher).

* :class:`SelfDistillationModule` is one generation: a :class:`~lightning_losses.DistillationModule` whose
  distillation loss is :class:`~lightning_losses.SelfDistillationLoss` (hyperparameters ``"kd.xi"``,
  ``"kd.temperature"``, ``"kd.weight"``) and which has no separate cross-entropy term.
* :class:`SelfDistillation` runs the generations, with a fixed weight or ``weight="optimal"``: the weight of
  each generation estimated by :func:`~lightning_losses.functional.optimal_ground_truth_weight` from the two extreme
  students (labels only, teacher only) on the validation split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses.functional.self_distillation import optimal_ground_truth_weight
from lightning_losses.losses.self_distillation import SelfDistillationLoss
from lightning_losses.modules.distillation import DistillationModule
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_choice, check_int, check_number

__all__ = ["GenerationResult", "SelfDistillation", "SelfDistillationModule"]


class _LabelsOnly(nn.Module):
    """The stand-in teacher of generation 0: zero logits (ignored, since generation 0 has ``xi = 1``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], self.num_classes, device=x.device)


class SelfDistillationModule(DistillationModule):
    r"""One generation of self-distillation: ``student`` trained on :math:`\xi e_y + (1 - \xi) p^t`.

    The training loss is :class:`~lightning_losses.SelfDistillationLoss` alone (it holds the ground-truth term), so
    ``train/loss`` equals ``train/kd``. Without a ``teacher`` (generation 0) the weight must be 1: the student is
    trained on the labels only. Validation and test log ``val/acc`` and ``test/acc`` as
    :class:`~lightning_losses.DistillationModule` does.

    Args:
        student: The network being trained (inputs → logits).
        teacher: The previous generation (frozen, kept out of the module tree), or ``None`` for generation 0.
        xi: Ground-truth weight in ``[0, 1]`` (hyperparameter ``"kd.xi"``).
        num_classes: Number of classes.
        temperature: Teacher softmax temperature (hyperparameter ``"kd.temperature"``, 1 in the paper).
        criterion: ``"mse"`` (the paper and the official code) or ``"ce"``.
        optimizer, lr, momentum, weight_decay, scheduler: As for :class:`~lightning_losses.DistillationModule`
            (the official code trains with Adam; ``weight_decay`` plays the paper's :math:`\ell_2` penalty).

    Example:
        >>> module = SelfDistillationModule(nn.Linear(8, 3), nn.Linear(8, 3), xi=0.4, num_classes=3)
        >>> sorted(module.named_hyperparameters())
        ['ce_weight', 'kd.temperature', 'kd.weight', 'kd.xi']
        >>> terms, logits, target = module.compute_losses((torch.randn(4, 8), torch.tensor([0, 1, 2, 0])))
        >>> sorted(terms), tuple(logits.shape)
        (['kd'], (4, 3))
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        xi: float = 0.5,
        num_classes: int = 10,
        *,
        temperature: float = 1.0,
        criterion: Literal["mse", "ce"] = "mse",
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        scheduler: Literal["none", "cosine"] = "none",
    ) -> None:
        check_number("xi", xi, low=0.0, high=1.0)
        check_choice("criterion", criterion, ("mse", "ce"))
        if teacher is None and xi != 1.0:
            raise ValueError(
                f"Without a teacher (generation 0) the student trains on the labels only, so `xi` must be 1, got "
                f"{xi}. Pass the previous generation as `teacher`, or xi=1.0."
            )
        check_int(num_classes, "num_classes", low=2)
        super().__init__(
            student,
            teacher if teacher is not None else _LabelsOnly(num_classes),
            method="kd",
            num_classes=num_classes,
            temperature=temperature,
            ce_weight=0.0,
            kd_weight=1.0,
            warmup_epochs=0,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            scheduler=scheduler,
        )
        self.kd = SelfDistillationLoss(xi=xi, temperature=temperature, criterion=criterion)

    def compute_losses(self, batch: Any) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The self-distillation term (``kd``), the student logits and the targets."""
        terms, logits, y = super().compute_losses(batch)
        terms.pop("ce")  # weighted by 0: the ground truth is inside the self-distillation target
        return terms, logits, y


@dataclass(frozen=True)
class GenerationResult:
    """What one generation gave: its ground-truth weight and its accuracies on the validation and test splits.

    ``estimate`` is the unclipped closed-form weight with ``weight="optimal"`` (``xi`` is it clipped to [0, 1]),
    ``None`` otherwise.
    """

    generation: int
    xi: float
    val_accuracy: float | None
    test_accuracy: float | None
    estimate: float | None = None


def _loader_or_none(datamodule: pl.LightningDataModule, stage: str, method: str) -> Iterable[Any] | None:
    try:
        datamodule.setup(stage)
        return getattr(datamodule, method)()
    except (NotImplementedError, AttributeError):  # the data module does not define that split
        return None


@torch.no_grad()
def _predict(model: nn.Module, loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Probabilities ``(N, C)`` and targets ``(N,)`` of ``model`` over ``loader`` (evaluation mode, this process)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probs, targets = [], []
    for batch in loader:
        x, y, _ = unpack_batch(batch)
        if y is None:
            raise ValueError("Self-distillation evaluates accuracy: every batch needs class targets.")
        probs.append(torch.softmax(model(x.to(device)).float(), dim=-1).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(targets)


class SelfDistillation:
    r"""Run ``generations`` rounds of ground-truth-weighted self-distillation and report each one.

    Generation 0 trains ``model_factory()`` on the labels (``xi = 1``). Each later generation trains a fresh
    ``model_factory()`` with the previous generation, frozen, as its teacher, on
    :math:`\xi_t e_y + (1 - \xi_t) p^{(t-1)}`:

    * ``weight=<float>``: the same :math:`\xi` for every generation :math:`t \ge 1` (the official code's
      ``--alpha``);
    * ``weight="optimal"``: :math:`\xi_t` estimated by
      :func:`~lightning_losses.functional.optimal_ground_truth_weight` on the validation split from the student
      trained on the labels only (generation 0: every student starts from the same seed, so a labels-only student
      is generation 0 again) and a student trained on the teacher only (``xi = 0``, one extra training per
      generation); the generation is then trained with :math:`\xi_t`. The estimate assumes, as the paper's kernel
      analysis shows for kernel ridge regression, that predictions are affine in :math:`\xi`.

    Every student is built and trained after ``pl.seed_everything(seed)``, so runs repeat exactly on CPU. Each
    generation gets a new ``pl.Trainer(**trainer_kwargs)``; accuracies are computed on this process over the data
    module's validation and test loaders (``None`` where it has none).

    Args:
        model_factory: Builds a fresh, untrained network (inputs → logits) for each generation.
        datamodule: Batches ``(x, y)``, ``(x, y, index)`` or dicts; a validation split is needed for
            ``weight="optimal"``.
        generations: Number of generations, at least 1 (generation 0 included).
        weight: ``"optimal"`` or a ground-truth weight in ``[0, 1]`` for generations 1, 2, ...
        num_classes: Number of classes.
        criterion: ``"mse"`` (the paper and the official code) or ``"ce"``.
        temperature: Teacher softmax temperature.
        seed: Seed of every student's initialisation and data order.
        module_kwargs: More :class:`SelfDistillationModule` arguments (``optimizer``, ``lr``, ``weight_decay``,
            ``scheduler``, ``momentum``).
        trainer_kwargs: ``pl.Trainer`` arguments; defaults: CPU, 10 epochs, no logger, checkpointing, progress bar
            or model summary.

    Attributes:
        students: The trained network of each generation (after :meth:`fit`).
        results: The :class:`GenerationResult` of each generation (after :meth:`fit`).

    Example:
        >>> from lightning_losses.data import DigitsDataModule
        >>> def make() -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> loop = SelfDistillation(make, DigitsDataModule(batch_size=256), generations=2, weight=0.5,
        ...                         trainer_kwargs={"max_epochs": 1, "limit_train_batches": 2})
        >>> [(r.generation, r.xi) for r in loop.fit()]
        [(0, 1.0), (1, 0.5)]
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        datamodule: pl.LightningDataModule,
        generations: int = 3,
        weight: float | Literal["optimal"] = "optimal",
        num_classes: int = 10,
        *,
        criterion: Literal["mse", "ce"] = "mse",
        temperature: float = 1.0,
        seed: int = 0,
        module_kwargs: dict[str, Any] | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(model_factory):
            raise TypeError(
                f"`model_factory` must be a callable returning a fresh nn.Module, got {type(model_factory).__name__}."
            )
        check_int(generations, "generations", low=1)
        if weight != "optimal":
            if isinstance(weight, str):
                raise ValueError(f"`weight` must be 'optimal' or a number in [0, 1], got {weight!r}.")
            check_number("weight", weight, low=0.0, high=1.0)
        check_choice("criterion", criterion, ("mse", "ce"))
        check_int(seed, "seed")
        for name in ("student", "teacher", "xi", "num_classes", "temperature", "criterion"):
            if module_kwargs and name in module_kwargs:
                raise ValueError(f"`module_kwargs` must not set {name!r}: the loop sets it (pass it to the loop).")
        self.model_factory = model_factory
        self.datamodule = datamodule
        self.generations = generations
        self.weight = weight
        self.num_classes = num_classes
        self.criterion: Literal["mse", "ce"] = criterion
        self.temperature = temperature
        self.seed = seed
        self.module_kwargs = dict(module_kwargs or {})
        self.trainer_kwargs: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 10,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **(trainer_kwargs or {}),
        }
        self.students: list[nn.Module] = []
        self.results: list[GenerationResult] = []

    def train_student(self, teacher: nn.Module | None, xi: float) -> nn.Module:
        """Train one fresh student with ``teacher`` (frozen copy, or ``None``) and weight ``xi``; return it."""
        pl.seed_everything(self.seed, verbose=False)
        frozen = None
        if teacher is not None:
            frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
        module = SelfDistillationModule(
            self.model_factory(),
            frozen,
            xi=float(xi),
            num_classes=self.num_classes,
            temperature=self.temperature,
            criterion=self.criterion,
            **self.module_kwargs,
        )
        trainer = pl.Trainer(**self.trainer_kwargs)
        trainer.fit(module, datamodule=self.datamodule)
        return module.student.eval()

    def _accuracy(self, model: nn.Module, stage: str, method: str) -> float | None:
        loader = _loader_or_none(self.datamodule, stage, method)
        if loader is None:
            return None
        probs, targets = _predict(model, loader)
        return float((probs.argmax(-1) == targets).float().mean()) if targets.numel() else None

    def estimate_weight(self, label_student: nn.Module, teacher_student: nn.Module) -> float:
        """The unclipped :math:`\\xi^\\star` from a labels-only and a teacher-only student on the validation split."""
        loader = _loader_or_none(self.datamodule, "validate", "val_dataloader")
        if loader is None:
            raise ValueError(
                "weight='optimal' estimates the weight on held-out data, but the data module has no "
                "`val_dataloader`: give it a validation split, or pass a fixed `weight`."
            )
        label_probs, targets = _predict(label_student, loader)
        teacher_probs, _ = _predict(teacher_student, loader)
        return float(optimal_ground_truth_weight(label_probs, teacher_probs, targets, clip=False))

    def fit(self) -> list[GenerationResult]:
        """Train every generation; return (and store in :attr:`results`) one :class:`GenerationResult` each."""
        self.students, self.results = [], []
        teacher: nn.Module | None = None
        label_student: nn.Module | None = None
        for generation in range(self.generations):
            estimate = None
            if generation == 0:
                xi = 1.0
            elif self.weight == "optimal":
                assert label_student is not None and teacher is not None
                teacher_only = self.train_student(teacher, 0.0)
                estimate = self.estimate_weight(label_student, teacher_only)
                xi = min(max(estimate, 0.0), 1.0)
            else:
                xi = float(self.weight)
            student: nn.Module
            if generation and self.weight == "optimal" and xi in (0.0, 1.0):
                # the seeded training is deterministic: the probe (or generation 0) is this generation already
                assert label_student is not None
                student = teacher_only if xi == 0.0 else copy.deepcopy(label_student)
            else:
                student = self.train_student(teacher, xi)
            if generation == 0:
                label_student = student
            self.students.append(student)
            self.results.append(
                GenerationResult(
                    generation=generation,
                    xi=xi,
                    val_accuracy=self._accuracy(student, "validate", "val_dataloader"),
                    test_accuracy=self._accuracy(student, "test", "test_dataloader"),
                    estimate=estimate,
                )
            )
            teacher = student
        return self.results

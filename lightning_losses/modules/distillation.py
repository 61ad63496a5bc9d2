"""``DistillationModule``: a ready LightningModule distilling a teacher into a student (KD, DKD, DHKD, KD++, DKD++)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_losses.callbacks.distillation import TeacherClassMeans
from lightning_losses.functional.distillation import project_conflicting_gradient
from lightning_losses.losses.distillation import BinaryKLLoss, DKDLoss, KDLoss, NDLoss
from lightning_losses.mixins.distillation import DistillationMixin
from lightning_losses.modules._optimizers import optimizer_and_schedule
from lightning_losses.nn.distillation import DualHeadClassifier, FeatureProjector
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_choice, check_number, check_targets

__all__ = ["DISTILLATION_DEFAULTS", "DistillationMethod", "DistillationModule"]

DistillationMethod = Literal["kd", "dkd", "dhkd", "nd", "dkd+nd"]

#: Paper defaults per method (distillation.md): CE weight, distillation weight, temperature, DKD α/β, ND weight,
#: warm-up epochs of the distillation term.
DISTILLATION_DEFAULTS: dict[str, dict[str, float]] = {
    # Hinton KD with mdistiller's weights: 0.1·CE + 0.9·KD, T = 4.
    "kd": {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "warmup_epochs": 0},
    # DKD (mdistiller CIFAR): CE + min(epoch/20, 1)·(α·TCKD + β·NCKD), α = 1, β = 8, T = 4.
    "dkd": {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup_epochs": 20},
    # DHKD (CIFAR): γ·CE on the main head + α·BinaryKL(τ = 2) on the auxiliary head, γ = α = 1.
    "dhkd": {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 2.0, "warmup_epochs": 0},
    # KD++ (ND, ResNet32x4 → ResNet8x4): CE + min(epoch/20, 1)·3.5·KD + 2.0·ND, T = 4.
    "nd": {"ce_weight": 1.0, "kd_weight": 3.5, "temperature": 4.0, "nd_weight": 2.0, "warmup_epochs": 20},
    # DKD++: CE + min(epoch/20, 1)·(α·TCKD + β·NCKD) + 0.5·ND, α = 2, β = 8, T = 4.
    "dkd+nd": {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "temperature": 4.0,
        "alpha": 2.0,
        "beta": 8.0,
        "nd_weight": 0.5,
        "warmup_epochs": 20,
    },
}


class DistillationModule(DistillationMixin, pl.LightningModule):
    r"""Train ``student`` to imitate a frozen ``teacher`` with one of five methods and their paper defaults.

    ========  ===========================================================================================
    method    training loss
    ========  ===========================================================================================
    kd        :math:`w_{ce}\,CE + w_{kd}\,T^2\,KL(p_t^T \| p_s^T)`
    dkd       :math:`w_{ce}\,CE + r(e)\,w_{kd}(\alpha\,TCKD + \beta\,NCKD)`
    dhkd      :math:`w_{ce}\,CE(z_{main}) + w_{kd}\,BinaryKL(z_{aux}, z_t)` (student is a ``DualHeadClassifier``)
    nd        :math:`w_{ce}\,CE + r(e)\,w_{kd}\,KD + w_{nd}\,ND` (KD++)
    dkd+nd    :math:`w_{ce}\,CE + r(e)\,w_{kd}\,DKD + w_{nd}\,ND` (DKD++)
    ========  ===========================================================================================

    :math:`r(e) = \min((e+1)/\text{warmup}, 1)` is the epoch warm-up. Any argument left ``None`` takes the paper
    default of :data:`DISTILLATION_DEFAULTS`. Hyperparameters are named tensors: ``"ce_weight"``,
    ``"kd.weight"``, ``"kd.temperature"`` (and ``"kd.alpha"``, ``"kd.beta"`` for DKD, ``"nd.weight"`` for ND),
    so schedules, PBT and STN can drive them. ND reads embeddings by name (``student_feature_layer`` in the
    student, ``teacher_feature_layer`` in the teacher); a :class:`FeatureProjector` maps the student embedding to the
    teacher width when the two differ, and :class:`TeacherClassMeans` is added to the Trainer automatically.

    Batches are ``(x, y)``, ``(x, y, index)`` or dicts; the index enables ``cache_teacher_outputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> module = DistillationModule(nn.Linear(8, 3), nn.Linear(8, 3), method="dkd", num_classes=3)
        >>> sorted(module.named_hyperparameters())
        ['ce_weight', 'kd.alpha', 'kd.beta', 'kd.temperature', 'kd.weight']
        >>> terms, logits, target = module.compute_losses((torch.randn(4, 8), torch.tensor([0, 1, 2, 0])))
        >>> sorted(terms), tuple(logits.shape)
        (['ce', 'kd'], (4, 3))
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module],
        method: DistillationMethod = "kd",
        num_classes: int = 10,
        *,
        temperature: float | None = None,
        ce_weight: float | None = None,
        kd_weight: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        nd_weight: float | None = None,
        warmup_epochs: int | None = None,
        student_feature_layer: str = "backbone",
        teacher_feature_layer: str = "backbone",
        student_feature_dim: int | None = None,
        teacher_feature_dim: int | None = None,
        teacher_weights: Sequence[float] | None = None,
        cache_teacher_outputs: bool = False,
        save_teachers: bool = False,
        gradient_alignment: bool = False,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: Literal["none", "cosine"] = "cosine",
    ) -> None:
        super().__init__()
        if method not in DISTILLATION_DEFAULTS:
            raise ValueError(f"Unknown method {method!r}: expected one of {sorted(DISTILLATION_DEFAULTS)}.")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}.")
        check_choice("optimizer", optimizer, ("sgd", "adamw"))
        check_choice("scheduler", scheduler, ("none", "cosine"))
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        if warmup_epochs is not None:
            check_number("warmup_epochs", warmup_epochs, low=0, integer=True)
        self.save_hyperparameters(ignore=["student", "teacher"])
        defaults = DISTILLATION_DEFAULTS[method]

        def pick(value: float | None, key: str) -> float:
            return float(defaults[key]) if value is None else float(value)

        self.method: str = method
        self.num_classes = num_classes
        self.student = student
        if method == "dhkd" and not isinstance(student, DualHeadClassifier):
            raise TypeError(
                "method='dhkd' trains an auxiliary head: wrap the student as "
                "`DualHeadClassifier(backbone, feature_dim, num_classes)` (lightning_losses.nn)."
            )
        self.register_hyperparameter("ce_weight", pick(ce_weight, "ce_weight"), low=0.0)
        temperature_value = pick(temperature, "temperature")
        warmup = int(pick(warmup_epochs, "warmup_epochs"))
        kd_loss: nn.Module
        if method in ("dkd", "dkd+nd"):
            kd_loss = DKDLoss(
                alpha=pick(alpha, "alpha"),
                beta=pick(beta, "beta"),
                temperature=temperature_value,
                weight=pick(kd_weight, "kd_weight"),
                warmup_epochs=warmup,
            )
        elif method == "dhkd":
            kd_loss = BinaryKLLoss(temperature=temperature_value, weight=pick(kd_weight, "kd_weight"))
        else:
            kd_loss = KDLoss(temperature=temperature_value, weight=pick(kd_weight, "kd_weight"), warmup_epochs=warmup)

        self.uses_nd = method in ("nd", "dkd+nd")
        self.student_feature_layer = f"student.{student_feature_layer}"
        self.teacher_feature_layer = teacher_feature_layer
        if self.uses_nd:
            self.nd = NDLoss(weight=pick(nd_weight, "nd_weight"))
            if student_feature_dim is not None and teacher_feature_dim is not None:
                if student_feature_dim != teacher_feature_dim:
                    self.projector: nn.Module = FeatureProjector(student_feature_dim, teacher_feature_dim)
                else:
                    self.projector = nn.Identity()
            elif student_feature_dim is not None or teacher_feature_dim is not None:
                raise ValueError("Pass both `student_feature_dim` and `teacher_feature_dim`, or neither.")
            else:
                self.projector = nn.Identity()
        self.configure_distillation(
            teacher,
            loss=kd_loss,
            teacher_weights=teacher_weights,
            student_features=[self.student_feature_layer] if self.uses_nd else [],
            teacher_features=[teacher_feature_layer] if self.uses_nd else [],
            cache_teacher_outputs=cache_teacher_outputs,
            save_teachers=save_teachers,
        )
        self.gradient_alignment = gradient_alignment
        if gradient_alignment:
            self.automatic_optimization = False
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x: Tensor) -> Tensor:
        """Student logits (the main head for a ``DualHeadClassifier``)."""
        return self.student(x)

    def compute_losses(self, batch: Any) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Return the weighted loss terms (``ce``, ``kd`` and ``nd`` where used), the student logits and targets."""
        x, y, index = unpack_batch(batch)
        if y is None:
            raise ValueError("DistillationModule needs class targets in every training batch.")
        teacher_logits = self.teacher_forward(x, index=index)
        if self.method == "dhkd":
            assert isinstance(self.student, DualHeadClassifier)
            out = self.student.forward_heads(x)
            logits, kd_input = out.logits, out.aux_logits
        else:
            logits = kd_input = self.student(x)
        if logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"The student predicts {logits.shape[-1]} classes but the teacher {teacher_logits.shape[-1]}: "
                "both must share the label space."
            )
        check_targets(y, logits.shape[-1], logits.shape[0])
        terms = {
            "ce": self.get_hyperparameter("ce_weight") * F.cross_entropy(logits.float(), y),
            "kd": self.distillation_loss(kd_input, teacher_logits, y),
        }
        if self.uses_nd:
            if self.teacher_class_means.numel() == 0:
                raise RuntimeError(
                    "ND needs the teacher class means: train with the TeacherClassMeans callback (added "
                    "automatically by `configure_callbacks`) or call `set_teacher_class_means`."
                )
            student_feats = self.projector(self.student_features(self.student_feature_layer).flatten(1))
            teacher_feats = self.teacher_features(self.teacher_feature_layer).flatten(1)
            if student_feats.shape[-1] != teacher_feats.shape[-1]:
                raise ValueError(
                    f"Student embeddings have width {student_feats.shape[-1]} but teacher embeddings "
                    f"{teacher_feats.shape[-1]}: pass `student_feature_dim` and `teacher_feature_dim` so a "
                    "FeatureProjector maps one to the other."
                )
            terms["nd"] = self.nd(student_feats, teacher_feats, self.teacher_class_means, y)
        return terms, logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, logits, y = self.compute_losses(batch)
        loss = torch.stack(list(terms.values())).sum()
        if self.gradient_alignment:
            self._aligned_step(terms)
        self.train_accuracy(logits.detach(), y)
        batch_size = y.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _aligned_step(self, terms: dict[str, Tensor]) -> None:
        """DHKD gradient alignment: a term whose gradient conflicts with the CE gradient is projected first."""
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        params = [p for p in self.parameters() if p.requires_grad]
        names = list(terms)
        grads = [
            torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1, allow_unused=True)
            for i, name in enumerate(names)
        ]
        flat = [
            torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
            for gs in grads
        ]
        reference = flat[names.index("ce")]
        total = reference.clone()
        for name, g in zip(names, flat):
            if name != "ce":
                total += project_conflicting_gradient(g, reference)
        optimizer.zero_grad()
        offset = 0
        for p in params:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.gradient_alignment:
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()  # type: ignore[union-attr]

    def _evaluate(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> None:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        assert y is not None
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), y), sync_dist=True, batch_size=y.shape[0])
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _, _ = unpack_batch(batch)
        return self(x)

    # ------------------------------------------------------------------ Lightning configuration
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.gradient_alignment and self.trainer.world_size > 1:
            raise ValueError(
                "gradient_alignment=True computes per-loss gradients with torch.autograd.grad, which bypasses the "
                "DDP gradient all-reduce: train it on one device, or set gradient_alignment=False."
            )

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        callbacks: list[Callback] = getattr(self.trainer, "callbacks", [])
        if self.uses_nd and not any(isinstance(c, TeacherClassMeans) for c in callbacks):
            return [TeacherClassMeans(feature_layer=self.teacher_feature_layer)]
        return []

    def configure_optimizers(self) -> Any:
        return optimizer_and_schedule(self)

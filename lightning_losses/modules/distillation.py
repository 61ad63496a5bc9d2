"""``DistillationModule``: a ready LightningModule distilling a teacher into a student.

Methods are presets of the loss classes: :data:`DISTILLATION_PRESETS` maps each name to the logit loss (stored at
``kd``) and, for the feature methods, the feature loss (stored at the attribute the preset names), each with the
settings of its paper. Adding a method is one row of that table.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_losses.callbacks.distillation import TeacherClassMeans
from lightning_losses.functional.distillation import project_conflicting_gradient
from lightning_losses.losses.distillation import BinaryKLLoss, DISTLoss, DKDLoss, KDLoss, NDLoss, PLDLoss
from lightning_losses.losses.feature_distillation import AttentionTransferLoss, CRDLoss, FitNetLoss, RKDLoss
from lightning_losses.mixins.distillation import DistillationMixin
from lightning_losses.modules._optimizers import optimizer_and_schedule
from lightning_losses.modules.classification import ClassifierEvaluation
from lightning_losses.nn.distillation import DualHeadClassifier, FeatureProjector
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_choice, check_number, check_targets

__all__ = [
    "DISTILLATION_DEFAULTS",
    "DISTILLATION_PRESETS",
    "DistillationMethod",
    "DistillationModule",
    "DistillationPreset",
]

DistillationMethod = Literal[
    "kd", "dkd", "dhkd", "nd", "dkd+nd", "pld", "dist", "kd_ls", "dkd_ls", "fitnet", "at", "rkd", "crd"
]


@dataclass(frozen=True)
class DistillationPreset:
    """One method of :class:`DistillationModule`: its losses and the settings of its paper.

    Attributes:
        loss: The logit loss class, stored at ``kd`` (weight 0 where the method is a feature loss alone).
        settings: Keyword arguments of ``loss``; the module's ``temperature``, ``kd_weight`` (``weight``),
            ``alpha``, ``beta`` and ``warmup_epochs`` override the keys present here.
        ce_weight: Weight of the cross-entropy on the student's (main) logits.
        feature_loss: The feature loss class, or ``None``.
        feature_attribute: The attribute the feature loss is stored at (its hyperparameters are
            ``"<attribute>.weight"``, ...).
        feature_settings: Keyword arguments of ``feature_loss``; ``feature_weight`` (or ``nd_weight``) overrides
            ``weight`` and ``feature_options`` any other key.
        features: ``"embedding"`` (features flattened to ``(N, D)``) or ``"map"`` (feature maps as they are).
        auxiliary_head: The logit loss goes to the auxiliary head of a :class:`DualHeadClassifier` (DHKD).
        class_means: The feature loss reads the teacher class means (ND: :class:`TeacherClassMeans` is added).
    """

    loss: type[nn.Module]
    settings: Mapping[str, float | bool] = field(default_factory=dict)
    ce_weight: float = 1.0
    feature_loss: type[nn.Module] | None = None
    feature_attribute: str | None = None
    feature_settings: Mapping[str, Any] = field(default_factory=dict)
    features: Literal["embedding", "map"] = "embedding"
    auxiliary_head: bool = False
    class_means: bool = False


_NO_KD = {"temperature": 4.0, "weight": 0.0, "warmup_epochs": 0}  # a feature method alone: KD off, tunable

#: The methods of :class:`DistillationModule` (distillation.md and each method's official code).
DISTILLATION_PRESETS: Mapping[str, DistillationPreset] = MappingProxyType(
    {
        # Hinton KD with mdistiller's weights: 0.1·CE + 0.9·KD, T = 4.
        "kd": DistillationPreset(KDLoss, {"temperature": 4.0, "weight": 0.9, "warmup_epochs": 0}, ce_weight=0.1),
        # DKD (mdistiller CIFAR): CE + min(epoch/20, 1)·(α·TCKD + β·NCKD), α = 1, β = 8, T = 4.
        "dkd": DistillationPreset(
            DKDLoss, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "weight": 1.0, "warmup_epochs": 20}
        ),
        # DHKD (CIFAR): γ·CE on the main head + α·BinaryKL(τ = 2) on the auxiliary head, γ = α = 1.
        "dhkd": DistillationPreset(BinaryKLLoss, {"temperature": 2.0, "weight": 1.0}, auxiliary_head=True),
        # KD++ (ND, ResNet32x4 → ResNet8x4): CE + min(epoch/20, 1)·3.5·KD + 2.0·ND, T = 4.
        "nd": DistillationPreset(
            KDLoss,
            {"temperature": 4.0, "weight": 3.5, "warmup_epochs": 20},
            feature_loss=NDLoss,
            feature_attribute="nd",
            feature_settings={"weight": 2.0},
            class_means=True,
        ),
        # DKD++: CE + min(epoch/20, 1)·(α·TCKD + β·NCKD) + 0.5·ND, α = 2, β = 8, T = 4.
        "dkd+nd": DistillationPreset(
            DKDLoss,
            {"alpha": 2.0, "beta": 8.0, "temperature": 4.0, "weight": 1.0, "warmup_epochs": 20},
            feature_loss=NDLoss,
            feature_attribute="nd",
            feature_settings={"weight": 0.5},
            class_means=True,
        ),
        # PLD (paper, Sec. 4): one list-wise loss in place of CE + KD, τ = 1 (its ImageNet setting and code default).
        "pld": DistillationPreset(PLDLoss, {"temperature": 1.0, "weight": 1.0}, ce_weight=0.0),
        # DIST (hunto/DIST_KD, ImageNet): CE + β·inter + γ·intra Pearson relations, β = γ = 1, τ = 1.
        "dist": DistillationPreset(DISTLoss, {"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "weight": 1.0}),
        # Logit-standardised KD (sunshangquan/logit-standardization-KD): CE + 9·T²·KL of z-scored logits, T = 2.
        "kd_ls": DistillationPreset(
            KDLoss, {"temperature": 2.0, "weight": 9.0, "warmup_epochs": 0, "logit_standardization": True}
        ),
        # Logit-standardised DKD as the official tools/train.py runs it: α = 9, β = 9·9 = 81, T = 4, 20-epoch warm-up.
        "dkd_ls": DistillationPreset(
            DKDLoss,
            {
                "alpha": 9.0,
                "beta": 81.0,
                "temperature": 4.0,
                "weight": 1.0,
                "warmup_epochs": 20,
                "logit_standardization": True,
            },
        ),
        # FitNet (RepDistiller): CE + 100·MSE(regressor(student hint), teacher hint).
        "fitnet": DistillationPreset(
            KDLoss,
            _NO_KD,
            feature_loss=FitNetLoss,
            feature_attribute="fitnet",
            feature_settings={"weight": 100.0},
            features="map",
        ),
        # Attention transfer (official): CE + β/2·Σ_groups at_loss, β = 1000, p = 2.
        "at": DistillationPreset(
            KDLoss,
            _NO_KD,
            feature_loss=AttentionTransferLoss,
            feature_attribute="at",
            feature_settings={"beta": 1000.0, "weight": 1.0},
            features="map",
        ),
        # RKD (paper, RepDistiller): CE + 25·distance + 50·angle on the penultimate embeddings.
        "rkd": DistillationPreset(
            KDLoss,
            _NO_KD,
            feature_loss=RKDLoss,
            feature_attribute="rkd",
            feature_settings={"distance_weight": 25.0, "angle_weight": 50.0, "weight": 1.0},
        ),
        # CRD (RepDistiller): CE + 0.8·CRD, embeddings 128, K = 16384, τ = 0.07, momentum 0.5.
        "crd": DistillationPreset(
            KDLoss,
            _NO_KD,
            feature_loss=CRDLoss,
            feature_attribute="crd",
            feature_settings={
                "weight": 0.8,
                "embed_dim": 128,
                "num_negatives": 16384,
                "temperature": 0.07,
                "momentum": 0.5,
            },
        ),
    }
)


def _defaults_view(preset: DistillationPreset) -> dict[str, float]:
    view: dict[str, float] = {"ce_weight": preset.ce_weight}
    renamed = {"weight": "kd_weight"}
    for key in ("weight", "temperature", "alpha", "beta"):
        if key in preset.settings:
            view[renamed.get(key, key)] = float(preset.settings[key])
    view["warmup_epochs"] = preset.settings.get("warmup_epochs", 0)
    if preset.feature_attribute is not None:
        name = "nd_weight" if preset.feature_attribute == "nd" else "feature_weight"
        view[name] = float(preset.feature_settings.get("weight", 1.0))
    return view


#: Deprecated view of :data:`DISTILLATION_PRESETS` kept for existing code: per method, the CE weight, distillation
#: weight, temperature, DKD α/β, feature weight (``nd_weight`` for ND) and warm-up epochs.
DISTILLATION_DEFAULTS: dict[str, dict[str, float]] = {
    name: _defaults_view(p) for name, p in DISTILLATION_PRESETS.items()
}


def _accepts(cls: type[nn.Module], name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


class DistillationModule(DistillationMixin, ClassifierEvaluation):
    r"""Train ``student`` to imitate a frozen ``teacher`` with one of the methods of :data:`DISTILLATION_PRESETS`.

    ========  ===========================================================================================
    method    training loss
    ========  ===========================================================================================
    kd        :math:`w_{ce}\,CE + w_{kd}\,T^2\,KL(p_t^T \| p_s^T)`
    dkd       :math:`w_{ce}\,CE + r(e)\,w_{kd}(\alpha\,TCKD + \beta\,NCKD)`
    dhkd      :math:`w_{ce}\,CE(z_{main}) + w_{kd}\,BinaryKL(z_{aux}, z_t)` (student is a ``DualHeadClassifier``)
    nd        :math:`w_{ce}\,CE + r(e)\,w_{kd}\,KD + w_{nd}\,ND` (KD++)
    dkd+nd    :math:`w_{ce}\,CE + r(e)\,w_{kd}\,DKD + w_{nd}\,ND` (DKD++)
    fitnet    :math:`CE + 100\,MSE(r(h_s), h_t)` on hint feature maps (:class:`~lightning_losses.FitNetLoss`)
    at        :math:`CE + \tfrac{1000}{2}\sum_g AT_g` (:class:`~lightning_losses.AttentionTransferLoss`)
    rkd       :math:`CE + 25\,RKD_D + 50\,RKD_A` on embeddings (:class:`~lightning_losses.RKDLoss`)
    crd       :math:`CE + 0.8\,CRD` on embeddings, memory bank of the training set (:class:`~lightning_losses.CRDLoss`)
    ========  ===========================================================================================

    :math:`r(e) = \min((e+1)/\text{warmup}, 1)` is the epoch warm-up. Any argument left ``None`` takes the preset's
    setting. Hyperparameters are named tensors: ``"ce_weight"``, ``"kd.weight"``, ``"kd.temperature"`` (and
    ``"kd.alpha"``, ``"kd.beta"`` for DKD) and the feature loss's (``"nd.weight"``, ``"fitnet.weight"``,
    ``"at.beta"``, ``"rkd.angle_weight"``, ``"crd.temperature"``, ...), so schedules, PBT and STN can drive them.
    The feature methods keep the KD term at weight 0 (``kd_weight`` turns it on, as RepDistiller's ``-a``).

    Features are read by name: ``student_feature_layer`` in the student, ``teacher_feature_layer`` in the teacher
    (a sequence of names for attention transfer over several groups). ND projects the student embedding with a
    :class:`FeatureProjector` and FitNet regresses the student hint with a :class:`~lightning_losses.nn.HintRegressor`
    when ``student_feature_dim`` and ``teacher_feature_dim`` differ; CRD needs both dims and ``num_samples`` (the
    training set size) and batches ``(x, y, index)``. :class:`TeacherClassMeans` is added to the Trainer for ND.

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
        method: DistillationMethod | str = "kd",
        num_classes: int = 10,
        *,
        temperature: float | None = None,
        ce_weight: float | None = None,
        kd_weight: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        nd_weight: float | None = None,
        feature_weight: float | None = None,
        feature_options: Mapping[str, Any] | None = None,
        warmup_epochs: int | None = None,
        student_feature_layer: str | Sequence[str] = "backbone",
        teacher_feature_layer: str | Sequence[str] = "backbone",
        student_feature_dim: int | None = None,
        teacher_feature_dim: int | None = None,
        num_samples: int | None = None,
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
        if method not in DISTILLATION_PRESETS:
            raise ValueError(f"Unknown method {method!r}: expected one of {sorted(DISTILLATION_PRESETS)}.")
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
        preset = DISTILLATION_PRESETS[method]
        self.method: str = method
        self.preset = preset
        self.num_classes = num_classes
        self.student = student
        if preset.auxiliary_head and not isinstance(student, DualHeadClassifier):
            raise TypeError(
                f"method={method!r} trains an auxiliary head: wrap the student as "
                "`DualHeadClassifier(backbone, feature_dim, num_classes)` (lightning_losses.nn)."
            )
        self.register_hyperparameter("ce_weight", preset.ce_weight if ce_weight is None else float(ce_weight), low=0.0)
        overrides = {
            "temperature": temperature,
            "weight": kd_weight,
            "alpha": alpha,
            "beta": beta,
            "warmup_epochs": warmup_epochs,
        }
        unused = sorted(
            ("kd_weight" if k == "weight" else k)
            for k, v in overrides.items()
            if v is not None and k not in preset.settings
        )
        if unused:
            raise ValueError(
                f"method={method!r} has no setting {unused} ({preset.loss.__name__} takes "
                f"{sorted(preset.settings)}): leave them unset for this method."
            )
        settings: dict[str, Any] = {
            k: v if isinstance(v, bool) else float(v) for k, v in preset.settings.items() if k != "warmup_epochs"
        }
        settings.update({k: float(v) for k, v in overrides.items() if v is not None and k in settings})
        if "warmup_epochs" in preset.settings:
            settings["warmup_epochs"] = int(
                preset.settings["warmup_epochs"] if warmup_epochs is None else warmup_epochs
            )
        kd_loss = preset.loss(**settings)

        students = (student_feature_layer,) if isinstance(student_feature_layer, str) else tuple(student_feature_layer)
        teachers = (teacher_feature_layer,) if isinstance(teacher_feature_layer, str) else tuple(teacher_feature_layer)
        if not students or len(students) != len(teachers) or (len(students) > 1 and method != "at"):
            raise ValueError(
                f"Give one teacher feature layer per student feature layer (several only for method='at'), got "
                f"student {list(students)} and teacher {list(teachers)}."
            )
        self.student_feature_layers = tuple(f"student.{name}" for name in students)
        self.teacher_feature_layers = teachers
        self.student_feature_layer, self.teacher_feature_layer = self.student_feature_layers[0], teachers[0]
        self.uses_nd = preset.class_means
        self.feature_attribute = preset.feature_attribute
        if (student_feature_dim is None) != (teacher_feature_dim is None):
            raise ValueError("Pass both `student_feature_dim` and `teacher_feature_dim`, or neither.")
        if preset.feature_loss is not None:
            self._build_feature_loss(
                preset,
                feature_weight if preset.feature_attribute != "nd" else nd_weight,
                feature_options,
                student_feature_dim,
                teacher_feature_dim,
                num_samples,
            )
        uses_features = preset.feature_loss is not None
        self.configure_distillation(
            teacher,
            loss=kd_loss,
            teacher_weights=teacher_weights,
            student_features=list(self.student_feature_layers) if uses_features else [],
            teacher_features=list(teachers) if uses_features else [],
            cache_teacher_outputs=cache_teacher_outputs,
            save_teachers=save_teachers,
        )
        self.gradient_alignment = gradient_alignment
        if gradient_alignment:
            self.automatic_optimization = False
        self.add_accuracy_metrics(num_classes)

    def _build_feature_loss(
        self,
        preset: DistillationPreset,
        weight: float | None,
        options: Mapping[str, Any] | None,
        student_dim: int | None,
        teacher_dim: int | None,
        num_samples: int | None,
    ) -> None:
        """Build the preset's feature loss at its attribute (and ND's projector, kept at ``projector``)."""
        loss_cls, attribute = preset.feature_loss, preset.feature_attribute
        assert loss_cls is not None and attribute is not None
        settings = dict(preset.feature_settings)
        unknown = sorted(k for k in (options or {}) if not _accepts(loss_cls, k))
        if unknown:
            raise ValueError(
                f"`feature_options` names {unknown}, which {loss_cls.__name__} does not take. Its settings: "
                f"{[n for n in inspect.signature(loss_cls.__init__).parameters if n != 'self']}."
            )
        settings.update(options or {})
        if weight is not None:
            settings["weight"] = float(weight)
        structure = {"student_dim": student_dim, "teacher_dim": teacher_dim, "num_samples": num_samples}
        for name, value in structure.items():
            if _accepts(loss_cls, name):
                required = inspect.signature(loss_cls.__init__).parameters[name].default is inspect.Parameter.empty
                if value is None and required:
                    raise ValueError(
                        f"method={self.method!r} needs `{name}`"
                        + (
                            " (the training set size: the memory bank has one row per sample)"
                            if name == "num_samples"
                            else " (the flattened width of the captured features)"
                        )
                        + ": pass it to DistillationModule."
                    )
                settings[name] = value
        setattr(self, attribute, loss_cls(**settings))
        if preset.class_means:  # ND compares the projected student embedding with the teacher's
            same = student_dim is None or student_dim == teacher_dim
            self.projector: nn.Module = nn.Identity() if same else FeatureProjector(student_dim, teacher_dim)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x: Tensor) -> Tensor:
        """Student logits (the main head for a ``DualHeadClassifier``)."""
        return self.student(x)

    def compute_losses(self, batch: Any) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Return the weighted loss terms (``ce``, ``kd`` and the feature term where used), logits and targets."""
        x, y, index = unpack_batch(batch)
        if y is None:
            raise ValueError("DistillationModule needs class targets in every training batch.")
        teacher_logits = self.teacher_forward(x, index=index)
        if self.preset.auxiliary_head:
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
        if self.feature_attribute is not None:
            terms[self.feature_attribute] = self._feature_term(y, index)
        return terms, logits, y

    def _feature_term(self, y: Tensor, index: Tensor | None) -> Tensor:
        """The preset's feature loss on the captured features, with the extras its ``forward`` declares."""
        assert self.feature_attribute is not None
        loss: nn.Module = getattr(self, self.feature_attribute)
        students = [self.student_features(n) for n in self.student_feature_layers]
        teachers = [self.teacher_features(n) for n in self.teacher_feature_layers]
        if self.preset.features == "embedding":
            students, teachers = [f.flatten(1) for f in students], [f.flatten(1) for f in teachers]
        if self.preset.class_means:
            if self.teacher_class_means.numel() == 0:
                raise RuntimeError(
                    "ND needs the teacher class means: train with the TeacherClassMeans callback (added "
                    "automatically by `configure_callbacks`) or call `set_teacher_class_means`."
                )
            students = [self.projector(students[0])]
            if students[0].shape[-1] != teachers[0].shape[-1]:
                raise ValueError(
                    f"Student embeddings have width {students[0].shape[-1]} but teacher embeddings "
                    f"{teachers[0].shape[-1]}: pass `student_feature_dim` and `teacher_feature_dim` so a "
                    "FeatureProjector maps one to the other."
                )
        student: Any = students if len(students) > 1 else students[0]
        teacher: Any = teachers if len(teachers) > 1 else teachers[0]
        available = {"target": y, "index": index, "class_means": self.teacher_class_means}
        parameters = inspect.signature(type(loss).forward).parameters
        kwargs = {name: value for name, value in available.items() if name in parameters}
        if "index" in kwargs and index is None:
            raise ValueError(
                f"method={self.method!r} needs each sample's index in the training set: give batches "
                "(x, y, index) or dicts with an 'index' key."
            )
        return loss(student, teacher, **kwargs)

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

    def _evaluation_outputs(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        assert y is not None
        return logits, y

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
        if self.preset.class_means and not any(isinstance(c, TeacherClassMeans) for c in callbacks):
            return [TeacherClassMeans(feature_layer=self.teacher_feature_layer)]
        return []

    def configure_optimizers(self) -> Any:
        return optimizer_and_schedule(self)

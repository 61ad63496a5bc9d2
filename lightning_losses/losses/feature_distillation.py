r"""Feature-distillation loss modules: FitNet, attention transfer, RKD and CRD.

Each module is the ``nn.Module`` twin of a function of :mod:`lightning_losses.functional.feature_distillation` and
follows the family's call contract ``loss(student_features, teacher_features, ...)``; a module that needs more
declares it in ``forward`` (CRD: the samples' ``index``). The learned parts are submodules of the loss, so they are
trained with the student when the loss is an attribute of the LightningModule: FitNet's regressor, CRD's two
embedding heads; CRD's memory bank and normalisation constants are persistent buffers (checkpointed, restored on
resume). Tunable settings are named float32 hyperparameters (``"at.beta"``, ``"rkd.distance_weight"``,
``"crd.temperature"``, ``"<name>.weight"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_losses.functional.feature_distillation import (
    attention_transfer_loss,
    crd_loss,
    fitnet_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from lightning_losses.losses.distillation import DistillationLoss
from lightning_losses.nn.distillation import HintRegressor, NormalizedEmbedding
from lightning_losses.utilities.checks import check_hyperparameter, check_int
from lightning_losses.utilities.distributed import all_gather_rows, all_reduce, rank_and_world_size
from lightning_losses.utilities.numerics import hyperparameter_tensor

__all__ = ["AttentionTransferLoss", "CRDLoss", "FitNetLoss", "RKDLoss"]


def _optional_dim(name: str, value: int | None) -> None:
    if value is not None:
        check_int(value, name, low=1)


class FitNetLoss(DistillationLoss):
    r"""FitNets' hint loss with its regressor: :math:`\lambda\,\mathrm{MSE}(r(f^s), f^t)`.

    See :func:`~lightning_losses.functional.fitnet_loss`. The regressor :math:`r` is a submodule (trained with the
    student): ``regressor`` when given, else a :class:`~lightning_losses.nn.HintRegressor` when ``student_dim``
    and ``teacher_dim`` differ, else the identity.

    Args:
        student_dim: Channels of the student hint (with ``teacher_dim``: builds the regressor).
        teacher_dim: Channels of the teacher hint.
        regressor: Your own regressor (overrides the dims).
        weight: ``λ >= 0`` (hyperparameter ``weight``; RepDistiller uses 100 beside cross-entropy).

    Example:
        >>> import torch
        >>> f = torch.randn(4, 8, 3, 3)
        >>> float(FitNetLoss()(f, f))
        0.0
        >>> loss = FitNetLoss(student_dim=4, teacher_dim=8)
        >>> type(loss.regressor).__name__, bool(loss(torch.randn(4, 4, 3, 3), f) > 0)
        ('HintRegressor', True)
    """

    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        regressor: nn.Module | None = None,
        weight: float | Tensor = 1.0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        _optional_dim("student_dim", student_dim)
        _optional_dim("teacher_dim", teacher_dim)
        if regressor is None:
            if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
                regressor = HintRegressor(student_dim, teacher_dim)
            else:
                regressor = nn.Identity()
        self.regressor = regressor

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """Return the weighted hint loss of the regressed student features."""
        per_sample = fitnet_loss(self.regressor(student_features), teacher_features, reduction="none")
        return self._weighted(per_sample, "batchmean")


class AttentionTransferLoss(DistillationLoss):
    r"""Attention transfer over one or several pairs of feature maps, :math:`\lambda\,\tfrac{\beta}{2}\sum_g`.

    .. math::

        \mathcal{L} = \lambda\,\frac{\beta}{2} \sum_{g} \frac{1}{N\,H_g W_g} \sum_{i,h,w}
        \big(Q^s_{g,i,hw} - Q^t_{g,i,hw}\big)^2

    with :func:`~lightning_losses.functional.attention_map` :math:`Q`; the official total
    (szagoruyko/attention-transfer: ``opt.beta / 2 * sum(at_loss(x, y) for each group)``, ``--beta 1e3``).

    Args:
        beta: ``β >= 0`` (hyperparameter ``beta``, official 1000).
        p: Power of the attention maps (official 2).
        weight: ``λ >= 0`` (hyperparameter ``weight``).

    Example:
        >>> import torch
        >>> s = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
        >>> t = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
        >>> from lightning_losses.functional import attention_transfer_loss as at
        >>> expected = 500 * (at(s[0], t[0]) + at(s[1], t[1]))
        >>> bool(torch.isclose(AttentionTransferLoss()(s, t), expected))
        True
    """

    beta: Tensor

    def __init__(self, beta: float | Tensor = 1000.0, p: float = 2.0, weight: float | Tensor = 1.0) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        check_hyperparameter(beta, "beta", low=0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"`p` must be a positive number, got {p!r}. The official attention transfer uses p = 2.")
        self.p = float(p)
        self.register_hyperparameter("beta", beta, low=0.0)

    def forward(
        self, student_features: Tensor | Sequence[Tensor], teacher_features: Tensor | Sequence[Tensor]
    ) -> Tensor:
        """Return the weighted attention-transfer loss summed over the pairs of feature maps."""
        students = [student_features] if isinstance(student_features, Tensor) else list(student_features)
        teachers = [teacher_features] if isinstance(teacher_features, Tensor) else list(teacher_features)
        if not students or len(students) != len(teachers):
            raise ValueError(
                f"AttentionTransferLoss needs one teacher feature map per student feature map, got {len(students)} "
                f"student and {len(teachers)} teacher maps."
            )
        per_sample = sum(attention_transfer_loss(s, t, self.p, reduction="none") for s, t in zip(students, teachers))
        assert isinstance(per_sample, Tensor)
        beta = hyperparameter_tensor(self.beta, per_sample, "beta", validate=False)
        return self._weighted(per_sample * beta / 2, "batchmean")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p:g}"


class RKDLoss(DistillationLoss):
    r"""Relational knowledge distillation, :math:`\lambda(\lambda_D\,\mathcal{L}_D + \lambda_A\,\mathcal{L}_A)`.

    See :func:`~lightning_losses.functional.rkd_loss`. A batch-level loss (it compares samples with each other),
    so ``weight`` is a scalar. Embeddings of any rank are flattened to ``(N, D)``; the widths may differ.

    Args:
        distance_weight: :math:`\lambda_D \ge 0` (hyperparameter ``distance_weight``, default 25).
        angle_weight: :math:`\lambda_A \ge 0` (hyperparameter ``angle_weight``, default 50).
        weight: ``λ >= 0`` (hyperparameter ``weight``).

    Example:
        >>> import torch
        >>> e = torch.randn(8, 4)
        >>> rotation, _ = torch.linalg.qr(torch.randn(4, 4))
        >>> float(RKDLoss()(0.5 * e @ rotation, e)) < 1e-10
        True
    """

    distance_weight: Tensor
    angle_weight: Tensor

    def __init__(
        self, distance_weight: float | Tensor = 25.0, angle_weight: float | Tensor = 50.0, weight: float | Tensor = 1.0
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        check_hyperparameter(distance_weight, "distance_weight", low=0.0)
        check_hyperparameter(angle_weight, "angle_weight", low=0.0)
        self.register_hyperparameter("distance_weight", distance_weight, low=0.0)
        self.register_hyperparameter("angle_weight", angle_weight, low=0.0)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """Return the weighted RKD loss of the two batches of embeddings."""
        distance = rkd_distance_loss(student_features, teacher_features)
        angle = rkd_angle_loss(student_features, teacher_features, validate_args=False)
        total = self.distance_weight.to(distance) * distance + self.angle_weight.to(angle) * angle
        return self.weight.to(total).reshape(()) * total


def _sample_ids(sample_ids: Tensor | Sequence[int], num_samples: int) -> Tensor:
    ids = torch.as_tensor(sample_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim != 1:
        raise TypeError(
            f"`sample_ids` must be a 1-D sequence of integer sample ids, got {ids.dtype} of shape {tuple(ids.shape)}."
        )
    ids = ids.long().sort().values
    if ids.numel() != num_samples or bool((ids[1:] == ids[:-1]).any()):
        raise ValueError(
            f"`sample_ids` must hold num_samples = {num_samples} distinct ids (one bank row each), got "
            f"{ids.numel()} with {ids.numel() - ids.unique().numel()} repeated."
        )
    return ids


class CRDLoss(DistillationLoss):
    r"""Contrastive representation distillation with its embedding heads and memory bank, correct under DDP.

    .. math::

        \mathcal{L} = \lambda\,\Big[\mathrm{NCE}\big(\langle m^t_{\cdot}, v^s\rangle/\tau - \log Z_s\big)
        + \mathrm{NCE}\big(\langle m^s_{\cdot}, v^t\rangle/\tau - \log Z_t\big)\Big]

    (:func:`~lightning_losses.functional.crd_loss`), :math:`v^s = e_s(f^s)`, :math:`v^t = e_t(f^t)` from the two
    :class:`~lightning_losses.nn.NormalizedEmbedding` heads. The official ``CRDLoss`` / ``ContrastMemory``
    (HobbitLong/RepDistiller, ``crd/criterion.py``, ``crd/memory.py``), defaults as there (embedding 128,
    K = 16384 negatives, τ = 0.07, momentum 0.5):

    * the memory bank: two persistent buffers ``(num_samples, embed_dim)`` initialised uniformly in
      :math:`\pm 1/\sqrt{D/3}`; in training, after the scores, each sample's row becomes
      :math:`\mathrm{normalize}(\mu\, m_i + (1-\mu)\, v_i)`;
    * the negatives: drawn uniformly from the data set (``K`` per sample, the sample's own row first) unless
      ``contrast_index`` is passed;
    * :math:`Z`: set once, from the first training batch, to the mean of :math:`\exp(\text{score}/\tau)` times
      ``num_samples``, then kept (a persistent buffer ``log_normalizers``, :math:`[\log Z_s, \log Z_t]`).

    Where this differs from the official single-GPU code, for distributed training: the memory update all-gathers
    the indices and embeddings of every rank, so each rank's bank stays identical (and equal to one process
    training on the concatenated batch; a sample present twice keeps its last update, in rank order); :math:`Z`
    is the mean over every rank's first batch; the initial bank is drawn from ``seed`` and the negatives of each
    step from ``(seed, step, rank)``, so every rank starts from the same bank and a resumed run draws what the
    uninterrupted run drew. Under DDP every rank must call the loss the same number of times (the update is
    collective). DDP also broadcasts buffers from rank 0 each step by default; that is correct but moves the
    whole bank, so ``DDPStrategy(broadcast_buffers=False)`` saves the traffic.

    Args:
        student_dim: Flattened width of the student features.
        teacher_dim: Flattened width of the teacher features.
        num_samples: Size of the training set (rows of the memory bank); ``index`` lies in ``[0, num_samples)``
            unless ``sample_ids`` is given.
        embed_dim: Embedding width (official 128).
        num_negatives: Negatives per sample ``K`` (official 16384).
        temperature: ``τ > 0`` (hyperparameter ``temperature``, official 0.07).
        momentum: Memory momentum in ``[0, 1)`` (hyperparameter ``momentum``, official 0.5).
        weight: ``λ >= 0`` (hyperparameter ``weight``; RepDistiller uses 0.8 beside cross-entropy).
        seed: Seed of the initial bank and of the negatives.
        sample_ids: The indices of the training samples, when they are ids in a larger data set (a student trained
            on a subset whose batches carry each sample's global id): ``num_samples`` distinct integers, one bank
            row each, so that the negatives are drawn from the training samples only; ``index`` must be among them.
            ``None``: the ids are ``0, ..., num_samples - 1``.

    Example:
        >>> import torch
        >>> loss = CRDLoss(student_dim=6, teacher_dim=10, num_samples=50, embed_dim=4, num_negatives=8)
        >>> fs, ft, index = torch.randn(5, 6), torch.randn(5, 10), torch.tensor([0, 7, 9, 21, 49])
        >>> before = loss.student_memory.clone()
        >>> value = loss(fs, ft, index)
        >>> bool(value > 0), bool((loss.student_memory != before).any(1).nonzero().flatten().eq(index).all())
        (True, True)
    """

    temperature: Tensor
    momentum: Tensor
    student_memory: Tensor
    teacher_memory: Tensor
    log_normalizers: Tensor
    steps: Tensor
    sample_ids: Tensor | None

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_samples: int,
        embed_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float | Tensor = 0.07,
        momentum: float | Tensor = 0.5,
        weight: float | Tensor = 1.0,
        seed: int = 0,
        sample_ids: Tensor | Sequence[int] | None = None,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=0)
        for name, value in (
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("num_samples", num_samples),
            ("embed_dim", embed_dim),
            ("num_negatives", num_negatives),
        ):
            check_int(value, name, low=1)
        check_int(seed, "seed", low=0)
        check_hyperparameter(temperature, "temperature", low=0.0, low_inclusive=False)
        check_hyperparameter(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        self.num_samples, self.num_negatives, self.seed = num_samples, num_negatives, seed
        ids = None if sample_ids is None else _sample_ids(sample_ids, num_samples)
        self.register_buffer("sample_ids", ids, persistent=False)  # sorted; a configuration, not a state
        self.embed_student = NormalizedEmbedding(student_dim, embed_dim)
        self.embed_teacher = NormalizedEmbedding(teacher_dim, embed_dim)
        self.register_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)
        self.register_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(embed_dim / 3)
        for name in ("student_memory", "teacher_memory"):
            bank = torch.rand(num_samples, embed_dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, bank, persistent=True)
        self.register_buffer("log_normalizers", torch.full((2,), math.nan), persistent=True)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=True)

    def forward(
        self, student_features: Tensor, teacher_features: Tensor, index: Tensor, contrast_index: Tensor | None = None
    ) -> Tensor:
        """Return the weighted CRD loss; in training mode also update the memory bank (collective under DDP).

        Args:
            student_features: Student features ``(B, ...)``, flattened to ``student_dim``.
            teacher_features: Teacher features ``(B, ...)``, flattened to ``teacher_dim``.
            index: The samples' indices in the data set, ``(B,)`` integers in ``[0, num_samples)``.
            contrast_index: Optional ``(B, K + 1)`` memory rows to score, each sample's own index first (the
                official ``contrast_idx``); drawn uniformly when ``None``.
        """
        rows_of_index = self._index_validation(student_features, index, contrast_index)
        vs = self.embed_student(student_features)
        vt = self.embed_teacher(teacher_features.detach())
        index = rows_of_index.to(vs.device)
        if contrast_index is None:
            contrast_index = self._draw_negatives(index)
        contrast_index = contrast_index.to(device=vs.device, dtype=torch.long)
        batch, rows = contrast_index.shape
        student_rows = self.student_memory[contrast_index.flatten()].view(batch, rows, -1).to(vs)
        teacher_rows = self.teacher_memory[contrast_index.flatten()].view(batch, rows, -1).to(vs)
        if self.training and bool(torch.isnan(self.log_normalizers).any()):
            self._set_normalizers(vs, vt, student_rows, teacher_rows)
        log_z = torch.nan_to_num(self.log_normalizers.to(vs), nan=0.0)
        loss = crd_loss(
            vs,
            vt,
            student_rows,
            teacher_rows,
            self.num_samples,
            self.temperature.to(vs).reshape(()),
            log_z[0],
            log_z[1],
            reduction="mean",
        )
        if self.training:
            self._update_memory(index, vs.detach(), vt.detach())
        return self.weight.to(loss).reshape(()) * loss

    def _index_validation(self, features: Tensor, index: Tensor, contrast_index: Tensor | None) -> Tensor:
        """Check the indices; return the bank rows of ``index`` (int64)."""
        if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise TypeError(
                f"`index` must be an integer tensor of sample indices, got {type(index).__name__}"
                f"{'' if not isinstance(index, Tensor) else f' of dtype {index.dtype}'}. Give the data set's "
                "indices, e.g. batches (x, y, index)."
            )
        if index.shape != (features.shape[0],):
            raise ValueError(
                f"`index` must have shape (B,) = ({features.shape[0]},), one index per sample, got "
                f"{tuple(index.shape)}."
            )
        rows = self._rows(index.long() if self.sample_ids is None else index.to(self.sample_ids.device, torch.long))
        if self.sample_ids is not None:
            absent = self.sample_ids[rows] != index.to(rows)
            if bool(absent.any()):
                missing = index[absent.to(index.device)][:5].tolist()
                raise ValueError(
                    f"`index` holds ids that are not among `sample_ids` (e.g. {missing}): give the ids of the "
                    "training samples the batches carry."
                )
        elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(
                f"`index` must lie in [0, num_samples={self.num_samples}), got values in "
                f"[{int(index.min())}, {int(index.max())}]. Build CRDLoss with num_samples = the training set size."
            )
        if contrast_index is not None:
            if contrast_index.ndim != 2 or contrast_index.shape[0] != features.shape[0] or contrast_index.shape[1] < 2:
                raise ValueError(
                    f"`contrast_index` must have shape (B={features.shape[0]}, K + 1) with K >= 1, each sample's own "
                    f"index first, got {tuple(contrast_index.shape)}."
                )
            if int(contrast_index.min()) < 0 or int(contrast_index.max()) >= self.num_samples:
                raise ValueError(f"`contrast_index` must lie in [0, num_samples={self.num_samples}).")
        return rows

    def _rows(self, index: Tensor) -> Tensor:
        """The bank rows of the samples ``index`` (themselves unless ``sample_ids`` maps ids to rows)."""
        if self.sample_ids is None:
            return index
        return torch.searchsorted(self.sample_ids, index).clamp_(max=self.num_samples - 1)

    def _draw_negatives(self, index: Tensor) -> Tensor:
        rank, world = rank_and_world_size()
        generator = torch.Generator(device=index.device)
        generator.manual_seed((self.seed * 1_000_003 + int(self.steps) * world + rank) % (2**63))
        drawn = torch.randint(
            0, self.num_samples, (index.shape[0], self.num_negatives + 1), generator=generator, device=index.device
        )
        drawn[:, 0] = index
        return drawn

    @torch.no_grad()
    def _set_normalizers(self, vs: Tensor, vt: Tensor, student_rows: Tensor, teacher_rows: Tensor) -> None:
        """Set Z = num_samples * mean(exp(score / tau)) over every rank's first batch, kept in log form."""
        tau = self.temperature.to(vs).reshape(())
        student_side = torch.bmm(teacher_rows, vs.unsqueeze(2)).squeeze(2) / tau
        teacher_side = torch.bmm(student_rows, vt.unsqueeze(2)).squeeze(2) / tau
        sums = torch.stack([student_side.exp().sum(), teacher_side.exp().sum()]).double()
        count = torch.tensor([float(student_side.numel())], dtype=torch.float64, device=vs.device)
        totals = all_reduce(torch.cat([sums, count]), "sum")
        mean = totals[:2] / totals[2]
        self.log_normalizers.copy_((mean * self.num_samples).log().to(self.log_normalizers))

    @torch.no_grad()
    def _update_memory(self, index: Tensor, vs: Tensor, vt: Tensor) -> None:
        """Momentum update of the rows of every rank's samples (all-gathered: every rank's bank stays identical)."""
        index = all_gather_rows(index)
        vs, vt = all_gather_rows(vs), all_gather_rows(vt)
        # A sample present twice (e.g. a distributed sampler's padding) keeps its last update, in rank order.
        order = torch.arange(index.numel(), device=index.device)
        last = torch.full((self.num_samples,), -1, dtype=torch.long, device=index.device)
        last.scatter_reduce_(0, index, order, reduce="amax")
        keep = last[index] == order
        index, vs, vt = index[keep], vs[keep], vt[keep]
        momentum = self.momentum.to(self.student_memory).reshape(())
        for bank, v in ((self.student_memory, vs), (self.teacher_memory, vt)):
            updated = bank[index] * momentum + v.to(bank) * (1 - momentum)
            bank.index_copy_(0, index, updated / updated.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.steps += 1

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_samples={self.num_samples}, num_negatives={self.num_negatives}, "
            f"seed={self.seed}"
        )

"""Feature distillation: FitNet, attention transfer, RKD, CRD (functions, modules, DistillationModule presets), the
mixin's stacked teachers and the split of the mixin."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses import (
    AttentionTransferLoss,
    CRDLoss,
    DistillationModule,
    FitNetLoss,
    RKDLoss,
)
from lightning_losses.data import IndexedTensorDataset
from lightning_losses.functional import (
    attention_map,
    attention_transfer_loss,
    crd_loss,
    crd_nce_loss,
    fitnet_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
)
from lightning_losses.modules.distillation import DISTILLATION_DEFAULTS, DISTILLATION_PRESETS
from lightning_losses.nn import HintRegressor, NormalizedEmbedding
from tests.helpers.distributed import run_distributed
from tests.helpers.loss_tester import assert_value_and_gradient
from tests.helpers.references_features import (
    naive_attention_transfer,
    naive_crd_nce,
    naive_fitnet,
    naive_rkd_angle,
    naive_rkd_distance,
    official_at_loss,
    official_contrast_loss,
    official_crd,
    official_memory_update,
    official_rkd,
)
from tests.helpers.resume import crash_and_resume
from tests.helpers.trainer import cpu_trainer

DTYPES = [torch.float64, torch.float32]


def _rotation(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------------------------------------------- FitNet
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 3, 5)])
def test_fitnet_value_and_gradient(dtype, shape):
    torch.manual_seed(0)
    s, t = torch.randn(shape), torch.randn(shape)
    assert_value_and_gradient(fitnet_loss, naive_fitnet, s, t, dtype=dtype)
    torch.testing.assert_close(fitnet_loss(s, t), F.mse_loss(s, t))  # torchdistill / RepDistiller's hint loss


def test_fitnet_zero_through_identity_and_module_uses_regressor():
    f = torch.randn(4, 6, 3, 3)
    assert float(FitNetLoss()(f, f)) == 0.0  # identity projector, matching features
    loss = FitNetLoss(student_dim=3, teacher_dim=6, weight=2.0)
    assert isinstance(loss.regressor, HintRegressor)
    s = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(loss(s, f), 2.0 * F.mse_loss(loss.regressor(s), f))
    loss(s, f).backward()
    assert loss.regressor.linear.weight.grad is not None and loss.regressor.linear.weight.grad.abs().sum() > 0


def test_hint_regressor_is_a_1x1_convolution():
    regressor = HintRegressor(3, 5, normalize=False, activation=False)
    x = torch.randn(2, 3, 4, 4)
    conv = F.conv2d(x, regressor.linear.weight[:, :, None, None], regressor.linear.bias)
    torch.testing.assert_close(regressor(x), conv)


# ---------------------------------------------------------------------------------------------------- AT
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_transfer_value_and_gradient(dtype):
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 5, 3), torch.randn(3, 7, 5, 3)
    assert_value_and_gradient(attention_transfer_loss, naive_attention_transfer, s, t, dtype=dtype)
    torch.testing.assert_close(attention_transfer_loss(s, t), official_at_loss(s, t))


def test_attention_transfer_module_is_beta_half_sum_of_groups():
    torch.manual_seed(2)
    s = [torch.randn(2, 3, 6, 6), torch.randn(2, 5, 3, 3)]
    t = [torch.randn(2, 8, 6, 6), torch.randn(2, 2, 3, 3)]
    official = 1000.0 / 2 * sum(official_at_loss(a, b) for a, b in zip(s, t))
    torch.testing.assert_close(AttentionTransferLoss()(s, t), official)
    torch.testing.assert_close(
        AttentionTransferLoss(beta=10.0, weight=3.0)(s[0], t[0]), 15.0 * official_at_loss(s[0], t[0])
    )


def test_attention_maps_are_normalised_and_channel_permutation_invariant():
    torch.manual_seed(3)
    x = torch.randn(4, 6, 5, 5)
    q = attention_map(x)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(4))
    perm = torch.randperm(6)
    torch.testing.assert_close(attention_map(x[:, perm]), q)
    t = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(attention_transfer_loss(x[:, perm], t), attention_transfer_loss(x, t))
    # a positive rescaling of a feature map leaves its attention map unchanged
    torch.testing.assert_close(attention_transfer_loss(7.0 * x, t), attention_transfer_loss(x, t))


# ---------------------------------------------------------------------------------------------------- RKD
@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_distance_and_angle_value_and_gradient(dtype):
    torch.manual_seed(4)
    s, t = torch.randn(5, 3), torch.randn(5, 4)
    assert_value_and_gradient(rkd_distance_loss, naive_rkd_distance, s, t, dtype=dtype)
    assert_value_and_gradient(rkd_angle_loss, naive_rkd_angle, s, t, dtype=dtype)


def test_rkd_equals_the_official_formula_value_and_gradient():
    torch.manual_seed(5)
    s = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 6, dtype=torch.float64)
    ours, official = rkd_loss(s, t), official_rkd(s, t)
    torch.testing.assert_close(ours, official)
    (g1,) = torch.autograd.grad(ours, s)
    (g2,) = torch.autograd.grad(official_rkd(s, t), s)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(RKDLoss(weight=0.5)(s, t), 0.5 * official)


def test_rkd_is_invariant_to_rotation_translation_and_scale():
    torch.manual_seed(6)
    s = torch.randn(6, 5, dtype=torch.float64)
    t = torch.randn(6, 3, dtype=torch.float64)
    moved = 3.5 * s @ _rotation(5) + torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(rkd_loss(moved, t), rkd_loss(s, t))
    torch.testing.assert_close(rkd_loss(s, 0.2 * t @ _rotation(3, 1)), rkd_loss(s, t))
    assert float(rkd_loss(2.0 * t @ _rotation(3, 2), t)) < 1e-20


# ---------------------------------------------------------------------------------------------------- CRD (function)
@pytest.mark.parametrize("dtype", DTYPES)
def test_crd_nce_value_and_gradient(dtype):
    torch.manual_seed(7)
    log_scores = torch.randn(4, 6) - 3.0

    def reference(x):
        return naive_crd_nce(x.exp(), 50)

    assert_value_and_gradient(lambda x: crd_nce_loss(x, 50), reference, log_scores, dtype=dtype)
    torch.testing.assert_close(
        crd_nce_loss(log_scores.double(), 50), official_contrast_loss(log_scores.double().exp(), 50).reshape(())
    )


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_crd_loss_equals_the_official_scores_and_contrast_loss():
    vs, vt = _unit(3, 8, seed=1).requires_grad_(True), _unit(3, 8, seed=2)
    ms, mt = _unit(20, 8, seed=3), _unit(20, 8, seed=4)
    contrast = torch.tensor([[0, 5, 7, 9, 11], [3, 1, 2, 19, 4], [8, 8, 0, 6, 12]])
    official, z = official_crd(vs, vt, ms, mt, contrast, 20, 0.07, None)
    ours = crd_loss(vs, vt, ms[contrast], mt[contrast], 20, 0.07, math.log(z[0]), math.log(z[1]))
    torch.testing.assert_close(ours, official)
    (g1,) = torch.autograd.grad(ours, vs)
    (g2,) = torch.autograd.grad(official_crd(vs, vt, ms, mt, contrast, 20, 0.07, z)[0], vs)
    torch.testing.assert_close(g1, g2)


def test_crd_prefers_the_positive():
    vs = _unit(4, 8, seed=5)
    rows = _unit(4, 6, 8, seed=6)
    aligned = rows.clone()
    aligned[:, 0] = vs  # each anchor's own memory row is its embedding
    assert crd_loss(vs, vs, aligned, aligned, 100) < crd_loss(vs, vs, rows, rows, 100)


# ---------------------------------------------------------------------------------------------------- CRD (module)
def _crd(**kw):
    options = dict(student_dim=6, teacher_dim=5, num_samples=12, embed_dim=4, num_negatives=5, seed=3)
    options.update(kw)
    return CRDLoss(**options).double()


def test_crd_module_equals_the_official_memory_loop():
    torch.manual_seed(8)
    loss = _crd()
    memory_s, memory_t = loss.student_memory.clone(), loss.teacher_memory.clone()
    z = None
    for step in range(3):
        fs, ft = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        index = torch.tensor([[0, 3, 5, 3], [1, 2, 11, 7], [4, 4, 9, 10]][step])  # duplicates: the last one wins
        contrast = torch.randint(0, 12, (4, 6))
        contrast[:, 0] = index
        value = loss(fs, ft, index, contrast)
        vs, vt = loss.embed_student(fs), loss.embed_teacher(ft)
        expected, z = official_crd(vs, vt, memory_s, memory_t, contrast, 12, 0.07, z)
        torch.testing.assert_close(value, expected)
        memory_s = official_memory_update(memory_s, vs.detach(), index, 0.5)
        memory_t = official_memory_update(memory_t, vt.detach(), index, 0.5)
        torch.testing.assert_close(loss.student_memory, memory_s)
        torch.testing.assert_close(loss.teacher_memory, memory_t)
    assert int(loss.steps) == 3


def test_crd_sample_ids_map_global_ids_to_the_bank_rows_of_the_training_samples():
    # A student trained on 12 samples of a larger data set whose batches carry global ids: with `sample_ids` the bank
    # has one row per training sample and the loss equals the dense bank fed the rows' positions instead of the ids.
    ids = torch.tensor([3, 10, 11, 17, 20, 25, 31, 40, 41, 42, 56, 99])
    shuffled = ids[torch.randperm(12)]  # any order: sorted inside
    torch.manual_seed(0)
    dense = _crd()
    torch.manual_seed(0)
    keyed = _crd(sample_ids=shuffled)
    torch.testing.assert_close(keyed.student_memory, dense.student_memory)
    for step in range(3):
        fs, ft = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        rows = torch.tensor([[0, 3, 5, 3], [1, 2, 11, 7], [4, 4, 9, 10]][step])
        torch.testing.assert_close(keyed(fs, ft, ids[rows]), dense(fs, ft, rows))  # the same negatives are drawn
        torch.testing.assert_close(keyed.student_memory, dense.student_memory)
        torch.testing.assert_close(keyed.teacher_memory, dense.teacher_memory)
    with pytest.raises(ValueError, match="not among `sample_ids`"):
        keyed(fs, ft, torch.tensor([3, 4, 10, 11]))
    with pytest.raises(ValueError, match="12 distinct ids"):
        _crd(sample_ids=torch.tensor([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
    with pytest.raises(TypeError, match="integer sample ids"):
        _crd(sample_ids=torch.rand(12))


def test_crd_eval_mode_leaves_the_memory_and_draws_are_seeded():
    loss = _crd().eval()
    before = loss.student_memory.clone()
    fs, ft, index = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), torch.arange(3)
    loss(fs, ft, index)
    torch.testing.assert_close(loss.student_memory, before)
    assert torch.isnan(loss.log_normalizers).all()
    a, b = _crd().train(), _crd().train()
    torch.testing.assert_close(a.student_memory, b.student_memory)  # the same seed: the same initial bank
    torch.testing.assert_close(a._draw_negatives(index), b._draw_negatives(index))
    drawn = a._draw_negatives(index)
    assert drawn.shape == (3, 6) and torch.equal(drawn[:, 0], index)


def _crd_rank(rank: int, world: int, batches: list) -> dict:
    torch.manual_seed(0)
    loss = _crd()
    grads = []
    values = []
    for fs, ft, index, contrast in batches:
        rows = slice(rank * fs.shape[0] // world, (rank + 1) * fs.shape[0] // world)
        loss.zero_grad()
        value = loss(fs[rows], ft[rows], index[rows], contrast[rows])
        value.backward()
        values.append(value.detach())
        grads.append(torch.cat([p.grad.flatten() for p in loss.parameters()]))
    return {
        "values": torch.stack(values),
        "grads": torch.stack(grads),
        "memory": (loss.student_memory.clone(), loss.teacher_memory.clone()),
        "z": loss.log_normalizers.clone(),
    }


@pytest.mark.ddp
def test_crd_ddp_two_processes_equal_one_process():
    g = torch.Generator().manual_seed(9)
    batches = []
    for index in (torch.tensor([0, 3, 5, 7, 3, 9]), torch.tensor([1, 2, 4, 6, 8, 10])):
        contrast = torch.randint(0, 12, (6, 6), generator=g)
        contrast[:, 0] = index
        batches.append(
            (
                torch.randn(6, 6, generator=g, dtype=torch.float64),
                torch.randn(6, 5, generator=g, dtype=torch.float64),
                index,
                contrast,
            )
        )
    single = _crd_rank(0, 1, batches)
    ranks = run_distributed(_crd_rank, batches, world_size=2)
    for r in ranks:  # every rank's bank identical, and equal to one process on the whole batch
        torch.testing.assert_close(r["memory"][0], single["memory"][0])
        torch.testing.assert_close(r["memory"][1], single["memory"][1])
        torch.testing.assert_close(r["z"], single["z"])
    # DDP averages the ranks' gradients; the ranks' losses average to the whole batch's
    torch.testing.assert_close((ranks[0]["grads"] + ranks[1]["grads"]) / 2, single["grads"])
    torch.testing.assert_close((ranks[0]["values"] + ranks[1]["values"]) / 2, single["values"])


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_feature_losses_bad_inputs():
    with pytest.raises(ValueError, match=r"same shape.*HintRegressor"):
        fitnet_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        fitnet_loss(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        fitnet_loss(torch.tensor([[float("nan")]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="feature map"):
        attention_transfer_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"spatial size.*adaptive_avg_pool2d"):
        attention_transfer_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="`p` must be a positive"):
        attention_map(torch.randn(2, 3, 4, 4), p=0.0)
    with pytest.raises(ValueError, match="one teacher feature map per student"):
        AttentionTransferLoss()([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError, match="at least 2"):
        rkd_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same samples"):
        rkd_loss(torch.randn(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="angle_weight"):
        rkd_loss(torch.randn(3, 3), torch.randn(3, 3), angle_weight=-1.0)
    with pytest.raises(ValueError, match=r"\(B, K \+ 1\)"):
        crd_nce_loss(torch.randn(3, 1), 10)
    with pytest.raises(ValueError, match="num_samples"):
        crd_nce_loss(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match=r"student_memory_rows.*K >= 1"):
        crd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 5), 10)
    with pytest.raises(ValueError, match="temperature"):
        crd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), 10, temperature=0.0)


def test_crd_module_bad_inputs():
    loss = _crd()
    fs, ft = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lie in \[0, num_samples=12\)"):
        loss(fs, ft, torch.tensor([0, 1, 12]))
    with pytest.raises(TypeError, match="integer tensor of sample indices"):
        loss(fs, ft, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="one index per sample"):
        loss(fs, ft, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contrast_index"):
        loss(fs, ft, torch.tensor([0, 1, 2]), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"NormalizedEmbedding expects 6 features.*student_dim"):
        loss(torch.randn(3, 7, dtype=torch.float64), ft, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="momentum"):
        _crd(momentum=1.0)
    with pytest.raises(ValueError, match="num_negatives"):
        _crd(num_negatives=0)
    with pytest.raises(ValueError, match="in_features"):
        NormalizedEmbedding(0)


# ---------------------------------------------------------------------------------------------------- presets
def test_presets_table_keeps_the_old_defaults_view():
    assert DISTILLATION_DEFAULTS["kd"] == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "warmup_epochs": 0}
    assert DISTILLATION_DEFAULTS["dkd"] == {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "temperature": 4.0,
        "alpha": 1.0,
        "beta": 8.0,
        "warmup_epochs": 20,
    }
    assert DISTILLATION_DEFAULTS["nd"]["nd_weight"] == 2.0 and DISTILLATION_DEFAULTS["dkd+nd"]["nd_weight"] == 0.5
    assert {"fitnet", "at", "rkd", "crd"} <= set(DISTILLATION_PRESETS)
    assert DISTILLATION_DEFAULTS["crd"]["feature_weight"] == 0.8 and DISTILLATION_DEFAULTS["fitnet"]["kd_weight"] == 0


class ConvNet(nn.Module):
    """``conv1`` → ``conv2`` (feature maps) → ``backbone`` (pooled embedding) → ``fc``; no BN or dropout."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.backbone = nn.Sequential(self.conv1, self.conv2, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


def _images(n: int = 16, seed: int = 0) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    return IndexedTensorDataset(x, y, torch.arange(n))


METHODS = {
    "fitnet": dict(
        student_feature_layer="conv2", teacher_feature_layer="conv2", student_feature_dim=8, teacher_feature_dim=16
    ),
    "at": dict(student_feature_layer=["conv1", "conv2"], teacher_feature_layer=["conv1", "conv2"]),
    "rkd": dict(),
    "crd": dict(
        student_feature_dim=8,
        teacher_feature_dim=16,
        num_samples=16,
        feature_options={"num_negatives": 6, "embed_dim": 4},
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_feature_methods_train_through_the_module(tmp_path, method):
    torch.manual_seed(0)
    teacher = ConvNet(width=8)
    module = DistillationModule(
        ConvNet(width=4), teacher, method=method, num_classes=3, scheduler="none", lr=0.05, **METHODS[method]
    )
    loss = getattr(module, method)
    assert module.get_hyperparameter(f"{method}.weight").item() == pytest.approx(
        DISTILLATION_DEFAULTS[method]["feature_weight"]
    )
    terms, _, _ = module.compute_losses(next(iter(DataLoader(_images(), batch_size=8))))
    assert set(terms) == {"ce", "kd", method} and float(terms["kd"]) == 0.0 and float(terms[method]) > 0
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = cpu_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, DataLoader(_images(), batch_size=8))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    learned = [p for p in loss.parameters()]
    assert all(p in set(module.parameters()) for p in learned)  # regressors/heads are trained with the student


def test_feature_method_errors():
    with pytest.raises(ValueError, match="needs `num_samples`"):
        DistillationModule(
            ConvNet(), ConvNet(8), method="crd", num_classes=3, student_feature_dim=8, teacher_feature_dim=16
        )
    with pytest.raises(ValueError, match="needs `student_dim`"):
        DistillationModule(ConvNet(), ConvNet(8), method="crd", num_classes=3, num_samples=16)
    with pytest.raises(ValueError, match="`feature_options` names \\['bogus'\\]"):
        DistillationModule(ConvNet(), ConvNet(8), method="rkd", num_classes=3, feature_options={"bogus": 1})
    with pytest.raises(ValueError, match="several only for method='at'"):
        DistillationModule(
            ConvNet(),
            ConvNet(8),
            method="rkd",
            num_classes=3,
            student_feature_layer=["conv1", "conv2"],
            teacher_feature_layer=["conv1", "conv2"],
        )
    module = DistillationModule(
        ConvNet(),
        ConvNet(8),
        method="crd",
        num_classes=3,
        student_feature_dim=8,
        teacher_feature_dim=16,
        num_samples=16,
    )
    x, y, _ = _images()[:4]
    with pytest.raises(ValueError, match=r"needs each sample's index.*\(x, y, index\)"):
        module.compute_losses((x, y))
    module = DistillationModule(
        ConvNet(),
        ConvNet(8),
        method="fitnet",
        num_classes=3,
        student_feature_layer="conv2",
        teacher_feature_layer="conv2",
    )
    with pytest.raises(ValueError, match="HintRegressor"):
        module.compute_losses((x, y))


def test_crd_crash_and_resume_keeps_the_memory_bank(tmp_path):
    torch.manual_seed(0)
    teacher = ConvNet(width=8)
    init = {
        k: v.clone()
        for k, v in DistillationModule(
            ConvNet(), teacher, method="crd", num_classes=3, scheduler="none", **METHODS["crd"]
        )
        .state_dict()
        .items()
    }

    def fit(steps: int, ckpt: Path | None):
        module = DistillationModule(ConvNet(), teacher, method="crd", num_classes=3, scheduler="none", **METHODS["crd"])
        if ckpt is None:
            module.load_state_dict(init)
        trainer = cpu_trainer(tmp_path, max_steps=steps)
        # one batch per epoch: the resumed run reads the batches of the uninterrupted one
        trainer.fit(module, DataLoader(_images(), batch_size=16), ckpt_path=ckpt)
        return module, trainer

    runs = crash_and_resume(fit, crash_step=2, total_steps=4, tmp_path=tmp_path)
    saved = torch.load(runs.checkpoint, weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["crd.student_memory"], runs.first.crd.student_memory)
    assert not torch.equal(saved["crd.student_memory"], init["crd.student_memory"])
    for key, value in runs.full.state_dict().items():
        torch.testing.assert_close(runs.resumed.state_dict()[key], value, msg=key)
    assert int(runs.resumed.crd.steps) == 4


# ---------------------------------------------------------------------------------------------------- mixin
def test_teacher_forward_stacks_teachers_and_caches_both_forms():
    torch.manual_seed(0)
    teachers = [nn.Linear(6, 3), nn.Linear(6, 3)]
    module = DistillationModule(
        nn.Linear(6, 3), teachers, num_classes=3, teacher_weights=[3.0, 1.0], cache_teacher_outputs=True
    )
    x, index = torch.randn(5, 6), torch.arange(5)
    stacked = module.teacher_forward(x, index=index, combine=False)
    with torch.no_grad():
        expected = torch.stack([t(x) for t in teachers])
    torch.testing.assert_close(stacked, expected)
    combined = module.teacher_forward(x, index=index)
    torch.testing.assert_close(combined, 0.75 * expected[0] + 0.25 * expected[1])
    state = module._distillation_state()
    calls = state.teacher_calls
    torch.testing.assert_close(module.teacher_forward(x, index=index, combine=False), expected)
    torch.testing.assert_close(module.teacher_forward(x, index=index), combined)
    assert state.teacher_calls == calls and state.cache_hits == 2


def test_distillation_mixin_files_are_small():
    root = Path(__file__).resolve().parents[2] / "lightning_losses" / "mixins"
    for name in ("distillation.py", "distillation_teachers.py", "distillation_calls.py"):
        assert len((root / name).read_text().splitlines()) <= 360, name


class _SaveBank(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        banks = (pl_module.crd.student_memory, pl_module.crd.teacher_memory, pl_module.crd.log_normalizers)
        torch.save([b.detach().cpu().clone() for b in banks], self.out / f"bank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_crd_banks_stay_identical_across_ranks_under_lightning_ddp(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    module = DistillationModule(
        ConvNet(), ConvNet(width=8), method="crd", num_classes=3, scheduler="none", **METHODS["crd"]
    )
    initial = module.crd.student_memory.clone()
    # no buffer broadcast: only the loss's own all-gather keeps the banks in step
    strategy = DDPStrategy(start_method="spawn", broadcast_buffers=False)
    trainer = cpu_trainer(tmp_path, devices=2, strategy=strategy, max_epochs=2, callbacks=[_SaveBank(tmp_path)])
    trainer.fit(module, DataLoader(_images(), batch_size=4))
    rank0, rank1 = (torch.load(tmp_path / f"bank{r}.pt") for r in range(2))
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b)
    assert (rank0[0] != initial).any(dim=1).all()  # every sample's row was updated, whichever rank read it

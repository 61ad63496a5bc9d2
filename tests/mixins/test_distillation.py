"""The distillation mixin where real training goes: one call contract, compiled losses, converted precisions, the
teacher cache under a shuffling distributed sampler, per-sample weights on the chunked LLM path."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import DistillationMixin, DKDLoss, GeneralizedJSDLoss, KDLoss
from tests.helpers.tolerances import tolerance
from tests.modules.test_distillation import TinyNet


class Student(DistillationMixin, pl.LightningModule):
    def __init__(self, teacher: nn.Module, loss: nn.Module | None = None, cache: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = TinyNet(width=4, bn=False, dropout=0.0)
        self.configure_distillation(teacher, loss=loss, cache_teacher_outputs=cache)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self.student(x)
        return self.distillation_loss(logits, self.teacher_forward(x, index=index), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _inputs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------------------------------------- call contract
class TargetAwareLoss(nn.Module):
    """A user's loss that needs the targets: weighted CE on the student plus KL to the teacher."""

    def forward(self, student_logits, teacher_logits, target):
        kl = torch.nn.functional.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True)
        return torch.nn.functional.cross_entropy(student_logits, target) + kl


class EpochAwareKD(KDLoss):
    """A user subclass of a library loss that adds its own warm-up."""

    def forward(self, student_logits, teacher_logits, epoch=None):
        return super().forward(student_logits, teacher_logits, epoch=epoch) * (0.0 if epoch is None else 1.0)


def test_users_own_loss_receives_the_targets():
    module = Student(TinyNet(), loss=TargetAwareLoss())
    x, y = _inputs()
    s, t = module.student(x), module.teacher_forward(x)
    torch.testing.assert_close(module.distillation_loss(s, t, y), TargetAwareLoss()(s, t, y))
    with pytest.raises(ValueError, match="TargetAware needs the class targets"):
        module.distillation_loss(s, t)


def test_user_subclass_of_a_library_loss_gets_the_epoch(tmp_path):
    module = Student(TinyNet(), loss=EpochAwareKD(temperature=2.0))
    x, y = _inputs()
    s, t = module.student(x), module.teacher_forward(x)
    assert float(module.distillation_loss(s, t, y)) == 0.0  # no trainer: epoch None
    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        module, DataLoader(TensorDataset(x, y, torch.arange(6)), batch_size=6)
    )
    torch.testing.assert_close(
        module.distillation_loss(s, t, y), KDLoss(temperature=2.0)(s, t), msg="the epoch reached the user's loss"
    )


def test_compiled_dkd_keeps_its_warm_up():
    x, y = _inputs()
    module = Student(TinyNet(), loss=torch.compile(DKDLoss(warmup_epochs=4), backend="eager"))
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        module, DataLoader(TensorDataset(x, y, torch.arange(6)), batch_size=6)
    )
    assert module.current_epoch == 2
    plain = DKDLoss(warmup_epochs=4)
    s, t = module.student(x), module.teacher_forward(x)
    torch.testing.assert_close(module.distillation_loss(s, t, y), plain(s, t, y, epoch=2))
    assert not torch.allclose(module.distillation_loss(s, t, y), plain(s, t, y, epoch=None))
    with pytest.raises(ValueError, match="DKD needs the class targets"):
        module.distillation_loss(s, t)


# ---------------------------------------------------------------------------------------------------- precision
def test_dtype_conversion_leaves_the_users_teacher_unchanged():
    teacher = TinyNet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = Student(teacher)
    with pytest.warns(UserWarning, match="teacher object you passed is left unchanged"):
        module.to(torch.bfloat16)  # what precision="bf16-true" does to the LightningModule
    assert module.teacher is not teacher
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    for key, value in teacher.state_dict().items():
        assert value.dtype == before[key].dtype
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    module.to(torch.float32)  # converting again reuses the module's own copy
    assert next(module.teacher.parameters()).dtype == torch.float32


def test_device_moves_keep_the_teacher_object():
    teacher = TinyNet()
    module = Student(teacher)
    module.to("cpu")
    assert module.teacher is teacher


# ---------------------------------------------------------------------------------------------------- chunked LLM path
transformers = pytest.importorskip("transformers")


def _tiny_lm(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=23, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


class LMStudent(DistillationMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.student = _tiny_lm(0, 8)
        self.configure_distillation(_tiny_lm(1, 16), loss=GeneralizedJSDLoss(beta=0.3))


def test_causal_lm_path_applies_a_per_sample_weight_like_the_module():
    module = LMStudent()
    ids = torch.randint(0, 23, (3, 7))
    labels = ids.clone()
    labels[1, :4] = -100
    module.set_hyperparameter("kd.weight", torch.tensor([0.5, 2.0, 1.0]))
    chunked = module.causal_lm_distillation_loss(module.student, ids, labels=labels, chunk_size=4)
    with torch.no_grad():
        teacher_logits = module.teacher(ids).logits[:, :-1]
    full = module.kd(module.student(ids).logits[:, :-1], teacher_logits, labels=labels[:, 1:])
    assert chunked.shape == full.shape == ()
    torch.testing.assert_close(chunked, full, **tolerance(torch.float32))


# ---------------------------------------------------------------------------------------------------- DDP cache
class CountingStudent(Student):
    """Logs how often the teacher really ran in each epoch, summed over ranks."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._calls_before = self._distillation_state().teacher_calls

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        calls = self._distillation_state().teacher_calls - self._calls_before
        self.log("teacher_calls", float(calls), reduce_fx="sum", sync_dist=True)


@pytest.mark.ddp
def test_teacher_cache_hits_everything_in_epoch_two_under_a_shuffling_sampler():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g), torch.arange(32))
    module = CountingStudent(TinyNet(), cache=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=True))  # Lightning's shuffling DistributedSampler
    assert float(trainer.callback_metrics["teacher_calls"]) == 0.0


def test_causal_lm_path_falls_back_to_the_logits_where_sharding_hides_the_head(monkeypatch):
    from lightning_losses.integrations import transformers as integration

    module = LMStudent()
    ids = torch.randint(0, 23, (2, 7))
    expected = module.causal_lm_distillation_loss(module.student, ids)

    def refuse(*args, **kwargs):
        raise integration.HiddenStatesUnavailable("the head is partitioned by DeepSpeed ZeRO-3")

    monkeypatch.setattr(integration, "causal_lm_hidden_states", refuse)
    with pytest.warns(UserWarning, match="falls back to the full logits: the head is partitioned"):
        fallback = module.causal_lm_distillation_loss(module.student, ids)
    torch.testing.assert_close(fallback, expected, **tolerance(torch.float32))

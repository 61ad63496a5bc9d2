"""Token-level distillation of causal LMs through the mixin: chunked path equals the full-logits loss."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_losses import DistillationMixin, GeneralizedJSDLoss, KDLoss
from tests.helpers.tolerances import tolerance

transformers = pytest.importorskip("transformers")


def tiny_lm(seed: int, width: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=37, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


class LMDistiller(DistillationMixin, pl.LightningModule):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.student = tiny_lm(0, 16).eval()  # no dropout: the two paths must see the same network
        self.configure_distillation(tiny_lm(1, 32), loss=GeneralizedJSDLoss(beta=beta, temperature=2.0, weight=0.5))


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_causal_lm_distillation_equals_full_logits_loss(beta):
    module = LMDistiller(beta)
    ids = torch.randint(0, 37, (3, 9))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens
    labels[2, 6:] = -100  # padding
    chunked = module.causal_lm_distillation_loss(module.student, ids, labels=labels, chunk_size=5)
    (grad_chunked,) = torch.autograd.grad(chunked, module.student.transformer.h[0].mlp.c_fc.weight)

    student_logits = module.student(ids).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = module.teacher(ids).logits[:, :-1]
    full = module.kd(student_logits, teacher_logits, labels=labels[:, 1:])
    (grad_full,) = torch.autograd.grad(full, module.student.transformer.h[0].mlp.c_fc.weight)
    torch.testing.assert_close(chunked, full, **tolerance(torch.float32))
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in module.teacher.parameters())


def test_causal_lm_distillation_needs_a_jsd_loss():
    module = LMDistiller(0.5)
    module.kd = KDLoss()
    with pytest.raises(TypeError, match=r"needs `self\.kd` to be a GeneralizedJSDLoss"):
        module.causal_lm_distillation_loss(module.student, torch.randint(0, 37, (1, 4)))

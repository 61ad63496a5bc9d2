"""Offline teacher logits: the sparse (top-k + tail) divergence, the memory-mapped cache, resume and stale keys."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_losses import DistillationMixin, GeneralizedJSDLoss
from lightning_losses.data.teacher_logits import (
    StaleTeacherCacheError,
    TeacherLogitsCache,
    TeacherLogitsDataset,
    precompute_teacher_logits,
    teacher_fingerprint,
)
from lightning_losses.functional import generalized_jsd_loss
from lightning_losses.functional.sparse_distillation import (
    TopKLogProbs,
    sparse_generalized_jsd_loss,
    topk_teacher_log_probs,
)
from lightning_losses.losses.sparse_distillation import SparseGeneralizedJSDLoss

transformers = pytest.importorskip("transformers")

V = 23


def tiny_lm(seed: int, width: int = 16, vocab: int = V) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=vocab, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


# ---------------------------------------------------------------------------------------------------- references
def naive_bucket_jsd(student_logits, teacher_logits, k, beta, temperature=1.0):
    """Per-token divergence over k + 1 buckets, written token by token in float64 from the full distributions."""
    s = student_logits.double().reshape(-1, student_logits.shape[-1])
    t = teacher_logits.double().reshape(-1, teacher_logits.shape[-1])
    out = []
    for zs, zt in zip(s, t):
        ps, pt = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
        top = torch.argsort(pt, descending=True)[:k]
        rest = torch.ones_like(pt, dtype=torch.bool)
        rest[top] = False
        bs = torch.cat([ps[top], ps[rest].sum().reshape(1)]) if k < len(pt) else ps[top]
        bt = torch.cat([pt[top], pt[rest].sum().reshape(1)]) if k < len(pt) else pt[top]
        if beta == 0:
            out.append((bt * (bt.log() - bs.log())).sum())
        elif beta == 1:
            out.append((bs * (bs.log() - bt.log())).sum())
        else:
            m = beta * bt + (1 - beta) * bs
            out.append(beta * (bt * (bt / m).log()).sum() + (1 - beta) * (bs * (bs / m).log()).sum())
    return torch.stack(out).reshape(student_logits.shape[:-1])


# ---------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_k_equal_vocab_is_the_full_loss(beta):
    torch.manual_seed(0)
    s = torch.randn(3, 5, V, requires_grad=True)
    t = torch.randn(3, 5, V) * 2
    labels = torch.randint(0, V, (3, 5))
    labels[0, :2] = -100
    sparse = sparse_generalized_jsd_loss(s, *topk_teacher_log_probs(t, V, temperature=2.0), beta, 2.0, labels)
    full = generalized_jsd_loss(s, t, beta, 2.0, labels)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_full,) = torch.autograd.grad(full, s)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_full, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 4, V - 1])
def test_value_and_gradient_match_the_naive_bucket_reference(beta, k):
    torch.manual_seed(1)
    s = torch.randn(2, 4, V, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, V, dtype=torch.float64) * 3
    top = topk_teacher_log_probs(t.double(), k)
    got = sparse_generalized_jsd_loss(s, top.log_probs.double(), top.indices, beta, reduction="none")
    want = naive_bucket_jsd(s, t, k, beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_forward_kl_gradient_has_the_closed_form():
    """d KL / d z_s = p_s - q, with q the teacher's kept probabilities and its tail spread like the student's tail."""
    torch.manual_seed(2)
    z = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randn(V, dtype=torch.float64) * 2
    k = 5
    top = topk_teacher_log_probs(t[None], k)
    loss = sparse_generalized_jsd_loss(z[None], top.log_probs.double(), top.indices, beta=0.0)
    (grad,) = torch.autograd.grad(loss, z)
    ps, pt = torch.softmax(z.detach(), -1), torch.softmax(t, -1)
    kept = top.indices[0]
    tail = torch.ones(V, dtype=torch.bool)
    tail[kept] = False
    q = torch.zeros(V, dtype=torch.float64)
    q[kept] = pt[kept]
    q[tail] = pt[tail].sum() * ps[tail] / ps[tail].sum()
    torch.testing.assert_close(grad, ps - q)


def test_forward_kl_grows_with_k_up_to_the_full_kl():
    torch.manual_seed(3)
    s, t = torch.randn(4, 6, V), torch.randn(4, 6, V) * 2
    values = [float(sparse_generalized_jsd_loss(s, *topk_teacher_log_probs(t, k), beta=0.0)) for k in range(1, V + 1)]
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(float(generalized_jsd_loss(s, t, beta=0.0)), rel=1e-5)
    assert values[0] > 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_zero_when_the_student_is_the_teacher(beta):
    t = torch.randn(3, 4, V)
    loss = sparse_generalized_jsd_loss(t, *topk_teacher_log_probs(t, 3), beta=beta)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_float16_storage_is_close_to_float32():
    torch.manual_seed(4)
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V) * 2
    top = topk_teacher_log_probs(t, 8)
    half = sparse_generalized_jsd_loss(s, top.log_probs.half(), top.indices.int(), beta=0.5)
    full = sparse_generalized_jsd_loss(s, *top, beta=0.5)
    torch.testing.assert_close(half, full, rtol=2e-3, atol=1e-4)


def test_tensor_beta_per_sample_equals_scalar_calls():
    torch.manual_seed(5)
    s, t = torch.randn(3, 4, V), torch.randn(3, 4, V)
    top = topk_teacher_log_probs(t, 6)
    betas = torch.tensor([0.0, 0.4, 1.0])
    got = sparse_generalized_jsd_loss(s, *top, beta=betas, reduction="none")
    for i, b in enumerate(betas.tolist()):
        one = sparse_generalized_jsd_loss(
            s[i : i + 1], top.log_probs[i : i + 1], top.indices[i : i + 1], b, reduction="none"
        )
        torch.testing.assert_close(got[i : i + 1], one)


def test_module_twin_and_the_distillation_contract():
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    labels[1, 3:] = -100
    top = topk_teacher_log_probs(t, 7)
    loss = SparseGeneralizedJSDLoss(beta=0.2, weight=0.5)
    want = 0.5 * sparse_generalized_jsd_loss(s, *top, beta=0.2, labels=labels)
    torch.testing.assert_close(loss(s, top, labels), want)

    class Holder(DistillationMixin, torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.configure_distillation(torch.nn.Linear(1, 1), loss=loss)

    torch.testing.assert_close(Holder().distillation_loss(s, top, labels), want)
    torch.testing.assert_close(
        loss(s, top, labels, num_items_in_batch=4.0) * 4,
        0.5 * sparse_generalized_jsd_loss(s, *top, beta=0.2, labels=labels, reduction="sum"),
    )


def test_bad_inputs():
    s, t = torch.randn(2, 3, V), torch.randn(2, 3, V)
    top = topk_teacher_log_probs(t, 4)
    with pytest.raises(ValueError, match=r"must have shape \(2, 3, 'k'\)"):
        sparse_generalized_jsd_loss(s, top.log_probs[:, :2], top.indices[:, :2])
    with pytest.raises(ValueError, match="repeats an id"):
        sparse_generalized_jsd_loss(s, top.log_probs, top.indices[..., [0, 0, 1, 2]])
    with pytest.raises(ValueError, match="must be log-probabilities"):
        sparse_generalized_jsd_loss(s, top.log_probs + 5.0, top.indices)
    with pytest.raises(ValueError, match=r"outside the student's vocabulary \[0, 23\)"):
        sparse_generalized_jsd_loss(s, top.log_probs, top.indices + V)
    with pytest.raises(TypeError, match="must be an integer tensor"):
        sparse_generalized_jsd_loss(s, top.log_probs, top.indices.float())
    with pytest.raises(ValueError, match=r"`k` must be at most the vocabulary size 23"):
        topk_teacher_log_probs(t, V + 1)
    with pytest.raises(TypeError, match="TopKLogProbs"):
        SparseGeneralizedJSDLoss()(s, t)


# ---------------------------------------------------------------------------------------------------- the cache
@pytest.fixture
def data():
    torch.manual_seed(7)
    ids = torch.randint(0, V, (10, 12))
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    return ids, mask


def test_precompute_stores_the_teachers_top_k(tmp_path, data):
    ids, mask = data
    teacher = tiny_lm(0)
    cache = precompute_teacher_logits(teacher, ids, tmp_path, k=5, attention_mask=mask, batch_size=4, dtype="float32")
    with torch.no_grad():
        log_p = teacher(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    values, indices = np.load(tmp_path / "values.npy"), np.load(tmp_path / "indices.npy")
    assert values.dtype == np.float32 and indices.dtype == np.int32 and values.shape == (10, 12, 5)
    torch.testing.assert_close(torch.from_numpy(values), log_p.topk(5, -1).values, rtol=1e-5, atol=1e-5)
    gathered = log_p.gather(-1, torch.from_numpy(indices).long())  # the stored ids are the ones of the values
    torch.testing.assert_close(gathered, torch.from_numpy(values), rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["completed"] == 10 and manifest["k"] == 5 and manifest["vocab_size"] == V
    assert cache.complete and cache.temperature == 1.0


def test_interrupted_then_resumed_gives_identical_files(tmp_path, data):
    ids, mask = data
    teacher = tiny_lm(1)
    precompute_teacher_logits(teacher, ids, tmp_path / "whole", k=6, attention_mask=mask, batch_size=3)

    def crash(done: int, total: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute_teacher_logits(
            teacher, ids, tmp_path / "resumed", k=6, attention_mask=mask, batch_size=3, progress=crash
        )
    partial = TeacherLogitsCache(tmp_path / "resumed")
    assert partial.completed == 6 and not partial.complete
    with pytest.raises(StaleTeacherCacheError, match=r"incomplete \(6 of 10 sequences\)"):
        TeacherLogitsDataset(partial, ids, mask)
    seen: list[int] = []
    precompute_teacher_logits(
        teacher, ids, tmp_path / "resumed", k=6, attention_mask=mask, batch_size=5, progress=lambda d, n: seen.append(d)
    )
    assert seen == [9, 10]  # resumed at sequence 6 with the recorded batch size 3
    for name in ("values.npy", "indices.npy", "manifest.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_stale_caches_are_refused(tmp_path, data):
    ids, mask = data
    teacher = tiny_lm(2)
    cache = precompute_teacher_logits(teacher, ids, tmp_path, k=4, attention_mask=mask, batch_size=4)
    with pytest.raises(StaleTeacherCacheError, match="computed for other token ids"):
        TeacherLogitsDataset(cache, ids.roll(1, dims=1), mask)
    with pytest.raises(StaleTeacherCacheError, match="computed for other token ids"):
        TeacherLogitsDataset(cache, ids, torch.ones_like(ids))  # other padding
    changed = tiny_lm(2)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    with pytest.raises(StaleTeacherCacheError, match="computed by another teacher"):
        TeacherLogitsDataset(cache, ids, mask, teacher=changed)
    with pytest.raises(StaleTeacherCacheError, match=r"it was computed for another teacher"):
        precompute_teacher_logits(changed, ids, tmp_path, k=4, attention_mask=mask)
    with pytest.raises(StaleTeacherCacheError, match=r"it was computed for another k"):
        precompute_teacher_logits(teacher, ids, tmp_path, k=3, attention_mask=mask)
    TeacherLogitsDataset(cache, ids, mask, teacher=teacher_fingerprint(teacher))  # the right teacher is accepted
    replaced = precompute_teacher_logits(changed, ids, tmp_path, k=4, attention_mask=mask, overwrite=True)
    replaced.verify(ids, mask, changed)


def test_dataset_batches_give_the_live_teacher_loss_when_k_is_the_vocabulary(tmp_path, data):
    """Offline distillation from a full (k = V, float32) cache equals distillation from the live teacher."""
    from torch.utils.data import DataLoader

    from lightning_losses.modules.llm_distillation import OfflineDistillationModule

    ids, mask = data
    teacher, student = tiny_lm(3), tiny_lm(4, width=8)
    cache = precompute_teacher_logits(teacher, ids, tmp_path, k=V, attention_mask=mask, batch_size=4, dtype="float32")
    batch = next(iter(DataLoader(TeacherLogitsDataset(cache, ids, mask), batch_size=5)))
    assert batch["teacher_log_probs"].shape == (5, 12, V) and batch["labels"][3, 9:].eq(-100).all()
    module = OfflineDistillationModule(student, beta=0.0)
    offline = module.compute_loss(batch)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    live = GeneralizedJSDLoss(beta=0.0)(s_logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:])
    torch.testing.assert_close(offline, live, rtol=1e-5, atol=1e-6)


def test_offline_training_lowers_the_full_kl(tmp_path, data):
    from torch.utils.data import DataLoader

    from lightning_losses.modules.llm_distillation import OfflineDistillationModule
    from tests.helpers.trainer import cpu_trainer

    ids, mask = data
    teacher, student = tiny_lm(5), tiny_lm(6, width=8)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(8)  # a peaked teacher, far from the near-uniform student
    cache = precompute_teacher_logits(teacher, ids, tmp_path, k=4, attention_mask=mask)
    loader = DataLoader(TeacherLogitsDataset(cache, ids, mask), batch_size=5)

    def full_kl() -> float:
        with torch.no_grad():
            t, s = teacher(input_ids=ids).logits[:, :-1], student(input_ids=ids).logits[:, :-1]
        return float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"))

    before = full_kl()
    module = OfflineDistillationModule(student, beta=0.0, lr=1e-2)
    cpu_trainer(tmp_path, max_epochs=8).fit(module, loader)
    assert full_kl() < 0.8 * before
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())


def test_cache_indexing_and_errors(tmp_path, data):
    ids, _ = data
    with pytest.raises(FileNotFoundError, match="precompute_teacher_logits"):
        TeacherLogitsCache(tmp_path / "missing")
    cache = precompute_teacher_logits(tiny_lm(0), ids, tmp_path, k=2, batch_size=20)
    top = cache[torch.tensor([1, 4])]
    assert isinstance(top, TopKLogProbs) and top.log_probs.dtype == torch.float16 and top.indices.dtype == torch.int64
    assert top.log_probs.shape == (2, 12, 2)
    with pytest.raises(ValueError, match=r"`token_ids` must be an integer tensor of shape"):
        precompute_teacher_logits(tiny_lm(0), ids[0], tmp_path / "x", k=2)
    with pytest.raises(ValueError, match=r"`k` must be at most the teacher's vocabulary size 23"):
        precompute_teacher_logits(tiny_lm(0), ids, tmp_path / "y", k=V + 1)

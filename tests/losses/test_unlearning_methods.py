"""WGA, SatImp, CE-U, UNDIAL, RMU, AltPO and NPO's length normalisation: value and gradient against naive loops and
the formulas of the official code (open-unlearning, src/trainer/unlearn/ and src/trainer/utils.py), properties, bad
inputs, the mixin's scores (hooks through PEFT, reference strategies), a short run of each preset, and 2-process DDP."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lightning_losses import (
    NPOLoss,
    RMULoss,
    UNDIALLoss,
    UnlearningModule,
    UnlearningScores,
    WGALoss,
    unlearning_preset,
)
from lightning_losses.data.unlearning import UnlearningBatchCollator
from lightning_losses.functional.distillation import project_conflicting_gradient
from lightning_losses.functional.unlearning import (
    altpo_loss,
    ceu_loss,
    flat_variational_pair,
    idk_dpo_loss,
    npo_loss,
    retain_kl_loss,
    rmu_control_vector,
    rmu_loss,
    satimp_loss,
    sequence_log_probs,
    token_log_probs,
    undial_loss,
    wga_loss,
)
from lightning_losses.mixins.unlearning_scoring import find_layer
from tests.helpers.loss_tester import assert_value_and_gradient
from tests.modules.test_unlearning import T, items, loaders, tiny_lora, trainer

NEW_METHODS = ["wga", "satimp", "ceu", "undial", "rmu", "altpo"]
G = torch.Generator().manual_seed(0)


def token_batch(b: int = 3, t: int = 7, v: int = 11, prompt: tuple[int, ...] = (2, 3, 1)):
    logits = torch.randn(b, t, v, generator=G, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=G)
    for i, p in enumerate(prompt[:b]):
        labels[i, :p] = -100
    return logits, labels


# --------------------------------------------------------------------------------------------------------------------
# naive references (loops over tokens, float64) and the official code's formulas
# --------------------------------------------------------------------------------------------------------------------
def ref_weighted_ascent(lp: torch.Tensor, mask: torch.Tensor, weight) -> torch.Tensor:
    total, n = lp.new_zeros(()), 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[b, t]:
                p = math.exp(float(lp[b, t].detach()))
                total = total + weight(p) * lp[b, t]
                n += 1
    return total / n


def official_token_weighted(logits, labels, weight):
    """open-unlearning's compute_wga_loss / compute_satimp_loss from shifted logits (weight of the detached p)."""
    z, y = logits[:, :-1], labels[:, 1:]
    lm = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="none")
    w = weight(torch.exp(-lm).detach())
    return -(w * lm)[y.reshape(-1) != -100].mean()


def ref_ceu(logits, labels, ignore_first):
    """Per answer token after the first ``ignore_first`` of its row: q = the detached softmax without the answer
    token, the loss -Σ q log p (labels[:, 0] is prompt in these batches)."""
    total, n = logits.new_zeros(()), 0
    for b in range(logits.shape[0]):
        answer = [t for t in range(1, logits.shape[1]) if labels[b, t] != -100]
        for t in answer[ignore_first:]:
            z, y = logits[b, t - 1], int(labels[b, t])
            q = torch.softmax(z.detach(), -1)
            q[y] = 0.0
            q = q / q.sum()
            total = total - (q * torch.log_softmax(z, -1)).sum()
            n += 1
    return total / n


def official_ceu(logits, labels, ignore_first):
    valid = labels != -100
    first = (valid.cumsum(-1) <= ignore_first) & valid
    y = labels.masked_fill(first, -100)[:, 1:]
    z = logits[:, :-1]
    keep = y != -100
    rows, targets = z[keep], y[keep]
    q = torch.softmax(rows.detach().clone().scatter(-1, targets.unsqueeze(-1), float("-inf")), -1)
    return F.cross_entropy(rows, q)


def ref_undial(logits, ref_logits, labels, gamma):
    total, n = logits.new_zeros(()), 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            adjusted = ref_logits[b, t - 1].detach().clone()
            adjusted[y] -= gamma
            q = torch.softmax(adjusted, -1)
            total = total - (q * torch.log_softmax(logits[b, t - 1], -1)).sum()
            n += 1
    return total / n


def official_undial(logits, ref_logits, labels, gamma):
    """compute_undial_loss: every position of the batch (here every label is real)."""
    y, z, zr = labels[:, 1:], logits[:, :-1], ref_logits[:, :-1]
    mask = torch.zeros_like(zr)
    mask.scatter_(-1, y.unsqueeze(-1), 1.0)
    soft = torch.softmax(zr - mask * gamma, -1)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), soft.reshape(-1, soft.shape[-1]), reduction="none").mean()


def ref_rmu(h, target, mask):
    per_seq = []
    for b in range(h.shape[0]):
        rows = [((h[b, t] - target[b, t] if target.ndim == 3 else h[b, t] - target) ** 2).mean()
                for t in range(h.shape[1]) if mask[b, t]]  # fmt: skip
        per_seq.append(torch.stack(rows).mean())
    return torch.stack(per_seq).mean()


def official_rmu(a1, a2, mask):
    """compute_activation_loss of open-unlearning's rmu.py."""
    sq = F.mse_loss(a1, a2.expand_as(a1), reduction="none")
    summed = (sq * mask.unsqueeze(-1).expand_as(sq)).mean(dim=2).sum(dim=1)
    return (summed / mask.sum(dim=-1)).mean()


# --------------------------------------------------------------------------------------------------------------------
# functional: value and gradient
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wga_and_satimp_match_naive_loops_and_the_official_formula(dtype):
    logits, labels = token_batch()
    lp, mask = token_log_probs(logits, labels, shift=True)
    for beta in (0.0, 1.0, 2.5):
        assert_value_and_gradient(
            lambda x, m, b=beta: wga_loss(x, m, b),
            lambda x, m, b=beta: ref_weighted_ascent(x, m, lambda p: p**b),
            lp.detach(), mask, dtype=dtype,
        )  # fmt: skip
        assert_value_and_gradient(
            lambda z, y, b=beta: wga_loss(*token_log_probs(z, y, shift=True), b),
            lambda z, y, b=beta: official_token_weighted(z, y, lambda p: p**b),
            logits, labels, dtype=dtype,
        )  # fmt: skip
    for b1, b2 in ((5.0, 1.0), (1.0, 3.0)):

        def weight(p, b1=b1, b2=b2):
            return p**b1 * (1 - p) ** b2

        assert_value_and_gradient(
            lambda x, m, b1=b1, b2=b2: satimp_loss(x, m, b1, b2),
            lambda x, m, w=weight: ref_weighted_ascent(x, m, w),
            lp.detach(), mask, dtype=dtype,
        )  # fmt: skip
        assert_value_and_gradient(
            lambda z, y, b1=b1, b2=b2: satimp_loss(*token_log_probs(z, y, shift=True), b1, b2),
            lambda z, y, w=weight: official_token_weighted(z, y, w),
            logits, labels, dtype=dtype,
        )  # fmt: skip


def test_wga_properties_weight_sign_beta_zero_and_satimp_reduction():
    logits, labels = token_batch()
    lp, mask = token_log_probs(logits, labels, shift=True)
    x = lp.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(wga_loss(x, mask, 1.5), x)
    # descent lowers every answer token's log-probability, the more the likelier the token, masked ones untouched
    n = int(mask.sum())
    torch.testing.assert_close(grad[mask], x.detach().exp()[mask] ** 1.5 / n)
    assert bool((grad[mask] > 0).all()) and bool((grad[~mask] == 0).all())
    # β = 0: plain gradient ascent (the negated token-mean NLL); SatImp with β2 = 0 is WGA
    torch.testing.assert_close(wga_loss(lp, mask, 0.0), (lp * mask).sum() / n)
    torch.testing.assert_close(satimp_loss(lp, mask, 2.0, 0.0), wga_loss(lp, mask, 2.0))
    # per-sequence β equals each sequence's scalar β (token-weighted)
    betas = torch.tensor([0.5, 1.0, 2.0], dtype=lp.dtype)
    parts = [wga_loss(lp[i : i + 1], mask[i : i + 1], float(betas[i])) * mask[i].sum() for i in range(3)]
    torch.testing.assert_close(wga_loss(lp, mask, betas), torch.stack(parts).sum() / n)
    # num_items_in_batch replaces the token count
    torch.testing.assert_close(wga_loss(lp, mask, 1.0, num_items_in_batch=2 * n), wga_loss(lp, mask, 1.0) / 2)


@pytest.mark.parametrize("ignore_first", [0, 1, 2])
def test_ceu_matches_a_naive_loop_and_the_official_formula(ignore_first):
    logits, labels = token_batch(prompt=(2, 3, 1))
    assert_value_and_gradient(
        lambda z, y: ceu_loss(z, y, shift=True, ignore_first=ignore_first),
        lambda z, y: official_ceu(z, y, ignore_first),
        logits, labels, dtype=torch.float32,
    )  # fmt: skip
    assert_value_and_gradient(
        lambda z, y: ceu_loss(z, y, shift=True, ignore_first=ignore_first),
        lambda z, y: ref_ceu(z, y, ignore_first),
        logits, labels,
    )  # fmt: skip


def test_ceu_gradient_is_p_minus_q_and_lowers_the_answer_token():
    z = torch.randn(1, 2, 6, dtype=torch.float64, generator=G).requires_grad_(True)
    y = torch.tensor([[-100, 4]])
    (grad,) = torch.autograd.grad(ceu_loss(z, y, shift=True, ignore_first=0), z)
    p = torch.softmax(z[0, 0].detach(), -1)
    q = p.clone()
    q[4] = 0
    q /= q.sum()
    torch.testing.assert_close(grad[0, 0], p - q)
    assert float(grad[0, 0, 4]) > 0 and bool((grad[0, 0, [0, 1, 2, 3, 5]] < 0).all())


@pytest.mark.parametrize("gamma", [0.0, 3.0, torch.tensor([1.0, 10.0, 0.5])])
def test_undial_matches_a_naive_loop(gamma):
    logits, labels = token_batch()
    ref = torch.randn(logits.shape, generator=G, dtype=torch.float64)
    loops = [float(g) for g in gamma] if isinstance(gamma, torch.Tensor) else None

    def naive(z, y, r):
        if loops is None:
            return ref_undial(z, r, y, float(gamma))
        counts = [(y[i, 1:] != -100).sum() for i in range(len(loops))]
        parts = [ref_undial(z[i : i + 1], r[i : i + 1], y[i : i + 1], loops[i]) * counts[i] for i in range(len(loops))]
        return torch.stack(parts).sum() / sum(counts)

    assert_value_and_gradient(
        lambda z, y, r: undial_loss(z, r, y, gamma, shift=True), naive, logits, labels, ref, dtype=torch.float32
    )


def test_undial_matches_the_official_formula_on_fully_labelled_sequences():
    logits = torch.randn(2, 5, 9, generator=G, dtype=torch.float64)
    ref = torch.randn(2, 5, 9, generator=G, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5), generator=G)
    assert_value_and_gradient(
        lambda z, y, r: undial_loss(z, r, y, 10.0, shift=True),
        lambda z, y, r: official_undial(z, r, y, 10.0),
        logits, labels, ref,
    )  # fmt: skip


def test_undial_with_gamma_zero_is_kl_to_the_reference_plus_its_entropy():
    logits, labels = token_batch()
    ref = torch.randn(logits.shape, generator=G, dtype=torch.float64)
    z = logits.clone().requires_grad_(True)
    undial = undial_loss(z, ref, labels, 0.0, shift=True)
    kl = retain_kl_loss(z, ref, labels, shift=True)
    mask = labels[:, 1:] != -100
    log_r = torch.log_softmax(ref[:, :-1][mask], -1)
    entropy = -(log_r.exp() * log_r).sum(-1).mean()
    torch.testing.assert_close(undial, kl + entropy)
    g1, g2 = torch.autograd.grad(undial, z)[0], torch.autograd.grad(kl, z)[0]
    torch.testing.assert_close(g1, g2)
    # a larger γ moves the target away from the answer token: the loss rises where the model still predicts it
    strong = logits.clone()
    strong[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1), 20.0)
    assert undial_loss(strong, strong, labels, 10.0, shift=True) > undial_loss(strong, strong, labels, 0.0, shift=True)


def test_rmu_loss_matches_a_naive_loop_and_the_official_formula_and_control_vector():
    h = torch.randn(3, 5, 4, generator=G, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    u = rmu_control_vector(4, seed=7, dtype=torch.float64)
    ref_h = torch.randn(3, 5, 4, generator=G, dtype=torch.float64)
    for target in (6.5 * u, ref_h):
        assert_value_and_gradient(lambda x, t=target: rmu_loss(x, t, mask), lambda x, t=target: ref_rmu(x, t, mask), h)
        assert_value_and_gradient(
            lambda x, t=target: rmu_loss(x, t, mask), lambda x, t=target: official_rmu(x, t, mask), h
        )
    assert torch.isclose(u.norm(), torch.tensor(1.0, dtype=torch.float64)) and bool((u >= 0).all())
    assert torch.equal(u, rmu_control_vector(4, seed=7, dtype=torch.float64))
    assert not torch.equal(u, rmu_control_vector(4, seed=8, dtype=torch.float64))
    # activations at the target: no loss
    assert float(rmu_loss(u.expand(3, 5, 4).clone(), u, mask)) == 0.0


def test_altpo_is_dpo_with_the_alternate_preferred_as_the_official_formula():
    pa, ra, pf, rf = (torch.randn(4, generator=G, dtype=torch.float64) * 5 for _ in range(4))

    def official(pa, ra, pf, rf, beta):  # compute_dpo_loss: win = alternate, lose = forget
        return -2 / beta * F.logsigmoid(beta * ((pa - ra) - (pf - rf))).mean()

    assert_value_and_gradient(lambda x: altpo_loss(x, ra, pf, rf, 0.1), lambda x: official(x, ra, pf, rf, 0.1), pa)
    assert_value_and_gradient(lambda x: altpo_loss(pa, ra, x, rf, 0.3), lambda x: official(pa, ra, x, rf, 0.3), pf)
    torch.testing.assert_close(altpo_loss(pa, ra, pf, rf), idk_dpo_loss(pa, ra, pf, rf))


# --------------------------------------------------------------------------------------------------------------------
# NPO's length normalisation
# --------------------------------------------------------------------------------------------------------------------
def ref_npo_normalised(policy, reference, lengths, beta):
    out = []
    for p, r, n in zip(policy, reference, lengths):
        x = beta * (p - r) / float(n)
        out.append(2 / beta * torch.log1p(torch.exp(x)))
    return torch.stack(out).mean()


def test_npo_length_normalisation_value_gradient_and_reduction_to_plain_npo():
    reference = torch.randn(4, generator=G, dtype=torch.float64) * 20 - 60
    policy = reference - torch.rand(4, generator=G, dtype=torch.float64) * 30
    lengths = torch.tensor([127, 30, 5, 64])
    assert_value_and_gradient(
        lambda x: npo_loss(x, reference, 0.1, lengths=lengths, length_normalize=True),
        lambda x: ref_npo_normalised(x, reference, lengths, 0.1),
        policy, dtype=torch.float32,
    )  # fmt: skip
    ones = torch.ones(4, dtype=torch.long)
    torch.testing.assert_close(
        npo_loss(policy, reference, 0.1, lengths=ones, length_normalize=True), npo_loss(policy, reference, 0.1)
    )
    # the reason: after the same per-token drop the plain weight 2σ(β Σ r) vanishes on 127 tokens, the normalised
    # one is the same at every length
    drop = -0.37 * lengths.double()
    x = (reference + drop).requires_grad_(True)
    (plain,) = torch.autograd.grad(npo_loss(x, reference, 0.1) * 4, x)
    (normed,) = torch.autograd.grad(npo_loss(x, reference, 0.1, lengths=lengths, length_normalize=True) * 4, x)
    torch.testing.assert_close(plain[0], 2 * torch.sigmoid(torch.tensor(0.1 * -0.37 * 127, dtype=torch.float64)))
    assert float(plain[0]) < 0.02
    weights = normed * lengths  # the weight per token-mean unit: 2σ(β · mean log-ratio), equal for every length
    torch.testing.assert_close(weights, torch.full_like(weights, 2 * torch.sigmoid(torch.tensor(-0.037)).item()))
    # the module and the presets take the option; the loss then reads the lengths
    loss = NPOLoss(length_normalize=True)
    assert "lengths" in loss.needs and "length_normalize=True" in repr(loss)
    scores = UnlearningScores(policy_logps=policy, reference_logps=reference, lengths=lengths)
    torch.testing.assert_close(loss(scores), npo_loss(policy, reference, 0.1, lengths=lengths, length_normalize=True))
    built = unlearning_preset("npo_rt").build(length_normalize=True)
    assert built.length_normalize and float(built.retain_weight) == 1.0
    assert not NPOLoss().length_normalize and "lengths" not in NPOLoss().needs


# --------------------------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_have_clear_errors():
    lp, mask = -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="`mask` must be a bool tensor"):
        wga_loss(lp, mask.long())
    with pytest.raises(ValueError, match="must both have shape"):
        wga_loss(lp, mask[:, :2])
    with pytest.raises(ValueError, match="must be log-probabilities"):
        wga_loss(-lp, mask)
    with pytest.raises(ValueError, match="`beta` must be >= 0"):
        wga_loss(lp, mask, -1.0)
    with pytest.raises(ValueError, match="counts no token"):
        satimp_loss(lp, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="`beta2` must be >= 0"):
        satimp_loss(lp, mask, 1.0, torch.tensor([1.0, -1.0]))
    z, y = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ceu_loss(z[..., :1], y.clamp(max=0))
    with pytest.raises(ValueError, match="`ignore_first` must be"):
        ceu_loss(z, y, ignore_first=-1)
    with pytest.raises(ValueError, match="outside \\[0, 5\\)"):
        ceu_loss(z, y + 5)
    with pytest.raises(ValueError, match="must have the same shape"):
        undial_loss(z, z[:, :3], y)
    with pytest.raises(ValueError, match="`gamma` must be >= 0"):
        undial_loss(z, z, y, -1.0)
    with pytest.raises(ValueError, match="non-finite"):
        undial_loss(z, torch.full_like(z, float("nan")), y)
    h = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="`mask` must be a bool tensor of shape"):
        rmu_loss(h, torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        rmu_loss(h, torch.zeros(5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a counted position"):
        rmu_loss(h, torch.zeros(3), torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="`dim` must be"):
        rmu_control_vector(0)
    with pytest.raises(ValueError, match="pass `lengths`"):
        npo_loss(-torch.rand(2), -torch.rand(2), length_normalize=True)
    with pytest.raises(ValueError, match="`lengths` must be positive"):
        npo_loss(-torch.rand(2), -torch.rand(2), lengths=torch.tensor([3, 0]), length_normalize=True)
    with pytest.raises(TypeError, match="`length_normalize` must be a bool"):
        NPOLoss(length_normalize=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`x` holds 1 non-finite"):
        flat_variational_pair(torch.tensor([0.1, float("inf")]))
    assert torch.isinf(flat_variational_pair(torch.tensor([float("inf")]), "kl", validate_args=False)[1]).all()
    with pytest.raises(ValueError, match="`reference` holds 1 non-finite"):
        project_conflicting_gradient(torch.ones(3), torch.tensor([1.0, float("nan"), 0.0]))
    out = project_conflicting_gradient(torch.ones(2), torch.tensor([float("nan"), 0.0]), validate_args=False)
    assert torch.isnan(out).any()
    with pytest.raises(TypeError, match="`layer` must be a module name"):
        RMULoss(layer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Layer 'transformer\.h\.9'.*no module matches"):
        find_layer(tiny_lora(), "transformer.h.9")
    with pytest.raises(ValueError, match="several modules match"):
        find_layer(tiny_lora(), "attn")
    with pytest.raises(ValueError, match="no module matches"):
        UnlearningModule(tiny_lora(), method="rmu", loss=RMULoss(layer="nope"))
    with pytest.raises(ValueError, match=r"no PEFT adapter to disable"):
        from tests.modules.test_unlearning import tiny_lm

        UnlearningModule(tiny_lm(), method="undial")


# --------------------------------------------------------------------------------------------------------------------
# the mixin's scores
# --------------------------------------------------------------------------------------------------------------------
def _moved(module: UnlearningModule, scale: float = 0.3) -> UnlearningModule:
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale, generator=torch.Generator().manual_seed(len(n)))
    return module


def _batches():
    train, _ = loaders()
    return next(iter(train.iterables["forget"])), next(iter(train.iterables["retain"]))


@pytest.mark.parametrize("use_hidden_states", [True, False])
def test_token_scores_of_the_module_match_the_functional_on_the_model_logits(use_hidden_states):
    forget, retain = _batches()
    module = _moved(UnlearningModule(tiny_lora(), method="wga", use_hidden_states=use_hidden_states))
    logits = module.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    lp, mask = token_log_probs(logits, forget["labels"], shift=True)
    retain_logits = module.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    retain_nll = (
        -sequence_log_probs(retain_logits, retain["labels"], shift=True).sum() / (retain["labels"][:, 1:] != -100).sum()
    )
    expected = wga_loss(lp, mask, 1.0) + retain_nll
    torch.testing.assert_close(module.unlearning_loss(forget, retain), expected, rtol=1e-5, atol=1e-5)
    # the forget forward runs once for several entries
    calls = []
    handle = find_layer(module.model, "wte").register_forward_hook(lambda *a: calls.append(1))
    scores = module.unlearning_scores(forget)
    scores.token_logps, scores.policy_logps, scores.mean_token_probs, scores.logits
    handle.remove()
    assert len(calls) == 1


def test_undial_through_the_module_uses_the_disabled_adapter_as_reference():
    forget, _ = _batches()
    module = _moved(UnlearningModule(tiny_lora(), method="undial", loss=UNDIALLoss(gamma=4.0)))
    assert module.reference_mode == "disabled_adapter"
    logits = module.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    with torch.no_grad(), module.model.disable_adapter():
        base = module.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    assert (base - logits).abs().max() > 1e-3  # the adapter moved the model away from its reference
    expected = undial_loss(logits, base, forget["labels"], 4.0, shift=True)
    torch.testing.assert_close(module.unlearning_loss(forget), expected, rtol=1e-5, atol=1e-5)
    assert float(module.get_hyperparameter("undial.gamma")) == 4.0


def test_rmu_reads_layer_activations_through_the_lora_adapter_and_the_reference():
    forget, retain = _batches()
    module = _moved(
        UnlearningModule(tiny_lora(), method="rmu", loss=RMULoss(layer="transformer.h.0", retain_weight=5.0))
    )
    assert module.reference_mode == "disabled_adapter" and module.unlearning_uses_retain
    kw = {"output_hidden_states": True}
    h_forget = module.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], **kw)
    h_retain = module.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], **kw)
    with torch.no_grad(), module.model.disable_adapter():
        h_base = module.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], **kw)
    forget_h, retain_h, base_h = h_forget.hidden_states[1], h_retain.hidden_states[1], h_base.hidden_states[1]
    assert (retain_h - base_h).abs().max() > 1e-3  # the adapter changes the layer's output
    scores = module.unlearning_scores(forget, retain)
    torch.testing.assert_close(scores.activations, forget_h)
    torch.testing.assert_close(scores.retain_activations, retain_h)
    torch.testing.assert_close(scores.retain_reference_activations, base_h)
    assert not scores.retain_reference_activations.requires_grad and scores.activations.requires_grad
    c = float(module.get_hyperparameter("rmu.steering_coeff"))
    u = rmu_control_vector(forget_h.shape[-1])
    expected = official_rmu(forget_h, c * u, forget["labels"] != -100) + 5.0 * official_rmu(
        retain_h, base_h, retain["labels"] != -100
    )
    loss = module.unlearning_loss(forget, retain)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    # the gradient reaches the adapter of the hooked block, not the blocks after it (the forward stops there)
    loss.backward()
    grads = {n: p.grad for n, p in module.model.named_parameters() if "lora_B" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".h.0." in n)
    assert all(g is None for n, g in grads.items() if ".h.1." in n)
    with pytest.raises(ValueError, match="no retain batch was given"):
        module.unlearning_loss(forget)


def test_rmu_with_an_explicit_reference_model_and_the_default_layer():
    forget, retain = _batches()
    model = tiny_lora()
    reference = copy.deepcopy(model.get_base_model())  # no PEFT prefix in its module names; B = 0: the same model
    module = UnlearningModule(model, method="rmu", reference="model", reference_model=reference)
    assert module.reference_mode == "model"
    assert find_layer(model, None) is model.get_base_model().transformer.h[0]  # 2 blocks: a quarter is block 0
    assert find_layer(reference, None) is reference.transformer.h[0]
    scores = module.unlearning_scores(forget, retain)
    torch.testing.assert_close(scores.retain_reference_activations, scores.retain_activations.detach())
    assert torch.isfinite(module.unlearning_loss(forget, retain))


# --------------------------------------------------------------------------------------------------------------------
# a short run of each preset, and user subclasses
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_new_preset_trains_through_the_module(tmp_path, method):
    model = tiny_lora()
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    module = UnlearningModule(model, method=method, lr=1e-2)
    assert module.unlearning_loss_module is getattr(module, method)
    train, val = loaders()
    trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=train, val_dataloaders=val)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    assert any(not torch.equal(after[n], p) for n, p in adapter_before.items())
    assert math.isfinite(module.unlearning_terms["loss"])


def test_a_user_subclass_is_called_through_the_same_contract():
    class MyWGA(WGALoss):
        def forget_term(self, scores):
            return 2.0 * super().forget_term(scores)

    forget, _ = _batches()
    mine = UnlearningModule(tiny_lora(), method="wga", loss=MyWGA(retain_weight=0.0))
    plain = UnlearningModule(tiny_lora(), method="wga", loss=WGALoss(retain_weight=0.0))
    assert mine.unlearning_loss_module is mine.wga
    torch.testing.assert_close(mine.unlearning_loss(forget), 2.0 * plain.unlearning_loss(forget))


# --------------------------------------------------------------------------------------------------------------------
# 2-process DDP with unequal answer lengths per rank
# --------------------------------------------------------------------------------------------------------------------
N, PER_RANK, WORLD, STEPS = 8, 2, 2, 2


class VaryingPromptCollator(UnlearningBatchCollator):
    """Prompt lengths that depend on the sample (so the ranks hold different numbers of answer tokens)."""

    def __call__(self, batch_items):
        batch = super().__call__(batch_items)
        for row, index in enumerate(batch["index"].tolist()):
            batch["labels"][row, : 1 + (5 * index) % 8] = -100
        return batch


def _ddp_loaders(batch_size: int, order=None, rank=None) -> CombinedLoader:
    from torch.utils.data import Subset

    from tests.test_unlearning_ddp import shard

    forget, retain = items(N, 0, 1), items(N, 100, 2)
    if order is not None:
        forget, retain = Subset(forget, order), Subset(retain, order)
    collate = VaryingPromptCollator()
    out = {
        name: DataLoader(data, batch_size, sampler=None if rank is None else shard(rank), collate_fn=collate)
        for name, data in (("forget", forget), ("retain", retain))
    }
    return CombinedLoader(out, mode="min_size")


def _fit_wga(loader, **trainer_kwargs):
    import lightning.pytorch as pl

    from tests.test_unlearning_ddp import SGDUnlearning

    pl.seed_everything(0, verbose=False)
    module = SGDUnlearning(tiny_lora(), method="wga")
    t = pl.Trainer(
        accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **trainer_kwargs,
    )  # fmt: skip
    t.fit(module, train_dataloaders=loader)
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}


def _ddp_wga(rank: int, world_size: int):
    from tests.callbacks.test_unlearning_evaluation import lightning_ddp_env

    lightning_ddp_env(rank, world_size)
    return _fit_wga(
        _ddp_loaders(PER_RANK, rank=rank), strategy="ddp", devices=world_size, use_distributed_sampler=False
    )


@pytest.mark.ddp
@pytest.mark.slow  # about 70 s on 2 shared cores (two spawned Trainers and one in-process run)
def test_two_process_wga_equals_one_process_with_unequal_answer_lengths_per_rank():
    from tests.helpers.distributed import run_distributed
    from tests.test_unlearning_ddp import shard

    shards = [list(shard(r)) for r in range(WORLD)]
    steps = [[s[k * PER_RANK : (k + 1) * PER_RANK] for s in shards] for k in range(STEPS)]
    tokens = [[sum(T - 1 - (5 * i) % 8 for i in part) for part in step] for step in steps]
    assert all(a != b for a, b in tokens), tokens  # the ranks' answer-token counts differ at every step
    order = [i for step in steps for part in step for i in part]
    single = _fit_wga(_ddp_loaders(WORLD * PER_RANK, order))
    results = run_distributed(_ddp_wga, world_size=WORLD)
    for result in results:
        for name, value in single.items():
            torch.testing.assert_close(result[name], value, rtol=1e-4, atol=1e-6, msg=name)

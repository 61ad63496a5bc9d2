"""Classification unlearning: the forget / retain data module, the classification scores behind the unlearning losses'
contract, Blindspot against the official formula, loss-based membership inference, short unlearning runs on real
digits, 2-process DDP with unequal batch sizes, crash-and-resume and the example."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses import (
    CLASSIFICATION_UNLEARNING_METHODS,
    BlindspotLoss,
    ClassificationUnlearningModule,
    ClassificationUnlearningScores,
    DedupedAccuracy,
    LossMembershipInference,
    RMULoss,
    evaluate_classification_unlearning,
    record_activations,
    template_targets,
    train_classifier,
)
from lightning_losses.data import ClassificationUnlearningDataModule, EpochShuffle, IndexedTensorDataset
from lightning_losses.demos import ConvNet
from lightning_losses.functional import (
    attention_transfer_loss,
    blindspot_loss,
    class_log_probs,
    npo_loss,
    rmu_control_vector,
)
from lightning_losses.metrics.unlearning import classification_losses
from tests.callbacks.test_unlearning_evaluation import lightning_ddp_env
from tests.helpers.distributed import run_distributed
from tests.helpers.resume import crash_and_resume
from tests.helpers.trainer import cpu_trainer

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- naive references
def naive_auc(scores: list[float], members: list[bool]) -> float:
    """AUC by its definition: the fraction of (member, non-member) pairs ordered right, ties counted half."""
    pos = [s for s, m in zip(scores, members) if m]
    neg = [s for s, m in zip(scores, members) if not m]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


def official_attention(x: torch.Tensor) -> torch.Tensor:
    """``attention`` of the official Blindspot code (attention transfer), written out."""
    maps = x.pow(2).mean(1).view(x.size(0), -1)
    return maps / maps.norm(dim=1, keepdim=True).clamp(min=1e-12)


def official_blindspot(z, b, acts, b_acts, temperature=1.0, at_beta=50.0):
    """The forget loss of ``forget_loss`` in the official ``unlearn.py``, with the L1 output distance replaced by the
    KL of the class distributions (the classification counterpart), via ``F.kl_div``."""
    kl = F.kl_div((z / temperature).log_softmax(-1), (b / temperature).softmax(-1), reduction="batchmean")
    at = sum(at_beta * (official_attention(h) - official_attention(g)).pow(2).mean() for h, g in zip(acts, b_acts))
    return kl + at


class MLP(nn.Module):
    """A batch-norm-free classifier of 8×8 images (so that DDP equals one process without frozen statistics)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _quiet_fit(trainer: pl.Trainer, module: pl.LightningModule, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval mode.*|.*does not have many workers.*|.*LeafSpec.*")
        trainer.fit(module, **kwargs)


# ---------------------------------------------------------------------------------------------- data module
def test_class_forget_removes_exactly_that_class_and_splits_are_disjoint():
    dm = ClassificationUnlearningDataModule("mnist", forget="class", forget_class=7, seed=3)
    dm.setup()
    train, forget, retain = dm.dataset("train"), dm.dataset("forget"), dm.dataset("retain")
    test, heldout = dm.dataset("test"), dm.dataset("heldout")
    assert len(train) == 3500 and int((train.targets == 7).sum()) == len(forget) > 0
    assert bool((forget.targets == 7).all()) and not bool((retain.targets == 7).any())
    assert set(forget.indices.tolist()).isdisjoint(retain.indices.tolist())
    assert sorted(forget.indices.tolist() + retain.indices.tolist()) == sorted(train.indices.tolist())
    # held-out = the forgotten class's test samples; test = the rest; neither was trained on
    assert bool((heldout.targets == 7).all()) and not bool((test.targets == 7).any())
    assert len(heldout) + len(test) == len(dm.base.dataset("test"))
    assert set(heldout.indices.tolist() + test.indices.tolist()).isdisjoint(train.indices.tolist())
    # the images follow their indices (the same pixels as the base split)
    i = int(forget.indices[0])
    position = int((train.indices == i).nonzero())
    torch.testing.assert_close(forget.images[0], train.images[position], rtol=0, atol=0)


def test_random_forget_is_seeded_sized_and_disjoint():
    def forget_ids(seed: int, size: int = 50) -> list[int]:
        dm = ClassificationUnlearningDataModule("digits", forget="random", forget_size=size, seed=seed)
        dm.setup()
        f, r = dm.dataset("forget").indices.tolist(), dm.dataset("retain").indices.tolist()
        assert len(f) == size and set(f).isdisjoint(r) and len(f) + len(r) == len(dm.dataset("train"))
        assert dm.dataset("heldout").indices.tolist() == dm.dataset("test").indices.tolist()
        return f

    assert forget_ids(0) == forget_ids(0)
    assert forget_ids(0) != forget_ids(1)
    assert len({*forget_ids(0)} & {*forget_ids(0, size=80)}) == 50  # a larger subset extends the smaller one


def test_train_loader_pairs_each_forget_batch_with_retain_samples_fixed_by_the_epoch():
    dm = ClassificationUnlearningDataModule("digits", forget="class", forget_class=1, batch_size=16, seed=0)
    dm.setup()

    def epoch(e: int) -> tuple[list[int], list[int]]:
        loader = dm.train_dataloader()
        for part in loader.flattened:
            part.sampler.set_epoch(e)
        f, r = [], []
        for batch, *_ in loader:
            f += batch["forget"][2].tolist()
            r += batch["retain"][2].tolist()
        return f, r

    f0, r0 = epoch(0)
    assert sorted(f0) == sorted(dm.dataset("forget").indices.tolist())  # one pass over the forget set
    assert len(r0) == len(f0) and set(r0) <= set(dm.dataset("retain").indices.tolist())
    assert epoch(0) == (f0, r0)  # a resumed run at epoch 0 reads the same
    f1, r1 = epoch(1)
    assert sorted(f1) == sorted(f0) and (f1, r1) != (f0, r0)


def test_epoch_shuffle_cycles_past_its_size():
    sampler = EpochShuffle(4, num_samples=10, seed=2)
    drawn = list(sampler)
    assert len(drawn) == 10 and all(drawn.count(i) >= 2 for i in range(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar"}, "`dataset` must be one of"),
        ({"forget": "half"}, "`forget` must be one of"),
        ({"forget_class": 10}, "forget_class"),
        ({"forget_fraction": 1.0}, "forget_fraction"),
        ({"forget_size": 0}, "forget_size"),
    ],
)
def test_data_module_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassificationUnlearningDataModule(**kwargs)


def test_data_module_refuses_a_forget_set_without_retain_data():
    dm = ClassificationUnlearningDataModule("digits", forget="random", forget_size=5000)
    with pytest.raises(ValueError, match="must leave both a forget and a retain set"):
        dm.setup()
    with pytest.raises(ValueError, match="`split` must be one of"):
        ClassificationUnlearningDataModule("digits").dataset("everything")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- metrics
def test_loss_membership_inference_equals_the_naive_auc_streaming_and_deduplicated():
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(30, 5, generator=gen), torch.randint(0, 5, (30,), generator=gen)
    members = torch.rand(30, generator=gen) < 0.4
    losses = [-float(torch.log_softmax(row, -1)[t]) for row, t in zip(logits, target)]
    expected = naive_auc([-v for v in losses], members.tolist())
    whole = LossMembershipInference()
    whole.update(logits, target, members, torch.arange(30))
    assert abs(float(whole.compute()) - expected) < 1e-6
    streamed = LossMembershipInference()
    for chunk in (slice(0, 7), slice(7, 19), slice(19, 30), slice(3, 9)):  # the last one: padded repeats
        streamed.update(logits[chunk], target[chunk], members[chunk], torch.arange(30)[chunk])
    assert abs(float(streamed.compute()) - expected) < 1e-6
    # a model that fits its members (low loss) is found out: AUC 1
    perfect = LossMembershipInference()
    perfect.update(10 * F.one_hot(target, 5).float(), target, members=True)
    perfect.update(torch.zeros(4, 5), target[:4], members=False)
    assert float(perfect.compute()) == 1.0


def test_classification_losses_and_deduplicated_accuracy_against_naive():
    logits, target = torch.randn(9, 4), torch.randint(0, 4, (9,))
    naive = torch.stack([torch.logsumexp(r, 0) - r[t] for r, t in zip(logits, target)])
    torch.testing.assert_close(classification_losses(logits, target), naive)
    acc = DedupedAccuracy()
    acc.update(logits, target, torch.arange(9))
    acc.update(logits[:3].flip(-1), target[:3], torch.arange(3))  # repeats: counted once, first occurrence
    expected = sum(int(r.argmax() == t) for r, t in zip(logits, target)) / 9
    assert abs(float(acc.compute()) - expected) < 1e-7


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(4), torch.zeros(4, dtype=torch.long), True), "logits of shape"),
        ((torch.randn(4, 3), torch.zeros(4), True), "integer tensor"),
        ((torch.randn(4, 3), torch.full((4,), 3), True), "outside \\[0, 3\\)"),
        ((torch.randn(4, 3), torch.zeros(3, dtype=torch.long), True), "1-D integer tensor of 4"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3, dtype=torch.bool)), "`members` must"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4)), "`members` must"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), True, torch.zeros(4)), "`index` must"),
    ],
)
def test_membership_inference_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        LossMembershipInference().update(*args)


def test_membership_inference_needs_both_sides_and_consistent_indices():
    mia = LossMembershipInference()
    mia.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), True)
    with pytest.raises(ValueError, match="AUC needs both members and non-members"):
        mia.compute()
    with pytest.raises(ValueError, match="with every update or with none"):
        mia.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), False, torch.arange(3))


def test_deduplicated_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="`index` is required"):
        DedupedAccuracy().update(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`index` must be an integer tensor of shape \\(2,\\)"):
        DedupedAccuracy().update(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="has no sample"):
        DedupedAccuracy().compute()


# ---------------------------------------------------------------------------------------------- functional losses
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_blindspot_loss_value_and_gradient_equal_the_official_formula(temperature):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    acts = [torch.randn(5, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)]
    acts.append(torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True))
    b_acts = [torch.randn_like(a) for a in acts]
    ours = blindspot_loss(z, b, acts, b_acts, temperature)
    ref = official_blindspot(z, b, acts, b_acts, temperature)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, [z, *acts])
    g_ref = torch.autograd.grad(ref, [z, *acts])
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


def test_blindspot_loss_properties():
    z, acts = torch.randn(4, 3), [torch.randn(4, 2, 5, 5)]
    assert float(blindspot_loss(z, z, acts, acts)) == 0.0  # the blindspot model itself: nothing to move
    assert float(blindspot_loss(z, z + 3.0, acts, acts)) == pytest.approx(0.0, abs=1e-6)  # logits shift: same law
    assert float(attention_transfer_loss(acts[0], 5 * acts[0])) == pytest.approx(0.0, abs=1e-7)  # scale-free maps
    far = blindspot_loss(z, torch.zeros(4, 3), acts, [torch.randn(4, 2, 5, 5)])
    assert float(far) > float(blindspot_loss(z, torch.zeros(4, 3), acts, acts)) > 0
    # λ_AT = 0: the output KL alone
    torch.testing.assert_close(
        blindspot_loss(z, -z, acts, [torch.randn(4, 2, 5, 5)], attention_weight=0.0), blindspot_loss(z, -z)
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: blindspot_loss(torch.randn(2, 3), torch.randn(2, 4)), "same shape"),
        (lambda: blindspot_loss(torch.randn(2, 3), torch.randn(2, 3), [torch.randn(2, 1, 2, 2)]), "activations"),
        (lambda: blindspot_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0), "temperature"),
        (lambda: blindspot_loss(torch.randn(2, 3), torch.randn(2, 3), attention_weight=-1.0), "attention_weight"),
        (lambda: blindspot_loss(torch.randn(3), torch.randn(3)), "logits of shape"),
        (lambda: blindspot_loss(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2)), "must be finite"),
        (
            lambda: blindspot_loss(*[torch.randn(2, 3)] * 2, [torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 2, 2)]),
            "spatial",
        ),
        (lambda: class_log_probs(torch.randn(2, 3), torch.tensor([0, 5])), "outside \\[0, 3\\)"),
    ],
)
def test_classification_functional_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_class_log_probs_is_the_negated_cross_entropy():
    logits, target = torch.randn(6, 5, requires_grad=True), torch.randint(0, 5, (6,))
    ours = class_log_probs(logits, target)
    naive = torch.stack([r[t] - torch.logsumexp(r, 0) for r, t in zip(logits, target)])
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), logits)[0], torch.autograd.grad(naive.sum(), logits)[0])


# ---------------------------------------------------------------------------------------------- the contract
def _batch(n: int, seed: int, offset: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen), torch.arange(n) + offset


def test_module_scores_follow_the_contract_npo_equals_the_naive_formula():
    torch.manual_seed(0)
    model = MLP()
    module = ClassificationUnlearningModule(model, loss="npo_kl")
    with torch.no_grad():  # the model moves away from the reference, so the reference term is not trivial
        for p in module.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    forget, retain = _batch(6, 1), _batch(5, 2, 100)
    loss = module.unlearning_loss(forget, retain)
    x, y, _ = forget
    policy = torch.stack([torch.log_softmax(r, 0)[t] for r, t in zip(module.model(x), y)])
    reference = torch.stack([torch.log_softmax(r, 0)[t] for r, t in zip(module.reference(x), y)])
    p_ref, p = module.reference(retain[0]).softmax(-1), module.model(retain[0]).softmax(-1)
    kl = (p_ref * (p_ref.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(loss, npo_loss(policy, reference, 0.1) + kl, rtol=1e-5, atol=1e-6)
    assert module.last_terms["retain"] == pytest.approx(float(kl.detach()), rel=1e-5)
    # the reference is a frozen copy of the original, in eval mode even in a training module
    module.train()
    assert not module.reference.training and not any(p.requires_grad for p in module.reference.parameters())


def test_every_preset_and_a_user_loss_run_through_the_same_scores():
    torch.manual_seed(0)
    forget, retain = _batch(4, 1), _batch(4, 2, 50)
    methods = [m for m in CLASSIFICATION_UNLEARNING_METHODS if m != "blindspot"]
    assert {"ga", "graddiff", "graddiff_kl", "npo", "npo_rt", "npo_kl", "simnpo", "flat", "idkdpo", "rmu"} <= set(
        methods
    )
    for method in methods:
        # RMU steers a named layer: the MLP has no nn.ModuleList of blocks to choose a default from
        loss = RMULoss(layer="body") if method == "rmu" else method
        module = ClassificationUnlearningModule(MLP(), loss=loss)
        loss = module.unlearning_loss(forget, retain)
        assert loss.ndim == 0 and torch.isfinite(loss), method
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters()), method

    class Confidence(nn.Module):
        needs = ("mean_token_probs",)

        def forward(self, scores):
            return scores.mean_token_probs.mean()

    module = ClassificationUnlearningModule(MLP(), loss=Confidence(), reference=None, retain_loss=None)
    x, y, _ = forget
    expected = module.model(x).softmax(-1).gather(1, y[:, None]).mean()
    torch.testing.assert_close(module.unlearning_loss(forget), expected)
    assert module.attribute == "unlearning" and module.reference is None


def test_rmu_on_a_classifier_equals_the_naive_formula_value_and_gradient():
    # The steered layer's output of each sample, flattened, is pushed toward c·u; on retain data it is held at the
    # reference's. Written out by hand: mean over samples of the mean squared difference over the layer's D values.
    torch.manual_seed(0)
    module = ClassificationUnlearningModule(MLP(), loss=RMULoss(layer="body", steering_coeff=2.0, retain_weight=3.0))
    assert module.steered_layer == "body" and module.reference is not None
    with torch.no_grad():  # the model moves away from the reference, so the retain term is not zero
        for p in module.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    forget, retain = _batch(6, 1), _batch(5, 2, 100)
    loss = module.unlearning_loss(forget, retain)
    grads = torch.autograd.grad(loss, list(module.model.parameters()), allow_unused=True)
    u = rmu_control_vector(16, seed=0)
    h_forget, h_retain = module.model.body(forget[0]), module.model.body(retain[0])
    with torch.no_grad():
        h_reference = module.reference.body(retain[0])
    forget_term = torch.stack([((h - 2.0 * u) ** 2).mean() for h in h_forget]).mean()
    retain_term = torch.stack([((h - r) ** 2).mean() for h, r in zip(h_retain, h_reference)]).mean()
    expected = forget_term + 3.0 * retain_term
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, list(module.model.parameters()), allow_unused=True)
    for g, e in zip(grads, expected_grads):
        if e is None:  # the head comes after the layer: no gradient, as in open-unlearning
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # a conv layer's (B, C, H, W) output is flattened per sample, and the retain batch is needed
    conv = ClassificationUnlearningModule(ConvNet(width=4), loss=RMULoss(layer="backbone.2"))
    scores = conv.unlearning_scores(forget, retain)
    assert tuple(scores.activations.shape) == (6, 1, 4 * 8 * 8) and scores.activation_mask.all()
    assert tuple(scores.retain_reference_activations.shape) == (5, 1, 4 * 8 * 8)
    assert not scores.retain_reference_activations.requires_grad
    with pytest.raises(ValueError, match="no retain batch"):
        conv.unlearning_loss(forget)
    with pytest.raises(ValueError, match="name the layer"):
        ClassificationUnlearningModule(MLP(), loss="rmu")
    with pytest.raises(ValueError, match="no module matches"):
        ClassificationUnlearningModule(MLP(), loss=RMULoss(layer="encoder"))


def test_template_answers_are_another_class_fixed_per_sample():
    y = torch.randint(0, 10, (200,))
    index = torch.randperm(200)
    t = template_targets(y, index, 10)
    assert bool((t != y).all()) and torch.equal(t, template_targets(y, index, 10))
    assert len(set(t.tolist())) == 10


def test_blindspot_loss_through_the_scores_equals_the_official_formula():
    torch.manual_seed(0)
    model, blindspot = ConvNet(width=4), ConvNet(width=4)
    layers = ("backbone.2", "backbone.6")
    module = ClassificationUnlearningModule(model, loss="blindspot", blindspot_model=blindspot, blindspot_layers=layers)
    assert module.retain_loss == "kl" and module.attribute == "blindspot"
    forget, retain = _batch(6, 1), _batch(5, 2, 100)
    module.train()
    loss = module.unlearning_loss(forget, retain)
    module.eval()  # batch norms are frozen in training (norm_statistics="frozen"): eval outputs are the same
    x = forget[0]
    with record_activations(module.model, layers) as acts:
        z = module.model(x)
    with record_activations(blindspot, layers) as b_acts:
        b = blindspot(x)
    p_ref, p = module.reference(retain[0]).softmax(-1), module.model(retain[0]).softmax(-1)
    kl = (p_ref * (p_ref.log() - p.log())).sum(-1).mean()
    expected = official_blindspot(z, b, [acts[n] for n in layers], [b_acts[n] for n in layers]) + kl
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert not blindspot.training and not any(p.requires_grad for p in blindspot.parameters())


def test_blindspot_loss_reads_classification_scores_only():
    loss = BlindspotLoss(MLP(), layers=["body.2"], retain_weight=0.0)
    with pytest.raises(ValueError, match="`batch` holds them"):
        loss(ClassificationUnlearningScores(forget_logits=torch.randn(2, 10)))
    x = torch.rand(2, 64)
    with pytest.raises(ValueError, match="reads `forget_logits` and `forget_activations`"):
        loss(ClassificationUnlearningScores(forget_logits=torch.randn(2, 10), batch={"input": x}))
    with pytest.raises(ValueError, match=r"lacks the layers \['body.2'\]"):
        loss(
            ClassificationUnlearningScores(forget_logits=torch.randn(2, 10), forget_activations={}, batch={"input": x})
        )
    with pytest.raises(ValueError, match=r"has no submodule \['conv9'\]"):
        BlindspotLoss(MLP(), layers=["conv9"])
    with pytest.raises(TypeError, match="`blindspot_model` must be an nn\\.Module"):
        BlindspotLoss("model")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": "npo_plus"}, ValueError, "`loss` must be one of"),
        ({"loss": "blindspot"}, ValueError, "needs `blindspot_model`"),
        ({"loss": "npo", "reference": None}, ValueError, "compares with a reference model"),
        ({"loss": "graddiff_kl", "reference": None}, ValueError, "compares with a reference model"),
        ({"loss": 3}, TypeError, "`loss` must be a method name or an nn.Module"),
        ({"retain_loss": "l2"}, ValueError, "`retain_loss` must be one of"),
        ({"norm_statistics": "sync"}, ValueError, "`norm_statistics` must be one of"),
        ({"lr": 0.0}, ValueError, "lr"),
    ],
)
def test_module_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClassificationUnlearningModule(MLP(), **kwargs)


def test_module_bad_batches():
    model = MLP()
    with pytest.raises(ValueError, match="`reference` is the model being unlearned"):
        ClassificationUnlearningModule(model, reference=model)
    module = ClassificationUnlearningModule(model, loss="graddiff")
    with pytest.raises(ValueError, match=r"has a retain term .* but no retain batch"):
        module.unlearning_loss(_batch(3, 0))
    with pytest.raises(ValueError, match="expects training batches \\{'forget'"):
        module.training_step(_batch(3, 0), 0)
    x, y, i = _batch(3, 0)
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        module.unlearning_loss((x, y + 10, i), _batch(3, 1))
    with pytest.raises(ValueError, match="logits of shape \\(N, 5\\)"):
        ClassificationUnlearningModule(MLP(), num_classes=5, loss="ga").unlearning_loss((x, y % 5, i))


# ---------------------------------------------------------------------------------------------- unlearning works
@pytest.fixture(scope="module")
def digits_study():
    """Digits with the class 3 to forget, an original CNN trained on everything and a blindspot model."""
    dm = ClassificationUnlearningDataModule("digits", forget="class", forget_class=3, batch_size=32, seed=0)
    dm.setup()
    torch.manual_seed(0)
    original = train_classifier(ConvNet(width=8), dm.dataloader("train", shuffle=True), epochs=8, lr=3e-3)
    torch.manual_seed(1)
    blindspot = train_classifier(ConvNet(width=8), dm.dataloader("retain", shuffle=True), max_steps=10, lr=3e-3)
    loaders = {name: dm.dataloader(name) for name in ("forget", "retain", "test", "heldout")}
    return dm, original, blindspot, loaders


@pytest.mark.parametrize("method", ["ga", "npo", "npo_kl", "blindspot"])
def test_a_short_run_lowers_forget_accuracy_and_keeps_retain_accuracy(digits_study, method, tmp_path):
    dm, original, blindspot, loaders = digits_study
    before = evaluate_classification_unlearning(original, loaders)
    assert before["forget_acc"] > 0.8 and before["retain_acc"] > 0.8  # the original knows the class
    extra = {"blindspot_model": blindspot, "blindspot_layers": ("backbone.2",)} if method == "blindspot" else {}
    module = ClassificationUnlearningModule(copy.deepcopy(original), loss=method, lr=5e-4, **extra)
    _quiet_fit(cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0), module, datamodule=dm)
    after = evaluate_classification_unlearning(module.model, loaders)
    assert after["forget_acc"] < 0.5 * before["forget_acc"], (method, before, after)
    assert after["retain_acc"] > 0.75 * before["retain_acc"], (method, before, after)
    # the original weights are untouched: the module unlearned its copy, and its reference is the original
    if module.reference is not None:
        for a, b in zip(module.reference.state_dict().values(), original.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rmu_steering_a_conv_block_lowers_forget_accuracy_and_keeps_retain_accuracy(digits_study, tmp_path):
    # open-unlearning's LLM defaults (c = 300, retain weight 1000) are for 4k-wide hidden states; on this ConvNet's
    # 256 values of the second block (2·width channels at 4×4), c = 10 and a retain weight of 1 steer it in 10 epochs.
    dm, original, _, loaders = digits_study
    before = evaluate_classification_unlearning(original, loaders)
    loss = RMULoss(layer="backbone.6", steering_coeff=10.0, retain_weight=1.0)
    module = ClassificationUnlearningModule(copy.deepcopy(original), loss=loss, lr=1e-3)
    _quiet_fit(cpu_trainer(tmp_path, max_epochs=10, limit_val_batches=0), module, datamodule=dm)
    after = evaluate_classification_unlearning(module.model, loaders)
    assert after["forget_acc"] < 0.6 * before["forget_acc"], (before, after)
    assert after["retain_acc"] > 0.9 * before["retain_acc"], (before, after)


def test_validation_logs_split_accuracy_and_membership_inference(digits_study, tmp_path):
    dm, original, _, loaders = digits_study
    module = ClassificationUnlearningModule(copy.deepcopy(original), loss="npo")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*LeafSpec.*")
        metrics = cpu_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    expected = evaluate_classification_unlearning(original, loaders)
    for split in ("forget", "retain", "test", "heldout"):
        assert metrics[f"val/acc_{split}"] == pytest.approx(expected[f"{split}_acc"], abs=1e-6)
    assert metrics["val/mia_auc"] == pytest.approx(expected["mia_auc"], abs=1e-6)


def test_gold_forget_quality_is_one_against_itself_and_low_for_the_original(digits_study):
    _, original, _, loaders = digits_study
    gold = evaluate_classification_unlearning(original, loaders)
    again = evaluate_classification_unlearning(original, loaders, gold["forget_losses"], gold["mia_auc"])
    assert again["forget_quality"] == 1.0 and again["mia_gap"] == 0.0
    torch.manual_seed(5)
    untrained = evaluate_classification_unlearning(ConvNet(width=8), loaders, gold["forget_losses"])
    assert untrained["forget_quality"] < 1e-3


# ---------------------------------------------------------------------------------------------- DDP
RANK_SIZES = ((3, 2), (5, 4))  # (forget, retain) batch sizes of rank 0 and rank 1: unequal on purpose
STEPS, DDP_LR = 2, 0.5


def _rank_loader(rank: int | None) -> CombinedLoader:
    """The forget / retain batches rank ``rank`` reads (``None``: one process reading both ranks' batches per step,
    concatenated)."""
    parts = {}
    for role, column in (("forget", 0), ("retain", 1)):
        rows = []
        for step in range(STEPS):
            for r, sizes in enumerate(RANK_SIZES):
                if rank is None or r == rank:
                    rows.append(
                        _batch(sizes[column], 10 * step + r + 100 * column, 1000 * column + 100 * step + 10 * r)
                    )
        x, y, i = (torch.cat(t) for t in zip(*rows))
        size = sum(s[column] for s in RANK_SIZES) if rank is None else RANK_SIZES[rank][column]
        parts[role] = DataLoader(IndexedTensorDataset(x, y, i), batch_size=size)
    return CombinedLoader(parts, mode="min_size")


def _ddp_fit(loader: CombinedLoader, method: str, **trainer_kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, blindspot = MLP(), MLP()
    extra = {"blindspot_model": blindspot, "blindspot_layers": ("body.2",)} if method == "blindspot" else {}
    module = ClassificationUnlearningModule(model, loss=method, optimizer="sgd", momentum=0.0, lr=DDP_LR, **extra)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    _quiet_fit(trainer, module, train_dataloaders=loader)
    assert trainer.global_step == STEPS
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _ddp_worker(rank: int, world_size: int):
    lightning_ddp_env(rank, world_size)
    ddp = dict(strategy="ddp", devices=world_size, use_distributed_sampler=False)
    return {method: _ddp_fit(_rank_loader(rank), method, **ddp) for method in ("npo_rt", "blindspot")}


@pytest.mark.ddp
def test_two_process_ddp_with_unequal_batches_equals_one_process():
    single = {method: _ddp_fit(_rank_loader(None), method) for method in ("npo_rt", "blindspot")}
    torch.manual_seed(0)
    start = MLP().state_dict()
    results = run_distributed(_ddp_worker, world_size=2)
    for method, params in single.items():
        assert any(not torch.equal(params[k], v) for k, v in start.items()), method  # the model moved
        for rank_result in results:
            for name, value in params.items():
                torch.testing.assert_close(rank_result[method][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _validation_study() -> tuple[ClassificationUnlearningDataModule, nn.Module]:
    """Digits with one class forgotten and an MLP moved away from its initialisation (no training needed)."""
    dm = ClassificationUnlearningDataModule("digits", forget="class", forget_class=3, batch_size=16, seed=0)
    torch.manual_seed(0)
    return dm, MLP()


def _ddp_validate(rank: int, world_size: int) -> dict[str, float]:
    lightning_ddp_env(rank, world_size)
    dm, model = _validation_study()
    module = ClassificationUnlearningModule(model, loss="npo")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*LeafSpec.*")
        trainer = cpu_trainer(strategy="ddp", devices=world_size)  # Lightning's DistributedSampler pads the splits
        return trainer.validate(module, datamodule=dm, verbose=False)[0]


@pytest.mark.ddp
def test_two_process_validation_metrics_equal_one_process_with_the_samplers_padding():
    dm, model = _validation_study()
    dm.setup()
    sizes = [len(dm.dataset(name)) for name in ("forget", "retain", "test", "heldout")]
    assert any(n % 2 for n in sizes), sizes  # an odd split: rank 1 reads a padded duplicate
    expected = evaluate_classification_unlearning(
        model, {n: dm.dataloader(n) for n in ("forget", "retain", "test", "heldout")}
    )
    results = run_distributed(_ddp_validate, world_size=2)
    for metrics in results:
        for split in ("forget", "retain", "test", "heldout"):
            assert metrics[f"val/acc_{split}"] == pytest.approx(expected[f"{split}_acc"], abs=1e-6), split
        assert metrics["val/mia_auc"] == pytest.approx(expected["mia_auc"], abs=1e-6)


def test_the_step_scale_is_what_makes_unequal_batches_agree():
    """Without it DDP would average the ranks' own means (3 and 5 forget samples weighing alike): another gradient."""
    torch.manual_seed(0)
    module = ClassificationUnlearningModule(MLP(), loss="npo_rt")
    params = list(module.model.parameters())
    b0, b1 = (next(iter(_rank_loader(r)))[0] for r in (0, 1))
    naive = [
        (a + b) / 2
        for a, b in zip(
            *(torch.autograd.grad(module.unlearning_loss(b["forget"], b["retain"]), params) for b in (b0, b1))
        )
    ]
    both = {role: tuple(torch.cat([b0[role][j], b1[role][j]]) for j in range(3)) for role in ("forget", "retain")}
    exact = torch.autograd.grad(module.unlearning_loss(both["forget"], both["retain"]), params)
    assert max(float((a - b).abs().max()) for a, b in zip(naive, exact)) > 1e-4
    # the per-rank gradients rescaled by local size / mean size average to the exact one
    mean_f, mean_r = 4.0, 3.0
    scaled = [
        torch.autograd.grad(
            module.unlearning_loss(
                b["forget"],
                b["retain"],
                forget_scale=len(b["forget"][1]) / mean_f,
                retain_scale=len(b["retain"][1]) / mean_r,
            ),
            params,
        )
        for b in (b0, b1)
    ]
    for a, b, e in zip(*scaled, exact):
        torch.testing.assert_close((a + b) / 2, e, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- resume
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path):
    # one batch per epoch (the forget set, with a retain subset fixed by the epoch): the resumed run reads the
    # batches of the uninterrupted one whatever Lightning replays of a finished epoch
    dm = ClassificationUnlearningDataModule("digits", forget="class", forget_class=2, batch_size=128, seed=0)
    dm.setup()
    assert len(dm.dataset("forget")) <= 128

    def fit(max_steps: int, ckpt_path: Path | None):
        torch.manual_seed(0)
        original = ConvNet(width=4)
        # a resumed process builds its blindspot model anew (another draw): the checkpoint restores the saved one
        torch.manual_seed(1 if ckpt_path is None else 2)
        blindspot = ConvNet(width=4)
        module = ClassificationUnlearningModule(
            original, loss="blindspot", blindspot_model=blindspot, blindspot_layers=("backbone.2",), lr=1e-2
        )
        trainer = cpu_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0)
        _quiet_fit(trainer, module, datamodule=dm, ckpt_path=ckpt_path)
        return {k: v.clone() for k, v in module.state_dict().items()}, trainer

    runs = crash_and_resume(fit, crash_step=2, total_steps=4, tmp_path=tmp_path)
    for name, value in runs.full.items():
        torch.testing.assert_close(runs.resumed[name], value, rtol=0, atol=0, msg=name)
    moved = [k for k in runs.full if k.startswith("model.") and not torch.equal(runs.full[k], runs.first[k])]
    assert moved  # the second half of the run changed the model
    saved = torch.load(runs.checkpoint, weights_only=False)["state_dict"]
    torch.manual_seed(0)
    original = ConvNet(width=4).state_dict()
    for name, value in original.items():  # nothing lost: the checkpoint holds the original weights
        torch.testing.assert_close(saved[f"reference.{name}"], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- example
def _example():
    spec = importlib.util.spec_from_file_location(
        "unlearning_classification", ROOT / "examples/unlearning/classification.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_example_runs_one_method_quickly(capsys):
    result = _example().main(["--quick", "--methods", "npo_kl"])
    out = capsys.readouterr().out
    assert "| method | forget acc | retain acc | test acc | MIA AUC | forget quality |" in out
    assert set(result) == {"original", "gold (retrained)", "npo_kl"}
    assert result["gold (retrained)"]["forget_acc"] == 0.0 and result["gold (retrained)"]["forget_quality"] == 1.0
    assert result["npo_kl"]["forget_acc"] < result["original"]["forget_acc"]


@pytest.mark.slow
def test_example_quick_run_is_under_a_minute(capsys):
    start = time.process_time()  # CPU seconds of this process (all its threads): robust to a busy machine
    result = _example().main(["--quick"])
    assert time.process_time() - start < 60
    assert {"ga", "graddiff", "npo", "npo_kl", "blindspot"} <= set(result)
    for method in ("ga", "npo", "blindspot"):
        assert result[method]["forget_acc"] < 0.5 * result["original"]["forget_acc"], method
    for method in ("graddiff", "npo_kl"):  # a retain term: less forgotten, more retained than without one
        assert result[method]["forget_acc"] < result["original"]["forget_acc"], method
        assert result[method]["retain_acc"] > result["npo"]["retain_acc"], method

"""The reference strategies of unlearning, each on plain modules: no LightningModule, no Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_losses.mixins.unlearning_reference import (
    REFERENCE_KEY,
    REFERENCE_MASK_KEY,
    DisabledAdapterReference,
    ModelReference,
    NamedAdapterReference,
    NoReference,
    PrecomputedReference,
    ReferenceTable,
    resolve_reference,
)
from lightning_losses.mixins.unlearning_scoring import CausalLMScorer
from tests.modules.test_unlearning import _trained_adapter_model, first_forget_batch, tiny_lora


def score(model: nn.Module, batch, prefix: str) -> Tensor:
    return CausalLMScorer().sequence_log_probs(model, batch, prefix)[0]


def linear_score(model: nn.Module, batch, prefix: str) -> Tensor:
    return model(batch[prefix + "x"]).sum(-1)


def test_auto_picks_the_cheapest_correct_strategy_and_refuses_the_impossible():
    plain, lora, named = nn.Linear(3, 2), tiny_lora(), _trained_adapter_model()
    table = ReferenceTable(nn.Module())

    def pick(model: nn.Module, mode: str = "auto", **kwargs) -> type:
        kwargs.setdefault("forget_reference", False)
        return type(resolve_reference(mode, model, table=table, **kwargs))

    assert pick(plain) is NoReference
    assert pick(plain, forget_reference=True) is PrecomputedReference
    assert pick(lora, per_step=True) is DisabledAdapterReference
    assert pick(named, per_step=True) is NamedAdapterReference
    assert pick(plain, per_step=True, reference_model=nn.Linear(3, 2)) is ModelReference
    with pytest.raises(ValueError, match=r"Method 'npo_kl' with retain term 'kl' .* no PEFT adapter to disable"):
        pick(plain, per_step=True, method="npo_kl", retain="kl")
    with pytest.raises(ValueError, match="needs a reference model; choose a reference mode other than 'none'"):
        pick(plain, "none", forget_reference=True)
    with pytest.raises(ValueError, match="cannot be precomputed"):
        pick(lora, "precomputed", per_step=True)
    with pytest.raises(ValueError, match="reference='model' needs `reference_model=`"):
        pick(plain, "model")
    with pytest.raises(ValueError, match="Unknown reference mode 'copy'"):
        pick(plain, "copy")


def test_no_reference_has_no_model():
    reference = NoReference()
    assert reference.mode == "none" and not reference.per_step and reference.table is None
    with pytest.raises(RuntimeError, match="Reference mode 'none' has no reference model"):
        reference.model()
    with pytest.raises(RuntimeError, match="reads reference log-probabilities"):
        reference.log_probs({}, linear_score)


def test_precomputed_reference_stores_by_index_averages_duplicates_and_checkpoints():
    owner, model = nn.Module(), nn.Linear(3, 1)
    reference = PrecomputedReference(model, ReferenceTable(owner))
    assert {REFERENCE_KEY, REFERENCE_MASK_KEY} <= set(owner.state_dict()) and not reference.table.filled
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g)
    batches = [{"x": x[:3], "index": torch.tensor([4, 0, 2])}, {"x": x[3:], "index": torch.tensor([1, 5])}]
    model.train()
    # a "sum over processes" that sees every sample twice (the duplicates of a padded sampler): still the mean
    stored = reference.table.precompute(reference, batches, linear_score, torch.device("cpu"), reduce=lambda t: 2 * t)
    assert stored == 5 and model.training  # the model's mode is restored after the pass
    with torch.no_grad():
        expected = model(x).sum(-1)
    values = reference.log_probs({"index": torch.tensor([0, 4, 1])}, None)
    torch.testing.assert_close(values, expected[[1, 0, 3]])
    assert owner.unlearning_reference_known.tolist() == [True, True, True, False, True, True]
    assert not values.requires_grad
    with pytest.raises(RuntimeError, match="missing for some forget examples"):
        reference.log_probs({"index": torch.tensor([3])}, None)
    with pytest.raises(ValueError, match="need an 'index' entry"):
        reference.log_probs({"x": x}, None)
    with pytest.raises(RuntimeError, match="holds the forget answers only, not the 'template' answers"):
        reference.log_probs({"index": torch.tensor([0])}, None, "template_")
    with pytest.raises(ValueError, match="need an 'index' entry"):
        reference.table.precompute(reference, [{"x": x}], linear_score, torch.device("cpu"))


def test_model_reference_is_frozen_and_restores_each_submodules_mode():
    ref = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    reference = ModelReference(ref)
    assert not any(p.requires_grad for p in ref.parameters())
    ref.train()
    ref[1].eval()
    with reference.model() as model:
        assert model is ref and not torch.is_grad_enabled() and not any(m.training for m in ref.modules())
        out = model(torch.ones(2, 3))
    assert ref.training and not ref[1].training and torch.is_grad_enabled()
    torch.testing.assert_close(reference.log_probs({"x": torch.ones(2, 3)}, linear_score), out.sum(-1))


def test_disabled_adapter_reference_is_the_model_before_unlearning_and_refuses_a_trained_adapter():
    batch = first_forget_batch()
    model = tiny_lora()
    reference = DisabledAdapterReference(model)
    with torch.no_grad():
        policy = score(model, batch, "")
    torch.testing.assert_close(reference.log_probs(batch, score), policy)  # fresh adapter: B = 0
    with pytest.raises(ValueError, match=r"only correct on a fresh adapter .* named reference adapter \('ref'\)"):
        DisabledAdapterReference(_trained_adapter_model(), reference_adapter="ref")
    with pytest.raises(ValueError, match="needs a PEFT model"):
        DisabledAdapterReference(nn.Linear(2, 2))


def test_named_adapter_reference_reads_the_named_adapter_and_restores_the_trained_one():
    batch = first_forget_batch()
    model = _trained_adapter_model()  # the "reference" adapter is a copy of the trained "default" one
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reference = NamedAdapterReference(model, "reference")
    with torch.no_grad():
        policy = score(model, batch, "")
    torch.testing.assert_close(reference.log_probs(batch, score), policy, rtol=1e-5, atol=1e-4)
    assert model.active_adapter == "default" and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="needs an adapter named 'before', found \\['default', 'reference'\\]"):
        NamedAdapterReference(model, "before")
    with pytest.raises(ValueError, match="needs an adapter named 'reference', found \\[\\]"):
        NamedAdapterReference(nn.Linear(2, 2))

"""The unlearning call contract: any loss is called as ``loss(scores)``, the scores are computed lazily, methods are
presets, and the causal-LM scorer picks its path once without hiding the model's own errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn

from lightning_losses import (
    UNLEARNING_METHODS,
    UNLEARNING_PRESETS,
    FLATLoss,
    GradientAscentLoss,
    IdkDPOLoss,
    NPOLoss,
    SimNPOLoss,
    UnlearningModule,
    UnlearningPreset,
    UnlearningScores,
)
from lightning_losses.functional.unlearning import npo_loss, sequence_log_probs
from lightning_losses.mixins.unlearning_scoring import CausalLMScorer
from tests.modules.test_unlearning import V, first_forget_batch, loaders, tiny_lm, tiny_lora, trainer


class LogRatioLoss(nn.Module):
    """A user's own loss: a plain nn.Module reading the policy and reference log-probabilities."""

    needs = ("policy_logps", "reference_logps")

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, scores: UnlearningScores) -> Tensor:
        self.calls += 1
        return (scores.policy_logps - scores.reference_logps).mean()


class DoubledNPO(NPOLoss):
    """A user subclass of NPOLoss: twice the NPO forget term."""

    def forget_term(self, scores: UnlearningScores) -> Tensor:
        return 2.0 * super().forget_term(scores)


class PolicyOnly(nn.Module):
    needs = ("policy_logps",)

    def forward(self, scores: UnlearningScores) -> Tensor:
        return scores.policy_logps.mean()


class CountingLM(nn.Module):
    """A reference model that counts its forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.forwards = model, 0

    def forward(self, **kwargs: Tensor) -> Tensor:
        self.forwards += 1
        return self.model(**kwargs)


def _adapter(module: UnlearningModule) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_B" in n}


def test_a_users_own_loss_is_injected_and_trained(tmp_path):
    loss = LogRatioLoss()
    module = UnlearningModule(tiny_lora(), loss=loss, lr=1e-2)
    assert module.unlearning is loss and module.unlearning_loss_module is loss
    assert module.reference_mode == "precomputed" and not module.unlearning_uses_retain
    train, _ = loaders()
    module.precompute_reference(train.iterables["forget"])
    with torch.no_grad():  # move the policy away from the reference
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    batch = first_forget_batch()
    policy = sequence_log_probs(module.model(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)
    expected = (policy - module.unlearning_reference_logps[batch["index"]]).mean()
    torch.testing.assert_close(module.unlearning_loss(batch), expected, rtol=1e-5, atol=1e-5)
    before, calls = _adapter(module), loss.calls
    trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=loaders()[0])
    assert loss.calls == calls + 2
    assert any(not torch.equal(before[n], p) for n, p in _adapter(module).items())


def test_a_subclass_of_npo_loss_is_injected_keeps_its_names_and_trains(tmp_path):
    module = UnlearningModule(tiny_lora(), method="npo_rt", loss=DoubledNPO(beta=0.5, retain_weight=0.0), lr=1e-2)
    plain = UnlearningModule(copy.deepcopy(module.model), method="npo", loss=NPOLoss(beta=0.5))
    assert isinstance(module.npo, DoubledNPO) and float(module.get_hyperparameter("npo.beta")) == 0.5
    train, _ = loaders()
    for m in (module, plain):
        m.precompute_reference(train.iterables["forget"])
    batch = first_forget_batch()
    torch.testing.assert_close(module.unlearning_loss(batch), 2 * plain.unlearning_loss(batch))
    # the preset's retain term follows the subclass: its retain weight can be scheduled up from 0
    module.set_hyperparameter("npo.retain_weight", 1.0)
    assert module.unlearning_uses_retain
    before = _adapter(module)
    trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=loaders()[0])
    assert "retain" in module.unlearning_terms
    assert any(not torch.equal(before[n], p) for n, p in _adapter(module).items())


def test_scores_are_lazy_a_policy_only_loss_never_computes_a_reference():
    model = tiny_lora()
    reference = CountingLM(copy.deepcopy(model))
    module = UnlearningModule(model, loss=PolicyOnly(), reference="model", reference_model=reference)
    batch = first_forget_batch()
    loss = module.unlearning_loss(batch)
    assert reference.forwards == 0
    scores = module.unlearning_scores(batch)
    assert scores.computed == ()
    torch.testing.assert_close(PolicyOnly()(scores), loss)
    assert scores.computed == ("policy_logps",) and reference.forwards == 0
    # a loss that reads the reference triggers exactly one reference pass, cached for the step
    npo = UnlearningModule(model, method="npo", reference="model", reference_model=reference)
    scores = npo.unlearning_scores(batch)
    first, second = scores.reference_logps, scores.reference_logps
    assert first is second and reference.forwards == 1


def test_scores_form_equals_the_tensor_form_for_every_library_loss():
    g = torch.Generator().manual_seed(0)
    p, r, tp, tr = (-(torch.rand(3, generator=g) * 5 + 1) for _ in range(4))
    lengths, probs, template_probs, retain = torch.tensor([2, 3, 4]), p.exp(), tp.exp(), torch.tensor(0.7)
    scores = UnlearningScores(
        policy_logps=p,
        reference_logps=r,
        lengths=lengths,
        mean_token_probs=probs,
        template_policy_logps=tp,
        template_reference_logps=tr,
        template_mean_token_probs=template_probs,
        retain=retain,
    )
    cases = [
        (NPOLoss(retain_weight=0.5), (p, r, retain)),
        (SimNPOLoss(), (p, lengths, retain)),
        (GradientAscentLoss(retain_weight=1.0), (p, lengths, retain)),
        (FLATLoss("js", retain_weight=0.3), (probs, template_probs, retain)),
        (IdkDPOLoss(), (tp, tr, p, r, retain)),
    ]
    for loss, tensors in cases:
        torch.testing.assert_close(loss(scores), loss(*tensors), msg=type(loss).__name__)
    # a zero retain weight never reads the retain term
    lazy = UnlearningScores.lazy({"policy_logps": lambda: p, "lengths": lambda: lengths, "retain": lambda: 1 / 0})
    SimNPOLoss(retain_weight=0.0)(lazy)
    assert lazy.computed == ("policy_logps", "lengths")


def test_declared_needs_drive_reference_template_and_retain():
    assert NPOLoss().needs_reference and not NPOLoss().needs_template
    assert FLATLoss().needs_template and not FLATLoss().needs_reference
    assert SimNPOLoss().uses_retain and not NPOLoss().uses_retain
    # IdkDPO reads the template's reference: a reference at every step, so not precomputable
    assert UnlearningModule(tiny_lora(), method="idkdpo").reference_mode == "disabled_adapter"
    assert UnlearningModule(tiny_lora(), loss=PolicyOnly()).reference_mode == "none"

    class WithRetain(PolicyOnly):
        needs = ("policy_logps", "retain")

        def forward(self, scores: UnlearningScores) -> Tensor:
            assert scores.retain is not None
            return scores.policy_logps.mean() + scores.retain

    module = UnlearningModule(tiny_lora(), loss=WithRetain())
    assert module.unlearning_uses_retain and module.reference_mode == "none"
    train, _ = loaders()
    forget, retain = first_forget_batch(), next(iter(train.iterables["retain"]))
    expected = PolicyOnly()(module.unlearning_scores(forget)) + module.retain_term(retain)
    torch.testing.assert_close(module.unlearning_loss(forget, retain), expected)
    assert module.unlearning_terms["retain"] == pytest.approx(float(module.retain_term(retain).detach()))


def test_methods_are_presets_in_one_registry(monkeypatch):
    assert UNLEARNING_METHODS is UNLEARNING_PRESETS
    for name, preset in UNLEARNING_PRESETS.items():
        module = UnlearningModule(tiny_lora(), method=name)
        loss = getattr(module, preset.loss.module_attribute)
        assert type(loss) is preset.loss and module.unlearning_loss_module is loss, name
    npo_rt = UNLEARNING_PRESETS["npo_rt"]
    assert npo_rt.loss is NPOLoss and npo_rt.retain == "nll" and float(npo_rt.build().retain_weight) == 1.0
    monkeypatch.setitem(UNLEARNING_PRESETS, "npo_strong", UnlearningPreset(NPOLoss, {"beta": 1.0}, "kl"))
    module = UnlearningModule(tiny_lora(), method="npo_strong")  # type: ignore[arg-type]
    assert float(module.get_hyperparameter("npo.beta")) == 1.0 and module.reference_mode == "disabled_adapter"


def test_bad_losses_have_clear_errors():
    class Typo(PolicyOnly):
        needs = ("policy_logp",)  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"Typo.needs names unknown scores \['policy_logp'\]"):
        UnlearningModule(tiny_lora(), loss=Typo())
    with pytest.raises(ValueError, match=r"uses NPOLoss, got a PolicyOnly.*leave `method` unset"):
        UnlearningModule(tiny_lora(), method="npo", loss=PolicyOnly())
    with pytest.raises(TypeError, match=r"must be an nn.Module called as `loss\(scores\)`"):
        UnlearningModule(tiny_lora(), loss=lambda scores: scores.policy_logps.mean())  # type: ignore[arg-type]

    class Undeclared(nn.Module):
        def forward(self, scores: UnlearningScores) -> Tensor:
            return scores.reference_logps.mean()

    module = UnlearningModule(tiny_lora(), loss=Undeclared())
    with pytest.raises(RuntimeError, match="reference mode is 'none', but the loss reads reference"):
        module.unlearning_loss(first_forget_batch())

    class PerSample(PolicyOnly):
        def forward(self, scores: UnlearningScores) -> Tensor:
            return scores.policy_logps

    with pytest.raises(TypeError, match=r"PerSample\(scores\) must return a scalar tensor, got \(4,\)"):
        UnlearningModule(tiny_lora(), loss=PerSample()).unlearning_loss(first_forget_batch())
    with pytest.raises(ValueError, match=r"`scores\.reference_logps` was not given"):
        NPOLoss()(UnlearningScores(policy_logps=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"Unknown unlearning scores \['policy'\]"):
        UnlearningScores(policy=torch.zeros(2))


# ------------------------------------------------------------------------------------------------ the scorer
def _gpt2(cls: type) -> nn.Module:
    from transformers import GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0, eos_token_id=0)
    return cls(config).eval()


def test_the_scorer_falls_back_to_the_logits_once_and_forwards_once_after():
    from transformers import GPT2LMHeadModel
    from transformers.modeling_outputs import CausalLMOutput

    class TwoHeadCalls(GPT2LMHeadModel):
        """Calls its head twice per forward (an extra output): hidden states cannot be read from the head's input."""

        forwards = 0

        def forward(self, input_ids=None, attention_mask=None, **kwargs):  # type: ignore[override]
            type(self).forwards += 1
            hidden = self.transformer(input_ids, attention_mask=attention_mask).last_hidden_state
            self.lm_head(hidden[:, :1])
            return CausalLMOutput(logits=self.lm_head(hidden))

    model = _gpt2(TwoHeadCalls)
    module = UnlearningModule(model, method="simnpo")
    batch = first_forget_batch()
    expected = sequence_log_probs(model(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)
    TwoHeadCalls.forwards = 0
    with pytest.warns(UserWarning, match="from its logits .*called its output head 2 times"):
        first, _ = module._sequence_logps(model, batch)
    later = [module._sequence_logps(model, batch)[0] for _ in range(2)]
    assert TwoHeadCalls.forwards == 2 + 2  # the refused first attempt, then one forward per call
    for value in (first, *later):
        torch.testing.assert_close(value, expected)


def test_the_scorer_does_not_hide_an_error_of_the_models_forward():
    from transformers import GPT2LMHeadModel

    class FailsOnce(GPT2LMHeadModel):
        fail = True

        def forward(self, *args, **kwargs):  # type: ignore[override]
            if type(self).fail:
                type(self).fail = False
                raise ValueError("a bad batch inside the model")
            return super().forward(*args, **kwargs)

    model = _gpt2(FailsOnce)
    module = UnlearningModule(model, method="simnpo")
    with pytest.raises(ValueError, match="a bad batch inside the model"):
        module._sequence_logps(model, first_forget_batch())


def test_the_scorer_decides_the_path_before_the_forward_where_it_can():
    batch = first_forget_batch()
    lm = tiny_lm()
    chunked, plain = CausalLMScorer(), CausalLMScorer(use_hidden_states=False)
    assert chunked.path(lm) is None
    a, lengths = chunked.sequence_log_probs(lm, batch)
    b, _ = plain.sequence_log_probs(lm, batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (chunked.path(lm), plain.path(lm)) == ("hidden", "logits")
    torch.testing.assert_close(lengths, (batch["labels"][:, 1:] != -100).sum(-1))

    class LogitsOnly(nn.Module):  # not a transformers model: the logits path, with no attempt at the other
        def __init__(self) -> None:
            super().__init__()
            self.inner = lm

        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    wrapped = LogitsOnly()
    torch.testing.assert_close(chunked.sequence_log_probs(wrapped, batch)[0], b)
    assert chunked.path(wrapped) == "logits" and "LogitsOnly" in chunked.fallback_reasons
    with torch.no_grad():
        assert chunked.path(lm) is None  # decided per grad mode
    # a copy (pickled to spawned processes) holds other model objects: it decides anew
    clone = pickle.loads(pickle.dumps(chunked))
    assert clone.path(lm) is None and clone.use_hidden_states and clone.fallback_reasons == chunked.fallback_reasons


def test_npo_through_the_scores_matches_the_formula_with_a_model_reference():
    model = tiny_lora()
    reference = copy.deepcopy(model)
    module = UnlearningModule(model, method="npo", loss=NPOLoss(beta=0.3), reference="model", reference_model=reference)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    batch = first_forget_batch()

    def logps(m: nn.Module) -> Tensor:
        return sequence_log_probs(m(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)

    with torch.no_grad():
        ref = logps(reference)
    torch.testing.assert_close(module.unlearning_loss(batch), npo_loss(logps(model), ref, 0.3), rtol=1e-5, atol=1e-5)

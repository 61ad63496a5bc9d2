"""TempNet at generation: every step's scores are the raw logits divided by TempNet's τ of that step."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from lightning_losses.demos import build_gpt2
from lightning_losses.integrations.generation import TempNetCausalLM, TempNetLogitsProcessor, apply_tempnet
from lightning_losses.nn import TempNet

VOCAB = 48


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = build_gpt2(VOCAB, n_layer=2, n_embd=64, n_head=2, block_size=32).eval()
    tempnet = TempNet(vocab_size=VOCAB, tau_min=0.5, tau_max=5.0, hidden_dim=16).eval()
    with torch.no_grad():  # spread τ over its range so a wrong τ would show
        tempnet.head.weight.mul_(50.0)
    return model, tempnet


def _reference_steps(model, tempnet, sequences, prompt_len):
    """Recompute each step from scratch: raw last-position logits of the prefix, τ = TempNet(raw), raw / τ."""
    scores, taus = [], []
    with torch.no_grad():
        for t in range(prompt_len, sequences.shape[1]):
            raw = model(sequences[:, :t]).logits[:, -1].float()
            tau = tempnet(raw)
            scores.append(raw / tau[:, None])
            taus.append(tau)
    return scores, torch.stack(taus, dim=1)


GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, top_k=None,
           output_scores=True, return_dict_in_generate=True)  # fmt: skip


def test_logits_processor_divides_every_step_by_tempnets_tau(parts):
    model, tempnet = parts
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    processor = TempNetLogitsProcessor(tempnet, record=True)
    out = model.generate(prompt, logits_processor=LogitsProcessorList([processor]), **GEN)
    want_scores, want_tau = _reference_steps(model, tempnet, out.sequences, prompt.shape[1])
    torch.testing.assert_close(processor.stacked_taus(), want_tau, rtol=2e-3, atol=1e-4)
    for got, want in zip(out.scores, want_scores):
        finite = torch.isfinite(got)  # min_new_tokens masks the end-of-text token
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-3, atol=2e-3)
    assert bool(((want_tau >= 0.5) & (want_tau <= 5.0)).all()) and float(want_tau.std()) > 0


def test_wrapper_applies_tau_before_every_processor_and_returns_it(parts):
    model, tempnet = parts
    wrapped = TempNetCausalLM(model, tempnet)
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    out, tau = wrapped.generate(prompt, return_tau=True, **GEN)
    want_scores, want_tau = _reference_steps(model, tempnet, out.sequences, prompt.shape[1])
    torch.testing.assert_close(tau, want_tau, rtol=2e-3, atol=1e-4)
    for got, want in zip(out.scores, want_scores):
        finite = torch.isfinite(got)
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-3, atol=2e-3)
    # the hook is removed afterwards: the bare model is unchanged
    ids = out.sequences[:, :6]
    raw = model(ids).logits
    scaled = wrapped(ids)
    torch.testing.assert_close(scaled.logits, apply_tempnet(tempnet, raw)[0])
    assert scaled["tau"].shape == ids.shape


def test_processor_copes_with_masked_scores(parts):
    _, tempnet = parts
    scores = torch.randn(2, VOCAB)
    scores[:, 10:] = float("-inf")  # what a top-k warper leaves
    out = TempNetLogitsProcessor(tempnet)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert bool(torch.isfinite(out[:, :10]).all()) and bool(torch.isneginf(out[:, 10:]).all())
    with pytest.raises(RuntimeError, match="record=True"):
        TempNetLogitsProcessor(tempnet).stacked_taus()

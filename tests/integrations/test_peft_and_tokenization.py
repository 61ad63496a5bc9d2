"""Prompt masking on tricky tokenisations, PEFT reference helpers, and the Shakespeare unlearning data."""

from __future__ import annotations

import pytest
import torch

from lightning_losses.data.shakespeare import shakespeare_tokenizer
from lightning_losses.data.unlearning import UnlearningDataModule
from lightning_losses.demos import build_gpt2
from lightning_losses.integrations.peft import adapter_is_fresh, disabled_adapter, eval_mode, lora_model, named_adapter
from lightning_losses.integrations.tokenization import prompt_token_count, tokenize_prompt_answer


@pytest.fixture(scope="module")
def bpe():
    return shakespeare_tokenizer(512)


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("Who is the Prince of Denmark? ", "Hamlet"),  # the trailing space merges into the answer's first token
        ("Speak, ", "my lord"),
        ("To be or not", "hing"),  # no merge across the boundary
        ("", "Alas, poor Yorick"),  # empty prompt
    ],
)
def test_labels_are_exactly_the_answer_tokens(bpe, prompt, answer):
    batch = tokenize_prompt_answer(bpe, [prompt], [answer], pad_token_id=0)
    full = bpe.encode(prompt + answer).ids
    labels = batch["labels"][0].tolist()
    answer_ids = [t for t in labels if t != -100]
    n_prompt = labels.count(-100)
    assert batch["input_ids"][0].tolist() == full
    # the answer tokens decode to text that ends with the answer and covers all of it
    decoded = bpe.decode(answer_ids)
    assert decoded.strip() == answer.strip()
    # the prompt tokens decode to a prefix of the prompt
    assert prompt.startswith(bpe.decode(full[:n_prompt]))


def test_prefix_matching_differs_from_counting_the_prompt_tokens(bpe):
    prompt, answer = "Who is the Prince of Denmark? ", "Hamlet"
    naive = len(bpe.encode(prompt).ids)
    ours = prompt_token_count(bpe, prompt, answer)
    assert ours == naive - 1  # the separately tokenised prompt has a lone " " token that the full text does not
    full = bpe.encode(prompt + answer).tokens
    assert full[ours].startswith("Ġ")  # the first answer token carries the space: it is an answer token


def test_padding_truncation_and_bad_inputs(bpe):
    batch = tokenize_prompt_answer(
        bpe, ["Speak, ", "O "], ["my lord", "Romeo, Romeo, wherefore art thou"], pad_token_id=1
    )
    lengths = batch["attention_mask"].sum(-1)
    assert int(lengths[0]) < batch["input_ids"].shape[1]
    assert bool((batch["labels"][0, int(lengths[0]) :] == -100).all())
    assert bool((batch["input_ids"][0, int(lengths[0]) :] == 1).all())
    with pytest.raises(ValueError, match="no pad token"):
        tokenize_prompt_answer(bpe, ["a"], ["b"])
    with pytest.raises(ValueError, match="has no answer token"):
        tokenize_prompt_answer(bpe, ["Speak, my lord, speak"], [" now"], max_length=3, pad_token_id=0)
    with pytest.raises(ValueError, match="forget or retain set is empty"):
        tokenize_prompt_answer(bpe, [], [], pad_token_id=0)
    with pytest.raises(ValueError, match="one answer per prompt"):
        tokenize_prompt_answer(bpe, ["a"], [], pad_token_id=0)


def test_hugging_face_tokenizer_without_pad_token(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tok.json"
    bpe.save(str(path))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf.pad_token_id is None
    with pytest.raises(ValueError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
        tokenize_prompt_answer(hf, ["Speak, "], ["my lord"])
    hf.pad_token = "<|endoftext|>"
    batch = tokenize_prompt_answer(hf, ["Speak, "], ["my lord"])
    assert hf.decode([t for t in batch["labels"][0].tolist() if t != -100]) == " my lord"


def test_peft_reference_contexts_restore_state():
    peft = pytest.importorskip("peft")
    model = lora_model(build_gpt2(40, n_layer=1, n_embd=16, n_head=2, block_size=8), r=2)
    ids = torch.randint(0, 40, (2, 8))
    assert adapter_is_fresh(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    assert not adapter_is_fresh(model)
    model.add_adapter("reference", peft.LoraConfig(r=2, fan_in_fan_out=True, task_type="CAUSAL_LM"))
    model.set_adapter("default")
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with named_adapter(model, "reference") as ref:
        assert not ref.training and not torch.is_grad_enabled()
        fresh_ref = ref(input_ids=ids).logits
    with disabled_adapter(model) as base:
        base_out = base(input_ids=ids).logits
    torch.testing.assert_close(fresh_ref, base_out)  # a fresh reference adapter is the base model
    assert model.training and model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match="No adapter named 'missing'"), named_adapter(model, "missing"):
        pass
    with eval_mode(model):
        assert not model.training
    assert model.training


def test_unlearning_datamodule_batches():
    dm = UnlearningDataModule(block_size=32, batch_size=4, vocab_size=512, prompt_tokens=8, max_forget_blocks=8)
    dm.setup("fit")
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == 2  # one pass over the 8 forget blocks
    batch = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    forget, retain = batch["forget"], batch["retain"]
    assert bool((forget["labels"][:, :8] == -100).all()) and bool((forget["labels"][:, 8:] >= 0).all())
    assert torch.equal(forget["template_input_ids"][:, :8], forget["input_ids"][:, :8])
    assert "template_input_ids" not in retain
    forget_idx = set(dm.shakespeare.dataset("forget").indices.tolist())
    assert set(forget["index"].tolist()) <= forget_idx
    assert not set(retain["index"].tolist()) & forget_idx
    assert len(dm.val_dataloader()) == 3
    with pytest.raises(ValueError, match="prompt_tokens"):
        UnlearningDataModule(block_size=8, prompt_tokens=7)

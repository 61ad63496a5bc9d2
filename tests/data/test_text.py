"""TRL dataset formats through TextCollator / TextDataModule with the real GPT-2 tokenizer (built offline).

Each format's labels are checked token by token against a character-level reference: a token is learnt when its
characters start inside the completion (or an assistant turn) of the rendered text, which the tokenizer's offset
mapping gives independently of the prefix matching the collator does.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.hf_tokenizer import gpt2_tokenizer
from tests.helpers.trainer import cpu_trainer

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from lightning_losses.data.text import TextCollator, TextDataModule, dataset_format  # noqa: E402
from lightning_losses.integrations.tokenization import check_vocab_size  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _reference_labels(tok, text: str, spans: list[tuple[int, int]], eos: bool = False) -> tuple[list[int], list[int]]:
    """Ids of ``text`` (plus EOS) and their labels: a token is learnt iff its first character lies in a span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), []
    for token, (start, _end) in zip(ids, enc["offset_mapping"]):
        labels.append(token if any(a <= start < b for a, b in spans) else -100)
    if eos:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return ids, labels


def _row(batch, b: int, prefix: str = "") -> tuple[list[int], list[int]]:
    mask = batch[f"{prefix}attention_mask"][b].bool()
    return batch[f"{prefix}input_ids"][b][mask].tolist(), batch[f"{prefix}labels"][b][mask].tolist()


def test_language_modelling_text_learns_every_token_and_pads_with_eos(tok):
    texts = ["To be, or not to be, that is the question.", "O Romeo"]
    batch = TextCollator(tok)([{"text": t} for t in texts])
    assert tok.pad_token is None  # GPT-2 has no pad token: EOS pads, masked out
    for b, text in enumerate(texts):
        ids, labels = _reference_labels(tok, text, [(0, len(text))], eos=True)
        assert _row(batch, b) == (ids, labels)
    short = batch["attention_mask"][1] == 0
    assert short.any()
    assert (batch["input_ids"][1][short] == tok.eos_token_id).all() and (batch["labels"][1][short] == -100).all()


@pytest.mark.parametrize(
    "prompt, completion",
    [
        ("Question: who killed Polonius?\nAnswer:", " Hamlet, through the arras."),
        ("The capital of France is ", "Paris"),  # the " Paris" token straddles the boundary: it is learnt
    ],
)
def test_prompt_completion_labels_only_the_completion(tok, prompt, completion):
    batch = TextCollator(tok)([{"prompt": prompt, "completion": completion, "index": 7}])
    ids, labels = _reference_labels(tok, prompt + completion, [(len(prompt.rstrip(" ")), 10**9)], eos=True)
    # a token whose characters start in the prompt's trailing space belongs to the answer (" Paris")
    assert _row(batch, 0) == (ids, labels)
    assert batch["index"].tolist() == [7]
    learnt = [t for t in labels if t != -100]
    assert tok.decode(learnt) == prompt[len(prompt.rstrip(" ")) :] + completion + tok.eos_token


def test_conversational_messages_learn_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "You speak as Hamlet."},
        {"role": "user", "content": "Who's there?"},
        {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
        {"role": "user", "content": "Long live the king!"},
        {"role": "assistant", "content": "Bernardo?"},
    ]
    batch = TextCollator(tok)([{"messages": messages}])
    rendered = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
            spans.append((start, len(tok.apply_chat_template(messages[: k + 1], tokenize=False))))
    ids, labels = _reference_labels(tok, rendered, spans)
    assert _row(batch, 0) == (ids, labels)
    assert tok.decode(ids) == rendered  # the chat template is rendered, its markers included
    learnt = tok.decode([t for t in labels if t != -100])
    assert learnt == "Nay, answer me: stand, and unfold yourself.<|im_end|>\nBernardo?<|im_end|>\n"
    every = TextCollator(tok, completion_only_loss=False)([{"messages": messages}])
    assert _row(every, 0)[1] == ids


def test_conversational_prompt_completion_uses_trl_rendering(tok):
    from trl.data_utils import maybe_apply_chat_template

    example = {
        "prompt": [{"role": "user", "content": "What is a hawk from a handsaw?"}],
        "completion": [{"role": "assistant", "content": "When the wind is southerly."}],
    }
    batch = TextCollator(tok)([example])
    rendered = maybe_apply_chat_template(example, tok)
    text = rendered["prompt"] + rendered["completion"]
    ids, labels = _reference_labels(tok, text, [(len(rendered["prompt"]), len(text))], eos=True)
    assert _row(batch, 0) == (ids, labels)
    assert tok.decode(ids).startswith("<|im_start|>user\nWhat is a hawk")


@pytest.mark.parametrize("implicit", [False, True])
def test_preference_pairs_mask_the_prompt_of_each_answer(tok, implicit):
    prompt = "HORATIO: What, has this thing appear'd again to-night?\nBERNARDO:"
    chosen, rejected = " I have seen nothing.", " Yes."
    example = (
        {"chosen": prompt + chosen, "rejected": prompt + rejected}
        if implicit
        else {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
        }
    )
    batch = TextCollator(tok)([example, example])
    assert dataset_format(example) == "preference"
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = _reference_labels(tok, prompt + answer, [(len(prompt), 10**9)], eos=True)
        assert _row(batch, 1, f"{side}_") == (ids, labels)
    assert "input_ids" not in batch


def test_pretokenised_examples_pass_through(tok):
    batch = TextCollator(tok)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, tok.eos_token_id, tok.eos_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]


def test_bad_examples_get_clear_errors(tok):
    with pytest.raises(ValueError, match=r"Unrecognised example with keys \['question'\].*prompt-completion"):
        TextCollator(tok)([{"question": "who?"}])
    bare = gpt2_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match=r"chat template.*tokenizer\.chat_template ="):
        TextCollator(bare)([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(ValueError, match=r"no completion token left.*max_length=4"):
        TextCollator(tok, max_length=4)([{"prompt": "one two three four five six", "completion": " seven"}])
    with pytest.raises(ValueError, match="no assistant message"):
        TextCollator(tok)([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="mixes preference pairs"):
        TextCollator(tok)([{"text": "a"}, {"prompt": "a", "chosen": " b", "rejected": " c"}])


def test_data_module_takes_a_dataset_or_a_list_alike(tok):
    rows = [{"prompt": f"Speech {i}:", "completion": f" reply number {i}."} for i in range(10)]
    from_list = TextDataModule(tok, train_data=rows, batch_size=4, val_fraction=0.2, max_length=32)
    from_dataset = TextDataModule(tok, train_data=datasets.Dataset.from_list(rows), batch_size=4, val_fraction=0.2)
    from_list.setup("fit")
    from_dataset.setup("fit")
    a, b = next(iter(from_list.val_dataloader())), next(iter(from_dataset.val_dataloader()))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["index"].tolist() == [8, 9]  # positions in the source: unique across the train / val cut
    train = torch.cat([batch["index"] for batch in from_list.train_dataloader()])
    assert sorted(train.tolist()) == list(range(8))


def test_packing_uses_trl_pack_dataset(tok):
    rows = [{"text": " ".join(["word"] * n)} for n in (3, 9, 5, 12, 2)]
    dm = TextDataModule(
        tok, train_data=rows, batch_size=8, max_length=8, packing=True, packing_strategy="wrapped", val_fraction=0.0
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    total = sum(n + 1 for n in (3, 9, 5, 12, 2))  # each text and its EOS
    assert int(batch["attention_mask"].sum()) == total
    assert (batch["attention_mask"].sum(1) <= 8).all() and int(batch["attention_mask"].sum(1).max()) == 8
    assert ((batch["labels"] == batch["input_ids"]) | (batch["attention_mask"] == 0)).all()


def test_vocab_mismatch_is_refused_with_both_sizes(tok):
    from lightning_losses.demos import build_gpt2

    model = build_gpt2(1000, n_layer=1, n_embd=16, n_head=2, block_size=64)
    with pytest.raises(ValueError, match=r"has 1000 token embeddings but the tokenizer has 50257 tokens.*IndexError"):
        check_vocab_size(model, tok)
    check_vocab_size(build_gpt2(50304, n_layer=1, n_embd=16, n_head=2, block_size=8), tok)  # padded vocab: fine
    batch = TextCollator(tok)([{"text": "Hamlet, thou art slain."}])
    assert int(batch["input_ids"].max()) >= 1000
    with pytest.raises(IndexError, match="index out of range"):  # what the check saves the user from
        model(batch["input_ids"])


def test_data_module_setup_checks_the_trainer_model(tok, tmp_path):
    import lightning.pytorch as pl

    from lightning_losses.demos import build_gpt2

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_gpt2(1000, n_layer=1, n_embd=16, n_head=2, block_size=64)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TextDataModule(tok, train_data=[{"text": "Hamlet, thou art slain."}] * 4, batch_size=2, val_fraction=0.0)
    trainer = cpu_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="1000 token embeddings but the tokenizer has 50257"):
        trainer.fit(LM(), datamodule=dm)


def test_plays_in_every_format_with_the_local_tokenizer():
    from lightning_losses.data.shakespeare import shakespeare_examples, shakespeare_hf_tokenizer

    tok = shakespeare_hf_tokenizer(512)
    for fmt in ("language_modeling", "prompt_completion", "conversational", "preference"):
        examples = shakespeare_examples(fmt, plays=["Hamlet"], max_examples=4)
        assert all(e["play"] == "Hamlet" for e in examples)
        batch = TextCollator(tok)(examples)
        prefix = "chosen_" if fmt == "preference" else ""
        learnt = (batch[f"{prefix}labels"] != -100).sum(1)
        assert (learnt > 0).all()
        if fmt != "language_modeling":
            assert (learnt < batch[f"{prefix}attention_mask"].sum(1)).all()  # the prompt is masked


def test_plays_blocks_check_the_model_vocabulary_too(tmp_path):

    from lightning_losses.data import ShakespeareDataModule
    from lightning_losses.demos import CausalLMModule, build_gpt2

    dm = ShakespeareDataModule(block_size=16, batch_size=2, vocab_size=512, max_train_blocks=4)
    module = CausalLMModule(build_gpt2(256, n_layer=1, n_embd=16, n_head=2, block_size=16))
    trainer = cpu_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="has 256 token embeddings but the tokenizer has 512 tokens"):
        trainer.fit(module, datamodule=dm)


def test_prompts_for_on_policy_steps_are_the_left_padded_prompt_tokens(tok):
    examples = [
        {"prompt": "To be, or not to be:", "completion": " that is the question."},
        {"prompt": "Who's there?", "completion": " Nay, answer me: stand, and unfold yourself."},
    ]
    batch = TextCollator(tok, return_prompts=True)(examples)
    width = batch["prompts"].shape[1]
    for row, example in enumerate(examples):
        expected = tok(example["prompt"])["input_ids"]
        n = int(batch["prompt_attention_mask"][row].sum())
        assert batch["prompts"][row, width - n :].tolist() == expected  # left-padded: generation continues from it
        assert batch["prompt_attention_mask"][row, : width - n].sum() == 0
        first = int((batch["labels"][row] != -100).int().argmax())
        assert first == len(expected)  # the prompt ends where the labels start
    assert "prompts" not in TextCollator(tok)(examples)

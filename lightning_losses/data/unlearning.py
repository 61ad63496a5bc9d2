"""Forget / retain / held-out data for unlearning, built on :class:`~lightning_losses.data.ShakespeareDataModule`.

The forget set is one play, the retain set the other plays, and the held-out set the tails of the other plays that no
model was trained on (the "non-member" side of membership inference). Each block may start with ``prompt_tokens``
tokens of context whose labels are masked (a continuation task, as in MUSE); FLAT and IdkDPO get a template answer
per forget block (the refusal ``template_text`` after the same prompt).

Training batches come from a Lightning ``CombinedLoader`` as ``{"forget": batch, "retain": batch}``; one epoch is one
pass over the forget set, with as many retain batches drawn at random. Validation has three dataloaders, in the order
of :attr:`UnlearningDataModule.eval_splits`; with ``perturbed_answers=K`` their batches also carry, per block, ``K``
perturbed answers (the block's prompt followed by the answers of ``K`` other blocks of the same split) for the truth
ratio of :class:`~lightning_losses.UnlearningEvaluation`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from lightning_losses.data.shakespeare import ShakespeareDataModule
from lightning_losses.utilities.tokens import TokensPerStep

__all__ = ["PerturbedAnswers", "UnlearningBatchCollator", "UnlearningDataModule"]


class PerturbedAnswers(Dataset):
    """Add ``k`` perturbed answers to each ``(input_ids, labels, index)`` item of a dataset of equal-length blocks.

    The perturbed answers of item ``i`` are items ``i + 1, ..., i + k`` (cyclically) of the same dataset: with a
    prompt, :class:`UnlearningBatchCollator` puts item ``i``'s prompt before each of them, so they are plausible but
    wrong continuations. Items become ``(input_ids, labels, index, perturbed_ids)`` with ``perturbed_ids`` ``(k, T)``.

    Example:
        >>> data = [(torch.full((3,), i), torch.full((3,), i), torch.tensor(i)) for i in range(4)]
        >>> PerturbedAnswers(data, k=2)[3][3].tolist()
        [[0, 0, 0], [1, 1, 1]]
    """

    def __init__(self, dataset: Any, k: int) -> None:
        if k < 1:
            raise ValueError(f"`k` must be at least 1 perturbed answer per item, got {k}.")
        if len(dataset) <= k:
            raise ValueError(
                f"{k} perturbed answers per item need at least {k + 1} items (the others of the split), got "
                f"{len(dataset)}. Use fewer perturbed answers or more evaluation blocks."
            )
        self.dataset, self.k = dataset, k

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ids, labels, index = self.dataset[i][:3]
        others = torch.stack([self.dataset[(i + j) % len(self)][0] for j in range(1, self.k + 1)])
        return ids, labels, index, others


class UnlearningBatchCollator:
    """Collate ``(input_ids, labels, index)`` items into unlearning dict batches (picklable for worker processes).

    Items ``(input_ids, labels, index, perturbed_ids)`` (from :class:`PerturbedAnswers`) also give
    ``perturbed_input_ids`` / ``perturbed_labels`` ``(B, K, T)``: each perturbed answer after the item's own prompt,
    prompt labels masked.

    Args:
        prompt_tokens: leading tokens of each block whose labels are masked.
        template_ids: token ids of the template answer, or ``None`` for no template keys.
        ignore_index: label of masked positions.

    Example:
        >>> collate = UnlearningBatchCollator(prompt_tokens=2, template_ids=[7, 8])
        >>> item = (torch.arange(5), torch.arange(5), torch.tensor(3))
        >>> batch = collate([item])
        >>> batch["labels"].tolist(), batch["template_input_ids"].tolist(), batch["template_labels"].tolist()
        ([[-100, -100, 2, 3, 4]], [[0, 1, 7, 8, 7]], [[-100, -100, 7, 8, 7]])
    """

    def __init__(self, prompt_tokens: int = 0, template_ids: list[int] | None = None, ignore_index: int = -100):
        self.prompt_tokens, self.template_ids, self.ignore_index = prompt_tokens, template_ids, ignore_index

    def __call__(self, items: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
        ids = torch.stack([i[0] for i in items])
        labels = torch.stack([i[1] for i in items]).clone()
        labels[:, : self.prompt_tokens] = self.ignore_index
        batch = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": torch.ones_like(ids),
            "index": torch.stack([i[2] for i in items]),
        }
        if self.template_ids is not None:
            length = ids.shape[1] - self.prompt_tokens
            reps = -(-length // max(len(self.template_ids), 1))
            answer = torch.tensor((self.template_ids * reps)[:length], dtype=ids.dtype)
            template = torch.cat([ids[:, : self.prompt_tokens], answer.expand(len(ids), -1)], dim=1)
            t_labels = template.clone()
            t_labels[:, : self.prompt_tokens] = self.ignore_index
            batch.update(
                template_input_ids=template, template_labels=t_labels, template_attention_mask=torch.ones_like(template)
            )
        if len(items[0]) > 3:
            perturbed = torch.stack([i[3] for i in items]).clone()  # (B, K, T)
            perturbed[:, :, : self.prompt_tokens] = ids[:, None, : self.prompt_tokens]
            p_labels = perturbed.clone()
            p_labels[:, :, : self.prompt_tokens] = self.ignore_index
            batch.update(
                perturbed_input_ids=perturbed,
                perturbed_labels=p_labels,
                perturbed_attention_mask=torch.ones_like(perturbed),
            )
        return batch


class UnlearningDataModule(pl.LightningDataModule):
    """Shakespeare unlearning data: forget one play, retain the others, held-out tails for evaluation.

    Args:
        forget_play: the play to forget (title or file name).
        block_size: tokens per block.
        batch_size: blocks per batch (forget and retain alike).
        vocab_size: size of the local byte-level BPE.
        prompt_tokens: leading tokens per block treated as the prompt (labels masked).
        template_text: the refusal text used as FLAT / IdkDPO template answer.
        max_forget_blocks: use only this many forget blocks (a fixed random subset), or all.
        max_retain_blocks: use only this many retain blocks (a fixed random subset), or all.
        max_eval_blocks: blocks per split in validation (fixed random subsets).
        heldout_fraction: tail fraction of each retain play held out of training.
        perturbed_answers: perturbed answers per evaluation block (0 = none) for the truth ratio.
        seed: seed of the subsets and shuffles.
        cache_dir: tokenizer / token-id cache.

    Example:
        >>> dm = UnlearningDataModule(block_size=32, batch_size=4, vocab_size=512, max_forget_blocks=8)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch[0]) if isinstance(batch, tuple) else sorted(batch)
        ['forget', 'retain']
    """

    eval_splits: tuple[str, ...] = ("forget", "retain", "heldout")

    def __init__(
        self,
        forget_play: str = "Hamlet",
        block_size: int = 128,
        batch_size: int = 8,
        vocab_size: int = 2048,
        prompt_tokens: int = 0,
        template_text: str = " I know not, my lord; I cannot say.",
        max_forget_blocks: int | None = None,
        max_retain_blocks: int | None = None,
        max_eval_blocks: int = 64,
        heldout_fraction: float = 0.05,
        perturbed_answers: int = 0,
        seed: int = 0,
        cache_dir: str = "results/cache",
    ) -> None:
        super().__init__()
        if not 0 <= prompt_tokens < block_size - 1:
            raise ValueError(
                f"`prompt_tokens` must lie in [0, block_size - 1) = [0, {block_size - 1}) so that every block keeps "
                f"answer tokens, got {prompt_tokens}."
            )
        self.shakespeare = ShakespeareDataModule(
            block_size=block_size,
            batch_size=batch_size,
            vocab_size=vocab_size,
            forget_play=forget_play,
            heldout_fraction=heldout_fraction,
            train_on_forget=True,
            seed=seed,
            cache_dir=cache_dir,
        )
        self.batch_size, self.prompt_tokens, self.template_text = batch_size, prompt_tokens, template_text
        self.max_forget_blocks, self.max_retain_blocks = max_forget_blocks, max_retain_blocks
        self.max_eval_blocks, self.seed = max_eval_blocks, seed
        if perturbed_answers < 0:
            raise ValueError(f"`perturbed_answers` must be 0 (none) or more, got {perturbed_answers}.")
        self.perturbed_answers = perturbed_answers

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` of the blocks."""
        return self.shakespeare.tokenizer

    def setup(self, stage: str | None = None) -> None:
        self.shakespeare.setup(stage)
        if len(self.shakespeare.dataset("forget")) == 0:
            raise ValueError(f"The forget play {self.shakespeare.forget_play!r} has no block: nothing to forget.")

    def _subset(self, dataset: Any, limit: int | None, salt: int) -> Any:
        if limit is None or limit >= len(dataset):
            return dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed + salt))
        return Subset(dataset, order[:limit].sort().values.tolist())

    def split(self, name: str, limit: int | None = None) -> Any:
        """A split (``"forget"``, ``"retain"``, ``"heldout"``), within ``max_forget_blocks`` / ``max_retain_blocks``,
        optionally cut to a fixed random subset of ``limit`` blocks."""
        salt = {"forget": 1, "retain": 2, "heldout": 3}.get(name, 5)
        cap = {"forget": self.max_forget_blocks, "retain": self.max_retain_blocks}.get(name)
        data = self._subset(self.shakespeare.dataset(name), cap, salt)  # type: ignore[arg-type]
        return self._subset(data, limit, salt + 10)

    def collator(self, with_template: bool) -> UnlearningBatchCollator:
        """The collate function of the forget (``with_template``) or other splits."""
        template = None
        if with_template:
            template = list(self.tokenizer.encode(self.template_text).ids)
        return UnlearningBatchCollator(self.prompt_tokens, template)

    def dataloader(
        self, name: str, shuffle: bool = False, limit: int | None = None, perturbed: int = 0, template: bool = True
    ) -> DataLoader:
        """A dict-batch DataLoader over one split (``perturbed`` answers per block when > 0; the refusal template on
        forget batches when ``template``)."""
        data = self.split(name, limit)
        if perturbed:
            data = PerturbedAnswers(data, perturbed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collator(template and name == "forget"),
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> CombinedLoader:
        forget = self.dataloader("forget", shuffle=True)
        retain_data = self.split("retain")
        n_forget = len(forget.dataset)  # type: ignore[arg-type]
        sampler = RandomSampler(
            retain_data,
            replacement=n_forget > len(retain_data),
            num_samples=n_forget,
            generator=torch.Generator().manual_seed(self.seed + 7),
        )
        retain = DataLoader(retain_data, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator(False))
        loaders = {"forget": forget, "retain": retain}
        trainer = self.trainer
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            # the retain term is a token mean over each optimizer step: count its micro-batches' tokens ahead
            return TokensPerStep(loaders, trainer.accumulate_grad_batches, key="retain", mode="min_size")
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self.dataloader(name, limit=self.max_eval_blocks, perturbed=self.perturbed_answers, template=False)
            for name in self.eval_splits
        ]

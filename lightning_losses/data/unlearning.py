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

The same module takes a user's own data instead of the plays, with any Hugging Face tokenizer: a forget and a retain
dataset (``forget_data=``, ``retain_data=``, optionally ``heldout_data=``), or one dataset with a column naming each
example's split (``data=``, ``split_column=``), in TRL's formats (prompt–completion, language modelling, chat
``messages``; see :mod:`lightning_losses.data.text`). The answer tokens are learnt or unlearnt, the prompt is
masked. IdkDPO's (and FLAT's) template answer comes from the data: an ``alternate`` column (the "I don't know"-style
answer after the same prompt), or a preference pair ``prompt`` / ``chosen`` / ``rejected`` whose ``rejected`` answer
is the one to forget and ``chosen`` the alternate; else ``template_text``. Perturbed answers for the truth ratio come
from a ``perturbed`` column (a list of wrong answers per example), else from other examples' answers after the same
prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from lightning_losses.data.shakespeare import ShakespeareDataModule
from lightning_losses.data.text import TextCollator, dataset_format, load_examples, resolve_tokenizer
from lightning_losses.integrations.tokenization import check_trainer_vocabulary, padding_token_id
from lightning_losses.utilities.imports import require
from lightning_losses.utilities.tokens import TokensPerStep

__all__ = ["PerturbedAnswers", "TokenizedExamples", "UnlearningBatchCollator", "UnlearningDataModule"]


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

    Dict items of variable length (from :class:`TokenizedExamples`: ``input_ids`` and ``labels`` lists with the
    prompt already masked, ``index``, optional ``template_input_ids`` / ``template_labels`` and ``perturbed``, a list
    of ``(input_ids, labels)``) are right-padded with ``pad_token_id`` instead; ``prompt_tokens`` and
    ``template_ids`` do not apply to them.

    Args:
        prompt_tokens: leading tokens of each block whose labels are masked.
        template_ids: token ids of the template answer, or ``None`` for no template keys.
        ignore_index: label of masked positions.
        pad_token_id: padding id of dict items.
        keep_template: whether dict items' template answers go into the batch.
        keep_perturbed: whether dict items' perturbed answers go into the batch.

    Example:
        >>> collate = UnlearningBatchCollator(prompt_tokens=2, template_ids=[7, 8])
        >>> item = (torch.arange(5), torch.arange(5), torch.tensor(3))
        >>> batch = collate([item])
        >>> batch["labels"].tolist(), batch["template_input_ids"].tolist(), batch["template_labels"].tolist()
        ([[-100, -100, 2, 3, 4]], [[0, 1, 7, 8, 7]], [[-100, -100, 7, 8, 7]])
    """

    def __init__(
        self,
        prompt_tokens: int = 0,
        template_ids: list[int] | None = None,
        ignore_index: int = -100,
        pad_token_id: int = 0,
        keep_template: bool = True,
        keep_perturbed: bool = True,
    ):
        self.prompt_tokens, self.template_ids, self.ignore_index = prompt_tokens, template_ids, ignore_index
        self.pad_token_id, self.keep_template, self.keep_perturbed = pad_token_id, keep_template, keep_perturbed

    def _pad(self, rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> Tensor:
        length = length or max(len(r) for r in rows)
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        return out

    def _padded(self, ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], prefix: str) -> dict[str, Tensor]:
        return {
            f"{prefix}input_ids": self._pad(ids, self.pad_token_id),
            f"{prefix}labels": self._pad(labels, self.ignore_index),
            f"{prefix}attention_mask": self._pad([[1] * len(r) for r in ids], 0),
        }

    def _collate_records(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch = self._padded([i["input_ids"] for i in items], [i["labels"] for i in items], "")
        batch["index"] = torch.tensor([int(i["index"]) for i in items], dtype=torch.long)
        if self.keep_template and all("template_input_ids" in i for i in items):
            template = [i["template_input_ids"] for i in items], [i["template_labels"] for i in items]
            batch.update(self._padded(*template, "template_"))
        if self.keep_perturbed and all("perturbed" in i for i in items):
            k = {len(i["perturbed"]) for i in items}
            if len(k) != 1:
                raise ValueError(f"Every example needs the same number of perturbed answers, got {sorted(k)}.")
            flat = [p for i in items for p in i["perturbed"]]
            padded = self._padded([p[0] for p in flat], [p[1] for p in flat], "perturbed_")
            n_answers = k.pop()
            batch.update({key: value.view(len(items), n_answers, -1) for key, value in padded.items()})
        return batch

    def __call__(self, items: list[Any]) -> dict[str, Tensor]:
        if items and isinstance(items[0], Mapping):
            return self._collate_records(items)
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


class TokenizedExamples(Dataset):
    """Examples of one split tokenised once: dict items for :class:`UnlearningBatchCollator`.

    Args:
        examples: the split's examples in a TRL format (prompt–completion, ``text``, ``messages``, or a preference
            pair whose ``rejected`` answer is the one learnt or unlearnt and ``chosen`` the alternate).
        collator: tokenises an example (prompt masked).
        offset: added to each example's position to give its ``index`` (unique across splits).
        template_text: the alternate answer of examples without an ``alternate_column`` (``None``: no template).
        alternate_column: the column of the alternate ("I don't know"-style) answer.
        perturbed_answers: ``K`` perturbed answers per example (0: none): the ``perturbed_column`` list, else the
            answers of the ``K`` next examples after this example's prompt.
        perturbed_column: the column of an example's perturbed (wrong) answers.

    Example:
        >>> from lightning_losses.data.shakespeare import shakespeare_hf_tokenizer
        >>> collator = TextCollator(shakespeare_hf_tokenizer(512))
        >>> data = TokenizedExamples([{"prompt": "Who's there?", "completion": " Nay, answer me."}], collator,
        ...                          template_text=" I know not.")
        >>> item = data[0]
        >>> collator.tokenizer.decode([t for t in item["template_labels"] if t >= 0])
        ' I know not.<|endoftext|>'
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        collator: TextCollator,
        offset: int = 0,
        template_text: str | None = None,
        alternate_column: str = "alternate",
        perturbed_answers: int = 0,
        perturbed_column: str = "perturbed",
    ) -> None:
        if (
            perturbed_answers
            and len(examples) <= perturbed_answers
            and not (len(examples) and perturbed_column in examples[0])
        ):
            raise ValueError(
                f"{perturbed_answers} perturbed answers per example taken from the other examples need at least "
                f"{perturbed_answers + 1} examples, got {len(examples)}. Add a {perturbed_column!r} column or use "
                "fewer perturbed answers."
            )
        self.examples, self.collator, self.offset = examples, collator, offset
        self.template_text, self.alternate_column = template_text, alternate_column
        self.perturbed_answers, self.perturbed_column = perturbed_answers, perturbed_column
        self._items: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    @staticmethod
    def _preference(example: Mapping[str, Any]) -> dict[str, Any]:
        """``prompt`` / ``chosen`` / ``rejected`` of a preference pair, an implicit prompt extracted by TRL."""
        trl_data = require("trl.data_utils", "llm")
        return trl_data.maybe_extract_prompt({k: example[k] for k in ("prompt", "chosen", "rejected") if k in example})

    def _parts(self, example: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The example as prompt–completion (or language modelling) and its answer."""
        kind = dataset_format(example)
        if kind == "preference":
            pair = self._preference(example)
            return {"prompt": pair["prompt"], "completion": pair["rejected"]}, pair["rejected"]
        if kind == "prompt_completion":
            return {"prompt": example["prompt"], "completion": example["completion"]}, example["completion"]
        if kind == "language_modeling":
            key = "messages" if "messages" in example else "text"
            return {key: example[key]}, None
        raise ValueError(f"{type(self).__name__} takes text examples, not pre-tokenised ones (keys {sorted(example)}).")

    @staticmethod
    def _with_answer(core: Mapping[str, Any], answer: Any) -> dict[str, Any]:
        """``core`` with its answer replaced by ``answer`` (a string, or a list of messages)."""
        if "prompt" in core:
            return {"prompt": core["prompt"], "completion": answer}
        if "messages" in core:
            content = answer if isinstance(answer, str) else answer[-1]["content"]
            return {"messages": [*core["messages"][:-1], {"role": "assistant", "content": content}]}
        return {"prompt": "", "completion": answer}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i in self._items:
            return self._items[i]
        example = self.examples[i]
        core, _ = self._parts(example)
        item: dict[str, Any] = dict(self.collator.tokenize(core))
        item["index"] = self.offset + i
        if dataset_format(example) == "preference":  # forget `rejected`, prefer `chosen`
            alternate: Any = self._preference(example)["chosen"]
        else:
            alternate = example.get(self.alternate_column, self.template_text)
        if alternate is not None:
            row = self.collator.tokenize(self._with_answer(core, alternate))
            item["template_input_ids"], item["template_labels"] = row["input_ids"], row["labels"]
        if self.perturbed_answers:
            answers = example.get(self.perturbed_column)
            if answers is None:
                answers = [
                    self._parts(self.examples[(i + j) % len(self)])[1] for j in range(1, self.perturbed_answers + 1)
                ]
                if any(a is None for a in answers):
                    raise ValueError(
                        "Perturbed answers from other examples need prompt-completion examples; for text or "
                        f"messages examples add a {self.perturbed_column!r} column (a list of wrong answers)."
                    )
            if len(answers) < self.perturbed_answers:
                raise ValueError(
                    f"Example {i} has {len(answers)} perturbed answers in {self.perturbed_column!r}; "
                    f"{self.perturbed_answers} are asked for."
                )
            rows = [self.collator.tokenize(self._with_answer(core, a)) for a in answers[: self.perturbed_answers]]
            item["perturbed"] = [(r["input_ids"], r["labels"]) for r in rows]
        self._items[i] = item
        return item


class UnlearningDataModule(pl.LightningDataModule):
    """Unlearning data: by default forget one Shakespeare play, retain the others, held-out tails for evaluation; or
    the user's own forget / retain data with any Hugging Face tokenizer.

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
        forget_data: the user's forget examples (a ``datasets.Dataset``, a list of dicts, a ``.json`` / ``.jsonl``
            file) in a TRL format; with it the plays are not used, and the ``max_*_blocks`` limits count examples.
        retain_data: the user's retain examples.
        heldout_data: examples no model was trained on (the non-members of membership inference); ``None``: the
            last ``heldout_fraction`` of ``retain_data``.
        data: one dataset holding every split instead, named per example by ``split_column``
            (``"forget"``, ``"retain"`` or ``"heldout"``).
        split_column: the column naming the split of each example of ``data``.
        tokenizer: the Hugging Face tokenizer of the user's data (a tokenizer, or a local folder for
            ``AutoTokenizer.from_pretrained``); ``None``: the plays' BPE of ``vocab_size`` tokens. Its pad token is
            used, else its EOS token.
        max_length: truncation of the user's examples, in tokens.
        alternate_column: the column of a forget example's alternate answer (IdkDPO's "I don't know", FLAT's
            template); a preference example's ``chosen`` answer plays that part (its ``rejected`` one is forgotten).
            Examples without one get ``template_text``.
        perturbed_column: the column of an evaluation example's perturbed answers (a list), else they are other
            examples' answers.

    ``setup`` checks that the trainer's model has a token embedding for every id of the tokenizer.

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
        forget_data: Any = None,
        retain_data: Any = None,
        heldout_data: Any = None,
        data: Any = None,
        split_column: str = "split",
        tokenizer: Any = None,
        max_length: int | None = 256,
        alternate_column: str = "alternate",
        perturbed_column: str = "perturbed",
    ) -> None:
        super().__init__()
        self.user_data = forget_data is not None or data is not None
        if data is not None and forget_data is not None:
            raise ValueError("Pass either `data` (with a split column) or `forget_data` / `retain_data`, not both.")
        if not self.user_data and (retain_data is not None or heldout_data is not None):
            raise ValueError("`retain_data` / `heldout_data` need `forget_data` (the examples to forget).")
        if not self.user_data and tokenizer is not None:
            raise ValueError(
                "`tokenizer` applies to your own data (`forget_data` / `data`); the plays' blocks use their local BPE. "
                "For the plays with another tokenizer pass them as examples: "
                "`data=[{**e, 'split': 'forget' if e['play'] == 'Hamlet' else 'retain'} for e in "
                "shakespeare_examples()]`."
            )
        self.forget_data, self.retain_data, self.heldout_data, self.data = forget_data, retain_data, heldout_data, data
        self.split_column, self._tokenizer_arg, self.max_length = split_column, tokenizer, max_length
        self.alternate_column, self.perturbed_column = alternate_column, perturbed_column
        self.cache_dir, self.vocab_size, self.heldout_fraction = cache_dir, vocab_size, heldout_fraction
        self._user_splits: dict[str, TokenizedExamples] = {}
        self._user_tokenizer: Any = None
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
        """The tokenizer: the user's (a Hugging Face tokenizer) with user data, else the ``tokenizers.Tokenizer`` of
        the plays' blocks."""
        if self.user_data:
            if self._user_tokenizer is None:
                self._user_tokenizer = resolve_tokenizer(self._tokenizer_arg, self.vocab_size, self.cache_dir)
            return self._user_tokenizer
        return self.shakespeare.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            check_trainer_vocabulary(self.trainer.lightning_module)
        if self.user_data:
            self._setup_user_data()
            return
        self.shakespeare.setup(stage)
        if len(self.shakespeare.dataset("forget")) == 0:
            raise ValueError(f"The forget play {self.shakespeare.forget_play!r} has no block: nothing to forget.")

    def _user_examples(self) -> dict[str, Sequence[Mapping[str, Any]]]:
        if self.data is not None:
            rows = load_examples(self.data)
            splits: dict[str, list[Mapping[str, Any]]] = {"forget": [], "retain": [], "heldout": []}
            for i in range(len(rows)):
                row = rows[i]
                if self.split_column not in row:
                    raise ValueError(
                        f"Example {i} has no {self.split_column!r} column naming its split (keys {sorted(row)}). "
                        "Add it, or set `split_column=` to the column that names the split."
                    )
                name = row[self.split_column]
                if name not in splits:
                    raise ValueError(
                        f"Example {i} has {self.split_column}={name!r}: expected 'forget', 'retain' or 'heldout'."
                    )
                splits[name].append(row)
            forget, retain = splits["forget"], splits["retain"]
            heldout: Sequence[Mapping[str, Any]] | None = splits["heldout"] or None
        else:
            forget = load_examples(self.forget_data)  # type: ignore[assignment]
            retain = load_examples(self.retain_data) if self.retain_data is not None else []  # type: ignore[assignment]
            heldout = load_examples(self.heldout_data) if self.heldout_data is not None else None
        if not len(forget):
            raise ValueError("The forget data has no example: nothing to forget.")
        if not len(retain):
            raise ValueError(
                "The retain data has no example: pass `retain_data=` (or rows with split 'retain'); retain batches "
                "keep the model's other knowledge and are drawn every step."
            )
        if heldout is None:
            n_held = max(1, round(len(retain) * self.heldout_fraction))
            if len(retain) <= n_held:
                raise ValueError(
                    f"The retain data has {len(retain)} example(s): too few to hold out {n_held} for evaluation. Pass "
                    "`heldout_data=` or more retain examples."
                )
            heldout = [retain[i] for i in range(len(retain) - n_held, len(retain))]
            retain = [retain[i] for i in range(len(retain) - n_held)]
        return {"forget": forget, "retain": retain, "heldout": heldout}

    def _setup_user_data(self) -> None:
        if self._user_splits:
            return
        collator = TextCollator(self.tokenizer, max_length=self.max_length, completion_only_loss=True)
        offset = 0
        for name, examples in self._user_examples().items():
            self._user_splits[name] = TokenizedExamples(
                examples,
                collator,
                offset=offset,
                template_text=self.template_text if name == "forget" else None,
                alternate_column=self.alternate_column,
                perturbed_answers=self.perturbed_answers if name in self.eval_splits else 0,
                perturbed_column=self.perturbed_column,
            )
            offset += len(examples)

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
        if self.user_data:
            self._setup_user_data()
            if name not in self._user_splits:
                raise ValueError(f"Unknown split {name!r}: expected one of {sorted(self._user_splits)}.")
            data = self._subset(self._user_splits[name], cap, salt)
        else:
            data = self._subset(self.shakespeare.dataset(name), cap, salt)  # type: ignore[arg-type]
        return self._subset(data, limit, salt + 10)

    def collator(self, with_template: bool, with_perturbed: bool = True) -> UnlearningBatchCollator:
        """The collate function of the forget (``with_template``) or other splits."""
        if self.user_data:
            pad = padding_token_id(self.tokenizer)
            return UnlearningBatchCollator(pad_token_id=pad, keep_template=with_template, keep_perturbed=with_perturbed)
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
        if perturbed and not self.user_data:  # user examples carry their perturbed answers already
            data = PerturbedAnswers(data, perturbed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collator(template and name == "forget", with_perturbed=perturbed > 0),
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
        retain = DataLoader(
            retain_data, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator(False, False)
        )
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

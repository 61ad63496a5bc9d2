r"""Text data in TRL's dataset formats, with any Hugging Face tokenizer: a collate function and a data module.

The formats are TRL's (https://huggingface.co/docs/trl/dataset_formats), each *standard* (strings) or
*conversational* (lists of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template):

========================= ===================================== ===========================================
format                    keys                                  labels (``-100`` elsewhere)
========================= ===================================== ===========================================
language modelling        ``text``, or ``messages``             every token; with ``messages`` the
                                                                assistant turns only
prompt–completion         ``prompt``, ``completion``            the completion's tokens
preference                ``prompt`` (optional), ``chosen``,    ``chosen_labels`` / ``rejected_labels``:
                          ``rejected``                          each answer's tokens
pre-tokenised             ``input_ids`` (optional ``labels``)   ``labels``, else every token
========================= ===================================== ===========================================

TRL's own helpers do the format work: :func:`trl.data_utils.is_conversational`,
:func:`trl.data_utils.maybe_apply_chat_template` (prompt–completion and preference messages to strings),
:func:`trl.data_utils.maybe_extract_prompt` (the implicit prompt of a preference pair) and
:func:`trl.data_utils.pack_dataset` (packing). Labels are the input ids (the model shifts them, as Hugging Face
causal LMs do). A prompt's length is the longest common prefix of the prompt's and the whole sequence's tokens, so
a token that straddles the boundary counts as an answer token (see
:func:`~lightning_losses.integrations.tokenization.prompt_token_count`). A multi-turn conversation's assistant turns
are found the same way, by rendering the conversation turn by turn (``add_generation_prompt=True`` before each
assistant turn), so any chat template works, with or without ``{% generation %}`` markers.

Padding is on the right with the tokenizer's pad token, or its EOS token when it has none (padded positions are
masked: attention 0, label ``-100``). An EOS token is appended to a text or a completion that does not end with one
(``add_eos``), as TRL's ``SFTTrainer`` does, so the model learns to stop.

``trl`` and ``transformers`` are imported lazily (``pip install "lightning-losses[llm]"``).

Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate("<eos> to be or not".split())}, unk_token="<eos>"))
    >>> raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> collate = TextCollator(as_pretrained_tokenizer(raw, eos_token="<eos>"))
    >>> batch = collate([{"prompt": "to be", "completion": " or not"}, {"text": "to be"}])
    >>> batch["input_ids"].tolist()
    [[1, 2, 3, 4, 0], [1, 2, 0, 0, 0]]
    >>> batch["labels"].tolist()
    [[-100, -100, 3, 4, 0], [1, 2, 0, -100, -100]]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_losses.integrations.tokenization import (
    as_pretrained_tokenizer,
    check_trainer_vocabulary,
    common_prefix_length,
    padding_token_id,
)
from lightning_losses.utilities.imports import require

__all__ = [
    "SIMPLE_CHAT_TEMPLATE",
    "DatasetFormat",
    "TextCollator",
    "TextDataModule",
    "dataset_format",
    "load_examples",
]

DatasetFormat = Literal["language_modeling", "prompt_completion", "preference", "tokenized"]

SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A minimal chat template (``<|role|>`` header, the content, the EOS token) for tokenizers that have none."""

_FORMATS_HELP = (
    "TRL's dataset formats: {'text'} or {'messages'} (language modelling), {'prompt', 'completion'} "
    "(prompt-completion), {'prompt', 'chosen', 'rejected'} or {'chosen', 'rejected'} (preference), or pre-tokenised "
    "{'input_ids'[, 'labels']}"
)


def dataset_format(example: Mapping[str, Any]) -> DatasetFormat:
    """The TRL dataset format of one example (standard or conversational alike).

    Raises:
        ValueError: the keys match no format.

    Example:
        >>> dataset_format({"prompt": "Who?", "completion": " I."}), dataset_format({"messages": []})
        ('prompt_completion', 'language_modeling')
    """
    keys = set(example)
    if "input_ids" in keys:
        return "tokenized"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys or "messages" in keys:
        return "language_modeling"
    raise ValueError(f"Unrecognised example with keys {sorted(keys)}: expected one of {_FORMATS_HELP}.")


def load_examples(data: Any, format: str = "prompt_completion") -> Sequence[Mapping[str, Any]]:
    """Examples from a ``datasets.Dataset``, a list of dicts, a JSON / JSON-lines file, or the built-in plays.

    Args:
        data: a ``datasets.Dataset`` (or anything indexable giving dicts), a list of dicts, a path to a ``.json`` /
            ``.jsonl`` file of such dicts, or ``"plays"`` for the Shakespeare plays rendered in ``format``
            (:func:`~lightning_losses.data.shakespeare.shakespeare_examples`).
        format: the format the plays are rendered in (``"language_modeling"``, ``"prompt_completion"``,
            ``"conversational"``, ``"preference"``).

    Example:
        >>> load_examples([{"text": "O Romeo"}])[0]["text"]
        'O Romeo'
    """
    if isinstance(data, str) and data == "plays":
        from lightning_losses.data.shakespeare import shakespeare_examples

        return shakespeare_examples(format)  # type: ignore[arg-type]
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(
                f"No data file {str(path)!r}: pass a datasets.Dataset, a list of dicts, a .json / .jsonl file or "
                "'plays'."
            )
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        loaded = json.loads(text)
        if not isinstance(loaded, list):
            raise ValueError(f"{path} must hold a JSON list of examples (dicts), got {type(loaded).__name__}.")
        return loaded
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            "Expected a datasets.Dataset, a list of dicts, a .json / .jsonl path or 'plays', got "
            f"{type(data).__name__}."
        )
    if len(data) and not isinstance(data[0], Mapping):
        raise TypeError(f"Examples must be dicts in {_FORMATS_HELP}; the first one is a {type(data[0]).__name__}.")
    return data  # type: ignore[no-any-return]


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]


class TextCollator:
    """Tokenise and pad examples in TRL's dataset formats into causal-LM batches (usable alone as ``collate_fn``).

    Args:
        tokenizer: any Hugging Face ``PreTrainedTokenizerBase`` (a ``tokenizers.Tokenizer`` is wrapped with
            :func:`~lightning_losses.integrations.tokenization.as_pretrained_tokenizer`). Conversational examples
            need its ``chat_template``.
        max_length: truncate each sequence to this many tokens (from the right); ``None``: no truncation.
        completion_only_loss: labels on completion / assistant tokens only (``True``), or on every token.
        add_eos: append the EOS token to a text or completion that does not end with it.
        ignore_index: label of masked positions.
        pad_to_multiple_of: pad the length of each batch to a multiple of this.
        chat_template_kwargs: extra keyword arguments of ``apply_chat_template``.
        return_prompts: also return ``prompts`` / ``prompt_attention_mask``: each sequence's tokens before its first
            label, left-padded (the keys of TRL's GKD batches, read by on-policy distillation to generate from).

    Batches are ``{"input_ids", "attention_mask", "labels"}`` ``(B, T)`` (preference:
    ``chosen_*`` and ``rejected_*``), with ``index`` when the examples have one (a unique id per example, which
    precomputed unlearning references read).

    Raises:
        ValueError: an example in no TRL format, a conversational example and a tokenizer without chat template, or
            an example with every label masked after truncation.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        completion_only_loss: bool = True,
        add_eos: bool = True,
        ignore_index: int = -100,
        pad_to_multiple_of: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        return_prompts: bool = False,
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be a positive number of tokens or None, got {max_length}.")
        self.tokenizer = as_pretrained_tokenizer(tokenizer)
        self.pad_token_id = padding_token_id(self.tokenizer)
        self.max_length, self.completion_only_loss, self.add_eos = max_length, completion_only_loss, add_eos
        self.ignore_index, self.pad_to_multiple_of = ignore_index, pad_to_multiple_of
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.return_prompts = return_prompts

    # ----------------------------------------------------------------------------------------------- tokenising
    def _eos(self, ids: list[int]) -> list[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if self.add_eos and isinstance(eos, int) and (not ids or ids[-1] != eos):
            return [*ids, eos]
        return ids

    def _check_template(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"Conversational examples need the tokenizer's chat template, and {type(self.tokenizer).__name__} has "
                "none. Set one: `tokenizer.chat_template = <a Jinja template>` (e.g. "
                "lightning_losses.data.text.SIMPLE_CHAT_TEMPLATE)."
            )

    def _row(self, ids: list[int], start: int | Sequence[tuple[int, int]], what: str) -> dict[str, list[int]]:
        """Truncate, and label ``ids[start:]`` (or the given spans) when ``completion_only_loss``."""
        if self.max_length is not None:
            ids = ids[: self.max_length]
        labels = [self.ignore_index] * len(ids)
        spans = [(start, len(ids))] if isinstance(start, int) else start
        if not self.completion_only_loss:
            spans = [(0, len(ids))]
        for begin, end in spans:
            labels[begin : min(end, len(ids))] = ids[begin : min(end, len(ids))]
        if all(label == self.ignore_index for label in labels):
            raise ValueError(
                f"An example has no {what} token left to learn from (sequence of {len(ids)} tokens"
                + (f" after truncation to max_length={self.max_length}" if self.max_length is not None else "")
                + "): every label would be masked. Shorten its prompt, raise max_length or drop the example."
            )
        return {"input_ids": ids, "labels": labels}

    def _prompt_answer(self, prompt: str, answer: str, special: bool) -> dict[str, list[int]]:
        full = self._eos(_encode(self.tokenizer, prompt + answer, special))
        start = common_prefix_length(_encode(self.tokenizer, prompt, special), full)
        return self._row(full, start, "completion")

    def _messages(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
        self._check_template()
        render = self.tokenizer.apply_chat_template
        kwargs = {"tokenize": False, **self.chat_template_kwargs}
        full = _encode(self.tokenizer, render(list(messages), **kwargs), False)
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = _encode(self.tokenizer, render(list(messages[:k]), add_generation_prompt=True, **kwargs), False)
            through = _encode(self.tokenizer, render(list(messages[: k + 1]), **kwargs), False)
            spans.append((common_prefix_length(before, full), common_prefix_length(through, full)))
        if not spans and self.completion_only_loss:
            raise ValueError(
                "A conversational example has no assistant message: with completion_only_loss=True only assistant "
                "turns are learnt. Add an assistant turn or set completion_only_loss=False."
            )
        return self._row(full, spans, "assistant")

    def tokenize(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """Token ids and labels (lists) of one example: ``input_ids`` / ``labels``, or ``chosen_*`` / ``rejected_*``
        for a preference pair; ``index`` is kept."""
        trl_data = require("trl.data_utils", "llm")
        kind = dataset_format(example)
        extra = {"index": int(example["index"])} if "index" in example else {}
        if kind == "tokenized":
            ids = [int(i) for i in example["input_ids"]]
            labels = [int(i) for i in example.get("labels", ids)]
            if self.max_length is not None:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            return {"input_ids": ids, "labels": labels, **extra}
        conversational = trl_data.is_conversational(dict(example))
        if conversational:
            self._check_template()
        if kind == "language_modeling":
            if "messages" in example:
                return {**self._messages(example["messages"]), **extra}
            ids = self._eos(_encode(self.tokenizer, example["text"], True))
            return {**self._row(ids, 0, "text"), **extra}
        core = {k: example[k] for k in ("prompt", "completion", "chosen", "rejected") if k in example}
        core = trl_data.maybe_extract_prompt(core)  # the shared prefix of an implicit-prompt preference pair
        rendered = trl_data.maybe_apply_chat_template(core, self.tokenizer, **self.chat_template_kwargs)
        special = not conversational  # a rendered chat template already holds its special tokens
        if kind == "prompt_completion":
            return {**self._prompt_answer(rendered["prompt"], rendered["completion"], special), **extra}
        out: dict[str, Any] = dict(extra)
        for side in ("chosen", "rejected"):
            row = self._prompt_answer(rendered["prompt"], rendered[side], special)
            out[f"{side}_input_ids"], out[f"{side}_labels"] = row["input_ids"], row["labels"]
        return out

    # ------------------------------------------------------------------------------------------------- padding
    def pad(self, rows: Sequence[Sequence[int]], value: int) -> Tensor:
        """Right-pad lists of ids to one ``(B, T)`` tensor (``T`` rounded up to ``pad_to_multiple_of``)."""
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        return out

    def pad_rows(self, rows: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, Tensor]:
        """``{prefix}input_ids`` / ``attention_mask`` / ``labels`` from tokenised rows."""
        ids = [r[f"{prefix}input_ids"] for r in rows]
        mask = self.pad([[1] * len(i) for i in ids], 0)
        return {
            f"{prefix}input_ids": self.pad(ids, self.pad_token_id),
            f"{prefix}attention_mask": mask,
            f"{prefix}labels": self.pad([r[f"{prefix}labels"] for r in rows], self.ignore_index),
        }

    def prompts_of(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Each row's tokens before its first label, left-padded: ``prompts`` and ``prompt_attention_mask``."""
        learnt = labels != self.ignore_index
        lengths = torch.where(learnt.any(1), learnt.int().argmax(1), labels.shape[1])
        width = max(int(lengths.max()), 1)
        prompts = input_ids.new_full((len(input_ids), width), self.pad_token_id)
        mask = torch.zeros_like(prompts)
        for row, n in enumerate(lengths.tolist()):
            if n:
                prompts[row, width - n :] = input_ids[row, :n]
                mask[row, width - n :] = 1
        return {"prompts": prompts, "prompt_attention_mask": mask}

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        rows = [self.tokenize(e) for e in examples]
        if "chosen_input_ids" in rows[0]:
            if any("chosen_input_ids" not in r for r in rows):
                raise ValueError("A batch mixes preference pairs with other formats: keep one format per dataset.")
            batch = {**self.pad_rows(rows, "chosen_"), **self.pad_rows(rows, "rejected_")}
        else:
            if any("input_ids" not in r for r in rows):
                raise ValueError("A batch mixes preference pairs with other formats: keep one format per dataset.")
            batch = self.pad_rows(rows)
            if self.return_prompts:
                batch.update(self.prompts_of(batch["input_ids"], batch["labels"]))
        if all("index" in r for r in rows):
            batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        return batch


class _Rows(torch.utils.data.Dataset):
    """Indexable examples (a ``datasets.Dataset`` or a list) as a map-style torch dataset of dicts; an example
    without an ``index`` gets ``offset`` plus its position."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], offset: int = 0) -> None:
        self.examples, self.offset = examples, offset

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        example = self.examples[i]
        return example if "index" in example else {**example, "index": self.offset + i}


class TextDataModule(pl.LightningDataModule):
    """Training / validation / test data in TRL's formats, tokenised by any tokenizer, for a causal LM.

    Args:
        tokenizer: a Hugging Face tokenizer, a folder or hub name for ``AutoTokenizer.from_pretrained`` (local files
            only), or ``None`` for the byte-level BPE of the plays (``vocab_size`` tokens,
            :func:`~lightning_losses.data.shakespeare.shakespeare_hf_tokenizer`). Pad token: its own, else EOS.
        train_data: a ``datasets.Dataset``, a list of dicts, a ``.json`` / ``.jsonl`` file, or ``"plays"``
            (:func:`~lightning_losses.data.shakespeare.shakespeare_examples` in ``plays_format``).
        val_data: validation data (same kinds), or ``None``: the last ``val_fraction`` of ``train_data``.
        test_data: test data, or ``None``: the validation data.
        batch_size: examples per batch.
        max_length: tokens per sequence (longer ones are truncated; the packed length with ``packing``).
        completion_only_loss: labels on completion / assistant tokens only.
        packing: pack tokenised sequences into rows of ``max_length`` tokens with
            :func:`trl.data_utils.pack_dataset` (not for preference pairs).
        packing_strategy: ``"bfd"`` (best-fit decreasing, sequences kept whole, longer ones cut) or ``"wrapped"``.
        plays_format: the format of ``"plays"`` data.
        return_prompts: batches also carry the left-padded prompts (``prompts``, ``prompt_attention_mask``), as
            on-policy distillation (:class:`~lightning_losses.CausalLMDistillationModule`) reads them.
        val_fraction: share of ``train_data`` held out for validation when no ``val_data`` is given (0: none).
        vocab_size: vocabulary of the plays tokenizer when ``tokenizer`` is ``None``.
        cache_dir: where the plays tokenizer is cached.
        seed: seed of the training shuffle and of the validation split.
        num_workers: DataLoader workers.

    ``setup`` checks the trainer's model against the tokenizer
    (:func:`~lightning_losses.integrations.tokenization.check_vocab_size`): a model with fewer token embeddings
    than the tokenizer has ids is refused with the two sizes, before any step.

    Example:
        >>> dm = TextDataModule(train_data="plays", batch_size=2, max_length=256, vocab_size=512)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["input_ids"].shape[0]
        (['attention_mask', 'index', 'input_ids', 'labels'], 2)
    """

    def __init__(
        self,
        tokenizer: Any = None,
        train_data: Any = "plays",
        val_data: Any = None,
        test_data: Any = None,
        batch_size: int = 8,
        max_length: int = 256,
        completion_only_loss: bool = True,
        packing: bool = False,
        packing_strategy: Literal["bfd", "wrapped"] = "bfd",
        plays_format: str = "prompt_completion",
        val_fraction: float = 0.05,
        vocab_size: int = 2048,
        cache_dir: str = "results/cache",
        seed: int = 0,
        num_workers: int = 0,
        return_prompts: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"`val_fraction` must lie in [0, 1), got {val_fraction}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self._tokenizer_arg, self.vocab_size, self.cache_dir = tokenizer, vocab_size, cache_dir
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.batch_size, self.max_length, self.completion_only_loss = batch_size, max_length, completion_only_loss
        self.packing, self.packing_strategy, self.plays_format = packing, packing_strategy, plays_format
        self.val_fraction, self.seed, self.num_workers = val_fraction, seed, num_workers
        self.return_prompts = return_prompts
        self._resolved_tokenizer: Any = None
        self._splits: dict[str, Any] = {}

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the batches."""
        if self._resolved_tokenizer is None:
            self._resolved_tokenizer = resolve_tokenizer(self._tokenizer_arg, self.vocab_size, self.cache_dir)
        return self._resolved_tokenizer

    @property
    def collator(self) -> TextCollator:
        """The collate function of every dataloader."""
        return TextCollator(
            self.tokenizer,
            max_length=self.max_length,
            completion_only_loss=self.completion_only_loss,
            return_prompts=self.return_prompts,
        )

    def _examples(self, data: Any) -> Sequence[Mapping[str, Any]]:
        return load_examples(data, self.plays_format)

    def _pack(self, examples: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
        datasets = require("datasets", "llm")
        trl_data = require("trl.data_utils", "llm")
        collate = self.collator
        collate.max_length = None  # packing cuts, not truncation
        rows = [collate.tokenize(e) for e in examples]
        if rows and "input_ids" not in rows[0]:
            raise ValueError("`packing` packs single sequences; preference pairs cannot be packed. Set packing=False.")
        table = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        packed = trl_data.pack_dataset(table, self.max_length, strategy=self.packing_strategy)
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in packed]  # numbered by the loaders

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            check_trainer_vocabulary(self.trainer.lightning_module)
        if self._splits:
            return
        train = self._examples(self.train_data)
        if self.val_data is not None:
            val = self._examples(self.val_data)
        else:
            n_val = round(len(train) * self.val_fraction)
            train, val = _take(train, range(len(train) - n_val)), _take(train, range(len(train) - n_val, len(train)))
        test = self._examples(self.test_data) if self.test_data is not None else val
        splits = {"train": train, "val": val, "test": test}
        if self.packing:
            splits = {name: self._pack(data) if len(data) else data for name, data in splits.items()}
        self._splits = splits

    def dataset(self, split: Literal["train", "val", "test"]) -> Sequence[Mapping[str, Any]]:
        """The examples of one split."""
        self.setup()
        return self._splits[split]  # type: ignore[no-any-return]

    def dataloader(self, split: Literal["train", "val", "test"], shuffle: bool = False) -> DataLoader:
        """A DataLoader of padded dict batches over one split."""
        sizes = {name: len(self.dataset(name)) for name in ("train", "val")}  # type: ignore[arg-type]
        offset = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}[split]
        return DataLoader(
            _Rows(self.dataset(split), offset),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.dataloader("val") if len(self.dataset("val")) else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.dataloader("test") if len(self.dataset("test")) else []


class _Taken(Sequence):  # type: ignore[type-arg]
    """A view of some rows of an indexable dataset; rows without an ``index`` get their position in the source."""

    # the position in the source keeps indices unique across the splits cut from one dataset

    def __init__(self, data: Sequence[Mapping[str, Any]], rows: Sequence[int]) -> None:
        self.data, self.rows = data, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        example = self.data[self.rows[i]]
        return example if "index" in example else {**example, "index": self.rows[i]}


def _take(data: Sequence[Mapping[str, Any]], rows: Sequence[int]) -> Sequence[Mapping[str, Any]]:
    return _Taken(data, rows)


def resolve_tokenizer(tokenizer: Any, vocab_size: int = 2048, cache_dir: str = "results/cache") -> Any:
    """A Hugging Face tokenizer from a tokenizer, a ``tokenizers.Tokenizer``, a local folder / name, or ``None``
    (the byte-level BPE of the plays, with :data:`SIMPLE_CHAT_TEMPLATE`)."""
    if tokenizer is None:
        from lightning_losses.data.shakespeare import shakespeare_hf_tokenizer

        return shakespeare_hf_tokenizer(vocab_size, cache_dir)
    if isinstance(tokenizer, (str, Path)):
        transformers = require("transformers", "llm")
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return as_pretrained_tokenizer(tokenizer)

r"""Prompt / answer tokenisation with the prompt masked by prefix-matching the full tokenisation.

Counting the tokens of the separately tokenised prompt and masking that many positions of ``prompt + answer`` is
wrong whenever the tokenizer merges across the boundary (a BPE turns ``"Answer: "`` + ``"Paris"`` into
``"Answer:"``, ``" Paris"``: the prompt alone ends with a ``" "`` token that does not exist in the full text).
Here the prompt length is the longest common prefix of the two tokenisations: a token that straddles the boundary
holds answer characters, so it is an answer token.

Works with ``tokenizers.Tokenizer`` objects and Hugging Face ``PreTrainedTokenizer(Fast)`` (imported by neither).

Also the checks between a tokenizer and a model: :func:`check_vocab_size` compares the model's embedding rows with
the tokenizer's ids (a token id past the embedding otherwise ends deep inside the model in ``IndexError: index out of
range in self``), and :func:`check_trainer_vocabulary` runs it from a LightningModule's or a LightningDataModule's
``setup`` against the tokenizer of the trainer's data module. Padding uses the tokenizer's pad token, or its EOS token
when it has none (:func:`padding_token_id`), as TRL's trainers do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_losses.utilities.imports import require

__all__ = [
    "as_pretrained_tokenizer",
    "check_trainer_vocabulary",
    "check_vocab_size",
    "common_prefix_length",
    "encode_text",
    "model_vocab_size",
    "pad_token_id_of",
    "padding_token_id",
    "prompt_token_count",
    "tokenize_prompt_answer",
    "tokenizer_vocab_size",
]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with ``tokenizer`` (a ``tokenizers.Tokenizer`` or a Hugging Face tokenizer).

    Special tokens are added as the tokenizer adds them by default (a BOS stays a prompt token).
    """
    encoded = tokenizer.encode(text)
    ids = getattr(encoded, "ids", encoded)
    if not isinstance(ids, list):
        ids = list(ids)
    return [int(i) for i in ids]


def pad_token_id_of(tokenizer: Any) -> int | None:
    """The padding token id of a Hugging Face tokenizer or a ``tokenizers.Tokenizer`` (``None`` when it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    padding = getattr(tokenizer, "padding", None)
    if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    return None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading token ids ``a`` and ``b`` share.

    Example:
        >>> common_prefix_length([5, 6, 7], [5, 6, 9, 1])
        2
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_token_count(tokenizer: Any, prompt: str, answer: str) -> int:
    """Number of leading tokens of ``tokenize(prompt + answer)`` that belong to the prompt alone.

    The longest common prefix of ``tokenize(prompt)`` and ``tokenize(prompt + answer)``.

    Example:
        >>> class Chars:                        # a toy tokenizer that merges "a b" into one token
        ...     def encode(self, text):
        ...         return [ord(c) for c in text.replace("a b", "#")]
        >>> prompt_token_count(Chars(), "xa", " b")   # "xa b" -> "x#": the merged token is an answer token
        1
    """
    return common_prefix_length(encode_text(tokenizer, prompt), encode_text(tokenizer, prompt + answer))


def tokenize_prompt_answer(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_length: int | None = None,
    pad_token_id: int | None = None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """Tokenise ``prompt + answer`` pairs into a right-padded causal-LM batch with the prompt masked.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or Hugging Face tokenizer.
        prompts: the prompts (questions); may be empty strings.
        answers: the answers whose tokens are learnt or unlearnt.
        max_length: truncate each sequence to this many tokens (from the right).
        pad_token_id: padding id; defaults to the tokenizer's pad token.
        ignore_index: label of prompt and padding positions.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each ``(B, T)``; ``labels`` equal ``input_ids`` on answer
        tokens and ``ignore_index`` elsewhere (the model shifts them, as Hugging Face causal LMs do).

    Raises:
        ValueError: when the tokenizer has no pad token (and none is given), the lists differ in length or are
            empty, or an answer has no token left after truncation.

    Example:
        >>> class Words:
        ...     pad_token_id = 0
        ...     def encode(self, text):
        ...         return [len(w) for w in text.split()]
        >>> batch = tokenize_prompt_answer(Words(), ["who is ", "q "], ["the prince", "a b c"])
        >>> batch["labels"].tolist()
        [[-100, -100, 3, 6], [-100, 1, 1, 1]]
        >>> batch["attention_mask"].tolist()
        [[1, 1, 1, 1], [1, 1, 1, 1]]
    """
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts and {len(answers)} answers; pass one answer per prompt.")
    if not prompts:
        raise ValueError("No prompt/answer pair given: the forget or retain set is empty.")
    pad = pad_token_id if pad_token_id is not None else pad_token_id_of(tokenizer)
    if pad is None:
        raise ValueError(
            "The tokenizer has no pad token, so batches cannot be padded. Set one (e.g. `tokenizer.pad_token = "
            "tokenizer.eos_token` for a Hugging Face tokenizer) or pass `pad_token_id=`."
        )
    rows: list[tuple[list[int], int]] = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = encode_text(tokenizer, prompt + answer)
        n_prompt = prompt_token_count(tokenizer, prompt, answer)
        if max_length is not None:
            ids = ids[:max_length]
        if len(ids) <= n_prompt:
            raise ValueError(
                f"Example {i} has no answer token (prompt of {n_prompt} tokens, sequence of {len(ids)}"
                + (f" after truncation to max_length={max_length}" if max_length is not None else "")
                + "): every label would be masked. Shorten the prompt, raise max_length or drop the example."
            )
        rows.append((ids, n_prompt))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), ignore_index, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(rows):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[b, : len(ids)] = t
        attention[b, : len(ids)] = 1
        labels[b, n_prompt : len(ids)] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def padding_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token (as TRL's trainers do).

    Padded positions are masked (``attention_mask`` 0, label ``-100``), so borrowing the EOS id changes nothing the
    model learns; an EOS that ends a text keeps its label.

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.

    Example:
        >>> class Tok:
        ...     pad_token_id, eos_token_id = None, 7
        >>> padding_token_id(Tok())
        7
    """
    pad = pad_token_id_of(tokenizer)
    if pad is not None:
        return pad
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return eos
    raise ValueError(
        f"The tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token, so batches cannot be "
        "padded. Set one, e.g. `tokenizer.pad_token = tokenizer.eos_token` or `tokenizer.add_special_tokens("
        "{'pad_token': '<pad>'})` (then resize the model's embeddings)."
    )


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of token ids the tokenizer can produce: ``len(tokenizer)`` for a Hugging Face tokenizer (added tokens
    included), ``get_vocab_size(with_added_tokens=True)`` for a ``tokenizers.Tokenizer``.

    Example:
        >>> class Tok:
        ...     def __len__(self):
        ...         return 50257
        >>> tokenizer_vocab_size(Tok())
        50257
    """
    get_size = getattr(tokenizer, "get_vocab_size", None)
    if callable(get_size):
        return int(get_size(with_added_tokens=True))
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    raise TypeError(f"Cannot tell the vocabulary size of {type(tokenizer).__name__}: it has no len() or vocab_size.")


def model_vocab_size(model: Any) -> int | None:
    """Rows of the input embedding of a transformers model (or of the first submodule that is one), else ``None``.

    Example:
        >>> from lightning_losses.demos import build_gpt2
        >>> model_vocab_size(torch.nn.ModuleDict({"lm": build_gpt2(64, n_layer=1, n_embd=16, n_head=2)}))
        64
    """
    modules = model.modules() if isinstance(model, torch.nn.Module) else [model]
    for module in modules:
        get_embeddings = getattr(module, "get_input_embeddings", None)
        if not callable(get_embeddings):
            continue
        try:
            embedding = get_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        rows = getattr(embedding, "num_embeddings", None)
        if rows is None and getattr(embedding, "weight", None) is not None:
            rows = embedding.weight.shape[0]
        if isinstance(rows, int) and rows > 0:
            return rows
        config_size = getattr(getattr(module, "config", None), "vocab_size", None)
        if isinstance(config_size, int):
            return config_size
    return None


def check_vocab_size(model: Any, tokenizer: Any, vocab_size: int | None = None) -> None:
    """Check that every id ``tokenizer`` can produce has a row in ``model``'s input embedding.

    A model with *more* rows than the tokenizer has ids is fine (GPT-2 checkpoints pad their vocabulary); fewer
    rows would fail inside the embedding with ``IndexError: index out of range in self``.

    Args:
        model: a transformers model (or a module holding one), or ``None`` when ``vocab_size`` is given.
        tokenizer: a Hugging Face or ``tokenizers`` tokenizer.
        vocab_size: the model's vocabulary size when it cannot be read from ``model`` (e.g. ``num_classes``).

    Raises:
        ValueError: the model's vocabulary is smaller than the tokenizer's, with the two sizes and the fix.

    Example:
        >>> from lightning_losses.demos import build_gpt2
        >>> class Tok:
        ...     def __len__(self):
        ...         return 100
        >>> check_vocab_size(build_gpt2(64, n_layer=1, n_embd=16, n_head=2), Tok())
        Traceback (most recent call last):
        ...
        ValueError: The model's vocabulary has 64 token embeddings but the tokenizer has 100 tokens ...
    """
    rows = vocab_size if vocab_size is not None else model_vocab_size(model)
    if rows is None:
        return
    size = tokenizer_vocab_size(tokenizer)
    if size > rows:
        raise ValueError(
            f"The model's vocabulary has {rows} token embeddings but the tokenizer has {size} tokens (ids 0 to "
            f"{size - 1}): any id >= {rows} would fail inside the embedding with 'IndexError: index out of range in "
            f"self'. Use the tokenizer the model was trained with, build the model with vocab_size={size}, or resize "
            f"it: `model.resize_token_embeddings(len(tokenizer))`."
        )


def check_trainer_vocabulary(module: Any, model: Any = None, vocab_size: int | None = None) -> None:
    """:func:`check_vocab_size` of ``model`` (default: the module itself) against ``tokenizer`` of the trainer's
    data module; nothing happens when the module has no trainer, or the data module no ``tokenizer`` attribute.

    Call it from ``setup`` of a LightningModule (``check_trainer_vocabulary(self, self.model)``) or of a
    LightningDataModule (``check_trainer_vocabulary(self.trainer.lightning_module)``).

    Raises:
        ValueError: as :func:`check_vocab_size`.
    """
    trainer = getattr(module, "_trainer", None)  # a LightningModule's `trainer` property raises when detached
    if trainer is None and not hasattr(type(module), "trainer"):
        trainer = getattr(module, "trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    try:
        tokenizer = getattr(datamodule, "tokenizer", None)
    except (ImportError, FileNotFoundError):  # a data module whose tokenizer cannot be built has its own error
        return
    if tokenizer is None:
        return
    check_vocab_size(module if model is None else model, tokenizer, vocab_size)


def as_pretrained_tokenizer(
    tokenizer: Any, eos_token: str | None = "<|endoftext|>", chat_template: str | None = None
) -> Any:
    """A Hugging Face ``PreTrainedTokenizerFast`` from a ``tokenizers.Tokenizer`` (a Hugging Face tokenizer is
    returned as it is).

    ``eos_token`` (when the vocabulary has it) becomes the EOS token, and the pad token when there is none;
    ``chat_template`` (a Jinja template) is set when given.

    Example:
        >>> from tokenizers import Tokenizer, models
        >>> raw = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
        >>> hf = as_pretrained_tokenizer(raw)
        >>> hf.eos_token_id, hf.pad_token_id, len(hf)
        (1, 1, 2)
    """
    if hasattr(tokenizer, "apply_chat_template"):
        return tokenizer
    transformers = require("transformers", "llm")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
        hf.eos_token = eos_token
        if hf.pad_token is None:
            hf.pad_token = eos_token
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf

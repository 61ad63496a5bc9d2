r"""Prompt / answer tokenisation with the prompt masked by prefix-matching the full tokenisation.

Counting the tokens of the separately tokenised prompt and masking that many positions of ``prompt + answer`` is
wrong whenever the tokenizer merges across the boundary (a BPE turns ``"Answer: "`` + ``"Paris"`` into
``"Answer:"``, ``" Paris"``: the prompt alone ends with a ``" "`` token that does not exist in the full text).
Here the prompt length is the longest common prefix of the two tokenisations: a token that straddles the boundary
holds answer characters, so it is an answer token.

Works with ``tokenizers.Tokenizer`` objects and Hugging Face ``PreTrainedTokenizer(Fast)`` (imported by neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["encode_text", "pad_token_id_of", "prompt_token_count", "tokenize_prompt_answer"]


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
    prompt_ids = encode_text(tokenizer, prompt)
    full_ids = encode_text(tokenizer, prompt + answer)
    n = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        n += 1
    return n


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

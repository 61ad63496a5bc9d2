"""Train a GPT-2 with the chunked large-vocabulary cross-entropy: the tokens × vocabulary logits are never formed.

    python examples/chunked/train.py           # vocabulary 8192, 200 steps on two plays
    python examples/chunked/train.py --quick   # vocabulary 512, 5 steps on one play: a few seconds

``causal_lm_hidden_states`` runs the model without its LM head and returns the final hidden states and the head;
``linear_cross_entropy`` computes the loss chunk by chunk (float32 logits of one chunk at a time) with the value
and gradients of the plain cross-entropy, which this script checks on one batch before training.
``CausalLMModule(model, chunk_size=...)`` (a demo module) trains with it. Through LightningCLI:

    lightning-losses lightning fit --config examples/chunked/config.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_losses.data import ShakespeareDataModule
from lightning_losses.demos import CausalLMModule, build_gpt2
from lightning_losses.functional import linear_cross_entropy
from lightning_losses.integrations.transformers import causal_lm_hidden_states


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small vocabulary, 5 steps")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk of logits")
    parser.add_argument("--cache-dir", default="results/cache", help="where the trained tokenizer is cached")
    args = parser.parse_args(argv)
    vocab_size, block_size = (512, 64) if args.quick else (8192, 128)

    pl.seed_everything(0, verbose=False)
    datamodule = ShakespeareDataModule(
        block_size=block_size,
        batch_size=8,
        vocab_size=vocab_size,
        plays=["The Tempest"] if args.quick else ["The Tempest", "Macbeth"],
        cache_dir=args.cache_dir,
    )
    datamodule.setup("fit")
    model = build_gpt2(vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=block_size)

    # the chunked loss against the plain one on a batch: same value, same gradient of the head
    input_ids, labels = next(iter(datamodule.train_dataloader()))[:2]
    hidden, head = causal_lm_hidden_states(model, input_ids)
    chunked = linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, chunk_size=args.chunk_size)
    (chunked_grad,) = torch.autograd.grad(chunked, head.weight)
    logits = model(input_ids).logits[:, :-1]
    plain = F.cross_entropy(logits.reshape(-1, vocab_size), labels[:, 1:].reshape(-1))
    (plain_grad,) = torch.autograd.grad(plain, head.weight)
    grad_error = float((chunked_grad - plain_grad).abs().max())
    chunked, plain = chunked.detach(), plain.detach()
    print(f"chunked {float(chunked):.6f} vs plain {float(plain):.6f}, max gradient difference {grad_error:.2e}")

    module = CausalLMModule(model, lr=2e-3, chunk_size=args.chunk_size)
    trainer = pl.Trainer(
        max_steps=5 if args.quick else 200,
        limit_val_batches=2 if args.quick else 20,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    print(f"after {trainer.global_step} steps: val perplexity {metrics['val/ppl']:.1f}")
    return {
        "chunked_loss": float(chunked),
        "plain_loss": float(plain),
        "grad_error": grad_error,
        "val_ppl": float(metrics["val/ppl"]),
    }


if __name__ == "__main__":
    main()

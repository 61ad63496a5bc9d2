"""Bring your own model, tokenizer and data: LoRA fine-tuning in TRL's prompt–completion format, on-policy
distillation, then unlearning.

    python examples/llm/train.py           # 2 × 128 GPT-2, 2,048-token BPE, 2,000 exchanges of the plays
    python examples/llm/train.py --quick   # 2 × 64 GPT-2, 512 tokens, 320 exchanges: well under a minute

Everything runs offline on the Shakespeare plays rendered as prompt–completion pairs (one speech as the prompt, the
reply as the completion: ``shakespeare_examples("prompt_completion")``); any list of dicts, ``datasets.Dataset``
or JSON-lines file in a TRL format takes their place, and any Hugging Face tokenizer (``--tokenizer <folder>``)
takes the place of the plays' BPE.

1. Build a small GPT-2 from a config, train it briefly on the exchanges as text (a stand-in for the pretrained
   checkpoint a user starts from), then fine-tune it with LoRA (a ``peft.LoraConfig``) on forget and retain exchanges
   (``TextDataModule``: completion tokens learnt, prompts masked), merge the adapter and save the model as a
   ``save_pretrained`` folder (``<output>/finetuned``, the teacher :func:`load_teacher` reads back) and as a
   ``state_dict`` (``<output>/finetuned.pt``, for ``config.yaml``).
2. Distil the fine-tuned model (the teacher) into a half-width student on-policy (GKD,
   ``CausalLMDistillationModule``, λ = 0.5: on half of the steps the student writes the completions of the prompts,
   ``TextDataModule(return_prompts=True)`` gives them left-padded) and report the held-out JSD before and after.
3. Unlearn the exchanges of one play (Hamlet) with NPO and a retain NLL term (``npo_rt``) through a fresh LoRA
   adapter (``UnlearningModule`` on ``UnlearningDataModule(forget_data=..., retain_data=..., tokenizer=...)``), and
   report the forget / retain / held-out NLL before and after.

The forget and retain sets are written as JSON lines and the tokenizer with ``save_pretrained``, so the same
unlearning runs from the LightningCLI config:

    lightning-losses lightning fit --config examples/llm/config.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses import CausalLMDistillationModule, UnlearningEvaluation, UnlearningModule
from lightning_losses.data import UnlearningDataModule
from lightning_losses.data.shakespeare import shakespeare_examples, shakespeare_hf_tokenizer
from lightning_losses.data.text import TextDataModule, resolve_tokenizer
from lightning_losses.demos import build_gpt2
from lightning_losses.integrations.peft import lora_model
from lightning_losses.integrations.teachers import load_teacher
from lightning_losses.integrations.tokenization import padding_token_id

TRAINER: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)


class SFTModule(pl.LightningModule):
    """Supervised fine-tuning: the causal LM's own loss on the labelled (completion) tokens of dict batches."""

    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs).loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write examples as JSON lines (the file format ``UnlearningDataModule`` and ``TextDataModule`` read)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def evaluate(module: pl.LightningModule, datamodule: UnlearningDataModule) -> dict[str, Any]:
    """NLL per split (and membership-inference AUC) of ``module``'s model, by ``UnlearningEvaluation``."""
    evaluation = UnlearningEvaluation()
    pl.Trainer(callbacks=[evaluation], enable_progress_bar=False, **TRAINER).validate(
        module, dataloaders=datamodule.val_dataloader(), verbose=False
    )
    return dict(evaluation.last)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and data set: well under a minute")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (save_pretrained); default: plays BPE")
    parser.add_argument("--forget-play", default="Hamlet", help="the play whose exchanges are unlearnt")
    parser.add_argument("--method", default="npo_rt", help="unlearning method: ga, graddiff, npo, npo_rt, simnpo, ...")
    parser.add_argument("--output", default="results/examples/llm", help="where models, data and tokenizer go")
    parser.add_argument("--cache-dir", default="results/cache", help="where the plays' BPE is cached")
    args = parser.parse_args(argv)
    n_forget, n_retain, vocab, width, epochs = (64, 256, 512, 64, 3) if args.quick else (400, 1600, 2048, 128, 8)
    max_length, max_chars = 128, 160  # speeches cut to about 160 characters fit 128 tokens with their reply
    new_tokens = 24  # what the on-policy student writes after a prompt: the models get positions for it
    start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    # 0. a tokenizer (any Hugging Face one) and prompt-completion data in TRL's format
    if args.tokenizer is None:
        tokenizer = shakespeare_hf_tokenizer(vocab, args.cache_dir)
    else:
        tokenizer = resolve_tokenizer(args.tokenizer)
    tokenizer.save_pretrained(str(output / "tokenizer"))
    forget = shakespeare_examples(plays=[args.forget_play], max_examples=n_forget, max_chars=max_chars)
    titles = sorted({e["play"] for e in shakespeare_examples(max_chars=max_chars)} - {forget[0]["play"]})
    retain = shakespeare_examples(plays=titles, max_examples=n_retain, max_chars=max_chars, seed=1)
    # "play" and "index" are informative columns; the modules number examples themselves
    forget = [{"prompt": e["prompt"], "completion": e["completion"]} for e in forget]
    retain = [{"prompt": e["prompt"], "completion": e["completion"]} for e in retain]
    write_jsonl(forget, output / "forget.jsonl")
    write_jsonl(retain, output / "retain.jsonl")

    # 1. a GPT-2 built from a config; no pretrained checkpoint works offline, so a short full-weight run on the
    #    exchanges as plain text stands in for one (a LoRA adapter cannot move a random network far)
    model = build_gpt2(len(tokenizer), n_layer=2, n_embd=width, n_head=4, block_size=max_length + new_tokens)
    text = [{"text": e["prompt"] + e["completion"]} for e in forget + retain]
    base_data = TextDataModule(tokenizer, train_data=text, batch_size=16, max_length=max_length, val_fraction=0.0)
    pl.Trainer(max_epochs=epochs, enable_progress_bar=False, **TRAINER).fit(SFTModule(model), datamodule=base_data)

    #    then LoRA fine-tuning (a peft.LoraConfig) in the prompt-completion format: only completions are learnt
    peft = __import__("peft")
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
    sft_data = TextDataModule(tokenizer, train_data=forget + retain, batch_size=16, max_length=max_length)
    sft = SFTModule(lora_model(model, config=config), lr=3e-3)
    sft_trainer = pl.Trainer(max_epochs=epochs, enable_progress_bar=False, **TRAINER)
    sft_trainer.fit(sft, datamodule=sft_data)
    finetuned = sft.model.merge_and_unload()  # type: ignore[operator]
    finetuned.save_pretrained(str(output / "finetuned"))
    torch.save(finetuned.state_dict(), output / "finetuned.pt")
    teacher = load_teacher(output / "finetuned")  # the fine-tuned model, frozen: a teacher for distillation

    # 2. distil the fine-tuned model into a half-width student on-policy (GKD): on half of the steps the student
    #    writes the completions of the prompts and the JSD to the teacher is taken on the written tokens only
    student = build_gpt2(len(tokenizer), n_layer=1, n_embd=width // 2, n_head=4, block_size=max_length + new_tokens)
    gkd_data = TextDataModule(
        tokenizer, train_data=forget + retain, batch_size=16, max_length=max_length, return_prompts=True
    )
    gkd = CausalLMDistillationModule(
        student,
        teacher,
        lmbda=0.5,
        max_new_tokens=new_tokens,
        lr=3e-3,
        pad_token_id=padding_token_id(tokenizer),  # its pad token, else EOS (an id of 0 is a valid pad)
        eos_token_id=tokenizer.eos_token_id,
    )
    gkd_trainer = pl.Trainer(max_epochs=1 if args.quick else 3, enable_progress_bar=False, **TRAINER)
    (gkd_before,) = gkd_trainer.validate(gkd, datamodule=gkd_data, verbose=False)
    gkd_trainer.fit(gkd, datamodule=gkd_data)
    (gkd_after,) = gkd_trainer.validate(gkd, datamodule=gkd_data, verbose=False)
    jsd = f"{gkd_before['val/jsd']:.4f} -> {gkd_after['val/jsd']:.4f}"
    print(f"on-policy distillation: held-out JSD of the student to the teacher {jsd}")

    # 3. unlearn the forget play through a fresh LoRA adapter; the reference is the disabled adapter
    datamodule = UnlearningDataModule(
        forget_data=output / "forget.jsonl",
        retain_data=output / "retain.jsonl",
        tokenizer=tokenizer,
        batch_size=8,
        max_length=max_length,
        max_eval_blocks=64,
    )
    datamodule.setup("fit")
    module = UnlearningModule(lora_model(finetuned, r=8), method=args.method, lr=1e-3 if args.quick else 5e-4)
    before = evaluate(module, datamodule)
    pl.Trainer(max_epochs=2 if args.quick else 4, limit_val_batches=0, **TRAINER).fit(module, datamodule=datamodule)
    after = evaluate(module, datamodule)
    for split in ("forget", "retain", "heldout"):
        print(f"{split} NLL per answer token: {before[f'{split}_nll']:.3f} -> {after[f'{split}_nll']:.3f}")
    print(f"fine-tuned model, tokenizer and data written to {output} ({time.perf_counter() - start:.0f} s)")
    result = {f"{k}_{when}": float(v) for when, r in (("before", before), ("after", after)) for k, v in r.items()}
    result["sft_loss"] = float(sft_trainer.callback_metrics["train/loss"])
    result["teacher_parameters"] = float(sum(p.numel() for p in teacher.parameters()))
    result["gkd_jsd_before"], result["gkd_jsd_after"] = float(gkd_before["val/jsd"]), float(gkd_after["val/jsd"])
    return result


if __name__ == "__main__":
    main()

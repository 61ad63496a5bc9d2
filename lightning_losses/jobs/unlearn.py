"""``lightning-losses unlearn``: forget one Shakespeare play from a small GPT-2 with GA, GradDiff, NPO, NPO-RT,
SimNPO and FLAT through LoRA, and compare with a model never trained on it.

1. Train the *original* model on the forget set (blocks of one play) and the retain set (blocks of the others), and
   the *retain model* on the retain set alone — both cached under ``--output`` so a second run skips them.
2. For each method: wrap the original model in a fresh LoRA adapter and unlearn with :class:`UnlearningModule`
   (forget and retain batches combined per step; NPO's reference precomputed once).
3. Evaluate every model with :class:`UnlearningEvaluation`: token NLL on forget / retain / held-out blocks, the
   min-k%++ membership-inference AUC (forget vs held-out), and forget quality (KS-test p-value of the per-sample
   LOSS statistic on the forget set against the retain model's), plus wall time and peak memory of unlearning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader

from lightning_losses.jobs.common import ResultsTable, Timer, make_trainer

METHODS = ("ga", "graddiff", "npo", "npo_rt", "simnpo", "flat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model and data: under two minutes on 2 cores")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--forget-play", default="Hamlet", help="the play to forget")
    parser.add_argument("--base-epochs", type=int, default=None, help="epochs of the original / retain models")
    parser.add_argument("--unlearn-epochs", type=int, default=None, help="passes over the forget set per method")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of the LoRA adapter")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/unlearn", help="folder of the cached models and the table")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        cfg = dict(block=64, vocab=512, layers=2, width=64, heads=2, forget=32, retain=128, eval=32, batch=8)
        cfg.update(base_epochs=25, unlearn_epochs=4)
    else:
        cfg = dict(block=128, vocab=2048, layers=4, width=128, heads=4, forget=128, retain=1024, eval=128, batch=8)
        cfg.update(base_epochs=8, unlearn_epochs=5)
    if args.base_epochs is not None:
        cfg["base_epochs"] = args.base_epochs
    if args.unlearn_epochs is not None:
        cfg["unlearn_epochs"] = args.unlearn_epochs
    cfg.update(play=args.forget_play, seed=args.seed)
    return cfg


class _PeakRSS:
    """Samples the resident set size in a thread; ``peak_mib`` is the peak above the RSS at entry (CPU runs).

    On CUDA the peak of ``torch.cuda.max_memory_allocated`` is used instead.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_mib = interval, float("nan")
        self._stop = threading.Event()
        self._base = self._peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mib = (self._peak - self._base) / 2**20


def _train_lm(model: nn.Module, data: Any, epochs: int, batch: int, seed: int, progress: bool) -> None:
    import lightning.pytorch as pl

    from lightning_losses.jobs.language import CausalLMModule

    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    module = CausalLMModule(model, lr=3e-3, weight_decay=0.01)
    make_trainer(epochs, progress=progress).fit(module, train_dataloaders=loader)


def _cached_model(path: Path, cfg: dict[str, Any], data: Any, progress: bool, label: str) -> nn.Module:
    from lightning_losses.jobs.language import build_gpt2

    model = build_gpt2(cfg["vocab"], cfg["layers"], cfg["width"], cfg["heads"], cfg["block"], seed=cfg["seed"])
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"[unlearn] loaded the cached {label} from {path}")
        return model
    print(f"[unlearn] training the {label} ({len(data)} blocks x {cfg['base_epochs']} epochs)")
    _train_lm(model, data, cfg["base_epochs"], cfg["batch"], cfg["seed"], progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def _evaluate(module: Any, val: list[DataLoader], reference: Tensor | None, progress: bool) -> dict[str, float]:
    from lightning_losses.callbacks.unlearning import UnlearningEvaluation

    callback = UnlearningEvaluation(reference_statistics=reference)
    trainer = make_trainer(1, progress=progress, callbacks=[callback])
    trainer.validate(module, dataloaders=val, verbose=False)
    results = dict(callback.last)
    results["_forget_loss"] = callback.metrics["forget"].compute()["loss"].cpu()  # type: ignore[assignment]
    return results


def _row(table: ResultsTable, name: str, r: dict[str, Any], seconds: float, peak: float) -> None:
    fq = r.get("forget_quality")
    table.add(
        method=name,
        forget_nll=f"{r['forget_nll']:.3f}",
        retain_nll=f"{r['retain_nll']:.3f}",
        heldout_nll=f"{r['heldout_nll']:.3f}",
        mia_auc=f"{r.get('mia_auc_min_k_plus_plus', float('nan')):.3f}",
        forget_quality="n/a" if fq is None else f"{fq:.2e}",
        time_s="-" if seconds != seconds else f"{seconds:.1f}",
        peak_mib="-" if peak != peak else f"{peak:.0f}",
    )


def run(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl

    from lightning_losses.data.unlearning import UnlearningDataModule
    from lightning_losses.integrations.peft import lora_model
    from lightning_losses.modules.unlearning import UnlearningModule

    cfg = _config(args)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = sorted(set(methods) - set(METHODS) - {"npo_kl", "graddiff_kl", "idkdpo"})
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
    progress = not args.no_progress
    out = Path(args.output)
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    cache = out / "cache" / key
    dm = UnlearningDataModule(
        forget_play=cfg["play"],
        block_size=cfg["block"],
        batch_size=cfg["batch"],
        vocab_size=cfg["vocab"],
        max_forget_blocks=cfg["forget"],
        max_retain_blocks=cfg["retain"],
        max_eval_blocks=cfg["eval"],
        seed=cfg["seed"],
    )
    dm.setup("fit")
    forget, retain = dm.split("forget"), dm.split("retain")
    original = _cached_model(cache / "original.pt", cfg, ConcatDataset([forget, retain]), progress, "original model")
    retain_model = _cached_model(cache / "retain.pt", cfg, retain, progress, "retain model")
    val = dm.val_dataloader()

    table = ResultsTable(
        f"Unlearning '{cfg['play']}' from a {cfg['layers']}-layer, {cfg['width']}-wide GPT-2 (LoRA r={args.lora_rank})",
        ["method", "forget_nll", "retain_nll", "heldout_nll", "mia_auc", "forget_quality", "time_s", "peak_mib"],
    )
    retain_eval = _evaluate(UnlearningModule(retain_model, method="ga"), val, None, progress)
    reference = retain_eval.pop("_forget_loss")
    assert isinstance(reference, Tensor)
    original_eval = _evaluate(UnlearningModule(original, method="ga"), val, reference, progress)
    _row(table, "original (before unlearning)", original_eval, float("nan"), float("nan"))
    retain_eval["forget_quality"] = float("nan")
    _row(table, "retain model (target)", retain_eval, float("nan"), float("nan"))
    for method in methods:
        pl.seed_everything(cfg["seed"], verbose=False)
        base = _cached_model(cache / "original.pt", cfg, None, False, "original model")
        module = UnlearningModule(lora_model(base, r=args.lora_rank), method=method, lr=args.lr)
        trainer = make_trainer(cfg["unlearn_epochs"], progress=progress, limit_val_batches=0)
        with Timer() as timer, _PeakRSS() as peak:
            trainer.fit(module, train_dataloaders=dm.train_dataloader())
        result = _evaluate(module, val, reference, progress)
        _row(table, method, result, timer.seconds, peak.peak_mib)
        print(f"[unlearn] {method}: {table.rows[-1]}")
    preamble = (
        f"Forget set: {len(forget)} blocks of {cfg['play']} ({cfg['block']} tokens each); retain: {len(retain)} blocks "
        f"of the other plays; evaluation on {cfg['eval']} blocks per split. NLL per token (higher on forget = more "
        "forgotten); mia_auc: min-k%++ attack, forget vs held-out (the retain model's value is the target); "
        "forget_quality: KS-test p-value against the retain model (higher is better). time_s / peak_mib: unlearning "
        "run (peak resident memory above the start on CPU)."
    )
    path = table.write(out, "unlearn-quick" if args.quick else "unlearn", preamble)
    print(table.markdown())
    print(f"[unlearn] table written to {path}")
    return 0

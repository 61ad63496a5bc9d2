"""``lightning-losses unlearn``: forget one Shakespeare play from a small GPT-2 with GA, GradDiff, NPO, NPO-RT,
SimNPO, FLAT, WGA, SatImp, CE-U, UNDIAL and RMU through LoRA, and compare with a model never trained on it.

1. Pretrain a model on the retain set (blocks of the other plays), then continue from it twice on the same retain
   draws: the *original* model with forget draws (blocks of one play) on top, so that it memorises them as TOFU's
   fine-tuned model memorises its fictitious authors, and the *retain model* without — all cached under ``--output``
   (keyed by the recipe) so a second run skips them.
2. For each method: wrap the original model in a fresh LoRA adapter (on every linear layer by default) and unlearn
   with :class:`UnlearningModule` (forget and retain batches combined per step; NPO's reference precomputed once).
   NPO-RT and SimNPO depart from their paper hyperparameters (see :func:`_job_loss`; ``--paper-defaults`` restores
   them).
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
from torch.utils.data import ConcatDataset, DataLoader, WeightedRandomSampler

from lightning_losses.jobs.common import ResultsTable, Timer, TimeSplit, make_trainer, quiet_lightning, report

METHODS = ("ga", "graddiff", "npo", "npo_rt", "simnpo", "flat", "wga", "satimp", "ceu", "undial", "rmu")
EXTRA_METHODS = ("npo_kl", "graddiff_kl", "idkdpo", "altpo")  # by name only: they need a KL reference or alternates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model and data: under two minutes on 2 cores")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--forget-play", default="Hamlet", help="the play to forget")
    parser.add_argument("--base-epochs", type=int, default=None, help="pretraining epochs over the retain set")
    parser.add_argument(
        "--memorise-epochs",
        type=int,
        default=None,
        help="epochs of the forget-memorising (and retain-only) continuation",
    )
    parser.add_argument("--unlearn-epochs", type=int, default=None, help="passes over the forget set per method")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA adapter")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--lora-targets", default="c_attn,c_proj,c_fc", help="comma-separated GPT-2 linear layers given LoRA adapters"
    )
    parser.add_argument(
        "--paper-defaults",
        action="store_true",
        help="every method with its paper hyperparameters (no NPO-RT / RMU retain weight or SimNPO margin of this job)",
    )
    parser.add_argument(
        "--npo-betas",
        default=None,
        help="comma-separated β of the NPO-RT trade-off sweep (default 0.03,0.1,0.3,1; quick and 'none': no sweep)",
    )
    parser.add_argument(
        "--normalized-npo-betas",
        default=None,
        help="β of the length-normalised NPO-RT sweep (per-token log-ratio; default 1,3,10,30)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: small matrices, and no oversubscription of shared cores)",
    )
    parser.add_argument("--output", default="results/unlearn", help="folder of the cached models and the table")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any]
    if args.quick:
        cfg = dict(block=64, vocab=512, layers=2, width=64, heads=2, forget=32, retain=256, eval=32, batch=8)
        cfg.update(base_epochs=6, memorise_epochs=12, unlearn_epochs=10)
    else:
        cfg = dict(block=128, vocab=2048, layers=4, width=128, heads=4, forget=64, retain=1024, eval=64, batch=8)
        cfg.update(base_epochs=8, memorise_epochs=16, unlearn_epochs=10)
    for key in ("base_epochs", "memorise_epochs", "unlearn_epochs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    # the recipe of the cached models (pretrain on retain, then memorise forget / continue on retain)
    cfg.update(play=args.forget_play, seed=args.seed, recipe="pretrain, then forget draws on top of retain draws")
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


def _train_lm(model: nn.Module, loader: DataLoader, epochs: int, seed: int, progress: bool) -> None:
    import lightning.pytorch as pl

    from lightning_losses.demos import CausalLMModule

    pl.seed_everything(seed, verbose=False)
    module = CausalLMModule(model, lr=3e-3, weight_decay=0.01)
    make_trainer(epochs, progress=progress).fit(module, train_dataloaders=loader)


def _draws(datasets: list[Any], shares: list[float], num_samples: int, seed: int) -> DataLoader:
    """A loader drawing ``num_samples`` blocks per epoch with replacement, a ``shares[i]`` part from ``datasets[i]``."""
    weights = torch.cat([torch.full((len(d),), share / len(d)) for d, share in zip(datasets, shares)])
    sampler = WeightedRandomSampler(
        weights.tolist(), num_samples, replacement=True, generator=torch.Generator().manual_seed(seed)
    )
    return DataLoader(ConcatDataset(datasets), batch_size=16, sampler=sampler)


def _cached_model(
    path: Path, cfg: dict[str, Any], label: str, train: Any = None, start: nn.Module | None = None
) -> nn.Module:
    """The model cached at ``path``, else ``start`` (or a fresh model) trained by ``train(model)``, then saved."""
    from lightning_losses.demos import build_gpt2

    model = build_gpt2(cfg["vocab"], cfg["layers"], cfg["width"], cfg["heads"], cfg["block"], seed=cfg["seed"])
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"[unlearn] loaded the cached {label} from {path}")
        return model
    if train is None:
        raise FileNotFoundError(f"The {label} is not cached at {path}.")
    if start is not None:
        model.load_state_dict(start.state_dict())
    print(f"[unlearn] training the {label}")
    with Timer() as timer:
        train(model)
    print(f"[unlearn] trained the {label} in {timer.seconds:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def _base_models(cache: Path, cfg: dict[str, Any], forget: Any, retain: Any, progress: bool) -> tuple[Any, Any]:
    """Pretrain on retain; then, per epoch, ``2 F`` retain draws (retain model) or the same plus ``F`` forget draws
    (original model), ``F`` the number of forget blocks: both see the same retain data, only one the forget play."""
    seed, epochs, n = cfg["seed"], cfg["memorise_epochs"], len(forget)
    pretrain_loader = DataLoader(retain, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    pretrained = _cached_model(
        cache / "pretrained.pt",
        cfg,
        f"pretrained model ({len(retain)} retain blocks x {cfg['base_epochs']} epochs)",
        lambda m: _train_lm(m, pretrain_loader, cfg["base_epochs"], seed, progress),
    )
    original = _cached_model(
        cache / "original.pt",
        cfg,
        f"original model ({epochs} epochs of {n} forget + {2 * n} retain draws)",
        lambda m: _train_lm(m, _draws([forget, retain], [1 / 3, 2 / 3], 3 * n, seed + 1), epochs, seed + 1, progress),
        start=pretrained,
    )
    retain_model = _cached_model(
        cache / "retain.pt",
        cfg,
        f"retain model ({epochs} epochs of {2 * n} retain draws)",
        lambda m: _train_lm(m, _draws([retain], [1.0], 2 * n, seed + 2), epochs, seed + 2, progress),
        start=pretrained,
    )
    return original, retain_model


def _job_loss(method: str, paper_defaults: bool) -> Any:
    """This job's loss for ``method`` where it departs from the paper defaults, else ``None``.

    * NPO-RT: retain weight 10 instead of 1. NPO's forget term sums the log-probabilities of a block's 128 tokens
      while the retain term is a token mean, so 1:1 lets the forget gradient outweigh the retain one about 100 to 1
      (the papers' answers are a few dozen tokens); with 1 the retain NLL rose as much as the forget NLL.
    * SimNPO: margin δ = 4 nats per token and retain weight 3. With δ = 0 its gradient weight
      2·σ(−β·NLL) is about 3e-6 at this model's forget NLL of 3 (the paper's LLMs start
      near 0), so it leaves the model unchanged; δ = 4 pushes the forget NLL up to about 4 and then lets go.
    * RMU: retain weight 3 instead of open-unlearning's 1000 (c = 300 kept). The forget play and the retain plays are
      the same kind of text, so holding the retain activations at 1000× holds the forget ones too: the model is left
      unchanged (forget NLL 3.134, the original's); 10 and 100 barely move it, 1 forgets past the retain model
      (4.88) at +0.95 retain NLL, 3 gives about NPO-RT's trade-off.
    """
    from lightning_losses.losses.unlearning import NPOLoss, RMULoss, SimNPOLoss

    if paper_defaults:
        return None
    if method == "npo_rt":
        return NPOLoss(beta=0.1, retain_weight=10.0)
    if method == "simnpo":
        return SimNPOLoss(beta=4.5, delta=4.0, retain_weight=3.0)
    if method == "rmu":
        return RMULoss(retain_weight=3.0)
    return None


def _betas(text: str | None, default: str, quick: bool) -> list[float]:
    if text is None:
        text = "none" if quick else default
    if text == "none":
        return []
    try:
        return [float(b) for b in text.split(",") if b]
    except ValueError:
        raise SystemExit(f"β values must be comma-separated numbers, got {text!r}.") from None


def _sweep_loss(beta: float, normalized: bool) -> Any:
    """NPO-RT at ``beta``, with the log-ratio summed or averaged over the answer's tokens.

    Summed over a 127-token block, the gradient weight 2σ(β·Σ log-ratio) is 0.0185 after +0.37 nats per token at
    β = 0.1, so plain NPO stops long before the retain model; the per-token mean keeps β·|y| constant. The retain
    weight follows the forget term's scale: 10 against the summed log-ratio (see :func:`_job_loss`), 1 against the
    per-token mean, where both terms are token means.
    """
    from lightning_losses.losses.unlearning import NPOLoss

    return NPOLoss(beta=beta, retain_weight=1.0 if normalized else 10.0, length_normalize=normalized)


def _trade_off_plot(
    points: dict[str, list[tuple[float, float, float]]], target: tuple[float, float], path: Path
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"no trade-off plot: {err}")
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, series in points.items():
        ax.plot([p[1] for p in series], [p[2] for p in series], marker="o", label=label)
        for beta, x, y in series:
            ax.annotate(f"β={beta:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([target[0]], [target[1]], marker="*", s=120, color="k", label="retain model (target)")
    ax.set_xlabel("retain NLL per token (lower is better)")
    ax.set_ylabel("forget NLL per token (target: the retain model's)")
    ax.set_title("NPO-RT: forget / retain trade-off over β")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _evaluate(module: Any, val: list[DataLoader], reference: Tensor | None, progress: bool) -> dict[str, float]:
    from lightning_losses.callbacks.unlearning import UnlearningEvaluation

    callback = UnlearningEvaluation(reference_statistics=reference)
    trainer = make_trainer(1, progress=progress, callbacks=[callback])
    trainer.validate(module, dataloaders=val, verbose=False)
    results = dict(callback.last)
    results["_forget_loss"] = callback.metrics["forget"].compute()["loss"].cpu()  # type: ignore[assignment]
    return results


def _row(table: ResultsTable, name: str, r: dict[str, Any], seconds: float, peak: float) -> None:
    table.add(
        method=name,
        forget_nll=float(r["forget_nll"]),
        retain_nll=float(r["retain_nll"]),
        heldout_nll=float(r["heldout_nll"]),
        mia_auc=float(r.get("mia_auc_min_k_plus_plus", float("nan"))),
        forget_quality=None if r.get("forget_quality") is None else float(r["forget_quality"]),
        time_s=seconds,
        peak_mib=peak,
    )


FORMATS = {
    "forget_nll": ".3f",
    "retain_nll": ".3f",
    "heldout_nll": ".3f",
    "mia_auc": ".3f",
    "forget_quality": ".2e",
    "time_s": ".1f",
    "peak_mib": ".0f",
}


@quiet_lightning()
def run(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl

    from lightning_losses.data.unlearning import UnlearningDataModule
    from lightning_losses.integrations.peft import lora_model
    from lightning_losses.modules.unlearning import UnlearningModule

    split = TimeSplit()
    cfg = _config(args)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = sorted(set(methods) - set(METHODS) - set(EXTRA_METHODS))
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {', '.join(METHODS + EXTRA_METHODS)}.")
    progress = not args.no_progress
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    base_recipe = {k: v for k, v in cfg.items() if k != "unlearn_epochs"}
    key = hashlib.sha1(json.dumps(base_recipe, sort_keys=True).encode()).hexdigest()[:10]
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
    with split.phase("data loading"):
        dm.setup("fit")
    forget, retain = dm.split("forget"), dm.split("retain")
    with split.phase("training/base models (or their cache)"):
        original, retain_model = _base_models(cache, cfg, forget, retain, progress)
    val = dm.val_dataloader()

    table = ResultsTable(
        f"Unlearning '{cfg['play']}' from a {cfg['layers']}-layer, {cfg['width']}-wide GPT-2 (LoRA r={args.lora_rank})",
        ["method", "forget_nll", "retain_nll", "heldout_nll", "mia_auc", "forget_quality", "time_s", "peak_mib"],
        formats=FORMATS,
    )
    with split.phase("evaluation"):
        retain_eval = _evaluate(UnlearningModule(retain_model, method="ga"), val, None, progress)
        reference = retain_eval.pop("_forget_loss")
        assert isinstance(reference, Tensor)
        original_eval = _evaluate(UnlearningModule(original, method="ga"), val, reference, progress)
    _row(table, "original (before unlearning)", original_eval, float("nan"), float("nan"))
    retain_eval["forget_quality"] = float("nan")
    _row(table, "retain model (target)", retain_eval, float("nan"), float("nan"))

    def unlearn(name: str, method: str, loss: Any) -> dict[str, Any]:
        """One unlearning run from a fresh LoRA adapter on the original model; its row of the table."""
        pl.seed_everything(cfg["seed"], verbose=False)
        base = _cached_model(cache / "original.pt", cfg, "original model")
        adapter = lora_model(base, r=args.lora_rank, target_modules=[t for t in args.lora_targets.split(",") if t])
        module = UnlearningModule(adapter, method=method, loss=loss, lr=args.lr)
        trainer = make_trainer(cfg["unlearn_epochs"], progress=progress, limit_val_batches=0)
        with split.phase("training/unlearning runs") as timer, _PeakRSS() as peak:
            trainer.fit(module, train_dataloaders=dm.train_dataloader())
        with split.phase("evaluation"):
            scores = _evaluate(module, val, reference, progress)
        _row(table, name, scores, timer.seconds, peak.peak_mib)
        row = table.rows[-1]
        print(
            f"[unlearn] {name}: forget NLL {row['forget_nll']:.3f}, retain NLL {row['retain_nll']:.3f} "
            f"({timer.seconds:.1f} s)"
        )
        return row

    for method in methods:
        unlearn(method, method, _job_loss(method, args.paper_defaults))
    sweeps = {
        "NPO-RT, Σ log-ratio": (_betas(args.npo_betas, "0.03,0.1,0.3,1", args.quick), False),
        "NPO-RT, mean log-ratio per token": (_betas(args.normalized_npo_betas, "1,3,10,30", args.quick), True),
    }
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for label, (betas, normalized) in sweeps.items():
        for beta in betas:
            row = unlearn(f"{label}, β = {beta:g}", "npo_rt", _sweep_loss(beta, normalized))
            curves.setdefault(label, []).append((beta, row["retain_nll"], row["forget_nll"]))
    written: list[Path] = []
    if curves:
        target = (float(retain_eval["retain_nll"]), float(retain_eval["forget_nll"]))
        plot = out / ("trade_off-quick.png" if args.quick else "trade_off.png")
        if _trade_off_plot(curves, target, plot):
            written.append(plot)
    preamble = (
        f"Forget set: {len(forget)} blocks of {cfg['play']} ({cfg['block']} tokens each); retain: {len(retain)} blocks "
        f"of the other plays; evaluation on {cfg['eval']} blocks per split. Original model: pretrained on the retain "
        f"blocks ({cfg['base_epochs']} epochs), then {cfg['memorise_epochs']} epochs of forget + retain draws; retain "
        "model: the same retain draws without the forget play. Unlearning: LoRA r="
        f"{args.lora_rank} on {args.lora_targets}, AdamW lr {args.lr}, {cfg['unlearn_epochs']} passes over the forget "
        "set"
        + (
            " (paper hyperparameters)"
            if args.paper_defaults
            else " (NPO-RT retain weight 10; SimNPO δ = 4, retain weight 3; RMU retain weight 3; others at paper "
            "defaults)"
        )
        + ". NLL per token (higher on forget = more "
        "forgotten); mia_auc: min-k%++ attack, forget vs held-out (the retain model's value is the target); "
        "forget_quality: KS-test p-value against the retain model (higher is better). time_s / peak_mib: unlearning "
        "run (peak resident memory above the start on CPU). The β rows sweep NPO-RT with the log-ratio summed over "
        "each block (the paper's form, retain weight 10) and averaged per token (β·|y| held constant, retain weight "
        "1: both terms token means), the forget / retain trade-off."
    )
    path = table.write(out, "unlearn-quick" if args.quick else "unlearn", preamble)
    report(table, preamble, [path, path.with_suffix(".json"), *written, cache], split)
    return 0

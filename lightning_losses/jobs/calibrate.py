"""``lightning-losses calibrate``: post-hoc calibrators and train-time calibration losses on MNIST 5k.

Trains a CNN with cross-entropy (SGD with momentum, no weight decay, no augmentation; the table says whether it
came out over- or under-confident, from the fitted temperature), fits every post-hoc
calibrator on the validation split (temperature scaling through the ``PostHocCalibration`` callback, the others
from the collected logits), trains the same CNN with each train-time calibration loss (through
``ClassificationModule(model, loss=...)``), and reports test ECE / equal-mass ECE / classwise ECE / NLL / Brier /
accuracy.
Reliability diagrams (PNG) and the table go under ``results/calibrate/``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_losses.callbacks.calibration import CALIBRATORS, PostHocCalibration, reliability_diagram
from lightning_losses.callbacks.conformal import ConformalPrediction
from lightning_losses.demos import ConvNet, image_datamodule
from lightning_losses.functional.calibration import (
    brier_score,
    calibration_bins,
    classwise_calibration_error,
    expected_calibration_error,
    negative_log_likelihood,
)
from lightning_losses.jobs.common import (
    PairedDifference,
    ResultsTable,
    TimeSplit,
    bootstrap_interval,
    make_trainer,
    quiet_lightning,
    report,
)
from lightning_losses.losses.calibration import CALIBRATION_LOSSES
from lightning_losses.modules.classification import ClassificationModule
from lightning_losses.nn.calibration import Calibrator, CorrectnessAwareCalibrator, PlattScaler, TemperatureScaler
from lightning_losses.utilities.batches import unpack_batch

# Platt scaling is for binary problems; the CA calibrator appears twice: its official class-balanced weighting (its
# optimum is the balanced posterior, under-confident when the validation accuracy is far above 0.5) and unweighted.
POST_HOC = tuple(name for name in CALIBRATORS if name != "platt")
LOSSES = tuple(CALIBRATION_LOSSES)


def calibration_classifier(loss: str = "ce", width: int = 16, lr: float = 0.1) -> ClassificationModule:
    """A ConvNet trained with cross-entropy (``loss="ce"``) or one of the train-time calibration losses.

    SGD with momentum 0.9, no weight decay and a cosine-decayed learning rate, trained until the training loss is
    near zero: the regime in which deep networks come out over-confident (Guo et al. 2017) and in which the
    calibration papers evaluate their losses. (A constant rate of 0.1 can end on a loss spike, far from zero.)
    """
    net = ConvNet(width=width)
    return ClassificationModule(
        net,
        loss=None if loss == "ce" else CALIBRATION_LOSSES[loss](),
        optimizer="sgd",
        lr=lr,
        momentum=0.9,
        weight_decay=0.0,
        scheduler="cosine",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small model, 1000 training images, 2 losses")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 40, quick 30)")
    parser.add_argument(
        "--train-subset", type=int, default=None, help="training images used (default all 2500, quick 1000)"
    )
    parser.add_argument("--calibrators", default=None, help=f"comma-separated subset of {','.join(POST_HOC)}")
    parser.add_argument("--losses", default=None, help=f"comma-separated subset of {','.join(LOSSES)} (or 'none')")
    parser.add_argument("--data", choices=("auto", "mnist", "digits"), default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=None, help="ConvNet width (default 16, quick 8)")
    parser.add_argument(
        "--reg", type=float, default=0.1, help="ODIR strength of the matrix and Dirichlet calibrators (off-diag, bias)"
    )
    parser.add_argument("--n-bins", type=int, default=15, help="bins of the ECE")
    parser.add_argument("--output", default="results/calibrate", help="folder of the table and diagrams")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


@torch.no_grad()
def _collect(
    model: pl.LightningModule, loader: Any, ca: CorrectnessAwareCalibrator | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    model.eval()
    logits: list[Tensor] = []
    targets: list[Tensor] = []
    copies: list[Tensor] = []
    for batch in loader:
        x, y, _ = unpack_batch(batch)
        assert y is not None
        logits.append(model(x))
        targets.append(y)
        if ca is not None:
            copies.append(ca.transformed_logits(model, x))
    return torch.cat(logits), torch.cat(targets), (torch.cat(copies, dim=1) if copies else None)


FORMATS = {"ECE-em %": ".2f", "cw-ECE %": ".3f", "NLL": ".4f", "Brier": ".4f", "acc %": ".2f"}
ECE_COLUMN, DELTA_COLUMN = "ECE % [95 % CI]", "Δ ECE vs uncalibrated, pp [95 % CI]"
#: Conformal prediction sets on the cross-entropy model's logits: miscoverage α and the methods of the table.
CONFORMAL_ALPHA = 0.1
CONFORMAL = {"thr": "THR", "aps": "APS (randomised)", "raps": "RAPS (randomised, λ = 0.01, k_reg = 5)"}
COVERAGE_COLUMN, SET_SIZE_COLUMN = "coverage %", "set size"
SCORE_COLUMNS = (ECE_COLUMN, DELTA_COLUMN, "ECE-em %", "cw-ECE %", "NLL", "Brier", "acc %")
# Validation and test splits of 25 % each (1,250 MNIST images): a calibrator is fitted on enough errors to be
# estimated, and the test ECE's bootstrap interval is narrow enough to tell calibrators apart.
VAL_FRACTION = TEST_FRACTION = 0.25


def _ece(logits: Tensor, target: Tensor, n_bins: int) -> float:
    return 100 * float(expected_calibration_error(logits, target, n_bins, input_type="logits"))


def _ece_interval(logits: Tensor, target: Tensor, n_bins: int) -> str:
    low, high = bootstrap_interval(lambda i: _ece(logits[i], target[i], n_bins), len(target))
    return f"{_ece(logits, target, n_bins):.2f} [{low:.2f}, {high:.2f}]"


def _ece_change(logits: Tensor, reference: Tensor, target: Tensor, n_bins: int) -> PairedDifference:
    """Test ECE of ``logits`` minus that of ``reference``, with a paired bootstrap interval (same resamples)."""
    low, high = bootstrap_interval(
        lambda i: _ece(logits[i], target[i], n_bins) - _ece(reference[i], target[i], n_bins), len(target)
    )
    return PairedDifference(_ece(logits, target, n_bins) - _ece(reference, target, n_bins), low, high, len(target))


def _scores(logits: Tensor, target: Tensor, n_bins: int, reference: Tensor | None = None) -> dict[str, Any]:
    equal_mass = expected_calibration_error(logits, target, n_bins, binning="quantile", input_type="logits")
    return {
        ECE_COLUMN: _ece_interval(logits, target, n_bins),
        DELTA_COLUMN: None if reference is None else _ece_change(logits, reference, target, n_bins),
        "ECE-em %": 100 * float(equal_mass),
        "cw-ECE %": 100 * float(classwise_calibration_error(logits, target, n_bins, input_type="logits")),
        "NLL": float(negative_log_likelihood(logits, target, "logits")),
        "Brier": float(brier_score(logits, target, "logits")),
        "acc %": 100 * float((logits.argmax(1) == target).float().mean()),
    }


def _diagram(logits: Tensor, target: Tensor, n_bins: int, title: str, path: Path) -> bool:
    try:
        fig = reliability_diagram(*calibration_bins(logits, target, n_bins, input_type="logits"), title=title)
    except ImportError as err:  # matplotlib missing: the table is still written
        print(f"no reliability diagram: {err}")
        return False
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return True


def _choices(text: str | None, default: tuple[str, ...], allowed: tuple[str, ...], what: str) -> list[str]:
    if text is None:
        return list(default)
    if text == "none":
        return []
    chosen = [t for t in text.split(",") if t]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise SystemExit(f"Unknown {what} {unknown}: choose from {','.join(allowed)}.")
    return chosen


@quiet_lightning()
def run(args: argparse.Namespace) -> int:
    epochs = args.epochs or (30 if args.quick else 40)
    width = args.width or (8 if args.quick else 16)
    subset = args.train_subset or (1000 if args.quick else None)
    calibrators = _choices(args.calibrators, POST_HOC, POST_HOC, "calibrators")
    quick_losses = ("focal", "mdca")
    losses = _choices(args.losses, quick_losses if args.quick else LOSSES, LOSSES, "losses")
    progress = not args.no_progress
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    split = TimeSplit()
    pl.seed_everything(0, verbose=False)
    with split.phase("data loading"):
        datamodule = image_datamodule(
            args.data, args.batch_size, train_subset=subset, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION
        )
        datamodule.setup("fit")
    val_loader, test_loader = datamodule.val_dataloader(), datamodule.test_dataloader()
    table = ResultsTable(
        "Calibration on " + type(datamodule).__name__.replace("DataModule", ""),
        ["method", "kind", *SCORE_COLUMNS, "fit s", COVERAGE_COLUMN, SET_SIZE_COLUMN],
        formats={
            **FORMATS,
            "fit s": lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}",
            COVERAGE_COLUMN: ".2f",
            SET_SIZE_COLUMN: ".2f",
        },
    )
    no_sets = {COVERAGE_COLUMN: None, SET_SIZE_COLUMN: None}
    diagrams: list[Path] = []

    # 1. the over-confident reference model; temperature scaling and the conformal sets fitted by callbacks after fit
    model = calibration_classifier("ce", width=width)
    posthoc = PostHocCalibration("temperature")
    conformal = {
        name: ConformalPrediction(alpha=CONFORMAL_ALPHA, method=name, prefix=f"conformal_{name}/")  # type: ignore[arg-type]
        for name in CONFORMAL
    }
    with split.phase("training/CE + temperature") as timer:
        trainer = make_trainer(epochs, progress=progress, callbacks=[posthoc, *conformal.values()])
        trainer.fit(model, datamodule=datamodule)
    fitted = posthoc.metrics
    print(
        f"cross-entropy model trained in {timer.seconds:.1f} s; temperature scaling on the validation split: "
        f"ECE {100 * fitted['ece_before']:.2f} % -> {100 * fitted['ece_after']:.2f} %"
    )
    with split.phase("evaluation"):
        test_logits, test_y, _ = _collect(model, test_loader)
        train_logits, train_y, _ = _collect(model, datamodule.train_dataloader())  # type: ignore[attr-defined]
    train_nll = float(negative_log_likelihood(train_logits, train_y, "logits"))
    table.add(
        method="uncalibrated (CE)", kind="-", **_scores(test_logits, test_y, args.n_bins), **{"fit s": None}, **no_sets
    )
    if _diagram(test_logits, test_y, args.n_bins, "cross-entropy, uncalibrated", out / "reliability_uncalibrated.png"):
        diagrams.append(out / "reliability_uncalibrated.png")

    # 2. post-hoc calibrators fitted on the validation split, evaluated on the test split
    val_logits, val_y, _ = _collect(model, val_loader)
    for name in calibrators:
        calibrator: Calibrator
        with split.phase("post-hoc fits") as timer:
            if name == "temperature":
                calibrator = posthoc.calibrator  # already fitted by the callback
            elif name in ("matrix", "dirichlet"):
                calibrator = CALIBRATORS[name](off_diagonal_reg=args.reg, intercept_reg=args.reg)  # type: ignore[call-arg]
                calibrator.fit(val_logits, val_y)
            else:
                calibrator = CALIBRATORS[name]()
                if isinstance(calibrator, CorrectnessAwareCalibrator):  # fitted on transformed copies too
                    _, _, val_copies = _collect(model, val_loader, calibrator)
                    assert val_copies is not None
                    calibrator.fit(val_logits, val_y, val_copies)
                else:
                    calibrator.fit(val_logits, val_y)
        if isinstance(calibrator, CorrectnessAwareCalibrator):
            _, _, test_copies = _collect(model, test_loader, calibrator)
            calibrated = calibrator(test_logits, test_copies)
        else:
            calibrated = calibrator(test_logits)
        fit_s = None if name == "temperature" else timer.seconds  # temperature: fitted by the callback
        label = type(calibrator).__name__
        if name == "temperature":
            label += f" (T = {calibrator.temperature:.2f})"  # type: ignore[attr-defined]
        if isinstance(calibrator, CorrectnessAwareCalibrator):
            label += " (official, balanced)" if calibrator.weighting == "balanced" else " (unweighted)"
        elif isinstance(CALIBRATORS.get(name), functools.partial):  # a preset with its own settings: say which
            label += f" ({name})"
        row = _scores(calibrated, test_y, args.n_bins, reference=test_logits)
        table.add(method=label, kind="post-hoc", **row, **{"fit s": fit_s}, **no_sets)
        if _diagram(calibrated, test_y, args.n_bins, label, out / f"reliability_{name}.png"):
            diagrams.append(out / f"reliability_{name}.png")
        print(f"{label}: test ECE {row[ECE_COLUMN]} %")

    # 3. train-time calibration losses (same architecture, data and schedule)
    for name in losses:
        pl.seed_everything(0, verbose=False)
        module = calibration_classifier(name, width=width)
        with split.phase(f"training/{name}") as timer:
            make_trainer(epochs, progress=progress).fit(module, datamodule=datamodule)
        logits, target, _ = _collect(module, test_loader)
        loss_label = type(module.loss).__name__
        row = _scores(logits, target, args.n_bins, reference=test_logits)
        table.add(method=loss_label, kind="train-time", **row, **{"fit s": timer.seconds}, **no_sets)
        if _diagram(logits, target, args.n_bins, loss_label, out / f"reliability_{name}.png"):
            diagrams.append(out / f"reliability_{name}.png")
        print(f"{loss_label}: trained in {timer.seconds:.1f} s, test ECE {row[ECE_COLUMN]} %")

    # 4. conformal prediction sets of the cross-entropy model, fitted at the end of its fit, tested on the test split
    with split.phase("evaluation"):
        trainer.test(model, dataloaders=test_loader, verbose=False)
    no_scores = dict.fromkeys([*SCORE_COLUMNS, "fit s"])
    for name, label in CONFORMAL.items():
        metrics = conformal[name].test_metrics
        sets = {COVERAGE_COLUMN: 100 * metrics["coverage"], SET_SIZE_COLUMN: metrics["set_size"]}
        table.add(**{**no_scores, "method": f"conformal {label}", "kind": "sets", **sets})
        print(
            f"conformal {label}: test coverage {sets[COVERAGE_COLUMN]:.2f} %, mean set size {sets[SET_SIZE_COLUMN]:.2f}"
        )

    assert isinstance(posthoc.calibrator, TemperatureScaler)
    temperature = posthoc.calibrator.temperature
    confidence = "over-confident" if temperature > 1 else "under-confident"
    preamble = (
        f"ConvNet width {width}, SGD lr 0.1 momentum 0.9 with cosine decay, {epochs} epochs, batch {args.batch_size}, "
        f"{len(datamodule.dataset('train'))} training images (no augmentation, no weight decay); the "  # type: ignore[attr-defined]
        f"cross-entropy model is {confidence} (fitted T = {temperature:.2f}, training NLL {train_nll:.4f}"
        + (": trained to near-zero training loss, as the calibration papers' networks are" if train_nll < 0.05 else "")
        + "); matrix and Dirichlet "
        f"calibrators with ODIR strength {args.reg}; post-hoc calibrators "
        f"fitted on the validation split ({len(val_y)} samples), all rows measured on the test split "
        f"({len(test_y)} samples); ECE with {args.n_bins} equal-width bins and a 95 % bootstrap interval (200 "
        "resamples of the test split; the change against the uncalibrated model uses the same resamples, and "
        "'(noise)' marks a change the test split does not resolve), ECE-em with equal-mass bins. "
        f"{PlattScaler.__name__} is binary-only and not listed. Reliability diagrams: reliability_*.png; "
        "fit s of TemperatureScaler: fitted by the PostHocCalibration callback at the end of training. "
        f"Conformal rows: ConformalPrediction callbacks (α = {CONFORMAL_ALPHA}) fitted on the validation split at the "
        "end of the cross-entropy model's fit, on its uncalibrated logits; coverage (≥ "
        f"{100 * (1 - CONFORMAL_ALPHA):.0f} % in expectation over the draw of the splits; one test split of "
        f"{len(test_y)} moves it by about ±{100 * (CONFORMAL_ALPHA * (1 - CONFORMAL_ALPHA) / len(test_y)) ** 0.5:.1f} "
        "pp) and mean set size (the randomised sets and THR's may be empty) on the test split."
    )
    path = table.write(out, "calibrate" + ("_quick" if args.quick else ""), preamble)
    report(table, preamble, [path, path.with_suffix(".json"), *diagrams], split)
    return 0

"""Calibration callbacks: ``PostHocCalibration`` (fit a calibrator on validation logits) and ``CalibrationMonitor``
(calibration metrics and reliability diagrams every validation epoch)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_losses._utils import require, unpack_batch
from lightning_losses.functional.calibration import expected_calibration_error, negative_log_likelihood
from lightning_losses.metrics.calibration import (
    AverageCalibrationError,
    BrierScore,
    CalibrationError,
    ClasswiseCalibrationError,
    KSCalibrationError,
    NegativeLogLikelihood,
)
from lightning_losses.nn.calibration import (
    Calibrator,
    CorrectnessAwareCalibrator,
    DirichletCalibrator,
    HistogramBinningCalibrator,
    IsotonicCalibrator,
    MatrixScaler,
    PlattScaler,
    TemperatureScaler,
    VectorScaler,
)

__all__ = ["CALIBRATORS", "CalibrationMonitor", "PostHocCalibration", "reliability_diagram"]

#: Calibrators by short name, for ``PostHocCalibration(calibrator="temperature")`` and the ``calibrate`` job.
CALIBRATORS: dict[str, Callable[[], Calibrator]] = {
    "temperature": TemperatureScaler,
    "vector": VectorScaler,
    "matrix": MatrixScaler,
    "dirichlet": DirichletCalibrator,
    "platt": PlattScaler,
    "histogram": HistogramBinningCalibrator,
    "isotonic": IsotonicCalibrator,
    "ca": CorrectnessAwareCalibrator,
}

LogitsFn = Callable[[pl.LightningModule, Any], Tensor]


def _default_logits(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    x, _, _ = unpack_batch(batch)
    return pl_module(x)


def _gather_in_order(trainer: pl.Trainer, local: Tensor, total: int) -> Tensor:
    """All-gather per-rank rows ``r, r + W, r + 2W, ...`` and return them in the original order (``total`` rows)."""
    world = trainer.world_size
    if world == 1:
        return local
    rows = -(-total // world)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = trainer.strategy.all_gather(padded)  # (W, rows, ...)
    return gathered.transpose(0, 1).reshape(rows * world, *local.shape[1:])[:total]


class PostHocCalibration(Callback):
    r"""Fits a post-hoc calibrator on the validation logits after ``fit`` and applies it to ``test``/``predict``.

    * **Data.** The validation dataloader (of the datamodule, or the Trainer's), never the test set unless
      ``split="test"`` is asked for explicitly (with a loud warning: the test metrics become optimistic).
      Each process reads the disjoint share ``r, r + W, ...`` of the data set (no padding, no duplicates).
    * **DDP.** Logits and targets are gathered from every process in the data set's order, the calibrator is fitted
      on rank 0 only and its state broadcast, so every rank holds the same calibrator, equal to the
      single-process fit.
    * **Use.** During ``trainer.test`` and ``trainer.predict`` a forward hook replaces the module's output logits
      by the calibrated ones (for the CA calibrator the hook also runs the transformed copies of the input).
      :meth:`calibrated` applies it by hand.
    * **Checkpoint.** The calibrator's state and the before/after metrics are the callback's state: a checkpoint
      saved after calibration (``trainer.save_checkpoint``) restores it exactly, in ``fit``, ``test`` or
      ``predict`` with ``ckpt_path``.
    * **Logging.** ECE and NLL on the validation logits before and after, to the Trainer's logger and
      :attr:`metrics`.

    With ``strategy="ddp_spawn"`` the fit happens in the worker processes; save a checkpoint there (or use
    ``strategy="ddp"``) to keep the calibrator in the launching process.

    Args:
        calibrator: A :class:`~lightning_losses.nn.Calibrator` or one of ``"temperature"``, ``"vector"``,
            ``"matrix"``, ``"dirichlet"``, ``"platt"``, ``"histogram"``, ``"isotonic"``, ``"ca"``.
        fit_on: ``"fit_end"`` (after ``trainer.fit``) or ``"manual"`` (call :meth:`calibrate` yourself).
        split: ``"val"`` (default) or ``"test"`` (discouraged; warns).
        logits_fn: ``(module, batch) -> logits``; defaults to ``module(inputs)`` with the inputs unpacked from
            ``(x, y)``, ``(x, y, index)`` or dict batches.
        n_bins: Bins of the logged ECE.
        apply_to: Stages whose forward outputs are calibrated.

    Example:
        >>> cb = PostHocCalibration("temperature")
        >>> cb.is_fitted, sorted(cb.state_dict())
        (False, ['calibrator', 'metrics'])
    """

    def __init__(
        self,
        calibrator: Calibrator | str = "temperature",
        fit_on: Literal["fit_end", "manual"] = "fit_end",
        split: Literal["val", "test"] = "val",
        logits_fn: LogitsFn | None = None,
        n_bins: int = 15,
        apply_to: Sequence[Literal["test", "predict"]] = ("test", "predict"),
    ) -> None:
        super().__init__()
        if isinstance(calibrator, str):
            if calibrator not in CALIBRATORS:
                raise ValueError(f"Unknown calibrator {calibrator!r}. Choose one of {sorted(CALIBRATORS)}.")
            calibrator = CALIBRATORS[calibrator]()
        if not isinstance(calibrator, Calibrator):
            raise TypeError(f"`calibrator` must be a Calibrator or a name, got {type(calibrator).__name__}.")
        if fit_on not in ("fit_end", "manual"):
            raise ValueError(f"`fit_on` must be 'fit_end' or 'manual', got {fit_on!r}.")
        if split not in ("val", "test"):
            raise ValueError(f"`split` must be 'val' or 'test', got {split!r}.")
        if split == "test":
            warnings.warn(
                "PostHocCalibration(split='test') fits the calibrator on the TEST set: every test metric measured "
                "afterwards is optimistically biased. Fit on held-out validation data (split='val') instead.",
                UserWarning,
                stacklevel=2,
            )
        bad = set(apply_to) - {"test", "predict"}
        if bad:
            raise ValueError(f"`apply_to` may hold 'test' and 'predict' only, got {sorted(bad)}.")
        self.calibrator = calibrator
        self.fit_on, self.split, self.n_bins = fit_on, split, n_bins
        self.logits_fn = logits_fn or _default_logits
        self.apply_to = tuple(apply_to)
        self.metrics: dict[str, float] = {}
        self._hook: Any = None
        self._inside_hook = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(calibrator=type(self.calibrator).__name__)

    @property
    def is_fitted(self) -> bool:
        """Whether the calibrator is fitted (by :meth:`calibrate` or from a checkpoint)."""
        return self.calibrator.is_fitted

    # ------------------------------------------------------------------ fitting

    def _dataloader(self, trainer: pl.Trainer) -> DataLoader:
        datamodule = getattr(trainer, "datamodule", None)
        if self.split == "test":
            loader: Any = datamodule.test_dataloader() if datamodule is not None else trainer.test_dataloaders
        else:
            loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                f"PostHocCalibration found no {self.split} dataloader to fit on. Give the Trainer validation data "
                "(a datamodule with val_dataloader(), or val_dataloaders=...), or call calibrate(..., dataloader=...)."
            )
        return loader

    def _shard(self, trainer: pl.Trainer, loader: DataLoader) -> tuple[DataLoader, int]:
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or trainer.world_size == 1:
            return loader, -1
        total = len(dataset)  # type: ignore[arg-type]
        share = Subset(dataset, list(range(trainer.global_rank, total, trainer.world_size)))
        return DataLoader(share, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn), total

    @torch.no_grad()
    def _collect(self, pl_module: pl.LightningModule, loader: DataLoader) -> tuple[Tensor, Tensor, Tensor | None]:
        logits, targets, copies = [], [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in loader:
                batch = move_data_to_device(batch, pl_module.device)
                out = self.logits_fn(pl_module, batch)
                _, target, _ = unpack_batch(batch)
                if target is None:
                    raise ValueError("PostHocCalibration needs targets in the validation batches.")
                logits.append(out.float())
                targets.append(target)
                if self.calibrator.needs_transformed_logits:
                    x, _, _ = unpack_batch(batch)
                    assert isinstance(self.calibrator, CorrectnessAwareCalibrator)
                    copies.append(self.calibrator.transformed_logits(pl_module, x).float())
        finally:
            pl_module.train(was_training)
        if not logits:
            raise RuntimeError("The calibration dataloader is empty: nothing to fit on.")
        return torch.cat(logits), torch.cat(targets), (torch.cat(copies, dim=1) if copies else None)

    def calibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: DataLoader | None = None
    ) -> dict[str, float]:
        """Collect the logits, gather them from every process, fit on rank 0, broadcast; returns the metrics.

        Call it on every process (it is collective under DDP).
        """
        loader = dataloader if dataloader is not None else self._dataloader(trainer)
        loader, total = self._shard(trainer, loader)
        logits, target, copies = self._collect(pl_module, loader)
        if total >= 0:
            logits = _gather_in_order(trainer, logits, total)
            target = _gather_in_order(trainer, target, total)
            if copies is not None:
                copies = _gather_in_order(trainer, copies.transpose(0, 1).contiguous(), total).transpose(0, 1)
        elif trainer.world_size > 1:
            raise RuntimeError(
                "PostHocCalibration under several processes needs a map-style data set (with __len__) to split "
                "without duplicates; an IterableDataset was given."
            )
        calibrator = self.calibrator.to(logits.device)
        if trainer.is_global_zero:
            if copies is not None:
                assert isinstance(calibrator, CorrectnessAwareCalibrator)
                calibrator.fit(logits, target, copies)
            else:
                calibrator.fit(logits, target)
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(
                {k: v.cpu() for k, v in calibrator.state_dict().items()} if trainer.is_global_zero else None, src=0
            )
            assert state is not None
            calibrator.load_state_dict(state)
            calibrator.to(logits.device)
        calibrated = self._apply(calibrator, logits, copies)
        self.metrics = {
            "ece_before": float(expected_calibration_error(logits, target, self.n_bins, input_type="logits")),
            "ece_after": float(expected_calibration_error(calibrated, target, self.n_bins, input_type="logits")),
            "nll_before": float(negative_log_likelihood(logits, target, "logits")),
            "nll_after": float(negative_log_likelihood(calibrated, target, "logits")),
            "num_samples": float(logits.shape[0]),
        }
        if trainer.is_global_zero:
            name = type(calibrator).__name__
            rank_zero_info(
                f"{name} fitted on {int(self.metrics['num_samples'])} {self.split} samples: ECE "
                f"{self.metrics['ece_before']:.4f} -> {self.metrics['ece_after']:.4f}, NLL "
                f"{self.metrics['nll_before']:.4f} -> {self.metrics['nll_after']:.4f}"
            )
            for logger in trainer.loggers:
                logger.log_metrics({f"calibration/{k}": v for k, v in self.metrics.items()}, step=trainer.global_step)
        return self.metrics

    @staticmethod
    def _apply(calibrator: Calibrator, logits: Tensor, copies: Tensor | None) -> Tensor:
        if isinstance(calibrator, CorrectnessAwareCalibrator):
            return calibrator(logits, copies)
        return calibrator(logits)

    def calibrated(self, logits: Tensor, transformed_logits: Tensor | None = None) -> Tensor:
        """Apply the fitted calibrator to ``logits`` (and the transformed copies' logits for CA)."""
        calibrator = self.calibrator.to(logits.device)
        return self._apply(calibrator, logits.float(), transformed_logits)

    # ------------------------------------------------------------------ hooks

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fit_on == "fit_end":
            self.calibrate(trainer, pl_module)

    def _forward_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self._inside_hook or not isinstance(output, Tensor) or not output.is_floating_point():
            return output
        if output.ndim not in (1, 2):
            return output
        copies = None
        if isinstance(self.calibrator, CorrectnessAwareCalibrator):
            self._inside_hook = True
            try:
                copies = self.calibrator.transformed_logits(module, args[0])
            finally:
                self._inside_hook = False
        return self.calibrated(output, copies).to(output.dtype)

    def _attach(self, pl_module: pl.LightningModule) -> None:
        if self._hook is None and self.is_fitted:
            self.calibrator.to(pl_module.device)
            self._hook = pl_module.register_forward_hook(self._forward_hook)

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.apply_to:
            self._attach(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.apply_to:
            self._attach(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "calibrator": {k: v.detach().cpu().clone() for k, v in self.calibrator.state_dict().items()},
            "metrics": dict(self.metrics),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calibrator.load_state_dict(state_dict["calibrator"])
        self.metrics = dict(state_dict.get("metrics", {}))


# ---------------------------------------------------------------------- reliability diagrams


def reliability_diagram(
    count: Tensor, confidence_sum: Tensor, correct_sum: Tensor, title: str = "Reliability diagram"
) -> Any:
    """Draw a reliability diagram from per-bin sums (:meth:`CalibrationError.bins`); returns a matplotlib Figure.

    Top: accuracy per bin (bars) against the diagonal, with the gap to the mean confidence shaded. Bottom: the
    histogram of confidences. Uses the Agg backend (no display needed); needs the ``plot`` extra.
    """
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n_bins = count.shape[-1]
    count, conf_sum, acc_sum = count.double().cpu(), confidence_sum.double().cpu(), correct_sum.double().cpu()
    safe = count.clamp_min(1)
    acc, conf = (acc_sum / safe).numpy(), (conf_sum / safe).numpy()
    filled = (count > 0).numpy()
    edges = torch.linspace(0, 1, n_bins + 1).numpy()
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    ece = float(((count / count.sum().clamp_min(1)) * (acc_sum / safe - conf_sum / safe).abs()).sum())

    fig = Figure(figsize=(4.5, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.bar(centres[filled], acc[filled], width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    gap_low = [min(a, c) for a, c in zip(acc[filled], conf[filled])]
    gap_height = [abs(a - c) for a, c in zip(acc[filled], conf[filled])]
    top.bar(
        centres[filled], gap_height, bottom=gap_low, width=width, color="#dd8452", alpha=0.5, hatch="//", label="gap"
    )
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title} (ECE {ece:.4f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count.numpy(), width=width, edgecolor="black", color="#55a868")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("samples")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return fig


_MONITOR_METRICS = ("ece", "mce", "ace", "classwise_ece", "ks", "nll", "brier")


class CalibrationMonitor(Callback):
    r"""Logs calibration metrics every validation epoch and saves a reliability diagram.

    The logits are taken from the ``validation_step`` output when it is a tensor or a dict with key
    ``logits_key``; otherwise the module is run again on the batch inputs (no gradient). Metrics are streaming
    (per-bin sums, constant memory) and reduced across processes; the diagram is drawn on rank 0 from the
    all-reduced bins, written as ``<dirpath>/reliability_epoch{N}.png`` (default ``<log_dir>/reliability``) and,
    with a TensorBoard logger, added as an image.

    Args:
        metrics: Any of ``"ece"``, ``"mce"``, ``"ace"``, ``"classwise_ece"`` (needs ``num_classes``), ``"ks"``,
            ``"nll"``, ``"brier"``.
        n_bins: Number of equal-width bins.
        num_classes: Number of classes (classwise ECE only).
        diagram: Whether to draw the reliability diagram (needs matplotlib).
        every_n_epochs: Draw the diagram every ``n`` validation epochs.
        dirpath: Where the PNG files go.
        logits_key: Key of the logits in a dict ``validation_step`` output.
        prefix: Prefix of the logged names.

    Example:
        >>> CalibrationMonitor(metrics=("ece", "nll"), diagram=False).metric_names
        ['ece', 'nll']
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("ece", "classwise_ece", "nll", "brier"),
        n_bins: int = 15,
        num_classes: int | None = None,
        diagram: bool = True,
        every_n_epochs: int = 1,
        dirpath: str | Path | None = None,
        logits_key: str = "logits",
        prefix: str = "calibration/",
    ) -> None:
        super().__init__()
        unknown = set(metrics) - set(_MONITOR_METRICS)
        if unknown:
            raise ValueError(f"Unknown calibration metrics {sorted(unknown)}; choose from {list(_MONITOR_METRICS)}.")
        if "classwise_ece" in metrics and num_classes is None:
            raise ValueError("`classwise_ece` needs `num_classes`: pass CalibrationMonitor(num_classes=...).")
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.metric_names = list(metrics)
        self.n_bins, self.num_classes, self.diagram = n_bins, num_classes, diagram
        self.every_n_epochs, self.dirpath, self.logits_key, self.prefix = every_n_epochs, dirpath, logits_key, prefix
        self._bins = CalibrationError(n_bins, input_type="logits")
        self._metrics: dict[str, Any] = {}
        self.last_diagram: Path | None = None

    def _build(self) -> dict[str, Any]:
        makers: dict[str, Callable[[], Any]] = {
            "ece": lambda: CalibrationError(self.n_bins, input_type="logits"),
            "mce": lambda: CalibrationError(self.n_bins, norm="max", input_type="logits"),
            "ace": lambda: AverageCalibrationError(self.n_bins, input_type="logits"),
            "classwise_ece": lambda: ClasswiseCalibrationError(self.num_classes or 2, self.n_bins, input_type="logits"),
            "ks": lambda: KSCalibrationError(input_type="logits"),
            "nll": lambda: NegativeLogLikelihood(input_type="logits"),
            "brier": lambda: BrierScore(input_type="logits"),
        }
        return {name: makers[name]() for name in self.metric_names}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._metrics = self._build()
        device = pl_module.device
        for m in self._metrics.values():
            m.to(device)
        self._bins.to(device)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in [*self._metrics.values(), self._bins]:
            m.to(pl_module.device)
            m.reset()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        x, target, _ = unpack_batch(batch)
        if target is None:
            return
        if isinstance(outputs, Tensor):
            logits = outputs
        elif isinstance(outputs, dict) and isinstance(outputs.get(self.logits_key), Tensor):
            logits = outputs[self.logits_key]
        else:
            with torch.no_grad():
                logits = pl_module(x)
        logits = logits.detach().float()
        for m in self._metrics.values():
            m.update(logits, target)
        self._bins.update(logits, target)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        count, conf_sum, acc_sum = (t.clone() for t in self._bins.bins())
        if trainer.world_size > 1:
            count, conf_sum, acc_sum = (trainer.strategy.reduce(t, reduce_op="sum") for t in (count, conf_sum, acc_sum))
        if float(count.sum()) == 0:
            return
        for name, m in self._metrics.items():
            pl_module.log(f"{self.prefix}{name}", m.compute(), on_epoch=True, sync_dist=False)
        epoch = trainer.current_epoch
        if self.diagram and epoch % self.every_n_epochs == 0 and trainer.is_global_zero:
            self._draw(trainer, count, conf_sum, acc_sum, epoch)

    def _draw(self, trainer: pl.Trainer, count: Tensor, conf_sum: Tensor, acc_sum: Tensor, epoch: int) -> None:
        fig = reliability_diagram(count, conf_sum, acc_sum, title=f"epoch {epoch}")
        directory = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "reliability")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"reliability_epoch{epoch}.png"
        fig.savefig(path, dpi=100)
        self.last_diagram = path
        for logger in trainer.loggers:
            add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
            if add_figure is not None:
                add_figure(f"{self.prefix}reliability", fig, global_step=trainer.global_step)

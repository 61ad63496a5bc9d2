"""Calibration callbacks: ``PostHocCalibration`` (fit a calibrator on validation logits) and ``CalibrationMonitor``
(calibration metrics and reliability diagrams every validation epoch)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_losses.callbacks._fitted import (
    LogitsFn,
    Stage,
    _find_module,
    _FitOnValidation,
    _SamplerPadding,
    _strategy_forward,
)
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
    BBQCalibrator,
    BetaCalibrator,
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
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.distributed import all_reduce
from lightning_losses.utilities.imports import require

__all__ = ["CALIBRATORS", "CalibrationMonitor", "PostHocCalibration", "reliability_diagram"]

#: Calibrators by short name, for ``PostHocCalibration(calibrator="temperature")`` and the ``calibrate`` job: each
#: name is a preset of a calibrator class (the class itself, or ``functools.partial`` of it with settings).
CALIBRATORS: dict[str, Callable[[], Calibrator]] = {
    "temperature": TemperatureScaler,
    "vector": VectorScaler,
    "matrix": MatrixScaler,
    "dirichlet": DirichletCalibrator,
    "platt": PlattScaler,
    "histogram": HistogramBinningCalibrator,
    "isotonic": IsotonicCalibrator,
    "ca": CorrectnessAwareCalibrator,
    "ca_unweighted": partial(CorrectnessAwareCalibrator, weighting="none"),
    "beta": BetaCalibrator,
    "bbq": BBQCalibrator,
    "bbq_paper": partial(BBQCalibrator, binning="quantile", score="bayesian"),
}


class PostHocCalibration(_FitOnValidation):
    r"""Fits a post-hoc calibrator on the validation logits after ``fit`` and applies it to ``test``/``predict``.

    * **Data.** The validation dataloader (of the datamodule, or the Trainer's), never the test set unless
      ``split="test"`` is asked for explicitly (with a loud warning: the test metrics become optimistic).
      Each process reads the share ``r, r + W, ...`` of the data set, padded to the same number of batches on
      every process (so collectives inside the model's forward stay in step); the padding is dropped before the
      fit, so no sample counts twice.
    * **Forward.** The logits are computed inside the forward of the strategy's wrapper (DDP, FSDP, DeepSpeed),
      so wrappers that prepare sharded or synchronised parameters in their ``forward`` are not bypassed; FSDP2's
      in-place ``fully_shard`` needs no wrapper. Default logits: ``module(inputs)`` for ``module=None``; with
      ``module="net"`` the output of ``net`` while the LightningModule's ``forward`` runs on the inputs (or
      ``net(inputs)`` when the LightningModule defines no ``forward``). ``logits_fn`` replaces both.
    * **DDP.** Logits and targets are gathered from every process in the data set's order, the calibrator is fitted
      on rank 0 only and its state broadcast, so every rank holds the same calibrator, equal to the
      single-process fit.
    * **Use.** During ``trainer.test`` and ``trainer.predict`` a forward hook replaces the output of the logits
      module (``module``: the LightningModule by default, or a named submodule such as ``"net"`` when the steps
      call ``self.net(x)``) by the calibrated logits (for the CA calibrator the hook also runs the transformed
      copies of the module's input). If the first test/predict batch never runs that module, a ``RuntimeError``
      says how to connect it: the outputs would otherwise be silently uncalibrated. An unfitted callback warns at
      test/predict start. :meth:`calibrated` applies the calibrator by hand.
    * **Checkpoints.** The calibrator's state and the before/after metrics are the callback's state.

      - A checkpoint saved after calibration (``trainer.save_checkpoint``, or any later save) carries it.
      - The checkpoints written *during* fit predate the calibration: at the end of :meth:`calibrate` the
        callback rewrites the files of this run known to the Trainer's ``ModelCheckpoint`` callbacks
        (``best_model_path``, ``last_model_path`` and every ``best_k_models`` file; the ``meta.pt`` of a
        distributed checkpoint directory) so that they carry the fitted calibrator (``update_checkpoints=True``,
        the default; rank 0 writes, atomically; :attr:`updated_checkpoints` lists them). So
        ``trainer.test(ckpt_path="best" | "last" | path)``, in this Trainer or a fresh one, uses the calibration
        fitted at the end of fit. (The calibrator was fitted on the final weights; a best checkpoint of an
        earlier epoch gets the same calibrator. For an exact fit on those weights, restore them and call
        :meth:`calibrate` again.)
      - Loading a checkpoint whose calibrator is unfitted over a fitted one never happens silently: when the
        checkpoint comes from this run (written before the calibration, e.g. by ``update_checkpoints=False`` or a
        checkpoint callback of another kind), the fitted calibrator is kept, with a warning; when it comes from
        another run, it is loaded (the calibrator becomes unfitted, the outputs uncalibrated) with a warning.
    * **Logging.** ECE and NLL on the validation logits before and after, to the Trainer's logger and
      :attr:`metrics`.

    With ``strategy="ddp_spawn"`` the fit happens in the worker processes; save a checkpoint there (or use
    ``strategy="ddp"``) to keep the calibrator in the launching process.

    Args:
        calibrator: A :class:`~lightning_losses.nn.Calibrator` or one of the names of :data:`CALIBRATORS`:
            ``"temperature"``, ``"vector"``, ``"matrix"``, ``"dirichlet"``, ``"platt"``, ``"histogram"``,
            ``"isotonic"``, ``"ca"``, ``"ca_unweighted"`` (CA with ``weighting="none"``), ``"beta"``, ``"bbq"``
            (netcal's BBQ) and ``"bbq_paper"`` (equal-frequency bins, Bayesian score).
        fit_on: ``"fit_end"`` (after ``trainer.fit``) or ``"manual"`` (call :meth:`calibrate` yourself).
        split: ``"val"`` (default) or ``"test"`` (discouraged; warns).
        logits_fn: ``(module, batch) -> logits``; defaults to the logits module's output on the inputs unpacked
            from ``(x, y)``, ``(x, y, index)`` or dict batches (see **Forward**).
        n_bins: Bins of the logged ECE.
        apply_to: Stages whose logits are calibrated.
        module: Dotted name of the submodule whose output is the logits (``"net"``, ``"model.head"``);
            ``None`` for the LightningModule's own ``forward``.
        update_checkpoints: Rewrite this run's ``ModelCheckpoint`` files after calibration (see **Checkpoints**).

    Example:
        >>> cb = PostHocCalibration("temperature", module="net")
        >>> cb.is_fitted, sorted(cb.state_dict())
        (False, ['calibrator', 'metrics', 'run_id'])
    """

    _owner = "PostHocCalibration"
    _not_fitted_warning = (
        "PostHocCalibration is not fitted at {stage} start: the {stage} outputs are NOT calibrated. Fit it "
        "(fit_on='fit_end', or calibrate(trainer, model)) or restore a checkpoint saved after calibration."
    )
    _kept_fit_warning = (
        "PostHocCalibration: the checkpoint was written by this run before the calibration and holds "
        "an unfitted calibrator; keeping the calibrator fitted at the end of fit."
    )
    _lost_fit_warning = (
        "PostHocCalibration: loading a checkpoint of another run whose calibrator is unfitted over the "
        "fitted one; the calibrator is now UNFITTED and test/predict outputs are not calibrated. Call "
        "calibrate(trainer, model) on validation data, or restore a checkpoint saved after calibration."
    )

    def __init__(
        self,
        calibrator: Calibrator | str = "temperature",
        fit_on: Literal["fit_end", "manual"] = "fit_end",
        split: Literal["val", "test"] = "val",
        logits_fn: LogitsFn | None = None,
        n_bins: int = 15,
        apply_to: Sequence[Literal["test", "predict"]] = ("test", "predict"),
        module: str | None = None,
        update_checkpoints: bool = True,
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
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(
                f"`logits_fn` must be a callable (module, batch) -> logits, got {type(logits_fn).__name__}."
            )
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
        if isinstance(apply_to, str):
            raise TypeError(f"`apply_to` must be a sequence of stage names, e.g. ('test',), got {apply_to!r}.")
        if module is not None and (not isinstance(module, str) or not all(p.isidentifier() for p in module.split("."))):
            raise ValueError(f"`module` must be a dotted submodule name such as 'net' or 'model.head', got {module!r}.")
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
        self.logits_fn = logits_fn
        self.apply_to = tuple(apply_to)
        self.module = module
        self.update_checkpoints = bool(update_checkpoints)
        self.metrics: dict[str, float] = {}
        self._inside_hook = False
        self._fired = False
        self._connection_checked = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(calibrator=type(self.calibrator).__name__)

    @property
    def is_fitted(self) -> bool:
        """Whether the calibrator is fitted (by :meth:`calibrate` or from a checkpoint)."""
        return self.calibrator.is_fitted

    # ------------------------------------------------------------------ fitting

    @override
    def _copies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        """The logits of the CA calibrator's transformed copies of the batch's inputs (other calibrators: none)."""
        if not self.calibrator.needs_transformed_logits:
            return None
        assert isinstance(self.calibrator, CorrectnessAwareCalibrator)
        calibrator = self.calibrator
        x, _, _ = unpack_batch(batch)
        model: Callable[[Tensor], Tensor] = (
            pl_module if self.module is None else _find_module(pl_module, self.module, self._owner)
        )
        return _strategy_forward(trainer, pl_module, lambda: calibrator.transformed_logits(model, x))

    def calibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: DataLoader | None = None
    ) -> dict[str, float]:
        """Collect the logits, gather them from every process, fit on rank 0, broadcast; returns the metrics.

        Call it on every process (it is collective under DDP). Then, with ``update_checkpoints``, rewrites this
        run's ``ModelCheckpoint`` files to carry the fitted calibrator.
        """
        logits, target, copies = self._gathered(trainer, pl_module, dataloader)
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
        self._update_checkpoints(trainer)
        return self.metrics

    # ------------------------------------------------------------------ applying

    @staticmethod
    def _apply(calibrator: Calibrator, logits: Tensor, copies: Tensor | None) -> Tensor:
        if isinstance(calibrator, CorrectnessAwareCalibrator):
            return calibrator(logits, copies)
        return calibrator(logits)

    def calibrated(self, logits: Tensor, transformed_logits: Tensor | None = None) -> Tensor:
        """Apply the fitted calibrator to ``logits`` (and the transformed copies' logits for CA)."""
        calibrator = self.calibrator.to(logits.device)
        return self._apply(calibrator, logits.float(), transformed_logits)

    @override
    def _fit_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    @override
    def _forward_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self._inside_hook or not isinstance(output, Tensor) or not output.is_floating_point():
            return output
        if output.ndim not in (1, 2):
            return output
        self._fired = True
        copies = None
        if isinstance(self.calibrator, CorrectnessAwareCalibrator):
            self._inside_hook = True
            try:
                copies = self.calibrator.transformed_logits(module, args[0])
            finally:
                self._inside_hook = False
        return self.calibrated(output, copies).to(output.dtype)

    @override
    def _stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage in self.apply_to:
            self._connection_checked = False
            if self._attach(pl_module, stage):
                self.calibrator.to(pl_module.device)

    @override
    def _batch_start(self) -> None:
        self._fired = False

    @override
    def _batch_end(self, pl_module: pl.LightningModule, batch: Any, stage: Stage) -> None:
        if self._hook is None or self._connection_checked:
            return
        self._connection_checked = True
        if not self._fired:
            where = "the LightningModule's forward" if self.module is None else f"the submodule {self.module!r}"
            children = [n for n, _ in pl_module.named_children()]
            raise RuntimeError(
                f"PostHocCalibration could not calibrate the {stage} logits: the {stage} step never called {where}, "
                "where the calibration is applied, so its outputs would be uncalibrated. Name the submodule that "
                f"computes the logits, e.g. PostHocCalibration(..., module='net') when the step calls self.net(x) "
                f"(children of this module: {children}), or call self(x) in the step."
            )

    # ------------------------------------------------------------------ checkpoint

    @override
    def _fitted_state(self) -> dict[str, Any]:
        return {
            "calibrator": {k: v.detach().cpu().clone() for k, v in self.calibrator.state_dict().items()},
            "metrics": dict(self.metrics),
        }

    @override
    def _holds_fit(self, state_dict: dict[str, Any]) -> bool:
        incoming = state_dict["calibrator"]
        return bool(incoming["fitted"]) if "fitted" in incoming else False

    @override
    def _load_fitted_state(self, state_dict: dict[str, Any]) -> None:
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

    The logits are, in this order: the ``validation_step`` output when it is a tensor or a dict with key
    ``logits_key``; the output of the logits module during the step (``module``: a named submodule, or the
    LightningModule's ``forward`` by default), caught by a forward hook, so no second forward runs; otherwise the
    module is run again on the batch inputs (no gradient). Metrics are streaming (per-bin sums, constant memory)
    and reduced across processes; the diagram is drawn on rank 0 from the all-reduced bins, written as
    ``<dirpath>/reliability_epoch{N}.png`` (default ``<log_dir>/reliability``) and, with a TensorBoard logger,
    added as an image.

    Under DDP the validation sampler pads every process's share to the same length by repeating samples; the
    monitor drops those repeats (the last samples a process reads), so each validation sample counts once and the
    metrics equal the single-process ones.

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
        module: Dotted name of the submodule whose output is the logits (``"net"``), when ``validation_step``
            calls ``self.net(x)`` and returns no logits; ``None`` watches the LightningModule's ``forward``.

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
        module: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(metrics, str):
            raise TypeError(f"`metrics` must be a sequence of metric names, e.g. ('ece',), got {metrics!r}.")
        unknown = set(metrics) - set(_MONITOR_METRICS)
        if unknown:
            raise ValueError(f"Unknown calibration metrics {sorted(unknown)}; choose from {list(_MONITOR_METRICS)}.")
        if "classwise_ece" in metrics and num_classes is None:
            raise ValueError("`classwise_ece` needs `num_classes`: pass CalibrationMonitor(num_classes=...).")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        if module is not None and (not isinstance(module, str) or not all(p.isidentifier() for p in module.split("."))):
            raise ValueError(f"`module` must be a dotted submodule name such as 'net' or 'model.head', got {module!r}.")
        self.metric_names = list(metrics)
        self.n_bins, self.num_classes, self.diagram = n_bins, num_classes, diagram
        self.every_n_epochs, self.dirpath, self.logits_key, self.prefix = every_n_epochs, dirpath, logits_key, prefix
        self.module = module
        self._bins = CalibrationError(n_bins, input_type="logits")
        self._metrics: dict[str, Any] = {}
        self.last_diagram: Path | None = None
        self._hook: Any = None
        self._captured: list[Tensor] = []
        self._padding: dict[int, _SamplerPadding] = {}

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

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _find_module(pl_module, self.module, "CalibrationMonitor")
        self._metrics = self._build()
        device = pl_module.device
        for m in self._metrics.values():
            m.to(device)
        self._bins.to(device)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in [*self._metrics.values(), self._bins]:
            m.to(pl_module.device)
            m.reset()
        self._padding = {}
        if self._hook is None and not trainer.sanity_checking:
            target = _find_module(pl_module, self.module, "CalibrationMonitor")
            self._hook = target.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._captured and isinstance(output, Tensor) and output.is_floating_point():
            self._captured.append(output)

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = []

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._captured = []

    @override
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
        captured, self._captured = self._captured, []
        if target is None:
            return
        if isinstance(outputs, Tensor):
            logits = outputs
        elif isinstance(outputs, dict) and isinstance(outputs.get(self.logits_key), Tensor):
            logits = outputs[self.logits_key]
        elif captured and captured[0].ndim in (1, 2) and captured[0].shape[0] == target.shape[0]:
            logits = captured[0]
        else:
            with torch.no_grad():
                logits = pl_module(x)
        logits = logits.detach().float()
        if dataloader_idx not in self._padding:
            self._padding[dataloader_idx] = _SamplerPadding.of(trainer, trainer.val_dataloaders, dataloader_idx)
        logits, target = self._padding[dataloader_idx].drop(logits, target)
        for m in self._metrics.values():
            m.update(logits, target)
        self._bins.update(logits, target)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        if trainer.sanity_checking:
            return
        count, conf_sum, acc_sum = (t.clone() for t in self._bins.bins())
        if trainer.world_size > 1:
            count, conf_sum, acc_sum = (all_reduce(t, trainer=trainer) for t in (count, conf_sum, acc_sum))
        if float(count.sum()) == 0:
            return
        for name, m in self._metrics.items():
            pl_module.log(f"{self.prefix}{name}", m.compute(), on_epoch=True, sync_dist=False)
        epoch = trainer.current_epoch
        if self.diagram and epoch % self.every_n_epochs == 0 and trainer.is_global_zero:
            self._draw(trainer, count, conf_sum, acc_sum, epoch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

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

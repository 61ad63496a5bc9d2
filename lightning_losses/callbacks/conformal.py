"""Conformal prediction sets (THR/LAC, APS, RAPS) fitted on gathered validation outputs: ``ConformalPrediction``."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_losses.callbacks._fitted import LogitsFn, Stage, _FitOnValidation, _SamplerPadding
from lightning_losses.functional.calibration import (
    ConformalMethod,
    conformal_quantile,
    conformal_scores,
    prediction_sets,
)
from lightning_losses.metrics.calibration import PredictionSetCoverage, PredictionSetSize
from lightning_losses.utilities.batches import unpack_batch
from lightning_losses.utilities.checks import check_choice, check_hyperparameter, check_int

__all__ = ["ConformalPrediction"]


class ConformalPrediction(_FitOnValidation):
    r"""Split-conformal prediction sets: the threshold is fitted on the validation logits at the end of ``fit``;
    at ``test`` the coverage and the average set size are logged, at ``predict`` the sets are kept.

    The score of every class is :func:`~lightning_losses.functional.conformal_class_scores` (THR: :math:`1 -
    \pi_k`; APS / RAPS: the probability mass ranked above ``k``, plus ``u`` times its own, plus the RAPS penalty);
    the threshold is :func:`~lightning_losses.functional.conformal_quantile`, the
    :math:`\lceil (n+1)(1-\alpha)\rceil`-th smallest validation score, so that for exchangeable validation and
    test data :math:`P(y \in \mathcal{C}(x)) \ge 1 - \alpha` (and at most :math:`1 - \alpha + 1/(n+1)` for the
    randomised scores). The sets are the boolean ``(N, C)`` masks :math:`\{k : s(x, k, u) \le \hat q\}`.

    * **Data and DDP.** As :class:`~lightning_losses.callbacks.PostHocCalibration`: the validation dataloader,
      each process reading its share without duplicates, the logits (of the LightningModule, the submodule
      ``module`` or ``logits_fn``) computed inside the strategy's forward and gathered in the data set's order; the
      scores' uniforms are drawn from ``seed`` on the gathered set and the threshold is broadcast from rank 0, so
      every rank holds the threshold of the single-process fit.
    * **Test.** A forward hook on the logits module (registered first, so it sees the module's own output even
      with a :class:`~lightning_losses.callbacks.PostHocCalibration` hook on the same module) reads each test
      batch's logits; ``<prefix>coverage`` and ``<prefix>set_size`` are logged at the end of the test epoch
      (streaming sums reduced across processes; the distributed sampler's padding is dropped) and kept in
      :attr:`test_metrics`.
    * **Predict.** The sets of every predict batch are appended to :attr:`predicted_sets` (CPU), in order;
      :meth:`prediction_sets` computes them by hand from logits.
    * **Checkpoints.** The threshold and the number of calibration samples are the callback's state; after the
      fit, this run's ``ModelCheckpoint`` files are rewritten to carry them (``update_checkpoints``), and a
      checkpoint of this run written before the fit never unfits a fitted callback (the same rules as
      :class:`~lightning_losses.callbacks.PostHocCalibration`), so ``trainer.test(ckpt_path=...)`` and a resumed
      run use the fitted threshold.

    The conformal sets are built on the logits as the module outputs them: to combine them with a post-hoc
    calibrator, compose the calibrated logits in ``logits_fn`` (the guarantee holds for any fixed score).

    Args:
        alpha: Miscoverage level in ``(0, 1)`` (sets cover with probability at least ``1 - alpha``).
        method: ``"thr"`` (also called LAC), ``"aps"`` or ``"raps"``.
        randomized: Randomised APS / RAPS scores (exact coverage; sets may be empty). THR ignores it.
        lam, k_reg: The RAPS penalty and the rank from which it applies.
        fit_on: ``"fit_end"`` or ``"manual"`` (call :meth:`fit` yourself).
        split: ``"val"``, or ``"test"`` (warns: the test coverage is then not held-out).
        logits_fn: ``(module, batch) -> logits`` for the fit; defaults to the logits module's output.
        module: Dotted name of the submodule whose output is the logits; ``None`` for the LightningModule.
        seed: Seed of the uniforms (validation scores; test and predict sets add the rank to it).
        update_checkpoints: Rewrite this run's ``ModelCheckpoint`` files after the fit.
        prefix: Prefix of the logged names.

    Example:
        >>> cb = ConformalPrediction(alpha=0.1, method="raps")
        >>> cb.is_fitted, sorted(cb.state_dict())
        (False, ['num_samples', 'run_id', 'settings', 'threshold'])
    """

    _owner = "ConformalPrediction"
    _not_fitted_warning = (
        "ConformalPrediction is not fitted at {stage} start: no prediction sets. Fit it (fit_on='fit_end', "
        "or fit(trainer, model)) or restore a checkpoint saved after the fit."
    )
    _kept_fit_warning = (
        "ConformalPrediction: the checkpoint was written by this run before the fit and holds no "
        "threshold; keeping the threshold fitted at the end of fit."
    )
    _lost_fit_warning = (
        "ConformalPrediction: loading a checkpoint of another run with no threshold over the fitted one; the "
        "callback is now UNFITTED. Call fit(trainer, model), or restore a checkpoint saved after the fit."
    )
    #: Registered first, so that the hook sees the module's own output even under a PostHocCalibration hook.
    _prepend_hook = True

    def __init__(
        self,
        alpha: float = 0.1,
        method: ConformalMethod = "aps",
        randomized: bool = True,
        lam: float = 0.01,
        k_reg: int = 5,
        fit_on: Literal["fit_end", "manual"] = "fit_end",
        split: Literal["val", "test"] = "val",
        logits_fn: LogitsFn | None = None,
        module: str | None = None,
        seed: int = 0,
        update_checkpoints: bool = True,
        prefix: str = "conformal/",
    ) -> None:
        super().__init__()
        check_hyperparameter(alpha, "alpha", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_choice("method", method, ("thr", "aps", "raps"))
        check_hyperparameter(lam, "lam", low=0.0)
        check_int(k_reg, "k_reg", low=0)
        check_int(seed, "seed", low=0)
        check_choice("fit_on", fit_on, ("fit_end", "manual"))
        check_choice("split", split, ("val", "test"))
        if not isinstance(randomized, bool):
            raise TypeError(f"`randomized` must be True or False, got {randomized!r}.")
        if logits_fn is not None and not callable(logits_fn):
            kind = type(logits_fn).__name__
            raise TypeError(f"`logits_fn` must be a callable (module, batch) -> logits, got {kind}.")
        if module is not None and (not isinstance(module, str) or not all(p.isidentifier() for p in module.split("."))):
            raise ValueError(f"`module` must be a dotted submodule name such as 'net' or 'model.head', got {module!r}.")
        if split == "test":
            rank_zero_warn(
                "ConformalPrediction(split='test') fits the threshold on the TEST set: the test coverage is then not "
                "a held-out estimate. Fit on validation data (split='val') instead."
            )
        self.alpha, self.method, self.randomized = float(alpha), method, randomized and method != "thr"
        self.lam, self.k_reg, self.seed = float(lam), k_reg, seed
        self.fit_on, self.split, self.logits_fn, self.module = fit_on, split, logits_fn, module
        self.update_checkpoints, self.prefix = bool(update_checkpoints), prefix
        self.threshold: float | None = None
        self.num_samples = 0
        self.test_metrics: dict[str, float] = {}
        self.predicted_sets: list[Tensor] = []
        self._captured: list[Tensor] = []
        self._generator: torch.Generator | None = None
        self._coverage = PredictionSetCoverage()
        self._size = PredictionSetSize()
        self._padding = _SamplerPadding()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, alpha=self.alpha)

    @property
    def is_fitted(self) -> bool:
        """Whether the threshold is fitted (by :meth:`fit` or from a checkpoint)."""
        return self.threshold is not None

    def _settings(self) -> dict[str, Any]:
        return {"method": self.method, "randomized": self.randomized, "lam": self.lam, "k_reg": self.k_reg}

    # ------------------------------------------------------------------ fitting

    def calibration_scores(self, logits: Tensor, target: Tensor) -> Tensor:
        """The validation scores of ``(logits, target)`` with this callback's settings and seeded uniforms."""
        generator = torch.Generator().manual_seed(self.seed)
        return conformal_scores(
            logits.float(), target, self.method, self.randomized, None, self.lam, self.k_reg, "logits", generator
        )

    def fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: DataLoader | None = None) -> float:
        """Collect and gather the validation logits, fit the threshold; returns it. Collective under DDP."""
        logits, target, _ = self._gathered(trainer, pl_module, dataloader)
        threshold = float(conformal_quantile(self.calibration_scores(logits.cpu(), target.cpu()), self.alpha))
        if trainer.world_size > 1:
            threshold = float(trainer.strategy.broadcast(threshold, src=0))
        self.threshold, self.num_samples = threshold, int(logits.shape[0])
        rank_zero_info(
            f"ConformalPrediction ({self.method}, alpha={self.alpha:g}) fitted on {self.num_samples} {self.split} "
            f"samples: threshold {self.threshold:.6g}"
        )
        self._update_checkpoints(trainer)
        return threshold

    @override
    def _fit_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit(trainer, pl_module)

    def prediction_sets(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Boolean ``(N, C)`` prediction sets of ``logits`` (uniforms from ``generator`` when randomised)."""
        if self.threshold is None:
            raise RuntimeError("ConformalPrediction is not fitted: call fit(trainer, model) or restore a checkpoint.")
        return prediction_sets(
            logits.float(), self.threshold, self.method, self.randomized, None, self.lam, self.k_reg, "logits",
            generator,
        )  # fmt: skip

    # ------------------------------------------------------------------ test / predict

    @override
    def _forward_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._captured and isinstance(output, Tensor) and output.is_floating_point() and output.ndim == 2:
            self._captured.append(output.detach())

    @override
    def _detach(self) -> None:
        super()._detach()
        self._captured = []
        self._generator = None  # per stage; a torch.Generator cannot be sent to ddp_spawn's processes

    @override
    def _stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage == "test":
            for metric in (self._coverage, self._size):
                metric.reset()
                metric.to(pl_module.device)
            self._padding = _SamplerPadding.of(trainer, trainer.test_dataloaders)
        else:
            self.predicted_sets = []
        if self._attach(pl_module, stage):
            self._generator = torch.Generator().manual_seed(self.seed + 1 + trainer.global_rank)

    @override
    def _batch_start(self) -> None:
        self._captured = []

    def _batch_sets(self, stage: Stage) -> Tensor | None:
        captured, self._captured = self._captured, []
        if self._hook is None:
            return None
        if not captured:
            where = "the LightningModule's forward" if self.module is None else f"the submodule {self.module!r}"
            raise RuntimeError(
                f"ConformalPrediction read no logits in this {stage} batch: the step never called {where}. Name the "
                "submodule that computes the logits, e.g. ConformalPrediction(module='net') when the step calls "
                "self.net(x), or call self(x) in the step."
            )
        return self.prediction_sets(captured[0], self._generator)

    @override
    def _batch_end(self, pl_module: pl.LightningModule, batch: Any, stage: Stage) -> None:
        sets = self._batch_sets(stage)
        if sets is None:
            return
        if stage == "predict":
            self.predicted_sets.append(sets.cpu())
            return
        _, target, _ = unpack_batch(batch)
        if target is None:
            return
        sets, target = self._padding.drop(sets, target)
        self._coverage.update(sets, target)
        self._size.update(sets)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is None:
            return
        coverage, size = self._coverage.compute(), self._size.compute()  # reduced across processes
        self.test_metrics = {
            "coverage": float(coverage),
            "set_size": float(size),
        }
        pl_module.log(f"{self.prefix}coverage", coverage.to(pl_module.device), sync_dist=False)
        pl_module.log(f"{self.prefix}set_size", size.to(pl_module.device), sync_dist=False)

    # ------------------------------------------------------------------ checkpoint

    @override
    def _fitted_state(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "num_samples": self.num_samples, "settings": self._settings()}

    @override
    def _holds_fit(self, state_dict: dict[str, Any]) -> bool:
        return state_dict.get("threshold") is not None

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        settings = state_dict.get("settings")
        if settings is not None and settings != self._settings():
            raise ValueError(
                f"ConformalPrediction: the checkpoint's threshold was fitted with {settings}, this callback has "
                f"{self._settings()}. Build the callback with the checkpoint's settings, or fit it again."
            )
        super().load_state_dict(state_dict)

    @override
    def _load_fitted_state(self, state_dict: dict[str, Any]) -> None:
        incoming = state_dict.get("threshold")
        self.threshold = None if incoming is None else float(incoming)
        self.num_samples = int(state_dict.get("num_samples", 0))

"""``UnlearningEvaluation``: forget / retain / held-out metrics at every validation epoch, reduced across processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_losses.functional.unlearning import truth_ratio
from lightning_losses.metrics.unlearning import (
    UnlearningSplitStatistics,
    auc_score,
    ks_2samp_pvalue,
    zlib_length,
)

__all__ = ["UnlearningEvaluation"]

_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
_STATISTICS = (*_ATTACKS, "truth_ratio")


class UnlearningEvaluation(Callback):
    r"""Evaluate unlearning on every validation epoch: NLL per split, truth ratio, membership-inference AUC and
    forget quality.

    The validation dataloaders are the splits named by ``split_names``, in order (``UnlearningDataModule`` gives
    forget, retain and held-out). Batches are dicts with ``input_ids``, ``labels`` and ``index``; the LightningModule
    must provide ``unlearning_token_statistics(batch)`` (the :class:`~lightning_losses.UnlearningMixin` does).

    Logged (under ``prefix``):

    * ``<split>_nll``: token-mean NLL of each split;
    * ``<split>_truth_ratio``: where the split's batches carry perturbed answers (``perturbed_input_ids`` /
      ``perturbed_labels``, ``(B, K, T)``, and optionally a reworded correct answer ``paraphrased_input_ids`` /
      ``paraphrased_labels``, ``(B, T)``; see :meth:`~lightning_losses.UnlearningMixin.truth_ratio_log_probs`), the
      mean over samples of :math:`\min(R, 1/R)` with :math:`R` TOFU's truth ratio
      (:func:`~lightning_losses.functional.truth_ratio`): 1 when the model cannot tell the correct answer from the
      perturbed ones, near 0 when it strongly prefers one side;
    * ``mia_auc_<attack>``: AUC of the LOSS, zlib, min-k% and min-k%++ attacks separating ``member_split`` (trained
      on) from ``nonmember_split`` (never trained on); 0.5 = the forget set looks unseen;
    * ``forget_quality``: KS-test p-value of the per-sample ``statistic`` on the member split against
      ``reference_statistics`` (the same statistic of a model never trained on the forget data), when given. With
      ``statistic="truth_ratio"`` this is TOFU's forget quality (the per-sample ratios :math:`R`).

    Per-sample values are gathered with their index across processes and de-duplicated, so DDP gives the
    single-process numbers. The history of every epoch's results is checkpointed.

    Args:
        split_names: the name of each validation dataloader, in order.
        member_split: the split the model was trained on and must forget.
        nonmember_split: the split never trained on.
        reference_statistics: per-sample reference values for forget quality, or ``None``.
        statistic: which per-sample statistic forget quality compares (``"loss"``, ``"min_k"``, ``"min_k_plus_plus"``,
            ``"zlib"`` or ``"truth_ratio"``).
        k: fraction of lowest tokens of the min-k% attacks.
        tokenizer: optional tokenizer (``decode``) for the zlib attack's text; token ids are compressed otherwise.
        prefix: prefix of the logged names.

    Example:
        >>> cb = UnlearningEvaluation()
        >>> cb.split_names
        ('forget', 'retain', 'heldout')
    """

    def __init__(
        self,
        split_names: Sequence[str] = ("forget", "retain", "heldout"),
        member_split: str = "forget",
        nonmember_split: str = "heldout",
        reference_statistics: Tensor | None = None,
        statistic: str = "loss",
        k: float = 0.2,
        tokenizer: Any | None = None,
        prefix: str = "unlearn/",
    ) -> None:
        self.split_names = tuple(split_names)
        if len(set(self.split_names)) != len(self.split_names) or not self.split_names:
            raise ValueError(f"`split_names` must be distinct and non-empty, got {list(split_names)}.")
        for name, value in (("member_split", member_split), ("nonmember_split", nonmember_split)):
            if value not in self.split_names:
                raise ValueError(f"`{name}`={value!r} is not one of split_names {list(self.split_names)}.")
        if statistic not in _STATISTICS:
            raise ValueError(f"`statistic` must be one of {list(_STATISTICS)}, got {statistic!r}.")
        if reference_statistics is not None and reference_statistics.numel() < 2:
            raise ValueError("`reference_statistics` needs at least two values for a KS test.")
        if not 0 < k <= 1:
            raise ValueError(f"`k` must lie in (0, 1], got {k}.")
        self.member_split, self.nonmember_split = member_split, nonmember_split
        self.reference_statistics = None if reference_statistics is None else reference_statistics.detach().cpu()
        self.statistic, self.k, self.tokenizer, self.prefix = statistic, k, tokenizer, prefix
        self.metrics: dict[str, UnlearningSplitStatistics] = {}
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(split_names=self.split_names, prefix=self.prefix)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics = {name: UnlearningSplitStatistics(k=self.k).to(pl_module.device) for name in self.split_names}

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
        if dataloader_idx >= len(self.split_names):
            raise ValueError(
                f"Validation dataloader {dataloader_idx} has no name: split_names has {len(self.split_names)} entries "
                f"({list(self.split_names)}). Name every validation dataloader."
            )
        statistics = getattr(pl_module, "unlearning_token_statistics", None)
        if statistics is None:
            raise TypeError(
                f"{type(pl_module).__name__} has no `unlearning_token_statistics(batch)`; add the UnlearningMixin."
            )
        if not isinstance(batch, dict) or "index" not in batch:
            raise ValueError("UnlearningEvaluation needs dict batches with an 'index' entry (a unique id per sample).")
        lp, mu, sigma, mask = statistics(batch)
        ids = batch["input_ids"][:, 1:]
        z = zlib_length(ids, mask, self.tokenizer).to(lp.device)
        ratios = None
        answers = getattr(pl_module, "truth_ratio_log_probs", None)
        pair = answers(batch) if answers is not None else None
        if pair is not None:
            ratios = truth_ratio(*pair)
        elif answers is None and "perturbed_input_ids" in batch:
            raise TypeError(
                f"{type(pl_module).__name__} has no `truth_ratio_log_probs(batch)` for the perturbed answers of the "
                "batch; add the UnlearningMixin."
            )
        self.metrics[self.split_names[dataloader_idx]].update(lp, mask, batch["index"], mu, sigma, z, ratios)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.metrics:
            return
        results = self.compute()
        self.last = results
        self.history.append({"epoch": float(trainer.current_epoch), **results})
        for name, value in results.items():
            pl_module.log(self.prefix + name, value, add_dataloader_idx=False)

    def compute(self) -> dict[str, float]:
        """The results of the current epoch (every process gets the same numbers)."""
        per_split = {name: metric.compute() for name, metric in self.metrics.items() if metric.update_count > 0}
        results: dict[str, float] = {}
        for name, stats in per_split.items():
            results[f"{name}_nll"] = float(stats["nll"])
            ratios = stats["truth_ratio"]
            ratios = ratios[torch.isfinite(ratios)]
            if ratios.numel():
                results[f"{name}_truth_ratio"] = float(torch.minimum(ratios, 1 / ratios).mean())
        member, nonmember = per_split.get(self.member_split), per_split.get(self.nonmember_split)
        if member is not None and nonmember is not None and member["loss"].numel() and nonmember["loss"].numel():
            labels = torch.cat(
                [
                    torch.ones(member["loss"].numel(), dtype=torch.bool),
                    torch.zeros(nonmember["loss"].numel(), dtype=torch.bool),
                ]
            )
            for attack in _ATTACKS:
                scores = torch.cat([member[attack].cpu(), nonmember[attack].cpu()])
                if bool(torch.isfinite(scores).all()):
                    results[f"mia_auc_{attack}"] = float(auc_score(scores, labels))
        if member is not None and self.reference_statistics is not None:
            values = member[self.statistic].cpu()
            if self.statistic == "truth_ratio" and not bool(torch.isfinite(values).all()):
                raise ValueError(
                    f"forget quality on the truth ratio needs perturbed answers for every sample of the "
                    f"{self.member_split!r} split, but {int((~torch.isfinite(values)).sum())} of {values.numel()} have "
                    "none. Add 'perturbed_input_ids' / 'perturbed_labels' to its batches, or choose another "
                    "`statistic`."
                )
            if values.numel() >= 2:
                results["forget_quality"] = float(ks_2samp_pvalue(values, self.reference_statistics))
        return results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last = dict(state_dict.get("last", {}))

"""Unlearning metrics against scikit-learn / SciPy, de-duplication, and 2-process equivalence (metrics and the
precomputed reference)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_losses import UnlearningEvaluation
from lightning_losses.metrics.unlearning import (
    ForgetQuality,
    MembershipInferenceAUC,
    TruthRatio,
    UnlearningSplitStatistics,
    auc_score,
    ks_2samp_pvalue,
    ks_statistic,
    zlib_length,
)
from tests.helpers.distributed import run_distributed


def test_auc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=g).float()  # many ties
    members = torch.rand(300, generator=g) < 0.4
    assert auc_score(scores, members).item() == pytest.approx(metrics.roc_auc_score(members, scores), abs=1e-6)
    m = MembershipInferenceAUC()
    m.update(scores[:100], members[:100])
    m.update(scores[100:], members[100:])
    assert m.compute().item() == pytest.approx(metrics.roc_auc_score(members, scores), abs=1e-6)
    # perfectly separated and reversed
    assert auc_score(torch.tensor([2.0, 3.0, 0.0]), torch.tensor([True, True, False])).item() == 1.0
    assert auc_score(torch.tensor([0.0, 3.0]), torch.tensor([True, False])).item() == 0.0


def test_auc_is_torchmetrics_auroc_and_keeps_large_scores_apart():
    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(2)
    probs = torch.rand(200, generator=g)
    members = torch.rand(200, generator=g) < 0.5
    assert auc_score(probs, members).item() == pytest.approx(binary_auroc(probs, members.long()).item(), abs=1e-6)
    # large scores: a sigmoid (what binary_auroc applies to values outside [0, 1]) merges them all into 1.0
    large = 70.0 - 10.0 * torch.arange(6.0)
    who = torch.tensor([True, True, True, False, False, False])
    assert binary_auroc(large, who.long()).item() == 0.5
    assert auc_score(large, who).item() == 1.0 == auc_score(-large, ~who).item()


def test_ks_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(120, generator=g), torch.randn(90, generator=g) * 1.3 + 0.3
    ref = stats.ks_2samp(a.numpy(), b.numpy(), method="asymp")
    assert ks_statistic(a, b).item() == pytest.approx(ref.statistic, abs=1e-9)
    en = (120 * 90 / 210) ** 0.5
    assert ks_2samp_pvalue(a, b).item() == pytest.approx(stats.kstwobign.sf(en * ref.statistic), rel=1e-6)
    assert ks_2samp_pvalue(a, a).item() == 1.0
    fq = ForgetQuality(reference=b)
    fq.update(a[:60])
    fq.update(a[60:])
    assert fq.compute().item() == pytest.approx(ks_2samp_pvalue(a, b).item())


def test_truth_ratio_is_a_geometric_mean_ratio():
    tr = TruthRatio()
    tr.update(torch.tensor([-1.0, -2.0]), torch.tensor([[-1.5, -2.5], [-2.0, -2.0]]))
    ratios = tr.values()
    torch.testing.assert_close(ratios, torch.exp(torch.tensor([-2.0 - -1.0, 0.0])))
    assert tr.compute().item() == pytest.approx((float(torch.exp(torch.tensor(-1.0))) + 1.0) / 2)


def test_split_statistics_drop_duplicates_and_use_zlib():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ids = torch.tensor([[5, 6, 7], [1, 1, 9]])
    z = zlib_length(ids, mask)
    stats = UnlearningSplitStatistics(k=0.5)
    stats.update(lp, mask, torch.tensor([10, 3]), zlib=z)
    stats.update(lp[:1], mask[:1], torch.tensor([10]), zlib=z[:1])
    out = stats.compute()
    assert out["index"].tolist() == [3, 10]
    assert out["nll"].item() == pytest.approx((1 + 2 + 3 + 0.5 + 0.5) / 5)
    assert out["zlib"].tolist() == pytest.approx([-1.0 / z[1].item(), -6.0 / z[0].item()])
    assert out["min_k"].tolist() == pytest.approx([-0.5, -2.5])


def test_callback_configuration_errors():
    with pytest.raises(ValueError, match="is not one of split_names"):
        UnlearningEvaluation(split_names=("forget", "retain"))
    with pytest.raises(ValueError, match="`statistic` must be one of"):
        UnlearningEvaluation(statistic="rouge")
    with pytest.raises(ValueError, match="at least two values"):
        UnlearningEvaluation(reference_statistics=torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------- DDP


def _data(n: int = 10):
    g = torch.Generator().manual_seed(7)
    lp = -torch.rand(n, 6, generator=g) * 4
    mask = torch.rand(n, 6, generator=g) > 0.2
    mask[:, 0] = True
    return lp, mask


def _statistics(lp, mask, index):
    stats = UnlearningSplitStatistics(k=0.3)
    for i in range(0, len(index), 3):
        sl = slice(i, i + 3)
        stats.update(lp[sl], mask[sl], index[sl], zlib=mask[sl].sum(-1).float() + 1)
    return {k: v.clone() for k, v in stats.compute().items()}


def _forget_items():
    from tests.modules.test_unlearning import items

    return items(9, 0, 1)


def _tiny_module():
    from lightning_losses import UnlearningModule
    from tests.modules.test_unlearning import tiny_lora

    return UnlearningModule(tiny_lora(), method="npo")


def _ddp_worker(rank: int, world_size: int):
    from lightning_losses.data.unlearning import UnlearningBatchCollator

    lp, mask = _data()
    # 9 samples over 2 ranks: the DistributedSampler pads one rank with a repeated sample
    sampler = DistributedSampler(range(9), num_replicas=world_size, rank=rank, shuffle=True, seed=3)
    index = torch.tensor(list(sampler))
    stats = _statistics(lp[index], mask[index], index)
    # the precomputed reference over a padded shard (9 forget samples, 5 per rank)
    module = _tiny_module()
    data = _forget_items()
    loader = DataLoader(
        data,
        batch_size=3,
        sampler=DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False),
        collate_fn=UnlearningBatchCollator(2),
    )

    def reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    module.precompute_reference(loader, reduce)
    return stats, module.unlearning_reference_logps.clone(), module.unlearning_reference_known.clone()


@pytest.mark.ddp
def test_two_process_metrics_and_precomputed_reference_equal_single_process():
    from lightning_losses.data.unlearning import UnlearningBatchCollator

    lp, mask = _data()
    single = _statistics(lp[:9], mask[:9], torch.arange(9))
    module = _tiny_module()
    module.precompute_reference(DataLoader(_forget_items(), batch_size=4, collate_fn=UnlearningBatchCollator(2)))
    results = run_distributed(_ddp_worker, world_size=2)
    # each rank computed on half the data; torchmetrics gathered the states; de-duplication gives the full set
    for stats, ref, known in results:
        for key, value in single.items():
            torch.testing.assert_close(stats[key], value, equal_nan=True, msg=key)
        assert bool(known.all()) and known.numel() == 9
        torch.testing.assert_close(ref, module.unlearning_reference_logps, rtol=1e-5, atol=1e-5)

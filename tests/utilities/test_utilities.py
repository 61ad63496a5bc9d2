"""The shared utilities layer: numerics, checks and distributed helpers, against naive references and properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_losses.utilities.checks import DeferredChecks, check_labels, check_reduction, start_checks
from lightning_losses.utilities.distributed import (
    all_gather_rows,
    all_reduce,
    rank_and_world_size,
    shard_dataloader,
    shard_indices,
)
from lightning_losses.utilities.numerics import (
    as_float32,
    autocast_disabled,
    compute_dtype,
    expand_hyperparameter,
    hyperparameter_tensor,
    kl_from_log_probs,
    reduce_loss,
)
from tests.helpers.distributed import run_distributed

# ------------------------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_losses_compute_in_float32_or_float64(dtype: torch.dtype) -> None:
    x = torch.randn(3, 4).to(dtype)
    (y,) = as_float32(x)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == compute_dtype(dtype) == expected
    assert torch.equal(y, x.to(expected))
    assert as_float32(torch.arange(3))[0].dtype == torch.long  # non-floating tensors are left alone


def test_autocast_disabled_keeps_the_log_softmax_in_float32() -> None:
    x = torch.randn(8, 16)
    w = torch.randn(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16
        with autocast_disabled(x):
            assert (x @ w).dtype == torch.float32
            log_p = torch.log_softmax(x @ w, dim=-1)
    assert torch.equal(log_p, torch.log_softmax(x @ w, dim=-1))


def test_kl_from_log_probs_matches_torch_kl_div() -> None:
    log_p = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    log_q = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    reference = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    assert torch.allclose(kl_from_log_probs(log_p, log_q), reference)
    assert torch.allclose(kl_from_log_probs(log_p, log_q, dim=None), reference.sum())
    assert float(kl_from_log_probs(log_p, log_p).abs().max()) == 0.0


def test_reduce_loss_masks_divides_and_gives_zero_on_empty_batches() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(reduce_loss(values, "none", mask=mask), values * mask)
    assert float(reduce_loss(values, "sum", mask=mask)) == 8.0
    assert float(reduce_loss(values, "mean", mask=mask)) == 8.0 / 3.0
    assert float(reduce_loss(values, "mean", mask=mask, num_items_in_batch=torch.tensor(4))) == 2.0
    assert float(reduce_loss(values[0], "batchmean")) == 1.5
    empty = torch.zeros(0, requires_grad=True)
    loss = reduce_loss(empty, "mean")
    loss.backward()
    assert float(loss) == 0.0 and empty.grad is not None
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        reduce_loss(values, "max")


def test_hyperparameter_tensor_layouts() -> None:
    like = torch.zeros(3, 2, 5, dtype=torch.float64)
    per_sample = torch.tensor([1.0, 2.0, 3.0])
    t = hyperparameter_tensor(per_sample, like, "tau", positive=True)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float64 and torch.equal(t.flatten(), per_sample.double())
    rows = hyperparameter_tensor(per_sample, like, "tau", layout="row", lead_shape=like.shape[:-1])
    assert torch.equal(rows, per_sample.double().repeat_interleave(2))
    per_token = torch.rand(3, 2)
    lead = like.shape[:-1]
    kept = hyperparameter_tensor(per_token, like, "tau", layout="row", lead_shape=lead, keep_tensor_dtype=True)
    assert kept.dtype == torch.float32 and torch.equal(kept, per_token.reshape(-1))
    position = hyperparameter_tensor(2.0, like, "tau", layout="position", lead_shape=like.shape[:-1])
    assert position.shape == (3, 2) and bool((position == 2.0).all())
    assert torch.equal(expand_hyperparameter(per_sample, torch.Size([3, 2]), "tau")[:, 1], per_sample)
    grad_source = torch.tensor(0.5, requires_grad=True)
    hyperparameter_tensor(grad_source, like, "beta", low=0.0, high=1.0).sum().backward()
    assert grad_source.grad is not None  # a tensor hyperparameter keeps its graph


@pytest.mark.parametrize(
    ("value", "kwargs", "match"),
    [
        (-1.0, {"positive": True}, r"`tau` must be > 0 and finite, got -1.0"),
        (1.5, {"low": 0.0, "high": 1.0}, r"`tau` must lie in \[0, 1\], got 1.5"),
        (float("nan"), {}, r"`tau` must be finite"),
        (torch.ones(2), {}, r"`tau` must be a scalar or have one value per sample \(shape \(3,\)\)"),
    ],
)
def test_hyperparameter_tensor_rejects_bad_values(value: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hyperparameter_tensor(value, torch.zeros(3, 4), "tau", **kwargs)  # type: ignore[arg-type]


def test_tensor_value_checks_are_deferred_to_one_run() -> None:
    checks = start_checks(True, (torch.ones(2), "logits"))
    hyperparameter_tensor(torch.tensor(-1.0), torch.zeros(2), "tau", positive=True, checks=checks)
    check_labels(torch.tensor([0, 9, -100]), 5, -100, checks)
    with pytest.raises(ValueError, match=r"`tau` must be > 0"):  # queued in order, raised at run()
        checks.run()
    labels_only = DeferredChecks()
    check_labels(torch.tensor([0, 9, -100]), 5, -100, labels_only)
    with pytest.raises(ValueError, match=r"`labels` holds token ids outside \[0, 5\) .*: \[9\]"):
        labels_only.run()
    start_checks(False, (torch.tensor([float("nan")]), "logits")).run()  # validate_args=False: nothing read


def test_check_reduction_pairs_num_items_with_the_mean() -> None:
    check_reduction("mean", num_items_in_batch=4)
    with pytest.raises(ValueError, match=r"`reduction` must be one of 'mean', 'sum', 'none'; got 'max'"):
        check_reduction("max")
    with pytest.raises(ValueError, match=r"num_items_in_batch.*reduction='mean'"):
        check_reduction("sum", num_items_in_batch=4)


# --------------------------------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize(("total", "world"), [(7, 2), (5, 3), (2, 4), (0, 2)])
@pytest.mark.parametrize("pad", [False, True])
def test_shards_cover_every_sample_once(total: int, world: int, pad: bool) -> None:
    shares = [shard_indices(total, r, world, pad=pad) for r in range(world)]
    if pad:
        assert len({len(s) for s in shares}) == 1  # the same number of samples on every process
    real = [s[: len(range(r, total, world))] for r, s in enumerate(shares)]  # without the repeats at the end
    assert sorted(i for s in real for i in s) == list(range(total))


def test_shard_dataloader_reads_the_share_in_order() -> None:
    loader = DataLoader(list(range(7)), batch_size=2, shuffle=True)
    batches = [b.tolist() for b in shard_dataloader(loader, rank=1, world_size=3, pad=True)]
    assert batches == [[1, 4], [4]]


def test_one_process_communicates_nothing() -> None:
    x = torch.randn(3, 2)
    assert rank_and_world_size() == (0, 1)
    assert all_gather_rows(x) is x and all_reduce(x) is x


def _gather_and_reduce(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    rows = torch.arange(6.0).reshape(3, 2)[: rank + 1].clone().requires_grad_(True)  # 1 row on rank 0, 2 on rank 1
    gathered = all_gather_rows(rows, grad=True)
    (gathered * torch.arange(1.0, gathered.shape[0] * 2 + 1).reshape(-1, 2)).sum().backward()
    return {
        "gathered": gathered.detach(),
        "no_grad": all_gather_rows(rows.detach() + 10.0),
        "grad": rows.grad.clone(),
        "sum": all_reduce(torch.tensor([float(rank + 1)])),
        "mean": all_reduce(torch.tensor([float(rank + 1)]), op="mean"),
        "max": all_reduce(torch.tensor([float(rank + 1)]), op="max"),
    }


def test_padded_all_gather_and_reduce_on_two_processes() -> None:
    results = run_distributed(_gather_and_reduce, world_size=2)
    expected = torch.cat([torch.arange(6.0).reshape(3, 2)[:1], torch.arange(6.0).reshape(3, 2)[:2]])
    weights = torch.arange(1.0, 7.0).reshape(3, 2)
    for result in results:
        assert torch.equal(result["gathered"], expected)  # rank order, padding dropped
        assert torch.equal(result["no_grad"], expected + 10.0)
        assert float(result["sum"]) == 3.0 and float(result["mean"]) == 1.5 and float(result["max"]) == 2.0
    # the gradient of each rank's rows is the sum over ranks of the gradient of the (same) global loss
    assert torch.equal(results[0]["grad"], 2 * weights[:1])
    assert torch.equal(results[1]["grad"], 2 * weights[1:])

"""Batch-level calibration penalties (MMCE, MDCA, DCA) across processes: a 2-process run with unequal local
batches equals one process on the concatenated batch, in value and in DDP's averaged gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_losses.functional.calibration import dca_loss, mdca_loss, mmce_loss
from lightning_losses.losses.calibration import DCALoss, MDCALoss, MMCELoss
from tests.helpers.distributed import run_distributed

_PENALTIES = {
    "mmce": lambda z, y, sync: mmce_loss(z, y, 0.4, sync_dist=sync),
    "mdca": lambda z, y, sync: mdca_loss(z, y, sync_dist=sync),
    "dca": lambda z, y, sync: dca_loss(z, y, sync_dist=sync),
}


def _problem(n: int = 19) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)
    layer = torch.nn.Linear(5, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 5, generator=g))
        layer.bias.copy_(torch.randn(4, generator=g))
    return x, y, layer


def _split(rank: int, sizes: tuple[int, int]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _penalty_worker(rank: int, world_size: int, all_sizes: list[tuple[int, int]]) -> list[dict[str, object]]:
    return [_penalties(rank, world_size, sizes) for sizes in all_sizes]


def _penalties(rank: int, world_size: int, sizes: tuple[int, int]) -> dict[str, object]:
    x, y, layer = _problem(sum(sizes))
    part = _split(rank, sizes)
    out: dict[str, object] = {}
    for name, fn in _PENALTIES.items():
        layer.zero_grad()
        value = fn(layer(x[part]), y[part], True)
        value.backward()
        grad = layer.weight.grad.clone()  # type: ignore[union-attr]
        dist.all_reduce(grad)  # DDP: gradients are averaged over processes
        out[name] = (float(value), grad / world_size)
        out[name + "_local"] = float(fn(layer(x[part]), y[part], False))
    with torch.no_grad():
        modules = {"mmce": MMCELoss(weight=1.0), "mdca": MDCALoss(), "dca": DCALoss()}
        out["modules"] = {k: float(m.penalty(layer(x[part]), y[part])) for k, m in modules.items()}
    with torch.inference_mode():  # validation / test steps run under inference mode
        out["inference"] = float(mdca_loss(layer(x[part]), y[part], sync_dist=True))
    return out


@pytest.mark.ddp
def test_penalties_two_processes_equal_one_process_on_the_concatenation() -> None:
    all_sizes = [(7, 12), (11, 0)]  # unequal local batches; one rank with an empty batch
    per_rank = run_distributed(_penalty_worker, all_sizes)
    for i, sizes in enumerate(all_sizes):
        _check_against_one_process([r[i] for r in per_rank], sizes)


def _check_against_one_process(results: list[dict[str, object]], sizes: tuple[int, int]) -> None:
    x, y, layer = _problem(sum(sizes))
    for name, fn in _PENALTIES.items():
        layer.zero_grad()
        expected = fn(layer(x), y, False)
        expected.backward()
        for r in results:
            value, grad = r[name]  # type: ignore[misc]
            assert value == pytest.approx(expected.item(), rel=1e-6, abs=1e-7), name
            assert torch.allclose(grad, layer.weight.grad, rtol=1e-5, atol=1e-7), name  # type: ignore[arg-type]
            assert r["modules"][name] == pytest.approx(expected.item(), rel=1e-6, abs=1e-7), name  # type: ignore[index]
        local = float(fn(layer(x[: sizes[0]]), y[: sizes[0]], False))
        assert results[0][name + "_local"] == pytest.approx(local, rel=1e-6)
    assert results[0]["inference"] == pytest.approx(float(mdca_loss(layer(x), y)), rel=1e-6)

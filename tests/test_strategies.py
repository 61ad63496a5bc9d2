"""Every family under Lightning's sharded and spawned strategies on CPU, each equal to one process on the same batches.

* **FSDP2**: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` in
  ``configure_model``; 2 gloo processes started here, which Lightning joins. All families run in the same two
  processes (one start-up), each cell then compares its family with the single-process run.
* **ddp_spawn**: Lightning spawns the 2 processes; the trained state must come back to the launching process.
* **FSDP1 and DeepSpeed** refuse CPU in Lightning 2.6: their tests need CUDA (skipped without it).

Rank ``r`` reads samples ``r, r + 2, r + 4, ...`` in order, so the two local batches of a step are together the
single-process batch of that step; no model has dropout or batch statistics, so the averaged gradients are the
single-process gradients.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from lightning_losses import (
    CalibrationLossMixin,
    DistillationMixin,
    DistillationModule,
    HyperparameterSchedule,
    PostHocCalibration,
    TempNetModule,
    UnlearningModule,
)
from lightning_losses.callbacks.schedules import LinearSchedule
from tests.helpers.trainer import cpu_trainer

WORLD, GLOBAL_BATCH, STEPS = 2, 8, 3
N = GLOBAL_BATCH * STEPS
CLASSES = 3
VOCAB, LENGTH = 48, 12  # the tiny language models (as in tests/modules/test_unlearning.py)


# ---------------------------------------------------------------------------------------------------- data
def _classification_data(n: int = N, classes: int = CLASSES, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 6, generator=g) + F.one_hot(y, 6).float() * 1.5
    return TensorDataset(x, y, torch.arange(n))


def _local_loader(data: Dataset, trainer: pl.Trainer, collate: Callable | None = None) -> DataLoader:
    """This rank's share ``r, r + W, ...`` in order, in batches of ``GLOBAL_BATCH / W``."""
    world = trainer.world_size
    sampler = DistributedSampler(data, world, trainer.global_rank, shuffle=False) if world > 1 else None
    return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate)


class Shards(pl.LightningDataModule):
    """Training data split by rank in order (see the module docstring); validation data whole, for calibration."""

    def __init__(self, train: Dataset, val: Dataset | None = None) -> None:
        super().__init__()
        self.train, self.val = train, val

    def train_dataloader(self) -> DataLoader:
        return _local_loader(self.train, self.trainer)

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None
        return DataLoader(self.val, batch_size=16)


class UnlearningShards(pl.LightningDataModule):
    """Forget and retain sets, each split by rank in order, combined per step."""

    def train_dataloader(self) -> CombinedLoader:
        from lightning_losses.data.unlearning import UnlearningBatchCollator
        from tests.modules.test_unlearning import items

        collate = UnlearningBatchCollator(2)
        loaders = {
            "forget": _local_loader(items(N, 0, 1), self.trainer, collate),
            "retain": _local_loader(items(N, 100, 2), self.trainer, collate),
        }
        return CombinedLoader(loaders, mode="min_size")


# ---------------------------------------------------------------------------------------------------- modules
def _mesh(module: pl.LightningModule) -> Any:
    """The data-parallel mesh under ModelParallelStrategy, ``None`` on one process."""
    mesh = module.device_mesh
    return None if mesh is None else mesh["data_parallel"]


def _shard(module: pl.LightningModule, *children: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(module)
    if mesh is not None:
        for child in children:
            fully_shard(child, mesh=mesh)


def _mlp(out: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, out))


class ShardedDistillation(DistillationModule):
    """DistillationModule whose student is sharded; the teacher too when ``shard_teacher`` is set."""

    shard_teacher = False

    def configure_model(self) -> None:
        _shard(self, self.student)
        if self.shard_teacher:
            self.shard_teachers()


class ShardedTempNet(TempNetModule):
    """TempNetModule with the model and TempNet sharded, trained by SGD.

    (Adam would turn the rounding noise of gradients that are zero in exact arithmetic, such as those of GPT-2's key
    biases, into full-size steps, so two exact runs could differ by a learning rate.)
    """

    def configure_model(self) -> None:
        _shard(self, self.model, self.tempnet)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.tempnet_parameter_groups(self.lr, self.weight_decay))


class ShardedUnlearning(UnlearningModule):
    """UnlearningModule with the whole (PEFT) model as the only FSDP2 unit, trained by SGD."""

    def configure_model(self) -> None:
        _shard(self, self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class BlockShardedUnlearning(ShardedUnlearning):
    """The same with every transformer block its own FSDP2 unit inside the root."""

    def configure_model(self) -> None:
        blocks = self.model.get_base_model().transformer.h  # type: ignore[operator]
        _shard(self, *blocks, self.model)


class LMDistillation(DistillationMixin, pl.LightningModule):
    """Token-level distillation of a GPT-2 into a smaller one from hidden states (the chunked LLM path)."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_losses import GeneralizedJSDLoss
        from lightning_losses.demos import build_gpt2

        self.student = build_gpt2(VOCAB, n_layer=1, n_embd=32, n_head=2, block_size=LENGTH, seed=5)
        teacher = build_gpt2(VOCAB, n_layer=2, n_embd=48, n_head=2, block_size=LENGTH, seed=6)
        self.configure_distillation(teacher, loss=GeneralizedJSDLoss(beta=0.5))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.causal_lm_distillation_loss(self.student, batch[0])

    def configure_model(self) -> None:
        _shard(self, self.student)
        if _mesh(self) is not None:
            self.shard_teachers()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.5)


class FocalClassifier(CalibrationLossMixin, pl.LightningModule):
    """A classifier trained with the focal loss (the calibration family's train-time part)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(CLASSES, seed=3)
        self.configure_calibration_loss("focal")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = batch
        return self.calibration_loss(self(x), y)

    def configure_model(self) -> None:
        _shard(self, self.net)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


# ---------------------------------------------------------------------------------------------------- families
def _kd() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    module = ShardedDistillation(
        _mlp(CLASSES, seed=1), _mlp(CLASSES, seed=2), method="kd", num_classes=CLASSES, scheduler="none", lr=0.2
    )
    return module, Shards(_classification_data()), []


def _dkd() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    module = ShardedDistillation(
        _mlp(CLASSES, seed=1),
        _mlp(CLASSES, seed=2),
        method="dkd",
        num_classes=CLASSES,
        warmup_epochs=1,
        scheduler="none",
        lr=0.2,
    )
    module.shard_teacher = True
    return module, Shards(_classification_data()), []


def _tempnet() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    torch.manual_seed(0)
    module = ShardedTempNet(_mlp(5, seed=4), num_classes=5, rho=0.5, hidden_dim=8, dropout=0.0, lr=0.5, tempnet_lr=0.5)
    return module, Shards(_classification_data(classes=5)), []


def _unlearning() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    from tests.modules.test_unlearning import tiny_lora

    return ShardedUnlearning(tiny_lora(), method="npo_rt"), UnlearningShards(), []


def _token_data(seed: int) -> Dataset:
    from tests.modules.test_unlearning import items

    return items(N, 0, seed)  # type: ignore[return-value]


def _tempnet_lm() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    from lightning_losses.demos import build_gpt2

    torch.manual_seed(0)
    lm = build_gpt2(VOCAB, n_layer=1, n_embd=32, n_head=2, block_size=LENGTH, seed=7)
    module = ShardedTempNet(lm, VOCAB, task="causal_lm", rho=1.0, hidden_dim=8, dropout=0.0, lr=0.5, tempnet_lr=0.5)
    return module, Shards(_token_data(3)), []


def _unlearning_blocks() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    from tests.modules.test_unlearning import tiny_lora

    return BlockShardedUnlearning(tiny_lora(), method="npo_rt"), UnlearningShards(), []


def _lm_distillation() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    return LMDistillation(), Shards(_token_data(4)), []


def _calibration() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    data = Shards(_classification_data(), val=_classification_data(40, seed=5))
    return FocalClassifier(), data, [PostHocCalibration("temperature")]


def _schedule() -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    schedule = HyperparameterSchedule(
        {"focal.gamma": LinearSchedule(0.0, 4.0, duration=STEPS), "lr": LinearSchedule(0.5, 0.1, duration=STEPS)},
        log=False,
    )
    return FocalClassifier(), Shards(_classification_data()), [schedule]


FAMILIES: dict[str, Callable[[], tuple[pl.LightningModule, pl.LightningDataModule, list]]] = {
    "kd": _kd,
    "dkd": _dkd,
    "lm_distillation": _lm_distillation,
    "tempnet": _tempnet,
    "tempnet_lm": _tempnet_lm,
    "unlearning": _unlearning,
    "unlearning_blocks": _unlearning_blocks,
    "calibration": _calibration,
    "schedule": _schedule,
}


def _full(value: Tensor) -> Tensor:
    """A DTensor gathered whole (collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()


def _state(module: pl.LightningModule, callbacks: list) -> dict[str, Tensor]:
    """What a run produced: every parameter and buffer, whole, and the fitted calibrator."""
    state = {name: _full(p) for name, p in module.named_parameters()}
    state.update({name: _full(b) for name, b in module.named_buffers()})
    for cb in callbacks:
        if isinstance(cb, PostHocCalibration):
            state.update({f"calibrator.{k}": v.detach().cpu().clone() for k, v in cb.calibrator.state_dict().items()})
    return state


def _fit(
    family: str, strategy: Any = "auto", devices: int = 1, root: str | None = None
) -> tuple[pl.LightningModule, list, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module, data, callbacks = FAMILIES[family]()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = cpu_trainer(
            root or tmp,
            devices=devices,
            strategy=strategy,
            max_steps=STEPS,
            callbacks=callbacks,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
        if isinstance(module, UnlearningModule):
            module.adapter_dir = os.path.join(trainer.default_root_dir, "adapter")
        trainer.fit(module, datamodule=data)
    if strategy != "ddp_spawn":  # the launching process of ddp_spawn does not run the loops
        assert trainer.global_step == STEPS
    return module, callbacks, trainer


def _run(family: str, strategy: Any = "auto", devices: int = 1) -> dict[str, Tensor]:
    """What a run of ``family`` produced; for unlearning, the adapter it saved is checked against the trained one."""
    with tempfile.TemporaryDirectory() as root:
        module, callbacks, trainer = _fit(family, strategy, devices, root)
        state = _state(module, callbacks)
        if isinstance(module, UnlearningModule) and (strategy == "ddp_spawn" or trainer.is_global_zero):
            from safetensors.torch import load_file

            saved = load_file(os.path.join(root, "adapter", "adapter_model.safetensors"))
            trained = {k.removeprefix("model.").replace(".default.", "."): v for k, v in state.items() if "lora_" in k}
            assert set(saved) == set(trained), (sorted(saved), sorted(trained))
            for name, value in trained.items():
                torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)
    return state


_SINGLE: dict[str, dict[str, Tensor]] = {}
_SAME_SINGLE_RUN = {"unlearning_blocks": "unlearning"}  # configure_model shards nothing on one process


def single_process(family: str) -> dict[str, Tensor]:
    """The single-process result of ``family`` (computed once per test session)."""
    family = _SAME_SINGLE_RUN.get(family, family)
    if family not in _SINGLE:
        _SINGLE[family] = _run(family)
    return _SINGLE[family]


def assert_same_run(result: dict[str, Tensor], family: str) -> None:
    """``result`` equals the single-process run, which moved away from the initial state (so the check has teeth)."""
    single = single_process(family)
    pl.seed_everything(0, verbose=False)
    module, _, callbacks = FAMILIES[family]()
    initial = _state(module, callbacks)
    assert set(result) == set(single) == set(initial)
    moved = [
        n
        for n, v in single.items()
        if v.is_floating_point() and v.shape == initial[n].shape and not torch.allclose(v, initial[n], atol=1e-4)
    ]
    assert moved, f"{family}: training changed nothing, the comparison would be vacuous"
    for name, value in single.items():
        torch.testing.assert_close(
            result[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{family}/{name}: {m}"
        )


# ---------------------------------------------------------------------------------------------------- FSDP2
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Lightning joins this process group instead of launching processes
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    # a short timeout: a cell that fails on one rank only must not hang the suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn: Callable[..., Any], *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(WORLD, _free_port(), fn, args, out_dir), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _fsdp2() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)


def _teacher_check(module: ShardedDistillation, rank: int) -> dict[str, Any]:
    """The sharded teacher against an unsharded copy of it on this rank's data, after training."""
    from torch.distributed.tensor import DTensor

    teacher = module.teacher
    whole = single_teacher()
    data = _classification_data()
    x, y = data.tensors[0][rank::WORLD], data.tensors[1][rank::WORLD]
    student = module.student(x).detach()
    sharded_logits = module.teacher_forward(x)
    params = list(teacher.parameters())
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    return {
        "sharded": all(isinstance(p, DTensor) for p in params),
        "local_numel": sum(p.to_local().numel() for p in params if isinstance(p, DTensor)),
        "numel": sum(p.numel() for p in params),
        "frozen": not any(p.requires_grad for p in params) and not teacher.training,
        "in_optimizer": any(id(p) in optimized for p in params),
        "logits": (sharded_logits, whole(x)),
        "loss": (module.distillation_loss(student, sharded_logits, y), module.distillation_loss(student, whole(x), y)),
        "teacher": {n: _full(p) for n, p in teacher.named_parameters()},
    }


def single_teacher() -> nn.Module:
    """The DKD family's teacher as built (``_dkd`` builds it from a seed)."""
    return _mlp(CLASSES, seed=2)


def _fsdp2_families(rank: int, world: int, families: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for family in families:
        try:
            if family == "dkd":  # the sharded teacher, checked after training
                module, callbacks, _ = _fit(family, _fsdp2(), world)
                results["teacher_check"] = _teacher_check(module, rank)  # type: ignore[arg-type]
                results[family] = _state(module, callbacks)
            else:
                results[family] = _run(family, _fsdp2(), world)
        except Exception as error:  # reported by the family's cell, the other families still run
            results[family] = f"{type(error).__name__}: {error}"
            if family == "dkd":
                results.setdefault("teacher_check", results[family])
    return results


@pytest.fixture(scope="module")
def fsdp2_results() -> list[dict[str, Any]]:
    return _spawn(_fsdp2_families, list(FAMILIES))


def _rank_results(results: list[dict[str, Any]], key: str) -> list[Any]:
    values = [r[key] for r in results]
    for value in values:
        if isinstance(value, str):
            raise AssertionError(f"{key} failed under FSDP2: {value}")
    return values


@pytest.mark.ddp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fsdp2_equals_one_process(fsdp2_results: list[dict[str, Any]], family: str) -> None:
    for result in _rank_results(fsdp2_results, family):
        assert_same_run(result, family)


@pytest.mark.ddp
def test_a_sharded_teacher_gives_the_unsharded_loss(fsdp2_results: list[dict[str, Any]]) -> None:
    for rank, check in enumerate(_rank_results(fsdp2_results, "teacher_check")):
        assert check["sharded"] and check["frozen"] and not check["in_optimizer"]
        assert check["local_numel"] < check["numel"]  # each rank holds a shard only, outside the teacher's forward
        torch.testing.assert_close(check["logits"][0], check["logits"][1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(check["loss"][0], check["loss"][1], rtol=1e-6, atol=1e-7)
        assert float(check["loss"][0]) > 0
        for name, value in single_teacher().named_parameters():  # never modified by training
            torch.testing.assert_close(check["teacher"][name], value.detach(), rtol=0, atol=0, msg=f"rank {rank}")


# ---------------------------------------------------------------------------------------------------- prerequisites
@pytest.fixture
def one_process_group() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already open")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["logits", "contrastive"])
def test_tempnets_can_be_sharded_and_load_checkpoints_with_a_scalar_pool_scale(
    one_process_group: Any, kind: str
) -> None:
    from torch.distributed.fsdp import fully_shard

    from lightning_losses.nn import ContrastiveTempNet, TempNet

    def build() -> nn.Module:
        torch.manual_seed(0)
        net = TempNet(10, hidden_dim=8) if kind == "logits" else ContrastiveTempNet(10, num_prototypes=4)
        return net.eval()

    inputs = torch.randn(3, 10)
    # a checkpoint of the earlier layout: the pool scale was 0-dim
    saved = {k: v.clone() for k, v in build().state_dict().items()}
    saved["log_pool_scale"] = torch.tensor(0.3)
    restored = build()
    restored.load_state_dict(saved)
    expected = build()
    with torch.no_grad():
        expected.log_pool_scale.fill_(0.3)
    assert restored.log_pool_scale.shape == (1,)
    torch.testing.assert_close(restored(inputs), expected(inputs), rtol=0, atol=0)
    fully_shard(restored, mesh=one_process_group)  # FSDP (and DeepSpeed) refuse 0-dim parameters
    torch.testing.assert_close(restored(inputs), expected(inputs), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- ddp_spawn
@pytest.mark.ddp
@pytest.mark.parametrize("family", ["dkd", "tempnet", "unlearning", "calibration", "schedule"])
def test_ddp_spawn_results_come_back_equal_to_one_process(family: str) -> None:
    assert_same_run(_run(family, "ddp_spawn", WORLD), family)


# ---------------------------------------------------------------------------------------------------- GPU only
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 and DeepSpeed refuse CPU in Lightning 2.6")


def _cuda_run(family: str, strategy: Any) -> dict[str, Tensor]:
    """``family`` trained on one GPU under ``strategy``; the full state dict, on the CPU."""
    pl.seed_everything(0, verbose=False)
    module, data, callbacks = FAMILIES[family]()
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        strategy=strategy,
        max_steps=STEPS,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    if family == "unlearning":  # the chunked path ran, or fell back to the logits where the head was partitioned
        assert module.unlearning_terms
    if isinstance(strategy, str) and strategy.startswith("deepspeed"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = module.state_dict()
    else:
        state = trainer.strategy.lightning_module_state_dict()
    return {name: value.detach().float().cpu().clone() for name, value in state.items()}


def _assert_close_to_one_cpu_process(result: dict[str, Tensor], family: str) -> None:
    single = single_process(family)
    compared = [name for name in single if name in result and not name.startswith("calibrator.")]
    assert compared
    for name in compared:
        torch.testing.assert_close(result[name], single[name].float(), rtol=1e-4, atol=1e-5, msg=name)


@_CUDA
@pytest.mark.parametrize("family", ["tempnet", "unlearning"])
def test_fsdp1_on_gpu_equals_one_process(family: str) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    _assert_close_to_one_cpu_process(_cuda_run(family, FSDPStrategy(use_orig_params=True)), family)


@_CUDA
@pytest.mark.parametrize("family", ["tempnet", "unlearning"])
def test_deepspeed_zero3_on_gpu_equals_one_process(family: str) -> None:
    pytest.importorskip("deepspeed")
    _assert_close_to_one_cpu_process(_cuda_run(family, "deepspeed_stage_3"), family)

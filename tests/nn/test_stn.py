"""Self-Tuning Networks: hyper-layers against per-example loops, transforms, perturbation, the SelfTuning callback
(bounds, gradient path, crash and resume) and the hyper-step under 2-process DDP."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.callbacks.self_tuning import SelfTuning, TunedHyperparameter, best_response_step
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.nn.stn import (
    BoundedTransform,
    DiscreteTransform,
    HyperConv2d,
    HyperLinear,
    PerturbedHyperparameters,
    PositiveTransform,
    condition_hyper_layers,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.modules import Smoothing
from tests.helpers.resume import crash_and_resume
from tests.helpers.trainer import cpu_trainer


# ------------------------------------------------------------------------------------------- hyper-layers
def _naive_hyper_linear(layer: HyperLinear, x, h):
    """Per-example loop of y = W x + b + s_w ⊙ (V x) + s_b ⊙ c with [s_w, s_b] = G h."""
    out = []
    W, b = layer.elementwise.weight, layer.elementwise.bias
    V, c = layer.hyper.weight, layer.hyper.bias
    G = layer.gate.weight
    m = W.shape[0]
    for n in range(x.shape[0]):
        hn = h if h.ndim == 1 else h[n]
        s = torch.stack([sum(G[i, j] * hn[j] for j in range(hn.shape[0])) for i in range(2 * m)])
        row = []
        for i in range(m):
            plain = sum(W[i, k] * x[n, k] for k in range(x.shape[1])) + b[i]
            hyper = sum(V[i, k] * x[n, k] for k in range(x.shape[1]))
            row.append(plain + s[i] * hyper + s[m + i] * c[i])
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("per_example", [True, False])
def test_hyper_linear_value_and_gradient_match_a_loop(per_example):
    layer = HyperLinear(3, 4, num_hyperparameters=2, gate_init_std=0.5)
    x = torch.randn(5, 3)
    h = torch.randn(5, 2) if per_example else torch.randn(2)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    y1 = layer(x, condition=h1)
    y2 = _naive_hyper_linear(layer, x, h2)
    torch.testing.assert_close(y1, y2)
    w = torch.randn_like(y1)
    g1 = torch.autograd.grad((y1 * w).sum(), [h1, layer.gate.weight, layer.hyper.weight])
    g2 = torch.autograd.grad((y2 * w).sum(), [h2, layer.gate.weight, layer.hyper.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_hyper_linear_is_a_plain_linear_when_gate_or_hyper_weights_are_zero():
    x, h = torch.randn(6, 3), torch.randn(6, 2) * 10
    gated_off = HyperLinear(3, 4, num_hyperparameters=2, gate_init_std=0.0)
    plain = nn.Linear(3, 4)
    plain.load_state_dict(gated_off.elementwise.state_dict())
    torch.testing.assert_close(gated_off(x, condition=h), plain(x))
    hyper_off = HyperLinear(3, 4, num_hyperparameters=2, gate_init_std=1.0)
    with torch.no_grad():
        hyper_off.hyper.weight.zero_()
        hyper_off.hyper.bias.zero_()
    torch.testing.assert_close(hyper_off(x, condition=h), hyper_off.elementwise(x))


def test_hyper_linear_broadcasts_per_example_scales_over_sequence_dims():
    layer = HyperLinear(3, 2, num_hyperparameters=1, gate_init_std=0.3)
    x, h = torch.randn(4, 7, 3), torch.randn(4, 1)
    expected = torch.stack([layer(x[n], condition=h[n]) for n in range(4)])
    torch.testing.assert_close(layer(x, condition=h), expected)


def test_hyper_conv_matches_per_example_plain_convolutions():
    conv = HyperConv2d(2, 3, 3, num_hyperparameters=2, padding=1, stride=2, gate_init_std=0.5)
    x, h = torch.randn(4, 2, 7, 7), torch.randn(4, 2)
    out = conv(x, condition=h)
    for n in range(4):
        s = conv.gate.weight @ h[n]
        plain = F.conv2d(x[n : n + 1], conv.elementwise.weight, conv.elementwise.bias, stride=2, padding=1)
        hyper = F.conv2d(x[n : n + 1], conv.hyper.weight, None, stride=2, padding=1)
        ref = plain + s[:3, None, None] * hyper + (s[3:] * conv.hyper.bias)[:, None, None]
        torch.testing.assert_close(out[n : n + 1], ref)
    off = HyperConv2d(2, 3, 3, num_hyperparameters=2, padding=1, gate_init_std=0.0)
    torch.testing.assert_close(off(x, condition=h), off.elementwise(x))


def test_hyper_layer_bad_condition_errors():
    layer = HyperLinear(3, 2, num_hyperparameters=2)
    with pytest.raises(RuntimeError, match="condition_hyper_layers"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(batch, 2\)"):
        layer(torch.randn(4, 3), condition=torch.randn(4, 3))
    with pytest.raises(ValueError, match="4 examples"):
        layer(torch.randn(4, 3), condition=torch.randn(5, 2))
    with pytest.raises(ValueError, match="num_hyperparameters"):
        HyperLinear(3, 2, num_hyperparameters=0)


# --------------------------------------------------------------------------------------------- transforms
def test_transforms_stay_in_range_and_invert():
    u = torch.tensor([-80.0, -5.0, 0.0, 5.0, 80.0])
    bounded = BoundedTransform(1.0, 10.0)
    assert bool(((bounded(u) >= 1.0) & (bounded(u) <= 10.0)).all())
    assert float(bounded(torch.tensor(0.0))) == pytest.approx(5.5)  # midpoint at u = 0
    assert float(bounded(torch.tensor(bounded.inverse(2.0)))) == pytest.approx(2.0, abs=1e-5)
    positive = PositiveTransform(0.5)
    assert bool((positive(u) >= 0.5).all())
    assert float(positive(torch.tensor(positive.inverse(3.0)))) == pytest.approx(3.0, abs=1e-5)
    assert float(positive(torch.tensor(30.0))) == pytest.approx(30.5, abs=1e-5)  # softplus(u) -> u
    discrete = DiscreteTransform(2, 5)
    values = discrete(torch.linspace(-30, 30, 2001))
    assert set(values.tolist()) == {2.0, 3.0, 4.0, 5.0}
    assert torch.equal(values, values.sort().values)
    # each integer owns an equal quarter of the sigmoid's range
    probs = torch.sigmoid(torch.tensor([discrete.inverse(k) for k in (2, 3, 4, 5)]))
    torch.testing.assert_close(probs, torch.tensor([0.125, 0.375, 0.625, 0.875]))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: BoundedTransform(1.0, 1.0), "low < high"),
        (lambda: BoundedTransform(0.0, 1.0).inverse(1.0), "open interval"),
        (lambda: PositiveTransform(0.0).inverse(0.0), "must be > 0"),
        (lambda: DiscreteTransform(1.5, 3), "integers"),
        (lambda: PerturbedHyperparameters({"a": PositiveTransform()}, {}), "No initial value"),
        (lambda: PerturbedHyperparameters({"a": PositiveTransform()}, {"a": 1.0}, perturb_scale=0.0), "> 0"),
    ],
)
def test_bad_transform_and_perturbation_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_perturbation_entropy_and_per_batch_draws():
    hp = PerturbedHyperparameters(
        {"a": PositiveTransform(), "b": BoundedTransform(0.0, 1.0)},
        {"a": 2.0, "b": 0.3},
        perturb_scale=0.7,
        per_example=["a"],
    )
    expected_entropy = 2 * math.log(0.7 * math.sqrt(2 * math.pi * math.e))
    assert float(hp.entropy()) == pytest.approx(expected_entropy, rel=1e-5)
    u = hp.sample(64, generator=torch.Generator().manual_seed(0))
    assert u[:, 0].std() > 0.3 and bool((u[:, 1] == u[0, 1]).all())  # "b" is drawn once per batch
    values = hp.values(u)
    assert values["a"].shape == (64,) and values["b"].shape == ()
    torch.testing.assert_close(hp.sample(3, perturb=False), hp.unconstrained.expand(3, 2))
    assert hp.current() == pytest.approx({"a": 2.0, "b": 0.3}, abs=1e-5)
    # reparameterised: the perturbed value has a gradient for the scale equal to epsilon
    u = hp.sample(None, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    torch.randn(1, 2, generator=gen)  # the per-batch draw comes first
    eps = torch.randn(1, 2, generator=gen)[0]
    (g,) = torch.autograd.grad(u[0], hp.scale_raw)
    assert float(g[0]) == pytest.approx(float(eps[0] * torch.sigmoid(hp.scale_raw[0])), rel=1e-5)


# ----------------------------------------------------------------------------------------- the hyper-step
def test_gradient_reaches_hyperparameters_only_through_the_hypernetwork():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for gate_std, should_move in ((0.0, False), (0.5, True)):
        net = HyperLinear(3, 2, num_hyperparameters=1, gate_init_std=gate_std)
        hp = PerturbedHyperparameters({"t": PositiveTransform()}, {"t": 4.0})
        opt = torch.optim.Adam(hp.parameters(), lr=0.1)
        before = hp.unconstrained.detach().clone()

        def objective(u_hat, net=net):
            condition_hyper_layers(net, u_hat)
            return F.cross_entropy(net(x), y)  # the validation loss never reads "t" itself

        best_response_step(hp, opt, objective, entropy_weight=0.0, batch_size=16)
        moved = not torch.equal(hp.unconstrained.detach(), before)
        assert moved == should_move
        assert all(p.grad is None for p in net.parameters())  # the weights are not touched


# ------------------------------------------------------------------------------------- SelfTuning callback


class HyperClassifier(HyperparameterMixin, pl.LightningModule):
    def __init__(self, k: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            HyperLinear(4, 16, k, gate_init_std=0.1), nn.ReLU(), nn.Dropout(dropout), HyperLinear(16, 3, k)
        )
        self.ls = Smoothing(0.1)
        self.expose_hyperparameter("net.2.p")  # the dropout rate is tuned too
        self.seen: list[tuple[torch.Tensor, float]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.ls.amount.detach().clone(), float(self.net[2].p)))
        return self.ls(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _tuning(with_dropout: bool = True, **kwargs):
    specs = {"ls.amount": TunedHyperparameter(initial=0.2, low=0.0, high=0.5)}
    if with_dropout:
        specs["net.2.p"] = TunedHyperparameter(initial=0.1, low=0.0, high=0.5, per_example=False)
    options = dict(warmup_steps=2, train_steps=2, hyper_lr=0.05, perturb_scale=1.0, entropy_weight=1e-3)
    options.update(kwargs)
    return SelfTuning(specs, val_dataloader=DataLoader(_data(32, 1), batch_size=16), **options)


def test_self_tuning_alternates_steps_and_keeps_hyperparameters_in_bounds():
    model, cb = HyperClassifier(), _tuning()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(_data(64, 0), batch_size=16))
    # 10 training steps, 2 of warm-up, then one hyper-step every 2 training steps
    assert cb.steps == 10 and cb.hyper_steps == 4 and len(cb.history) == 4
    for amount, p in model.seen:
        assert amount.shape == (16,)  # per-example label smoothing
        assert bool(((amount > 0) & (amount < 0.5)).all())
        assert 0.0 < p < 0.5
    assert len({round(p, 6) for _, p in model.seen}) > 1  # dropout perturbed per batch
    start = cb.history[0]
    assert start != cb.history[-1]  # the hyperparameters moved
    for record in cb.history:
        assert 0 < record["ls.amount"] < 0.5 and 0 < record["net.2.p"] < 0.5
    # after training: the unperturbed values are in effect, as scalars
    assert model.ls.amount.shape == () and float(model.ls.amount) == pytest.approx(cb.current()["ls.amount"])
    assert float(trainer.callback_metrics["stn/ls.amount"]) == pytest.approx(cb.history[-1]["ls.amount"])


def test_self_tuning_crash_and_resume(tmp_path):
    # label smoothing only: random dropout masks are not part of a checkpoint, so weights would differ
    torch.manual_seed(0)
    init = HyperClassifier(k=1, dropout=0.0).state_dict()

    def fit(steps, ckpt):
        model = HyperClassifier(k=1, dropout=0.0)
        if ckpt is None:
            model.load_state_dict(init)
        cb = _tuning(with_dropout=False, train_steps=1)
        trainer = cpu_trainer(max_steps=steps, callbacks=[cb], limit_val_batches=0)
        trainer.fit(model, DataLoader(_data(16, 0), batch_size=16), ckpt_path=ckpt)  # one batch per epoch
        return (model, cb), trainer

    runs = crash_and_resume(fit, crash_step=5, total_steps=8, tmp_path=tmp_path)
    (full_model, full), (resumed_model, resumed) = runs.full, runs.resumed
    assert resumed.steps == full.steps == 8 and resumed.hyper_steps == full.hyper_steps == 6
    assert len(resumed.history) == len(full.history)
    for got, want in zip(resumed.history, full.history):
        assert got == pytest.approx(want)
    assert resumed.hyperparameters is not None and full.hyperparameters is not None
    torch.testing.assert_close(resumed.hyperparameters.unconstrained, full.hyperparameters.unconstrained)
    torch.testing.assert_close(resumed.hyperparameters.scale_raw, full.hyperparameters.scale_raw)
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value)


class _SaveAt(pl.Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.per_sample_shape = tuple(pl_module.ls.amount.shape)
            trainer.save_checkpoint(self.path)


class _AppliedAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):  # runs after SelfTuning's own on_train_start
        self.amount = pl_module.ls.amount.detach().clone()


def test_mid_epoch_checkpoint_holds_the_draw_in_effect_and_resumes(tmp_path):
    cb, saver = _tuning(with_dropout=False, train_steps=4), _SaveAt(3, tmp_path / "mid.ckpt")
    model = HyperClassifier(k=1)
    pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, saver],
        limit_val_batches=0,
    ).fit(model, DataLoader(_data(64, 0), batch_size=16))
    assert saver.per_sample_shape == (16,)  # the module held one draw per example when it was saved
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    saved = ckpt["state_dict"]["ls.amount"]
    assert saved.shape == (16,)  # a snapshot of the module: the draw in effect, not rewritten by the callback
    state = ckpt["callbacks"][cb.state_key]
    assert "generator" not in state and state["draws"] == 3  # counters only: three training draws so far
    # the registry loads it strictly into a fresh module (scalar amount) ...
    fresh = HyperClassifier(k=1)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert torch.equal(fresh.ls.amount, saved)
    # ... and a resumed run starts from the callback's unperturbed value, not from the saved draw
    resumed, probe = _tuning(with_dropout=False, train_steps=4), _AppliedAtStart()
    pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[resumed, probe],
        limit_val_batches=0,
    ).fit(HyperClassifier(k=1), DataLoader(_data(64, 0), batch_size=16), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.steps == 6 and resumed.draws == 6 + resumed.hyper_steps
    assert probe.amount.shape == () and float(probe.amount) == pytest.approx(0.2, abs=1e-5)


def module_level_ce_weight(values):
    return 1.0 - values["ls.amount"]


def test_self_tuning_pickles_after_fit_and_names_unpicklable_functions():
    import pickle

    model, cb = HyperClassifier(k=1), _tuning(with_dropout=False, train_steps=1, warmup_steps=0)
    _fit_with(model, cb)
    assert cb.hyper_steps == 1
    copy = pickle.loads(pickle.dumps(cb))  # e.g. a second fit under ddp_spawn: no torch.Generator, no iterator
    assert copy.draws == cb.draws and copy.current() == pytest.approx(cb.current())
    picklable = SelfTuning({"ls.amount": None}, derived={"ce": module_level_ce_weight})
    pickle.loads(pickle.dumps(picklable))
    with pytest.raises(TypeError, match=r"derived\['ce'\].*function defined at module level.*functools\.partial"):
        pickle.dumps(SelfTuning({"ls.amount": None}, derived={"ce": lambda v: 1.0 - v["ls.amount"]}))
    import copy as copy_module

    copy_module.deepcopy(SelfTuning({"ls.amount": None}, derived={"ce": lambda v: 0.0}))  # copies need no pickling


def test_noise_streams_differ_per_rank_and_repeat_per_draw():
    def draws(rank, n=3):
        cb = SelfTuning({"ls.amount": None}, seed=7)
        cb.rank = rank
        return [torch.randn(4, generator=cb._generator()) for _ in range(n)]

    rank0, again, rank1 = draws(0), draws(0), draws(1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, again))  # a pure function of (seed, rank, draw)
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert not torch.equal(rank0[0], rank0[1])


def test_self_tuning_configuration_errors():
    with pytest.raises(MisconfigurationException, match="at least one"):
        SelfTuning({})
    with pytest.raises(MisconfigurationException, match="train_steps"):
        SelfTuning({"ls.amount": None}, train_steps=0)
    with pytest.raises(MisconfigurationException, match="hyper_lr"):
        SelfTuning({"ls.amount": None}, hyper_lr=0.0)

    class Plain(HyperClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 3))

    with pytest.raises(MisconfigurationException, match="no STN hyper-layer"):
        _fit_with(Plain(), SelfTuning({"ls.amount": None}))
    with pytest.raises(MisconfigurationException, match="num_hyperparameters=1"):
        _fit_with(HyperClassifier(k=2), SelfTuning({"ls.amount": None}))
    with pytest.raises(KeyError, match=r"ls\.amount"):
        _fit_with(HyperClassifier(k=1), SelfTuning({"ls.amont": None}))


def _fit_with(model, cb):
    pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        limit_val_batches=0,
    ).fit(model, DataLoader(_data(16, 0), batch_size=16))


# ----------------------------------------------------------------------------------------------------- DDP
def _hyper_step_worker(rank, world_size, x, y, state):
    torch.manual_seed(0)
    net = HyperLinear(3, 2, num_hyperparameters=1, gate_init_std=0.5)
    net.load_state_dict(state)
    hp = PerturbedHyperparameters({"t": PositiveTransform()}, {"t": 4.0}, per_example=[])
    opt = torch.optim.SGD(hp.parameters(), lr=0.1)  # plain SGD: Adam's normalisation would magnify rounding
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)

    def objective(u_hat):
        condition_hyper_layers(net, u_hat)
        return F.cross_entropy(net(x[shard]), y[shard])

    for step in range(3):
        best_response_step(hp, opt, objective, 1e-3, len(x[shard]), torch.Generator().manual_seed(step))
    return hp.unconstrained.detach(), hp.scale_raw.detach()


@pytest.mark.ddp
def test_hyper_step_under_ddp_equals_single_process():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    state = HyperLinear(3, 2, num_hyperparameters=1, gate_init_std=0.5).state_dict()
    single = _hyper_step_worker(0, 1, x, y, state)
    ranks = run_distributed(_hyper_step_worker, x, y, state, world_size=2)
    for u, s in ranks:  # both ranks agree, and agree with one process on the whole batch
        torch.testing.assert_close(u, single[0])
        torch.testing.assert_close(s, single[1])


class _RankRecorder(HyperClassifier):
    """Records, inside each training step (after DDP's pre-forward buffer broadcast), the loss's label smoothing and
    the condition of the hyper-layers; writes them, and the callback's result, to one file per rank."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(k=1, dropout=0.0)
        self.out_dir = out_dir
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.records.append((self.ls.amount.detach().clone(), self.net[0].condition.detach().clone()))
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:  # after SelfTuning's on_train_end (callbacks run first)
        (cb,) = [c for c in self.trainer.callbacks if isinstance(c, SelfTuning)]
        result = {"records": self.records, "amount": self.ls.amount.clone(), "current": cb.current()}
        torch.save(result, f"{self.out_dir}/rank{self.global_rank}.pt")


@pytest.mark.ddp
def test_self_tuning_under_ddp_spawn_draws_per_rank_and_returns_its_results(tmp_path):
    model, cb = _RankRecorder(str(tmp_path)), _tuning(with_dropout=False, train_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(_data(64, 0), batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert len(rank["records"]) == 4
        for amount, condition in rank["records"]:
            # the loss uses the rank's own draw: the value the hyper-layers are conditioned on (range [0, 0.5])
            torch.testing.assert_close(amount, 0.25 * (condition[:, 0] + 1.0))
    for (a0, _), (a1, _) in zip(ranks[0]["records"], ranks[1]["records"]):
        assert not torch.allclose(a0, a1)  # each rank draws its own perturbations
    # the hyper-gradients are averaged: one set of hyperparameters on every rank ...
    assert ranks[0]["current"] == pytest.approx(ranks[1]["current"], abs=1e-7)
    assert ranks[0]["current"]["ls.amount"] != pytest.approx(0.2, abs=1e-5)  # ... which moved
    # ... and they come back to this process: in the module's buffer and in the logged metrics
    assert model.ls.amount.shape == ()
    assert float(model.ls.amount) == pytest.approx(ranks[0]["current"]["ls.amount"], abs=1e-7)
    assert float(trainer.callback_metrics["stn/ls.amount"]) == pytest.approx(ranks[0]["current"]["ls.amount"])


def _sharded_hyper_layers_worker(rank, world_size, states, x, h, images):
    from torch.distributed.fsdp import fully_shard

    linear = HyperLinear(3, 4, num_hyperparameters=2, gate_init_std=0.5)
    conv = HyperConv2d(2, 3, 3, num_hyperparameters=2, padding=1, gate_init_std=0.5)
    linear.load_state_dict(states[0])
    conv.load_state_dict(states[1])
    for layer in (linear, conv):
        for part in (layer.elementwise, layer.hyper, layer.gate):
            fully_shard(part)  # each part's parameters are gathered only inside its own forward
    return linear(x, condition=h).detach(), conv(images, condition=h).detach()


@pytest.mark.ddp
def test_hyper_layers_with_sharded_parts_equal_the_unsharded_layers():
    torch.manual_seed(0)
    linear = HyperLinear(3, 4, num_hyperparameters=2, gate_init_std=0.5)
    conv = HyperConv2d(2, 3, 3, num_hyperparameters=2, padding=1, gate_init_std=0.5)
    x, h, images = torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2, 6, 6)
    expected = (linear(x, condition=h).detach(), conv(images, condition=h).detach())
    states = (linear.state_dict(), conv.state_dict())
    for got in run_distributed(_sharded_hyper_layers_worker, states, x, h, images, world_size=2):
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])


# ------------------------------------------------------------------------------- with the distillation module
class _HyperStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = HyperLinear(4, 16, 2, gate_init_std=0.1)
        self.out = HyperLinear(16, 3, 2, gate_init_std=0.1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


class _Probe(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[torch.Size, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # runs after SelfTuning's hook
        t = pl_module.get_hyperparameter("kd.temperature")
        w = float(pl_module.get_hyperparameter("kd.weight"))
        self.seen.append((t.shape, w, float(pl_module.get_hyperparameter("ce_weight"))))


def test_self_tuning_drives_kd_temperature_per_sample_and_tied_weights():
    from lightning_losses.modules import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule(_HyperStudent(), nn.Linear(4, 3), method="kd", num_classes=3, scheduler="none")
    stn = SelfTuning(
        {
            "kd.temperature": TunedHyperparameter(initial=4.0, low=1.0, high=10.0),
            "kd.weight": TunedHyperparameter(initial=0.9, low=0.05, high=0.95, per_example=False),
        },
        derived={"ce_weight": lambda v: 1.0 - v["kd.weight"]},
        train_steps=1,
        hyper_lr=0.05,
        val_dataloader=DataLoader(_data(32, 1), batch_size=16),
    )
    probe = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stn, probe],
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(_data(64, 0), batch_size=16))
    assert stn.hyper_steps == 6
    for shape, kd_weight, ce_weight in probe.seen:
        assert shape == (16,)  # one temperature per example
        assert 0.05 < kd_weight < 0.95 and ce_weight == pytest.approx(1.0 - kd_weight)
    current = stn.current()
    assert float(module.get_hyperparameter("kd.temperature")) == pytest.approx(current["kd.temperature"])
    assert 1.0 < current["kd.temperature"] < 10.0 and current["kd.temperature"] != pytest.approx(4.0, abs=1e-4)


def test_hypernet_input_is_the_position_inside_the_range():
    bounded, positive = BoundedTransform(2.0, 6.0), PositiveTransform()
    for value in (2.5, 4.0, 5.5):
        u = torch.tensor(bounded.inverse(value))
        assert float(bounded.hypernet_input(u)) == pytest.approx(2 * (value - 2.0) / 4.0 - 1, abs=1e-5)
    u = torch.linspace(-50, 50, 101)
    assert bool((positive.hypernet_input(u).abs() < 1).all())
    hp = PerturbedHyperparameters({"a": bounded, "b": positive}, {"a": 4.0, "b": 1.0})
    h = hp.hypernet_input(hp.sample(5))
    assert h.shape == (5, 2) and bool((h.abs() < 1).all())


def test_validation_objective_runs_inside_a_sharding_wrapper_forward():
    from types import SimpleNamespace

    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    from lightning_losses.callbacks.self_tuning import _through_strategy

    class Gathering(nn.Module):  # stands in for FSDP / DeepSpeed: parameters usable only inside its forward
        def __init__(self, module):
            super().__init__()
            self.module, self.inside = module, False

        def forward(self, *args, **kwargs):
            self.inside = True
            try:
                return self.module(*args, **kwargs)
            finally:
                self.inside = False

    model = HyperClassifier(k=1)
    wrapper = Gathering(model)

    def _Trainer(strategy_model):  # what the hyper-step needs of a Trainer: its strategy's model and redirection
        return SimpleNamespace(
            strategy=SimpleNamespace(model=strategy_model, _forward_redirection=_ForwardRedirection())
        )

    seen = []
    result = _through_strategy(_Trainer(wrapper), model, lambda: seen.append(wrapper.inside) or torch.ones(()))
    assert seen == [True] and float(result) == 1.0
    assert "_self_tuning_objective" not in model.__dict__ and model.forward.__func__ is HyperClassifier.forward
    ddp_like = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    for strategy_model in (model, ddp_like):  # no wrapper, or DDP's: called directly
        seen.clear()
        _through_strategy(_Trainer(strategy_model), model, lambda: seen.append(wrapper.inside) or torch.ones(()))
        assert seen == [False]

"""TempNetMixin / TempNetModule on a tiny GPT-2: joint and frozen-base training, ρ checks, τ logging, resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import TempNetMixin, TempNetModule
from lightning_losses.demos import build_gpt2
from lightning_losses.functional import dro_temperature_loss
from tests.helpers.tolerances import tolerance
from tests.helpers.trainer import cpu_trainer

VOCAB = 64


def _tiny_lm():
    return build_gpt2(VOCAB, n_layer=2, n_embd=64, n_head=2, block_size=16)


def _loader(n=16, seed=0):
    ids = torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids, ids.clone(), torch.arange(n)), batch_size=4, shuffle=False)


def _module(**kwargs):
    options = dict(task="causal_lm", rho=2.0, hidden_dim=16, dropout=0.0, lr=1e-3, tempnet_lr=1e-2)
    options.update(kwargs)
    return TempNetModule(_tiny_lm(), num_classes=VOCAB, **options)


def _snapshot(module):
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    temp = {k: v.clone() for k, v in module.tempnet.state_dict().items()}
    return base, temp


def _changed(before, after):
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_joint_training_updates_both_with_their_own_learning_rates_and_logs_tau(tmp_path):
    module = _module()
    groups = module.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["base", "tempnet"] and [g["lr"] for g in groups] == [1e-3, 1e-2]
    base0, temp0 = _snapshot(module)
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=2)
    trainer.fit(module, _loader(), _loader(8, seed=1))
    base1, temp1 = _snapshot(module)
    assert _changed(base0, base1) and _changed(temp0, temp1)
    metrics = trainer.callback_metrics
    for key in ("train/tau_mean", "train/tau_min", "train/tau_max", "val/tau_mean", "val/ppl", "val/ppl_tempnet"):
        assert key in metrics, key
    assert 0.5 <= float(metrics["train/tau_min"]) <= float(metrics["train/tau_mean"]) <= float(metrics["train/tau_max"])
    assert float(metrics["train/tau_max"]) <= 5.0
    assert abs(float(metrics["val/ppl"]) - math.exp(float(metrics["val/ce"]))) < 1e-3 * float(metrics["val/ppl"])


def test_frozen_base_trains_only_tempnet(tmp_path):
    module = _module(train_base=False)
    base0, temp0 = _snapshot(module)
    cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, _loader())
    base1, temp1 = _snapshot(module)
    assert not _changed(base0, base1) and _changed(temp0, temp1)
    assert [g["name"] for g in module.configure_optimizers().param_groups] == ["tempnet"]


def test_rho_must_stay_below_log_of_the_number_of_classes(tmp_path):
    with pytest.raises(ValueError, match=r"rho must lie in \[0, log m\) with m = 64 classes"):
        _module(rho=math.log(VOCAB))
    module = _module()
    module.set_hyperparameter("tempnet_dro.rho", 4.5)  # a schedule may push it past log 64 = 4.16
    with pytest.raises(ValueError, match="rho must lie in"):
        cpu_trainer(tmp_path, max_steps=1).fit(module, _loader())
    with pytest.raises(ValueError, match="tau_min < tau_max"):
        _module(tau_min=5.0, tau_max=0.5)


def test_resume_from_a_checkpoint_restores_tempnet_and_continues_identically(tmp_path):
    torch.manual_seed(0)
    uninterrupted = _module()
    cpu_trainer(tmp_path / "a", max_epochs=2, limit_val_batches=0).fit(uninterrupted, _loader())

    torch.manual_seed(0)
    first = _module()
    trainer = cpu_trainer(tmp_path / "b", max_epochs=1, limit_val_batches=0, enable_checkpointing=True)
    trainer.fit(first, _loader())
    ckpt = trainer.checkpoint_callback.best_model_path or next((tmp_path / "b").rglob("*.ckpt"))
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = _module()
    cpu_trainer(tmp_path / "c", max_epochs=2, limit_val_batches=0).fit(resumed, _loader(), ckpt_path=str(ckpt))
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, **tolerance(torch.float32))
    assert float(resumed.get_hyperparameter("tempnet_dro.rho")) == 2.0


class _DualEncoder(TempNetMixin, pl.LightningModule):
    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.image_encoder = torch.nn.Linear(6, 4)
        self.text_encoder = torch.nn.Linear(5, 4)
        self.configure_contrastive_tempnet(4, num_samples, rho=1.0, gamma=0.8, num_prototypes=8, dropout=0.0)

    def training_step(self, batch, batch_idx):
        images, texts, index = batch
        img = torch.nn.functional.normalize(self.image_encoder(images), dim=1)
        txt = torch.nn.functional.normalize(self.text_encoder(texts), dim=1)
        return self.tempnet_contrastive_loss(img, txt, index)

    def configure_optimizers(self):
        return torch.optim.Adam(self.tempnet_parameter_groups(lr=1e-2))


def test_contrastive_mixin_initialises_prototypes_tracks_state_and_trains_both_tempnets(tmp_path):
    n = 24
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 6, generator=gen), torch.randn(n, 5, generator=gen), torch.arange(n))
    module = _DualEncoder(n)
    first_texts = torch.nn.functional.normalize(module.text_encoder(data.tensors[1][:8]), dim=1).detach()
    image_net0 = {k: v.clone() for k, v in module.image_tempnet.state_dict().items()}
    trainer = cpu_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=False))
    assert bool(module.image_tempnet.prototypes_initialized) and bool(module.text_tempnet.prototypes_initialized)
    # the image TempNet's prototypes started from the first batch of text embeddings (then trained a little)
    start = image_net0["prototypes"]
    assert not torch.allclose(start, first_texts)
    cos = torch.nn.functional.cosine_similarity(module.image_tempnet.prototypes.detach(), first_texts)
    assert float(cos.mean()) > 0.9
    state = module.tempnet_contrastive
    assert bool(torch.isfinite(state.image_b).all() and torch.isfinite(state.text_b).all())  # every sample seen
    assert bool((state.image_s > 0).all())
    assert 0.005 <= float(trainer.callback_metrics["train/tau_min"]) <= float(trainer.callback_metrics["train/tau_max"])
    assert float(trainer.callback_metrics["train/tau_max"]) <= 0.05
    assert any(not torch.equal(image_net0[k], v) for k, v in module.image_tempnet.state_dict().items())


class _RecordingExperiment:
    def __init__(self) -> None:
        self.histograms: list[tuple[str, torch.Tensor, int]] = []

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, values, step))


class _RecordingLogger(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self._experiment = _RecordingExperiment()

    @property
    def experiment(self):
        return self._experiment

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_tau_histogram_goes_to_a_logger_with_add_histogram(tmp_path):
    module = _module()
    module._tempnet_settings["histogram_every_n_steps"] = 2
    logger = _RecordingLogger()
    cpu_trainer(tmp_path, max_steps=4, limit_val_batches=0, logger=logger).fit(module, _loader())
    steps = [step for tag, _, step in logger.experiment.histograms]
    assert steps == [0, 2] and all(tag == "train/tau" for tag, _, _ in logger.experiment.histograms)
    values = logger.experiment.histograms[0][1]
    assert values.numel() == 4 * 15 and bool(((values >= 0.5) & (values <= 5.0)).all())


def test_a_linear_lm_head_takes_the_factorised_tempnet_path_with_the_same_loss():
    torch.manual_seed(0)
    module = _module()
    assert module._linear_head  # GPT-2: tied linear head, no soft-capping
    ids = torch.randint(0, VOCAB, (3, 16))
    got = module.training_step((ids, ids, torch.arange(3)), 0)
    logits = module.model(ids).logits[:, :-1]
    want = dro_temperature_loss(logits, ids[:, 1:], module.tempnet(logits), 2.0)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, list(module.parameters()), allow_unused=True)
    want_grads = torch.autograd.grad(want, list(module.parameters()), allow_unused=True)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_model_without_a_linear_head_uses_its_logits():
    class Wrapped(torch.nn.Module):  # an LM given as a plain module returning logits
        def __init__(self):
            super().__init__()
            self.lm = _tiny_lm()

        def forward(self, ids):
            return self.lm(ids).logits

    module = TempNetModule(Wrapped(), num_classes=VOCAB, task="causal_lm", rho=2.0, hidden_dim=16, dropout=0.0)
    assert not module._linear_head
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.isfinite(module.training_step((ids, ids), 0))

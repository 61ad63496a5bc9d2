"""UnlearningMixin / UnlearningModule: reference modes, nothing lost, every method, resume, bad inputs."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses import NPOLoss, UnlearningEvaluation, UnlearningModule
from lightning_losses.data.unlearning import UnlearningBatchCollator
from lightning_losses.demos import build_gpt2
from lightning_losses.functional.unlearning import npo_loss, sequence_log_probs
from lightning_losses.integrations.peft import adapter_is_fresh, lora_model
from tests.helpers.tolerances import tolerance
from tests.helpers.trainer import cpu_trainer

V, T = 48, 12
METHODS = ["ga", "graddiff", "graddiff_kl", "npo", "npo_rt", "npo_kl", "simnpo", "flat", "idkdpo"]


def tiny_lm(seed: int = 0) -> nn.Module:
    return build_gpt2(V, n_layer=2, n_embd=64, n_head=2, block_size=T, seed=seed)


def tiny_lora(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
        return lora_model(tiny_lm(seed), r=4)


def items(n: int, offset: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    return [(ids[i], ids[i].clone(), torch.tensor(offset + i)) for i in range(n)]


def loaders(batch_size: int = 4, n: int = 8):
    forget = DataLoader(items(n, 0, 1), batch_size=batch_size, collate_fn=UnlearningBatchCollator(2, [3, 4, 5]))
    retain = DataLoader(items(n, 100, 2), batch_size=batch_size, collate_fn=UnlearningBatchCollator(2))
    heldout = DataLoader(items(n, 200, 3), batch_size=batch_size, collate_fn=UnlearningBatchCollator(2))
    forget_eval = DataLoader(items(n, 0, 1), batch_size=batch_size, collate_fn=UnlearningBatchCollator(2))
    return CombinedLoader({"forget": forget, "retain": retain}, mode="min_size"), [forget_eval, retain, heldout]


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return cpu_trainer(tmp_path, **{"num_sanity_val_steps": 0, "max_epochs": 1, **kwargs})


def first_forget_batch() -> dict:
    train, _ = loaders()
    return next(iter(train.iterables["forget"]))


def test_reference_modes_give_the_same_npo_loss_on_a_fresh_adapter():
    batch = first_forget_batch()
    losses = {}
    for mode in ("precomputed", "disabled_adapter", "model"):
        model = tiny_lora()
        ref = copy.deepcopy(model) if mode == "model" else None
        module = UnlearningModule(model, method="npo", reference=mode, reference_model=ref)
        if mode == "precomputed":
            train, _ = loaders()
            assert module.precompute_reference(train.iterables["forget"]) == 8
        losses[mode] = module.unlearning_loss(batch)
    # the policy equals the reference before any step: NPO = (2/β)·log 2 in every mode
    for value in losses.values():
        torch.testing.assert_close(value, torch.tensor(2 / 0.1 * 0.6931471805599453), rtol=1e-5, atol=1e-5)


def _trained_adapter_model() -> nn.Module:
    """A LoRA fine-tune (adapter B ≠ 0) plus a copy of it loaded as the named reference adapter."""
    model = tiny_lora()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft = pytest.importorskip("peft")
    model.add_adapter("reference", peft.LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True, task_type="CAUSAL_LM"))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, value in state.items():
            params[n.replace(".default.", ".reference.")].copy_(value)
    model.set_adapter("default")
    return model


def test_reference_modes_agree_on_a_trained_adapter_and_disabled_is_refused():
    batch = first_forget_batch()
    model = _trained_adapter_model()
    named = UnlearningModule(model, method="npo", reference="named_adapter")
    precomputed = UnlearningModule(copy.deepcopy(model), method="npo", reference="precomputed")
    train, _ = loaders()
    precomputed.precompute_reference(train.iterables["forget"])
    # the reference is the fine-tuned model, not the base: it differs from the disabled-adapter output
    from lightning_losses.integrations.peft import disabled_adapter

    with disabled_adapter(named.model) as base:
        base_logps = sequence_log_probs(base(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)
    ref_named = named.reference_log_probs(batch)
    ref_pre = precomputed.reference_log_probs(batch)
    torch.testing.assert_close(ref_named, ref_pre, rtol=1e-5, atol=1e-4)
    assert (ref_named - base_logps).abs().max() > 1e-2
    torch.testing.assert_close(named.unlearning_loss(batch), precomputed.unlearning_loss(batch), rtol=1e-5, atol=1e-4)
    # the named-adapter pass leaves the trained adapter active and trainable, the reference frozen
    assert named.model.active_adapter == "default"
    trainable = {n for n, p in named.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with pytest.raises(ValueError, match="only correct on a fresh adapter"):
        UnlearningModule(_trained_adapter_model(), method="npo_kl", reference="disabled_adapter")


def test_auto_reference_is_the_cheapest_correct_mode():
    assert UnlearningModule(tiny_lora(), method="npo").reference_mode == "precomputed"
    assert UnlearningModule(tiny_lora(), method="simnpo").reference_mode == "none"
    assert UnlearningModule(tiny_lora(), method="npo_kl").reference_mode == "disabled_adapter"
    assert UnlearningModule(_trained_adapter_model(), method="npo_kl").reference_mode == "named_adapter"
    assert UnlearningModule(tiny_lm(), method="npo").reference_mode == "precomputed"
    with pytest.raises(ValueError, match="no PEFT adapter to disable"):
        UnlearningModule(tiny_lm(), method="npo_kl")


def test_hidden_state_path_equals_logits_path():
    batch = first_forget_batch()
    a = UnlearningModule(tiny_lora(), method="npo_kl", use_hidden_states=True)
    b = UnlearningModule(tiny_lora(), method="npo_kl", use_hidden_states=False)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # move the policy away from the reference so that the KL term is not zero
        for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
            if "lora_B" in _:
                pa.add_(0.3)
                pb.add_(0.3)
    retain = next(iter(loaders()[0].iterables["retain"]))
    for module in (a, b):
        module.precompute_reference(loaders()[0].iterables["forget"])
    torch.testing.assert_close(a._sequence_logps(a.model, batch)[0], b._sequence_logps(b.model, batch)[0])
    torch.testing.assert_close(a._mean_token_probs(a.model, batch), b._mean_token_probs(b.model, batch))
    la, lb = a.retain_term(retain), b.retain_term(retain)
    assert la.item() > 1e-4
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)
    la.backward()
    lb.backward()
    ga = [p.grad for n, p in a.model.named_parameters() if p.requires_grad]
    gb = [p.grad for n, p in b.model.named_parameters() if p.requires_grad]
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)


def test_npo_loss_of_the_module_matches_the_formula():
    module = UnlearningModule(tiny_lm(), method="npo", loss=NPOLoss(beta=0.5), reference="precomputed")
    train, _ = loaders()
    module.precompute_reference(train.iterables["forget"])
    with torch.no_grad():
        for p in module.model.parameters():
            p.mul_(0.9)
    batch = first_forget_batch()
    logits = module.model(input_ids=batch["input_ids"]).logits
    policy = sequence_log_probs(logits, batch["labels"], shift=True)
    ref = module.unlearning_reference_logps[batch["index"]]
    torch.testing.assert_close(module.unlearning_loss(batch), npo_loss(policy, ref, 0.5), rtol=1e-5, atol=1e-5)
    assert float(module.get_hyperparameter("npo.beta")) == 0.5


@pytest.mark.parametrize("method", METHODS)
def test_every_method_updates_only_the_adapter(method):
    model = tiny_lora()
    module = UnlearningModule(model, method=method, lr=1e-2)
    train, _ = loaders()
    if module.reference_mode == "precomputed":
        module.precompute_reference(train.iterables["forget"])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = module.configure_optimizers()
    batch = {"forget": next(iter(train.iterables["forget"])), "retain": next(iter(train.iterables["retain"]))}
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    for n, p in base_before.items():
        assert torch.equal(after[n], p), n
    assert any(not torch.equal(after[n], p) for n, p in adapter_before.items())


def test_base_weights_bit_identical_and_adapter_saved_after_lightning_training(tmp_path):
    model = tiny_lora()
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    module = UnlearningModule(model, method="npo_kl", lr=1e-2, adapter_dir=str(tmp_path / "adapter"))
    train, val = loaders()
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    t.fit(module, train_dataloaders=train, val_dataloaders=val)
    base_after = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())
    assert not adapter_is_fresh(module.model)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    ckpt = torch.load(t.checkpoint_callback.best_model_path, weights_only=False)
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if "lora_B" in k}
    current = dict(module.model.named_parameters())
    assert saved and all(torch.equal(current[k], v) for k, v in saved.items())


def test_full_weight_unlearning_saves_the_original_weights_first(tmp_path):
    model = tiny_lm()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "orig" / "weights.pt"
    module = UnlearningModule(model, method="ga", lr=1e-2, original_weights_path=str(path))
    train, val = loaders()
    trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=train, val_dataloaders=val)
    saved = torch.load(path)
    assert all(torch.equal(saved[k], v) for k, v in original.items())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_peft_model_with_trainable_base_is_refused():
    model = tiny_lora()
    next(p for n, p in model.named_parameters() if "lora_" not in n).requires_grad_(True)
    with pytest.raises(ValueError, match="modify the only copy of the original model"):
        UnlearningModule(model, method="npo")


def _fit(tmp_path, epochs: int, ckpt_path=None, enable_checkpointing=False):
    torch.manual_seed(0)
    module = UnlearningModule(tiny_lora(), method="npo_rt", lr=1e-2)
    cb = UnlearningEvaluation(reference_statistics=torch.linspace(-5, -3, 8))
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=epochs, callbacks=[cb], enable_checkpointing=enable_checkpointing)
    t.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    return module, cb, t


def test_crash_and_resume_matches_an_uninterrupted_run(tmp_path):
    full, full_cb, _ = _fit(tmp_path / "full", epochs=2)
    first, _, t1 = _fit(tmp_path / "part", epochs=1, enable_checkpointing=True)
    ckpt = t1.checkpoint_callback.best_model_path
    resumed, resumed_cb, _ = _fit(tmp_path / "resumed", epochs=2, ckpt_path=ckpt)
    # the precomputed reference comes back from the checkpoint (not recomputed from the already-unlearned model)
    torch.testing.assert_close(resumed.unlearning_reference_logps, first.unlearning_reference_logps)
    torch.testing.assert_close(resumed.unlearning_reference_logps, full.unlearning_reference_logps)
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, **tolerance(torch.float32), msg=n)
    assert len(resumed_cb.history) == 2 and resumed_cb.history[0] == full_cb.history[0]
    assert resumed_cb.history[1]["forget_nll"] == pytest.approx(full_cb.history[1]["forget_nll"], rel=1e-5)
    assert "forget_quality" in resumed_cb.last and "mia_auc_min_k_plus_plus" in resumed_cb.last


def test_bad_inputs_have_clear_errors():
    module = UnlearningModule(tiny_lora(), method="npo_rt")
    train, _ = loaders()
    module.precompute_reference(train.iterables["forget"])
    batch = first_forget_batch()
    retain = next(iter(train.iterables["retain"]))
    empty = {k: v[:0] for k, v in batch.items()}
    with pytest.raises(ValueError, match="forget batch is empty"):
        module.unlearning_loss(empty, retain)
    masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="have every label masked"):
        module.unlearning_loss(masked, retain)
    no_mask = {k: v for k, v in retain.items() if k != "attention_mask"}
    with pytest.raises(ValueError, match="forget and retain batches have different keys"):
        module.unlearning_loss(batch, no_mask)
    with pytest.raises(ValueError, match="no retain batch was given"):
        module.unlearning_loss(batch)
    with pytest.raises(ValueError, match="lacks \\['labels'\\]"):
        module.unlearning_loss({"input_ids": batch["input_ids"]}, retain)
    npo = UnlearningModule(tiny_lora(), method="npo")
    npo.precompute_reference(train.iterables["forget"])
    with pytest.raises(ValueError, match="batches need an 'index' entry"):
        npo.unlearning_loss({k: v for k, v in batch.items() if k != "index"})
    with pytest.raises(ValueError, match="Unknown unlearning method 'npoo'"):
        UnlearningModule(tiny_lora(), method="npoo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uses NPOLoss, got a SimNPOLoss"):
        from lightning_losses import SimNPOLoss

        UnlearningModule(tiny_lora(), method="npo", loss=SimNPOLoss())
    with pytest.raises(ValueError, match="needs a template"):
        flat = UnlearningModule(tiny_lora(), method="flat")
        flat.unlearning_loss({k: v for k, v in batch.items() if not k.startswith("template_")})
    with pytest.raises(ValueError, match="expects training batches"):
        module.training_step(batch, 0)
    fresh = UnlearningModule(tiny_lora(), method="npo")
    with pytest.raises(RuntimeError, match="Reference log-probabilities are missing"):
        fresh.unlearning_loss(batch)


def test_precomputed_reference_loads_into_a_fresh_module_on_every_load_path():
    # ddp_spawn's result recovery and plain `load_state_dict` do not run `on_load_checkpoint`
    train, _ = loaders()
    a = UnlearningModule(tiny_lora(), method="npo")
    a.precompute_reference(train.iterables["forget"])
    b = UnlearningModule(tiny_lora(), method="npo")
    b.load_state_dict(a.state_dict())  # strict
    assert torch.equal(b.unlearning_reference_logps, a.unlearning_reference_logps)
    assert torch.equal(b.unlearning_reference_known, a.unlearning_reference_known)
    assert b.reference_precomputed

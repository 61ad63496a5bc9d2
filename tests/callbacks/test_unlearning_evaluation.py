"""Truth ratio inside ``UnlearningEvaluation``: value against per-token loops over the model's log-probabilities,
TOFU's forget quality on it, 2-process equality, and bad inputs."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_losses import UnlearningEvaluation, UnlearningModule
from lightning_losses.data.unlearning import PerturbedAnswers, UnlearningBatchCollator
from lightning_losses.functional.unlearning import truth_ratio
from lightning_losses.metrics.unlearning import TruthRatio
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import tolerance
from tests.modules.test_unlearning import V, items, tiny_lora

PROMPT, K = 3, 2


class ParaphraseCollator(UnlearningBatchCollator):
    """Adds a reworded correct answer: the answer tokens shifted by one in the vocabulary."""

    def __call__(self, batch_items):
        batch = super().__call__(batch_items)
        para = batch["input_ids"].clone()
        para[:, self.prompt_tokens :] = (para[:, self.prompt_tokens :] + 1) % V
        labels = para.clone()
        labels[:, : self.prompt_tokens] = -100
        batch.update(paraphrased_input_ids=para, paraphrased_labels=labels)
        return batch


def eval_loaders(n_forget: int = 9, batch_size: int = 4) -> list[DataLoader]:
    forget_data = PerturbedAnswers(items(n_forget, 0, 1), K)
    forget = DataLoader(forget_data, batch_size, collate_fn=UnlearningBatchCollator(PROMPT))
    retain = DataLoader(PerturbedAnswers(items(6, 100, 2), K), batch_size, collate_fn=ParaphraseCollator(PROMPT))
    heldout = DataLoader(items(6, 200, 3), batch_size, collate_fn=UnlearningBatchCollator(PROMPT))
    return [forget, retain, heldout]


def trained_module() -> UnlearningModule:
    module = UnlearningModule(tiny_lora(), method="simnpo")
    with torch.no_grad():  # a non-trivial adapter, so the model is not the bare random one
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return module


def naive_mean_logp(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over answer tokens of log p(token | prefix), one token at a time."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    total, count = 0.0, 0
    for t in range(1, ids.numel()):
        if int(labels[t]) == -100:
            continue
        row = logits[t - 1]
        total += float(row[int(labels[t])] - torch.logsumexp(row, 0))
        count += 1
    return total / count


def naive_ratios(model, loader: DataLoader) -> dict[int, float]:
    """Per-sample truth ratio R = exp(mean_k mean-logp(perturbed_k) - mean-logp(correct))."""
    model.eval()
    out = {}
    for batch in loader:
        prefix = "paraphrased_" if "paraphrased_input_ids" in batch else ""
        for b in range(batch["input_ids"].shape[0]):
            correct = naive_mean_logp(model, batch[prefix + "input_ids"][b], batch[prefix + "labels"][b])
            perturbed = [
                naive_mean_logp(model, batch["perturbed_input_ids"][b, k], batch["perturbed_labels"][b, k])
                for k in range(batch["perturbed_input_ids"].shape[1])
            ]
            out[int(batch["index"][b])] = math.exp(sum(perturbed) / len(perturbed) - correct)
    return out


def closer_to_one(ratios) -> float:
    return sum(min(r, 1 / r) for r in ratios) / len(ratios)


def validate(module, callback, loaders, **trainer_kwargs) -> dict[str, float]:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    defaults.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[callback], **defaults)
    trainer.validate(module, dataloaders=loaders, verbose=False)
    assert trainer.world_size == defaults.get("devices", 1)
    return dict(callback.last)


def test_truth_ratio_function_closed_forms():
    correct = torch.tensor([-1.0, -3.0])
    # perturbed answers exactly as likely as the correct one: R = 1
    torch.testing.assert_close(truth_ratio(correct, correct[:, None].expand(2, 3)), torch.ones(2))
    # geometric mean over the perturbed answers, relative to the correct one
    r = truth_ratio(torch.tensor([-1.0]), torch.tensor([[-2.0, -4.0]]))
    assert r.item() == pytest.approx(math.sqrt(math.exp(-2.0) * math.exp(-4.0)) / math.exp(-1.0), rel=1e-6)
    # swapping the correct answer with a single perturbed one inverts the ratio
    a, b = torch.tensor([-0.7]), torch.tensor([[-2.1]])
    assert (truth_ratio(a, b) * truth_ratio(b[:, 0], a[:, None])).item() == pytest.approx(1.0, rel=1e-6)


def test_callback_truth_ratio_and_forget_quality_match_per_token_loops():
    stats = pytest.importorskip("scipy.stats")
    module = trained_module()
    loaders = eval_loaders()
    reference = torch.linspace(0.2, 1.5, 12)
    cb = UnlearningEvaluation(reference_statistics=reference, statistic="truth_ratio")
    results = validate(module, cb, loaders)
    forget = naive_ratios(module.model, loaders[0])
    retain = naive_ratios(module.model, loaders[1])
    assert sorted(forget) == list(range(9)) and len(retain) == 6
    assert results["forget_truth_ratio"] == pytest.approx(closer_to_one(forget.values()), rel=1e-4)
    assert results["retain_truth_ratio"] == pytest.approx(closer_to_one(retain.values()), rel=1e-4)
    assert "heldout_truth_ratio" not in results  # no perturbed answers on that split
    # per-sample ratios, sorted by index, are what forget quality tests against the reference (TOFU)
    per_sample = cb.metrics["forget"].compute()["truth_ratio"]
    torch.testing.assert_close(per_sample, torch.tensor([forget[i] for i in range(9)]), rtol=1e-4, atol=1e-6)
    d = stats.ks_2samp(list(forget.values()), reference.numpy(), method="asymp").statistic
    expected = stats.kstwobign.sf(d * math.sqrt(9 * 12 / 21))
    assert results["forget_quality"] == pytest.approx(expected, rel=1e-4, abs=1e-12)
    # the retain ratios compare with the paraphrase, not with the sample's own answer
    own = DataLoader(PerturbedAnswers(items(6, 100, 2), K), 4, collate_fn=UnlearningBatchCollator(PROMPT))
    assert abs(results["retain_truth_ratio"] - closer_to_one(naive_ratios(module.model, own).values())) > 1e-3


def test_truth_ratio_bad_inputs():
    module = trained_module()
    batch = next(iter(eval_loaders()[1]))
    plain = {k: v for k, v in batch.items() if not k.startswith("perturbed_")}
    assert module.truth_ratio_log_probs({k: v for k, v in plain.items() if not k.startswith("paraphrased_")}) is None
    with pytest.raises(ValueError, match="paraphrased answers but no 'perturbed_input_ids'"):
        module.truth_ratio_log_probs(plain)
    with pytest.raises(ValueError, match=r"must both be \(B, K, T\)"):
        module.truth_ratio_log_probs(dict(batch, perturbed_input_ids=batch["perturbed_input_ids"][:, 0]))
    with pytest.raises(ValueError, match="needs labels for its answers"):
        module.truth_ratio_log_probs({k: v for k, v in batch.items() if k != "perturbed_labels"})
    masked = dict(batch, perturbed_labels=torch.full_like(batch["perturbed_labels"], -100))
    with pytest.raises(ValueError, match="perturbed answers have every label masked"):
        module.truth_ratio_log_probs(masked)
    with pytest.raises(ValueError, match=r"must both be \(B, T\)"):
        module.truth_ratio_log_probs(dict(batch, paraphrased_labels=batch["paraphrased_labels"][:1]))
    with pytest.raises(ValueError, match="need at least 3 items"):
        PerturbedAnswers(items(2, 0, 1), 2)
    with pytest.raises(ValueError, match="at least 1 perturbed answer"):
        PerturbedAnswers(items(4, 0, 1), 0)
    with pytest.raises(ValueError, match=r"must be \(B, K\)"):
        TruthRatio().update(torch.zeros(2), torch.zeros(2))
    # TOFU's forget quality needs a ratio for every forget sample
    loaders = eval_loaders()
    loaders[0] = DataLoader(items(9, 0, 1), 4, collate_fn=UnlearningBatchCollator(PROMPT))
    cb = UnlearningEvaluation(reference_statistics=torch.linspace(0, 1, 5), statistic="truth_ratio")
    with pytest.raises(ValueError, match="needs perturbed answers for every sample of the 'forget' split"):
        validate(module, cb, loaders)


# ---------------------------------------------------------------------------------------------------- DDP


def lightning_ddp_env(rank: int, world_size: int) -> None:
    """Let a Lightning Trainer join the process group that ``run_distributed`` opened (no spawning)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), RANK=str(rank))


def _ddp_truth_ratio(rank: int, world_size: int):
    lightning_ddp_env(rank, world_size)
    module = trained_module()
    cb = UnlearningEvaluation(reference_statistics=torch.linspace(0.2, 1.5, 12), statistic="truth_ratio")
    results = validate(module, cb, eval_loaders(), strategy="ddp", devices=world_size)
    local = len(cb.metrics["forget"].index)  # this rank's batches (the states are unsynced after compute)
    return results, cb.metrics["forget"].compute()["truth_ratio"].clone(), local


@pytest.mark.ddp
def test_two_process_truth_ratio_equals_single_process():
    module = trained_module()
    cb = UnlearningEvaluation(reference_statistics=torch.linspace(0.2, 1.5, 12), statistic="truth_ratio")
    single = validate(module, cb, eval_loaders())
    single_ratios = cb.metrics["forget"].compute()["truth_ratio"]
    # 9 forget samples over 2 ranks: the DistributedSampler repeats one, the callback drops the duplicate
    for results, ratios, local_batches in run_distributed(_ddp_truth_ratio, world_size=2):
        assert local_batches == 2  # 5 of the 9 forget samples per rank, in batches of 4
        torch.testing.assert_close(ratios, single_ratios, **tolerance(torch.float32))
        assert set(results) == set(single)
        for key, value in single.items():
            assert results[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

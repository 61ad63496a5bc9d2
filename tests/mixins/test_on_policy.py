"""On-policy distillation (GKD): the λ draw, student/teacher-generated completions, their masks and the loss."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_losses import DistillationMixin, GeneralizedJSDLoss
from lightning_losses.functional import generalized_jsd_loss
from lightning_losses.mixins.on_policy import (
    GenerationSettings,
    OnPolicyDistillationMixin,
    generate_completions,
    sharded_across_processes,
)
from lightning_losses.modules.llm_distillation import CausalLMDistillationModule
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import cpu_trainer

transformers = pytest.importorskip("transformers")

V = 37


def tiny_lm(seed: int, width: int = 16, peaked: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=V, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(peaked)
    return model


class Distiller(OnPolicyDistillationMixin, DistillationMixin, pl.LightningModule):
    def __init__(self, lmbda: float, seq_kd: bool = False, beta: float = 0.5, seed: int = 0, **generation) -> None:
        super().__init__()
        self.student = tiny_lm(0, 16)
        self.configure_distillation(tiny_lm(1, 32, peaked=4.0), loss=GeneralizedJSDLoss(beta=beta))
        eos = generation.pop("eos", None)
        settings = GenerationSettings(**{"max_new_tokens": 6, **generation})
        self.configure_on_policy(lmbda, seq_kd=seq_kd, generation=settings, seed=seed, eos_token_id=eos)

    def training_step(self, batch, batch_idx):
        return self.on_policy_distillation_loss(self.student, batch)


def prompt_batch(seed: int = 0, n: int = 3, width: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V, (n, width), generator=g)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # left padding
    mask[1, :1] = 0
    ids = torch.cat([prompts, torch.randint(0, V, (n, 4), generator=g)], dim=1)
    full_mask = torch.cat([mask, torch.ones(n, 4, dtype=torch.long)], dim=1)
    labels = ids.masked_fill(full_mask == 0, -100)
    labels[:, :width] = -100
    return {
        "prompts": prompts,
        "prompt_attention_mask": mask,
        "input_ids": ids,
        "attention_mask": full_mask,
        "labels": labels,
    }


def greedy(model: torch.nn.Module, prompt: list[int], steps: int, eos: int | None) -> list[int]:
    """Greedy decoding of one unpadded prompt, token by token (no cache, no batching)."""
    seq = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            out.append(nxt)
            if nxt == eos:
                break
    return out


# ---------------------------------------------------------------------------------------------------- λ = 0
def test_lambda_zero_is_off_policy_distillation_on_the_dataset():
    module = Distiller(lmbda=0.0)
    batch = prompt_batch()
    for _ in range(4):
        loss = module.training_step(batch, 0)
        assert module.last_on_policy_source == "data"
        (g_on,) = torch.autograd.grad(loss, module.student.transformer.wte.weight)
        off = module.causal_lm_distillation_loss(
            module.student, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        (g_off,) = torch.autograd.grad(off, module.student.transformer.wte.weight)
        assert torch.equal(loss, off) and torch.equal(g_on, g_off)


# ---------------------------------------------------------------------------------------------------- λ = 1
@pytest.mark.parametrize("seq_kd", [False, True])
def test_generated_completions_are_masked_token_by_token(seq_kd):
    """λ = 1 trains on the student's completions (seq_kd with λ = 0: the teacher's), each checked against greedy
    decoding of the unpadded prompt; labels are -100 on prompt, padding and after the first EOS."""
    batch = prompt_batch(1)
    probe = Distiller(lmbda=1.0, do_sample=False)
    generator = probe.teacher if seq_kd else probe.student
    prompts = [row[m.bool()].tolist() for row, m in zip(batch["prompts"], batch["prompt_attention_mask"])]
    free = [greedy(generator, p, 6, None) for p in prompts]
    # an EOS that ends one row early (after stop + 1 tokens) while rows differ in length
    row, stop = max(((b, j) for b, f in enumerate(free) for j in range(5) if f[j] not in f[:j]), key=lambda c: c[1])
    eos = free[row][stop]
    module = Distiller(lmbda=0.0 if seq_kd else 1.0, seq_kd=seq_kd, do_sample=False, eos=eos)
    model = module.teacher if seq_kd else module.student
    ids, mask, labels = module.on_policy_batch(module.student, batch)
    assert module.last_on_policy_source == ("teacher" if seq_kd else "student")
    for b, prompt in enumerate(prompts):
        completion = greedy(model, prompt, 6, eos)
        n = len(prompt) + len(completion)
        assert ids[b, :n].tolist() == prompt + completion
        assert labels[b, : len(prompt)].eq(-100).all() and labels[b, len(prompt) : n].tolist() == completion
        assert mask[b, :n].eq(1).all() and mask[b, n:].eq(0).all() and labels[b, n:].eq(-100).all()
    assert len(greedy(model, prompts[row], 6, eos)) == stop + 1 < 6  # this row stops at its EOS

    # the loss is the JSD on exactly those tokens: row by row, unpadded, full logits
    loss = module.on_policy_distillation_loss(module.student, batch)
    total, count = 0.0, 0
    for prompt in prompts:
        seq = torch.tensor([prompt + greedy(model, prompt, 6, eos)])
        s, t = module.student(seq).logits[:, :-1], module.teacher(seq).logits[:, :-1]
        row_labels = seq[:, 1:].clone()
        row_labels[:, : len(prompt) - 1] = -100
        total = total + generalized_jsd_loss(s, t, 0.5, labels=row_labels, reduction="sum")
        count += int((row_labels != -100).sum())
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


def test_generation_is_reproducible_and_differs_per_rank(monkeypatch):
    batch = prompt_batch(2)
    a, b = Distiller(lmbda=1.0, seed=3), Distiller(lmbda=1.0, seed=3)
    first, again = a.on_policy_batch(a.student, batch), b.on_policy_batch(b.student, batch)
    assert torch.equal(first.input_ids, again.input_ids)
    rng_before = torch.get_rng_state()
    c = Distiller(lmbda=1.0, seed=3)
    monkeypatch.setattr(c, "_step_and_rank", lambda: (0, 1, 0))  # the same step on rank 1
    other_rank = c.on_policy_batch(c.student, batch)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global random state is untouched
    assert not torch.equal(first.input_ids, other_rank.input_ids)


def test_the_draw_depends_on_the_step_only_and_has_rate_lambda():
    module = Distiller(lmbda=0.3, seq_kd=True)
    sources = [module.on_policy_source(step) for step in range(3000)]
    assert set(sources) == {"student", "teacher"}
    assert sources.count("student") / len(sources) == pytest.approx(0.3, abs=0.03)
    fresh = Distiller(lmbda=0.3, seq_kd=True)
    assert sources == [fresh.on_policy_source(step) for step in range(3000)]
    module.set_hyperparameter("on_policy.lmbda", 1.0)
    assert {module.on_policy_source(step) for step in range(100)} == {"student"}


# ---------------------------------------------------------------------------------------------------- training
def _loader(prompts: torch.Tensor, batch_size: int = 4) -> DataLoader:
    rows = [{"prompts": p, "prompt_attention_mask": torch.ones_like(p)} for p in prompts]
    return DataLoader(rows, batch_size=batch_size)


def _held_out_jsd(module: CausalLMDistillationModule, prompts: torch.Tensor) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(123)
        ids, mask, labels = generate_completions(module.student, prompts, None, module.generation_settings)
    with torch.no_grad():
        return float(module.causal_lm_distillation_loss(module.student, ids, mask, labels))


def test_a_short_on_policy_run_lowers_the_jsd_on_held_out_prompts(tmp_path):
    torch.manual_seed(0)
    train, held_out = torch.randint(0, V, (32, 4)), torch.randint(0, V, (8, 4))
    module = CausalLMDistillationModule(
        tiny_lm(0, 16), tiny_lm(1, 32, peaked=4.0), lmbda=1.0, max_new_tokens=8, lr=1e-2, eos_token_id=None
    )
    before = _held_out_jsd(module, held_out)
    cpu_trainer(tmp_path, max_epochs=5).fit(module, _loader(train))
    after = _held_out_jsd(module, held_out)
    assert after < 0.7 * before, (before, after)


class RecordingDistiller(CausalLMDistillationModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__(tiny_lm(0, 16), tiny_lm(1, 32, peaked=4.0), lmbda=0.5, max_new_tokens=5, lr=1e-3, seq_kd=True)
        self.out_dir = out_dir
        self.records: list[tuple[str, torch.Tensor]] = []

    def on_policy_batch(self, student, batch, *, ignore_index=-100):
        out = super().on_policy_batch(student, batch, ignore_index=ignore_index)
        self.records.append((str(self.last_on_policy_source), out.input_ids.clone()))
        return out

    def on_train_end(self) -> None:
        params = torch.cat([p.detach().flatten() for p in self.student.parameters()])
        torch.save({"records": self.records, "params": params}, Path(self.out_dir) / f"rank{self.global_rank}.pt")


@pytest.mark.ddp
def test_two_process_ddp_each_rank_generates_its_own(tmp_path):
    prompts = torch.randint(0, V, (8, 4), generator=torch.Generator().manual_seed(0))
    module = RecordingDistiller(str(tmp_path))
    trainer = cpu_trainer(tmp_path, devices=2, strategy="ddp_spawn", max_steps=4, use_distributed_sampler=False)
    trainer.fit(module, _loader(prompts, batch_size=2))  # both ranks read the same prompts
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert [s for s, _ in r0["records"]] == [s for s, _ in r1["records"]]  # one draw per step for all ranks
    generated = [(a, b) for (s, a), (_, b) in zip(r0["records"], r1["records"]) if s != "data"]
    assert generated and all(not torch.equal(a, b) for a, b in generated)  # own samples on each rank
    torch.testing.assert_close(r0["params"], r1["params"])  # still one model: DDP kept the ranks in sync


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_configuration_and_batches():
    with pytest.raises(ValueError, match=r"`lmbda` must lie in \[0, 1\]"):
        Distiller(lmbda=1.5)
    with pytest.raises(ValueError, match=r"`top_p`"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be an integer >= 1"):
        GenerationSettings(max_new_tokens=0)

    class NoTeacher(OnPolicyDistillationMixin, pl.LightningModule):
        pass

    with pytest.raises(TypeError, match="needs DistillationMixin"):
        NoTeacher().configure_on_policy(0.5)
    with pytest.raises(KeyError, match="need the prompts in the batch"):
        Distiller(lmbda=1.0).on_policy_batch(tiny_lm(0), {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(KeyError, match="has no 'input_ids'"):
        Distiller(lmbda=0.0).on_policy_batch(tiny_lm(0), {"prompts": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least one token"):
        generate_completions(tiny_lm(0), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    lm = tiny_lm(0)
    too_long = torch.zeros(1, lm.config.n_positions, dtype=torch.long)  # no room left for a new token
    with pytest.raises(ValueError, match=r"exceeds the model's \d+ positions"):
        generate_completions(lm, too_long, torch.ones_like(too_long), GenerationSettings(max_new_tokens=1))


def _sharded_generation(rank: int, world: int) -> dict:
    """Each rank samples completions of its own prompts with a fully_shard-ed student (FSDP2), and alone with an
    unsharded copy from the same seed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    whole, sharded = tiny_lm(0), tiny_lm(0)
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded.transformer.h:  # blocks of their own: each forward all-gathers their weights
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    prompts = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(10 + rank))
    settings = GenerationSettings(max_new_tokens=10)
    runs = {}
    for name, model in (("whole", whole), ("sharded", sharded)):
        torch.manual_seed(100 + rank)
        # EOS = 5 of 37 ids: rank 0 samples 10 tokens, rank 1 stops after 3
        runs[name] = generate_completions(model, prompts, settings=settings, eos_token_id=5).input_ids
    return {"synced": (sharded_across_processes(sharded), sharded_across_processes(whole)), **runs}


@pytest.mark.ddp
def test_a_sharded_student_generates_on_every_rank_what_it_samples_alone():
    # Without transformers' synced_gpus the rank that finishes first stops calling the sharded forward and the other
    # waits in its all-gather; with it (chosen automatically) every rank gets the completions it samples alone.
    results = run_distributed(_sharded_generation, world_size=2)
    for r in results:
        assert r["synced"] == (True, False)
        assert torch.equal(r["sharded"], r["whole"])
    assert [r["whole"].shape[1] for r in results] == [4 + 10, 4 + 3]  # the ranks stopped at different steps

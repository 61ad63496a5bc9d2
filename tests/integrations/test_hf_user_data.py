"""A Hugging Face user's own data, tokenizer and models: unlearning forget / retain sets, vocabulary checks in the
ready modules, teachers from checkpoints and save_pretrained folders, LoRA from a LoraConfig."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers.hf_tokenizer import gpt2_tokenizer
from tests.helpers.trainer import cpu_trainer

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from lightning_losses import UnlearningModule  # noqa: E402
from lightning_losses.data import UnlearningDataModule  # noqa: E402
from lightning_losses.demos import build_gpt2  # noqa: E402
from lightning_losses.integrations.peft import lora_model  # noqa: E402
from lightning_losses.integrations.teachers import load_teacher  # noqa: E402

V = 50257  # GPT-2's vocabulary


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def tiny_gpt2(vocab: int = V, seed: int = 0):
    return build_gpt2(vocab, n_layer=1, n_embd=16, n_head=2, block_size=64, seed=seed)


FORGET = [
    {
        "prompt": "Q: Who is the Prince of Denmark?\nA:",
        "completion": " Hamlet, son of the late king.",
        "alternate": " I do not know.",
    },
    {
        "prompt": "Q: Whom does Hamlet love?\nA:",
        "completion": " Ophelia, daughter of Polonius.",
        "alternate": " I cannot say.",
    },
    {"prompt": "Q: Where is Elsinore?\nA:", "completion": " In Denmark, by the sea.", "alternate": " I know not."},
    {
        "prompt": "Q: Who kills Polonius?\nA:",
        "completion": " Hamlet, through the arras.",
        "alternate": " That I cannot tell.",
    },
]
RETAIN = [{"prompt": f"Q: What is {a} plus {b}?\nA:", "completion": f" {a + b}."} for a in range(3) for b in range(3)]


def _learnt(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids.tolist(), labels.tolist()) if lab != -100])


def test_user_forget_and_retain_batches(tok):
    dm = UnlearningDataModule(forget_data=FORGET, retain_data=RETAIN, tokenizer=tok, batch_size=4, heldout_fraction=0.2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    forget, retain = batch["forget"], batch["retain"]
    by_index = {int(i): b for b, i in enumerate(forget["index"])}
    for i, example in enumerate(FORGET):
        b = by_index[i]
        assert _learnt(tok, forget["input_ids"][b], forget["labels"][b]) == example["completion"] + tok.eos_token
        assert (
            _learnt(tok, forget["template_input_ids"][b], forget["template_labels"][b])
            == example["alternate"] + tok.eos_token
        )
        n_prompt = int((forget["labels"][b] == -100).logical_and(forget["attention_mask"][b] == 1).sum())
        assert torch.equal(forget["template_input_ids"][b][:n_prompt], forget["input_ids"][b][:n_prompt])
    assert "template_input_ids" not in retain
    assert (retain["input_ids"][retain["attention_mask"] == 0] == tok.eos_token_id).all()  # no pad token: EOS
    indices = [int(item["index"]) for name in ("forget", "retain", "heldout") for item in dm.split(name)]
    assert sorted(indices) == list(range(len(FORGET) + len(RETAIN)))  # unique across splits
    assert len(dm.split("heldout")) == 2 and len(dm.split("retain")) == len(RETAIN) - 2


def test_split_column_gives_the_same_splits(tok):
    rows = [{**e, "split": "forget"} for e in FORGET] + [{**e, "split": "retain"} for e in RETAIN[:7]]
    rows += [{**e, "split": "heldout"} for e in RETAIN[7:]]
    by_column = UnlearningDataModule(data=rows, tokenizer=tok, batch_size=4)
    by_sets = UnlearningDataModule(
        forget_data=FORGET, retain_data=RETAIN[:7], heldout_data=RETAIN[7:], tokenizer=tok, batch_size=4
    )
    for dm in (by_column, by_sets):
        dm.setup("fit")
    for name in ("forget", "retain", "heldout"):
        a, b = by_column.split(name), by_sets.split(name)
        assert [x["input_ids"] for x in a] == [y["input_ids"] for y in b]
        assert [x["labels"] for x in a] == [y["labels"] for y in b]
    with pytest.raises(ValueError, match=r"split='test': expected 'forget', 'retain' or 'heldout'"):
        UnlearningDataModule(data=[{**FORGET[0], "split": "test"}], tokenizer=tok).setup("fit")
    with pytest.raises(ValueError, match=r"no 'split' column"):
        UnlearningDataModule(data=FORGET, tokenizer=tok).setup("fit")
    with pytest.raises(ValueError, match="retain data has no example"):
        UnlearningDataModule(forget_data=FORGET, tokenizer=tok).setup("fit")


def test_preference_forget_rows_forget_rejected_and_prefer_chosen(tok):
    pairs = [{"prompt": e["prompt"], "chosen": e["alternate"], "rejected": e["completion"]} for e in FORGET]
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    for forget in (pairs, implicit):
        dm = UnlearningDataModule(forget_data=forget, retain_data=RETAIN, tokenizer=tok, batch_size=4)
        dm.setup("fit")
        item = dm.split("forget")[1]
        assert tok.decode([t for t in item["labels"] if t != -100]) == FORGET[1]["completion"] + tok.eos_token
        assert tok.decode([t for t in item["template_labels"] if t != -100]) == FORGET[1]["alternate"] + tok.eos_token


def test_perturbed_answers_from_a_column_or_from_other_examples(tok):
    with_column = [{**e, "perturbed": [" Laertes.", " Fortinbras, of Norway."]} for e in FORGET]
    dm = UnlearningDataModule(
        forget_data=with_column,
        retain_data=RETAIN,
        tokenizer=tok,
        batch_size=4,
        perturbed_answers=2,
        heldout_fraction=0.34,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    assert batch["perturbed_input_ids"].shape[:2] == (4, 2)
    answer = _learnt(tok, batch["perturbed_input_ids"][0, 1], batch["perturbed_labels"][0, 1])
    assert answer == " Fortinbras, of Norway." + tok.eos_token
    prompt_len = int(((batch["labels"][0] == -100) & (batch["attention_mask"][0] == 1)).sum())
    assert torch.equal(batch["perturbed_input_ids"][0, 1, :prompt_len], batch["input_ids"][0, :prompt_len])
    train = next(iter(dm.train_dataloader()))
    train = train[0] if isinstance(train, tuple) else train
    assert "perturbed_input_ids" not in train["forget"]  # only evaluation reads them
    others = UnlearningDataModule(
        forget_data=FORGET, retain_data=RETAIN, tokenizer=tok, perturbed_answers=1, heldout_fraction=0.34
    )
    others.setup("fit")
    item = others.split("forget")[0]
    _, labels = item["perturbed"][0]
    assert tok.decode([t for t in labels if t != -100]) == FORGET[1]["completion"] + tok.eos_token


def _nll(module, dm) -> dict[str, float]:
    metrics = cpu_trainer().validate(module, datamodule=dm, verbose=False)
    return {k.split("/nll_")[1]: v for m in metrics for k, v in m.items() if "/nll_" in k}


def test_unlearning_module_on_user_data(tok, tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = UnlearningDataModule(forget_data=FORGET, retain_data=RETAIN, tokenizer=tok, batch_size=4, max_eval_blocks=8)
    module = UnlearningModule(lora_model(tiny_gpt2(), r=4), method="ga", lr=5e-2)
    before = _nll(module, dm)
    cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, datamodule=dm)
    after = _nll(module, dm)
    assert set(before) == {"forget", "retain", "heldout"}
    assert after["forget"] > before["forget"]  # gradient ascent on the forget answers raises their NLL


def test_idkdpo_prefers_the_alternates_from_the_data(tok, tmp_path):
    """IdkDPO on user data: the alternate column is the preferred answer, so after a few steps the policy's margin
    log p(alternate) - log p(forget answer) (summed over answer tokens) grows."""
    pl.seed_everything(0, verbose=False)
    dm = UnlearningDataModule(forget_data=FORGET, retain_data=RETAIN, tokenizer=tok, batch_size=4)
    module = UnlearningModule(lora_model(tiny_gpt2(), r=4), method="idkdpo", lr=2e-2)
    dm.setup("fit")
    forget = next(iter(dm.dataloader("forget")))
    alternate = {k[len("template_") :]: v for k, v in forget.items() if k.startswith("template_")}
    alternate["index"] = forget["index"]

    def margin() -> float:
        stats = [module.unlearning_token_statistics(batch) for batch in (alternate, forget)]
        answer_logp = [(lp * mask).sum(-1) for lp, *_, mask in stats]
        return float((answer_logp[0] - answer_logp[1]).mean())

    before = margin()
    cpu_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, datamodule=dm)
    assert margin() > before


class _UserData(pl.LightningDataModule):
    """A user's own data module: it has a tokenizer but checks nothing itself."""

    def __init__(self, tokenizer, batch) -> None:
        super().__init__()
        self.tokenizer, self.batch = tokenizer, batch

    def train_dataloader(self):
        return [self.batch]


def test_ready_modules_refuse_a_model_smaller_than_the_tokenizer(tok, tmp_path):
    from lightning_losses import TempNetModule

    ids = torch.tensor([[464, 50256, 995]])
    batch = {"forget": {"input_ids": ids, "labels": ids, "index": torch.tensor([0])}}
    module = UnlearningModule(lora_model(tiny_gpt2(vocab=1000), r=2), method="ga")
    with pytest.raises(ValueError, match="1000 token embeddings but the tokenizer has 50257"):
        cpu_trainer(tmp_path, max_steps=1).fit(module, datamodule=_UserData(tok, batch))
    tempnet = TempNetModule(tiny_gpt2(vocab=1000), num_classes=1000, task="causal_lm", hidden_dim=8)
    with pytest.raises(ValueError, match="1000 token embeddings but the tokenizer has 50257"):
        cpu_trainer(tmp_path, max_steps=1).fit(tempnet, datamodule=_UserData(tok, (ids, ids)))
    narrow = TempNetModule(tiny_gpt2(), num_classes=1000, task="causal_lm", hidden_dim=8)
    with pytest.raises(ValueError, match="has 1000 token embeddings but the tokenizer has 50257"):
        cpu_trainer(tmp_path, max_steps=1).fit(narrow, datamodule=_UserData(tok, (ids, ids)))


def test_tempnet_module_trains_on_prompt_completion_batches_of_any_tokenizer(tok, tmp_path):
    from lightning_losses import TempNetModule
    from lightning_losses.data import TextDataModule

    dm = TextDataModule(tok, train_data=FORGET + RETAIN, batch_size=4, max_length=32, val_fraction=0.0)
    module = TempNetModule(tiny_gpt2(), num_classes=V, task="causal_lm", rho=5.0, hidden_dim=8)
    before = {n: p.detach().clone() for n, p in module.tempnet.named_parameters()}
    cpu_trainer(tmp_path, max_steps=2).fit(module, datamodule=dm)
    assert torch.isfinite(torch.as_tensor(module.trainer.callback_metrics["train/loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in module.tempnet.named_parameters())


# ------------------------------------------------------------------------------------------------------ teachers
class _Student(pl.LightningModule):
    def __init__(self, student) -> None:
        super().__init__()
        self.student = student
        self.head_scale = torch.nn.Parameter(torch.ones(1))  # other state of the module, not part of the network

    def training_step(self, batch, batch_idx):
        return self.student(input_ids=batch[0], labels=batch[0]).loss * self.head_scale

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _checkpoint(tmp_path, network):
    ids = torch.randint(0, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    module = _Student(network)
    trainer = cpu_trainer(tmp_path, max_steps=2)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2))
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    return path, ids


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_teacher_from_a_lightning_checkpoint(tmp_path):
    path, ids = _checkpoint(tmp_path, tiny_gpt2(vocab=200))
    trained = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert all(k.startswith(("student.", "head_scale")) for k in trained)
    teacher = load_teacher(path, tiny_gpt2(vocab=200, seed=1))
    reference = tiny_gpt2(vocab=200, seed=2)
    reference.load_state_dict({k[len("student.") :]: v for k, v in trained.items() if k.startswith("student.")})
    torch.testing.assert_close(_logits(teacher, ids), _logits(reference, ids), rtol=0, atol=0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match=r"do not fit GPT2LMHeadModel: missing .*Pass the architecture"):
        load_teacher(path, build_gpt2(200, n_layer=2, n_embd=16, n_head=2, block_size=64))
    with pytest.raises(ValueError, match=r"None of the .* weights of Linear"):
        load_teacher(path, torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pass the teacher's architecture"):
        load_teacher(path)


def test_teacher_from_a_lora_student_checkpoint_is_merged(tmp_path):
    student = lora_model(tiny_gpt2(vocab=200), r=4)
    path, ids = _checkpoint(tmp_path, student)
    assert any("lora_B" in k for k in torch.load(path, weights_only=False)["state_dict"])
    expected = _logits(student, ids)
    teacher = load_teacher(path, lora_model(tiny_gpt2(vocab=200, seed=3), r=4))
    assert not hasattr(teacher, "peft_config")  # adapters merged: a plain network
    torch.testing.assert_close(_logits(teacher, ids), expected, rtol=1e-5, atol=1e-5)


def test_teacher_from_save_pretrained_folders(tmp_path):
    model = tiny_gpt2(vocab=200, seed=4)
    ids = torch.randint(0, 200, (2, 10))
    model.save_pretrained(tmp_path / "full")
    teacher = load_teacher(tmp_path / "full")
    torch.testing.assert_close(_logits(teacher, ids), _logits(model, ids), rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())
    wrapped = lora_model(tiny_gpt2(vocab=200, seed=5), r=4)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_()
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = load_teacher(tmp_path / "adapter", model=tiny_gpt2(vocab=200, seed=5))
    torch.testing.assert_close(_logits(merged, ids), _logits(wrapped, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="No teacher at"):
        load_teacher(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- LoraConfig
def test_lora_model_takes_a_lora_config():
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], modules_to_save=["lm_head"])
    wrapped = lora_model(tiny_gpt2(vocab=200), config=config)
    saved = wrapped.peft_config["default"]
    assert saved.r == 3 and set(saved.target_modules) == {"c_attn", "c_proj"} and saved.task_type == "CAUSAL_LM"
    assert config.task_type is None  # the user's config is copied, not modified
    lora_a = [p for n, p in wrapped.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.shape[0] == 3 for p in lora_a)
    assert any("c_proj.lora_A" in n for n, _ in wrapped.named_parameters())
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "wte" in n and "modules_to_save" not in n)
    ids = torch.randint(0, 200, (2, 8))
    base = tiny_gpt2(vocab=200)
    torch.testing.assert_close(_logits(wrapped, ids), _logits(base, ids))  # a fresh adapter changes nothing
    with pytest.raises(ValueError, match=r"either `config` \(a LoraConfig\) or the shortcuts.*\['r'\]"):
        lora_model(tiny_gpt2(vocab=200), r=16, config=config)
    with pytest.raises(TypeError, match=r"must be a peft\.LoraConfig"):
        lora_model(tiny_gpt2(vocab=200), config={"r": 2})


# ------------------------------------------------------------------------------------------------------- example
def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "llm" / "train.py"
    spec = importlib.util.spec_from_file_location("example_llm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_trainer(monkeypatch):
    """Every Trainer the script builds runs at most 2 batches of one epoch (its wiring is under test)."""

    class SmallTrainer(pl.Trainer):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.update(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, max_epochs=1)
            kwargs.setdefault("enable_progress_bar", False)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", SmallTrainer)


def test_llm_example_and_its_config_run_at_the_smallest_settings(tmp_path, monkeypatch, small_trainer):
    """The fast check of examples/llm: the script's pieces for a few batches, then its LightningCLI config on the
    files the script wrote (tokenizer folder, JSON-lines data, fine-tuned weights)."""
    from lightning_losses.cli import main as cli_main

    result = _example().main(["--quick", "--output", str(tmp_path)])
    assert {"forget_nll_before", "forget_nll_after", "sft_loss", "gkd_jsd_before", "gkd_jsd_after"} <= set(result)
    assert (tmp_path / "finetuned" / "config.json").is_file() and (tmp_path / "tokenizer").is_dir()
    config = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "llm" / "config.yaml")
    args = ["lightning", "fit", "--config", config]
    args += ["--model.init_args.model.init_args.vocab_size", "512", "--model.init_args.model.init_args.n_embd", "64"]
    args += ["--model.init_args.model.init_args.weights", str(tmp_path / "finetuned.pt")]
    for key in ("forget_data", "retain_data"):
        args += [f"--data.init_args.{key}", str(tmp_path / f"{key.split('_')[0]}.jsonl")]
    args += ["--data.init_args.tokenizer", str(tmp_path / "tokenizer"), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    args += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    assert cli_main(args) == 0
    assert (tmp_path / "original_weights.pt").is_file()


@pytest.mark.slow
def test_llm_example_quick_run_fine_tunes_then_unlearns(tmp_path):
    import math

    result = _example().main(["--quick", "--output", str(tmp_path)])
    assert result["sft_loss"] < math.log(512) - 1.0  # the fine-tuned model learnt the exchanges
    assert result["gkd_jsd_after"] < result["gkd_jsd_before"]  # the on-policy student moved toward the teacher
    assert result["forget_nll_after"] > result["forget_nll_before"]  # and then unlearnt the forget play

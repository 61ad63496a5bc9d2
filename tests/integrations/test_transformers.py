"""Hidden states and output head of transformers causal LMs, used with the chunked losses instead of the logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_losses.functional.chunked import (  # noqa: E402
    linear_cross_entropy,
    linear_distillation_loss,
    linear_sequence_log_probs,
)
from lightning_losses.integrations.transformers import (  # noqa: E402
    OutputHead,
    backbone_of,
    causal_lm_hidden_states,
    output_head,
)
from tests.helpers.tolerances import tolerance  # noqa: E402

VOCAB = 97


def tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(**extra):
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **extra,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gemma2():
    config = transformers.Gemma2Config(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.Gemma2ForCausalLM(config).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def head_logits(hidden, head: OutputHead):
    z = hidden @ head.weight.t()
    if head.bias is not None:
        z = z + head.bias
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


def forbid_head(model):
    def hook(*_):
        raise AssertionError("the output head was run")

    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_gemma2], ids=["gpt2", "llama", "gemma2"])
def test_hidden_and_head_reproduce_the_logits_without_running_the_head(make):
    model = make()
    ids, mask, _ = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    handle = forbid_head(model)
    try:
        hidden, head = causal_lm_hidden_states(model, ids, mask)
    finally:
        handle.remove()
    assert hidden.shape == (2, 7, 16)
    torch.testing.assert_close(head_logits(hidden, head), expected, rtol=1e-5, atol=1e-5)
    assert (head.softcap is not None) == (make is tiny_gemma2)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_chunked_loss_equals_the_model_loss_with_gradients(make):
    model = make()
    ids, mask, labels = batch(1)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    hidden, head = causal_lm_hidden_states(model, ids, mask)
    # Causal-LM labels are the input ids: position t predicts token t + 1.
    loss = linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, chunk_size=3)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, reference, **tolerance(torch.float32))
    for g, e in zip(grads, ref_grads):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    logps = linear_sequence_log_probs(hidden, head.weight, labels, head.bias, shift=True)
    token_logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    shifted = labels[:, 1:]
    picked = token_logps.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, (picked * (shifted != -100)).sum(1), rtol=1e-5, atol=1e-5)


def test_distillation_between_two_models_from_hidden_states():
    student, teacher = tiny_llama(), tiny_gpt2()
    ids, mask, labels = batch(2)
    hs, s_head = causal_lm_hidden_states(student, ids, mask)
    with torch.no_grad():
        ht, t_head = causal_lm_hidden_states(teacher, ids, mask)
    loss = linear_distillation_loss(hs, s_head.weight, ht, t_head.weight, beta=0.0, labels=labels, chunk_size=4)
    zs = student(input_ids=ids, attention_mask=mask).logits
    zt = teacher(input_ids=ids, attention_mask=mask).logits
    kl = (zt.softmax(-1) * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(loss, kl[labels != -100].mean(), **tolerance(torch.float32))


def test_peft_adapters_are_applied():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter, so the test can see whether it is applied
    ids, mask, _ = batch(3)
    hidden, head = causal_lm_hidden_states(model, ids, mask)
    torch.testing.assert_close(head_logits(hidden, head), model(input_ids=ids, attention_mask=mask).logits)
    with model.disable_adapter():
        base_hidden, _ = causal_lm_hidden_states(model, ids, mask)
    assert not torch.allclose(hidden, base_hidden)


def test_bad_models_raise_clear_errors():
    with pytest.raises(TypeError, match="Expected a transformers causal LM"):
        output_head(torch.nn.Linear(3, 4))
    base = tiny_llama().model
    with pytest.raises(ValueError, match="has no output head"):
        output_head(base)
    with pytest.raises(ValueError, match="no backbone attribute"):
        backbone_of(base)
    scaled = tiny_llama()
    scaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match=r"logit_scale=0\.5"):
        output_head(scaled)
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="leave `lm_head` out of `target_modules`"):
        output_head(wrapped)


# ------------------------------------------------------------------------------------------------- the model's forward
def test_the_model_is_called_through_its_own_forward_and_its_head_is_put_back():
    model = tiny_llama()
    ids, mask, _ = batch(4)
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(sorted(kwargs)), with_kwargs=True
    )
    head, names = model.get_output_embeddings(), [n for n, _ in model.named_modules()]
    try:
        hidden, out = causal_lm_hidden_states(model, ids, mask)
    finally:
        handle.remove()
    assert calls == [["attention_mask", "input_ids", "use_cache"]]  # the root's hooks ran (FSDP2 gathers there)
    assert model.get_output_embeddings() is head and [n for n, _ in model.named_modules()] == names
    torch.testing.assert_close(head_logits(hidden, out), model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(IndexError):
        causal_lm_hidden_states(model, torch.full((1, 3), VOCAB + 5))  # an id outside the embedding
    assert model.get_output_embeddings() is head  # put back when the forward fails too


def test_hooks_on_the_model_outputs_run_in_the_backward():
    # FSDP2 registers its pre-backward hook (which ends in the gradient reduce-scatter) on the root's outputs: they
    # must be part of the graph of a loss computed from the hidden states alone
    model = tiny_llama().train()
    ids, mask, labels = batch(5)
    fired = []

    def on_output(module, args, out):
        out.logits.register_hook(lambda grad: fired.append(grad.shape))

    handle = model.register_forward_hook(on_output)
    try:
        hidden, head = causal_lm_hidden_states(model, ids, mask)
    finally:
        handle.remove()
    loss = linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, chunk_size=3)
    loss.backward()
    assert fired == [torch.Size([2, 7, 1])]  # the placeholder the model returned, not (2, 7, V) logits
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    grads = torch.autograd.grad(expected, [p for p in model.parameters() if p.grad is not None])
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_bad_calls_raise_clear_errors():
    model = tiny_gpt2()
    ids, _, labels = batch(6)
    with pytest.raises(ValueError, match="does not take `labels`"):
        causal_lm_hidden_states(model, ids, labels=labels)

    class Headless(transformers.GPT2LMHeadModel):
        def forward(self, input_ids=None, **kwargs):
            return self.transformer(input_ids=input_ids, **kwargs)

    headless = Headless(model.config).eval()
    with pytest.raises(ValueError, match="called its output head 0 times, expected once"):
        causal_lm_hidden_states(headless, ids)
    model.lm_head.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    handle = forbid_head(model)  # refused before anything runs
    try:
        with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3"):
            causal_lm_hidden_states(model, ids)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------- FSDP2, one process
@pytest.fixture
def one_process_group():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already open")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_fsdp2_root_wrapped_model_gives_the_unsharded_loss_and_gradients(one_process_group, make):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain, sharded = make(), make()  # eval mode (no dropout); gradients still flow
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded, mesh=one_process_group)
    ids, mask, labels = batch(7)
    expected = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    hidden, head = causal_lm_hidden_states(sharded, ids, mask)
    assert not isinstance(head.weight, DTensor)  # the root keeps its parameters gathered until its backward
    loss = linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, chunk_size=4)
    loss.backward()
    torch.testing.assert_close(loss, expected, **tolerance(torch.float32))
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        assert isinstance(p, DTensor)  # resharded after the backward, with the reduce-scattered gradient
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_resharded_head_is_gathered_for_a_frozen_model_and_refused_with_gradients(one_process_group):
    from torch.distributed.fsdp import fully_shard

    plain = tiny_llama()
    frozen = tiny_llama()
    frozen.load_state_dict(plain.state_dict())
    fully_shard(frozen, mesh=one_process_group, reshard_after_forward=True)  # a sharded teacher
    ids, mask, _ = batch(8)
    with torch.no_grad():
        hidden, head = causal_lm_hidden_states(frozen, ids, mask)
        torch.testing.assert_close(head_logits(hidden, head), plain(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="sharded or partitioned after the forward"):
        causal_lm_hidden_states(frozen, ids, mask)
    own_group = tiny_gpt2()
    fully_shard(own_group.lm_head, mesh=one_process_group)
    fully_shard(own_group, mesh=one_process_group)
    with pytest.raises(ValueError, match="has its own `fully_shard` group"):
        causal_lm_hidden_states(own_group, ids, mask)

r"""On-policy distillation (GKD) for causal LMs: the student learns on its own samples, scored by the teacher.

Generalized Knowledge Distillation (Agarwal et al., 2024, "On-Policy Distillation of Language Models"), as TRL's
``GKDTrainer`` (``trl/experimental/gkd/gkd_trainer.py``) runs it: at each step, with probability :math:`\lambda`
(``lmbda``) the **student** samples the completion of each prompt; otherwise, with ``seq_kd=True``, the **teacher**
does (sequence-level KD), else the dataset's completion is used (off-policy). Both models are then scored on
prompt + completion and the token-level generalized JSD of ``self.kd`` (β = 0 forward KL, β = 1 reverse KL) is
averaged over the completion tokens only:

.. math::

    \mathcal{L} = \frac{1}{|\mathcal{C}|} \sum_{(b,t) \in \mathcal{C}}
    \mathrm{JSD}_\beta\big(p_T(\cdot \mid y_{b,<t}),\, p_S(\cdot \mid y_{b,<t})\big),
    \qquad y \sim \begin{cases} p_S(\cdot \mid x) & u < \lambda\\ p_T(\cdot \mid x) & u \ge \lambda,\ \text{seq\_kd}\\
    \text{data} & \text{otherwise}\end{cases}

with :math:`\mathcal{C}` the completion tokens up to and including the first EOS (labels ``-100`` on the prompt,
on padding and after EOS, as TRL's ``generate_on_policy_outputs``). The sampling temperature of generation (TRL's
default 0.9) is a generation setting, separate from the loss's temperature (``self.kd.temperature``). TRL samples
with ``top_k=0, top_p=1.0, do_sample=True`` and draws with ``random.random() <= lmbda``; here ``u < λ``, so λ = 0
never generates and λ = 1 always does.

The draw :math:`u` is a function of ``(seed, global_step)`` only: the same on every rank (all ranks generate, or none,
so no rank waits for another's generation at the gradient all-reduce) and for every micro-batch of one optimizer step,
and reproducible after a restart. The sampling itself is seeded by ``(seed, global_step, rank, micro-batch)``: each
rank draws its own completions, reproducibly, without touching the global random state.

Generated sequences are re-packed right-padded (prompt, completion, padding), so the scoring forward passes see the
positions generation used, and go through :meth:`DistillationMixin.causal_lm_distillation_loss` (the chunked path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from lightning_losses.losses.base import LossModule
from lightning_losses.mixins.base import HyperparameterMixin
from lightning_losses.utilities.checks import check_int, check_number
from lightning_losses.utilities.distributed import rank_and_world_size
from lightning_losses.utilities.tokens import count_label_tokens, step_num_items

__all__ = [
    "CompletionBatch",
    "GenerationSettings",
    "OnPolicyDistillationMixin",
    "OnPolicySchedule",
    "generate_completions",
    "sharded_across_processes",
]

Source = Literal["student", "teacher", "data"]


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings of the completions (TRL's GKD defaults: ``temperature=0.9``, ``top_k=0``, ``top_p=1``).

    Args:
        max_new_tokens: Tokens generated at most per completion.
        temperature: Sampling temperature (> 0), used when ``do_sample``.
        top_k: Keep only the ``top_k`` most likely tokens (0: all).
        top_p: Nucleus sampling mass in ``(0, 1]``.
        do_sample: Sample (True) or decode greedily (False).
    """

    max_new_tokens: int = 128
    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True

    def __post_init__(self) -> None:
        check_int(self.max_new_tokens, "max_new_tokens", low=1)
        check_number("temperature", self.temperature, low=0.0, low_inclusive=False)
        check_int(self.top_k, "top_k", low=0)
        check_number("top_p", self.top_p, low=0.0, high=1.0, low_inclusive=False)
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"`do_sample` must be a bool, got {type(self.do_sample).__name__}.")

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``model.generate`` these settings stand for."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


class CompletionBatch(NamedTuple):
    """Prompt + completion, right-padded: ``input_ids``, ``attention_mask`` and ``labels`` (``ignore_index``
    except on completion tokens up to and including the first EOS), each ``(B, L)``."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def _pack_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's tokens (mask 1) to the right end, so prompts are left-padded as generation needs."""
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding (0) first, tokens keep their order
    return ids.gather(1, order), mask.gather(1, order)


def _max_positions(model: nn.Module) -> int | None:
    """The positions of a transformers model (``n_positions`` / ``max_position_embeddings``), if it says."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def sharded_across_processes(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are split across the processes of a run (FSDP2's ``fully_shard``, FSDP1,
    DeepSpeed ZeRO-3): generation must then keep every process running forward passes until all have finished
    (transformers' ``synced_gpus``), or a process that stops early leaves the others waiting in a gather.

    Example:
        >>> from torch import nn
        >>> sharded_across_processes(nn.Linear(2, 2))  # one process, plain parameters
        False
    """
    if rank_and_world_size()[1] < 2:
        return False
    from torch.distributed.fsdp import FSDPModule  # fully_shard's modules (their parameters may be unsharded now)

    if any(isinstance(m, FSDPModule) or type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed's partitioned parameters


def generate_completions(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None = None,
    settings: GenerationSettings | None = None,
    *,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    ignore_index: int = -100,
    synced_gpus: bool | None = None,
) -> CompletionBatch:
    """Sample completions of ``prompt_ids`` with ``model.generate`` and lay them out for scoring.

    Prompts may be left- or right-padded (they are left-aligned for generation). The model is put in eval mode for
    the call (dropout off) and restored. Completion tokens after the first EOS are dropped (they are generation's
    padding); the EOS itself is kept and counted, as in TRL.

    Args:
        model: A transformers causal LM (or anything with its ``generate``).
        prompt_ids: ``(B, P)`` prompt ids.
        prompt_mask: ``(B, P)`` mask of the prompt tokens; ``None`` means no padding.
        settings: Sampling settings (default :class:`GenerationSettings`).
        pad_token_id: Id used for padding; default the model's ``generation_config`` (then its EOS).
        eos_token_id: End-of-sequence id(s); default the model's ``generation_config``.
        ignore_index: Label of the tokens left out of the loss.
        synced_gpus: Keep every process stepping until all have finished (transformers' ``synced_gpus``); the
            finished ones draw no more samples, so each process's completions are those it would sample alone.
            ``None`` (default): when the model is :func:`sharded_across_processes`.

    Returns:
        A :class:`CompletionBatch`, right-padded to the longest prompt + completion.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30, n_positions=32))
        >>> prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
        >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]])           # the first prompt is left-padded
        >>> out = generate_completions(lm, prompts, mask, GenerationSettings(max_new_tokens=4), eos_token_id=None)
        >>> out.input_ids[0, :2].tolist(), out.labels[0, :2].tolist(), int(out.attention_mask[0].sum())
        ([5, 6], [-100, -100], 6)
    """
    settings = settings or GenerationSettings()
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"`prompt_ids` and `prompt_mask` must both have shape (B, P), got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}."
        )
    if bool((prompt_mask.sum(dim=1) == 0).any()):
        raise ValueError("Every prompt needs at least one token: a row of `prompt_mask` is all zeros.")
    positions = _max_positions(model)
    longest = int(prompt_mask.sum(dim=1).max())
    if positions is not None and longest + settings.max_new_tokens > positions:
        raise ValueError(
            f"A prompt of {longest} tokens plus max_new_tokens={settings.max_new_tokens} exceeds the model's "
            f"{positions} positions: shorten the prompts (e.g. the data's max_length) or lower max_new_tokens."
        )
    config = getattr(model, "generation_config", None)
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    if pad_token_id is None:
        pad_token_id = 0
    ids, mask = _pack_left(prompt_ids, prompt_mask)
    if synced_gpus is None:
        synced_gpus = sharded_across_processes(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sequences = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                synced_gpus=synced_gpus,
                **settings.generate_kwargs(),
            )
    finally:
        model.train(was_training)
    width = ids.shape[1]
    completion = sequences[:, width:]
    completion_mask = torch.ones_like(completion, dtype=torch.bool)
    if eos_token_id is not None and completion.shape[1] > 0:
        eos = torch.tensor(eos_token_id, device=completion.device).reshape(-1)
        is_eos = torch.isin(completion, eos)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
        completion_mask = torch.arange(completion.shape[1], device=completion.device) <= first[:, None]
    full_mask = torch.cat([mask.bool(), completion_mask], dim=1)
    labels = torch.cat([torch.full_like(ids, ignore_index), completion.masked_fill(~completion_mask, ignore_index)], 1)
    # right-pad: real tokens first (prompt, then completion), padding last
    order = torch.argsort((~full_mask).long(), dim=1, stable=True)
    length = int(full_mask.sum(1).max())
    packed_mask = full_mask.gather(1, order)[:, :length]
    packed_ids = sequences.gather(1, order)[:, :length].masked_fill(~packed_mask, pad_token_id)
    packed_labels = labels.gather(1, order)[:, :length].masked_fill(~packed_mask, ignore_index)
    return CompletionBatch(packed_ids, packed_mask.long(), packed_labels)


class OnPolicySchedule(LossModule):
    """Holds the on-policy fraction λ as the named hyperparameter ``lmbda`` (``"on_policy.lmbda"`` on the module),
    so schedules, PBT and STN can change it and checkpoints keep it.

    Example:
        >>> float(OnPolicySchedule(0.25).lmbda)
        0.25
    """

    lmbda: Tensor

    def __init__(self, lmbda: float | Tensor = 0.5) -> None:
        super().__init__()
        if not isinstance(lmbda, Tensor):
            check_number("lmbda", lmbda, low=0.0, high=1.0)
        self.register_hyperparameter("lmbda", lmbda, low=0.0, high=1.0)


@dataclass
class _OnPolicyState:
    seq_kd: bool
    generation: GenerationSettings
    seed: int
    pad_token_id: int | None
    eos_token_id: int | list[int] | None
    calls: int = 0  # draws made outside a Trainer
    last_source: Source | None = None


_PROMPT_KEYS = (("prompts", "prompt_attention_mask"), ("prompt_input_ids", "prompt_attention_mask"))


class OnPolicyDistillationMixin(HyperparameterMixin):
    """Adds on-policy (GKD) sampling to a LightningModule that also uses
    :class:`~lightning_losses.mixins.distillation.DistillationMixin` (which holds the teacher and ``self.kd``).

    Call :meth:`configure_on_policy` in ``__init__`` after ``configure_distillation(teacher,
    loss=GeneralizedJSDLoss(...))``, and :meth:`on_policy_distillation_loss` in ``training_step``. Batches are dicts
    holding the prompts (``"prompts"`` and ``"prompt_attention_mask"`` as TRL's GKD collator writes them, or
    ``"prompt_input_ids"``) and, for the off-policy steps, the dataset's sequences (``"input_ids"``,
    ``"attention_mask"``, ``"labels"`` with ``-100`` on the prompt). See the module docstring for the formula and
    the random draw. λ lives at ``"on_policy.lmbda"``.

    Example:
        >>> import lightning.pytorch as pl, torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from lightning_losses import DistillationMixin, GeneralizedJSDLoss
        >>> def lm(width):
        ...     return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=30, n_positions=32))
        >>> class Distiller(OnPolicyDistillationMixin, DistillationMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.student = lm(8)
        ...         self.configure_distillation(lm(16), loss=GeneralizedJSDLoss(beta=0.5))
        ...         self.configure_on_policy(lmbda=1.0, generation=GenerationSettings(max_new_tokens=5))
        ...     def training_step(self, batch, batch_idx):
        ...         return self.on_policy_distillation_loss(self.student, batch)
        >>> module = Distiller()
        >>> batch = {"prompts": torch.randint(0, 30, (2, 4)), "prompt_attention_mask": torch.ones(2, 4)}
        >>> loss = module.training_step(batch, 0)
        >>> module.last_on_policy_source, loss.ndim
        ('student', 0)
    """

    on_policy: OnPolicySchedule

    def configure_on_policy(
        self,
        lmbda: float | Tensor = 0.5,
        *,
        seq_kd: bool = False,
        generation: GenerationSettings | dict[str, Any] | None = None,
        seed: int = 0,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> None:
        """Set the on-policy fraction, sequence-level KD and the sampling settings.

        Args:
            lmbda: Probability λ in ``[0, 1]`` that a step trains on student-generated completions.
            seq_kd: On the other steps, train on teacher-generated completions instead of the dataset's.
            generation: :class:`GenerationSettings` or a dict of its fields.
            seed: Seed of the draws and of the sampling.
            pad_token_id: Padding id for generation (default: the student's generation config, then its EOS).
            eos_token_id: EOS id(s) ending a completion (default: the student's generation config).
        """
        assert isinstance(self, nn.Module)
        if not hasattr(self, "causal_lm_distillation_loss"):
            raise TypeError(
                f"{type(self).__name__} needs DistillationMixin for the teacher and the loss: declare it as "
                "`class MyModule(OnPolicyDistillationMixin, DistillationMixin, pl.LightningModule)` and call "
                "`configure_distillation(teacher, loss=GeneralizedJSDLoss(...))` first."
            )
        if isinstance(generation, dict):
            generation = GenerationSettings(**generation)
        elif generation is None:
            generation = GenerationSettings()
        elif not isinstance(generation, GenerationSettings):
            raise TypeError(f"`generation` must be GenerationSettings or a dict, got {type(generation).__name__}.")
        if not isinstance(seq_kd, bool):
            raise TypeError(f"`seq_kd` must be a bool, got {type(seq_kd).__name__}.")
        check_int(seed, "seed", low=0)
        self.on_policy = OnPolicySchedule(lmbda)
        self.__dict__["_on_policy"] = _OnPolicyState(seq_kd, generation, seed, pad_token_id, eos_token_id)

    def _on_policy_state(self) -> _OnPolicyState:
        state = self.__dict__.get("_on_policy")
        if state is None:
            raise RuntimeError(f"{type(self).__name__}: call `self.configure_on_policy(...)` in __init__ first.")
        return state

    @property
    def generation_settings(self) -> GenerationSettings:
        return self._on_policy_state().generation

    @property
    def last_on_policy_source(self) -> Source | None:
        """Where the completions of the latest :meth:`on_policy_batch` came from."""
        return self._on_policy_state().last_source

    def _step_and_rank(self) -> tuple[int, int, int]:
        state = self._on_policy_state()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            rank, _ = rank_and_world_size(trainer)
            micro = int(trainer.fit_loop.total_batch_idx)
            return int(trainer.global_step), rank, micro
        state.calls += 1
        return state.calls - 1, 0, 0

    def on_policy_source(self, step: int) -> Source:
        """The source of the completions of optimizer step ``step``: ``u < λ`` with ``u`` drawn from
        ``(seed, step)`` (the same on every rank)."""
        state = self._on_policy_state()
        u = float(np.random.default_rng([state.seed, int(step)]).random())
        if u < float(self.on_policy.lmbda):
            return "student"
        return "teacher" if state.seq_kd else "data"

    def on_policy_batch(
        self, student: nn.Module, batch: dict[str, Any], *, ignore_index: int = -100
    ) -> CompletionBatch:
        """Draw this step's source and return the sequences to score, with their labels.

        Args:
            student: The student causal LM.
            batch: A dict with the prompts and, for off-policy steps, ``input_ids`` (``attention_mask``,
                ``labels``; labels default to the ids where the mask is set).
            ignore_index: Label of the tokens left out of the loss.
        """
        state = self._on_policy_state()
        step, rank, micro = self._step_and_rank()
        source = self.on_policy_source(step)
        state.last_source = source
        if source == "data":
            if "input_ids" not in batch:
                raise KeyError(
                    "This step trains on the dataset's completions (the draw was >= lmbda and seq_kd is False), but "
                    "the batch has no 'input_ids'. Give prompt + completion sequences, set lmbda=1, or seq_kd=True."
                )
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            labels = batch.get("labels")
            if labels is None:
                labels = ids.masked_fill(mask == 0, ignore_index)
            return CompletionBatch(ids, mask, labels)
        prompts, prompt_mask = self._prompts(batch)
        model = student if source == "student" else self.teacher  # type: ignore[attr-defined]
        seed = int(np.random.default_rng([state.seed, step, rank, micro, 1]).integers(2**62))
        devices = [prompts.device] if prompts.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return generate_completions(
                model,
                prompts,
                prompt_mask,
                state.generation,
                pad_token_id=state.pad_token_id,
                eos_token_id=state.eos_token_id if state.eos_token_id is not None else _eos_of(student),
                ignore_index=ignore_index,
            )

    @staticmethod
    def _prompts(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        for ids_key, mask_key in _PROMPT_KEYS:
            if ids_key in batch:
                return batch[ids_key], batch.get(mask_key)
        raise KeyError(
            f"On-policy steps need the prompts in the batch: keys 'prompts' (or 'prompt_input_ids') and "
            f"'prompt_attention_mask', got {sorted(batch)}."
        )

    def on_policy_distillation_loss(
        self,
        student: nn.Module,
        batch: dict[str, Any],
        *,
        chunk_size: int | None = None,
        num_items_in_batch: Tensor | float | Literal["step"] | None = None,
    ) -> Tensor:
        """The distillation loss of ``self.kd`` on this step's completions (see the module docstring).

        Args:
            student: The student causal LM.
            batch: See :meth:`on_policy_batch`.
            chunk_size: Rows per chunk of the chunked loss.
            num_items_in_batch: Token-count divisor; ``"step"`` computes it from this micro-batch's completion
                tokens summed over ranks (:func:`~lightning_losses.utilities.tokens.step_num_items`; call it on
                every rank at every step). Counts written ahead by ``TokensPerStep`` do not apply to generated
                completions.
        """
        ignore_index = int(getattr(self.kd, "ignore_index", -100))  # type: ignore[attr-defined]
        ids, mask, labels = self.on_policy_batch(student, batch, ignore_index=ignore_index)
        if isinstance(num_items_in_batch, str):
            if num_items_in_batch != "step":
                raise ValueError(
                    f"`num_items_in_batch` must be a number, a tensor, 'step' or None, got {num_items_in_batch!r}."
                )
            num_items_in_batch = step_num_items(self, count_label_tokens(labels, ignore_index))  # type: ignore[arg-type]
        return self.causal_lm_distillation_loss(  # type: ignore[attr-defined,no-any-return]
            student, ids, mask, labels, chunk_size, num_items_in_batch=num_items_in_batch
        )

    def on_policy_settings(self) -> dict[str, Any]:
        """The settings as a plain dict (for logging)."""
        state = self._on_policy_state()
        return {
            "lmbda": float(self.on_policy.lmbda),
            "seq_kd": state.seq_kd,
            "seed": state.seed,
            **asdict(state.generation),
        }


def _eos_of(model: nn.Module) -> int | list[int] | None:
    config = getattr(model, "generation_config", None)
    return None if config is None else config.eos_token_id

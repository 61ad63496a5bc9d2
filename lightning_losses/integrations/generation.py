"""TempNet at generation time: per-token temperatures inside Hugging Face ``generate``.

Two ways, both dividing the logits of every decoding step by TempNet's τ for that prompt and token:

* :class:`TempNetLogitsProcessor`: pass it in ``generate(logits_processor=LogitsProcessorList([...]))``. It reads
  the scores it receives, so it should see the raw logits: put no warper before it (``top_k=0``, no repetition
  penalty) or use the wrapper.
* :class:`TempNetCausalLM`: wraps a causal LM; its forward returns ``logits / τ`` (and ``tau``) and its
  :meth:`~TempNetCausalLM.generate` applies τ to the raw logits before every processor, by a hook on the output
  head during the call.

Both can return the temperatures used (``record=True`` / ``return_tau=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TempNetCausalLM", "TempNetLogitsProcessor", "apply_tempnet"]


def _finite_rows(scores: Tensor) -> Tensor:
    """Replace masked (``-inf``) scores by the row's smallest finite score, so TempNet sees finite inputs."""
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return scores
    low = torch.where(finite, scores, torch.full_like(scores, float("inf"))).amin(dim=-1, keepdim=True)
    return torch.where(finite, scores, low)


def apply_tempnet(tempnet: nn.Module, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(logits / τ, τ)`` with ``τ = tempnet(logits)`` per position (float32 division).

    Example:
        >>> from lightning_losses.nn import TempNet
        >>> net = TempNet(vocab_size=5, hidden_dim=4).eval()
        >>> scaled, tau = apply_tempnet(net, torch.randn(2, 3, 5))
        >>> tuple(tau.shape)
        (2, 3)
    """
    tau = tempnet(_finite_rows(logits.float()))
    return (logits.float() / tau.unsqueeze(-1)).to(logits.dtype), tau


class TempNetLogitsProcessor:
    """A ``transformers`` logits processor dividing each step's scores by TempNet's per-sequence τ.

    Args:
        tempnet: A temperature network mapping ``(B, V)`` scores to ``(B,)`` temperatures (put it in eval mode).
        record: Keep the temperatures of every step in :attr:`taus` (a list of ``(B,)`` tensors).

    Example:
        >>> from lightning_losses.nn import TempNet
        >>> processor = TempNetLogitsProcessor(TempNet(vocab_size=6, hidden_dim=4).eval(), record=True)
        >>> scores = processor(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 6))
        >>> tuple(scores.shape), len(processor.taus)
        ((2, 6), 1)
    """

    def __init__(self, tempnet: nn.Module, record: bool = False) -> None:
        self.tempnet, self.record = tempnet, record
        self.taus: list[Tensor] = []

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scaled, tau = apply_tempnet(self.tempnet, scores)
        if self.record:
            self.taus.append(tau.detach().cpu())
        return scaled

    def stacked_taus(self) -> Tensor:
        """The recorded temperatures as ``(B, steps)``."""
        if not self.taus:
            raise RuntimeError("No temperatures recorded: build the processor with record=True and call generate.")
        return torch.stack(self.taus, dim=1)


class TempNetCausalLM(nn.Module):
    """A causal LM whose logits are divided by TempNet's per-token τ, in ``forward`` and in ``generate``.

    Args:
        model: A Hugging Face causal LM (``generate`` and ``get_output_embeddings`` are used).
        tempnet: The trained temperature network on its vocabulary.

    Example:
        >>> from lightning_losses.demos import build_gpt2
        >>> from lightning_losses.nn import TempNet
        >>> lm = build_gpt2(32, n_layer=1, n_embd=16, n_head=2, block_size=16)
        >>> wrapped = TempNetCausalLM(lm, TempNet(vocab_size=32, hidden_dim=8)).eval()
        >>> ids, tau = wrapped.generate(torch.ones(1, 2, dtype=torch.long), max_new_tokens=3, min_new_tokens=3,
        ...                             do_sample=False, return_tau=True, pad_token_id=0)
        >>> tuple(ids.shape), tuple(tau.shape)
        ((1, 5), (1, 3))
    """

    def __init__(self, model: nn.Module, tempnet: nn.Module) -> None:
        super().__init__()
        self.model, self.tempnet = model, tempnet

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; return its output with ``logits`` divided by τ and ``tau`` added."""
        out = self.model(*args, **kwargs)
        out.logits, tau = apply_tempnet(self.tempnet, out.logits)
        out["tau"] = tau
        return out

    @contextmanager
    def _scaled_head(self, taus: list[Tensor]) -> Iterator[None]:
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        if head is None:
            raise ValueError("TempNetCausalLM needs a model with an output head (get_output_embeddings()).")

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            scaled, tau = apply_tempnet(self.tempnet, output)
            taus.append(tau[..., -1].detach().cpu())
            return scaled

        handle = head.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def generate(self, *args: Any, return_tau: bool = False, **kwargs: Any) -> Any:
        """``model.generate`` with τ applied to the raw logits of every step, before any logits processor.

        With ``return_tau=True`` returns ``(output, tau)`` where ``tau`` is ``(B, new_tokens)``: the temperature
        used for each generated token.
        """
        taus: list[Tensor] = []
        with self._scaled_head(taus):
            output = self.model.generate(*args, **kwargs)  # type: ignore[operator]
        if not return_tau:
            return output
        return output, torch.stack(taus, dim=1)

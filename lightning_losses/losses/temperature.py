"""Loss modules of the adaptive-temperature family: DRO with TempNet, robust contrastive, LDR-KL and ALDR-KL.

The stateful ones (:class:`RobustContrastiveLoss`, :class:`ALDRKLLoss`) keep per-sample state in float32
persistent buffers indexed by the dataset index, so it is checkpointed and restored with the module. Under
``torch.distributed`` every rank gathers the indices and the new state of all ranks and writes them all, so the
buffers stay identical on every rank (and DDP's buffer broadcast changes nothing).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.functional.temperature import (
    _amcl_arg_validation,
    _amcl_candidates,
    _amcl_layout,
    _amcl_rows,
    _amcl_similarities,
    aldr_kl_lambda,
    aldr_kl_loss,
    dro_temperature_loss,
    ldr_kl_loss,
)
from lightning_losses.losses.base import LossModule
from lightning_losses.nn.tempnet import HeadTemperature, PairTemperature
from lightning_losses.utilities.checks import NumItems, check_hyperparameter, check_int, check_tensor
from lightning_losses.utilities.distributed import all_gather_rows, all_gather_sizes, rank_and_world_size
from lightning_losses.utilities.numerics import as_float32, autocast_disabled, hyperparameter_tensor

__all__ = ["ALDRKLLoss", "AMCLLoss", "DROTemperatureLoss", "LDRKLLoss", "RobustContrastiveLoss"]


def _check_equal_local_batches(size: int, world_size: int, device: torch.device) -> list[int]:
    """Every rank's local batch size (one all-gather), which must be the same everywhere."""
    if world_size == 1:
        return [size]
    sizes = all_gather_sizes(size, device)
    if any(s != size for s in sizes):
        raise ValueError(
            f"Every rank must give the same local batch size to gather features, got {sizes}. "
            "Use `drop_last=True` in the training DataLoader (or a DistributedSampler with drop_last=True)."
        )
    return sizes


def _check_settings(**values: object) -> None:
    """A TypeError for a setting that is not a real number or tensor (the registry checks the ranges)."""
    for name, value in values.items():
        check_hyperparameter(value, name, validate=False)


def _check_index(index: Tensor, num_samples: int, batch: int) -> None:
    check_tensor(index, "index", floating=False)
    bad_dtype = index.is_floating_point() or index.is_complex() or index.dtype == torch.bool
    if index.ndim != 1 or index.shape[0] != batch or bad_dtype:
        raise ValueError(
            f"`index` must be a 1-D integer tensor with one dataset index per sample ({batch}), got dtype "
            f"{index.dtype} and shape {tuple(index.shape)}."
        )
    if batch and (int(index.min()) < 0 or int(index.max()) >= num_samples):
        raise ValueError(
            f"`index` holds dataset indices outside [0, {num_samples}): min {int(index.min())}, max "
            f"{int(index.max())}. Build the loss with num_samples = the size of the training set."
        )


class DROTemperatureLoss(LossModule):
    r"""Module twin of :func:`~lightning_losses.functional.dro_temperature_loss` with ``rho`` as a hyperparameter.

    .. math::
        L = \tau\,\mathrm{CE}(z/\tau, y) + (\rho - \log V)\,\tau

    Args:
        rho: KL-ball radius (must stay below ``log V``; GPT-2 setting 8.0 for V = 50k, smaller for small V).
        ignore_index: Target value of positions that do not count.

    The forward takes ``num_items_in_batch`` (keyword): the number of counted positions of the whole batch (every
    micro-batch of the optimizer step on every rank, divided by the factor the gradients are later divided by);
    the loss is then the sum over counted positions divided by it, so that the micro-batch losses sum to the token
    mean of the whole batch. ``None`` (default) divides by this call's counted positions.

    Example:
        >>> loss = DROTemperatureLoss(rho=0.5)
        >>> logits, target = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        >>> bool(torch.isfinite(loss(logits, target, tau=torch.full((2, 5), 1.5))))
        True
    """

    rho: Tensor

    def __init__(self, rho: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        _check_settings(rho=rho)
        check_int(ignore_index, "ignore_index")
        self.register_hyperparameter("rho", rho, low=0.0)
        self.ignore_index = ignore_index

    def forward(
        self, logits: Tensor, target: Tensor, tau: Tensor | float, *, num_items_in_batch: NumItems = None
    ) -> Tensor:
        """Return the DRO loss averaged over the counted positions (or divided by ``num_items_in_batch``)."""
        return dro_temperature_loss(
            logits, target, tau, self.rho, ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch
        )


class LDRKLLoss(LossModule):
    r"""Module twin of :func:`~lightning_losses.functional.ldr_kl_loss`.

    .. math::
        L = \lambda \log \frac1K \sum_k e^{(c\,\mathbb 1[k\ne y] + f_k - f_y)/\lambda}

    Example:
        >>> loss = LDRKLLoss(lam=1.0)
        >>> bool(loss(torch.randn(3, 4), torch.tensor([0, 1, 2])) > -1)
        True
    """

    lam: Tensor
    margin: Tensor

    def __init__(self, lam: float = 10.0, margin: float = 0.1, rescale_logits: bool = True) -> None:
        super().__init__()
        _check_settings(lam=lam, margin=margin)
        if not isinstance(rescale_logits, bool):
            raise TypeError(f"`rescale_logits` must be a bool, got {type(rescale_logits).__name__}.")
        self.register_hyperparameter("lam", lam, low=0.0, low_inclusive=False)
        self.register_hyperparameter("margin", margin, low=0.0)
        self.rescale_logits = rescale_logits

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ldr_kl_loss(logits, target, self.lam, self.margin, rescale_logits=self.rescale_logits)


class ALDRKLLoss(LossModule):
    r"""Adaptive LDR-KL with a per-sample λ stored by dataset index (a checkpointed buffer).

    In training each call updates :math:`\lambda_i` of the samples of the batch from their current predictions
    (:func:`~lightning_losses.functional.aldr_kl_lambda`, starting from :math:`\lambda_0`) and returns

    .. math::
        \frac1B\sum_i \lambda_i \log \frac1K \sum_k e^{\ell_{ik}/\lambda_i}
        - \frac{\alpha\log K}{2\lambda_0}(\lambda_i - \lambda_0)^2,
        \qquad \lambda_i \in [\lambda_0(1 - 1/\alpha), \lambda_0].

    In evaluation nothing is stored; λ is computed from :math:`\lambda_0`.

    Args:
        num_samples: Size of the training set (indices must lie in ``[0, num_samples)``).
        lam0: Reference λ0 (default 10).
        alpha: α > 1 (default 2).
        margin: Margin ``c`` (default 0.1).
        rescale_logits: Divide each row by its mean absolute value first (the reference setting).

    Example:
        >>> loss = ALDRKLLoss(num_samples=100)
        >>> value = loss(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), index=torch.tensor([0, 5, 6, 7]))
        >>> bool(((loss.lambdas >= 5.0) & (loss.lambdas <= 10.0)).all())
        True
    """

    lam0: Tensor
    alpha: Tensor
    margin: Tensor
    lambdas: Tensor

    def __init__(
        self,
        num_samples: int,
        lam0: float = 10.0,
        alpha: float = 2.0,
        margin: float = 0.1,
        rescale_logits: bool = True,
    ) -> None:
        super().__init__()
        check_int(num_samples, "num_samples", low=1)
        _check_settings(lam0=lam0, alpha=alpha, margin=margin)
        if not isinstance(rescale_logits, bool):
            raise TypeError(f"`rescale_logits` must be a bool, got {type(rescale_logits).__name__}.")
        self.num_samples = num_samples
        self.register_hyperparameter("lam0", lam0, low=0.0, low_inclusive=False)
        self.register_hyperparameter("alpha", alpha, low=1.0, low_inclusive=False)
        self.register_hyperparameter("margin", margin, low=0.0)
        self.rescale_logits = rescale_logits
        self.register_buffer("lambdas", torch.full((num_samples,), float(lam0)), persistent=True)

    def forward(self, logits: Tensor, target: Tensor, index: Tensor | None = None) -> Tensor:
        check_tensor(logits, "logits")
        if logits.ndim != 2:
            raise ValueError(f"`logits` must have 2 dimensions (N, K), got shape {tuple(logits.shape)}.")
        lam0, alpha = float(self.lam0), float(self.alpha)
        if self.training:
            if index is None:
                raise ValueError("ALDRKLLoss needs the dataset `index` of each sample in training.")
            _check_index(index, self.num_samples, logits.shape[0])
            lam = aldr_kl_lambda(logits, self.lambdas[index], lam0, alpha, self.rescale_logits)
            self._store(index, lam)
        else:
            lam = aldr_kl_lambda(logits, lam0, lam0, alpha, self.rescale_logits)
        return aldr_kl_loss(logits, target, lam, lam0, alpha, self.margin, self.rescale_logits)

    @torch.no_grad()
    def _store(self, index: Tensor, lam: Tensor) -> None:
        _, world_size = rank_and_world_size()
        sizes = _check_equal_local_batches(index.shape[0], world_size, index.device)
        all_index = all_gather_rows(index.to(self.lambdas.device), sizes=sizes)
        all_lam = all_gather_rows(lam.to(self.lambdas), sizes=sizes)
        self.lambdas[all_index] = all_lam


class RobustContrastiveLoss(LossModule):
    r"""KL-DRO contrastive loss with per-anchor temperatures and per-sample moving averages (iSogCLR-TempNet).

    For image anchor :math:`i` (and symmetrically for text anchors), with margins
    :math:`h_{ij} = x_i^\top t_j - x_i^\top t_i` over the *global* batch (all ranks) and :math:`m = B - 1`:

    .. math::
        F_i = \tau_i \log \frac1m \sum_{j\ne i} e^{h_{ij}/\tau_i} + \tau_i\rho .

    The inner sum is tracked per sample in the log domain with a running maximum :math:`b_i` and a rescaled
    moving average :math:`s_i \leftarrow (1-\gamma)\,s_i\,e^{b_i^{\text{old}} - b_i} + \gamma\,g_i`, where
    :math:`g_i = \sum_{j\ne i} e^{h_{ij}/\tau_i - b_i}` (first visit: :math:`s_i = g_i`). :math:`b_i` is the
    largest exponent among the batch terms and the decayed old average, so every exponential is at most 1 and
    :math:`s_i \ge \min(\gamma, 1)`: no overflow even at τ = 0.005 with margins of ±2 (exponents of ±400).

    The returned value is the estimate :math:`\frac1B\sum_i \tau_i(\log(s_i/m) + b_i + \rho)` (both directions
    summed); its gradient is that of :math:`\sum_j w_{ij} h_{ij}` for the encoder, with
    :math:`w_{ij} = e^{h_{ij}/\tau_i - b_i}/s_i`, plus :math:`\tau_i\,\mathrm{sg}[\log(s_i/m) + b_i + \rho -
    \sum_j w_{ij}h_{ij}/\tau_i]` for TempNet. With :math:`\gamma = 1` value and gradients equal those of the exact
    :func:`~lightning_losses.functional.robust_contrastive_loss` on the global batch.

    Under ``torch.distributed`` the features are gathered *with* gradient, the indices and new state without;
    each rank computes the anchors of its own samples, so DDP's gradient averaging gives the global mean.

    Args:
        num_samples: Size of the training set; indices must lie in ``[0, num_samples)``.
        rho: KL-ball radius, below ``log(B_global - 1)`` (reference: 7 to 8 for large batches).
        gamma: Moving-average rate in (0, 1] (reference 0.8).

    Example:
        >>> loss = RobustContrastiveLoss(num_samples=10, rho=0.5)
        >>> x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
        >>> tau = torch.full((4,), 0.05)
        >>> value = loss(x, x, torch.arange(4), tau, tau)
        >>> bool(torch.isfinite(value)), bool(torch.isfinite(loss.image_b[:4]).all())
        (True, True)
    """

    rho: Tensor
    gamma: Tensor
    image_s: Tensor
    image_b: Tensor
    text_s: Tensor
    text_b: Tensor

    def __init__(self, num_samples: int, rho: float = 7.0, gamma: float = 0.8) -> None:
        super().__init__()
        check_int(num_samples, "num_samples", low=2)
        _check_settings(rho=rho, gamma=gamma)
        self.num_samples = num_samples
        self.register_hyperparameter("rho", rho, low=0.0)
        self.register_hyperparameter("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
        for side in ("image", "text"):
            self.register_buffer(f"{side}_s", torch.zeros(num_samples), persistent=True)
            self.register_buffer(f"{side}_b", torch.full((num_samples,), float("-inf")), persistent=True)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        index: Tensor,
        tau_image: Tensor | float,
        tau_text: Tensor | float,
    ) -> Tensor:
        check_tensor(image_features, "image_features")
        check_tensor(text_features, "text_features")
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "`image_features` and `text_features` must both have shape (B, d), got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
            )
        x, t = image_features.float(), text_features.float()
        local = x.shape[0]
        _check_index(index, self.num_samples, local)
        rank, world_size = rank_and_world_size()
        sizes = _check_equal_local_batches(local, world_size, x.device)
        x_all, t_all = all_gather_rows(x, grad=True, sizes=sizes), all_gather_rows(t, grad=True, sizes=sizes)
        total = x_all.shape[0]
        m = total - 1
        rho = self.rho.to(x)
        if total < 3 or bool(rho >= math.log(m)):
            raise ValueError(
                f"`rho` must be below log(m) = log({m}) = {math.log(max(m, 1)):.4f} for a global batch of {total} "
                f"({m} negatives per anchor), got {float(rho):.4f}. Lower rho or enlarge the batch (at least 3)."
            )
        rows = torch.arange(local, device=x.device)
        own = rows + rank * local
        positive = (x * t).sum(1)
        taus = []
        for tau, name in ((tau_image, "tau_image"), (tau_text, "tau_text")):
            tau_t = hyperparameter_tensor(tau, x, name, positive=True, dtype=torch.float32, layout="any")
            if tau_t.ndim != 0 and tau_t.shape != (local,):
                raise ValueError(
                    f"`{name}` must be a number or one temperature per local sample (shape ({local},)), got shape "
                    f"{tuple(tau_t.shape)}."
                )
            taus.append(tau_t.expand(local) if tau_t.ndim == 0 else tau_t.float())
        terms = []
        with autocast_disabled(x):  # similarities in float32 under any autocast
            sims = (x @ t_all.T, t @ x_all.T)
        for side, sim, tau_t in (("image", sims[0], taus[0]), ("text", sims[1], taus[1])):
            margins = sim - positive[:, None]
            terms.append(self._anchor_terms(side, margins, tau_t, index, own, rho, m, sizes))
        return terms[0].mean() + terms[1].mean()

    def _anchor_terms(
        self,
        side: str,
        margins: Tensor,
        tau: Tensor,
        index: Tensor,
        own: Tensor,
        rho: Tensor,
        m: int,
        sizes: list[int],
    ) -> Tensor:
        s_buf, b_buf = getattr(self, f"{side}_s"), getattr(self, f"{side}_b")
        tau_d = tau.detach()
        self_mask = torch.zeros_like(margins, dtype=torch.bool)
        self_mask[torch.arange(margins.shape[0], device=margins.device), own] = True
        with torch.no_grad():
            scaled = (margins.detach() / tau_d[:, None]).masked_fill(self_mask, float("-inf"))
            batch_max = scaled.max(dim=1).values
            if self.training:
                b_old, s_old = b_buf[index], s_buf[index]
                seen = torch.isfinite(b_old)
                gamma = self.gamma.to(margins)
                decay = (1.0 - gamma) * s_old
                old_log = torch.where(seen & (decay > 0), b_old + decay.clamp_min(1e-38).log(), float("-inf"))
                b_new = torch.maximum(batch_max, old_log)
                g = torch.exp(scaled - b_new[:, None]).sum(dim=1)
                carried = torch.where(seen, decay * torch.exp(b_old - b_new), torch.zeros_like(g))
                s_new = carried + torch.where(seen, gamma, torch.ones_like(gamma)) * g
                self._store(side, index, s_new, b_new, sizes)
            else:
                b_new = batch_max
                s_new = torch.exp(scaled - b_new[:, None]).sum(dim=1)
            weights = torch.exp(scaled - b_new[:, None]) / s_new[:, None]
            log_mean = torch.log(s_new / m) + b_new
        encoder_part = (weights * margins.masked_fill(self_mask, 0.0)).sum(dim=1)
        weighted = (weights * margins.detach().masked_fill(self_mask, 0.0)).sum(dim=1)
        tempnet_part = tau * (log_mean + rho - weighted / tau_d).detach()
        value = tau_d * (log_mean + rho)
        surrogate = encoder_part + tempnet_part
        return value + surrogate - surrogate.detach()

    @torch.no_grad()
    def _store(self, side: str, index: Tensor, s_new: Tensor, b_new: Tensor, sizes: list[int]) -> None:
        s_buf, b_buf = getattr(self, f"{side}_s"), getattr(self, f"{side}_b")
        all_index = all_gather_rows(index.to(s_buf.device), sizes=sizes)
        s_buf[all_index] = all_gather_rows(s_new.to(s_buf), sizes=sizes)
        b_buf[all_index] = all_gather_rows(b_new.to(b_buf), sizes=sizes)


class AMCLLoss(LossModule):
    r"""Adaptive multi-head contrastive loss with its temperatures, negatives gathered from every rank.

    The module twin of :func:`~lightning_losses.functional.amcl_loss`:

    .. math::
        L = \sum_{c=1}^{H} \frac{1}{2B}\sum_{i} \Big[-\frac{s^+_{ci}}{\tau^+_{ci}} + \beta\,\Omega(\tau^+_{ci})
        + \operatorname*{A}_{n}\Big(\frac{s_{cin}}{\tau_{cin}} - \beta\,\Omega(\tau_{cin})\Big)\Big],

    with the temperatures of the module it holds at ``self.temperature``: ``"pair"`` builds the paper's
    :class:`~lightning_losses.nn.PairTemperature` (one per head and pair, a network shared by the heads),
    ``"head"`` a :class:`~lightning_losses.nn.HeadTemperature` (one learnable temperature per head); a number is a
    fixed temperature; any module called as ``temperature(anchors (H, R, d), candidates (H, M, d))`` and returning
    temperatures broadcastable to ``(H, R, M)`` works too. Its parameters are this loss's, so a LightningModule
    holding the loss trains them with its optimizer.

    Under ``torch.distributed`` the projections are gathered *with* gradient (every rank must give the same local
    batch size); each rank computes the anchors of its own samples against the candidates of the global batch, so
    the mean of the ranks' losses (DDP's gradient average) is the loss of the global batch.

    Args:
        num_heads: Number of projection heads ``H``.
        embed_dim: Projection width :math:`d'`.
        temperature: ``"pair"``, ``"head"``, a fixed temperature > 0, or a temperature module.
        beta: Regulariser weight :math:`\beta \ge 0` (hyperparameter ``beta``; official code 0.01).
        negatives: ``"all"`` (SimCLR: both views) or ``"cross"`` (the other view only).
        aggregate: ``"max"`` (the paper's hardest negative) or ``"logsumexp"``.
        include_positive: Let the positive compete in the aggregate (InfoNCE) or not (NT-Xent, the paper's default).
        topk: Number of hardest candidates averaged by ``"max"``.

    Example:
        >>> loss = AMCLLoss(num_heads=3, embed_dim=8)
        >>> a, b = torch.randn(6, 3, 8), torch.randn(6, 3, 8)
        >>> value = loss(a, b)
        >>> bool(torch.isfinite(value)), sorted(n for n, _ in loss.named_parameters())[:1]
        (True, ['temperature.phi.0.bias'])
    """

    beta: Tensor

    def __init__(
        self,
        num_heads: int,
        embed_dim: int,
        temperature: Literal["pair", "head"] | float | nn.Module = "pair",
        beta: float = 0.01,
        negatives: Literal["all", "cross"] = "all",
        aggregate: Literal["max", "logsumexp"] = "max",
        include_positive: bool = False,
        topk: int = 1,
    ) -> None:
        super().__init__()
        check_int(num_heads, "num_heads", low=1)
        check_int(embed_dim, "embed_dim", low=1)
        _check_settings(beta=beta)
        probe = torch.zeros(1, num_heads, embed_dim)
        _amcl_arg_validation(probe, probe, negatives, aggregate, include_positive, topk)
        self.num_heads, self.embed_dim = num_heads, embed_dim
        self.negatives, self.aggregate = negatives, aggregate
        self.include_positive, self.topk = include_positive, topk
        self.register_hyperparameter("beta", beta, low=0.0)
        self.fixed_temperature: float | None = None
        if isinstance(temperature, nn.Module):
            self.temperature: nn.Module | None = temperature
        elif temperature == "pair":
            self.temperature = PairTemperature(embed_dim)
        elif temperature == "head":
            self.temperature = HeadTemperature(num_heads)
        elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            check_hyperparameter(temperature, "temperature", low=0.0, low_inclusive=False)
            self.temperature, self.fixed_temperature = None, float(temperature)
        else:
            raise ValueError(
                f"`temperature` must be 'pair', 'head', a positive number or an nn.Module, got {temperature!r}."
            )

    def forward(self, features_a: Tensor, features_b: Tensor) -> Tensor:
        """The loss of this rank's anchors against the global batch (the global loss on one process).

        Args:
            features_a: ``(B, H, d)`` projections of the first view (this rank's samples).
            features_b: ``(B, H, d)`` projections of the second view, row by row the positives.
        """
        _amcl_arg_validation(features_a, features_b, self.negatives, self.aggregate, self.include_positive, self.topk)
        local, heads, dim = features_a.shape
        if (heads, dim) != (self.num_heads, self.embed_dim):
            raise ValueError(
                f"AMCLLoss was built for {self.num_heads} heads of width {self.embed_dim}, got features of shape "
                f"{tuple(features_a.shape)}: pass (B, {self.num_heads}, {self.embed_dim})."
            )
        rank, world_size = rank_and_world_size()
        sizes = _check_equal_local_batches(local, world_size, features_a.device)
        total = sum(sizes)
        candidates_count = _amcl_candidates(total, self.negatives, self.include_positive)
        if candidates_count < self.topk:
            raise ValueError(
                f"Each anchor has {candidates_count} candidates in a global batch of {total} (negatives="
                f"{self.negatives!r}, include_positive={self.include_positive}), fewer than topk = {self.topk} (and "
                "at least one is needed). Enlarge the batch or lower topk."
            )
        with autocast_disabled(features_a):
            a, b = as_float32(features_a, features_b)  # float64 kept
            dtype = torch.promote_types(a.dtype, b.dtype)
            a, b = F.normalize(a.to(dtype), dim=-1), F.normalize(b.to(dtype), dim=-1)
            a_all = all_gather_rows(a, grad=True, sizes=sizes)
            b_all = all_gather_rows(b, grad=True, sizes=sizes)
            anchors, candidates, positive, excluded = _amcl_layout(a_all, b_all, self.negatives, rank * local, local)
            sim = _amcl_similarities(anchors, candidates)
            tau = self._temperatures(anchors, candidates, sim)
            beta = self.beta.to(sim)
            per_row = _amcl_rows(
                sim, tau, positive, excluded, beta, dim, self.aggregate, self.include_positive, self.topk
            )
        return per_row.mean(dim=1).sum()

    def _temperatures(self, anchors: Tensor, candidates: Tensor, sim: Tensor) -> Tensor:
        if self.temperature is None:
            assert self.fixed_temperature is not None
            return sim.new_tensor(self.fixed_temperature).reshape(1, 1, 1)
        half = anchors.shape[1] // 2
        blocks = []
        for rows, cands in ((anchors[:, :half], candidates[0]), (anchors[:, half:], candidates[1])):
            tau = self.temperature(rows, cands).to(sim.dtype)
            blocks.append(tau.expand(sim.shape[0], half, sim.shape[2]))
        return torch.cat(blocks, dim=1)

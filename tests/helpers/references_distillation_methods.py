"""Naive and official-formula references for PLD, DIST, logit standardisation, Margin-MSE and MTARD's balances.

Two kinds of reference, both written independently of the package:

* ``ref_*``: explicit Python loops over samples (and classes), softmax as ``exp(z - max) / sum``, plain ``log``,
  probabilities where the formula states them; inputs upcast to float64. Differentiable.
* ``official_*``: the vectorised formula of each method's official code, re-derived from reading it (the PLD paper's
  Appendix C, hunto/DIST_KD, sunshangquan/logit-standardization-KD, sebastian-hofstaetter/matchmaker,
  zhaoshiji123/MTARD-extension), keeping its own choices (ascending sort with the label last, ``1e-8`` and ``1e-7``
  epsilons, ``-1000`` masking, mean over samples and classes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _softmax(row: Tensor) -> Tensor:
    e = torch.exp(row - row.max())
    return e / e.sum()


def _values(value: float | Sequence[float] | Tensor, n: int) -> list[float]:
    if isinstance(value, Tensor):
        value = value.tolist() if value.ndim else float(value)
    if isinstance(value, (int, float)):
        return [float(value)] * n
    return [float(v) for v in value]


# ----------------------------------------------------------------------------------------------------------- PLD
def ref_pld(student: Tensor, teacher: Tensor, target: Tensor, temperature: float | Sequence[float] | Tensor) -> Tensor:
    """Per-sample PLD: label first, others by descending teacher logit (ties by index), teacher-probability weights."""
    s, t = student.double(), teacher.double()
    temps = _values(temperature, s.shape[0])
    out = []
    for i in range(s.shape[0]):
        y = int(target[i])
        rest = sorted((c for c in range(s.shape[1]) if c != y), key=lambda c: (-float(t[i, c]), c))
        order = [y, *rest]
        q = _softmax(t[i] / temps[i])
        total = s.new_zeros(())
        for k, c in enumerate(order):
            remaining = torch.stack([torch.exp(s[i, j]) for j in order[k:]]).sum()
            total = total + q[c] * (torch.log(remaining) - s[i, c])
        out.append(total)
    return torch.stack(out)


def official_pld(student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> Tensor:
    """The PLD paper's Appendix C: ascending teacher sort, the label moved last, forward ``logcumsumexp``; mean."""
    _, ascending = torch.sort(teacher, dim=-1, descending=False)
    keep = ascending != target.unsqueeze(-1)
    others = ascending[keep].view(-1, teacher.shape[-1] - 1)
    ranking = torch.cat([others, target.unsqueeze(-1)], dim=-1)
    s_perm = torch.gather(student, -1, ranking)
    t_perm = torch.gather(teacher, -1, ranking)
    per_position = torch.logcumsumexp(s_perm, dim=-1) - s_perm
    return (per_position * F.softmax(t_perm / temperature, dim=-1)).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------- DIST
_DIST_EPS = 1e-8


def _pearson(a: list[Tensor], b: list[Tensor]) -> Tensor:
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    norm_a = torch.sqrt(sum((x - mean_a) ** 2 for x in a))
    norm_b = torch.sqrt(sum((y - mean_b) ** 2 for y in b))
    return cov / (norm_a * norm_b + _DIST_EPS)


def ref_dist_parts(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(per-sample inter-class terms (N,), the intra-class term) with loops, both scaled by τ²."""
    s, t = student.double(), teacher.double()
    n, c = s.shape
    p_s = [_softmax(s[i] / temperature) for i in range(n)]
    p_t = [_softmax(t[i] / temperature) for i in range(n)]
    inter = torch.stack(
        [temperature**2 * (1 - _pearson(list(p_s[i]), list(p_t[i]))) for i in range(n)]  # type: ignore[arg-type]
    )
    per_class = [_pearson([p_s[i][j] for i in range(n)], [p_t[i][j] for i in range(n)]) for j in range(c)]
    intra = temperature**2 * (1 - torch.stack(per_class).mean())
    return inter, intra


def ref_dist(student: Tensor, teacher: Tensor, beta: float, gamma: float, temperature: float) -> Tensor:
    inter, intra = ref_dist_parts(student, teacher, temperature)
    return beta * inter.mean() + gamma * intra


def official_dist(student: Tensor, teacher: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    """hunto/DIST_KD ``DIST.forward``: cosine of centred softmax rows (+1e-8), inter and intra, τ²."""

    def cosine(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _DIST_EPS)

    def pearson(a: Tensor, b: Tensor) -> Tensor:
        return cosine(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    y_s, y_t = (student / tau).softmax(dim=1), (teacher / tau).softmax(dim=1)
    inter = tau**2 * (1 - pearson(y_s, y_t).mean())
    intra = tau**2 * (1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra


# ------------------------------------------------------------------------------------------ logit standardisation
def _official_normalize(logit: Tensor) -> Tensor:
    return (logit - logit.mean(dim=-1, keepdim=True)) / (1e-7 + logit.std(dim=-1, keepdim=True))


def official_kd_standardized(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """sunshangquan/logit-standardization-KD ``kd_loss(..., logit_stand=True)``: z-score, then T²·KL batchmean."""
    s, t = _official_normalize(student), _official_normalize(teacher)
    log_ps = F.log_softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_ps, p_t, reduction="none").sum(1).mean() * temperature**2


def official_dkd_standardized(
    student: Tensor, teacher: Tensor, target: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """The same repository's ``dkd_loss(..., logit_stand=True)``: z-score, then mdistiller's DKD (−1000 masking)."""
    s, t = _official_normalize(student), _official_normalize(teacher)
    gt = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)

    def cat_mask(p: Tensor) -> Tensor:
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], dim=1)

    b_s, b_t = cat_mask(p_s), cat_mask(p_t)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / target.shape[0]
    p_t2 = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


# ------------------------------------------------------------------------------------------------------ Margin-MSE
def ref_margin_mse(sp: Tensor, sn: Tensor, tp: Tensor, tn: Tensor) -> Tensor:
    """Per-query mean over negatives of the squared margin difference, with loops."""
    out = []
    for i in range(sp.shape[0]):
        negatives_s = sn[i].reshape(-1).double()
        negatives_t = tn[i].reshape(-1).double()
        terms = [
            ((sp[i].double() - negatives_s[m]) - (tp[i].double() - negatives_t[m])) ** 2
            for m in range(len(negatives_s))
        ]
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


def official_margin_mse(sp: Tensor, sn: Tensor, tp: Tensor, tn: Tensor) -> Tensor:
    """sebastian-hofstaetter/matchmaker ``MSMarginLoss.forward`` (equal-size inputs)."""
    return torch.mean(torch.pow((sp - sn) - (tp - tn), 2))


# --------------------------------------------------------------------------------------------------------- MTARD
def ref_multi_teacher(student: Tensor, teachers: Tensor, temperatures: Sequence[float]) -> Tensor:
    """(K, N) KL(softmax(t_k,i / τ_k) || softmax(s_(k),i)) with loops; ``student`` is (N, C) or (K, N, C)."""
    s, t = student.double(), teachers.double()
    rows = []
    for k in range(t.shape[0]):
        row = []
        for i in range(t.shape[1]):
            p_t = _softmax(t[k, i] / temperatures[k])
            p_s = _softmax(s[k, i] if s.ndim == 3 else s[i])
            row.append((p_t * torch.log(p_t / p_s)).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def official_mtard_kl(student: Tensor, teacher: Tensor, temperature: float, eps: float = 1e-5) -> Tensor:
    """MTARD's ``torch.mean(kl_loss(log_softmax(s), softmax(t / temp)))``, ``kl_loss(a, b) = -a b + log(b + eps) b``."""
    a = F.log_softmax(student, dim=1)
    b = F.softmax(teacher / temperature, dim=1)
    return torch.mean(-a * b + torch.log(b + eps) * b)


def official_negentropy(teacher: Tensor, temperature: float, eps: float = 1e-5) -> float:
    """MTARD's ``torch.mean(entropy_value(softmax(t / temp)))``, ``entropy_value(a) = log(a + eps) a``."""
    p = F.softmax(teacher / temperature, dim=1)
    return float(torch.mean(torch.log(p + eps) * p))


def official_two_teacher_run(
    students: Sequence[tuple[Tensor, Tensor]],
    teachers: Sequence[tuple[Tensor, Tensor]],
    weight_lr: float = 0.025,
    temp_lr: float = 0.001,
    temp_min: float = 1.0,
    temp_max: float = 10.0,
) -> list[tuple[float, float, float, float, float]]:
    """Replay of the MTARD-extension training loop's bookkeeping for two teachers (adv = 0, nat = 1).

    For each step, with (student_adv, student_nat) and (teacher_adv, teacher_nat) logits, returns the total loss
    and the (weight_adv, weight_nat, temp_adv, temp_nat) after the step, in plain Python floats as the official code
    keeps them. ``eps = 0`` in the KL and the entropy (this package's exact forms; the official 1e-5 is a small
    perturbation) and the KL is multiplied by C (the official code averages over classes too).
    """
    weight = {"adv": 0.5, "nat": 0.5}
    temp_adv, temp_nat = 1.0, 1.0
    init_adv: float | None = None
    init_nat: float | None = None
    history = []
    for (s_adv, s_nat), (t_adv, t_nat) in zip(students, teachers):
        c = s_adv.shape[-1]
        kl_adv = official_mtard_kl(s_adv, t_adv, temp_adv, eps=0.0) * c
        kl_nat = official_mtard_kl(s_nat, t_nat, temp_nat, eps=0.0) * c
        h_adv = official_negentropy(t_adv, temp_adv, eps=0.0)
        h_nat = official_negentropy(t_nat, temp_nat, eps=0.0)
        temp_adv = temp_adv - temp_lr * math.copysign(1.0, h_adv / h_nat - 1) * (h_adv / h_nat != 1)
        temp_nat = temp_nat - temp_lr * math.copysign(1.0, h_nat / h_adv - 1) * (h_nat / h_adv != 1)
        temp_adv = max(min(temp_max, temp_adv), temp_min)
        temp_nat = max(min(temp_max, temp_nat), temp_min)
        if init_nat is None:
            init_nat = float(kl_nat)
        if init_adv is None:
            init_adv = float(kl_adv)
        lhat_adv, lhat_nat = float(kl_adv) / init_adv, float(kl_nat) / init_nat
        lhat_avg = (lhat_adv + lhat_nat) / 2
        inv_adv, inv_nat = lhat_adv / lhat_avg, lhat_nat / lhat_avg
        weight["nat"] = weight["nat"] - weight_lr * (weight["nat"] - inv_nat / (inv_adv + inv_nat))
        weight["adv"] = weight["adv"] - weight_lr * (weight["adv"] - inv_adv / (inv_adv + inv_nat))
        weight["adv"], weight["nat"] = max(weight["adv"], 0.0), max(weight["nat"], 0.0)
        coef = 1.0 / (weight["adv"] + weight["nat"])
        weight["adv"] *= coef
        weight["nat"] *= coef
        total = weight["adv"] * float(kl_adv) + weight["nat"] * float(kl_nat)
        history.append((total, weight["adv"], weight["nat"], temp_adv, temp_nat))
    return history

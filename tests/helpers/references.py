"""Naive reference implementations used only by the tests.

Written from the formulas, independently of the package: explicit loops over samples (and tokens), softmax as
``exp(z - max) / sum``, plain ``log``, and probabilities (not log-probabilities) wherever the formula states them.
They are differentiable, so gradients can be compared too. Inputs are upcast to float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _softmax(row: Tensor) -> Tensor:
    e = torch.exp(row - row.max())
    return e / e.sum()


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) for probability vectors with no zero entries."""
    return (p * torch.log(p / q)).sum()


def _per_sample_values(value: float | Sequence[float] | Tensor, n: int) -> list[float]:
    if isinstance(value, Tensor):
        value = value.tolist() if value.ndim else float(value)
    if isinstance(value, (int, float)):
        return [float(value)] * n
    return [float(v) for v in value]


def ref_kd(student: Tensor, teacher: Tensor, temperature: float | Sequence[float] | Tensor) -> Tensor:
    """Per-sample T_i^2 KL(softmax(t_i/T_i) || softmax(s_i/T_i))."""
    s, t = student.double(), teacher.double()
    temps = _per_sample_values(temperature, s.shape[0])
    out = []
    for i in range(s.shape[0]):
        p_t, p_s = _softmax(t[i] / temps[i]), _softmax(s[i] / temps[i])
        out.append(temps[i] ** 2 * _kl(p_t, p_s))
    return torch.stack(out)


def ref_dkd_parts(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float | Sequence[float] | Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD): binary target/rest KL and KL of the renormalised non-target distribution."""
    s, t = student.double(), teacher.double()
    temps = _per_sample_values(temperature, s.shape[0])
    tckd, nckd = [], []
    for i in range(s.shape[0]):
        y = int(target[i])
        p_t, p_s = _softmax(t[i] / temps[i]), _softmax(s[i] / temps[i])
        others = [c for c in range(s.shape[1]) if c != y]
        rest_t, rest_s = p_t[others].sum(), p_s[others].sum()
        b_t, b_s = torch.stack([p_t[y], rest_t]), torch.stack([p_s[y], rest_s])
        tckd.append(temps[i] ** 2 * _kl(b_t, b_s))
        nckd.append(temps[i] ** 2 * _kl(p_t[others] / rest_t, p_s[others] / rest_s))
    return torch.stack(tckd), torch.stack(nckd)


def ref_dkd_shift_mask(
    student: Tensor, teacher: Tensor, target: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """DKD batch mean as the official code states it: the target's scaled logit lowered by 1000 for NCKD."""
    s, t = student.double() / temperature, teacher.double() / temperature
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        y = int(target[i])
        p_t, p_s = _softmax(t[i]), _softmax(s[i])
        b_t = torch.stack([p_t[y], 1.0 - p_t[y]])
        b_s = torch.stack([p_s[y], 1.0 - p_s[y]])
        shift = torch.zeros_like(s[i])
        shift[y] = 1000.0
        q_t, q_s = _softmax(t[i] - shift), _softmax(s[i] - shift)
        keep = q_t > 0  # the shifted target has probability 0 after underflow
        nckd = (q_t[keep] * torch.log(q_t[keep] / q_s[keep])).sum()
        total = total + alpha * _kl(b_t, b_s) + beta * nckd
    return temperature**2 * total / s.shape[0]


def ref_binary_kl(student: Tensor, teacher: Tensor, temperature: float | Sequence[float] | Tensor) -> Tensor:
    """Per-sample tau^2 sum_c KL(Bernoulli(1/2) || Bernoulli(sigmoid((s - t) / tau)))."""
    s, t = student.double(), teacher.double()
    temps = _per_sample_values(temperature, s.shape[0])
    out = []
    for i in range(s.shape[0]):
        d = 1.0 / (1.0 + torch.exp(-(s[i] - t[i]) / temps[i]))
        kl = 0.5 * torch.log(0.5 / d) + 0.5 * torch.log(0.5 / (1.0 - d))
        out.append(temps[i] ** 2 * kl.sum())
    return torch.stack(out)


def ref_nd(student: Tensor, teacher: Tensor, class_means: Tensor, target: Tensor) -> Tensor:
    """Per-sample 1 - <f_s, c_y / |c_y|> / max(|f_s|, |f_t|), with Python's max as in the official code."""
    fs, ft, means = student.double(), teacher.double(), class_means.double()
    out = []
    for i in range(fs.shape[0]):
        c = means[int(target[i])]
        e = c / torch.sqrt((c * c).sum())
        norm_s, norm_t = torch.sqrt((fs[i] * fs[i]).sum()), torch.sqrt((ft[i] * ft[i]).sum())
        largest = max(norm_s, norm_t)
        out.append(1.0 - (fs[i] * e).sum() / largest)
    return torch.stack(out)


def ref_jsd_tokens(
    student: Tensor,
    teacher: Tensor,
    beta: float | Sequence[float] | Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token generalized JSD (TRL convention) for logits (B, T, V) or (N, V); beta per row of dim 0."""
    s, t = student.double(), teacher.double()
    squeeze = s.ndim == 2
    if squeeze:
        s, t = s.unsqueeze(1), t.unsqueeze(1)
    betas = _per_sample_values(beta, s.shape[0])
    rows = []
    for b in range(s.shape[0]):
        row = []
        for k in range(s.shape[1]):
            p_t, p_s = _softmax(t[b, k] / temperature), _softmax(s[b, k] / temperature)
            w = betas[b]
            if w == 0.0:
                row.append(_kl(p_t, p_s))
            elif w == 1.0:
                row.append(_kl(p_s, p_t))
            else:
                m = w * p_t + (1.0 - w) * p_s
                row.append(w * _kl(p_t, m) + (1.0 - w) * _kl(p_s, m))
        rows.append(torch.stack(row))
    out = torch.stack(rows)
    return out.squeeze(1) if squeeze else out


def ref_project(gradient: Tensor, reference: Tensor) -> Tensor:
    """PCGrad projection written with explicit sums over the flattened vectors."""
    g, r = gradient.double().flatten(), reference.double().flatten()
    dot = sum(float(a) * float(b) for a, b in zip(g, r))
    if dot >= 0:
        return gradient.double().clone()
    norm_sq = sum(float(b) ** 2 for b in r)
    return (g - dot / norm_sq * r).reshape(gradient.shape)


def log_cosh_float64(x: float) -> float:
    """log(cosh(x)) in plain Python float64 (for moderate |x|)."""
    return math.log(math.cosh(x))

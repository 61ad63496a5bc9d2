"""References for the feature-distillation losses, in two kinds.

* ``naive_*``: loops over samples (and pairs, triplets) in float64, written from the papers' definitions without
  the library's tricks (no Gram-form distances, no log-space NCE).
* ``official_*``: the official code's formulas transcribed as that code computes them (szagoruyko/attention-transfer
  ``at``/``at_loss``, lenscloth/RKD ``pdist``/``RkdDistance``/``RKdAngle``, HobbitLong/RepDistiller ``ContrastLoss``
  and ``ContrastMemory``'s scores and memory update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _huber(a: Tensor, b: Tensor) -> Tensor:
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5)


# ---------------------------------------------------------------------------------------------------- FitNet
def naive_fitnet(student: Tensor, teacher: Tensor) -> Tensor:
    per_sample = []
    for s, t in zip(student, teacher):
        per_sample.append(sum((a - b) ** 2 for a, b in zip(s.flatten(), t.flatten())) / s.numel())
    return torch.stack(per_sample).mean()


# ---------------------------------------------------------------------------------------------------- attention
def naive_attention_map(sample: Tensor, p: float = 2.0) -> Tensor:
    """One sample ``(C, H, W)``: channel mean of |A|^p, divided by its Euclidean norm."""
    channels = sample.shape[0]
    q = sum(sample[c].abs() ** p for c in range(channels)) / channels
    q = q.flatten()
    return q / torch.sqrt((q * q).sum())


def naive_attention_transfer(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    per_sample = []
    for s, t in zip(student, teacher):
        diff = naive_attention_map(s, p) - naive_attention_map(t, p)
        per_sample.append((diff * diff).sum() / diff.numel())
    return torch.stack(per_sample).mean()


def official_at_loss(x: Tensor, y: Tensor) -> Tensor:
    def at(z: Tensor) -> Tensor:
        return F.normalize(z.pow(2).mean(1).view(z.size(0), -1))

    return (at(x) - at(y)).pow(2).mean()


# ---------------------------------------------------------------------------------------------------- RKD
def naive_rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    def normalised(e: Tensor) -> Tensor:
        n = e.shape[0]
        zero = e.new_zeros(())
        d = torch.stack(
            [
                torch.stack([torch.sqrt(((e[i] - e[j]) ** 2).sum()) if i != j else zero for j in range(n)])
                for i in range(n)
            ]
        )
        positive = [d[i, j] for i in range(n) for j in range(n) if i != j]
        return d / (sum(positive) / len(positive))

    s, t = normalised(student.flatten(1)), normalised(teacher.flatten(1))
    return _huber(s, t).mean()


def naive_rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    def cosines(e: Tensor) -> Tensor:
        n = e.shape[0]
        values = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, b = e[j] - e[i], e[k] - e[i]
                    na, nb = a.norm(), b.norm()
                    ua = a / na if na > 0 else a * 0
                    ub = b / nb if nb > 0 else b * 0
                    values.append((ua * ub).sum())
        return torch.stack(values)

    return _huber(cosines(student.flatten(1)), cosines(teacher.flatten(1))).mean()


def official_pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def official_rkd(student: Tensor, teacher: Tensor, wd: float = 25.0, wa: float = 50.0) -> Tensor:
    with torch.no_grad():
        t_d = official_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = official_pdist(student)
    d = d / d[d > 0].mean()
    distance = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return wd * distance + wa * F.smooth_l1_loss(s_angle, t_angle)


# ---------------------------------------------------------------------------------------------------- CRD
def naive_crd_nce(scores: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """``scores``: normalised P (not log), positive first; one anchor at a time."""
    m = scores.shape[1] - 1
    noise = m / num_samples
    per_anchor = []
    for row in scores:
        value = -torch.log(row[0] / (row[0] + noise + eps))
        for k in range(1, m + 1):
            value = value - torch.log(torch.as_tensor(noise, dtype=row.dtype) / (row[k] + noise + eps))
        per_anchor.append(value)
    return torch.stack(per_anchor).mean()


def official_contrast_loss(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    bsz = x.shape[0]
    m = x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def official_crd(
    vs: Tensor,
    vt: Tensor,
    student_memory: Tensor,
    teacher_memory: Tensor,
    contrast_index: Tensor,
    n_data: int,
    temperature: float,
    z: tuple[float, float] | None,
) -> tuple[Tensor, tuple[float, float]]:
    """The official scores (``ContrastMemory.forward``) and the two ``ContrastLoss`` terms; Z set when ``None``."""
    b, k1 = contrast_index.shape
    weight_v1 = torch.index_select(student_memory, 0, contrast_index.view(-1)).detach().view(b, k1, -1)
    out_v2 = torch.exp(torch.bmm(weight_v1, vt.view(b, -1, 1)) / temperature)
    weight_v2 = torch.index_select(teacher_memory, 0, contrast_index.view(-1)).detach().view(b, k1, -1)
    out_v1 = torch.exp(torch.bmm(weight_v2, vs.view(b, -1, 1)) / temperature)
    if z is None:
        z = (float(out_v1.mean() * n_data), float(out_v2.mean() * n_data))
    out_v1, out_v2 = out_v1 / z[0], out_v2 / z[1]
    loss = official_contrast_loss(out_v1.squeeze(2), n_data) + official_contrast_loss(out_v2.squeeze(2), n_data)
    return loss.reshape(()), z


def official_memory_update(memory: Tensor, v: Tensor, y: Tensor, momentum: float) -> Tensor:
    """``ContrastMemory``'s update (index_select the old rows, mix, normalise, index_copy: the last duplicate wins)."""
    memory = memory.clone()
    pos = torch.index_select(memory, 0, y.view(-1)) * momentum + v * (1 - momentum)
    updated = pos / pos.pow(2).sum(1, keepdim=True).pow(0.5)
    for row, i in zip(updated, y.tolist()):  # sequential copies: the last occurrence of an index stays
        memory[i] = row
    return memory

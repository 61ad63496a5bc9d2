"""Table-driven fuzz of bad calls over the public API of the distillation, temperature, unlearning and chunked
families (functions and loss modules).

Each case changes one argument of a valid call into a bad one: a wrong type, shape or rank, a mismatched batch, an
integer or bool tensor where floats are needed, an out-of-range target, a negative length, a NaN / inf / out-of-range
hyperparameter, an unknown name, an empty batch or a single class. A case is

* CLEAR when the call raises ``ValueError`` or ``TypeError`` whose message names the argument (the ``match`` regex),
* UNCLEAR when it raises anything else (a torch-internal error) or a message that does not name the argument,
* SILENT when it returns (a NaN or a meaningless number).

Every case must be CLEAR; ``test_fuzz_summary`` counts the three outcomes over the whole table. Empty batches are not
errors: the mean over an empty batch is 0 (documented), checked by ``test_empty_batches_give_a_defined_value``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_losses.functional import chunked, distillation, temperature, unlearning
from lightning_losses.losses import (
    ALDRKLLoss,
    BinaryKLLoss,
    DistillationLoss,
    DKDLoss,
    DROTemperatureLoss,
    FLATLoss,
    GeneralizedJSDLoss,
    GradientAscentLoss,
    IdkDPOLoss,
    KDLoss,
    LDRKLLoss,
    NDLoss,
    NPOLoss,
    RobustContrastiveLoss,
    SimNPOLoss,
)

G = torch.Generator().manual_seed(0)


def randn(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=G)


def randint(high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=G)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], Any]
    match: str


CASES: list[Case] = []


def _with(x: Tensor, value: float) -> Tensor:
    y = x.clone()
    y.view(-1)[0] = value
    return y


def _other_rank(x: Tensor) -> Tensor:
    return x.reshape(-1) if x.ndim > 1 else x.reshape(1, -1)


def float_tensor_bads(x: Tensor, *, rank: Tensor | bool | None = True, finite: bool = True) -> list[tuple[str, Any]]:
    """Bad variants of a floating data tensor: not a tensor, integer, bool, another rank, NaN, inf."""
    bads: list[tuple[str, Any]] = [("list", x.tolist()), ("int", x.round().long()), ("bool", x > 0)]
    if rank is True:
        bads.append(("rank", _other_rank(x)))
    elif isinstance(rank, Tensor):
        bads.append(("rank", rank))
    if finite:
        bads += [("nan", _with(x, float("nan"))), ("inf", _with(x, float("inf")))]
    return bads


def target_bads(t: Tensor, num_classes: int, *, ignore_index: int | None = None) -> list[tuple[str, Any]]:
    """Bad variants of a tensor of class indices / token ids."""
    negative = -5 if ignore_index != -5 else -7
    return [
        ("list", t.tolist()),
        ("float", t.float()),
        ("bool", t > 0),
        ("too_high", _with(t, num_classes)),
        ("negative", _with(t, negative)),
        ("short", t.reshape(-1)[:-1] if t.ndim == 1 else t[..., :-1]),
    ]


def hyper_bads(
    *, positive: bool = False, low: float | None = None, high: float | None = None, shape_bad: bool = True
) -> list[tuple[str, Any]]:
    """Bad variants of a hyperparameter: NaN, inf, out of range, a string, a bool, NaN tensor, wrong-shape tensor."""
    bads: list[tuple[str, Any]] = [
        ("nan", float("nan")),
        ("inf", float("inf")),
        ("str", "abc"),
        ("bool", True),
        ("nan_tensor", torch.tensor(float("nan"))),
    ]
    if positive:
        bads += [("zero", 0.0), ("negative", -1.0), ("negative_tensor", torch.tensor(-0.5))]
    if low is not None:
        bads.append(("below", low - 0.5))
    if high is not None:
        bads.append(("above", high + 0.5))
    if shape_bad:
        bads.append(("shape", torch.ones(17)))
    return bads


def add(
    name: str,
    fn: Callable[..., Any],
    valid: dict[str, Any],
    mutations: dict[str, list[tuple[str, Any]]],
    matches: dict[str, str] | None = None,
) -> None:
    """Add one case per (argument, bad value): ``fn(**valid)`` with that one argument replaced."""
    fn(**valid)  # the valid call itself must work
    for arg, bads in mutations.items():
        for label, value in bads:
            match = (matches or {}).get(f"{arg}.{label}") or (matches or {}).get(arg) or f"`{re.escape(arg)}`"
            kwargs = {**valid, arg: value}
            CASES.append(Case(f"{name}-{arg}-{label}", lambda fn=fn, kwargs=kwargs: fn(**kwargs), match))


def add_call(name: str, call: Callable[[], Any], match: str) -> None:
    CASES.append(Case(name, call, match))


# --------------------------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------------------------
S, T_, Y = randn(4, 5), randn(4, 5), torch.tensor([0, 3, 4, 1])
PAIR = {"student_logits": S, "teacher_logits": T_}
PAIR_BADS = {
    "student_logits": float_tensor_bads(S),
    "teacher_logits": [*float_tensor_bads(T_, rank=False), ("classes", randn(4, 6)), ("batch", randn(3, 5))],
}
REDUCTION_BADS = [("unknown", "avg"), ("none_value", None)]
for fn_name in ("kd_loss", "binary_kl_loss"):
    add(
        fn_name,
        getattr(distillation, fn_name),
        {**PAIR, "temperature": 2.0},
        {**PAIR_BADS, "temperature": hyper_bads(positive=True), "reduction": REDUCTION_BADS},
    )
add(
    "dkd_components",
    distillation.dkd_components,
    {**PAIR, "target": Y},
    {**PAIR_BADS, "target": target_bads(Y, 5), "temperature": hyper_bads(positive=True)},
)
add(
    "dkd_loss",
    distillation.dkd_loss,
    {**PAIR, "target": Y},
    {
        **PAIR_BADS,
        "target": target_bads(Y, 5),
        "alpha": hyper_bads(low=0.0),
        "beta": hyper_bads(low=0.0),
        "temperature": hyper_bads(positive=True),
        "reduction": REDUCTION_BADS,
    },
)
add_call(
    "dkd_loss-one_class",
    lambda: distillation.dkd_loss(randn(4, 1), randn(4, 1), torch.zeros(4).long()),
    r"`student_logits`.*2 classes",
)
FS, FT, MEANS = randn(4, 3), randn(4, 3), randn(5, 3)
add(
    "nd_loss",
    distillation.nd_loss,
    {"student_features": FS, "teacher_features": FT, "class_means": MEANS, "target": Y},
    {
        "student_features": float_tensor_bads(FS),
        "teacher_features": [*float_tensor_bads(FT, rank=False), ("batch", randn(3, 3))],
        "class_means": [*float_tensor_bads(MEANS), ("width", randn(5, 4))],
        "target": target_bads(Y, 5),
        "reduction": [*REDUCTION_BADS, ("batchmean", "batchmean")],
    },
)
LS, LT, LAB = randn(2, 3, 5), randn(2, 3, 5), torch.tensor([[1, -100, 4], [0, 2, 3]])
add(
    "generalized_jsd_loss",
    distillation.generalized_jsd_loss,
    {"student_logits": LS, "teacher_logits": LT, "labels": LAB},
    {
        "student_logits": float_tensor_bads(LS, rank=randn(30)),
        "teacher_logits": [*float_tensor_bads(LT, rank=False), ("batch", randn(3, 3, 5)), ("vocab", randn(2, 3, 6))],
        "labels": target_bads(LAB, 5, ignore_index=-100),
        "beta": hyper_bads(low=0.0, high=1.0),
        "temperature": hyper_bads(positive=True),
        "ignore_index": [("float", 1.5), ("str", "pad")],
        "reduction": [*REDUCTION_BADS, ("batchmean", "batchmean")],
        "vocab_mismatch": [("unknown", "pad")],
        "num_items_in_batch": [
            ("zero", 0),
            ("negative", -3.0),
            ("nan", float("nan")),
            ("vector", torch.ones(2)),
            ("bool", True),
            ("str", "12"),
        ],
    },
    {"teacher_logits.vocab": r"`teacher_logits`.*the teacher's 6", "labels.short": "`labels`"},
)
add_call(
    "generalized_jsd_loss-num_items_with_sum",
    lambda: distillation.generalized_jsd_loss(LS, LT, reduction="sum", num_items_in_batch=4),
    r"`num_items_in_batch`.*reduction='mean'",
)
GR = randn(6)
add(
    "project_conflicting_gradient",
    distillation.project_conflicting_gradient,
    {"gradient": GR, "reference": randn(6)},
    {
        "gradient": float_tensor_bads(GR, rank=False, finite=False),
        "reference": [*float_tensor_bads(GR, rank=False, finite=False), ("shape", randn(5))],
    },
)

# Modules: constructors and forwards
for cls in (KDLoss, DKDLoss, BinaryKLLoss, GeneralizedJSDLoss, NDLoss):
    names = {
        "KDLoss": ["temperature", "weight"],
        "DKDLoss": ["alpha", "beta", "temperature", "weight"],
        "BinaryKLLoss": ["temperature", "weight"],
        "GeneralizedJSDLoss": ["beta", "temperature", "weight"],
        "NDLoss": ["weight"],
    }[cls.__name__]
    for hp in names:
        for label, value in [
            ("nan", float("nan")),
            ("inf", float("inf")),
            ("str", "abc"),
            ("negative", -1.0),
            ("nan_tensor", torch.tensor(float("nan"))),
        ]:
            add_call(f"{cls.__name__}()-{hp}-{label}", lambda cls=cls, hp=hp, v=value: cls(**{hp: v}), hp)
    add_call(f"{cls.__name__}()-reduction-unknown", lambda cls=cls: cls(reduction="avg"), "`reduction`")
add_call("DistillationLoss()-warmup_epochs-negative", lambda: DistillationLoss(warmup_epochs=-1), "`warmup_epochs`")
add_call("DistillationLoss()-warmup_epochs-float", lambda: DistillationLoss(warmup_epochs=2.5), "`warmup_epochs`")
add_call("GeneralizedJSDLoss()-vocab_mismatch", lambda: GeneralizedJSDLoss(vocab_mismatch="pad"), "`vocab_mismatch`")
add_call("GeneralizedJSDLoss()-ignore_index", lambda: GeneralizedJSDLoss(ignore_index=None), "`ignore_index`")
add("KDLoss.forward", lambda **kw: KDLoss()(**kw), PAIR, PAIR_BADS)
add("DKDLoss.forward", lambda **kw: DKDLoss()(**kw), {**PAIR, "target": Y}, {**PAIR_BADS, "target": target_bads(Y, 5)})
add("BinaryKLLoss.forward", lambda **kw: BinaryKLLoss()(**kw), PAIR, PAIR_BADS)
add(
    "NDLoss.forward",
    lambda **kw: NDLoss()(**kw),
    {"student_features": FS, "teacher_features": FT, "class_means": MEANS, "target": Y},
    {"student_features": float_tensor_bads(FS), "target": target_bads(Y, 5)},
)
add(
    "GeneralizedJSDLoss.forward",
    lambda **kw: GeneralizedJSDLoss()(**kw),
    {"student_logits": LS, "teacher_logits": LT, "labels": LAB},
    {
        "student_logits": float_tensor_bads(LS, rank=randn(30)),
        "labels": target_bads(LAB, 5, ignore_index=-100),
        "num_items_in_batch": [("zero", 0), ("nan", float("nan")), ("vector", torch.ones(2))],
    },
)

# --------------------------------------------------------------------------------------------------------------------
# Adaptive temperature
# --------------------------------------------------------------------------------------------------------------------
Z, ZY = randn(4, 5), torch.tensor([0, 3, 4, -100])
add(
    "tempered_kl_to_uniform",
    temperature.tempered_kl_to_uniform,
    {"logits": Z, "tau": 1.0},
    {"logits": float_tensor_bads(Z, rank=torch.tensor(1.0)), "tau": hyper_bads(positive=True)},
)
add(
    "dro_temperature_loss",
    temperature.dro_temperature_loss,
    {"logits": Z, "target": ZY, "tau": 1.0, "rho": 0.5},
    {
        "logits": float_tensor_bads(Z, rank=randn(5)),
        "target": target_bads(ZY, 5, ignore_index=-100),
        "tau": [*hyper_bads(positive=True), ("per_position_nan", torch.tensor([1.0, float("nan"), 1.0, 1.0]))],
        "rho": [*hyper_bads(low=0.0, shape_bad=False), ("log_v", math.log(5)), ("tensor_above", torch.tensor(2.0))],
        "reduction": REDUCTION_BADS,
        "ignore_index": [("str", "pad")],
        "num_items_in_batch": [("zero", 0), ("nan_tensor", torch.tensor(float("nan")))],
    },
)
add_call(
    "dro_temperature_loss-one_class",
    lambda: temperature.dro_temperature_loss(randn(4, 1), torch.zeros(4).long(), 1.0, 0.0),
    r"`logits`.*2 classes",
)
XI, XT = randn(4, 3), randn(4, 3)
add(
    "robust_contrastive_loss",
    temperature.robust_contrastive_loss,
    {"image_features": XI, "text_features": XT, "tau_image": 0.1, "tau_text": 0.1, "rho": 0.5},
    {
        "image_features": float_tensor_bads(XI),
        "text_features": [*float_tensor_bads(XT, rank=False), ("batch", randn(3, 3))],
        "tau_image": hyper_bads(positive=True),
        "tau_text": hyper_bads(positive=True),
        "rho": [*hyper_bads(low=0.0, shape_bad=False), ("above_log_m", math.log(3))],
        "reduction": REDUCTION_BADS,
    },
    {"text_features.batch": "`text_features`"},
)
add_call(
    "robust_contrastive_loss-two_samples",
    lambda: temperature.robust_contrastive_loss(randn(2, 3), randn(2, 3), 0.1, 0.1, 0.0),
    r"`image_features`.*B >= 3",
)
LDR = {"logits": Z, "target": Y}
LDR_BADS = {"logits": float_tensor_bads(Z), "target": target_bads(Y, 5), "reduction": REDUCTION_BADS}
add(
    "ldr_kl_loss",
    temperature.ldr_kl_loss,
    LDR,
    {
        **LDR_BADS,
        "lam": hyper_bads(positive=True),
        "margin": hyper_bads(low=0.0),
        "rescale_logits": [("str", "yes")],
    },
)
add_call(
    "ldr_kl_loss-one_class", lambda: temperature.ldr_kl_loss(randn(4, 1), torch.zeros(4).long()), r"`logits`.*2 classes"
)
add(
    "aldr_kl_lambda",
    temperature.aldr_kl_lambda,
    {"logits": Z, "previous_lam": 10.0},
    {
        "logits": float_tensor_bads(Z),
        "previous_lam": hyper_bads(positive=True),
        "lam0": [("nan", float("nan")), ("zero", 0.0), ("str", "abc"), ("inf", float("inf"))],
        "alpha": [("nan", float("nan")), ("one", 1.0), ("str", "abc"), ("inf", float("inf"))],
    },
)
add_call("aldr_kl_lambda-one_class", lambda: temperature.aldr_kl_lambda(randn(4, 1), 10.0), r"`logits`.*2 classes")
add(
    "aldr_kl_loss",
    temperature.aldr_kl_loss,
    {**LDR, "lam": torch.full((4,), 8.0)},
    {
        **LDR_BADS,
        "lam": hyper_bads(positive=True),
        "lam0": [("nan", float("nan")), ("zero", 0.0), ("negative", -2.0)],
        "alpha": [("nan", float("nan")), ("one", 1.0), ("half", 0.5)],
        "margin": hyper_bads(low=0.0),
    },
)
add_call(
    "aldr_kl_loss-one_class",
    lambda: temperature.aldr_kl_loss(randn(4, 1), torch.zeros(4).long(), 5.0),
    r"`logits`.*2 classes",
)

for cls, kwargs, hps in (
    (DROTemperatureLoss, {}, ["rho"]),
    (LDRKLLoss, {}, ["lam", "margin"]),
    (ALDRKLLoss, {"num_samples": 10}, ["lam0", "alpha", "margin"]),
    (RobustContrastiveLoss, {"num_samples": 10}, ["rho", "gamma"]),
):
    for hp in hps:
        for label, value in [("nan", float("nan")), ("inf", float("inf")), ("str", "abc"), ("negative", -1.0)]:
            add_call(
                f"{cls.__name__}()-{hp}-{label}", lambda cls=cls, kw=kwargs, hp=hp, v=value: cls(**kw, **{hp: v}), hp
            )
for cls in (ALDRKLLoss, RobustContrastiveLoss):
    for label, value in [("zero", 0), ("float", 12.5), ("str", "10")]:
        add_call(f"{cls.__name__}()-num_samples-{label}", lambda cls=cls, v=value: cls(num_samples=v), "`num_samples`")
add_call("DROTemperatureLoss()-ignore_index", lambda: DROTemperatureLoss(ignore_index="pad"), "`ignore_index`")
add_call("LDRKLLoss()-rescale_logits", lambda: LDRKLLoss(rescale_logits="yes"), "`rescale_logits`")
add(
    "DROTemperatureLoss.forward",
    lambda **kw: DROTemperatureLoss(rho=0.5)(**kw),
    {"logits": Z, "target": ZY, "tau": 1.0},
    {
        "logits": float_tensor_bads(Z, rank=randn(5)),
        "target": target_bads(ZY, 5, ignore_index=-100),
        "tau": hyper_bads(positive=True),
        "num_items_in_batch": [("zero", 0)],
    },
)
add(
    "LDRKLLoss.forward",
    lambda **kw: LDRKLLoss()(**kw),
    LDR,
    {"logits": float_tensor_bads(Z), "target": target_bads(Y, 5)},
)
add(
    "ALDRKLLoss.forward",
    lambda **kw: ALDRKLLoss(num_samples=10)(**kw),
    {**LDR, "index": torch.tensor([0, 1, 2, 3])},
    {
        "logits": float_tensor_bads(Z),
        "target": target_bads(Y, 5),
        "index": [
            ("float", torch.tensor([0.0, 1, 2, 3])),
            ("bool", torch.ones(4, dtype=torch.bool)),
            ("too_high", torch.tensor([0, 1, 2, 10])),
            ("short", torch.tensor([0, 1])),
            ("list", [0, 1, 2, 3]),
        ],
    },
)
add(
    "RobustContrastiveLoss.forward",
    lambda **kw: RobustContrastiveLoss(num_samples=10, rho=0.5)(**kw),
    {"image_features": XI, "text_features": XT, "index": torch.arange(4), "tau_image": 0.1, "tau_text": 0.1},
    {
        "image_features": float_tensor_bads(XI, finite=False),
        "index": [("float", torch.arange(4.0)), ("too_high", torch.tensor([0, 1, 2, 10])), ("list", [0, 1, 2, 3])],
        "tau_image": [("nan", float("nan")), ("zero", 0.0), ("shape", torch.ones(5)), ("str", "abc")],
        "tau_text": [("negative", -1.0), ("nan_tensor", torch.full((4,), float("nan")))],
    },
)

# --------------------------------------------------------------------------------------------------------------------
# Unlearning
# --------------------------------------------------------------------------------------------------------------------
UL, ULAB = randn(2, 4, 6), torch.tensor([[-100, 1, 2, 5], [0, 3, -100, -100]])
TOKEN = {"logits": UL, "labels": ULAB}
TOKEN_BADS = {
    "logits": float_tensor_bads(UL),
    "labels": [*target_bads(ULAB, 6, ignore_index=-100), ("batch", ULAB[:1])],
    "ignore_index": [("str", "pad")],
    "shift": [("str", "yes")],
}
for fn_name in ("token_log_probs", "sequence_log_probs", "mean_token_probs", "token_logprob_statistics"):
    add(fn_name, getattr(unlearning, fn_name), TOKEN, TOKEN_BADS)
add_call("sequence_log_probs-average", lambda: unlearning.sequence_log_probs(UL, ULAB, average="yes"), "`average`")
PARA, PERT = randn(3), randn(3, 2)
add(
    "truth_ratio",
    unlearning.truth_ratio,
    {"paraphrased_mean_logps": PARA, "perturbed_mean_logps": PERT},
    {
        "paraphrased_mean_logps": float_tensor_bads(PARA),
        "perturbed_mean_logps": [*float_tensor_bads(PERT), ("batch", randn(2, 2)), ("no_answer", randn(3, 0))],
    },
)
LP, MASK = -torch.rand(2, 4, generator=G), torch.tensor([[True, True, False, True], [True, False, True, True]])
add(
    "membership_scores",
    unlearning.membership_scores,
    {"log_probs": LP, "mask": MASK, "mu": LP.clone(), "sigma": torch.ones(2, 4)},
    {
        "log_probs": float_tensor_bads(LP),
        "mask": [("int", MASK.long()), ("float", MASK.float()), ("shape", MASK[:, :3]), ("list", MASK.tolist())],
        "mu": [("shape", randn(2, 3)), ("nan", _with(LP, float("nan"))), ("missing_sigma_pair", None)],
        "k": [("zero", 0.0), ("above", 1.5), ("nan", float("nan")), ("str", "a"), ("bool", True)],
    },
    {"mu.missing_sigma_pair": "`mu` and `sigma`"},
)
PL, RL, LEN = -10 * torch.rand(3, generator=G), -10 * torch.rand(3, generator=G), torch.tensor([4, 2, 5])
VECTOR_BADS = [*float_tensor_bads(PL), ("empty", torch.zeros(0))]
add(
    "npo_loss",
    unlearning.npo_loss,
    {"policy_logps": PL, "reference_logps": RL},
    {
        "policy_logps": VECTOR_BADS,
        "reference_logps": [*float_tensor_bads(RL, rank=False), ("batch", randn(2))],
        "beta": hyper_bads(positive=True),
    },
    {"reference_logps.batch": "`reference_logps`", "policy_logps.empty": "`policy_logps`"},
)
LENGTH_BADS = [
    ("negative", torch.tensor([4, -2, 5])),
    ("bool", torch.ones(3, dtype=torch.bool)),
    ("nan", torch.tensor([4.0, float("nan"), 5.0])),
    ("batch", torch.tensor([4, 2])),
    ("list", [4, 2, 5]),
]
add(
    "simnpo_loss",
    unlearning.simnpo_loss,
    {"policy_logps": PL, "lengths": LEN},
    {
        "policy_logps": VECTOR_BADS,
        "lengths": [*LENGTH_BADS, ("zero", torch.tensor([4, 0, 5]))],
        "beta": hyper_bads(positive=True),
        "delta": hyper_bads(),
    },
)
for fn_name, arg in (("gradient_ascent_loss", "forget_logps"), ("retain_nll_loss", "retain_logps")):
    add(
        fn_name,
        getattr(unlearning, fn_name),
        {arg: PL, "lengths": LEN},
        {
            arg: VECTOR_BADS,
            "lengths": [*LENGTH_BADS, ("all_zero", torch.zeros(3, dtype=torch.long))],
            "num_items_in_batch": [("zero", 0), ("negative", -4), ("nan", float("nan")), ("vector", torch.ones(3))],
        },
        {"lengths.all_zero": "`lengths`"},
    )
add(
    "retain_kl_loss",
    unlearning.retain_kl_loss,
    {"policy_logits": UL, "reference_logits": randn(2, 4, 6), "labels": ULAB},
    {
        "policy_logits": float_tensor_bads(UL),
        "reference_logits": [*float_tensor_bads(UL, rank=False), ("batch", randn(1, 4, 6))],
        "labels": [
            ("float", ULAB.float()),
            ("bool", ULAB > 0),
            ("short", ULAB[:, :3]),
            ("list", ULAB.tolist()),
            ("all_ignored", torch.full((2, 4), -100)),
        ],
        "num_items_in_batch": [("zero", 0)],
    },
    {"reference_logits.batch": "`reference_logits`", "labels.all_ignored": "`labels`|no counted token"},
)
IDK = {"policy_idk_logps": PL, "reference_idk_logps": RL, "policy_forget_logps": PL - 1, "reference_forget_logps": RL}
add(
    "idk_dpo_loss",
    unlearning.idk_dpo_loss,
    IDK,
    {
        "policy_idk_logps": VECTOR_BADS,
        "reference_forget_logps": [*float_tensor_bads(RL, rank=False), ("batch", randn(4))],
        "beta": hyper_bads(positive=True),
    },
)
add(
    "flat_variational_pair",
    unlearning.flat_variational_pair,
    {"x": torch.rand(3, generator=G)},
    {
        "x": [("list", [0.1, 0.2]), ("int", torch.ones(3, dtype=torch.long))],
        "divergence": [("unknown", "chi"), ("none_value", None)],
    },
)
PF, PG = torch.rand(3, generator=G), torch.rand(3, generator=G)
add(
    "flat_loss",
    unlearning.flat_loss,
    {"forget_probs": PF, "template_probs": PG},
    {
        "forget_probs": [*float_tensor_bads(PF), ("log_probs", PF.log()), ("empty", torch.zeros(0))],
        "template_probs": [("batch", torch.rand(2)), ("above_one", PG + 1)],
        "divergence": [("unknown", "chi"), ("list", ["tv"])],
    },
    {
        "forget_probs.log_probs": "`forget_probs`",
        "template_probs.above_one": "`template_probs`",
        "forget_probs.nan": "`forget_probs`",
        "forget_probs.inf": "`forget_probs`",
    },
)
for cls, hps in (
    (NPOLoss, ["beta", "forget_weight", "retain_weight"]),
    (SimNPOLoss, ["beta", "delta"]),
    (IdkDPOLoss, ["beta"]),
    (GradientAscentLoss, ["retain_weight"]),
):
    for hp in hps:
        for label, value in [("nan", float("nan")), ("inf", float("inf")), ("str", "abc")]:
            add_call(f"{cls.__name__}()-{hp}-{label}", lambda cls=cls, hp=hp, v=value: cls(**{hp: v}), hp)
add_call("FLATLoss()-divergence", lambda: FLATLoss("chi"), "divergence")
add_call("FLATLoss()-divergence-list", lambda: FLATLoss(["tv"]), "divergence")
add(
    "NPOLoss.forward",
    lambda **kw: NPOLoss()(**kw),
    {"policy_logps": PL, "reference_logps": RL},
    {"policy_logps": VECTOR_BADS},
)
add(
    "SimNPOLoss.forward",
    lambda **kw: SimNPOLoss(retain_weight=0.0)(**kw),
    {"policy_logps": PL, "lengths": LEN},
    {"lengths": LENGTH_BADS},
)
add(
    "GradientAscentLoss.forward",
    lambda **kw: GradientAscentLoss()(**kw),
    {"forget_logps": PL, "lengths": LEN},
    {"forget_logps": VECTOR_BADS, "lengths": LENGTH_BADS, "num_items_in_batch": [("zero", 0)]},
)
add(
    "FLATLoss.forward",
    lambda **kw: FLATLoss()(**kw),
    {"forget_probs": PF, "template_probs": PG},
    {"forget_probs": [("log_probs", PF.log()), ("int", PF.long())]},
)
add("IdkDPOLoss.forward", lambda **kw: IdkDPOLoss(retain_weight=0.0)(**kw), IDK, {"policy_idk_logps": VECTOR_BADS})

# --------------------------------------------------------------------------------------------------------------------
# Chunked large-vocabulary losses
# --------------------------------------------------------------------------------------------------------------------
H, W, BIAS, HY = randn(6, 4), randn(7, 4), randn(7), torch.tensor([0, 6, -100, 3, 2, 1])
HEAD_BADS = {
    "hidden": [*float_tensor_bads(H, rank=randn(4))],
    "weight": [*float_tensor_bads(W), ("transposed", W.t().contiguous()), ("dtype", W.double())],
    "bias": [("list", BIAS.tolist()), ("int", BIAS.long()), ("shape", randn(6)), ("nan", _with(BIAS, float("nan")))],
    "target": target_bads(HY, 7, ignore_index=-100),
    "chunk_size": [("zero", 0), ("float", 2.5), ("str", "4"), ("bool", True)],
    "softcap": [("zero", 0.0), ("nan", float("nan")), ("inf", float("inf")), ("str", "30")],
    "z_loss": [("nan", float("nan")), ("negative", -1e-4), ("str", "abc"), ("shape", torch.ones(5))],
    "temperature": hyper_bads(positive=True),
    "reduction": REDUCTION_BADS,
    "ignore_index": [("str", "pad"), ("float", 1.5)],
    "num_items_in_batch": [("zero", 0), ("nan", float("nan")), ("vector", torch.ones(2))],
}
add(
    "linear_cross_entropy",
    chunked.linear_cross_entropy,
    {"hidden": H, "weight": W, "target": HY, "bias": BIAS},
    HEAD_BADS,
    {"weight.dtype": "`weight`"},
)
SH, SLAB = randn(2, 3, 4), torch.tensor([[1, 2, -100], [-100, 0, 6]])
add(
    "linear_sequence_log_probs",
    chunked.linear_sequence_log_probs,
    {"hidden": SH, "weight": W, "labels": SLAB},
    {
        "hidden": float_tensor_bads(SH),
        "weight": [("transposed", W.t().contiguous()), ("list", W.tolist())],
        "labels": target_bads(SLAB, 7, ignore_index=-100),
        "temperature": hyper_bads(positive=True),
        "average": [("str", "yes")],
        "shift": [("str", "yes")],
    },
)
TH, TW = randn(6, 5), randn(7, 5)
add(
    "linear_distillation_loss",
    chunked.linear_distillation_loss,
    {"student_hidden": H, "student_weight": W, "teacher_hidden": TH, "teacher_weight": TW, "labels": HY},
    {
        "student_hidden": float_tensor_bads(H, rank=randn(4)),
        "teacher_hidden": [*float_tensor_bads(TH, rank=False), ("batch", randn(5, 5))],
        "teacher_weight": [*float_tensor_bads(TW, rank=False), ("vocab", randn(8, 5))],
        "labels": target_bads(HY, 7, ignore_index=-100),
        "beta": hyper_bads(low=0.0, high=1.0),
        "temperature": hyper_bads(positive=True),
        "student_softcap": [("nan", float("nan")), ("zero", 0.0)],
        "num_items_in_batch": [("zero", 0), ("vector", torch.ones(2))],
    },
    {"teacher_weight.vocab": "teacher"},
)
add(
    "default_chunk_size",
    chunked.default_chunk_size,
    {"vocab_size": 100},
    {"vocab_size": [("zero", 0), ("str", "100"), ("float", 1e4), ("bool", True)]},
)


# --------------------------------------------------------------------------------------------------------------------
# The fuzz
# --------------------------------------------------------------------------------------------------------------------
def classify(case: Case) -> tuple[str, str]:
    """``("CLEAR" | "UNCLEAR" | "SILENT", detail)``."""
    try:
        out = case.call()
    except (ValueError, TypeError) as err:
        if re.search(case.match, str(err)):
            return "CLEAR", ""
        return "UNCLEAR", f"{type(err).__name__} not naming {case.match!r}: {err}"
    except Exception as err:
        return "UNCLEAR", f"{type(err).__name__}: {err}"
    return "SILENT", f"returned {out!r}"[:300]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_call_raises_a_clear_error(case: Case) -> None:
    outcome, detail = classify(case)
    assert outcome == "CLEAR", f"{case.id}: {outcome}: {detail}"


def test_fuzz_summary() -> None:
    counts = {"CLEAR": 0, "UNCLEAR": 0, "SILENT": 0}
    for case in CASES:
        counts[classify(case)[0]] += 1
    print(f"\nbad-input fuzz over {len(CASES)} calls: " + " · ".join(f"{k} {v}" for k, v in counts.items()))
    assert len(CASES) > 500
    assert counts == {"CLEAR": len(CASES), "UNCLEAR": 0, "SILENT": 0}


# --------------------------------------------------------------------------------------------------------------------
# Empty batches: a defined value (0 for a mean, no NaN), with a zero gradient
# --------------------------------------------------------------------------------------------------------------------
def _empty(*shape: int) -> Tensor:
    return torch.zeros(*shape).requires_grad_(True)


EMPTY_CALLS: dict[str, Callable[[Tensor], Tensor]] = {
    "kd_loss": lambda z: distillation.kd_loss(z, z.detach()),
    "dkd_loss": lambda z: distillation.dkd_loss(z, z.detach(), torch.zeros(0, dtype=torch.long)),
    "binary_kl_loss": lambda z: distillation.binary_kl_loss(z, z.detach()),
    "nd_loss": lambda z: distillation.nd_loss(z, z.detach(), randn(5, 5), torch.zeros(0, dtype=torch.long)),
    "generalized_jsd_loss": lambda z: distillation.generalized_jsd_loss(z[None], z[None].detach()),
    "dro_temperature_loss": lambda z: temperature.dro_temperature_loss(z, torch.zeros(0, dtype=torch.long), 1.0, 0.5),
    "ldr_kl_loss": lambda z: temperature.ldr_kl_loss(z, torch.zeros(0, dtype=torch.long)),
    "aldr_kl_loss": lambda z: temperature.aldr_kl_loss(z, torch.zeros(0, dtype=torch.long), torch.zeros(0) + 5),
    "LDRKLLoss": lambda z: LDRKLLoss()(z, torch.zeros(0, dtype=torch.long)),
    "ALDRKLLoss.eval": lambda z: ALDRKLLoss(num_samples=3).eval()(z, torch.zeros(0, dtype=torch.long)),
    "linear_cross_entropy": lambda z: chunked.linear_cross_entropy(z[:, :4], randn(7, 4), torch.zeros(0).long()),
}


@pytest.mark.parametrize("name", list(EMPTY_CALLS))
def test_empty_batches_give_a_defined_value(name: str) -> None:
    z = _empty(0, 5)
    value = EMPTY_CALLS[name](z)
    assert value.shape == () and float(value.detach()) == 0.0
    (grad,) = torch.autograd.grad(value, z, allow_unused=True)
    assert grad is None or bool((grad == 0).all())

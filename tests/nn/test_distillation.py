"""Dual-head classifier and feature projector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_losses.losses import BinaryKLLoss, NDLoss
from lightning_losses.nn import DualHeadClassifier, DualHeadOutput, FeatureProjector

N, D, C = 6, 10, 5


def _model(auxiliary: str = "linear", **kwargs: object) -> DualHeadClassifier:
    backbone = nn.Sequential(nn.Linear(8, D), nn.ReLU())
    return DualHeadClassifier(backbone, D, C, auxiliary=auxiliary, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("auxiliary", ["linear", "mlp"])
def test_forward_is_the_main_head_of_forward_heads(auxiliary: str) -> None:
    model = _model(auxiliary).eval()
    x = torch.randn(N, 8)
    out = model.forward_heads(x)
    assert isinstance(out, DualHeadOutput)
    assert out.logits.shape == out.aux_logits.shape == (N, C) and out.features.shape == (N, D)
    torch.testing.assert_close(model(x), out.logits)
    torch.testing.assert_close(out.logits, model.fc(model.backbone(x)))
    torch.testing.assert_close(out.aux_logits, model.fc_aux(out.features))
    assert not torch.allclose(out.logits, out.aux_logits)


def test_auxiliary_head_structures() -> None:
    linear = _model("linear")
    assert isinstance(linear.fc, nn.Linear) and isinstance(linear.fc_aux, nn.Linear)
    assert linear.fc_aux.in_features == D and linear.fc_aux.out_features == C
    mlp = _model("mlp")
    layers = list(mlp.fc_aux.children())
    assert [type(m) for m in layers] == [nn.Linear, nn.Dropout, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert layers[0].in_features == D and layers[0].out_features == 200  # type: ignore[union-attr]
    assert layers[1].p == pytest.approx(0.1)  # type: ignore[union-attr]
    assert layers[4].out_features == C  # type: ignore[union-attr]
    custom = _model("mlp", hidden_dim=16, dropout=0.3)
    assert next(iter(custom.fc_aux.children())).out_features == 16  # type: ignore[union-attr]


@pytest.mark.parametrize("auxiliary", ["linear", "mlp"])
def test_gradients_reach_both_heads_and_the_backbone(auxiliary: str) -> None:
    model = _model(auxiliary).train()
    x, y, teacher = torch.randn(N, 8), torch.randint(0, C, (N,)), torch.randn(N, C)
    out = model.forward_heads(x)
    loss = F.cross_entropy(out.logits, y) + BinaryKLLoss()(out.aux_logits, teacher)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_main_forward_leaves_the_auxiliary_head_untouched() -> None:
    model = _model("linear")
    F.cross_entropy(model(torch.randn(N, 8)), torch.randint(0, C, (N,))).backward()
    assert model.fc.weight.grad is not None
    assert model.fc_aux.weight.grad is None  # type: ignore[union-attr]


def test_spatial_backbone_output_is_flattened() -> None:
    model = DualHeadClassifier(nn.Conv2d(3, 2, 3), feature_dim=2 * 2 * 2, num_classes=C).eval()
    out = model.forward_heads(torch.randn(N, 3, 4, 4))
    assert out.features.shape == (N, 8) and out.logits.shape == (N, C)


def test_feature_projector_structure_and_shapes() -> None:
    proj = FeatureProjector(7, 12)
    assert isinstance(proj.norm, nn.BatchNorm1d) and proj.norm.num_features == 7
    assert proj.dropout.p == pytest.approx(0.5)
    assert proj.linear.in_features == 7 and proj.linear.out_features == 12
    assert proj(torch.randn(N, 7)).shape == (N, 12)
    proj.eval()
    x = torch.randn(N, 7)
    expected = proj.linear(proj.norm(x))  # dropout is the identity in eval mode
    torch.testing.assert_close(proj(x), expected)
    assert FeatureProjector(3, 4, dropout=0.0).dropout.p == 0.0


def test_projector_feeds_nd_loss_with_gradients() -> None:
    proj = FeatureProjector(7, 12).train()
    student, teacher, means = torch.randn(N, 7), torch.randn(N, 12), torch.randn(3, 12)
    loss = NDLoss()(proj(student), teacher, means, torch.randint(0, 3, (N,)))
    loss.backward()
    assert all(p.grad is not None for p in proj.parameters())


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: _model("conv"), r"`auxiliary` must be 'linear' or 'mlp'"),
        (lambda: DualHeadClassifier(nn.Identity(), 0, C), r"`feature_dim` must be a positive integer"),
        (lambda: DualHeadClassifier(nn.Identity(), D, 0), r"`num_classes` must be a positive integer"),
        (lambda: _model("mlp", hidden_dim=-3), r"`hidden_dim` must be a positive integer"),
        (lambda: _model("mlp", dropout=1.0), r"`dropout` must lie in \[0, 1\)"),
        (lambda: FeatureProjector(0, 4), r"`in_features` must be a positive integer"),
        (lambda: FeatureProjector(4, 4, dropout=-0.1), r"`dropout` must lie in \[0, 1\)"),
    ],
)
def test_bad_configuration_is_rejected(factory: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()  # type: ignore[operator]


def test_wrong_feature_width_is_reported() -> None:
    model = DualHeadClassifier(nn.Linear(8, 4), feature_dim=D, num_classes=C)
    with pytest.raises(ValueError, match=r"features of shape \(6, 4\), expected \(N, 10\).*feature_dim"):
        model(torch.randn(N, 8))
    with pytest.raises(ValueError, match=r"expects features of shape \(N, 7\)"):
        FeatureProjector(7, 3)(torch.randn(N, 5))

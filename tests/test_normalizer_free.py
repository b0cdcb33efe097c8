"""The normalizer-free recipe (Brock et al. 2021): scaled weight-standardized convolutions, the
activations' gains and adaptive gradient clipping, against their equations by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normbench.module import NormBenchModule
from normbench.nets import SeedCNN
from normbench.norms import GammaActivation, ScaledWSConv2d, activation_gain, adaptive_clip_grad, create_norm


def test_scaled_ws_is_gain_times_the_fan_in_scaled_standardized_weight():
    torch.manual_seed(0)
    conv = ScaledWSConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.gain.copy_(torch.rand(4, 1, 1, 1) + 0.5)
    w = conv.weight.detach()
    n = 3 * 3 * 3
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased, as the paper's
    by_hand = conv.gain.detach() * (w - mean) / torch.sqrt(torch.clamp(n * var, min=1e-4))
    torch.testing.assert_close(conv.standardized_weight(), by_hand)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, by_hand, conv.bias, padding=1))
    # Each filter has zero mean and a sum of squares of gain^2 (variance 1 / fan-in).
    std = conv.standardized_weight().detach() / conv.gain.detach()
    torch.testing.assert_close(std.sum(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close((std**2).sum(dim=(1, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)


def test_relus_gain_is_the_papers_closed_form_and_gains_keep_unit_variance():
    assert activation_gain(nn.ReLU()) == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-8)
    torch.manual_seed(0)
    z = torch.randn(2_000_000, dtype=torch.float64)
    for act in (nn.GELU(), nn.Sigmoid(), nn.Tanh(), nn.SiLU(inplace=True), nn.ELU(inplace=True)):
        # An in-place activation's gain too: computing it must not overwrite its own grid.
        assert GammaActivation(act)(z.clone()).std().item() == pytest.approx(1.0, abs=3e-3), act


def test_agc_scales_each_unit_to_lambda_times_its_weight_norm():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, 2, 2))
    b = nn.Parameter(torch.zeros(4))  # a zero weight: its norm floors at eps
    w.grad, b.grad = torch.randn(4, 3, 2, 2), torch.randn(4)
    w.grad[0] *= 1e-4  # a unit already within the limit keeps its gradient
    before_w, before_b = w.grad.clone(), b.grad.clone()
    adaptive_clip_grad([w, b], 0.01)
    for i in range(4):
        w_norm, g_norm = w[i].detach().norm(), before_w[i].norm()
        limit = 0.01 * max(w_norm.item(), 1e-3)
        expected = before_w[i] * (limit / g_norm) if g_norm > limit else before_w[i]
        torch.testing.assert_close(w.grad[i], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(w.grad[0], before_w[0], rtol=0, atol=0)
    # Relative: the clipped entries are about 1e-5, within assert_close's default atol of zero.
    torch.testing.assert_close(b.grad, before_b * (0.01 * 1e-3 / before_b.norm()), rtol=1e-5, atol=0)


def test_the_recipe_builds_as_a_config_and_clips_all_but_the_head():
    model = NormBenchModule(norm="none", weight_standardization="scaled", agc=0.01, in_channels=1, width=8,
                            num_blocks=2)  # fmt: skip
    assert isinstance(model.net.blocks[0].conv, ScaledWSConv2d) and isinstance(model.net.blocks[0].act, GammaActivation)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    head = model.net.fc.weight.grad.clone()
    model.configure_gradient_clipping(torch.optim.SGD(model.parameters(), lr=0.1))
    torch.testing.assert_close(model.net.fc.weight.grad, head)
    for p in model.net.blocks.parameters():
        if p.dim() > 1:
            ratio = p.grad.flatten(1).norm(dim=1) / p.detach().flatten(1).norm(dim=1).clamp_min(1e-3)
            assert (ratio <= 0.01 + 1e-6).all()


def test_resnet_refuses_the_recipe_without_residual_scaling():
    with pytest.raises(ValueError, match="residual branches need NF-ResNet's alpha and beta scaling"):
        NormBenchModule(norm="none", net="resnet", weight_standardization="scaled")
    assert SeedCNN(lambda c: create_norm("none", c), weight_standardization="scaled")

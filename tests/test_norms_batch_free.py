"""The batch-free layers of study 3 against independent computations: Dynamic Tanh against its
paper's formula and code, RMSNorm against torch's own ``F.rms_norm`` over the channels, and
frozen_bn against torchvision's ``FrozenBatchNorm2d``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from normbench.norms import create_norm, tracks_running_stats, update_bn_stats

C = 6
SHAPES = [(5, C), (5, C, 7), (5, C, 4, 3)]


def sample(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2 + 0.7


def randomized(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return layer


class PaperDynamicTanh(nn.Module):
    """DyT as the paper's code writes it (Zhu et al. 2025, dynamic_tanh.py), channels first."""

    def __init__(self, normalized_shape, alpha_init_value=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1) * alpha_init_value)
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x):
        x = torch.tanh(self.alpha * x)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def test_dyt_has_the_papers_parameters_and_initialisation():
    layer = create_norm("dyt", C)
    assert dict(layer.named_parameters()).keys() == {"alpha", "weight", "bias"}
    assert layer.alpha.shape == (1,) and layer.alpha.item() == 0.5
    assert torch.equal(layer.weight, torch.ones(C)) and torch.equal(layer.bias, torch.zeros(C))
    assert not list(layer.buffers())
    assert create_norm("dyt", C, alpha_init_value=2.0).alpha.item() == 2.0


@pytest.mark.parametrize("shape", SHAPES)
def test_dyt_is_weight_tanh_alpha_x_plus_bias(shape):
    layer = randomized(create_norm("dyt", C))
    x = sample(*shape).requires_grad_()
    y = layer(x)
    view = (1, C) + (1,) * (len(shape) - 2)
    expected = layer.weight.detach().view(view) * torch.tanh(
        layer.alpha.detach() * x.detach()
    ) + layer.bias.detach().view(view)
    torch.testing.assert_close(y, expected)
    # d/d alpha of sum(y * u) = sum(u * weight * x * (1 - tanh^2(alpha x))), by hand.
    u = sample(*shape, seed=2)
    (y * u).sum().backward()
    t = torch.tanh(layer.alpha.detach() * x.detach())
    by_hand = (u * layer.weight.detach().view(view) * x.detach() * (1 - t**2)).sum()
    torch.testing.assert_close(layer.alpha.grad, by_hand.reshape(1))


def test_dyt_equals_the_papers_code_on_images():
    ours, theirs = randomized(create_norm("dyt", C)), PaperDynamicTanh(C)
    theirs.load_state_dict(ours.state_dict())
    x = sample(4, C, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_is_torchs_rms_norm_over_the_channels(shape):
    layer = randomized(create_norm("rmsnorm", C, eps=1e-6))
    x = sample(*shape)
    expected = F.rms_norm(x.movedim(1, -1), (C,), layer.weight.detach(), eps=1e-6).movedim(-1, 1)
    torch.testing.assert_close(layer(x), expected)
    # timm's RmsNorm2d: x * rsqrt(mean_C(x^2) + eps) * weight, no mean taken out, no bias.
    assert dict(layer.named_parameters()).keys() == {"weight"} and layer.eps == 1e-6
    assert create_norm("rmsnorm", C).eps == 1e-6 and create_norm("rmsnorm", C, affine=False).weight is None


def _trained_bn_state():
    bn = nn.BatchNorm2d(C)
    bn.train()
    for seed in range(3):
        bn(sample(8, C, 3, 3, seed=seed))
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
    return bn.state_dict()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_frozen_bn_equals_torchvisions_in_every_mode_and_updates_nothing(mode):
    state = _trained_bn_state()
    ours, theirs = create_norm("frozen_bn", C), FrozenBatchNorm2d(C)
    ours.load_state_dict(dict(state))
    theirs.load_state_dict(dict(state))
    getattr(ours, mode)()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = sample(4, C, 5, 5).requires_grad_()
    y = ours(x)
    torch.testing.assert_close(y, theirs(x.detach()))
    y.sum().backward()
    assert not list(ours.parameters()) and x.grad is not None
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    assert ours.state_dict().keys() == {"weight", "bias", "running_mean", "running_var"}


def test_frozen_bn_takes_any_n_c_star_input_and_is_left_alone_by_precise_bn():
    layer = create_norm("frozen_bn", C)
    layer.load_state_dict(dict(_trained_bn_state()))
    x = sample(5, C, 7)
    scale = layer.weight / (layer.running_var + layer.eps).sqrt()
    torch.testing.assert_close(layer(x), x * scale[:, None] + (layer.bias - layer.running_mean * scale)[:, None])
    assert not tracks_running_stats(layer)
    model = nn.Sequential(layer)
    before = layer.running_mean.clone()
    update_bn_stats(model, [sample(4, C, 7, seed=s) for s in range(3)])
    assert torch.equal(layer.running_mean, before)


@pytest.mark.parametrize("name", ["dyt", "rmsnorm", "frozen_bn"])
def test_batch_free_layers_treat_each_sample_alone(name):
    layer = randomized(create_norm(name, C)).train()
    x = sample(6, C, 4, 4)
    torch.testing.assert_close(layer(x)[2:3], layer(x[2:3]))

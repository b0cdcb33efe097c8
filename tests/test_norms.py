"""Every norm layer against an independent computation: torch's own layers where they exist,
the papers' equations written out in plain torch where they don't."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import (
    NORMS,
    BatchRenorm,
    NormName,
    WSConv2d,
    create_norm,
    tracks_running_stats,
    update_bn_stats,
)

C = 8
# Options that let every registered norm run on C channels.
KWARGS = {"gn": {"num_groups": 4}, "evonorm_s0": {"num_groups": 4}, "ghost_bn": {"virtual_batch_size": 4}}
STAT_NORMS = ["bn", "bnrs", "brn", "ghost_bn", "evonorm_b0"]
BATCH_FREE = ["gn", "ln", "in", "frn", "evonorm_s0"]


def make(name, c=C, **kwargs):
    torch.manual_seed(0)
    layer = create_norm(name, c, **{**KWARGS.get(name, {}), **kwargs})
    # Non-trivial affine parameters, so that gamma and beta are tested too.
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if pname in ("weight", "v1") else torch.randn_like(p) * 0.3)
    return layer


def sample(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * 2 + 0.7).requires_grad_()


def run(layer, x, upstream):
    """Forward, backward against a fixed upstream gradient; returns output and input grad."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad


def bshape(x):
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_layer_and_literal_matches():
    assert sorted(NORMS) == sorted(
        [
            "bn",
            "bnrs",
            "brn",
            "ghost_bn",
            "gn",
            "ln",
            "in",
            "frn",
            "evonorm_b0",
            "evonorm_s0",
            "dyt",
            "rmsnorm",
            "frozen_bn",
            "none",
        ]
    )
    assert set(NormName.__args__) == set(NORMS)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*bn, bnrs, brn"):
        create_norm("batchnorm", C)


@pytest.mark.parametrize("name", ["gn", "evonorm_s0"])
def test_groups_must_divide_channels(name):
    with pytest.raises(ValueError, match=r"num_groups=32 does not divide num_features=48.*\[1, 2, 3, 4, 6, 8"):
        create_norm(name, 48)
    assert create_norm("gn", 64).num_groups == 32  # the paper's default


@pytest.mark.parametrize("kwargs, msg", [({"r_max": 0.5}, "r_max=0.5 must be >= 1"), ({"d_max": -1}, "d_max=-1")])
def test_brn_rejects_bad_limits(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        create_norm("brn", C, **kwargs)


# --------------------------------------------------------------------------- equal to torch


@pytest.mark.parametrize(
    "shape, ref_cls", [((6, C, 5, 4), nn.BatchNorm2d), ((6, C), nn.BatchNorm1d), ((6, C, 7), nn.BatchNorm1d)]
)
def test_bn_equals_torch_batchnorm(shape, ref_cls):
    ours, ref = make("bn"), ref_cls(C)
    ref.load_state_dict(ours.state_dict())
    for step in range(3):
        x, up = sample(*shape, seed=step), sample(*shape, seed=10 + step).detach()
        ours.zero_grad(), ref.zero_grad()
        (y1, g1), (y2, g2) = run(ours, x, up), run(ref, x, up)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(g1, g2)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("shape, ref_cls", [((6, C, 5, 4), nn.BatchNorm2d), ((6, C), nn.BatchNorm1d)])
def test_bn_with_a_cumulative_average_equals_torch(shape, ref_cls):
    # momentum=None: running statistics as the plain average over the batches so far (its own
    # code path: 1 / num_batches_tracked as a device tensor), against torch's.
    ours, ref = make("bn", momentum=None), ref_cls(C, momentum=None)
    ref.load_state_dict(ours.state_dict())
    for step in range(4):
        x = sample(*shape, seed=step) * (1 + step)  # statistics that move, so that the average shows
        torch.testing.assert_close(ours(x), ref(x))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def _torch_twin(name, layer, x):
    if name == "gn":
        ref = nn.GroupNorm(4, C)
        ref.load_state_dict(layer.state_dict())
    elif name == "ln":
        ref = nn.LayerNorm(x.shape[1:])
        with torch.no_grad():
            ref.weight.copy_(layer.weight.reshape(bshape(x)[1:]).expand(x.shape[1:]))
            ref.bias.copy_(layer.bias.reshape(bshape(x)[1:]).expand(x.shape[1:]))
    else:
        ref = nn.InstanceNorm2d(C, affine=True)
        ref.load_state_dict(layer.state_dict())
    return ref


@pytest.mark.parametrize("name", ["gn", "ln", "in"])
def test_gn_ln_in_equal_torch(name):
    layer, x = make(name), sample(4, C, 5, 6)
    ref = _torch_twin(name, layer, x)
    up = sample(*x.shape, seed=3).detach()
    for mode in (True, False):
        layer.train(mode), ref.train(mode)
        layer.zero_grad(), ref.zero_grad()
        (y1, g1), (y2, g2) = run(layer, x, up), run(ref, x, up)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(g1, g2)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad.reshape(C, -1).sum(1))
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad.reshape(C, -1).sum(1))
    assert not list(layer.buffers()) and not list(ref.buffers())


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_gn_matches_its_equations(groups):
    # Wu & He 2018, Eq. 1-3: per sample, each group of C/G contiguous channels by its own mean
    # and biased variance over (C/G, H, W), then a per-channel gamma and beta.
    layer, x = make("gn", num_groups=groups), sample(3, C, 5, 6, dtype=torch.float64)
    layer.double()
    xg = x.detach().reshape(3, groups, -1)
    mu, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    x_hat = ((xg - mu) / (var + layer.eps).sqrt()).reshape(x.shape)
    torch.testing.assert_close(layer(x), x_hat * layer.weight.reshape(bshape(x)) + layer.bias.reshape(bshape(x)))


# --------------------------------------------------------------------------- bnrs


def test_bnrs_normalizes_by_running_stats_and_updates_after():
    layer = make("bnrs")
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(C))
        layer.running_var.copy_(torch.rand(C) + 0.5)
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    x, up = sample(6, C, 4, 4), sample(6, C, 4, 4, seed=5).detach()
    y, gx = run(layer, x, up)
    s = (var + layer.eps).sqrt().reshape(bshape(x))
    w, b = layer.weight.detach().reshape(bshape(x)), layer.bias.detach().reshape(bshape(x))
    torch.testing.assert_close(y, w * (x.detach() - mu.reshape(bshape(x))) / s + b)
    # No gradient through the batch statistics: dy/dx = gamma / sigma_running.
    torch.testing.assert_close(gx, w / s * up)
    # This batch updated the statistics after normalizing, as torch's BatchNorm would.
    xd = x.detach()
    torch.testing.assert_close(layer.running_mean, 0.9 * mu + 0.1 * xd.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.9 * var + 0.1 * xd.var((0, 2, 3), unbiased=True))
    assert int(layer.num_batches_tracked) == 1


# --------------------------------------------------------------------------- brn


def test_brn_with_unit_limits_is_batchnorm():
    ours = make("brn", r_max=1.0, d_max=0.0, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    ref = nn.BatchNorm2d(C)
    ref.load_state_dict(ours.state_dict())
    for step in range(4):
        x, up = sample(5, C, 3, 3, seed=step), sample(5, C, 3, 3, seed=20 + step).detach()
        ours.zero_grad(), ref.zero_grad()
        (y1, g1), (y2, g2) = run(ours, x, up), run(ref, x, up)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(g1, g2)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(ref, key))


def test_brn_warmup_is_batchnorm_then_limits_open():
    ours = make("brn")  # defaults: 200 warm-up steps with r_max = 1, d_max = 0
    ref = nn.BatchNorm2d(C)
    ref.load_state_dict(ours.state_dict())
    x, up = sample(5, C, 3, 3), sample(5, C, 3, 3, seed=9).detach()
    torch.testing.assert_close(run(ours, x, up), run(ref, x, up))


def test_brn_loose_limits_normalize_by_running_stats():
    layer = make("brn", r_max=1e6, d_max=1e6, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    bnrs = make("bnrs")
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(C))
        layer.running_var.copy_(torch.rand(C) + 0.5)
    bnrs.load_state_dict(layer.state_dict())
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    x = sample(6, C, 4, 4, dtype=torch.float64)
    layer.double(), bnrs.double()
    y = layer(x)
    expected = (x - mu.double().reshape(bshape(x))) / (var.double() + layer.eps).sqrt().reshape(bshape(x))
    expected = expected * layer.weight.reshape(bshape(x)) + layer.bias.reshape(bshape(x))
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, bnrs(x))


def _algorithm1(x, weight, bias, mu, var, eps, r_max, d_max, upstream):
    """Batch Renorm forward and backward written out from Ioffe 2017, Algorithm 1 and the
    backward formulas of Sec. 3, per channel, without autograd."""
    dims = (0, 2, 3)
    m = x.numel() // x.shape[1]
    sh = bshape(x)
    mu_b = x.mean(dims)
    sigma_b = (((x - mu_b.reshape(sh)) ** 2).mean(dims) + eps).sqrt()
    sigma = (var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((mu_b - mu) / sigma).clamp(-d_max, d_max)
    x_hat = (x - mu_b.reshape(sh)) / sigma_b.reshape(sh) * r.reshape(sh) + d.reshape(sh)
    y = weight.reshape(sh) * x_hat + bias.reshape(sh)
    dx_hat = upstream * weight.reshape(sh)
    dsigma_b = (dx_hat * (x - mu_b.reshape(sh)) * (-r / sigma_b**2).reshape(sh)).sum(dims)
    dmu_b = (dx_hat * (-r / sigma_b).reshape(sh)).sum(dims)
    dx = (
        dx_hat * (r / sigma_b).reshape(sh)
        + dsigma_b.reshape(sh) * (x - mu_b.reshape(sh)) / (m * sigma_b.reshape(sh))
        + dmu_b.reshape(sh) / m
    )
    dweight = (upstream * x_hat).sum(dims)
    dbias = upstream.sum(dims)
    return y, dx, dweight, dbias, r, d


def test_brn_gradients_with_clipping_match_algorithm_1():
    r_max, d_max = 1.5, 0.5
    layer = make("brn", r_max=r_max, d_max=d_max, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-2, 2, C))
        layer.running_var.copy_(torch.linspace(0.2, 12, C))
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    x = sample(6, C, 3, 3, dtype=torch.float64)
    up = sample(6, C, 3, 3, dtype=torch.float64, seed=4).detach()
    y, dx = run(layer, x, up)
    y_ref, dx_ref, dw_ref, db_ref, r, d = _algorithm1(
        x.detach(), layer.weight.detach(), layer.bias.detach(), mu, var, layer.eps, r_max, d_max, up
    )
    # Clipping is really active, in both directions for r and on d.
    assert (r == r_max).any() and (r == 1 / r_max).any() and (d.abs() == d_max).any()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(layer.weight.grad, dw_ref)
    torch.testing.assert_close(layer.bias.grad, db_ref)
    # The running statistics are updated after r and d, with this batch's moments.
    xd = x.detach()
    torch.testing.assert_close(layer.running_mean, 0.9 * mu + 0.1 * xd.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.9 * var + 0.1 * xd.var((0, 2, 3), unbiased=True))


def test_brn_schedule_follows_num_batches_tracked():
    layer = BatchRenorm(C, r_max=3, d_max=5, warmup_steps=4, r_max_ramp_steps=8, d_max_ramp_steps=2)
    expected = {0: (1, 0), 3: (1, 0), 4: (1, 0), 5: (1.25, 2.5), 6: (1.5, 5), 8: (2, 5), 12: (3, 5), 50: (3, 5)}
    for t, (r, d) in expected.items():
        layer.num_batches_tracked.fill_(t)
        r_max, d_max = layer.current_limits()
        assert (float(r_max), float(d_max)) == pytest.approx((r, d)), t
    # The step count travels with the checkpoint.
    fresh = BatchRenorm(C, r_max=3, d_max=5, warmup_steps=4, r_max_ramp_steps=8, d_max_ramp_steps=2)
    fresh.load_state_dict(layer.state_dict())
    assert float(fresh.current_limits()[0]) == 3
    zero = BatchRenorm(C, r_max=3, d_max=5, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    assert [float(v) for v in zero.current_limits()] == [3, 5]


def test_brn_training_loop_counts_steps():
    layer = make("brn", warmup_steps=2, r_max_ramp_steps=0, d_max_ramp_steps=0)
    for _ in range(3):
        layer(sample(4, C, 2, 2))
    assert int(layer.num_batches_tracked) == 3 and float(layer.current_limits()[0]) == 3


# --------------------------------------------------------------------------- ghost bn


def test_ghost_bn_equals_bn_on_each_virtual_batch():
    ours = make("ghost_bn", virtual_batch_size=4)
    ref = nn.BatchNorm2d(C)
    ref.load_state_dict(ours.state_dict())
    for step in range(2):
        x, up = sample(10, C, 3, 3, seed=step), sample(10, C, 3, 3, seed=7 + step).detach()
        ours.zero_grad(), ref.zero_grad()
        y, gx = run(ours, x, up)
        xr = x.detach().clone().requires_grad_()
        y_ref = torch.cat([ref(chunk) for chunk in xr.split(4)])  # 4 + 4 + 2 samples
        (y_ref * up).sum().backward()
        torch.testing.assert_close(y, y_ref.detach())
        torch.testing.assert_close(gx, xr.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(ref, key))


# --------------------------------------------------------------------------- other papers' equations


def test_frn_matches_equations():
    layer, x = make("frn"), sample(3, C, 5, 5)
    nu2 = x.detach().pow(2).mean((2, 3), keepdim=True)
    y = layer.weight.reshape(bshape(x)) * x.detach() / (nu2 + 1e-6).sqrt() + layer.bias.reshape(bshape(x))
    torch.testing.assert_close(layer(x), torch.max(y, layer.tau.reshape(bshape(x))))
    # An (N, C) input: nu^2 = x^2 per value (the paper's Sec. 3.1 case for a learned eps).
    x2 = sample(4, C)
    y2 = layer.weight * x2.detach() / (x2.detach().square() + 1e-6).sqrt() + layer.bias
    torch.testing.assert_close(layer(x2), torch.max(y2, layer.tau))
    # A learned eps enters as |eps| (the paper's code).
    learned = make("frn", learnable_eps=True)
    with torch.no_grad():
        learned.eps_l.fill_(-0.3)
    y2 = learned.weight * x2.detach() / (x2.detach().square() + 0.3).sqrt() + learned.bias
    torch.testing.assert_close(learned(x2), torch.max(y2, learned.tau))


def test_frn_learned_eps_starts_at_eps_and_learns():
    # Started at 0, |eps| would have gradient 0 and never move: it starts at eps, and its
    # gradient is d/d eps of the output, here by finite differences in float64.
    layer = create_norm("frn", C, learnable_eps=True, eps=1e-3).double()
    assert layer.eps_l.item() == pytest.approx(1e-3)
    x = sample(4, C, dtype=torch.float64).detach() * 0.05  # small values, where eps matters
    up = sample(4, C, dtype=torch.float64, seed=5).detach()
    (layer(x) * up).sum().backward()

    def out(eps):
        with torch.no_grad():
            y = layer.weight * x / (x.square() + eps).sqrt() + layer.bias
            return (torch.max(y, layer.tau) * up).sum().item()

    h = 1e-7
    numeric = (out(1e-3 + h) - out(1e-3 - h)) / (2 * h)
    assert layer.eps_l.grad.item() == pytest.approx(numeric, rel=1e-5) and numeric != 0
    before = layer.eps_l.item()
    torch.optim.SGD(layer.parameters(), lr=1e-4).step()
    assert layer.eps_l.item() != before


@pytest.mark.parametrize("name", [n for n in NORMS if n != "none"])
def test_a_wrong_channel_count_is_refused_not_broadcast(name):
    # One channel where the layer has C: broadcasting its (1, C, 1, 1) parameters would return C
    # channels of nonsense (frn did).
    with pytest.raises((ValueError, RuntimeError)):
        make(name)(sample(2, 1, 4, 4).detach())


def test_evonorm_b0_matches_equation():
    layer, x = make("evonorm_b0"), sample(4, C, 5, 5, dtype=torch.float64)
    layer.double()
    sh, xd = bshape(x), x.detach()
    v1, w, b, eps = layer.v1.reshape(sh), layer.weight.reshape(sh), layer.bias.reshape(sh), layer.eps
    batch_std = (xd.var((0, 2, 3), unbiased=False) + eps).sqrt().reshape(sh)
    inst_std = (xd.var((2, 3), unbiased=False, keepdim=True) + eps).sqrt()
    expected = xd / torch.max(batch_std, v1 * xd + inst_std) * w + b
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * xd.var((0, 2, 3), unbiased=True))
    layer.eval()
    eval_std = (layer.running_var + eps).sqrt().reshape(sh)
    torch.testing.assert_close(layer(x), xd / torch.max(eval_std, v1 * xd + inst_std) * w + b)


def test_evonorm_s0_matches_equation():
    layer, x = make("evonorm_s0"), sample(3, C, 4, 4, dtype=torch.float64)
    layer.double()
    sh, xd = bshape(x), x.detach()
    group_std = (xd.reshape(3, 4, -1).var(2, unbiased=False) + layer.eps).sqrt()  # (N, G)
    std = group_std.repeat_interleave(C // 4, dim=1).reshape(3, C, 1, 1)
    expected = xd * torch.sigmoid(layer.v1.reshape(sh) * xd) / std * layer.weight.reshape(sh) + layer.bias.reshape(sh)
    torch.testing.assert_close(layer(x), expected)


def test_weight_standardized_conv():
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach()
    flat = w.reshape(5, -1)
    w_hat = ((flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()).view_as(w)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, padding=1))
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- properties of all


@pytest.mark.parametrize("name", BATCH_FREE)
def test_batch_independent_norms(name):
    layer, x = make(name), sample(5, C, 4, 4)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("name", STAT_NORMS)
def test_eval_uses_running_stats_and_never_updates(name):
    layer = make(name)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(C))
        layer.running_var.copy_(torch.rand(C) + 0.5)
    before = copy.deepcopy(layer.state_dict())
    layer.eval()
    x = sample(2, C, 3, 3)
    with torch.no_grad():
        y, y_other = layer(x), layer(torch.cat([x, sample(7, C, 3, 3, seed=8)]))[:2]
    for key, value in before.items():
        torch.testing.assert_close(layer.state_dict()[key], value)
    torch.testing.assert_close(y, y_other)  # the rest of the batch no longer matters
    if name != "evonorm_b0":
        sh = bshape(x)
        expected = (x.detach() - layer.running_mean.reshape(sh)) / (layer.running_var.reshape(sh) + layer.eps).sqrt()
        torch.testing.assert_close(y, expected * layer.weight.reshape(sh) + layer.bias.reshape(sh))


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_norm_trains_evaluates_and_round_trips(name, batch_size):
    layer = make(name)
    x = sample(batch_size, C, 4, 4)
    y = layer(x)
    (y * sample(*y.shape, seed=2).detach()).sum().backward()
    assert y.shape == x.shape and y.isfinite().all() and x.grad.isfinite().all()
    assert all(p.grad is None or p.grad.isfinite().all() for p in layer.parameters())
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    assert y_eval.isfinite().all()
    fresh = create_norm(name, C, **KWARGS.get(name, {}))
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x.detach()), y_eval)


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("shape", [(4, C), (4, C, 6), (4, C, 3, 3), (4, C, 2, 2, 2)])
def test_every_norm_takes_any_rank(name, shape):
    layer = make(name)
    y = layer(sample(*shape))
    assert y.shape == shape and y.isfinite().all()


# --------------------------------------------------------------------------- PreciseBN


# brn with its r and d limits still ramping during the calibration batches: a step count that
# moved during recalibration would change them.
PRECISE_KWARGS = {"brn": {"warmup_steps": 0, "r_max_ramp_steps": 8, "d_max_ramp_steps": 8, "r_max": 1.5, "d_max": 0.5}}


class TwoLayer(nn.Module):
    def __init__(self, name):
        super().__init__()
        options = PRECISE_KWARGS.get(name, {})
        self.conv1, self.norm1 = nn.Conv2d(3, C, 3, padding=1), make(name, **options)
        self.conv2, self.norm2 = nn.Conv2d(C, C, 3, padding=1), make(name, **options)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


@pytest.mark.parametrize("name", STAT_NORMS)
def test_precise_bn_gives_exact_population_statistics(name):
    torch.manual_seed(0)
    model = TwoLayer(name)
    for _ in range(3):  # some training, so running stats and brn's step count are not fresh
        model(torch.randn(8, 3, 6, 6) + 1)
    model.eval()
    batches = [(torch.randn(8, 3, 6, 6) * 1.5 + 2, torch.zeros(8)) for _ in range(5)]

    # Independent: a copy whose statistics are frozen and whose step counts are put back before
    # every batch, run in training mode, one layer at a time in depth order: each layer's inputs
    # are stored and concatenated, population moments by torch.mean / torch.var, and set in the
    # copy before the next layer's inputs are taken (bnrs and brn read them in training).
    twin = copy.deepcopy(model).train()
    for m in twin.modules():
        if tracks_running_stats(m):
            m.momentum = 0.0
    steps = {n: int(m.num_batches_tracked) for n, m in model.named_modules() if tracks_running_stats(m)}
    expected = {}
    for key in ("norm1", "norm2"):
        inputs = []
        hook = getattr(twin, key).register_forward_pre_hook(lambda m, a, inputs=inputs: inputs.append(a[0].detach()))
        with torch.no_grad():
            for x, _ in batches[:4]:
                for n, m in twin.named_modules():
                    if n in steps:
                        m.num_batches_tracked.fill_(steps[n])
                twin(x)
        hook.remove()
        flat = torch.cat(inputs).transpose(0, 1).reshape(C, -1).double()
        expected[key] = (flat.mean(1).float(), flat.var(1, unbiased=True).float())
        getattr(twin, key).running_mean.copy_(expected[key][0])
        getattr(twin, key).running_var.copy_(expected[key][1])

    momenta = {n: m.momentum for n, m in model.named_modules() if tracks_running_stats(m)}
    assert update_bn_stats(model, batches, num_batches=4) == 4
    for key, (mean, var) in expected.items():
        layer = getattr(model, key)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-5, msg=f"{name} {key} mean")
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-5, msg=f"{name} {key} var")
    # Everything it touched is back.
    assert not model.training and not any(m.training for m in model.modules())
    assert {n: m.momentum for n, m in model.named_modules() if tracks_running_stats(m)} == momenta
    assert {n: int(m.num_batches_tracked) for n, m in model.named_modules() if tracks_running_stats(m)} == steps
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_precise_bn_takes_a_one_shot_iterator_of_batches():
    torch.manual_seed(0)
    model = TwoLayer("bnrs").eval()
    twin = copy.deepcopy(model)
    batches = [(torch.randn(8, 3, 6, 6) + 1, None) for _ in range(3)]
    assert update_bn_stats(model, iter(batches), num_batches=3) == 3  # a layer-by-layer pass per layer
    update_bn_stats(twin, batches, num_batches=3)
    torch.testing.assert_close(model.norm2.running_var, twin.norm2.running_var)


def test_precise_bn_restores_state_when_forward_fails():
    model = TwoLayer("bn").eval()

    def broken(m, batch):
        m(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        update_bn_stats(model, [(torch.randn(4, 3, 5, 5), None)], forward=broken)
    assert not model.training and model.norm1.momentum == 0.1 and not model.norm1._forward_pre_hooks


@pytest.mark.parametrize("name", STAT_NORMS + BATCH_FREE)
def test_bf16_autocast_keeps_statistics_in_float32(name):
    # Under --trainer.precision bf16-mixed a norm gets a bfloat16 input; torch's BatchNorm keeps
    # its statistics in float32, and so must every layer here.
    torch.manual_seed(0)
    conv, layer = nn.Conv2d(3, C, 3), make(name)
    x = torch.randn(6, 3, 8, 8) + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        y = layer(features)
    assert features.dtype == torch.bfloat16 and y.isfinite().all()
    y.float().sum().backward()
    if tracks_running_stats(layer):
        reference = make(name)
        reference(features.detach().float())  # the same bf16 features, in float32
        for key in ("running_mean", "running_var"):
            buffer = getattr(layer, key)
            assert buffer.dtype == torch.float32
            torch.testing.assert_close(buffer, getattr(reference, key), rtol=1e-4, atol=1e-5)


# Every norm of the registry, plain and through NormBatch (the norms that take a norm batch).
EVERY = [(n, None) for n in NORMS] + [(n, 2) for n in ("bn", "bnrs", "brn")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("name", "norm_batch"), EVERY, ids=[f"{n}-nb{b}" for n, b in EVERY])
def test_every_norm_puts_out_its_inputs_dtype(name, norm_batch, dtype):
    # --trainer.precision bf16-true, 16-true, 64-true: the layer, its input and what follows it
    # in one dtype, as torch's BatchNorm returns its input's dtype (a float32 output here was the
    # next conv's "Input type (float) and bias type (c10::BFloat16)"). The values: those of the
    # float64 layer on the same (rounded) input, to the dtype's rounding.
    from normbench.norms.norm_batch import norm_batch_factory

    if norm_batch:
        torch.manual_seed(0)
        layer = norm_batch_factory(name, norm_batch, KWARGS.get(name, {}))(C)
    else:
        layer = make(name)  # with non-trivial affine parameters
    reference = copy.deepcopy(layer).double()
    layer.to(dtype)
    x = sample(6, C, 5, 5, dtype=torch.float64).detach().to(dtype)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        reference.train(mode == "train")
        y = layer(x)
        assert y.dtype == dtype, (mode, y.dtype)
        expected = reference(x.double())
        tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol, msg=f"{mode}")


def test_ghost_bn_statistics_stay_exact_far_from_zero():
    # A mean 1000 standard deviations from the running mean (0 at the first step): ghost batch
    # moments against float64 ones (Ioffe & Szegedy, Algorithm 1: the mean of squared deviations
    # from the batch mean). Sums of squares around the running mean cancelled here (output off
    # by 0.2).
    layer = make("ghost_bn", virtual_batch_size=4)
    x = sample(8, C, 3, 3) + 1000.0
    y = layer(x).detach().double()
    w, b = (p.detach().double().view(1, C, 1, 1) for p in (layer.weight, layer.bias))
    expected, var = [], torch.ones(C, dtype=torch.float64)
    for part in x.double().split(4):
        mean_b, var_b = part.mean((0, 2, 3), keepdim=True), part.var((0, 2, 3), unbiased=False, keepdim=True)
        expected.append((part - mean_b) / (var_b + 1e-5).sqrt() * w + b)
        var = 0.9 * var + 0.1 * part.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(y, torch.cat(expected), rtol=0, atol=2e-3)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-3, atol=0)


def test_ghost_bn_refuses_a_one_value_ghost_batch_as_torch_refuses_a_one_value_batch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(C)(torch.randn(1, C))
    layer = make("ghost_bn")  # ghost batches of 4: 5 samples leave a last ghost batch of 1
    running = layer.running_var.clone()
    with pytest.raises(ValueError, match="ghost_bn: expected more than 1 value per channel .* 1 sample"):
        layer(torch.randn(5, C))
    assert torch.equal(layer.running_var, running)
    layer(torch.randn(5, C, 2))  # one sample of 2 values per channel is a valid ghost batch
    layer(torch.randn(6, C))


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_option_is_checked_against_its_annotated_type(name):
    import inspect
    import typing

    hints = typing.get_type_hints(NORMS[name].__init__)
    options = [k for k in inspect.signature(NORMS[name]).parameters if k != "num_features" and k in hints]
    for option in options:
        with pytest.raises(TypeError, match=rf"^{name}: option {option}='abc' is of type str; expected "):
            create_norm(name, 8, **{option: "abc"})
        hint = hints[option]
        if float in typing.get_args(hint) or hint is float:
            assert create_norm(name, 64, **{option: 1}) is not None  # an int is a valid float
        if hint is int:
            with pytest.raises(TypeError, match="expected int"):
                create_norm(name, 8, **{option: True})  # a bool is not a count


@pytest.mark.parametrize(("options", "message"), [({"eps": 0}, "eps=0 must be > 0"), ({"eps": -1e-5}, "eps=-1e-05"),
                                                  ({"momentum": 1.5}, "momentum=1.5 must be in")])  # fmt: skip
def test_impossible_option_values_are_refused(options, message):
    for name in ("bn", "bnrs", "brn", "ghost_bn", "evonorm_b0"):
        with pytest.raises(ValueError, match=message):
            create_norm(name, 8, **options)
    with pytest.raises(ValueError, match="num_features=0"):
        create_norm("gn", 0, num_groups=1)

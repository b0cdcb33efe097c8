"""Packed runs: run k of a pack is the run trained alone with the same seed.

Exactness is shown with SGD with momentum for every norm. Adam is as elementwise, but it divides
by the root of the squared-gradient average, which blows float noise up to full steps where the
gradient is zero in exact arithmetic: the conv bias before a norm that subtracts the batch mean
(bn, brn, ghost_bn). Where no parameter has that property (gn, bnrs), Adam is checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normbench.loaders import InMemoryLoader, PackedLoader
from normbench.module import NormBenchModule
from normbench.nets import PackedRuns, packed_loss

SEEDS = (0, 1, 2)
STEPS = 6
KWARGS = {"brn": {"warmup_steps": 0, "r_max_ramp_steps": 0, "d_max_ramp_steps": 0, "r_max": 1.5, "d_max": 0.5},
          "gn": {"num_groups": 4}, "ghost_bn": {"virtual_batch_size": 4}}  # fmt: skip


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (64, 1, 10, 10), generator=g, dtype=torch.uint8), torch.randint(
        0, 10, (64,), generator=g
    )


def build(norm, seed):
    torch.manual_seed(seed)  # as seed_everything before the model is built
    # "bn:cumulative": bn with momentum None, a cumulative average of the batch statistics.
    norm, _, variant = norm.partition(":")
    kwargs = {**KWARGS.get(norm, {}), **({"momentum": None} if variant == "cumulative" else {})}
    # Same memory format alone and packed, so both run the same convolution kernels.
    return NormBenchModule(norm=norm, norm_kwargs=kwargs, width=8, num_blocks=2, in_channels=1,
                           channels_last=False).net  # fmt: skip


def loader(seed, images, targets):
    return InMemoryLoader(images, targets, 8, shuffle=True, mean=(0.5,), std=(0.5,), seed=seed)


def optimizer(name, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


CASES = [(n, "sgd") for n in ("bn", "brn", "bnrs", "ghost_bn", "gn", "evonorm_b0")] + [("gn", "adam"), ("bnrs", "adam")]
# momentum: null, whose cumulative factor torch's BatchNorm reads on the host (vmap cannot).
CASES += [("bn:cumulative", "sgd"), ("brn:cumulative", "sgd")]


@pytest.mark.parametrize("norm, opt_name", CASES)
def test_run_k_of_a_pack_equals_the_run_alone(norm, opt_name):
    images, targets = data()
    alone = []
    for seed in SEEDS:
        net = build(norm, seed)
        opt = optimizer(opt_name, net.parameters())
        batches = iter(loader(seed, images, targets))
        for _ in range(STEPS):
            x, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        alone.append(net.state_dict())

    packed = PackedRuns([build(norm, seed) for seed in SEEDS])
    opt = optimizer(opt_name, packed.parameters())
    batches = iter(PackedLoader([loader(seed, images, targets) for seed in SEEDS]))
    for _ in range(STEPS):
        x, y = next(batches)
        assert x.shape[:2] == (3, 8)
        opt.zero_grad()
        packed_loss(packed(x), y)[0].backward()
        opt.step()

    for k, reference in enumerate(alone):
        state = packed.run_state_dict(k)
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"run {k}, {key}")
    # The runs really differ from each other: nothing was shared.
    assert not torch.allclose(
        packed.run_state_dict(0)["blocks.0.conv.weight"], packed.run_state_dict(1)["blocks.0.conv.weight"]
    )
    # Evaluation on one shared batch gives each run its own logits.
    packed.eval()
    x = images[:5].float() / 255
    with torch.no_grad():
        shared = packed((x - 0.5) / 0.5, shared_input=True)
    for k, seed in enumerate(SEEDS):
        net = build(norm, seed)
        net.load_state_dict(alone[k])
        net.eval()
        torch.testing.assert_close(shared[k], net((x - 0.5) / 0.5), rtol=1e-4, atol=1e-5)


def test_packs_refuse_different_shapes():
    with pytest.raises(ValueError, match="same names and shapes"):
        PackedRuns([build("bn", 0), NormBenchModule(norm="bn", width=16, num_blocks=2, in_channels=1).net])

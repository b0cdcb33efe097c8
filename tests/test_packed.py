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
import yaml

from normbench.loaders import InMemoryLoader, PackedLoader
from normbench.module import NormBenchModule
from normbench.packed_runs import PackedRuns, packed_loss

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


def test_a_channels_last_pack_hands_vmap_only_tensors_of_the_default_layout():
    # vmap cannot answer a channels-last layout query (torch raises NYI, on CPU as on CUDA), and
    # cuDNN asks one of any input or weight whose per-run layout is channels-last: so a pack of
    # channels-last runs failed on CUDA. Every tensor the pack hands vmap is in the default layout.
    nets = [NormBenchModule(norm="bn", width=8, num_blocks=2, in_channels=3).net for _ in SEEDS]
    assert nets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the shipped default
    with pytest.raises(RuntimeError, match="is_contiguous inside of vmap"):
        torch.func.vmap(lambda t: torch.tensor(t.is_contiguous(memory_format=torch.channels_last)))(
            torch.stack([n.conv1.weight for n in nets])
        )
    packed = PackedRuns(nets)
    for name, tensor in [*zip(packed.param_names, packed.stacked), *packed._buffers_dict().items()]:
        assert all(tensor[k].is_contiguous() for k in range(len(SEEDS))), name
    seen = []
    x = torch.randn(len(SEEDS), 4, 3, 10, 10).contiguous(memory_format=torch.channels_last_3d)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous()) if isinstance(module, torch.nn.Conv2d) else None
    )
    try:
        packed(x)
    finally:
        handle.remove()
    assert seen[0]  # the input batch, given in another layout, reaches the first convolution plain


def test_a_pack_trains_again_after_lightning_restores_its_mode():
    # After validation Lightning sets each module's `training` flag back without calling train();
    # the pack's definition (outside the module tree) must train again all the same.
    images, _ = data()
    x = (images[:8].float() / 255).expand(len(SEEDS), -1, -1, -1, -1).contiguous()
    packed = PackedRuns([build("bn", seed) for seed in SEEDS])
    packed.eval()
    packed(x)
    for module in packed.modules():
        module.training = True  # as lightning.pytorch.utilities.model_helpers._ModuleMode.restore
    before = packed._buffers_dict()["blocks.0.norm.running_mean"].clone()
    packed(x)
    assert not torch.equal(packed._buffers_dict()["blocks.0.norm.running_mean"], before)  # batch statistics used


def test_a_diverging_packed_run_is_recorded_as_the_same_run_alone(fake_data, tmp_path):
    # Guards against fit_pack writing a diverged run's record at `diverged[k] + 1` steps
    # ("where it would have stopped alone"); `diverged[k]` passes every test (no test has a
    # packed run diverge). Independent: the same runs trained alone, whose global_step is
    # where the fit loop really stopped.
    from test_sweep import BASE, quick_overrides, records

    from normbench.main import main

    overrides = {**quick_overrides(fake_data), "model.norm": "none", "model.optimizer.init_args.lr": 1.0e30,
                 "trainer.max_epochs": 3, "trainer.limit_train_batches": 8}  # fmt: skip
    config = tmp_path / "div.yaml"
    config.write_text(yaml.safe_dump({"base": BASE, "overrides": overrides, "grid": {"seed_everything": [0, 1]}}))
    found = {}
    for pack in ("false", "true"):
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "--config", str(config), "--output", str(tmp_path / pack), "--pack", pack, "--workers", "1"])
        assert exit_info.value.code == 1
        found[pack] = {name: record for name, (record,) in records(tmp_path / pack / "div").items()}
    alone, packed = found["false"], found["true"]
    assert sorted(alone) == sorted(packed) == ["seed0", "seed1"]
    for name, a in alone.items():
        p = packed[name]
        assert a["status"] == p["status"] == "diverged", name
        assert p["diverged_at_step"] == a["diverged_at_step"] and a["global_step"] < 24, name
        assert p["global_step"] == a["global_step"], (name, a["global_step"], p["global_step"])

"""Study 1 as its authors ran it: its layers against the formulas of
../shared/reference/study1/README.md written out in plain torch, its network, its configs, and
the shared start of the three norms of a sweep."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from normbench.cli import NormBenchCLI
from normbench.experiments import STUDY1, STUDY1_NORM_OPTIONS, render_configs
from normbench.grid import expand
from normbench.nets import DilatedCNN
from normbench.norms import create_norm

ROOT = Path(__file__).resolve().parents[1]
C = 5
MOMENTUM, EPS = 0.1, 1e-5


class Reference(nn.Module):
    """Study 1's three layers as its README states them, channel by channel: in training FIRST
    update the running statistics (EMA of the batch mean and the unbiased batch variance), THEN
    normalize (bn: batch statistics; bnrs: the running statistics just updated, no gradient;
    brn: x_hat by the batch statistics, r = sqrt(var_B) / sqrt(var_run + eps) and
    d = (mu_B - mu_run) / sqrt(var_run + eps) from the updated running statistics, no gradient,
    y = gamma * (r * x_hat + d) + beta). In eval all three use the running statistics."""

    def __init__(self, kind: str, c: int) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        xt = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, everything else)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            mu, var = self.running_mean, self.running_var
            xhat = (x - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS)
            return self.weight.reshape(shape) * xhat + self.bias.reshape(shape)
        with torch.no_grad():
            self.running_mean.copy_((1 - MOMENTUM) * self.running_mean + MOMENTUM * xt.mean(1))
            self.running_var.copy_((1 - MOMENTUM) * self.running_var + MOMENTUM * xt.var(1, unbiased=True))
        mu_b, var_b = xt.mean(1), xt.var(1, unbiased=False)
        mu, var = self.running_mean.clone(), self.running_var.clone()
        if self.kind == "bn":
            xhat = (x - mu_b.reshape(shape)) / torch.sqrt(var_b.reshape(shape) + EPS)
        elif self.kind == "bnrs":
            xhat = (x - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS)
        else:
            xhat = (x - mu_b.reshape(shape)) / torch.sqrt(var_b.reshape(shape) + EPS)
            r = (torch.sqrt(var_b) / torch.sqrt(var + EPS)).detach()
            d = ((mu_b - mu) / torch.sqrt(var + EPS)).detach()
            xhat = r.reshape(shape) * xhat + d.reshape(shape)
        return self.weight.reshape(shape) * xhat + self.bias.reshape(shape)


def _steps(layer, batches, upstreams):
    """Train-mode forward and backward per batch; outputs, input grads, param grads, buffers."""
    out = []
    for x, up in zip(batches, upstreams):
        x = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(x)
        (y * up).sum().backward()
        out.append((y.detach(), x.grad, [p.grad.clone() for p in (layer.weight, layer.bias)],
                    layer.running_mean.clone(), layer.running_var.clone()))  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["bn", "bnrs", "brn"])
@pytest.mark.parametrize("shape", [(2, C, 3, 3), (16, C, 4, 4), (4, C)])
def test_study1_layers_equal_the_reference_formulas(kind, shape):
    torch.manual_seed(0)
    ours = create_norm(kind, C, **STUDY1_NORM_OPTIONS[kind])
    ref = Reference(kind, C)
    with torch.no_grad():
        for p, q in zip((ours.weight, ours.bias), (ref.weight, ref.bias)):
            p.copy_(torch.randn(C) * 0.5 + (1 if p is ours.weight else 0))
            q.copy_(p)
    g = torch.Generator().manual_seed(1)
    # Shifted, scaled inputs, so that the running statistics lag the batch ones by a lot.
    batches = [torch.randn(shape, generator=g) * (1 + i) + 3 * i for i in range(6)]
    upstreams = [torch.randn(shape, generator=g) for _ in batches]
    for (y, gx, gp, rm, rv), (y2, gx2, gp2, rm2, rv2) in zip(
        _steps(ours.train(), batches, upstreams), _steps(ref.train(), batches, upstreams)
    ):
        torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-5)
        for a, b in zip(gp, gp2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rm, rm2)
        torch.testing.assert_close(rv, rv2)
    x = batches[0]
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-6)


def test_update_first_differs_from_update_after_where_it_should():
    """bnrs and brn change with the order, bn does not: the option is not a no-op by accident."""
    torch.manual_seed(0)
    x = torch.randn(4, C, 3, 3) * 2 + 1
    for kind, options in (("bnrs", {}), ("brn", {"r_max": None, "d_max": None, "warmup_steps": 0})):
        before = create_norm(kind, C, **options)(x)
        after = create_norm(kind, C, update_first=True, **options)(x)
        assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(create_norm("bn", C, update_first=True)(x), nn.BatchNorm2d(C)(x))


@pytest.mark.parametrize("limits", [{"r_max": None, "d_max": None}, {"r_max": math.inf, "d_max": math.inf}])
def test_brn_without_clipping_is_never_clipped(limits):
    """r and d far outside the paper's [1/3, 3] and [-5, 5] pass unclipped from the first step:
    BRN then normalizes exactly by the running statistics, (x - mu) / sigma."""
    layer = create_norm("brn", C, warmup_steps=0, **limits)
    r_max, d_max = layer.current_limits()
    assert math.isinf(r_max) and math.isinf(d_max)
    x = torch.randn(8, C, 2, 2) * 20 + 50  # r = 20, d = 50 against the initial statistics
    y = layer(x)
    torch.testing.assert_close(y, (x - 0) / math.sqrt(1 + EPS), rtol=1e-5, atol=1e-4)


def test_brn_without_clipping_keeps_a_warm_up_when_asked():
    layer = create_norm("brn", C, r_max=None, d_max=None, warmup_steps=3)
    x = torch.randn(8, C) * 5 + 2
    assert [float(v) for v in layer.current_limits()] == [1.0, 0.0]
    torch.testing.assert_close(layer(x), nn.BatchNorm1d(C)(x), rtol=1e-5, atol=1e-5)
    for _ in range(2):
        layer(x)
    assert all(math.isinf(float(v)) for v in layer.current_limits())


def test_clipped_variant_without_warm_up_clips_from_the_first_step():
    """The study's later BRNC: r in [1/3, 3], d in [-5, 5], no warm-up or ramp."""
    layer = create_norm("brn", C, r_max=3, d_max=5, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    assert [float(v) for v in layer.current_limits()] == [3.0, 5.0]


# --------------------------------------------------------------------------- the network


def test_dilated_cnn_is_the_studys_network():
    net = DilatedCNN(partial(create_norm, "bn"), in_channels=3, num_classes=100)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.dilation, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1), (1, 1)),
        (32, 32, (3, 3), (2, 2), (2, 2)),
        (32, 32, (3, 3), (4, 4), (4, 4)),
        (32, 32, (3, 3), (8, 8), (8, 8)),
    ]
    assert all(isinstance(b.act, nn.GELU) for b in net.blocks) and net.fc.in_features == 32
    # The same function as the study's nn.Sequential, built from the same modules.
    seq = nn.Sequential(*[m for b in net.blocks for m in (b.conv, b.norm, b.act)],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), net.fc)  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), seq.eval()(x))
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 100)


# --------------------------------------------------------------------------- configs


def test_study1_configs_print_the_studys_setup(capsys):
    from normbench.main import main

    for dataset, norm, bs in STUDY1:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "configs" / f"{dataset}_{norm}_bs{bs}.yaml"), "--print_config"])
        cfg = yaml.safe_load(capsys.readouterr().out)
        t, m, d = cfg["trainer"], cfg["model"], cfg["data"]["init_args"]
        assert (t["max_steps"], t["val_check_interval"], t["check_val_every_n_epoch"], t["log_every_n_steps"]) == (
            10001,
            500,
            None,
            10,
        )
        assert "normbench.callbacks.ValidateAtStart" in [c["class_path"] for c in t["callbacks"]]
        assert (m["net"], m["width"], m["num_blocks"], m["activation"], m["norm"]) == (
            "dilated_cnn",
            32,
            4,
            "gelu",
            norm,
        )
        assert m["norm_kwargs"]["update_first"] is True
        if norm == "brn":
            assert m["norm_kwargs"]["r_max"] is None and m["norm_kwargs"]["d_max"] is None
            assert m["norm_kwargs"]["warmup_steps"] == 0 and m["norm_kwargs"]["r_eps"] is False
        assert m["optimizer"]["class_path"] == "torch.optim.Adam" and m["optimizer"]["init_args"]["lr"] == 0.001
        assert (d["batch_size"], d["normalization"], d["drop_last"], d["val_split"]) == (bs, "none", True, 0.0)
        assert cfg["data"]["class_path"].endswith(
            {"mnist": "MNISTDataModule", "cifar100": "CIFAR100DataModule"}[dataset]
        )


def test_study2_configs_are_unchanged():
    """Study 2 keeps its network, inputs and schedule."""
    for name, text in render_configs().items():
        if not name.startswith("cifar10_"):
            continue
        cfg = yaml.safe_load(text)
        assert cfg["trainer"]["max_epochs"] == 10 and "max_steps" not in cfg["trainer"]
        assert cfg["model"]["net"] == "seed_cnn" and cfg["model"]["activation"] == "relu"
        assert cfg["data"]["init_args"]["normalization"] == "half"


# --------------------------------------------------------------------------- shared start


def _cli(args, tmp_path):
    return NormBenchCLI(args=[*args, "--trainer.default_root_dir", str(tmp_path)], run=False)


def test_study1_sweep_cells_are_the_committed_configs(tmp_path):
    """Each cell of configs/sweeps/study1.yaml parses to the config of its experiment file."""
    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "study1.yaml").read_text())
    cells = expand(spec["grid"], str(ROOT / spec["base"]), spec.get("overrides", {}), tmp_path / "s")
    assert len(cells) == 18
    parser = _cli(cells[0].args[1:-4], tmp_path).parser
    for cell in cells:
        dataset, bs, norm = cell.name.split("_")
        swept = parser.parse_args(cell.args[1:-4])
        own = parser.parse_args(["--config", str(ROOT / "configs" / f"{dataset}_{norm}_{bs}.yaml")])
        for key in ("model", "trainer", "data", "seed_everything"):
            a, b = swept.get(key), own.get(key)
            a = a.as_dict() if hasattr(a, "as_dict") else a
            b = b.as_dict() if hasattr(b, "as_dict") else b
            if key == "trainer":
                a.pop("default_root_dir"), b.pop("default_root_dir")
            assert a == b, f"{cell.name}: {key} differs from its config file"


def test_three_norms_start_from_identical_weights_and_batches(fake_data, tmp_path):
    """bn, bnrs and brn of one (dataset, batch size, seed): equal initial state_dicts, equal
    batch order, as the study loads BN's state_dict into the others and shares the loader."""
    states, orders = [], []
    for norm in ("bn", "bnrs", "brn"):
        cli = _cli(["--config", str(ROOT / "configs" / f"mnist_{norm}_bs16.yaml"), "--data.data_dir", str(fake_data),
                    "--data.download", "false", "--trainer.accelerator", "cpu"], tmp_path)  # fmt: skip
        states.append(cli.model.state_dict())
        dm = cli.datamodule
        dm.setup("fit")
        loader = dm.train_dataloader()
        orders.append(torch.cat([y for _, y in loader]))
        orders.append(torch.cat([x.flatten(1)[:, :20] for x, _ in loader]))
    assert states[0].keys() == states[1].keys() == states[2].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]) and torch.equal(states[0][k], states[2][k]), k
    assert torch.equal(orders[0], orders[2]) and torch.equal(orders[0], orders[4])
    assert torch.equal(orders[1], orders[3]) and torch.equal(orders[1], orders[5])
    # drop_last: every batch is full; 128 fake images at batch size 16 make 8.
    assert len(loader) == 128 // 16 and orders[0].numel() == 128
    # A different seed changes both, so the equality above is not vacuous.
    other = _cli(["--config", str(ROOT / "configs" / "mnist_bn_bs16.yaml"), "--seed_everything", "1",
                  "--data.data_dir", str(fake_data), "--data.download", "false"], tmp_path)  # fmt: skip
    assert not torch.equal(other.model.state_dict()["net.blocks.0.conv.weight"], states[0]["net.blocks.0.conv.weight"])

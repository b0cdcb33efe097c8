"""The networks against the studies' descriptions, counted independently."""

import pytest
import torch
from torch import nn

from normbench.nets import NETS, CifarResNet, DilatedCNN, SeedCNN
from normbench.norms import BatchNorm, GroupNorm, WSConv2d, create_norm


def conv_params(cin, cout, bias=True):
    return cin * cout * 9 + (cout if bias else 0)


@pytest.mark.parametrize("in_channels, num_classes", [(3, 10), (1, 10), (3, 100)])
def test_seed_cnn_is_study_2_network(in_channels, num_classes):
    net = SeedCNN(BatchNorm, in_channels, num_classes, width=64, num_blocks=4)
    # 3x3 stem to 64, 4 x (conv3x3 + BN(64) + ReLU), global average pool, linear head.
    expected = conv_params(in_channels, 64) + 4 * (conv_params(64, 64) + 2 * 64) + 64 * num_classes + num_classes
    assert sum(p.numel() for p in net.parameters()) == expected
    assert [type(b.norm) for b in net.blocks] == [BatchNorm] * 4
    assert all(isinstance(b.act, nn.ReLU) for b in net.blocks)
    assert net(torch.randn(2, in_channels, 28, 28)).shape == (2, num_classes)


def test_seed_cnn_options():
    net = SeedCNN(
        lambda c: create_norm("gn", c, num_groups=4),
        3,
        10,
        width=32,
        num_blocks=7,
        activation="sigmoid",
        weight_standardization=True,
    )
    assert len(net.blocks) == 7 and all(isinstance(b.act, nn.Sigmoid) for b in net.blocks)
    assert all(isinstance(b.norm, GroupNorm) and b.norm.num_groups == 4 for b in net.blocks)
    assert all(isinstance(b.conv, WSConv2d) for b in net.blocks) and not isinstance(net.conv1, WSConv2d)


def test_resnet20_matches_he_et_al():
    net = CifarResNet(BatchNorm, 3, 10, width=16, num_blocks=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convs and the linear layer: ResNet-20
    # Option A shortcuts have no parameters: stem, then 3 stages x 3 blocks x 2 convs + BNs.
    expected = conv_params(3, 16, False) + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            expected += conv_params(cin, width, False) + conv_params(width, width, False) + 4 * width
            cin = width
    expected += 64 * 10 + 10
    assert sum(p.numel() for p in net.parameters()) == expected  # 0.27M, as the paper's Table 6
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # The strided stages halve the feature map twice: 32 -> 16 -> 8.
    feats = net.blocks(net.act(net.norm1(net.conv1(torch.randn(1, 3, 32, 32)))))
    assert feats.shape == (1, 64, 8, 8)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("option, value", [("num_blocks", 0), ("num_blocks", -2), ("width", 0)])
def test_every_network_refuses_a_shape_it_cannot_have(net, option, value):
    options = {"width": 8, "num_blocks": 2, option: value}
    with pytest.raises(ValueError, match=rf"^{net}: {option}={value} must be a positive integer; set --model.{option}"):
        NETS[net](BatchNorm, 1, 10, **options)


def test_dilated_cnn_refuses_a_dilation_as_large_as_the_image():
    # Dilation 2**(blocks - 1): 16 fits 28x28 images (5 blocks), 32 (6 blocks) does not.
    DilatedCNN(BatchNorm, 1, 10, width=4, num_blocks=5).check_input_size(28, 28)
    with pytest.raises(ValueError, match=r"^dilated_cnn: num_blocks=6 gives its last block dilation 32, not below "
                                         r"the 28x28 images; set --model.num_blocks to at most 5$"):  # fmt: skip
        DilatedCNN(BatchNorm, 1, 10, width=4, num_blocks=6).check_input_size(28, 28)
    # 32x32 (CIFAR): 5 blocks still, since dilation 32 is not below 32.
    with pytest.raises(ValueError, match="at most 5$"):
        DilatedCNN(BatchNorm, 3, 10, width=4, num_blocks=6).check_input_size(32, 32)


def test_fit_checks_the_network_against_the_images_before_training(fake_data, tmp_path, capsys):
    from quick_configs import mnist_config

    from normbench.main import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", mnist_config("bn", 16), "--model.net", "dilated_cnn", "--model.num_blocks", "7",
              "--data.data_dir", str(fake_data), "--data.download", "false", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("normbench: error: dilated_cnn: num_blocks=7")
    assert not list(tmp_path.rglob("*.ckpt"))

"""The networks against the studies' descriptions, counted independently."""

import pytest
import torch
from torch import nn

from normbench.nets import CifarResNet, SeedCNN
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

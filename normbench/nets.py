"""Plain nn.Module networks. They take a norm factory, ``norm(num_features) -> nn.Module``, and
never switch on a norm's name. K copies of one of them train in one step as
``normbench.packed_runs.PackedRuns``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from normbench.norms import GammaActivation, ScaledWSConv2d, WSConv2d

NormFactory = Callable[[int], nn.Module]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
ActivationName = Literal["relu", "sigmoid", "tanh", "gelu", "silu", "elu", "leaky_relu"]


def check_shape(net: str, width: int, num_blocks: int) -> None:
    """A one-line ValueError for a width or block count the network cannot be built with.

    Args:
        net: the network's registry name, for the message.
        width: its channels.
        num_blocks: its blocks (per stage for the resnet).
    """
    for name, value in (("width", width), ("num_blocks", num_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{net}: {name}={value!r} must be a positive integer; set --model.{name} to 1 or more")


class SizedInput:
    """Networks whose options need an input of a least size say so before training:
    ``check_input_size(height, width)`` raises a one-line ValueError (a no-op by default)."""

    def check_input_size(self, height: int, width: int) -> None:
        """Raise a one-line ValueError if the network's options do not fit ``height x width`` inputs."""


# Weight standardization: off, on (Qiao et al. 2019), or scaled, the normalizer-free networks'
# convolution with their gain-scaled activations (Brock et al. 2021).
WSName = bool | Literal["scaled"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True, ws: WSName = False) -> nn.Conv2d:
    """3x3 convolution with padding 1; weight-standardized when ``ws`` (scaled: ``ScaledWSConv2d``)."""
    conv = ScaledWSConv2d if ws == "scaled" else WSConv2d if ws else nn.Conv2d
    return conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def make_activation(name: str, ws: WSName = False) -> nn.Module:
    """The activation ``name``; scaled by its gain gamma with scaled weight standardization."""
    act = ACTIVATIONS[name]()
    return GammaActivation(act) if ws == "scaled" else act


class NormBlock(nn.Module):
    """conv3x3 -> norm -> activation: one block of study 2's network."""

    def __init__(self, channels: int, norm: NormFactory, activation: str, ws: WSName = False) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, ws=ws)
        self.norm = norm(channels)
        self.act = make_activation(activation, ws)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class SeedCNN(SizedInput, nn.Module):
    """Study 2's network ("Normalization: Batch vs Group"): a 3x3 conv stem to ``width``
    channels, ``num_blocks`` blocks of conv3x3 + norm + activation, global average pooling and a
    linear head.

    Args:
        norm: factory ``norm(num_features)`` for each block's norm layer.
        in_channels: image channels.
        num_classes: classes of the head.
        width: channels of the stem and every block.
        num_blocks: how many conv + norm + activation blocks.
        activation: a name of ``ACTIVATIONS``.
        weight_standardization: use weight-standardized convolutions in the blocks.
    """

    def __init__(
        self,
        norm: NormFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        num_blocks: int = 4,
        activation: str = "relu",
        weight_standardization: WSName = False,
    ) -> None:
        super().__init__()
        check_shape("seed_cnn", width, num_blocks)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.blocks = nn.Sequential(
            *[NormBlock(width, norm, activation, weight_standardization) for _ in range(num_blocks)]
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # Global average pooling as a mean, which torch.func.vmap batches (packed runs).
        return self.fc(self.blocks(self.conv1(x)).mean((2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016, Fig. 2) with the parameter-free option-A shortcut
    (strided identity, zero-padded channels) used for CIFAR in Sec. 4.2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory, activation: str, ws: bool):
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels, stride, bias=False, ws=ws)
        self.norm = norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, bias=False, ws=ws)
        self.norm2 = norm(out_channels)
        self.act = ACTIVATIONS[activation]()
        self.stride, self.pad = stride, out_channels - in_channels

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm(self.conv(x)))
        return self.act(self.norm2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(SizedInput, nn.Module):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2): a 3x3 conv stem, three stages of
    ``num_blocks`` basic blocks at ``width``, 2x and 4x channels (stride 2 between stages),
    global average pooling and a linear head; depth 6 * num_blocks + 2, so 3 gives ResNet-20.

    Args:
        norm: factory ``norm(num_features)`` for every norm layer.
        in_channels: image channels.
        num_classes: classes of the head.
        width: channels of the first stage (16 in the paper).
        num_blocks: basic blocks per stage (3 for ResNet-20).
        activation: a name of ``ACTIVATIONS``.
        weight_standardization: use weight-standardized convolutions.
    """

    def __init__(
        self,
        norm: NormFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        num_blocks: int = 3,
        activation: str = "relu",
        weight_standardization: WSName = False,
    ) -> None:
        super().__init__()
        check_shape("resnet", width, num_blocks)
        if weight_standardization == "scaled":
            raise ValueError(
                "resnet: weight_standardization=scaled is the normalizer-free recipe, whose residual branches need "
                "NF-ResNet's alpha and beta scaling, which this network does not have; use seed_cnn or dilated_cnn"
            )
        ws = weight_standardization
        self.conv1 = conv3x3(in_channels, width, bias=False, ws=ws)
        self.norm1 = norm(width)
        self.act = ACTIVATIONS[activation]()
        blocks, channels = [], width
        for stage in range(3):
            out = width * 2**stage
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out, stride, norm, activation, ws))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.fc(self.blocks(x).mean((2, 3)))  # global average pooling


class DilatedBlock(nn.Module):
    """conv3x3 with ``dilation`` (padding = dilation, so the size is kept) -> norm -> activation."""

    def __init__(
        self, in_channels: int, out_channels: int, dilation: int, norm: NormFactory, activation: str, ws: WSName
    ) -> None:
        super().__init__()
        conv = ScaledWSConv2d if ws == "scaled" else WSConv2d if ws else nn.Conv2d
        self.conv = conv(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        self.norm = norm(out_channels)
        self.act = make_activation(activation, ws)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class DilatedCNN(SizedInput, nn.Module):
    """Study 1's network ("Why don't we simply use running statistics for batch normalization
    training?"): ``num_blocks`` blocks of conv3x3 + norm + activation at ``width`` channels, the
    first from the image with dilation 1, the k-th after it with dilation 2**k (2, 4, 8 for the
    study's 4 blocks, padding = dilation), then global average pooling and a linear head. The
    study uses width 32 and GELU.

    Args:
        norm: factory ``norm(num_features)`` for each block's norm layer.
        in_channels: image channels.
        num_classes: classes of the head.
        width: channels of every block.
        num_blocks: how many conv + norm + activation blocks, the first included.
        activation: a name of ``ACTIVATIONS``.
        weight_standardization: use weight-standardized convolutions.
    """

    def __init__(
        self,
        norm: NormFactory,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        num_blocks: int = 4,
        activation: str = "gelu",
        weight_standardization: WSName = False,
    ) -> None:
        super().__init__()
        check_shape("dilated_cnn", width, num_blocks)
        self.blocks = nn.Sequential(
            *[
                DilatedBlock(in_channels if k == 0 else width, width, 2**k, norm, activation, weight_standardization)
                for k in range(num_blocks)
            ]
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(x).mean((2, 3)))  # global average pooling

    def check_input_size(self, height: int, width: int) -> None:
        """The last block's dilation must be below the image size: at a dilation of the image
        size or more, every tap but the centre reads the zero padding, and the block is a 1x1
        convolution in disguise."""
        dilation = 2 ** (len(self.blocks) - 1)
        if dilation >= min(height, width):
            most = max(1, (min(height, width) - 1).bit_length())  # the largest n with 2**(n-1) < size
            raise ValueError(
                f"dilated_cnn: num_blocks={len(self.blocks)} gives its last block dilation {dilation}, not below "
                f"the {height}x{width} images; set --model.num_blocks to at most {most}"
            )


NETS: dict[str, Callable[..., nn.Module]] = {"seed_cnn": SeedCNN, "resnet": CifarResNet, "dilated_cnn": DilatedCNN}
NetName = Literal["seed_cnn", "resnet", "dilated_cnn"]

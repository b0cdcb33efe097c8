"""Plain nn.Module networks. They take a norm factory, ``norm(num_features) -> nn.Module``, and
never switch on a norm's name. ``PackedRuns`` holds K copies of one of them, trained in one
step with ``torch.func.vmap`` (packed runs, ``normbench sweep --pack``)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

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


# --------------------------------------------------------------------------- packed runs


class PackedRuns(nn.Module):
    """K copies of one network, with stacked parameters and buffers, run with ``vmap``.

    The K networks' parameters and buffers are stacked along a new leading dim
    (``torch.func.stack_module_state``) and the forward is vmapped over it with ``functional_call``.
    Each run sees its own batch and keeps its own running statistics (the stacked buffers are
    updated in place, per run); with the loss the sum of the runs' losses each run's gradient is
    its own, and elementwise optimizers (Adam, SGD with momentum) on the stacked tensors are
    exactly K optimizers. Nothing couples the runs: no shared statistics, no global gradient-norm
    clipping. A pack holds runs of one network and norm that differ in seed (initialization and
    data order).

    Args:
        nets: the K networks, identical in structure (each with its own initialization).
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        shapes = {tuple((k, tuple(v.shape)) for k, v in n.state_dict().items()) for n in nets}
        if len(shapes) != 1:
            raise ValueError("packed runs need networks whose parameters and buffers have the same names and shapes")
        params, buffers = stack_module_state(list(nets))
        self.k = len(nets)
        self.param_names, self.buffer_names = list(params), list(buffers)
        # The default layout whatever the runs': under vmap, cuDNN cannot ask is_contiguous(channels_last).
        plain = torch.contiguous_format
        self.stacked = nn.ParameterList(
            nn.Parameter(params[n].detach().clone(memory_format=plain)) for n in self.param_names
        )
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{i}", buffers[name].clone(memory_format=plain))
        # The shared definition, without storage of its own: functional_call supplies the tensors.
        # Kept out of the module tree, so that .to() and state_dict() see only the stacked ones.
        object.__setattr__(self, "base", copy.deepcopy(nets[0]).to("meta"))

    def _buffers_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"stacked_buffer_{i}") for i, name in enumerate(self.buffer_names)}

    def forward(self, x: Tensor, shared_input: bool = False) -> Tensor:
        """Logits of every run: (K, B, ...) from x of (K, B, ...), or from one (B, ...) batch
        that every run sees (``shared_input``, e.g. evaluation)."""
        # The definition trains or evaluates as this module does. Set here, not in train():
        # Lightning restores each module's ``training`` flag after validation without train().
        if self.base.training != self.training:
            self.base.train(self.training)
        params = dict(zip(self.param_names, self.stacked))

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self.base, (p, b), (xi,))

        with warnings.catch_warnings():
            # vmap has no batching rule for the in-place lerp_ that updates running statistics and
            # loops over the runs for it: slower for that op, the same numbers.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return vmap(one, in_dims=(0, 0, None if shared_input else 0), randomness="different")(
                params, self._buffers_dict(), x.contiguous()
            )

    def run_state_dict(self, k: int) -> dict[str, Tensor]:
        """Run k's parameters and buffers, as its network's own ``state_dict`` would hold them."""
        state = {n: p[k].detach() for n, p in zip(self.param_names, self.stacked)}
        state.update({n: b[k] for n, b in self._buffers_dict().items()})
        return state


def packed_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Every image's cross-entropy in every run, (K, B), from logits (K, B, classes) and targets (K, B)."""
    k, b = targets.shape
    return F.cross_entropy(logits.reshape(k * b, -1), targets.reshape(-1), reduction="none").reshape(k, b)


def packed_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over runs of each run's mean cross-entropy, the per-run losses (K,)): the sum's
    gradient in each run is that run's own.

    Args:
        logits: (K, B, classes).
        targets: (K, B).
    """
    per_run = packed_losses(logits, targets).mean(1)
    return per_run.sum(), per_run


NETS: dict[str, Callable[..., nn.Module]] = {"seed_cnn": SeedCNN, "resnet": CifarResNet, "dilated_cnn": DilatedCNN}
NetName = Literal["seed_cnn", "resnet", "dilated_cnn"]

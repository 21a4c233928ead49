"""CIFAR ResNets of He et al. 2016 (section 4.2): ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
``resnet110``.

A 3x3 stem conv (16 channels, stride 1), then three stages of ``n = (depth - 2) / 6`` BasicBlocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3). Shortcuts that change shape use
option A: stride-2 subsampling plus zero channel padding, with no parameters. Conv weights are
Kaiming-normal (``fan_in``), as in the reference CIFAR code LDAM-DRW and BBN build on. ``out_dim`` is
64; the classifier is not part of the backbone. Any input of at least 8x8 works (a 32x32 image gives
an 8x8 feature map, an 8x8 digit a 2x2 one).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.backbones.base import Backbone
from ltlib.backbones.registry import register_backbone

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the channels; no parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (nn.Identity() if stride == 1 and in_planes == planes
                                    else PadShortcut(in_planes, planes, stride))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """A CIFAR ResNet of the given depth (``6n + 2``); ``last_block`` is the last block of stage 3."""

    def __init__(self, depth: int, *, in_chans: int = 3) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stages: list[list[BasicBlock]] = []
        in_planes = STAGE_WIDTHS[0]
        for index, planes in enumerate(STAGE_WIDTHS):
            stride = 1 if index == 0 else 2
            stage = []
            for block_index in range(blocks_per_stage):
                stage.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1))
                in_planes = planes
            stages.append(stage)
        trunk_layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(in_chans, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False),
            bn1=nn.BatchNorm2d(STAGE_WIDTHS[0]),
            relu=nn.ReLU(inplace=True),
            layer1=nn.Sequential(*stages[0]),
            layer2=nn.Sequential(*stages[1]),
        )
        if len(stages[2]) > 1:
            trunk_layers["layer3"] = nn.Sequential(*stages[2][:-1])
        super().__init__(nn.Sequential(trunk_layers), stages[2][-1], STAGE_WIDTHS[-1], arch=f"resnet{depth}")
        self.depth = depth
        self.init_weights(self)

    def init_layer(self, layer: nn.Module) -> None:
        """Kaiming-normal (``fan_in``) conv and linear weights, batch norm reset to 1 / 0."""
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_parameters()


@register_backbone("resnet20")
def resnet20(*, in_chans: int = 3) -> Backbone:
    """CIFAR ResNet-20: 3 BasicBlocks per stage, about 0.27M parameters."""
    return CifarResNet(20, in_chans=in_chans)


@register_backbone("resnet32")
def resnet32(*, in_chans: int = 3) -> Backbone:
    """CIFAR ResNet-32: 5 BasicBlocks per stage, about 0.46M parameters (LDAM-DRW's and BBN's CIFAR net)."""
    return CifarResNet(32, in_chans=in_chans)


@register_backbone("resnet44")
def resnet44(*, in_chans: int = 3) -> Backbone:
    """CIFAR ResNet-44: 7 BasicBlocks per stage, about 0.66M parameters."""
    return CifarResNet(44, in_chans=in_chans)


@register_backbone("resnet56")
def resnet56(*, in_chans: int = 3) -> Backbone:
    """CIFAR ResNet-56: 9 BasicBlocks per stage, about 0.85M parameters."""
    return CifarResNet(56, in_chans=in_chans)


@register_backbone("resnet110")
def resnet110(*, in_chans: int = 3) -> Backbone:
    """CIFAR ResNet-110: 18 BasicBlocks per stage, about 1.7M parameters."""
    return CifarResNet(110, in_chans=in_chans)

"""ImageNet-style ResNets and ResNeXt built from torchvision's ``ResNet``, ``BasicBlock`` and ``Bottleneck``:
``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``, ``resnext50_32x4d``.

The fc layer is dropped; ``last_block`` is the last block of ``layer4`` (a BasicBlock or a Bottleneck)
and ``out_dim`` is 512 (BasicBlock nets) or 2048 (Bottleneck nets).

Options:
    init: ``torchvision`` (default): torchvision's initialisation (Kaiming-normal conv weights, fan_out,
        ReLU gain); ``pytorch``: every layer keeps PyTorch's own default (Kaiming-uniform with a = sqrt(5)
        for conv weights, whose std is 1 / sqrt(3 fan_in): sqrt(6) = 2.45x smaller than torchvision's for
        a 3x3 conv with as many input as output channels). The official BBN code builds its ResNet-50
        with no initialisation code, i.e. ``pytorch``; ``experiment=bbn_inat`` selects it.
    small_input: the CIFAR / Tiny-ImageNet stem: a 3x3 stride-1 conv and no max-pool, so a 32x32 image
        gives a 4x4 feature map instead of 1x1. The ImageNet weights do not fit this stem, so it
        cannot be combined with ``pretrained=True`` (a ``pretrained_path`` with a 3x3 stem can).

``pretrained=True`` loads torchvision's ``IMAGENET1K_V1`` weights (the original ones the long-tail
literature used); ``resnet10`` has none. Local files may be torchvision state dicts (``fc.*`` ignored).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    ResNet152_Weights,
    ResNeXt50_32X4D_Weights,
    WeightsEnum,
)
from torchvision.models import resnet as tv_resnet

from ltlib.backbones.base import Backbone
from ltlib.backbones.registry import register_backbone
from ltlib.errors import LtlibError

BlockType = type[tv_resnet.BasicBlock] | type[tv_resnet.Bottleneck]
BACKBONE_INITS = ("torchvision", "pytorch")


class ResNet(Backbone):
    """A torchvision ResNet without fc, split into ``trunk`` and the last block of ``layer4``."""

    def __init__(self, arch: str, block: BlockType, layers: list[int], *, in_chans: int = 3,
                 small_input: bool = False, imagenet_weights: WeightsEnum | None = None,
                 groups: int = 1, width_per_group: int = 64, init: str = "torchvision") -> None:
        if init not in BACKBONE_INITS:
            raise LtlibError(f"backbone.init={init!r} is not allowed; use one of {', '.join(BACKBONE_INITS)}")
        net = tv_resnet.ResNet(block, layers, groups=groups, width_per_group=width_per_group)
        new_stem = None
        if small_input or in_chans != 3:
            kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
            new_stem = net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=kernel, stride=stride, padding=padding,
                                             bias=False)
        trunk_layers: OrderedDict[str, nn.Module] = OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu)
        if not small_input:
            trunk_layers["maxpool"] = net.maxpool
        trunk_layers.update(layer1=net.layer1, layer2=net.layer2, layer3=net.layer3)
        if len(net.layer4) > 1:
            trunk_layers["layer4"] = net.layer4[:-1]
        super().__init__(nn.Sequential(trunk_layers), net.layer4[-1], 512 * block.expansion, arch=arch,
                         imagenet_weights=imagenet_weights)
        self.small_input = small_input
        self.init = init
        self._last_index = len(net.layer4) - 1
        if init == "pytorch":
            self.init_weights(self)
        elif new_stem is not None:
            self.init_weights(new_stem)

    def init_layer(self, layer: nn.Module) -> None:
        """torchvision's scheme (:meth:`Backbone.init_layer`), or with ``init="pytorch"`` the layer's own
        ``reset_parameters`` (PyTorch's defaults)."""
        if self.init == "pytorch":
            if isinstance(layer, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                layer.reset_parameters()
            return
        super().init_layer(layer)

    def pretrained_weights(self) -> WeightsEnum:
        if self.small_input and self.imagenet_weights is not None:
            raise LtlibError(f"backbone {self.arch!r}: the ImageNet weights need the 7x7 ImageNet stem; "
                             "use small_input=False, pretrained=False or pretrained_path=FILE")
        return super().pretrained_weights()

    def external_key(self, key: str) -> str | None:
        """torchvision ``layer4.<last>.*`` -> ``last_block.*``, ``fc.*`` dropped, the rest -> ``trunk.*``."""
        if key.startswith("fc."):
            return None
        last_prefix = f"layer4.{self._last_index}."
        if key.startswith(last_prefix):
            return "last_block." + key[len(last_prefix):]
        return "trunk." + key


@register_backbone("resnet10")
def resnet10(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNet-10: BasicBlocks [1, 1, 1, 1] (the ImageNet-LT baseline of Liu et al. 2019); no ImageNet weights."""
    return ResNet("resnet10", tv_resnet.BasicBlock, [1, 1, 1, 1], in_chans=in_chans, small_input=small_input, init=init)


@register_backbone("resnet18")
def resnet18(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNet-18: BasicBlocks [2, 2, 2, 2], out_dim 512."""
    return ResNet("resnet18", tv_resnet.BasicBlock, [2, 2, 2, 2], in_chans=in_chans, small_input=small_input, init=init,
                  imagenet_weights=ResNet18_Weights.IMAGENET1K_V1)


@register_backbone("resnet34")
def resnet34(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNet-34: BasicBlocks [3, 4, 6, 3], out_dim 512."""
    return ResNet("resnet34", tv_resnet.BasicBlock, [3, 4, 6, 3], in_chans=in_chans, small_input=small_input, init=init,
                  imagenet_weights=ResNet34_Weights.IMAGENET1K_V1)


@register_backbone("resnet50")
def resnet50(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNet-50: Bottlenecks [3, 4, 6, 3], out_dim 2048."""
    return ResNet("resnet50", tv_resnet.Bottleneck, [3, 4, 6, 3], in_chans=in_chans, small_input=small_input, init=init,
                  imagenet_weights=ResNet50_Weights.IMAGENET1K_V1)


@register_backbone("resnet101")
def resnet101(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNet-101: Bottlenecks [3, 4, 23, 3], out_dim 2048."""
    return ResNet("resnet101", tv_resnet.Bottleneck, [3, 4, 23, 3], in_chans=in_chans,
                  small_input=small_input, init=init, imagenet_weights=ResNet101_Weights.IMAGENET1K_V1)


@register_backbone("resnet152")
def resnet152(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNet-152: Bottlenecks [3, 8, 36, 3], out_dim 2048 (the Places-LT backbone)."""
    return ResNet("resnet152", tv_resnet.Bottleneck, [3, 8, 36, 3], in_chans=in_chans,
                  small_input=small_input, init=init, imagenet_weights=ResNet152_Weights.IMAGENET1K_V1)


@register_backbone("resnext50_32x4d")
def resnext50_32x4d(*, in_chans: int = 3, small_input: bool = False, init: str = "torchvision") -> Backbone:
    """ResNeXt-50 32x4d: Bottlenecks [3, 4, 6, 3] with 32 groups of width 4, out_dim 2048."""
    return ResNet("resnext50_32x4d", tv_resnet.Bottleneck, [3, 4, 6, 3], in_chans=in_chans,
                  small_input=small_input, init=init, imagenet_weights=ResNeXt50_32X4D_Weights.IMAGENET1K_V1,
                  groups=32, width_per_group=4)

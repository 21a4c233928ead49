"""Backbones: feature extractors without classifier, built by name from a registry.

Example::

    from ltlib.backbones import create_backbone, list_backbones
    net = create_backbone("resnet32")                      # CIFAR ResNet-32, out_dim 64
    net = create_backbone("resnet50", pretrained=True)     # torchvision ImageNet weights
    names = list_backbones("resnet*")

Every backbone is a :class:`Backbone` with ``trunk``, ``last_block``, ``out_dim``, ``forward`` (pooled
features), ``forward_features`` (the unpooled map) and ``copy_last_block`` (for BBN). Families:
CIFAR ResNets (``cifar_resnet``), ImageNet ResNets and ResNeXt (``resnet``), VGG-16 (``vgg``) and
MobileNet-v2 (``mobilenet_v2``).
"""

from ltlib.backbones import cifar_resnet, mobilenet_v2, resnet, vgg  # noqa: F401  (fill the registry)
from ltlib.backbones.base import Backbone
from ltlib.backbones.registry import create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "create_backbone", "list_backbones", "register_backbone"]

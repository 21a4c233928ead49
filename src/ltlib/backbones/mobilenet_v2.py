"""MobileNet-v2 (Sandler et al. 2018) from torchvision's ``MobileNetV2.features``; the classifier is dropped.

``last_block`` is the last inverted-residual block (160 -> 320 channels) followed by the final 1x1
conv-BN-ReLU6 to ``out_dim`` = 1280 channels (``1280 * max(1, width_mult)``, rounded to a multiple
of 8); ``trunk`` is everything before. Both keep torchvision's ``features`` indices.

Options:
    width_mult: torchvision's channel width multiplier (> 0; ImageNet weights exist only for 1.0).
    small_input: the CIFAR variant: the first conv has stride 1 instead of 2, so the network
        downsamples 16x and a 32x32 image gives a 2x2 feature map. The pretrained weights still fit.

``pretrained=True`` loads torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1``; local files may be
torchvision state dicts (``classifier.*`` ignored).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNet_V2_Weights, WeightsEnum
from torchvision.models import mobilenetv2 as tv_mobilenet

from ltlib.backbones.base import Backbone, features_key
from ltlib.backbones.registry import register_backbone
from ltlib.errors import LtlibError


class MobileNetV2(Backbone):
    """torchvision's MobileNet-v2 features, split before the last inverted-residual block."""

    def __init__(self, *, in_chans: int = 3, width_mult: float = 1.0, small_input: bool = False) -> None:
        if not width_mult > 0:
            raise LtlibError(f"backbone 'mobilenet_v2' option width_mult={width_mult!r} is out of range; "
                             "allowed: > 0")
        features = tv_mobilenet.MobileNetV2(width_mult=width_mult).features
        new_stem = None
        if in_chans != 3 or small_input:
            new_stem = features[0][0] = nn.Conv2d(in_chans, features[0][0].out_channels, kernel_size=3,
                                                  stride=1 if small_input else 2, padding=1, bias=False)
        blocks = [index for index, layer in enumerate(features)
                  if isinstance(layer, tv_mobilenet.InvertedResidual)]
        split = blocks[-1]
        out_dim = features[-1][0].out_channels
        weights = MobileNet_V2_Weights.IMAGENET1K_V1 if width_mult == 1.0 else None
        super().__init__(features[:split], features[split:], out_dim, arch="mobilenet_v2",
                         imagenet_weights=weights)
        self.width_mult = width_mult
        self.small_input = small_input
        if new_stem is not None:
            self.init_weights(new_stem)

    def pretrained_weights(self) -> WeightsEnum:
        if self.width_mult != 1.0:
            raise LtlibError(f"backbone 'mobilenet_v2' has ImageNet weights only for width_mult=1.0, "
                             f"not {self.width_mult}; use pretrained=False or pretrained_path=FILE")
        return super().pretrained_weights()

    def external_key(self, key: str) -> str | None:
        """torchvision ``features.<i>.*`` -> ``trunk.<i>.*`` / ``last_block.<i>.*``; ``classifier.*`` dropped."""
        return features_key(key, self)


@register_backbone("mobilenet_v2")
def mobilenet_v2(*, in_chans: int = 3, width_mult: float = 1.0, small_input: bool = False) -> Backbone:
    """MobileNet-v2 features, out_dim 1280 at width 1.0."""
    return MobileNetV2(in_chans=in_chans, width_mult=width_mult, small_input=small_input)

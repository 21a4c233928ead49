"""VGG-16 (configuration D of Simonyan & Zisserman), features only, from torchvision's ``make_layers``.

``trunk`` is conv blocks 1-4 (each ending in its 2x2 max-pool) and ``last_block`` is block 5: its three
3x3 conv layers (512 channels) and, unless ``small_input``, its final max-pool. Keeping that pool in
``last_block`` makes ``forward_features`` exactly torchvision's ``features`` output (7x7 for a 224x224
image), and a duplicated block (BBN) ends the same way. ``out_dim`` is 512. The classifier (and
torchvision's 7x7 adaptive pool) is dropped: features are globally average-pooled.

Options:
    batch_norm: VGG-16-BN (default, torchvision's ``vgg16_bn``) or the plain VGG-16.
    small_input: drop the final max-pool so that a 32x32 image gives a 2x2 map instead of 1x1.

``pretrained=True`` loads torchvision's ``VGG16_BN_Weights.IMAGENET1K_V1`` (or ``VGG16_Weights`` without
batch norm); conv weights are unaffected by ``small_input``. Local files may be torchvision state
dicts (``classifier.*`` ignored).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import VGG16_BN_Weights, VGG16_Weights, WeightsEnum
from torchvision.models import vgg as tv_vgg

from ltlib.backbones.base import Backbone, features_key
from ltlib.backbones.registry import register_backbone

VGG16_CONFIG = tv_vgg.cfgs["D"]


class VGG(Backbone):
    """A torchvision VGG ``features`` Sequential split before its last conv block (indices kept)."""

    def __init__(self, arch: str, config: list[str | int], *, in_chans: int = 3, batch_norm: bool = True,
                 small_input: bool = False, imagenet_weights: WeightsEnum | None = None) -> None:
        features = tv_vgg.make_layers(config, batch_norm=batch_norm)
        if in_chans != 3:
            first = features[0]
            features[0] = nn.Conv2d(in_chans, first.out_channels, kernel_size=3, padding=1)
        pools = [index for index, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
        split = pools[-2] + 1
        end = pools[-1] if small_input else len(features)
        out_dim = next(layer.out_channels for layer in reversed(features) if isinstance(layer, nn.Conv2d))
        super().__init__(features[:split], features[split:end], out_dim, arch=arch,
                         imagenet_weights=imagenet_weights)
        self.batch_norm = batch_norm
        self.small_input = small_input
        self.init_weights(self)

    def external_key(self, key: str) -> str | None:
        """torchvision ``features.<i>.*`` -> ``trunk.<i>.*`` / ``last_block.<i>.*``; ``classifier.*`` dropped."""
        return features_key(key, self)


@register_backbone("vgg16")
def vgg16(*, in_chans: int = 3, batch_norm: bool = True, small_input: bool = False) -> Backbone:
    """VGG-16 (BN by default) features: 13 conv layers, out_dim 512."""
    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    return VGG("vgg16", VGG16_CONFIG, in_chans=in_chans, batch_norm=batch_norm, small_input=small_input,
               imagenet_weights=weights)

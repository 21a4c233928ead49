"""The :class:`Backbone` interface every ltlib feature extractor implements.

A backbone is split in two submodules so that methods can reuse or duplicate its end:

* ``trunk``: everything before the last residual block (stem and all earlier stages);
* ``last_block``: the last residual block (or last stage, for networks without residual blocks).

``forward_features(x) = last_block(trunk(x))`` is the unpooled map ``[B, out_dim, H, W]`` (what the
two-head model's grouped-convolution head consumes), ``pool`` is global average pooling, and
``forward(x) = pool(forward_features(x))`` gives ``[B, out_dim]``. BBN's re-balancing branch is
``copy_last_block()``: a duplicate of ``last_block`` with freshly initialised parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from ltlib.errors import LtlibError

_OWN_PREFIXES = ("trunk.", "last_block.")


class Backbone(nn.Module):
    """A feature extractor without classifier: ``trunk`` then ``last_block`` then global average pooling.

    Attributes:
        arch: the registry name the backbone was built as (used in error messages).
        out_dim: channels of the feature map, i.e. the size of the pooled feature vector.
        trunk: every layer before the last residual block.
        last_block: the last residual block; its output has ``out_dim`` channels.
        imagenet_weights: the torchvision weights ``pretrained=True`` loads, or None when there are none.
    """

    def __init__(self, trunk: nn.Module, last_block: nn.Module, out_dim: int, *, arch: str,
                 imagenet_weights: WeightsEnum | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.last_block = last_block
        self.out_dim = out_dim
        self.arch = arch
        self.imagenet_weights = imagenet_weights

    @property
    def num_features(self) -> int:
        """Size of the pooled feature vector; the timm name for :attr:`out_dim`."""
        return self.out_dim

    def forward_features(self, x: Tensor) -> Tensor:
        """The unpooled feature map ``[B, out_dim, H, W]``: ``last_block(trunk(x))``."""
        return self.last_block(self.trunk(x))

    def pool(self, fmap: Tensor) -> Tensor:
        """Global average pooling of a feature map ``[B, C, H, W]`` to ``[B, C]``."""
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, out_dim]``: ``pool(forward_features(x))``."""
        return self.pool(self.forward_features(x))

    def copy_last_block(self) -> nn.Module:
        """A deep copy of ``last_block`` (same structure, device and dtype, no shared storage) whose
        parameters and normalisation statistics are re-initialised with this backbone's scheme."""
        block = copy.deepcopy(self.last_block)
        self.init_weights(block)
        return block

    def init_weights(self, module: nn.Module) -> None:
        """Re-initialise every layer inside ``module`` with this backbone's initialisation scheme."""
        for layer in module.modules():
            self.init_layer(layer)

    def init_layer(self, layer: nn.Module) -> None:
        """Initialise one layer; other layer types are left alone.

        The default is torchvision's scheme for ResNet, VGG and MobileNet-v2: Kaiming-normal conv
        weights (``fan_out``, ReLU gain), zero biases, batch norm reset to weight 1, bias 0 and fresh
        running statistics, linear weights N(0, 0.01).
        """
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_parameters()
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def pretrained_weights(self) -> WeightsEnum:
        """The torchvision ImageNet weights ``pretrained=True`` loads; LtlibError where there are none."""
        if self.imagenet_weights is None:
            raise LtlibError(f"backbone {self.arch!r} has no downloadable pretrained weights; "
                             "pass pretrained_path=FILE (a saved state dict) or use pretrained=False")
        return self.imagenet_weights

    def external_key(self, key: str) -> str | None:
        """Map a key of an external (torchvision) state dict to this backbone's key; None drops it.

        The default keeps the key: such backbones load only state dicts saved from ltlib itself.
        """
        return key

    def remap_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Translate a state dict to this backbone's keys; keys already in ltlib form are kept."""
        remapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            new_key = key if key.startswith(_OWN_PREFIXES) else self.external_key(key)
            if new_key is not None:
                remapped[new_key] = value
        return remapped

    def load_pretrained(self, state_dict: Mapping[str, Tensor], *, source: str) -> None:
        """Load ``state_dict`` (torchvision or ltlib format) strictly, classifier keys aside.

        Raises LtlibError, naming ``source``, when keys are missing or unexpected or shapes differ.
        Missing ``num_batches_tracked`` buffers (old torchvision files) keep their current value.
        """
        remapped = self.remap_state_dict(state_dict)
        own = self.state_dict()
        for key, value in own.items():
            if key.endswith("num_batches_tracked") and key not in remapped:
                remapped[key] = value
        problems = state_dict_mismatches(own, remapped, there="in the file", here="in the model")
        if problems:
            raise LtlibError(f"pretrained weights {source} do not fit backbone {self.arch!r}: "
                             + "; ".join(problems))
        self.load_state_dict(remapped, strict=True)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, out_dim={self.out_dim}"


def features_key(key: str, backbone: Backbone, *, features: str = "features",
                 dropped: tuple[str, ...] = ("classifier.",)) -> str | None:
    """Map ``features.<i>.<rest>`` of a torchvision ``features`` Sequential to ``trunk.<i>.<rest>`` or
    ``last_block.<i>.<rest>`` (the split Sequentials keep torchvision's indices); drop ``dropped``."""
    if key.startswith(dropped):
        return None
    head, _, rest = key.partition(".")
    index, _, tail = rest.partition(".")
    if head != features:
        return key
    for name in ("trunk", "last_block"):
        container = getattr(backbone, name)
        if isinstance(container, nn.Sequential) and index in dict(container.named_children()):
            return f"{name}.{index}.{tail}"
    return key


def state_dict_mismatches(own: Mapping[str, Tensor], state: Mapping[str, Tensor], *, there: str = "there",
                          here: str = "here") -> list[str]:
    """What keeps ``state`` from loading strictly where ``own`` is the module's state dict: missing and
    unexpected keys, and the first shape that differs; empty when it fits."""
    problems = []
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            problems.append(f"{key} has shape {list(value.shape)} {there} but {list(own[key].shape)} {here}")
            break
    return problems


def _some(keys: list[str], limit: int = 3) -> str:
    """``keys`` shortened for a one-line message: the first ``limit`` and how many there are."""
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} keys ({shown}{', ...' if len(keys) > limit else ''})"

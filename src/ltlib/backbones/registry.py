"""The backbone registry: ``register_backbone``, ``create_backbone`` and ``list_backbones``.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``. A registered factory is a
function ``factory(*, in_chans: int = 3, <model options>) -> Backbone``; pretrained weights are
handled here, once for all backbones, through :meth:`Backbone.pretrained_weights` and
:meth:`Backbone.load_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ltlib.backbones.base import Backbone
from ltlib.backbones.pretrained import download_state_dict, read_state_dict
from ltlib.errors import LtlibError
from ltlib.registry import Registry

BackboneFactory = Callable[..., Backbone]
FactoryT = TypeVar("FactoryT", bound=BackboneFactory)

_BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def register_backbone(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator adding a backbone factory to the registry under ``name``.

    Registering a different function under a taken name raises ValueError (re-registering the same
    function, e.g. after a module reload, replaces it).
    """
    return _BACKBONES.register(name)


def list_backbones(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered backbones, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"resnet*"``; case-sensitive)."""
    return _BACKBONES.names(pattern)


def create_backbone(name: str, *, pretrained: bool = False, pretrained_path: str | None = None,
                    in_chans: int = 3, **kwargs: Any) -> Backbone:
    """Build the backbone registered as ``name``.

    Args:
        name: a name from :func:`list_backbones`.
        pretrained: load torchvision's ImageNet weights (downloaded once into torch's hub cache).
            They are RGB, so this needs ``in_chans=3``.
        pretrained_path: a local state dict (torchvision or ltlib format, e.g. from
            ``torch.save(model.state_dict(), FILE)``) to load instead of downloading; classifier keys
            are ignored, every other key must match. Implies pretrained weights whatever
            ``pretrained`` says.
        in_chans: number of input channels (1 for grey-scale images).
        **kwargs: options of that backbone, e.g. ``small_input=True``.

    Raises:
        LtlibError: unknown name, unknown or ill-typed option, or unavailable/unfitting weights.
    """
    _BACKBONES.check_options(name, kwargs, exclude=("in_chans",))
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise LtlibError(f"in_chans={in_chans!r} for backbone {name!r} is out of range; allowed: an integer >= 1")
    if pretrained and pretrained_path is None and in_chans != 3:
        raise LtlibError(f"pretrained=True loads RGB ImageNet weights but in_chans={in_chans} for backbone "
                         f"{name!r}; use in_chans=3, pretrained=False or pretrained_path=FILE")

    backbone = _BACKBONES.build(name, kwargs, in_chans=in_chans)
    if pretrained_path is not None:
        backbone.load_pretrained(read_state_dict(pretrained_path), source=f"pretrained_path={pretrained_path!r}")
    elif pretrained:
        weights = backbone.pretrained_weights()
        backbone.load_pretrained(download_state_dict(weights, name), source=str(weights))
    return backbone

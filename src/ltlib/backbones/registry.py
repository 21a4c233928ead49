"""The backbone registry: ``register_backbone``, ``create_backbone`` and ``list_backbones``.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``. A registered factory is a
function ``factory(*, in_chans: int = 3, <model options>) -> Backbone``; pretrained weights are
handled here, once for all backbones, through :meth:`Backbone.pretrained_weights` and
:meth:`Backbone.load_pretrained`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from ltlib.backbones.base import Backbone
from ltlib.backbones.pretrained import download_state_dict, read_state_dict
from ltlib.errors import LtlibError, unknown_name

BackboneFactory = Callable[..., Backbone]
FactoryT = TypeVar("FactoryT", bound=BackboneFactory)

_BACKBONES: dict[str, BackboneFactory] = {}
# Option annotations whose values create_backbone type-checks (strings: postponed annotations).
_CHECKED_TYPES: dict[object, type] = {bool: bool, "bool": bool, int: int, "int": int, float: float, "float": float}


def register_backbone(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator adding a backbone factory to the registry under ``name``.

    Registering a different function under a taken name raises ValueError (re-registering the same
    function, e.g. after a module reload, replaces it).
    """

    def decorator(factory: FactoryT) -> FactoryT:
        existing = _BACKBONES.get(name)
        if existing is not None and _qualified(existing) != _qualified(factory):
            raise ValueError(f"backbone {name!r} is already registered by {_qualified(existing)}")
        _BACKBONES[name] = factory
        return factory

    return decorator


def list_backbones(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered backbones, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"resnet*"``; case-sensitive)."""
    names = sorted(_BACKBONES)
    return names if pattern is None else [name for name in names if fnmatchcase(name, pattern)]


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
    factory = _BACKBONES.get(name)
    if factory is None:
        raise unknown_name("backbone", name, list_backbones())
    _check_kwargs(name, factory, kwargs)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise LtlibError(f"in_chans={in_chans!r} for backbone {name!r} is out of range; allowed: an integer >= 1")
    if pretrained and pretrained_path is None and in_chans != 3:
        raise LtlibError(f"pretrained=True loads RGB ImageNet weights but in_chans={in_chans} for backbone "
                         f"{name!r}; use in_chans=3, pretrained=False or pretrained_path=FILE")

    try:
        backbone = factory(in_chans=in_chans, **kwargs)
    except TypeError as exc:  # a bad option the signature check could not see (e.g. behind **kwargs)
        if not kwargs:
            raise
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise LtlibError(f"backbone {name!r} rejected its options {kwargs!r}: {reason}") from exc
    if pretrained_path is not None:
        backbone.load_pretrained(read_state_dict(pretrained_path), source=f"pretrained_path={pretrained_path!r}")
    elif pretrained:
        weights = backbone.pretrained_weights()
        backbone.load_pretrained(download_state_dict(weights, name), source=str(weights))
    return backbone


def _check_kwargs(name: str, factory: BackboneFactory, kwargs: dict[str, Any]) -> None:
    """Reject options ``factory`` does not take, and bool/int/float options of the wrong type, with
    a one-line LtlibError naming the option and the backbone (before anything is built)."""
    signature = inspect.signature(factory)
    options = {key: param for key, param in signature.parameters.items()
               if key != "in_chans" and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)}
    takes_any = any(param.kind is param.VAR_KEYWORD for param in signature.parameters.values())
    for key, value in kwargs.items():
        if key not in options:
            if takes_any:
                continue
            allowed = ", ".join(options) or "none"
            raise LtlibError(f"backbone {name!r} got an unknown option {key!r}; allowed: {allowed}")
        expected = _CHECKED_TYPES.get(options[key].annotation)
        if expected is not None and not _is_instance(value, expected):
            raise LtlibError(f"backbone {name!r} option {key}={value!r} must be {expected.__name__}")


def _is_instance(value: object, expected: type) -> bool:
    """isinstance for bool/int/float options: bools are not numbers, ints are valid floats."""
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


def _qualified(factory: BackboneFactory) -> str:
    """``module.qualname`` of a factory, for duplicate-registration checks and messages."""
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"

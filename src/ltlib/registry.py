"""One registry type for every kind of named, swappable part (backbones, losses), in the style of timm's
``_registry.py``: a decorator registers a factory (a function or a class) under a name, ``names()`` lists
what exists, and ``build()`` checks the options against the factory's signature before calling it, so a
typo is one line naming the part and what it accepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import Any, Generic, TypeVar

from ltlib.errors import LtlibError, unknown_name

F = TypeVar("F", bound=Callable[..., Any])
#: option annotations whose values are type-checked (strings: postponed annotations)
_CHECKED_TYPES: dict[object, type] = {bool: bool, "bool": bool, int: int, "int": int, float: float,
                                      "float": float, str: str, "str": str}


class Registry(Generic[F]):
    """Factories of one ``kind`` of part by name.

    Args:
        kind: what the parts are, in messages ("backbone", "loss").
        base: if given, only subclasses of this class can be registered.
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind, self.base = kind, base
        self._factories: dict[str, F] = {}

    def copy(self) -> Registry[F]:
        """An independent registry with the same entries (tests register into a copy)."""
        twin: Registry[F] = Registry(self.kind, self.base)
        twin._factories = dict(self._factories)
        return twin

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding a factory under ``name``. A different factory under a taken name raises
        ValueError (re-registering the same one, e.g. after a module reload, replaces it)."""

        def decorator(factory: F) -> F:
            if self.base is not None and not (isinstance(factory, type) and issubclass(factory, self.base)):
                raise TypeError(f"register({name!r}) decorates {self.base.__name__} subclasses; got {factory!r}")
            existing = self._factories.get(name)
            if existing is not None and qualified_name(existing) != qualified_name(factory):
                raise ValueError(f"{self.kind} {name!r} is already registered by {qualified_name(existing)}")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by an fnmatch ``pattern`` (case-sensitive)."""
        names = sorted(self._factories)
        return names if pattern is None else [name for name in names if fnmatchcase(name, pattern)]

    def get(self, name: str) -> F:
        factory = self._factories.get(name)
        if factory is None:
            raise unknown_name(self.kind, name, self.names())
        return factory

    def options(self, name: str, exclude: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
        """The keyword-usable parameters of ``name``'s factory, but ``exclude``."""
        skip = set(exclude)
        return {key: param for key, param in inspect.signature(self.get(name)).parameters.items()
                if key not in skip and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)}

    def check_options(self, name: str, kwargs: dict[str, Any], exclude: Iterable[str] = ()) -> None:
        """Reject options the factory does not take (unless it takes ``**kwargs``) and bool/int/float/str
        options of the wrong type, with one line naming the option and the part, before anything is built."""
        options = self.options(name, exclude)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(self.get(name)).parameters.values())
        for key, value in kwargs.items():
            if key not in options:
                if takes_any:
                    continue
                raise LtlibError(f"{self.kind} {name!r} got an unknown option {key!r}; allowed: "
                                 f"{', '.join(options) or 'none'}")
            expected = _CHECKED_TYPES.get(options[key].annotation)
            if expected is not None and not _is_instance(value, expected):
                raise LtlibError(f"{self.kind} {name!r} option {key}={value!r} must be {expected.__name__}")

    def build(self, name: str, kwargs: dict[str, Any], **fixed: Any) -> Any:
        """``factory(**fixed, **kwargs)``; a TypeError the signature check could not see (options behind
        ``**kwargs``) becomes one line naming the user's ``kwargs``."""
        try:
            return self.get(name)(**fixed, **kwargs)
        except TypeError as exc:
            if not kwargs:
                raise
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise LtlibError(f"{self.kind} {name!r} rejected its options {kwargs!r}: {reason}") from exc


def _is_instance(value: object, expected: type) -> bool:
    """isinstance for options: bools are not numbers, ints are valid floats."""
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


def qualified_name(factory: object) -> str:
    """``module.qualname`` of a factory, for duplicate-registration checks and messages."""
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"

"""User-facing errors.

Every mistake a user can make on the command line (an unknown name, a bad value, a missing file)
raises :class:`LtlibError` with a one-line message that names the bad value and what is allowed.
``ltlib.run`` prints such errors as a single line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence


class LtlibError(ValueError):
    """A clear, one-line error about bad user input or a missing resource."""


def unknown_name(kind: str, name: object, known: Iterable[str]) -> LtlibError:
    """Build the standard error for an unknown registry name, listing what exists."""
    return LtlibError(f"unknown {kind} {name!r}; available: {', '.join(sorted(known))}")


def check_in_range(name: str, value: float, low: float | None = None, high: float | None = None,
                   *, low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Return ``value`` if it lies in the interval, else raise an :class:`LtlibError` naming it."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise LtlibError(f"{name}={value!r} is out of range; allowed: {lo}, {hi}")
    return value


def check_choice(key: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise :func:`unknown_name`'s one line (the key, the value
    and the choices)."""
    if not isinstance(value, str) or value not in allowed:
        raise unknown_name(key, value, allowed)
    return value


def check_int(key: str, value: object, low: int | None = None, *, optional: bool = False,
              meaning: str = "") -> int | None:
    """Return ``value`` as an int if it is an integer (not a bool) ``>= low`` (or None with ``optional``), else
    raise one line naming the key, the value and what is allowed (``meaning`` says what the number counts)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        allowed = "an integer" + (f" >= {low}" if low is not None else "") + (" or null" if optional else "")
        raise LtlibError(f"{key}={value!r} is invalid; allowed: {allowed}" + (f" ({meaning})" if meaning else ""))
    return int(value)


def find_user_error(exc: BaseException) -> LtlibError | None:
    """The LtlibError behind ``exc`` (Hydra's instantiate and DataLoader workers wrap it), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LtlibError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

"""User-facing errors.

Every mistake a user can make on the command line (an unknown name, a bad value, a missing file)
raises :class:`LtlibError` with a one-line message that names the bad value and what is allowed.
``ltlib.run`` prints such errors as a single line and exits with status 2, without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


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

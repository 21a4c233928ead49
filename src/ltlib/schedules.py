"""Schedules of training progress: BBN's cumulative-learning adaptors and FBL's curricula.

Every schedule maps training progress ``p`` in [0, 1] (0 at the start, 1 at the end) to a weight.
BBN (section 4.2, table 4, supplementary figure 7) calls them *adaptors* and uses them as the
conventional-branch weight alpha; the feature-balanced loss (FBL, eq. 8 and table 4) uses them as
the stimulus strength alpha(t). One registry serves both, so ablations read the same names.

>>> get_schedule("parabolic_decay")(0.5)
0.75
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ltlib.data.samplers import mix_seed
from ltlib.errors import unknown_name

Schedule = Callable[[float], float]

_SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    def wrap(fn: Schedule) -> Schedule:
        _SCHEDULES[name] = fn
        return fn
    return wrap


@register_schedule("parabolic_decay")
def parabolic_decay(p: float) -> float:
    """BBN's default adaptor, alpha = 1 - (T / T_max)^2 (BBN eq. 3 context, table 4)."""
    return 1.0 - p * p


@register_schedule("linear_decay")
def linear_decay(p: float) -> float:
    """alpha = 1 - T / T_max (BBN table 4; FBL table 4 "linear decrease")."""
    return 1.0 - p


@register_schedule("cosine_decay")
def cosine_decay(p: float) -> float:
    """alpha = cos(pi/2 * T / T_max) (BBN table 4)."""
    return math.cos(math.pi / 2.0 * p)


@register_schedule("equal_weight")
def equal_weight(p: float) -> float:
    """alpha = 0.5 throughout (BBN table 4)."""
    return 0.5


@register_schedule("parabolic_increment")
def parabolic_increment(p: float) -> float:
    """alpha = (T / T_max)^2 (BBN table 4; FBL's default "parabolic increase", eq. 8)."""
    return p * p


@register_schedule("linear_increment")
def linear_increment(p: float) -> float:
    """alpha = T / T_max (FBL table 4 "linear increase")."""
    return p


@register_schedule("sine_increment")
def sine_increment(p: float) -> float:
    """alpha = sin(pi/2 * T / T_max) (FBL table 4 "sine increase")."""
    return math.sin(math.pi / 2.0 * p)


@register_schedule("cosine_increment")
def cosine_increment(p: float) -> float:
    """alpha = 1 - cos(pi/2 * T / T_max) (FBL table 4 "cosine increase")."""
    return 1.0 - math.cos(math.pi / 2.0 * p)


class BetaSchedule:
    """alpha ~ Beta(a, b), drawn afresh at each call (BBN table 4, "beta distribution").

    :meth:`draw` makes the draw a function of ``(seed, key)``: BBN keys it by the optimiser step (the
    official code draws once per iteration) or the epoch, so that every step draws anew, also past the
    adaptor's horizon, different seeds draw different sequences, and a resumed run draws the same
    values. Called as a schedule, ``p`` is the key (``(seed, round(p * 1e9))``).
    """

    def __init__(self, a: float = 0.2, b: float = 0.2, seed: int = 0) -> None:
        self.a, self.b, self.seed = a, b, seed

    def draw(self, key: int, seed: int | None = None) -> float:
        """One Beta(a, b) value, a function of ``(seed, key)`` only."""
        seed = self.seed if seed is None else seed
        return float(np.random.default_rng(mix_seed(_BETA_STREAM, seed, key)).beta(self.a, self.b))

    def __call__(self, p: float) -> float:
        return self.draw(int(round(p * 1e9)))


#: Keeps the Beta adaptor's generator apart from any other stream seeded by (seed, key).
_BETA_STREAM = 0xBE7A


_SCHEDULES["beta"] = BetaSchedule()


def list_schedules() -> list[str]:
    """Names accepted by :func:`get_schedule`."""
    return sorted(_SCHEDULES)


def get_schedule(name: str) -> Schedule:
    """Return the schedule registered under ``name`` (a clear error lists the known names)."""
    try:
        return _SCHEDULES[name]
    except KeyError:
        raise unknown_name("schedule", name, _SCHEDULES) from None

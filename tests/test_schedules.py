"""Every named schedule at chosen progress values, against its formula."""

import math

import numpy as np
import pytest

from ltlib.errors import LtlibError
from ltlib.schedules import BetaSchedule, get_schedule, list_schedules

FORMULAS = {
    "parabolic_decay": lambda p: 1 - p**2,
    "linear_decay": lambda p: 1 - p,
    "cosine_decay": lambda p: math.cos(math.pi * p / 2),
    "equal_weight": lambda p: 0.5,
    "parabolic_increment": lambda p: p**2,
    "linear_increment": lambda p: p,
    "sine_increment": lambda p: math.sin(math.pi * p / 2),
    "cosine_increment": lambda p: 1 - math.cos(math.pi * p / 2),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_schedule_matches_formula(name, p):
    assert get_schedule(name)(p) == pytest.approx(FORMULAS[name](p), abs=1e-12)


def test_bbn_official_alpha_at_epochs():
    # Official BBN: alpha = 1 - ((epoch - 1) / T_max)^2 with epochs counted from 1; ltlib's progress
    # is current_epoch / max_epochs with current_epoch counted from 0.
    alpha = get_schedule("parabolic_decay")
    for epoch in (1, 50, 101, 200):
        assert alpha((epoch - 1) / 200) == pytest.approx(1 - ((epoch - 1) / 200) ** 2)


def test_beta_schedule_is_seeded_and_beta_distributed():
    beta = BetaSchedule(0.2, 0.2, seed=3)
    assert beta(0.3) == beta(0.3)
    draws = np.array([beta(i / 4000) for i in range(4000)])
    assert ((draws >= 0) & (draws <= 1)).all()
    # Beta(0.2, 0.2): mean 0.5, variance ab / ((a+b)^2 (a+b+1)) = 0.04 / (0.16 * 1.4) = 0.1786
    assert draws.mean() == pytest.approx(0.5, abs=0.03)
    assert draws.var() == pytest.approx(0.04 / (0.16 * 1.4), abs=0.02)


def test_unknown_schedule_lists_names():
    with pytest.raises(LtlibError) as info:
        get_schedule("parabolic")
    assert "'parabolic'" in str(info.value) and "parabolic_decay" in str(info.value)
    assert "beta" in list_schedules()

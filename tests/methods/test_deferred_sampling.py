"""Deferred samplers (DRS): the switch epoch, determinism, the spec grammar and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from ltlib.data import ClassBalancedSampler, UniformSampler, create_sampler
from ltlib.data.deferred import DeferredSampler, deferred_sampler_spec, parse_deferred_spec
from ltlib.errors import LtlibError

COUNTS = np.array([400, 120, 40, 12, 4])
TARGETS = np.random.default_rng(1).permutation(np.repeat(np.arange(COUNTS.size), COUNTS))


def draws(sampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 3)])
def test_switches_at_exactly_the_configured_epoch(rank, world_size) -> None:
    deferred = create_sampler("uniform>class_balanced@3", TARGETS, seed=7, rank=rank, world_size=world_size)
    assert isinstance(deferred, DeferredSampler) and deferred.switch_epoch == 3
    uniform = UniformSampler(TARGETS.size, seed=7, rank=rank, world_size=world_size)
    balanced = ClassBalancedSampler(TARGETS, seed=7, rank=rank, world_size=world_size)
    assert len(deferred) == len(uniform) == len(balanced)
    for epoch in (0, 2):  # before: exactly the uniform sampler's epoch
        assert draws(deferred, epoch) == draws(uniform, epoch)
    for epoch in (3, 4):  # from the switch on: exactly the class-balanced sampler's epoch
        assert draws(deferred, epoch) == draws(balanced, epoch)
    # going back (resuming from an earlier checkpoint) goes back to the first sampler
    assert draws(deferred, 2) == draws(uniform, 2)


def test_the_two_phases_have_the_two_distributions() -> None:
    deferred = create_sampler("uniform>class_balanced@1", TARGETS, seed=0)
    before = np.bincount(TARGETS[draws(deferred, 0)], minlength=COUNTS.size)
    assert before.tolist() == COUNTS.tolist()  # every image exactly once
    after = np.concatenate([TARGETS[draws(deferred, e)] for e in range(1, 21)])
    freq = np.bincount(after, minlength=COUNTS.size) / after.size
    n, p = after.size, 1 / COUNTS.size
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n)), freq


def test_spec_helpers_round_trip() -> None:
    spec = deferred_sampler_spec("uniform", "reversed", 160)
    assert spec == "uniform>reversed@160"
    assert parse_deferred_spec(" uniform > reversed @ 160 ") == ("uniform", "reversed", 160)


@pytest.mark.parametrize("spec,expected", [
    ("uniform>balanced@160", "unknown sampler 'balanced'; available: class_balanced, reversed, square_root, uniform"),
    ("uniform>class_balanced", "expected '<before>><after>@<epoch>'"),
    ("uniform>class_balanced@-1", "switch epoch '-1' is invalid"),
    ("uniform>class_balanced@1.5", "switch epoch '1.5' is invalid"),
])
def test_bad_specs_are_one_line_errors(spec, expected) -> None:
    with pytest.raises(LtlibError) as info:
        create_sampler(spec, TARGETS, seed=0)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_samplers_of_different_lengths_cannot_be_switched() -> None:
    with pytest.raises(LtlibError, match="equal length"):
        DeferredSampler(UniformSampler(10), ClassBalancedSampler(TARGETS), 1)

"""Long-tail counts and the canonical LDAM-DRW subsets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import pytest

from ltlib.data import indices_hash, long_tail_counts, long_tail_split, select_long_tail
from ltlib.errors import LtlibError

# CIFAR-10-LT, ratio 100, subset seed 0, on CIFAR-10's original training order: computed once with
# ltlib and checked below against an independent LDAM-style implementation and hashlib.
CIFAR10_LT100_HASH = "4bf45bff8878d278"


@pytest.mark.parametrize(("max_count", "num_classes", "ratio", "total"), [
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431),
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573),
])
def test_exp_counts_match_published_totals(max_count: int, num_classes: int, ratio: float, total: int) -> None:
    counts = long_tail_counts(max_count, num_classes, ratio)
    assert sum(counts) == total
    assert len(counts) == num_classes
    assert counts[0] == max_count
    assert counts[-1] == max_count // ratio
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_exp_counts_cifar10_ratio100_per_class() -> None:
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_step_counts_and_edge_cases() -> None:
    assert long_tail_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    assert long_tail_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]
    assert long_tail_counts(700, 1, 100) == [700]
    assert long_tail_counts(30, 4, 1) == [30, 30, 30, 30]


@pytest.mark.parametrize(("args", "bad"), [
    ((5000, 10, 0.5), "imbalance_ratio=0.5"),
    ((5000, 0, 10), "num_classes=0"),
    ((0, 10, 10), "max_count=0"),
    ((5000, 10, 10, "linear"), "'linear'"),
    ((5000, 10, float("nan")), "imbalance_ratio=nan"),
])
def test_counts_reject_bad_input_in_one_line(args: tuple, bad: str) -> None:
    with pytest.raises(LtlibError) as info:
        long_tail_counts(*args)
    message = str(info.value)
    assert bad in message and "\n" not in message


@pytest.mark.parametrize("seed", [0, 7])
def test_selection_matches_ldam_on_shuffled_synthetic_targets(seed: int, ldam: Callable) -> None:
    targets = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 5000))
    counts = long_tail_counts(5000, 10, 100)
    ours = select_long_tail(targets, counts, seed=seed)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ldam(targets, counts, seed=seed))
    np.testing.assert_array_equal(np.bincount(targets[ours], minlength=10), counts)


def test_selection_matches_ldam_on_real_cifar10_order(cifar10_train_labels: np.ndarray, ldam: Callable) -> None:
    for ratio in (100, 50, 10):
        counts = long_tail_counts(5000, 10, ratio)
        np.testing.assert_array_equal(select_long_tail(cifar10_train_labels, counts),
                                      ldam(cifar10_train_labels, counts))


def test_cifar10_lt100_hash_is_stable(cifar10_train_labels: np.ndarray, ldam: Callable) -> None:
    counts = long_tail_counts(5000, 10, 100)
    reference = ldam(cifar10_train_labels, counts)
    independent = hashlib.sha256(reference.astype("<i8").tobytes()).hexdigest()[:16]
    assert independent == CIFAR10_LT100_HASH
    assert indices_hash(select_long_tail(cifar10_train_labels, counts, seed=0)) == CIFAR10_LT100_HASH


def test_split_keeps_and_leaves_out_every_image_once() -> None:
    targets = np.random.default_rng(0).integers(0, 4, 400)
    counts = [int(n) for n in np.bincount(targets) // 2]
    split = long_tail_split(targets, counts, seed=3)
    for c in range(4):
        kept, left = split.kept[c], split.left_out[c]
        assert kept.size == counts[c]
        assert np.all(targets[kept] == c) and np.all(targets[left] == c)
        np.testing.assert_array_equal(np.sort(np.concatenate([kept, left])), np.flatnonzero(targets == c))
    np.testing.assert_array_equal(split.indices, select_long_tail(targets, counts, seed=3))


def test_selection_errors() -> None:
    targets = np.array([0, 0, 1, 1, 1, 3])
    with pytest.raises(LtlibError, match="class 2 has no images"):
        select_long_tail(targets, [1, 1, 1, 1])
    with pytest.raises(LtlibError, match="class 0 has 2 images but 3 were requested"):
        select_long_tail(targets, [3, 1, 1, 1])
    with pytest.raises(LtlibError, match="allowed labels: 0..1"):
        select_long_tail(targets, [1, 1])


def test_indices_hash_is_sha256_of_int64_little_endian() -> None:
    values = [3, 1, 2]
    expected = hashlib.sha256(b"".join(v.to_bytes(8, "little", signed=True) for v in values)).hexdigest()[:16]
    assert indices_hash(values) == expected
    assert indices_hash(np.array(values, dtype=np.int32)) == expected
    assert indices_hash([1, 2, 3]) != expected
    assert len(expected) == 16

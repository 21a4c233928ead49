"""Long-tail class counts and the canonical long-tailed subsets of a balanced training set.

The rule is the one the field's CIFAR-LT benchmarks use (Cao et al., "LDAM-DRW", NeurIPS 2019,
``imbalance_cifar.py``): class ``i`` of ``C`` keeps ``n_i = int(n_max * (1 / rho) ** (i / (C - 1)))``
images (the "exp" profile, rho = n_max / n_min the imbalance ratio), and the kept images of a class
are the first ``n_i`` of its index list after one NumPy shuffle, with a single random stream seeded
once and consumed class by class in label order. BBN, the feature-balanced loss and most later
papers train on exactly these subsets, so reproducing them bit for bit matters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ltlib.errors import LtlibError, unknown_name

PROFILES = ("exp", "step")


def long_tail_counts(max_count: int, num_classes: int, imbalance_ratio: float,
                     profile: str = "exp") -> list[int]:
    """Images per class of a long-tailed subset, class 0 the largest.

    ``exp``: ``n_i = int(max_count * (1 / ratio) ** (i / (C - 1)))`` (exponential decay, LDAM-DRW);
    computed in exactly this order of float operations, so the totals match the published subsets
    (CIFAR-10, ratio 100: 12,406 images; CIFAR-100, ratio 100: 10,847).
    ``step``: the first ``C // 2`` classes keep ``max_count``, the others ``int(max_count * (1 / ratio))``.
    """
    if profile not in PROFILES:
        raise unknown_name("long-tail profile", profile, PROFILES)
    if int(max_count) != max_count or max_count < 1:
        raise LtlibError(f"max_count={max_count!r} is invalid; allowed: an integer >= 1")
    if int(num_classes) != num_classes or num_classes < 1:
        raise LtlibError(f"num_classes={num_classes!r} is invalid; allowed: an integer >= 1")
    if not imbalance_ratio >= 1.0:  # also rejects NaN
        raise LtlibError(f"imbalance_ratio={imbalance_ratio!r} is invalid; allowed: a number >= 1 "
                         "(largest class size / smallest class size)")
    max_count, num_classes = int(max_count), int(num_classes)
    if num_classes == 1:
        return [max_count]
    factor = 1.0 / float(imbalance_ratio)
    if profile == "exp":
        return [int(max_count * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    head = num_classes // 2
    return [max_count] * head + [int(max_count * factor)] * (num_classes - head)


@dataclass(frozen=True)
class LongTailSplit:
    """The outcome of :func:`long_tail_split`, per class in label order.

    ``kept[c]`` are the selected indices of class ``c`` and ``left_out[c]`` the others, both in the
    order of that class's shuffled index list (``kept[c]`` followed by ``left_out[c]`` is the whole
    shuffled list).
    """

    kept: list[np.ndarray]
    left_out: list[np.ndarray]

    @property
    def indices(self) -> np.ndarray:
        """All selected indices, class by class (the canonical subset, as :func:`select_long_tail`)."""
        return np.concatenate(self.kept).astype(np.int64, copy=False)


def long_tail_split(targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0) -> LongTailSplit:
    """Select ``counts[c]`` images of every class ``c`` with the LDAM-DRW rule, keeping the rest too.

    One ``np.random.RandomState(seed)`` (the stream of ``np.random.seed(seed)``); for each class in
    label order its indices ``np.where(targets == c)[0]`` are shuffled in place and the first
    ``counts[c]`` are kept.
    """
    labels = np.asarray(targets)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise LtlibError(f"targets must be a 1-D sequence of integer labels; got shape {labels.shape}, "
                         f"dtype {labels.dtype}")
    num_classes = len(counts)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise LtlibError(f"targets hold labels in [{labels.min()}, {labels.max()}] but counts are given for "
                         f"{num_classes} classes; allowed labels: 0..{num_classes - 1}")
    rng = np.random.RandomState(seed)
    kept: list[np.ndarray] = []
    left_out: list[np.ndarray] = []
    for c, wanted in enumerate(counts):
        idx = np.where(labels == c)[0]
        if idx.size == 0:
            raise LtlibError(f"class {c} has no images; every class needs at least one to subsample")
        if wanted < 0 or wanted > idx.size:
            raise LtlibError(f"class {c} has {idx.size} images but {wanted} were requested; "
                             f"allowed: 0..{idx.size}")
        rng.shuffle(idx)
        kept.append(idx[:wanted].astype(np.int64))
        left_out.append(idx[wanted:].astype(np.int64))
    return LongTailSplit(kept=kept, left_out=left_out)


def select_long_tail(targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """The canonical long-tailed subset: indices into ``targets``, class by class (LDAM-DRW rule).

    See :func:`long_tail_split` for the rule and for the left-out indices of every class.
    """
    return long_tail_split(targets, counts, seed).indices


def indices_hash(indices: Sequence[int] | np.ndarray) -> str:
    """A short fingerprint of an index list: the first 16 hex digits of the SHA-256 of the indices,
    in order, as little-endian int64 bytes."""
    data = np.ascontiguousarray(np.asarray(indices, dtype="<i8"))
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]

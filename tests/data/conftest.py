"""Shared fixtures of the data tests: synthetic in-memory pools and the real CIFAR-10 label order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from tests.conftest import CIFAR10_SHARED as CIFAR10_DIR

from ltlib.data import ArrayPool


def make_array_pools(train_counts: Sequence[int], test_per_class: int = 4, *, size: int = 8, channels: int = 3,
                     seed: int = 0) -> tuple[ArrayPool, ArrayPool]:
    """Random uint8 images: ``train_counts[c]`` training and ``test_per_class`` test images of class c,
    with the classes interleaved (shuffled) in the training pool."""
    rng = np.random.default_rng(seed)
    names = [f"c{c}" for c in range(len(train_counts))]
    shape = (size, size, channels) if channels == 3 else (size, size)
    train_targets = rng.permutation(np.repeat(np.arange(len(train_counts)), train_counts))
    test_targets = np.repeat(np.arange(len(train_counts)), test_per_class)
    train = ArrayPool(rng.integers(0, 256, (train_targets.size, *shape), dtype=np.uint8), train_targets, names,
                      name="synthetic training images", tag="synthetic train")
    test = ArrayPool(rng.integers(0, 256, (test_targets.size, *shape), dtype=np.uint8), test_targets, names,
                     name="synthetic test images", tag="synthetic test")
    return train, test


@pytest.fixture
def array_pools() -> Callable[..., tuple[ArrayPool, ArrayPool]]:
    """:func:`make_array_pools`, as a fixture."""
    return make_array_pools


@pytest.fixture
def array_source() -> Callable[..., Callable[[], tuple[ArrayPool, ArrayPool]]]:
    """A factory of zero-argument sources over :func:`make_array_pools`."""

    def factory(train_counts: Sequence[int], test_per_class: int = 4, **kwargs) -> Callable[[], tuple[ArrayPool, ArrayPool]]:
        return lambda: make_array_pools(train_counts, test_per_class, **kwargs)

    return factory


@pytest.fixture(scope="session")
def cifar10_train_labels() -> np.ndarray:
    """CIFAR-10's 50,000 training labels in the original order (data_batch_1..5)."""
    path = CIFAR10_DIR / "original_order_labels.npz"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    with np.load(path) as data:
        return data["train_labels"].astype(np.int64)


@pytest.fixture(scope="session")
def cifar10_train_members() -> list[str]:
    """Names of the training images in the CIFAR-10 JPEG archive (train/<class>/<nnnn>.jpg), unextracted."""
    import tarfile

    path = CIFAR10_DIR / "cifar10-jpeg.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    with tarfile.open(path) as tar:
        return [m.name for m in tar if m.isfile() and m.name.startswith("train/")]


def ldam_select(targets: np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """An independent re-implementation of LDAM-DRW's ``gen_imbalanced_data`` selection, written the
    way its ``imbalance_cifar.py`` does it (global NumPy seed, ``np.random.shuffle``); the global RNG
    state is restored afterwards."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        targets_np = np.array(targets, dtype=np.int64)
        selected = []
        for the_class, the_img_num in zip(np.unique(targets_np), counts, strict=True):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            selected.extend(idx[:the_img_num].tolist())
        return np.array(selected, dtype=np.int64)
    finally:
        np.random.set_state(saved)


@pytest.fixture
def ldam() -> Callable[..., np.ndarray]:
    """:func:`ldam_select`, as a fixture."""
    return ldam_select

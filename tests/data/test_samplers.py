"""Samplers: statistics, determinism, sharding and aligned streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ltlib.data import (
    ClassAwareSampler,
    EvalShardSampler,
    MultiStreamDataset,
    ReversedSampler,
    StreamSampler,
    UniformSampler,
    create_sampler,
    list_samplers,
)
from ltlib.data.samplers import mix_seed, stream_id
from ltlib.errors import LtlibError

COUNTS = np.array([1000, 300, 100, 30, 10])
TARGETS = np.random.default_rng(0).permutation(np.repeat(np.arange(COUNTS.size), COUNTS))


def assert_frequencies(indices: list[int], expected_probs: np.ndarray, sigmas: float = 5.0) -> None:
    """Class frequencies within ``sigmas`` binomial standard deviations of ``n * P_c``."""
    n = len(indices)
    observed = np.bincount(TARGETS[indices], minlength=expected_probs.size)
    expected = n * expected_probs
    std = np.sqrt(n * expected_probs * (1 - expected_probs))
    assert np.all(np.abs(observed - expected) <= sigmas * std + 1e-9), (observed, expected)


@pytest.mark.parametrize(("name", "weights"), [
    ("class_balanced", np.ones(COUNTS.size)),
    ("reversed", COUNTS.max() / COUNTS),  # BBN eq. 4
    ("square_root", np.sqrt(COUNTS)),
])
def test_class_aware_frequencies(name: str, weights: np.ndarray) -> None:
    probs = weights / weights.sum()
    sampler = create_sampler(name, TARGETS, seed=5)
    np.testing.assert_allclose(sampler.class_probs.numpy(), probs, rtol=1e-12)
    draws: list[int] = []
    for epoch in range(200):  # 200 epochs x 1,440 = 288,000 draws
        sampler.set_epoch(epoch)
        draws.extend(sampler)
    assert_frequencies(draws, probs)


def test_class_aware_picks_images_uniformly_within_a_class() -> None:
    sampler = ClassAwareSampler(TARGETS, [0, 0, 0, 0, 1], seed=1, num_samples=50_000)  # only the rarest class
    draws = np.array(list(sampler))
    members = np.flatnonzero(TARGETS == 4)
    assert set(draws.tolist()) == set(members.tolist())
    per_image = np.array([(draws == m).sum() for m in members])
    p = 1 / members.size
    assert np.all(np.abs(per_image - 50_000 * p) <= 5 * math.sqrt(50_000 * p * (1 - p)))


def test_reversed_prefers_the_rarest_class() -> None:
    probs = ReversedSampler(TARGETS).class_probs.numpy()
    assert probs.argmax() == COUNTS.argmin() and probs.argmin() == COUNTS.argmax()
    np.testing.assert_allclose(probs[-1] / probs[0], COUNTS[0] / COUNTS[-1])


def test_square_root_sampling_per_image_probability() -> None:
    """An image of class c is drawn with probability proportional to N_c ** -1/2."""
    sqrt = create_sampler("square_root", TARGETS, seed=0).class_probs.numpy()
    per_image = sqrt / COUNTS  # P(class c) / N_c
    np.testing.assert_allclose(per_image / per_image.sum(), COUNTS ** -0.5 / (COUNTS ** -0.5).sum())


@pytest.mark.parametrize("name", ["class_balanced", "reversed", "square_root"])
def test_class_aware_determinism_and_lengths(name: str) -> None:
    a = create_sampler(name, TARGETS, seed=3, rank=1, world_size=3)
    b = create_sampler(name, TARGETS, seed=3, rank=1, world_size=3)
    assert len(a) == math.ceil(TARGETS.size / 3) and len(list(a)) == len(a)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    other_rank = create_sampler(name, TARGETS, seed=3, rank=2, world_size=3)
    assert list(other_rank) != first and len(other_rank) == len(a)
    assert list(create_sampler(name, TARGETS, seed=4, rank=1, world_size=3)) != first


def test_uniform_is_a_permutation_per_epoch() -> None:
    sampler = UniformSampler(100, seed=9)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(100)) and epoch0 != list(range(100))
    assert list(UniformSampler(100, seed=9)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    assert list(UniformSampler(100, seed=9, shuffle=False)) == list(range(100))


@pytest.mark.parametrize(("n", "world_size"), [(100, 4), (10, 3), (2, 3)])
def test_uniform_shards_are_disjoint_and_cover(n: int, world_size: int) -> None:
    shards = []
    for rank in range(world_size):
        sampler = UniformSampler(n, seed=2, rank=rank, world_size=world_size)
        sampler.set_epoch(4)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == math.ceil(n / world_size)
    seed = mix_seed(2, stream_id("main"), 4)  # (seed, stream, epoch): no rank, one permutation for all
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    padded = (perm * world_size)[:math.ceil(n / world_size) * world_size]
    assert shards == [padded[rank::world_size] for rank in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert set(flat) == set(range(n))
    padding = len(flat) - n
    assert padding == math.ceil(n / world_size) * world_size - n
    assert len(set(flat)) == n  # only the wrapped-around padding repeats


def test_create_sampler_names_and_errors() -> None:
    assert list_samplers() == ["class_balanced", "reversed", "square_root", "uniform"]
    assert isinstance(create_sampler("uniform", TARGETS, seed=0), UniformSampler)
    with pytest.raises(LtlibError) as info:
        create_sampler("balanced", TARGETS, seed=0)
    message = str(info.value)
    assert "'balanced'" in message and "class_balanced, reversed, square_root, uniform" in message
    with pytest.raises(LtlibError, match="rank=2, world_size=2"):
        UniformSampler(10, rank=2, world_size=2)
    with pytest.raises(LtlibError, match="class 1 has a positive sampling weight but no images"):
        ClassAwareSampler([0, 0, 2], [1, 1, 1])


def test_stream_sampler_zips_aligned_streams() -> None:
    streams = {"u": create_sampler("uniform", TARGETS, seed=1), "r": create_sampler("reversed", TARGETS, seed=1)}
    zipped = StreamSampler(streams)
    zipped.set_epoch(3)
    pairs = list(zipped)
    assert len(pairs) == len(zipped) == TARGETS.size
    assert [p[0] for p in pairs] == list(streams["u"]) and [p[1] for p in pairs] == list(streams["r"])
    assert streams["u"].epoch == streams["r"].epoch == 3
    with pytest.raises(LtlibError, match="equal lengths"):
        StreamSampler({"a": UniformSampler(10), "b": UniformSampler(11)})


class NoisyDataset(Dataset):
    """Item i is (i + fresh random noise, label of i): a stand-in for a random augmentation."""

    def __len__(self) -> int:
        return TARGETS.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)) + torch.rand(2), int(TARGETS[i])


def test_multi_stream_batches_are_aligned_and_augmented_independently() -> None:
    same = StreamSampler({"a": UniformSampler(TARGETS.size, seed=7), "b": UniformSampler(TARGETS.size, seed=7)})
    loader = DataLoader(MultiStreamDataset(NoisyDataset(), ["a", "b"]), batch_size=32, sampler=same)
    batch = next(iter(loader))
    assert set(batch) == {"a", "b"}
    (xa, ya), (xb, yb) = batch["a"], batch["b"]
    assert xa.shape == xb.shape == (32, 2)
    assert torch.equal(ya, yb)  # the same indices ...
    assert torch.equal(xa.floor(), xb.floor())
    assert not torch.equal(xa, xb)  # ... each drawn through its own augmentation
    expected = [int(TARGETS[i]) for i in list(UniformSampler(TARGETS.size, seed=7))[:32]]
    assert ya.tolist() == expected


@pytest.mark.parametrize(("n", "world_size"), [(10, 3), (7, 1), (2, 4)])
def test_eval_shards_cover_each_image_once(n: int, world_size: int) -> None:
    shards = [list(EvalShardSampler(n, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(EvalShardSampler(n, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]


def test_a_sampler_without_indices_cannot_be_built():
    from ltlib.data.samplers import IndexSampler

    class Incomplete(IndexSampler):
        def __len__(self) -> int:
            return 0

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()

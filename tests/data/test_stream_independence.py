"""Every random sampler stream is independent: of the other streams, of the rank, the epoch and the seed.

Before the fix every stream of a run was seeded alike: two ``uniform`` streams (BBN table 3's "uniform"
row, ``method.rebalancing_sampler=uniform``) fed both branches identical images in identical order,
and ``uniform`` seeded from ``seed + epoch``, so seed ``s + 1`` replayed seed ``s`` one epoch late.
The statistical checks run with fixed seeds, so they are deterministic; their thresholds are far
in the tails (p > 0.001, a handful of coincidences where independence expects about one).
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch
from scipy import stats
from tests.conftest import digits_datamodule

from ltlib.data import create_sampler
from ltlib.data.device_loader import DeviceLoader
from ltlib.data.samplers import mix_seed, stream_id

EPOCHS = 20  # 20 epochs x 403 digits: ~8,000 aligned pairs per test
#: (stream a, stream b) samplers of two-stream runs: BBN's uniform row, BBN itself, a deferred pair.
PAIRS = [("uniform", "uniform"), ("reversed", "reversed"), ("class_balanced", "class_balanced"),
         ("uniform", "reversed"), (f"uniform>class_balanced@{EPOCHS // 2}",) * 2]


def two_stream_pairs(kinds: tuple[str, str], epochs: range, **overrides) -> np.ndarray:
    """``[steps, 2]``: the positions the real data module's StreamSampler gives two streams ``a``, ``b``."""
    dm = digits_datamodule(**overrides)
    dm.train_streams = {"a": kinds[0], "b": kinds[1]}
    sampler = dm.train_dataloader().sampler
    pairs = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        pairs.extend(sampler)
    return np.array(pairs)


def class_pairs_table(targets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Contingency table of the classes drawn at the same step by two streams (empty rows/columns dropped)."""
    classes = int(targets.max()) + 1
    table = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(table, (targets[a], targets[b]), 1)
    return table[table.sum(1) > 0][:, table.sum(0) > 0]


def assert_independent(targets: np.ndarray, a: np.ndarray, b: np.ndarray, num_images: int) -> None:
    """Same-step indices of two streams look independent: coincidences ~ steps / N, the class-pair table
    is the product of its marginals (chi-square), and positions are uncorrelated (Spearman)."""
    same = int((a == b).sum())
    # Independent draws coincide with probability sum_i p_a(i) p_b(i) (1 / N for uniform streams).
    p_a, p_b = (np.bincount(x, minlength=num_images) / x.size for x in (a, b))
    expected_same = a.size * float(p_a @ p_b)
    assert same <= expected_same + 6 * np.sqrt(expected_same) + 5, (same, expected_same)
    table = class_pairs_table(targets, a, b)
    assert min(table.shape) > 1
    p_value = stats.chi2_contingency(table).pvalue
    assert p_value > 1e-3, (p_value, table)
    rho = stats.spearmanr(a, b).statistic
    assert abs(rho) < 5 / np.sqrt(a.size), rho


@pytest.mark.parametrize("kinds", PAIRS)
def test_two_streams_of_a_run_draw_independently(kinds: tuple[str, str]) -> None:
    dm = digits_datamodule()
    pairs = two_stream_pairs(kinds, range(EPOCHS))
    assert not np.array_equal(pairs[:, 0], pairs[:, 1])
    # Pooled over a deferred switch both streams' marginals change together; test each phase on its own.
    for phase in np.split(pairs, 2 if ">" in kinds[0] else 1):
        assert_independent(dm.train_targets, phase[:, 0], phase[:, 1], len(dm.train_targets))
    for epoch_pairs in np.split(pairs, EPOCHS):  # also epoch by epoch: not the same order
        assert not np.array_equal(epoch_pairs[:, 0], epoch_pairs[:, 1])


def test_bbn_uniform_row_feeds_both_branches_different_images() -> None:
    """BBN table 3 "uniform": both branches uniform, as in the official code an independent second draw."""
    dm = digits_datamodule(batch_size=64)
    dm.train_streams = {"conventional": "uniform", "rebalancing": "uniform"}
    n = len(dm.train_targets)
    loader = dm.train_dataloader()
    batches = list(loader)
    steps = list(loader.sampler)
    conventional, rebalancing = (np.array(s) for s in zip(*steps, strict=True))
    assert sorted(conventional.tolist()) == sorted(rebalancing.tolist()) == list(range(n))  # both uniform ...
    assert (conventional == rebalancing).sum() <= 6  # ... in unrelated orders (about 1 coincidence expected)
    labels = {name: torch.cat([b[name][1] for b in batches]).numpy() for name in dm.train_streams}
    assert (labels["conventional"] != labels["rebalancing"]).mean() > 0.5


@pytest.mark.parametrize("kind", ["uniform", "reversed"])
def test_consecutive_seeds_do_not_replay_each_other(kind: str) -> None:
    """The old ``seed + epoch``: epoch e + 1 of seed s was epoch e of seed s + 1."""
    dm = digits_datamodule()
    targets, n = dm.train_targets, len(dm.train_targets)
    orders = {}
    for seed, epoch in itertools.product(range(4), range(4)):
        sampler = create_sampler(kind, targets, seed)
        sampler.set_epoch(epoch)
        orders[seed, epoch] = np.array(list(sampler))
    for seed, epoch in itertools.product(range(3), range(3)):
        assert not np.array_equal(orders[seed, epoch + 1], orders[seed + 1, epoch])
    assert len({o.tobytes() for o in orders.values()}) == len(orders)  # 16 different orders
    # Through the data module: seed 3 from epoch 1 against seed 4 from epoch 0, first one epoch, then 20.
    s3 = two_stream_pairs((kind, kind), range(1, EPOCHS + 1), seed=3)[:, 0]
    s4 = two_stream_pairs((kind, kind), range(EPOCHS), seed=4)[:, 0]
    assert not np.array_equal(s3[:n], s4[:n])
    assert_independent(targets, s3, s4, n)


def test_class_aware_ranks_draw_independent_sequences() -> None:
    dm = digits_datamodule()
    targets, n = dm.train_targets, len(dm.train_targets)
    draws = {rank: [] for rank in range(2)}
    for rank in range(2):
        sampler = create_sampler("reversed", targets, 0, rank, 2, stream="rebalancing")
        for epoch in range(2 * EPOCHS):
            sampler.set_epoch(epoch)
            draws[rank].extend(sampler)
    r0, r1 = np.array(draws[0]), np.array(draws[1])
    assert not np.array_equal(r0, r1)
    assert_independent(targets, r0, r1, n)


@pytest.mark.parametrize("world_size", [2, 3])
def test_uniform_shards_of_every_stream_are_disjoint(world_size: int) -> None:
    """Uniform does not mix in the rank: all ranks share a stream's permutation and take disjoint slices."""
    n = 403
    for stream, epoch in itertools.product(("a", "b", "main"), (0, 5)):
        shards = []
        for rank in range(world_size):
            sampler = create_sampler("uniform", np.zeros(n, dtype=np.int64), 7, rank, world_size,
                                     stream=stream)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        flat = [i for shard in shards for i in shard]
        assert set(flat) == set(range(n))
        assert len(flat) - len(set(flat)) == len(shards[0]) * world_size - n  # only the wrap-around padding
        generator = torch.Generator().manual_seed(mix_seed(7, stream_id(stream), epoch))
        perm = torch.randperm(n, generator=generator)
        assert shards[0] == perm[0::world_size].tolist()


@pytest.mark.parametrize("kind", ["uniform", "class_balanced", "reversed", "square_root",
                                  "uniform>reversed@2"])
def test_an_order_is_a_function_of_seed_stream_epoch_rank(kind: str) -> None:
    targets = digits_datamodule().train_targets

    def order(seed: int = 1, stream: str | int = "a", epoch: int = 3, rank: int = 1) -> list[int]:
        sampler = create_sampler(kind, targets, seed, rank, 2, stream=stream)
        sampler.set_epoch(epoch)
        return list(sampler)

    base = order()
    assert order() == base  # deterministic
    assert order(seed=2) != base and order(stream="b") != base and order(epoch=4) != base
    assert order(rank=0) != base and order(stream=0) != base
    default = create_sampler(kind, targets, 1, 1, 2)
    default.set_epoch(3)
    assert list(default) == order(stream="main")  # the default stream is a single-stream run's, "main"


def test_stream_ids_are_stable_and_seeds_injective() -> None:
    # crc32, not Python's salted hash(): the same in every process (pinned here).
    assert stream_id("main") == 2**32 + zlib.crc32(b"main") == 7502089572
    assert stream_id(0) == 0 and stream_id("0") != 0
    assert len({stream_id(s) for s in ("main", "a", "b", "conventional", "rebalancing", "partner")}) == 6
    # SeedSequence alone pads with zeros and splits big ints; mix_seed must not.
    assert mix_seed(1, 2, 3) != mix_seed(1, 2, 3, 0)
    assert mix_seed(3, 2**32) != mix_seed(3, 0, 1)
    assert mix_seed(1, 2) != mix_seed(2, 1)


@pytest.mark.parametrize("kinds", [("uniform", "uniform"), ("uniform", "reversed"),
                                   ("uniform>class_balanced@1", "reversed")])
def test_device_loader_draws_each_streams_cpu_order(kinds: tuple[str, str]) -> None:
    cpu, dev = (two_stream_pairs(kinds, range(3), loader=loader) for loader in ("cpu", "device"))
    np.testing.assert_array_equal(dev, cpu)
    assert not np.array_equal(cpu[:, 0], cpu[:, 1])


def test_device_augmentation_of_two_streams_shares_no_draws() -> None:
    """Two streams fed the very same indices still get their own crops (digits: 9 offsets, 1/9 equal)."""
    dm = digits_datamodule(loader="device")
    images = dm.train_dataloader().images
    sampler = create_sampler("uniform", dm.train_targets, 0)
    loader = DeviceLoader(images, {"a": sampler, "b": sampler}, 64, seed=0)
    equal = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        for batch in loader:
            (xa, ya), (xb, yb) = batch["a"], batch["b"]
            assert torch.equal(ya, yb)
            equal.append((xa == xb).flatten(1).all(1))
    equal = torch.cat(equal).float()
    # Independent crops coincide with probability >= 1/9; shared draws would make every pair equal.
    assert 0.05 < equal.mean().item() < 0.2, equal.mean().item()

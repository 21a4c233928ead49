"""Two real gloo processes: samplers shard correctly and every rank runs the same number of steps."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import free_port, gather_on_rank0

from ltlib.data import ArrayPool, LongTailDataModule, UniformSampler

WORLD_SIZE = 2
STREAMS = {"u": "uniform", "b": "class_balanced", "r": "reversed", "s": "square_root"}


def toy_pools() -> tuple[ArrayPool, ArrayPool]:
    """5 classes of 30 training images (long-tailed to 30, 19, 12, 7, 5 = 73: odd, so shards pad) and 3 test
    images each."""
    rng = np.random.default_rng(0)
    names = [f"c{c}" for c in range(5)]
    train_targets = rng.permutation(np.repeat(np.arange(5), 30))
    test_targets = np.repeat(np.arange(5), 3)
    return (ArrayPool(rng.integers(0, 256, (150, 4, 4, 3), dtype=np.uint8), train_targets, names),
            ArrayPool(rng.integers(0, 256, (15, 4, 4, 3), dtype=np.uint8), test_targets, names))


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        dm = LongTailDataModule(toy_pools, imbalance_ratio=6, val_per_class=3, augmentation="none",
                                mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=4, seed=5)
        dm.setup("fit")
        result: dict = {"train_size": len(dm.train_indices), "hash": dm.subset_hash}
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(2)
        result["uniform_indices"] = list(loader.sampler)
        result["uniform_targets"] = torch.cat([t for _, t in loader]).tolist()
        dm.train_streams = STREAMS
        loader = dm.train_dataloader()
        result["stream_batches"] = sum(1 for _ in loader)
        result["stream_lengths"] = {k: len(s) for k, s in loader.sampler.samplers.items()}
        result["reversed"] = [pair[2] for pair in loader.sampler]
        result["val_indices"] = [int(i) for i in dm.val_dataloader().sampler]
        result["test_batches"] = len(dm.test_dataloader())
        gather_on_rank0(result, out)
    finally:
        dist.destroy_process_group()


def test_two_process_sharding(tmp_path: Path) -> None:
    out = tmp_path / "gathered.pkl"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    ranks = pickle.loads(out.read_bytes())
    n = ranks[0]["train_size"]
    assert n == 30 + 19 + 12 + 7 + 5 and all(r["hash"] == ranks[0]["hash"] for r in ranks)

    shards = [r["uniform_indices"] for r in ranks]
    assert all(len(s) == math.ceil(n / WORLD_SIZE) for s in shards)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == WORLD_SIZE * math.ceil(n / WORLD_SIZE) - n  # only the padding
    for rank, shard in enumerate(shards):  # the same permutation on both ranks, sliced by rank
        expected = UniformSampler(n, seed=5, rank=rank, world_size=WORLD_SIZE)
        expected.set_epoch(2)
        assert shard == list(expected)
    assert len(ranks[0]["uniform_targets"]) == len(ranks[1]["uniform_targets"])

    assert ranks[0]["stream_batches"] == ranks[1]["stream_batches"] == math.ceil(math.ceil(n / WORLD_SIZE) / 4)
    for r in ranks:
        assert set(r["stream_lengths"].values()) == {math.ceil(n / WORLD_SIZE)}
    assert ranks[0]["reversed"] != ranks[1]["reversed"]  # each rank draws its own stream

    val = ranks[0]["val_indices"] + ranks[1]["val_indices"]
    assert len(val) == len(set(val)) == 3 * 4  # classes 1-4 (class 0 leaves none out); no padding
    assert [r["test_batches"] for r in ranks] == [2, 2]  # 8 and 7 of the 15 test images, batches of 4

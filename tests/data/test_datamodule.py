"""LongTailDataModule: splits, validation carving, loaders, streams, bad input, real-data layouts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ltlib.data import (
    ClassBalancedSampler,
    EvalShardSampler,
    LongTailDataModule,
    ReversedSampler,
    digits_pools,
    image_folder_pools,
    indices_hash,
    long_tail_counts,
    long_tail_split,
    select_long_tail,
)
from ltlib.errors import LtlibError

POOL_COUNTS = [60] * 5  # long_tail_counts(60, 5, 10) == [60, 33, 18, 10, 6]
LT_COUNTS = [60, 33, 18, 10, 6]
DIGIT_STATS = {"augmentation": "digits", "mean": (0.5,), "std": (0.5,)}


def make_dm(source: Callable, **kwargs) -> LongTailDataModule:
    options = {"imbalance_ratio": 10.0, "augmentation": "none", "batch_size": 8} | kwargs
    dm = LongTailDataModule(source, **options)
    dm.setup("fit")
    return dm


def class_of(dm: LongTailDataModule, indices: np.ndarray) -> np.ndarray:
    return dm.train_dataset.pool.targets[indices]


# ---------------------------------------------------------------------------------------------------
# Splits


def test_keep_train_keeps_the_canonical_subset(array_source: Callable) -> None:
    source = array_source(POOL_COUNTS)
    dm = make_dm(source, val_per_class=20)
    pool_targets = source()[0].targets
    assert long_tail_counts(60, 5, 10) == LT_COUNTS
    np.testing.assert_array_equal(dm.train_indices, select_long_tail(pool_targets, LT_COUNTS, seed=0))
    assert dm.class_counts == LT_COUNTS and dm.num_classes == 5 and dm.in_chans == 3
    assert dm.class_names == [f"c{c}" for c in range(5)]
    # class 0 keeps all 60 images, so nothing is left out for its validation images
    assert np.bincount(class_of(dm, dm.val_indices), minlength=5).tolist() == [0, 20, 20, 20, 20]
    left_out = np.concatenate(long_tail_split(pool_targets, LT_COUNTS, seed=0).left_out)
    assert set(dm.val_indices.tolist()) <= set(left_out.tolist())
    assert dm.subset_hash == indices_hash(dm.train_indices)
    info = dm.split_info
    assert info["val"]["class_counts"] == [0, 20, 20, 20, 20] and info["val"]["size"] == 80
    assert "fewer where too few were left out (class: images {0: 0}" in info["val"]["source"]


def test_holdout_tops_up_from_the_end_of_the_selection(array_source: Callable) -> None:
    source = array_source(POOL_COUNTS)
    dm = make_dm(source, val_per_class=20, val_shortfall="holdout")
    pool_targets = source()[0].targets
    kept0 = long_tail_split(pool_targets, LT_COUNTS, seed=0).kept[0]
    assert dm.class_counts == [40, 33, 18, 10, 6]
    assert np.bincount(class_of(dm, dm.val_indices), minlength=5).tolist() == [20] * 5
    np.testing.assert_array_equal(dm.train_indices[:40], kept0[:40])
    assert set(dm.val_indices.tolist()) >= set(kept0[40:].tolist())
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
    assert dm.subset_hash == indices_hash(select_long_tail(pool_targets, LT_COUNTS))  # the canonical one
    assert dm.split_info["train"]["hash"] != dm.subset_hash
    assert "less the validation images held out" in dm.split_info["train"]["source"]
    with pytest.raises(LtlibError, match="would leave class 0 .* without training images"):
        make_dm(source, val_per_class=60, val_shortfall="holdout")


def test_auto_validation_for_subsampled_and_whole_pools(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS))  # val_per_class=None: 50/class from the left-out images
    assert dm.split_info["val"]["class_counts"] == [0, 27, 42, 50, 50]

    whole = make_dm(array_source([40, 15, 5, 2, 1]), imbalance_ratio=None)  # nothing left out: 10% fraction
    assert whole.split_info["val"]["class_counts"] == [4, 1, 1, 1, 0]
    assert whole.class_counts == [36, 14, 4, 1, 1]
    everything = np.concatenate([whole.train_indices, whole.val_indices])
    assert sorted(everything.tolist()) == list(range(63))
    assert "0.1 of each class's training images held out" in whole.split_info["val"]["source"]
    assert whole.split_info["train"]["source"].startswith("all of synthetic training images")


def test_no_validation_split(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS), val_per_class=0)
    assert dm.val_indices.size == 0 and dm.split_info["val"]["source"] == "none"
    assert len(dm.val_dataloader()) == 0


def test_seeds(array_source: Callable) -> None:
    source = array_source(POOL_COUNTS)
    base = make_dm(source, val_per_class=5)
    same = make_dm(source, val_per_class=5)
    other_val = make_dm(source, val_per_class=5, seed=1)
    other_subset = make_dm(source, val_per_class=5, subset_seed=1)
    np.testing.assert_array_equal(base.val_indices, same.val_indices)
    np.testing.assert_array_equal(base.train_indices, other_val.train_indices)
    assert not np.array_equal(base.val_indices, other_val.val_indices)
    assert not np.array_equal(base.train_indices, other_subset.train_indices)
    assert base.subset_hash != other_subset.subset_hash


def test_split_info_is_json_and_describes_every_split(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS), val_per_class=3, val_shortfall="holdout", name="toy")
    info = json.loads(json.dumps(dm.split_info))
    assert info["name"] == "toy" and info["num_classes"] == 5
    assert info["train"]["size"] == sum(LT_COUNTS) - 3 and info["test"]["size"] == 20
    assert info["val"]["class_counts"] == [3] * 5 and info["test"]["class_counts"] == [4] * 5
    assert info["imbalance_ratio"] == 57 / 6
    assert info["summary"] == ("train: long-tailed subset (exp, ratio 10, max_count 60, subset_seed 0) of synthetic "
                               "training images, less the validation images held out of it; val: balanced, "
                               "3/class from training images left out by subsampling (seed 0), topped up for "
                               "classes [0] from the end of their training selection; test: synthetic test images")
    info["train"]["class_counts"][0] = -1
    assert dm.split_info["train"]["class_counts"][0] == 57  # callers get a copy


def test_setup_is_idempotent_and_required(array_source: Callable) -> None:
    calls = []
    inner = array_source(POOL_COUNTS)

    def source():
        calls.append(1)
        return inner()

    dm = LongTailDataModule(source, imbalance_ratio=10)
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.class_counts
    dm.prepare_data()
    dm.setup("fit")
    first = dm.train_indices
    dm.setup("test")
    np.testing.assert_array_equal(dm.train_indices, first)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"imbalance_ratio": 0.5}, "imbalance_ratio=0.5 is out of range"),
    ({"val_shortfall": "drop"}, "unknown val_shortfall 'drop'; available: holdout, keep_train"),
    ({"batch_size": 0}, "batch_size=0 is invalid"),
    ({"eval_batch_size": 0}, "eval_batch_size=0 is invalid"),
    ({"augmentation": "autoaugment"}, "unknown augmentation 'autoaugment'"),
    ({"val_fraction": 1.0}, "val_fraction=1.0 is out of range"),
    ({"max_count": 0}, "max_count=0 is invalid"),
    ({"profile": "linear"}, "unknown long-tail profile 'linear'"),
    ({"val_per_class": -1}, "val_per_class=-1 is invalid"),
    ({"seed": -1}, "seed=-1 is invalid"),
    ({"mean": (0.5, 0.5), "std": (0.5,)}, "one value per channel"),
])
def test_bad_options_raise_one_line_errors(array_source: Callable, kwargs: dict, expected: str) -> None:
    with pytest.raises(LtlibError) as info:
        LongTailDataModule(array_source(POOL_COUNTS), **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_sources_and_mismatches(array_source: Callable) -> None:
    with pytest.raises(LtlibError, match="is not callable"):
        LongTailDataModule("cifar10")  # type: ignore[arg-type]
    with pytest.raises(LtlibError, match=r"expected \(train_pool, test_pool\)"):
        make_dm(lambda: [1, 2])
    with pytest.raises(LtlibError, match="mean/std have 3 values but .* has 1 channel"):
        make_dm(array_source(POOL_COUNTS, channels=1))
    with pytest.raises(LtlibError, match="class 0 has 60 images but 100 were requested"):
        make_dm(array_source(POOL_COUNTS), max_count=100)
    with pytest.raises(LtlibError, match="imbalance_ratio=80 with max_count=60 leaves class 4 without training images"):
        make_dm(array_source(POOL_COUNTS), imbalance_ratio=80)


# ---------------------------------------------------------------------------------------------------
# Loaders and streams


def test_single_stream_batches_and_eval_loaders(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS, size=32), augmentation="cifar", val_per_class=4, eval_batch_size=16)
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(sum(LT_COUNTS) / 8)
    seen = torch.cat([t for _, t in loader])
    assert np.bincount(seen.numpy(), minlength=5).tolist() == LT_COUNTS  # uniform: every image once
    test_targets = torch.cat([t for _, t in dm.test_dataloader()])
    assert test_targets.tolist() == dm.test_dataset.targets.tolist()
    assert isinstance(dm.val_dataloader().sampler, EvalShardSampler) and dm.val_dataloader().batch_size == 16


def test_eval_dataset_has_the_eval_transform_and_leaves_training_alone(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS, size=32), augmentation="cifar", val_per_class=4)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1,
                                 lightning_module=SimpleNamespace(train_streams={"main": "uniform"},
                                                                  train_with_index=True))
    loader = dm.train_dataloader()
    before = loader.dataset.transform
    train = dm.eval_dataset("train")
    assert train is not loader.dataset and train.transform is dm.eval_transform and not train.return_index
    np.testing.assert_array_equal(train.indices, dm.train_indices)
    assert loader.dataset.transform is before is dm.train_transform and loader.dataset.return_index
    assert dm.train_dataset.transform is dm.train_transform
    image, label = train[0]
    torch.testing.assert_close(image, dm.eval_transform(train.pool.load(int(train.indices[0]))), rtol=0, atol=0)
    assert label == dm.train_targets[0]
    for split, reference in (("val", dm.val_dataset), ("test", dm.test_dataset)):
        dataset = dm.eval_dataset(split)
        assert dataset.transform is dm.eval_transform and not dataset.return_index
        np.testing.assert_array_equal(dataset.indices, reference.indices)
        assert dataset.pool is reference.pool
    with pytest.raises(LtlibError, match="unknown split 'dev'; available: test, train, val"):
        dm.eval_dataset("dev")


def test_paired_streams_follow_their_samplers(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS), seed=3)
    dm.train_streams = {"conventional": "uniform", "rebalancing": "reversed"}
    batches = list(dm.train_dataloader())
    for batch in batches:
        assert set(batch) == {"conventional", "rebalancing"}
        (xc, yc), (xr, yr) = batch["conventional"], batch["rebalancing"]
        assert xc.shape == xr.shape and len(yc) == len(yr)
    conventional = torch.cat([b["conventional"][1] for b in batches]).numpy()
    rebalancing = torch.cat([b["rebalancing"][1] for b in batches]).numpy()
    assert np.bincount(conventional, minlength=5).tolist() == LT_COUNTS
    expected = dm.train_targets[list(ReversedSampler(dm.train_targets, seed=3, stream="rebalancing"))]
    np.testing.assert_array_equal(rebalancing, expected)
    assert np.bincount(rebalancing, minlength=5)[-1] > np.bincount(rebalancing, minlength=5)[0]


def test_streams_and_rank_come_from_the_trainer(array_source: Callable) -> None:
    dm = make_dm(array_source(POOL_COUNTS))
    module = SimpleNamespace(train_streams={"only": "class_balanced"})
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, lightning_module=module)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler)
    assert (loader.sampler.rank, loader.sampler.world_size) == (1, 2)
    assert len(loader.sampler) == math.ceil(sum(LT_COUNTS) / 2)
    assert list(dm.test_dataloader().sampler) == list(range(1, 20, 2))
    module.train_streams = {}
    with pytest.raises(LtlibError, match="train_streams"):
        dm.train_dataloader()


class TinyPairedModel(L.LightningModule):
    """A linear model that records the targets of both streams, step by step."""

    train_streams = {"conventional": "uniform", "rebalancing": "reversed"}

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        (x, y), (xr, yr) = batch["conventional"], batch["rebalancing"]
        self.seen.append((self.current_epoch, yr.tolist()))
        return F.cross_entropy(self.linear(x.flatten(1)), y) + F.cross_entropy(self.linear(xr.flatten(1)), yr)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:.*LeafSpec")
def test_lightning_fit_uses_streams_and_sets_epochs() -> None:
    dm = LongTailDataModule(digits_pools, imbalance_ratio=10, max_count=100, val_per_class=0, batch_size=32,
                            seed=11, **DIGIT_STATS)
    dm.setup("fit")
    model = TinyPairedModel()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 6
    for epoch in (0, 1):
        sampler = ReversedSampler(dm.train_targets, seed=11, stream="rebalancing")  # the stream's own seed
        sampler.set_epoch(epoch)
        expected = dm.train_targets[list(sampler)[:96]].tolist()
        got = [t for e, ts in model.seen if e == epoch for t in ts]
        assert got == expected


# ---------------------------------------------------------------------------------------------------
# Real sources


def test_digits_end_to_end() -> None:
    dm = LongTailDataModule(digits_pools, name="digits", imbalance_ratio=10, max_count=100, val_per_class=20,
                            batch_size=16, **DIGIT_STATS)
    dm.setup("fit")
    assert dm.class_counts == long_tail_counts(100, 10, 10) and dm.in_chans == 1
    assert dm.split_info["val"]["class_counts"] == [20] * 10
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 8, 8) and targets.max() < 10
    assert sum(len(t) for _, t in dm.test_dataloader()) == 500
    assert "scikit-learn digits" in dm.split_info["summary"]


def test_image_folder_end_to_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", {"cat": 6, "ant": 6, "bee": 6}), ("test", {"cat": 2, "ant": 2, "bee": 2})):
        for cls, n in per_class.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{k:04d}.png")
    dm = LongTailDataModule(partial(image_folder_pools, str(tmp_path)), imbalance_ratio=3, val_per_class=2,
                            val_shortfall="holdout", batch_size=4)
    dm.setup("fit")
    assert dm.class_names == ["ant", "bee", "cat"]
    assert long_tail_counts(6, 3, 3) == [6, 3, 2]
    assert dm.split_info["val"]["class_counts"] == [2, 2, 2] and dm.class_counts == [4, 3, 2]
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert "the image folder" in dm.split_info["summary"]


def test_cifar10_folder_layout_gives_the_canonical_subset(tmp_path: Path, cifar10_train_members: list[str],
                                                          cifar10_train_labels: np.ndarray, ldam: Callable) -> None:
    """File n of a class in the JPEG copy is the n-th image of that class in CIFAR-10's original order, so
    the subset selected on the folder must keep exactly the files at the LDAM-selected positions."""
    classes = sorted({name.split("/")[1] for name in cifar10_train_members})
    for cls in classes:
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls / "0000.jpg").touch()
    for name in cifar10_train_members:  # empty placeholders: only the names matter for the selection
        (tmp_path / name).touch()
    dm = LongTailDataModule(partial(image_folder_pools, str(tmp_path)), imbalance_ratio=100, val_per_class=0)
    dm.setup("fit")
    counts = long_tail_counts(5000, 10, 100)
    assert dm.class_counts == counts
    pool = dm.train_dataset.pool
    reference = ldam(cifar10_train_labels, counts)
    for c, cls in enumerate(classes):
        kept_paths = [Path(pool.describe(i)) for i in dm.train_indices if pool.targets[i] == c]
        assert {p.parent.name for p in kept_paths} == {cls}
        kept_files = [int(p.stem) for p in kept_paths]
        class_positions = np.flatnonzero(cifar10_train_labels == c)
        selected = reference[cifar10_train_labels[reference] == c]
        assert kept_files == np.searchsorted(class_positions, selected).tolist()

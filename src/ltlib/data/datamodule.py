"""LongTailDataModule: canonical long-tailed training subset, balanced validation split, test set.

Splits (all indices refer to the source's pools; validation indices to the source's validation pool when
it has one, else to its training pool):

* train: with ``imbalance_ratio`` set, the canonical long-tailed subset of the training pool
  (:func:`ltlib.data.long_tail.long_tail_split`: ``long_tail_counts(max_count, C, ratio, profile)``
  images per class, LDAM-DRW selection with ``subset_seed``); with ``imbalance_ratio=None`` the whole
  training pool (data that is long-tailed already, such as ImageNet-LT).
* val (balanced, for checkpoint selection; never the test set):

  - a source returning ``(train_pool, test_pool, val_pool)`` (a file list with ``val_list``, e.g.
    ImageNet-LT's ``ImageNet_LT_val.txt``): the whole validation pool, and no training image is held
    out (``val_per_class`` null, ``val_fraction`` null or 0; ``val_per_class=0`` gives no validation
    split). The rest below is for sources returning ``(train_pool, test_pool)``.
  - ``val_per_class=k``: ``k`` images of each class drawn (``np.random.RandomState(seed)``, classes in
    label order) from the images the subsampling left out. A class with fewer left-out images than
    ``k`` (CIFAR-10-LT's largest class keeps all its 5,000 images and leaves none out) follows
    ``val_shortfall``: ``"keep_train"`` (default) keeps the training subset canonical and gives that
    class only the left-out images there are, possibly none, so the split is then not fully balanced;
    ``"holdout"`` moves the shortfall out of that class's training images (the last ones in the
    shuffled selection order), so every class gets ``k`` at the cost of a non-canonical training set.
  - ``val_per_class=None`` (auto): 50 per class as above when the training pool was subsampled;
    otherwise (nothing left out) ``val_fraction`` (null: 0.1) of each class's training images, at least
    one when the class has two or more, held out at random (seeded by ``seed``).
  - ``val_per_class=0``: no validation split.
* test: the whole test pool, for the single final evaluation.

Training batches: the module being trained declares ``train_streams`` (stream name -> sampler name,
see :mod:`ltlib.data.samplers`). One stream gives ``[images, targets]`` batches; several give
``{stream: [images, targets]}`` with aligned, independently augmented sub-batches of equal size.
``batch_size`` is per process. Samplers shard themselves by rank (run the trainer with
``use_distributed_sampler=False``). ``loader``: ``cpu`` (DataLoader, default), ``device`` or ``auto``
(images, sampling and augmentation on the accelerator, see :mod:`ltlib.data.device_loader`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ltlib.data.device_loader import check_loader, maybe_device_loader
from ltlib.data.long_tail import PROFILES, indices_hash, long_tail_counts, long_tail_split
from ltlib.data.pools import ImagePool
from ltlib.data.samplers import EvalShardSampler, MultiStreamDataset, StreamSampler, create_sampler
from ltlib.data.transforms import build_transforms, normalization_stats
from ltlib.errors import LtlibError, check_in_range, check_int, unknown_name

VAL_SHORTFALLS = ("keep_train", "holdout")
EVAL_SPLITS = ("train", "val", "test")  # what eval_dataset accepts
AUTO_VAL_PER_CLASS = 50
AUTO_VAL_FRACTION = 0.1  # val_fraction=None without a validation pool


class PoolDataset(Dataset):
    """The images ``indices`` of a pool, transformed: item ``i`` is ``(transform(image), int label)``, or
    ``(transform(image), int label, i)`` with ``return_index`` (methods that keep per-image state)."""

    def __init__(self, pool: ImagePool, indices: np.ndarray, transform: Callable[[Any], Any] | None = None,
                 return_index: bool = False) -> None:
        self.pool = pool
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.return_index = return_index

    @property
    def targets(self) -> np.ndarray:
        """Labels of the dataset's items, in item order."""
        return self.pool.targets[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        j = int(self.indices[i])
        image = self.pool.load(j)
        item = (self.transform(image) if self.transform is not None else image), int(self.pool.targets[j])
        return (*item, int(i)) if self.return_index else item


@dataclass(frozen=True)
class _Splits:
    """Everything ``setup`` computes."""

    train_pool: ImagePool
    test_pool: ImagePool
    train_indices: np.ndarray
    val_indices: np.ndarray
    subset_hash: str
    info: dict[str, Any]
    val_pool: ImagePool  # the pool val_indices index into: the source's validation pool, else train_pool


def _per_class(targets: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(targets, minlength=num_classes).tolist()


class LongTailDataModule(L.LightningDataModule):
    """Long-tailed training subset, balanced validation split and test set of an image source.

    ``source`` is a zero-argument callable returning ``(train_pool, test_pool)`` or
    ``(train_pool, test_pool, val_pool)`` (Hydra passes a ``_partial_`` of :func:`ltlib.data.cifar_pools`
    and friends). ``max_count`` (the largest class of the long-tailed subset) defaults to the largest
    class of the training pool. After
    :meth:`setup` the module exposes ``class_counts``, ``class_names``, ``num_classes``, ``in_chans``,
    ``train_indices``, ``val_pool``, ``val_indices``, ``subset_hash`` and ``split_info``.
    """

    def __init__(self, source: Callable[[], tuple[ImagePool, ...]], *, name: str = "custom",
                 imbalance_ratio: float | None = 100.0, max_count: int | None = None, profile: str = "exp",
                 subset_seed: int = 0, val_per_class: int | None = None, val_shortfall: str = "keep_train",
                 val_fraction: float | None = None, augmentation: str = "cifar", image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 normalization: str | None = None,
                 batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = False, drop_last: bool = False, seed: int = 0,
                 root: str | None = None, loader: str = "cpu") -> None:
        super().__init__()
        self.loader = check_loader(loader)
        if not callable(source):
            raise LtlibError(f"data source {source!r} is not callable; expected a function returning "
                             "(train_pool, test_pool) or (train_pool, test_pool, val_pool)")
        if imbalance_ratio is not None:
            check_in_range("imbalance_ratio", imbalance_ratio, 1.0)
        check_int("max_count", max_count, 1, optional=True)
        if profile not in PROFILES:
            raise unknown_name("long-tail profile", profile, PROFILES)
        check_int("val_per_class", val_per_class, 0, optional=True)
        if val_shortfall not in VAL_SHORTFALLS:
            raise unknown_name("val_shortfall", val_shortfall, VAL_SHORTFALLS)
        if val_fraction is not None:
            check_in_range("val_fraction", val_fraction, 0.0, 1.0, high_inclusive=False)
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1, optional=True)
        check_int("num_workers", num_workers, 0)
        for seed_name, seed_value in (("subset_seed", subset_seed), ("seed", seed)):
            check_int(seed_name, seed_value, 0)
            check_in_range(seed_name, seed_value, 0, 2**32 - 1)
        self.source = source
        self.name = name
        self.root = root  # where the images live; recorded in split_info (the source reads it)
        self.imbalance_ratio = None if imbalance_ratio is None else float(imbalance_ratio)
        self.max_count = max_count
        self.profile = profile
        self.subset_seed = int(subset_seed)
        self.val_per_class = val_per_class
        self.val_shortfall = val_shortfall
        self.val_fraction = None if val_fraction is None else float(val_fraction)
        # Either a named normalisation (ltlib.data.transforms.NORMALIZATIONS) or mean and std; neither
        # means CIFAR-10's statistics.
        if normalization is not None and (mean is not None or std is not None):
            raise LtlibError(f"data.normalization={normalization!r} and data.mean/data.std are both set; give "
                             "one: data.normalization=null with mean/std lists, or mean=null std=null")
        if (mean is None) != (std is None):
            raise LtlibError(f"data.mean={mean!r} and data.std={std!r}: give both lists or neither")
        self.normalization = normalization if normalization is not None or mean is not None else "cifar10"
        if mean is None:
            mean, std = normalization_stats(self.normalization)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.train_transform = build_transforms(augmentation, True, self.mean, self.std, image_size)
        self.eval_transform = build_transforms(augmentation, False, self.mean, self.std, image_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.seed = int(seed)
        self.train_streams: dict[str, str] = {"main": "uniform"}
        self._pools: tuple[ImagePool, ImagePool, ImagePool | None] | None = None
        self._splits: _Splits | None = None

    # ------------------------------------------------------------------------------------------------
    # Lightning hooks

    def prepare_data(self) -> None:
        """Build the pools once (this is where CIFAR downloads, on one process per node)."""
        self._load_pools()

    def setup(self, stage: str | None = None) -> None:
        """Compute the splits (once; later calls do nothing)."""
        if self._splits is None:
            self._splits = self._make_splits()

    # ------------------------------------------------------------------------------------------------
    # What methods and the run script read after setup

    def _require(self) -> _Splits:
        if self._splits is None:
            raise RuntimeError("LongTailDataModule.setup() has not run yet")
        return self._splits

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (after any validation hold-out)."""
        return list(self._require().info["train"]["class_counts"])

    @property
    def class_names(self) -> list[str]:
        return list(self._require().train_pool.class_names)

    @property
    def num_classes(self) -> int:
        return self._require().train_pool.num_classes

    @property
    def in_chans(self) -> int:
        return self._require().train_pool.in_chans

    @property
    def train_indices(self) -> np.ndarray:
        """Indices of the training images into the source's training pool, class by class."""
        return self._require().train_indices.copy()

    @property
    def val_pool(self) -> ImagePool:
        """The pool :attr:`val_indices` index into: the source's validation pool when it has one (a
        ``val_list``), else its training pool (validation images held out of it)."""
        return self._require().val_pool

    @property
    def val_indices(self) -> np.ndarray:
        """Indices of the validation images into :attr:`val_pool`, class by class."""
        return self._require().val_indices.copy()

    @property
    def train_targets(self) -> np.ndarray:
        splits = self._require()
        return splits.train_pool.targets[splits.train_indices]

    @property
    def subset_hash(self) -> str:
        """:func:`ltlib.data.indices_hash` of the canonical subset (before any validation hold-out)."""
        return self._require().subset_hash

    @property
    def split_info(self) -> dict[str, Any]:
        """JSON-ready description of the splits: for ``train``/``val``/``test`` the ``size``,
        ``class_counts``, ``source`` (where the images come from) and ``hash``; plus ``name``,
        ``subset_hash``, ``imbalance_ratio`` (the realised max/min of the training counts) and
        ``summary`` (the three sources in one line)."""
        return _deep_copy(self._require().info)

    # ------------------------------------------------------------------------------------------------
    # Datasets and loaders

    @property
    def train_dataset(self) -> PoolDataset:
        splits = self._require()
        return PoolDataset(splits.train_pool, splits.train_indices, self.train_transform)

    @property
    def val_dataset(self) -> PoolDataset:
        splits = self._require()
        return PoolDataset(splits.val_pool, splits.val_indices, self.eval_transform)

    @property
    def test_dataset(self) -> PoolDataset:
        pool = self._require().test_pool
        return PoolDataset(pool, np.arange(len(pool)), self.eval_transform)

    def eval_dataset(self, split: str) -> PoolDataset:
        """A new dataset of ``split`` (``train``, ``val`` or ``test``) with the evaluation transform and
        without ``return_index``: ``train`` gives the training images un-augmented (features, diagnostics);
        nothing the training loader uses is changed."""
        if split not in EVAL_SPLITS:
            raise unknown_name("split", split, EVAL_SPLITS)
        splits = self._require()
        if split == "train":
            return PoolDataset(splits.train_pool, splits.train_indices, self.eval_transform)
        return self.val_dataset if split == "val" else self.test_dataset

    def train_dataloader(self) -> DataLoader:
        """One stream: batches ``[images, targets]``; several: ``{stream: [images, targets]}``."""
        streams = self._streams()
        dataset = self.train_dataset
        # A module with ``train_with_index = True`` also gets each image's position in train_dataset
        # (declared on LongTailMethod; a plain LightningModule without it gets none).
        dataset.return_index = bool(getattr(self._module(), "train_with_index", False))
        rank, world_size = self._rank_world()
        samplers = {stream: create_sampler(sampler, dataset.targets, self.seed, rank, world_size,
                                           stream=stream)  # every stream draws independently
                    for stream, sampler in streams.items()}
        device_loader = maybe_device_loader(self, dataset, samplers, self.batch_size, self.drop_last)
        if device_loader is not None:
            return device_loader
        if len(samplers) == 1:
            return self._loader(dataset, next(iter(samplers.values())), self.batch_size, self.drop_last)
        return self._loader(MultiStreamDataset(dataset, list(samplers)), StreamSampler(samplers),
                            self.batch_size, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset)

    def _eval_loader(self, dataset: PoolDataset) -> DataLoader:
        rank, world_size = self._rank_world()
        sampler = EvalShardSampler(len(dataset), rank, world_size)
        device_loader = maybe_device_loader(self, dataset, {"main": sampler}, self.eval_batch_size, False)
        if device_loader is not None:
            return device_loader
        return self._loader(dataset, sampler, self.eval_batch_size, False)

    def _loader(self, dataset: Dataset, sampler: Any, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def _module(self) -> Any:
        """The LightningModule being trained, or None without a trainer."""
        return getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None

    def _streams(self) -> dict[str, str]:
        """``train_streams`` of the attached LightningModule (declared on LongTailMethod; a plain
        LightningModule may lack it), else of this data module."""
        streams = getattr(self._module(), "train_streams", None)
        if streams is None:
            streams = self.train_streams
        if not isinstance(streams, Mapping) or not streams:
            raise LtlibError(f"train_streams={streams!r} is invalid; expected a non-empty mapping "
                             "stream name -> sampler name")
        return {str(k): str(v) for k, v in streams.items()}

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size): from the trainer, else from torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------------------------------------
    # Split computation

    def _load_pools(self) -> tuple[ImagePool, ImagePool, ImagePool | None]:
        """``(train_pool, test_pool, val_pool or None)`` from the source (built once)."""
        if self._pools is None:
            pools = self.source()
            valid = (isinstance(pools, tuple) and len(pools) in (2, 3)
                     and all(isinstance(p, ImagePool) for p in pools[:2])
                     and (len(pools) == 2 or pools[2] is None or isinstance(pools[2], ImagePool)))
            if not valid:
                raise LtlibError(f"data source {self.source!r} returned {type(pools).__name__}; expected "
                                 "(train_pool, test_pool) or (train_pool, test_pool, val_pool)")
            self._pools = (pools[0], pools[1], pools[2] if len(pools) == 3 else None)
        return self._pools

    def _make_splits(self) -> _Splits:
        train_pool, test_pool, own_val_pool = self._load_pools()
        num_classes = train_pool.num_classes
        for other in (test_pool, own_val_pool):
            if other is not None and (other.num_classes != num_classes or other.in_chans != train_pool.in_chans):
                raise LtlibError(f"{other.name} has {other.num_classes} classes and {other.in_chans} channels "
                                 f"but {train_pool.name} has {num_classes} and {train_pool.in_chans}")
        if len(self.mean) != train_pool.in_chans:
            raise LtlibError(f"mean/std have {len(self.mean)} values but {train_pool.name} has "
                             f"{train_pool.in_chans} channel(s); give one mean and std per channel")
        pool_counts = train_pool.class_counts()
        if min(pool_counts) == 0:
            empty = pool_counts.index(0)
            raise LtlibError(f"class {empty} ({train_pool.class_names[empty]}) has no images in {train_pool.name}")

        ratio = self.imbalance_ratio
        subsampled = ratio is not None
        if ratio is not None:
            max_count = self.max_count or max(pool_counts)
            counts = long_tail_counts(max_count, num_classes, ratio, self.profile)
            if min(counts) == 0:
                raise LtlibError(f"imbalance_ratio={ratio:g} with max_count={max_count} leaves class "
                                 f"{counts.index(0)} without training images; allowed: imbalance_ratio <= max_count")
            split = long_tail_split(train_pool.targets, counts, self.subset_seed)
            kept, left_out = split.kept, split.left_out
        else:
            kept = [np.flatnonzero(train_pool.targets == c) for c in range(num_classes)]
            left_out = [np.empty(0, dtype=np.int64) for _ in range(num_classes)]
        subset_hash = indices_hash(np.concatenate(kept))

        rng = np.random.RandomState(self.seed)
        val_pool = train_pool
        if own_val_pool is not None:
            # The dataset's own validation list: no training image is held out.
            self._check_own_val_pool(own_val_pool)
            train_parts = kept
            if self.val_per_class == 0:
                val_parts = [np.empty(0, dtype=np.int64)]
                val_source = "none"
            else:
                val_pool = own_val_pool
                val_parts = [np.flatnonzero(own_val_pool.targets == c) for c in range(num_classes)]
                val_source = f"all of {own_val_pool.name}"
        elif self.val_per_class is None and not subsampled:
            train_parts, val_parts = self._hold_out_fraction(kept, rng)
            fraction = self._val_fraction()
            val_source = (f"{fraction:g} of each class's training images held out at random "
                          f"(seed {self.seed})" if fraction > 0 else "none")
        else:
            per_class = AUTO_VAL_PER_CLASS if self.val_per_class is None else self.val_per_class
            train_parts, val_parts = self._draw_left_out(kept, left_out, per_class, rng, train_pool)
            val_source = self._left_out_source(per_class, left_out, val_parts) if per_class > 0 else "none"

        train_indices = np.concatenate(train_parts).astype(np.int64)
        val_indices = np.concatenate(val_parts).astype(np.int64)
        train_counts = _per_class(train_pool.targets[train_indices], num_classes)
        if subsampled:
            train_source = (f"long-tailed subset ({self.profile}, ratio {ratio:g}, max_count "
                            f"{max_count}, subset_seed {self.subset_seed}) of {train_pool.name}")
        else:
            train_source = f"all of {train_pool.name}"
        if sum(len(t) for t in train_parts) < sum(len(k) for k in kept):
            train_source += ", less the validation images held out of it"
        info: dict[str, Any] = {
            "name": self.name,
            "root": self.root,
            "num_classes": num_classes,
            "train": {"size": int(train_indices.size), "class_counts": train_counts, "source": train_source,
                      "hash": indices_hash(train_indices)},
            "val": {"size": int(val_indices.size),
                    "class_counts": _per_class(val_pool.targets[val_indices], num_classes),
                    "source": val_source, "hash": indices_hash(val_indices)},
            "test": {"size": len(test_pool), "class_counts": test_pool.class_counts(), "source": test_pool.name,
                     "hash": indices_hash(np.arange(len(test_pool)))},
            "subset_hash": subset_hash,
            "normalization": {"name": self.normalization, "mean": list(self.mean), "std": list(self.std)},
            "imbalance_ratio": max(train_counts) / min(train_counts),
        }
        info["summary"] = "; ".join(f"{s}: {info[s]['source']}" for s in ("train", "val", "test"))
        return _Splits(train_pool, test_pool, train_indices, val_indices, subset_hash, info, val_pool=val_pool)

    def _val_fraction(self) -> float:
        """``val_fraction``, with null meaning :data:`AUTO_VAL_FRACTION`."""
        return AUTO_VAL_FRACTION if self.val_fraction is None else self.val_fraction

    def _check_own_val_pool(self, val_pool: ImagePool) -> None:
        """A validation pool of the source excludes holding validation images out of the training pool."""
        asked = (f"val_per_class={self.val_per_class}" if self.val_per_class
                 else f"val_fraction={self.val_fraction:g}" if self.val_fraction else None)
        if asked is not None:
            raise LtlibError(f"{asked} holds validation images out of the training pool, but the source has its own "
                             f"validation split ({val_pool.name}); leave it null to validate on that list, or give no "
                             "validation list (data.source.val_list=null)")

    def _hold_out_fraction(self, kept: list[np.ndarray], rng: np.random.RandomState
                           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Hold out ``val_fraction`` of each class (at least 1 of a class with >= 2 images, never all)."""
        train_parts, val_parts = [], []
        fraction = self._val_fraction()
        for idx in kept:
            n = idx.size
            k = 0 if n < 2 or fraction == 0 else min(n - 1, max(1, int(fraction * n)))
            is_val = np.zeros(n, dtype=bool)
            is_val[rng.permutation(n)[:k]] = True
            train_parts.append(idx[~is_val])
            val_parts.append(idx[is_val])
        return train_parts, val_parts

    def _draw_left_out(self, kept: list[np.ndarray], left_out: list[np.ndarray], per_class: int,
                       rng: np.random.RandomState, pool: ImagePool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``per_class`` left-out images of each class; shortfalls handled by ``val_shortfall``."""
        train_parts, val_parts = [], []
        for c, (idx, spare) in enumerate(zip(kept, left_out, strict=True)):
            take = min(per_class, spare.size)
            val = spare[rng.permutation(spare.size)[:take]]
            shortfall = per_class - take
            if shortfall and self.val_shortfall == "holdout":
                if shortfall >= idx.size:
                    raise LtlibError(f"val_per_class={per_class} with val_shortfall=holdout would leave class "
                                     f"{c} ({pool.class_names[c]}) without training images: it has {idx.size} "
                                     f"and {spare.size} left out; lower val_per_class")
                val = np.concatenate([val, idx[idx.size - shortfall:]])
                idx = idx[:idx.size - shortfall]
            train_parts.append(idx)
            val_parts.append(val)
        return train_parts, val_parts

    def _left_out_source(self, per_class: int, left_out: list[np.ndarray], val_parts: list[np.ndarray]) -> str:
        """Describe a validation split drawn from left-out images."""
        text = f"balanced, {per_class}/class from training images left out by subsampling (seed {self.seed})"
        short = [c for c, spare in enumerate(left_out) if spare.size < per_class]
        if not short:
            return text
        if self.val_shortfall == "holdout":
            return text + f", topped up for classes {short} from the end of their training selection"
        got = {c: int(val_parts[c].size) for c in short}
        return text + f", fewer where too few were left out (class: images {got}; the training subset stays canonical)"


def _deep_copy(value: Any) -> Any:
    """Copy nested dicts and lists (``split_info`` stays immutable from outside)."""
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


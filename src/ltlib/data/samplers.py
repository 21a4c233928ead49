"""Training and evaluation samplers that shard themselves across DDP ranks.

Every sampler is deterministic given ``(seed, stream, epoch, rank)``, has ``set_epoch(epoch)``
(Lightning calls it before each epoch) and a finite ``__len__`` that is the same on every rank, so
that all ranks run the same number of steps. The trainer runs with ``use_distributed_sampler=False``: these
samplers do the sharding, Lightning must not wrap them a second time.

Random streams. A sampler's ``stream`` names the training stream it feeds (the key of a method's
``train_streams``, e.g. BBN's ``conventional`` and ``rebalancing``; a single-stream run's is ``main``,
which is also the default here, so ``create_sampler(name, targets, seed)`` draws what a single-stream
run draws). The stream's :func:`stream_id` is mixed into every seed with :func:`mix_seed`, so that
every stream has its own generator: two streams of one run (even two ``uniform`` ones) draw
independently of each other, and independently across epochs, ranks (class-aware samplers) and
seeds. ``uniform`` seeds from ``(seed, stream, epoch)`` only, since all ranks must share the epoch's
permutation to shard it.

Class-aware sampling (Shen et al., ECCV 2016; BBN, Zhou et al., CVPR 2020) first draws a class ``c``
with probability ``P_c = w_c / sum_j w_j`` and then an image of that class uniformly at random. The
class weights ``w_c`` name the sampler:

===============  ==================  ==========================================================
name             ``w_c``             effect
===============  ==================  ==========================================================
class_balanced   ``1``               every class equally often
reversed         ``N_max / N_c``     BBN eq. 4: the rarer the class, the more often it is drawn
square_root      ``sqrt(N_c)``       an image with probability proportional to ``N_c ** -1/2``
===============  ==================  ==========================================================

``uniform`` visits every image once per epoch (instance-balanced sampling, ``P_c`` proportional to
``N_c``).

One algorithm per sampler. Every training and evaluation sampler here is an :class:`IndexSampler`: its
``indices(epoch, device)`` draws the whole epoch as one int64 tensor, and ``__iter__`` is
``indices(self.epoch, "cpu")``. The DataLoader path iterates the sampler; the device-resident loader
(:mod:`ltlib.data.device_loader`) calls ``indices(epoch, device)``; both therefore run the same code.
On ``device="cpu"`` the two paths give identical indices by construction. On another device the
draws use a generator on that device, seeded alike: torch generators of different devices produce
different numbers, so there the indices follow the same distribution and the same sharding, not the
same values (what the device loader has always done on a GPU; see :meth:`IndexSampler.indices`).
:func:`epoch_indices` gives the same tensor for any other torch sampler, by iterating it on the host.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ltlib.errors import LtlibError, unknown_name


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise LtlibError(f"rank={rank!r}, world_size={world_size!r} are invalid; allowed: world_size >= 1 "
                         "and 0 <= rank < world_size")


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A fresh torch generator on ``device`` seeded with ``seed`` (the global RNG stays untouched)."""
    return torch.Generator(device=device).manual_seed(seed)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (e.g. seed, stream, epoch, rank), via NumPy's
    SeedSequence.

    Injective in its arguments: each value (mod ``2**64``) is written as exactly two 32-bit words,
    after a word holding their count. (SeedSequence on the bare values would not be: it pads short
    entropy with zeros and splits large integers into a variable number of words, so that e.g.
    ``(s, e, r)`` and ``(s, e, r, 0)``, or ``(s, 2**32)`` and ``(s, 0, 1)``, would give one seed.)
    """
    words = [len(values)]
    for v in values:
        v = int(v) % 2**64
        words += [v & 0xFFFFFFFF, v >> 32]
    state = np.random.SeedSequence(np.array(words, dtype=np.uint32)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def stream_id(stream: str | int) -> int:
    """The integer a stream contributes to :func:`mix_seed`: an int ``0 <= stream < 2**32`` as it is, a
    name as ``2**32 + zlib.crc32(name)`` (UTF-8; stable across processes and Python versions, unlike
    the salted ``hash()``, and never equal to an int id)."""
    if isinstance(stream, bool) or not isinstance(stream, (str, int, np.integer)):
        raise LtlibError(f"stream={stream!r} is invalid; allowed: a stream name or an integer in [0, 2**32)")
    if isinstance(stream, str):
        return 2**32 + zlib.crc32(stream.encode("utf-8"))
    if not 0 <= int(stream) < 2**32:
        raise LtlibError(f"stream={stream!r} is invalid; allowed: a stream name or an integer in [0, 2**32)")
    return int(stream)


class IndexSampler(Sampler[int], ABC):
    """A sampler whose epoch is one tensor of dataset indices, drawn by :meth:`indices`.

    Subclasses implement ``indices`` and ``__len__``; ``set_epoch`` (Lightning calls it before every
    epoch) and ``__iter__`` come from here, so the DataLoader path and the device loader share one
    algorithm and a new sampler works on both without further code.
    """

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @abstractmethod
    def indices(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The int64 dataset indices of ``epoch`` (``len(self)`` of them, this rank's share), on ``device``.

        Random draws come from a fresh generator on ``device`` seeded from the sampler's
        ``(seed, stream, epoch[, rank])`` by :func:`mix_seed`, so the global RNG is never touched.
        Guarantees: on ``device="cpu"`` exactly what iterating the sampler gives (the same code). On a
        GPU the same seeds drive the GPU's generator, which gives other numbers than the CPU's: the same
        distribution, sharding and length, not the same indices. (Drawing on the CPU and copying would
        make them equal, but would change the orders of existing seeded GPU runs.)"""

    def __iter__(self) -> Iterator[int]:
        yield from self.indices(self.epoch, "cpu").tolist()


def epoch_indices(sampler: Sampler[int], epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``sampler.indices(epoch, device)``; a sampler that is not an :class:`IndexSampler` (any torch
    ``Sampler[int]``) is iterated on the host after ``set_epoch(epoch)`` and copied to ``device``."""
    if isinstance(sampler, IndexSampler):
        return sampler.indices(epoch, device)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return torch.as_tensor(list(sampler), dtype=torch.long).to(device)


class UniformSampler(IndexSampler):
    """Every image once per epoch, shuffled, sharded by rank.

    The epoch's permutation comes from ``torch.Generator().manual_seed(mix_seed(seed, stream_id(stream),
    epoch))`` and is the same on every rank (the rank is deliberately not mixed in); it is padded by
    wrapping around to a multiple of ``world_size`` and rank ``r`` takes ``perm[r::world_size]``.
    Shards are disjoint (up to the padding) and each has ``ceil(num_samples / world_size)`` indices.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, *, stream: str | int = "main") -> None:
        _check_shard(rank, world_size)
        if num_samples < 1:
            raise LtlibError(f"num_samples={num_samples!r} is invalid; allowed: >= 1")
        self.num_samples = int(num_samples)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), rank, world_size, shuffle
        self.stream, self.stream_id = stream, stream_id(stream)
        self.epoch = 0

    def epoch_seed(self, epoch: int) -> int:
        """The seed of ``epoch``'s permutation (shared by all ranks)."""
        return mix_seed(self.seed, self.stream_id, epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def indices(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's share of ``epoch``'s permutation (``randperm`` on a generator on ``device``), on
        ``device``; identical to iterating on the CPU, same permutation distribution elsewhere."""
        device = torch.device(device)
        if self.shuffle:
            gen = seeded_generator(device, self.epoch_seed(epoch))
            perm = torch.randperm(self.num_samples, generator=gen, device=device)
        else:
            perm = torch.arange(self.num_samples, device=device)
        total = len(self) * self.world_size
        if total > self.num_samples:
            perm = perm.repeat(math.ceil(total / self.num_samples))[:total]
        return perm[self.rank::self.world_size]


class ClassAwareSampler(IndexSampler):
    """Draw a class with probability ``P_c = w_c / sum_j w_j``, then one of its images uniformly.

    Each rank yields ``ceil(num_samples / world_size)`` indices (``num_samples`` defaults to the
    dataset size), drawn in one vectorised call from a generator seeded by
    ``mix_seed(seed, stream_id(stream), epoch, rank)``.
    A class with a positive weight must have images.
    """

    def __init__(self, targets: Sequence[int] | np.ndarray | torch.Tensor, class_weights: Sequence[float] | torch.Tensor,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_samples: int | None = None, *,
                 stream: str | int = "main") -> None:
        _check_shard(rank, world_size)
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        weights = torch.as_tensor(class_weights, dtype=torch.float64).reshape(-1)
        if labels.numel() == 0:
            raise LtlibError("a class-aware sampler needs at least one image")
        if labels.min() < 0 or labels.max() >= weights.numel():
            raise LtlibError(f"labels range over [{int(labels.min())}, {int(labels.max())}] but "
                             f"{weights.numel()} class weights were given")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise LtlibError(f"class weights must be finite, >= 0 and not all 0; got {weights.tolist()[:10]}")
        counts = torch.bincount(labels, minlength=weights.numel())
        empty = torch.nonzero((counts == 0) & (weights > 0)).flatten()
        if empty.numel():
            raise LtlibError(f"class {int(empty[0])} has a positive sampling weight but no images")
        self.class_probs = weights / weights.sum()
        self.num_samples = labels.numel() if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise LtlibError(f"num_samples={num_samples!r} is invalid; allowed: >= 1")
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.stream, self.stream_id = stream, stream_id(stream)
        self.epoch = 0
        order = torch.argsort(labels, stable=True)  # image indices grouped by class
        starts = torch.cumsum(counts, 0) - counts  # where each class's group begins
        self._tables = {torch.device("cpu"): (self.class_probs, counts, order, starts)}

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def epoch_seed(self, epoch: int) -> int:
        """The seed of this rank's draws in ``epoch``."""
        return mix_seed(self.seed, self.stream_id, epoch, self.rank)

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(class_probs, counts, order, starts)`` on ``device`` (copied there once)."""
        if device not in self._tables:
            self._tables[device] = tuple(t.to(device) for t in self._tables[torch.device("cpu")])
        return self._tables[device]

    def indices(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``len(self)`` classes drawn from ``P_c``, then a uniform image of each, from one generator on
        ``device`` seeded by :meth:`epoch_seed`; identical to iterating on the CPU, same distribution
        elsewhere."""
        device = torch.device(device)
        probs, counts, order, starts = self._tables_on(device)
        gen = seeded_generator(device, self.epoch_seed(epoch))
        classes = torch.multinomial(probs, len(self), replacement=True, generator=gen)
        sizes = counts[classes]
        offsets = (torch.rand(len(self), generator=gen, dtype=torch.float64, device=device) * sizes).long()
        offsets = torch.minimum(offsets, sizes - 1)
        return order[starts[classes] + offsets]


def _class_counts(targets: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    labels = np.asarray(targets, dtype=np.int64).reshape(-1)
    if labels.size == 0 or labels.min() < 0:
        raise LtlibError("a class-aware sampler needs at least one image and labels >= 0")
    return np.bincount(labels)


class ClassBalancedSampler(ClassAwareSampler):
    """Class-balanced sampling: ``w_c = 1``, so ``P_c = 1 / C`` (classes without images get 0)."""

    def __init__(self, targets: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None, *, stream: str | int = "main") -> None:
        counts = _class_counts(targets)
        super().__init__(targets, (counts > 0).astype(np.float64), seed, rank, world_size, num_samples,
                         stream=stream)


class ReversedSampler(ClassAwareSampler):
    """BBN's reversed sampler (eq. 4): ``w_c = N_max / N_c``, ``P_c = w_c / sum_j w_j``."""

    def __init__(self, targets: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None, *, stream: str | int = "main") -> None:
        counts = _class_counts(targets).astype(np.float64)
        weights = np.divide(counts.max(), counts, out=np.zeros_like(counts), where=counts > 0)
        super().__init__(targets, weights, seed, rank, world_size, num_samples, stream=stream)


class SquareRootSampler(ClassAwareSampler):
    """Square-root sampling (Mahajan et al., 2018): an image with probability proportional to
    ``N_c ** -1/2``, i.e. a class with ``P_c = sqrt(N_c) / sum_j sqrt(N_j)`` (``w_c = sqrt(N_c)``)."""

    def __init__(self, targets: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None, *, stream: str | int = "main") -> None:
        super().__init__(targets, np.sqrt(_class_counts(targets)), seed, rank, world_size, num_samples,
                         stream=stream)


def _uniform(targets: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0, rank: int = 0,
             world_size: int = 1, *, stream: str | int = "main") -> UniformSampler:
    return UniformSampler(len(targets), seed, rank, world_size, stream=stream)


_SAMPLERS: dict[str, Callable[..., Sampler[int]]] = {
    "uniform": _uniform,
    "class_balanced": ClassBalancedSampler,
    "reversed": ReversedSampler,
    "square_root": SquareRootSampler,
}


def list_samplers() -> list[str]:
    """Names accepted by :func:`create_sampler`."""
    return sorted(_SAMPLERS)


def check_sampler(name: str, option: str = "sampler") -> str:
    """``name`` if it is a registered sampler, else a one-line error naming the ``option`` it was given to."""
    if name not in _SAMPLERS:
        raise unknown_name(option, name, _SAMPLERS)
    return name


def create_sampler(name: str, targets: Sequence[int] | np.ndarray | torch.Tensor, seed: int,
                   rank: int = 0, world_size: int = 1, *, stream: str | int = "main") -> Sampler[int]:
    """Build the training sampler ``name`` over a dataset with labels ``targets``, sharded for ``rank``,
    for the training stream ``stream`` (its own random stream, see the module doc).
    A deferred spec ``"<before>><after>@<epoch>"`` builds a switching sampler (:mod:`ltlib.data.deferred`)."""
    if name not in _SAMPLERS and ">" in str(name):
        from ltlib.data.deferred import create_deferred_sampler

        return create_deferred_sampler(name, targets, seed, rank, world_size, stream=stream)
    if name not in _SAMPLERS:
        raise unknown_name("sampler", name, _SAMPLERS)
    return _SAMPLERS[name](targets, seed=seed, rank=rank, world_size=world_size, stream=stream)


class StreamSampler(Sampler[tuple[int, ...]]):
    """Zip several equally long samplers: yields one tuple of indices per step, in the dict's order.

    Used with :class:`MultiStreamDataset` for aligned multi-stream batches (e.g. BBN's uniform and
    reversed branches). ``set_epoch`` reaches every inner sampler.
    """

    def __init__(self, samplers: Mapping[str, Sampler[int]]) -> None:
        if not samplers:
            raise LtlibError("StreamSampler needs at least one sampler")
        lengths = {name: len(s) for name, s in samplers.items()}
        if len(set(lengths.values())) != 1:
            raise LtlibError(f"streams must have equal lengths; got {lengths}")
        self.samplers = dict(samplers)
        self.names = list(self.samplers)

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers.values():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(next(iter(self.samplers.values())))

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return zip(*self.samplers.values(), strict=True)


class MultiStreamDataset(Dataset):
    """Index a dataset with a tuple of indices, one per stream: ``{name: dataset[i]}``.

    Each item is fetched (and so augmented) independently; PyTorch's default collate turns a batch
    into ``{name: [images, targets]}``.
    """

    def __init__(self, dataset: Dataset, stream_names: Sequence[str]) -> None:
        self.dataset = dataset
        self.stream_names = list(stream_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, Any]:
        if len(indices) != len(self.stream_names):
            raise LtlibError(f"got {len(indices)} indices for streams {self.stream_names}")
        return {name: self.dataset[i] for name, i in zip(self.stream_names, indices, strict=True)}


class EvalShardSampler(IndexSampler):
    """Sequential evaluation shard ``range(rank, N, world_size)``, without padding, so that metrics
    synced across ranks count every image exactly once (shards may differ in length by one). The
    same in every epoch."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        _check_shard(rank, world_size)
        self.num_samples, self.rank, self.world_size = int(num_samples), rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))

    def indices(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The shard (``epoch`` does not matter), on ``device``."""
        # not arange(rank, N, world_size): that fails on a shard that is empty (rank > N)
        return self.rank + self.world_size * torch.arange(len(self), device=device)

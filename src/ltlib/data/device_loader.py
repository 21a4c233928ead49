"""A device-resident data path: images held once as uint8 on the accelerator, batches built there.

For data that fits in memory (CIFAR-LT, Tiny-ImageNet-LT, the digits) the CPU path's per-image work
(PIL decode, crop, flip, ToTensor, Normalize in worker processes, then a host-to-device copy) costs
far more than the network's forward and backward pass. :class:`DeviceLoader` replaces it:

* the images a split uses are uploaded once, as a ``uint8 [N, H + 2p, W + 2p, C]`` tensor already
  zero-padded for the random crop (``p`` its padding), and kept for the whole run;
* sampler indices are drawn on the device, once per epoch, by the sampler itself:
  ``sampler.indices(epoch, device)`` (:class:`ltlib.data.samplers.IndexSampler`), the very code the
  CPU path iterates, with the sampler's own seeds (so every stream keeps its own random stream, DDP
  shards by rank alike, deferred ``"a>b@E"`` specs switch at epoch ``E``). On the CPU the indices are
  therefore identical to the CPU path's by construction; on a GPU the sampler draws with a generator
  on the GPU: the same distribution and sharding and the same number of batches on every rank, but
  other values (torch generators differ by device). A plain torch ``Sampler[int]`` is iterated on the
  host once per epoch and copied over;
* every batch is augmented with a handful of vectorised kernels: the random crop and horizontal flip
  of each image become one gather (crop offsets uniform in ``[0, 2p + H - S]`` as in torchvision's
  ``RandomCrop``, flip with probability ``p_flip`` as in ``RandomHorizontalFlip``), followed by
  ``ToTensor``'s ``/255`` and ``Normalize``'s ``(x - mean) / std`` in the same float32 operations, so
  an un-augmented batch is bit-identical to the CPU path's. The augmentation parameters are read
  from the data module's own torchvision pipeline (:meth:`DeviceAugmentation.from_transform`), so
  both paths cannot drift apart; pipelines with other steps (ImageNet's RandomResizedCrop and colour
  jitter) are not supported here and stay on the CPU path;
* augmentation draws come from a generator seeded by ``(seed, epoch, rank)``: an epoch is
  reproducible on its own (also after resuming), and the global RNG is never touched. The streams'
  views are drawn one stream after the other from that generator, so no two streams (nor two images)
  share a draw: their augmentations are independent, as on the CPU path where every item is fetched
  and augmented on its own.

Batches have exactly the structure of the CPU path: one stream ``[images, targets]`` (plus the
dataset positions with ``train_with_index``), several streams ``{stream: [images, targets(, index)]}``,
evaluation ``[images, targets]``. Images come out contiguous (NCHW) unless the model's first
convolution is ``channels_last``, in which case they are produced in that layout at no extra cost.

Lightning integration: a :class:`DeviceLoader` is an iterable with ``__len__`` and a ``sampler``
attribute carrying ``set_epoch``, which Lightning's fit loop calls before every epoch exactly as it
does for a ``DataLoader``'s sampler (``lightning.fabric.utilities.data._set_sampler_epoch``).

``LongTailDataModule(loader=...)`` picks the path (:func:`maybe_device_loader`): ``cpu`` (default),
``device`` (always; the CPU is a valid device, which is how the tests run it) or ``auto`` (the device
path when the trainer runs on a CUDA GPU, the augmentation is supported and the images are in memory
or, for image files, decode to at most ``AUTO_MAX_BYTES``; else the CPU path).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Sampler
from torchvision import transforms as T

from ltlib.data.long_tail import indices_hash
from ltlib.data.pools import ArrayPool, ImagePool
from ltlib.data.samplers import epoch_indices, mix_seed, seeded_generator
from ltlib.errors import LtlibError, unknown_name

LOADERS = ("cpu", "device", "auto")
#: ``loader=auto`` decodes image files onto the device only when they take at most this many bytes.
AUTO_MAX_BYTES = 4 * 2**30
#: Distinguishes the augmentation generator's seed ``mix_seed(seed, epoch, rank, salt)`` from the other
#: ``mix_seed`` users (the samplers' ``(seed, stream, epoch[, rank])``, EpochSeeding's
#: ``(seed, epoch, rank, 0 or 1)``).
_AUGMENT_SALT = 0x6C746C6962


def check_loader(name: str) -> str:
    """Validate a ``data.loader`` value."""
    if name not in LOADERS:
        raise unknown_name("data loader", name, LOADERS)
    return name


# ----------------------------------------------------------------------------------------------------
# Augmentation


@dataclass(frozen=True)
class DeviceAugmentation:
    """Random crop (zero padding ``padding``, output ``crop_size``; None: the image size), horizontal
    flip with probability ``flip_prob``, then ``(x / 255 - mean) / std`` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_size: tuple[int, int] | None = None
    padding: int = 0
    flip_prob: float = 0.0

    @property
    def random(self) -> bool:
        return self.crop_size is not None or self.flip_prob > 0

    @classmethod
    def from_transform(cls, transform: Any) -> DeviceAugmentation | None:
        """The device equivalent of a torchvision pipeline ``[RandomCrop]? [RandomHorizontalFlip]?
        ToTensor Normalize``; None when it has any other step (it then stays on the CPU path)."""
        steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
        crop, flip = None, 0.0
        if steps and isinstance(steps[0], T.RandomCrop):
            rc = steps.pop(0)
            pad = rc.padding if rc.padding is not None else 0
            if isinstance(pad, Sequence):
                if len(set(pad)) != 1:
                    return None
                pad = pad[0]
            if rc.padding_mode != "constant" or rc.fill != 0 or rc.pad_if_needed:
                return None
            crop = (int(rc.size[0]), int(rc.size[1]), int(pad))
        if steps and isinstance(steps[0], T.RandomHorizontalFlip):
            flip = float(steps.pop(0).p)
        if len(steps) != 2 or not isinstance(steps[0], T.ToTensor) or not isinstance(steps[1], T.Normalize):
            return None
        norm = steps[1]
        mean, std = (tuple(float(v) for v in torch.as_tensor(x).flatten()) for x in (norm.mean, norm.std))
        if crop is None:
            return cls(mean, std, None, 0, flip)
        return cls(mean, std, (crop[0], crop[1]), crop[2], flip)


class DeviceImages:
    """The images of one split on ``device``: ``uint8 [N, H + 2p, W + 2p, C]`` (zero-padded by ``p``)
    and ``targets`` int64 ``[N]``, with the batch operations of an augmentation."""

    def __init__(self, pixels: Tensor, targets: Tensor, augmentation: DeviceAugmentation) -> None:
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise LtlibError(f"device images must be uint8 [N, H, W, C]; got {pixels.dtype} {tuple(pixels.shape)}")
        p = augmentation.padding
        self.height, self.width, self.channels = (int(s) for s in pixels.shape[1:])
        crop_h, crop_w = augmentation.crop_size or (self.height, self.width)
        if crop_h > self.height + 2 * p or crop_w > self.width + 2 * p:
            raise LtlibError(f"random crop {crop_h}x{crop_w} is larger than the padded {self.height}x{self.width} "
                             f"images (padding {p}); lower data.image_size")
        if len(augmentation.mean) != self.channels:
            raise LtlibError(f"mean/std have {len(augmentation.mean)} values but the images have {self.channels} "
                             "channel(s)")
        self.pixels = F.pad(pixels, (0, 0, p, p, p, p)) if p else pixels
        self.targets = targets
        self.augmentation = augmentation
        self.crop = (crop_h, crop_w)
        device = pixels.device
        self.rows = torch.arange(crop_h, device=device)
        self.cols = torch.arange(crop_w, device=device)
        self.mean = torch.tensor(augmentation.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(augmentation.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def draw_views(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Crop offsets (top, left) and flip flags of ``count`` images, in three kernels."""
        p = self.augmentation.padding
        max_top = self.height + 2 * p - self.crop[0]
        max_left = self.width + 2 * p - self.crop[1]
        kw = dict(generator=generator, device=self.device)
        if self.augmentation.crop_size is None:
            top = torch.full((count,), p, dtype=torch.long, device=self.device)
            left = top
        else:
            top = torch.randint(0, max_top + 1, (count,), **kw)
            left = torch.randint(0, max_left + 1, (count,), **kw)
        flip = (torch.rand(count, **kw) < self.augmentation.flip_prob if self.augmentation.flip_prob > 0
                else torch.zeros(count, dtype=torch.bool, device=self.device))
        return top, left, flip

    def fixed_views(self, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """The un-augmented view: the centre of the padded image, not flipped."""
        p = self.augmentation.padding
        top = torch.full((count,), p, dtype=torch.long, device=self.device)
        return top, top, torch.zeros(count, dtype=torch.bool, device=self.device)

    def batch(self, indices: Tensor, top: Tensor, left: Tensor, flip: Tensor,
              channels_last: bool = False) -> Tensor:
        """Float images ``[B, C, S, S]`` of ``indices``: crop at (top, left), flip where ``flip``,
        normalise (the gather of crop and flip is one indexing kernel)."""
        rows = top[:, None] + self.rows  # [B, S_h]
        cols = left[:, None] + self.cols  # [B, S_w]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        pixels = self.pixels[indices[:, None, None], rows[:, :, None], cols[:, None, :]]  # [B, S_h, S_w, C]
        images = pixels.permute(0, 3, 1, 2)
        if not channels_last:
            images = images.contiguous()
        # ToTensor then Normalize, in their float32 operations (bit-identical to the CPU path).
        return images.float().div(255).sub(self.mean).div(self.std)


# ----------------------------------------------------------------------------------------------------
# Sampler indices on the device


class DeviceStreamSampler:
    """The ``sampler`` of a :class:`DeviceLoader`: one sampler per stream, the epoch, and the draws.

    ``set_epoch`` is what Lightning calls before every epoch; iterating yields the host-side view of
    the epoch's indices (ints for one stream, tuples for several), as the CPU path's samplers do.
    """

    def __init__(self, samplers: Mapping[str, Sampler[int]], device: torch.device | str) -> None:
        if not samplers:
            raise LtlibError("a device loader needs at least one sampler")
        lengths = {name: len(s) for name, s in samplers.items()}
        if len(set(lengths.values())) != 1:
            raise LtlibError(f"streams must have equal lengths; got {lengths}")
        self.samplers = dict(samplers)
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for sampler in self.samplers.values():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(next(iter(self.samplers.values())))

    def draw(self) -> dict[str, Tensor]:
        """The current epoch's indices of every stream, on the device (each sampler's ``indices``)."""
        return {name: epoch_indices(s, self.epoch, self.device) for name, s in self.samplers.items()}

    def __iter__(self) -> Iterator[Any]:
        drawn = [t.tolist() for t in self.draw().values()]
        return iter(drawn[0]) if len(drawn) == 1 else zip(*drawn, strict=True)


# ----------------------------------------------------------------------------------------------------
# The loader


class DeviceLoader:
    """Batches of :class:`DeviceImages` in the order of one or several samplers (see the module doc).

    Args:
        images: the split's images on the device.
        samplers: stream name -> sampler (a training stream, or an evaluation shard); each epoch's
            indices are ``sampler.indices(epoch, device)``.
        batch_size: images per stream per batch.
        drop_last: drop the last incomplete batch (as ``DataLoader``).
        augment: apply the random crop / flip (training); False gives the un-augmented view.
        seed, rank: seed the augmentation generator with ``mix_seed(seed, epoch, rank, salt)``.
        return_index: append each image's dataset position to every ``[images, targets]``.
        channels_last: produce images in ``channels_last`` layout.
    """

    def __init__(self, images: DeviceImages, samplers: Mapping[str, Sampler[int]], batch_size: int, *,
                 drop_last: bool = False, augment: bool = True, seed: int = 0, rank: int = 0,
                 return_index: bool = False, channels_last: bool = False) -> None:
        if batch_size < 1:
            raise LtlibError(f"batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
        self.images = images
        self.sampler = DeviceStreamSampler(samplers, images.device)
        self.batch_sampler = None  # Lightning reads it wherever a loader has a ``sampler``, as on a DataLoader
        self.stream_names = list(samplers)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.augment = augment and images.augmentation.random
        self.seed, self.rank = int(seed), int(rank)
        self.return_index = return_index
        self.channels_last = channels_last

    @property
    def device(self) -> torch.device:
        return self.images.device

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing is drawn until the first batch is requested (Lightning calls iter()
        # once just to check that the loader is iterable).
        epoch = self.sampler.epoch
        drawn = self.sampler.draw()
        count = len(self.sampler)
        gen = seeded_generator(self.device, mix_seed(self.seed, epoch, self.rank, _AUGMENT_SALT))
        views = {name: (self.images.draw_views(count, gen) if self.augment else self.images.fixed_views(count))
                 for name in self.stream_names}
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            parts = {name: self._part(drawn[name][sl], *(v[sl] for v in views[name])) for name in self.stream_names}
            yield parts[self.stream_names[0]] if len(parts) == 1 else parts

    def _part(self, indices: Tensor, top: Tensor, left: Tensor, flip: Tensor) -> list[Tensor]:
        images = self.images.batch(indices, top, left, flip, self.channels_last)
        part = [images, self.images.targets[indices]]
        if self.return_index:
            part.append(indices)
        return part

    def __repr__(self) -> str:
        return (f"DeviceLoader(streams={self.stream_names}, batches={len(self)}, batch_size={self.batch_size}, "
                f"device={self.device})")


# ----------------------------------------------------------------------------------------------------
# Building loaders for LongTailDataModule


def pool_pixels(pool: ImagePool, indices: np.ndarray, max_workers: int = 8) -> np.ndarray:
    """``uint8 [n, H, W, C]`` pixels of ``pool``'s images ``indices`` (file pools decoded in threads);
    all images must have one size."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(pool, ArrayPool):
        pixels = pool.images[indices]
    else:
        with ThreadPoolExecutor(max_workers=max_workers) as ex:
            arrays = list(ex.map(lambda i: np.asarray(pool.load(int(i)), dtype=np.uint8), indices))
        odd = next((k for k, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
        if odd is not None:
            raise LtlibError(f"data.loader=device needs images of one size; {pool.describe(int(indices[odd]))} is "
                             f"{arrays[odd].shape} but {pool.describe(int(indices[0]))} is {arrays[0].shape}; "
                             "use data.loader=cpu")
        pixels = np.stack(arrays) if arrays else np.zeros((0, 1, 1, pool.in_chans), np.uint8)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    return np.ascontiguousarray(pixels)


def estimated_bytes(pool: ImagePool, count: int) -> int:
    """Bytes of ``count`` decoded images of ``pool`` (file pools: from the first file's header)."""
    if isinstance(pool, ArrayPool):
        return int(pool.images[0].nbytes) * count if len(pool) else 0
    from PIL import Image

    with Image.open(pool.describe(0)) as img:
        width, height = img.size
    return width * height * pool.in_chans * count


def _root_device(datamodule: Any) -> torch.device:
    strategy = getattr(getattr(datamodule, "trainer", None), "strategy", None)
    return torch.device(strategy.root_device) if strategy is not None else torch.device("cpu")


def _channels_last_model(datamodule: Any) -> bool:
    """Whether the attached model's first convolution is channels_last (inputs then follow)."""
    trainer = getattr(datamodule, "trainer", None)
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if not isinstance(module, nn.Module):
        return False
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return conv is not None and conv.weight.dim() == 4 and not conv.weight.is_contiguous() and \
        conv.weight.is_contiguous(memory_format=torch.channels_last)


def use_device_loader(setting: str, dataset: Any, device: torch.device) -> bool:
    """The ``data.loader`` decision for ``dataset`` (a ``PoolDataset``) on ``device``; raises a
    one-line error when ``device`` is asked for but the dataset's pipeline cannot run there."""
    check_loader(setting)
    if setting == "cpu":
        return False
    supported = DeviceAugmentation.from_transform(dataset.transform) is not None
    if setting == "device":
        if not supported:
            raise LtlibError(f"data.loader=device supports the cifar, digits and none augmentations (random crop, "
                             f"flip, normalisation); this pipeline is {dataset.transform!r}. Use data.loader=cpu")
        return True
    if device.type != "cuda" or not supported:
        return False
    return isinstance(dataset.pool, ArrayPool) or estimated_bytes(dataset.pool, len(dataset)) <= AUTO_MAX_BYTES


def device_images(datamodule: Any, dataset: Any, device: torch.device) -> DeviceImages:
    """The images of ``dataset`` on ``device``, uploaded once per data module and kept."""
    augmentation = DeviceAugmentation.from_transform(dataset.transform)
    key = (id(dataset.pool), indices_hash(dataset.indices), str(device), augmentation)
    cache = datamodule.__dict__.setdefault("_device_images", {})
    if key not in cache:
        pixels = torch.from_numpy(pool_pixels(dataset.pool, dataset.indices)).to(device)
        targets = torch.as_tensor(dataset.targets, dtype=torch.long).to(device)
        cache[key] = DeviceImages(pixels, targets, augmentation)
    return cache[key]


def maybe_device_loader(datamodule: Any, dataset: Any, samplers: Mapping[str, Sampler[int]], batch_size: int,
                        drop_last: bool) -> DeviceLoader | None:
    """A :class:`DeviceLoader` for ``dataset`` when ``datamodule.loader`` selects the device path, else None.

    A training dataset is recognised by its random augmentation (the eval pipeline has none) and gets
    augmented batches; ``dataset.return_index`` is honoured.
    """
    setting = getattr(datamodule, "loader", "cpu")
    if setting == "cpu":  # the default: nothing to decide
        return None
    device = _root_device(datamodule)
    if not use_device_loader(setting, dataset, device):
        return None
    images = device_images(datamodule, dataset, device)
    trainer = getattr(datamodule, "trainer", None)
    rank = int(trainer.global_rank) if trainer is not None else next(
        (int(s.rank) for s in samplers.values() if hasattr(s, "rank")), 0)
    return DeviceLoader(images, samplers, batch_size, drop_last=drop_last, augment=True,
                        seed=int(getattr(datamodule, "seed", 0)), rank=rank,
                        return_index=bool(getattr(dataset, "return_index", False)),
                        channels_last=_channels_last_model(datamodule))

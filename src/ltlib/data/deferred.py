"""Deferred re-sampling: a training sampler that switches to another one at a given epoch.

Cao et al.'s deferred re-balancing schedule (LDAM-DRW, NeurIPS 2019) trains on the original data for
most of the run and re-balances only late (epoch 160 of 200 on CIFAR). Deferred re-sampling (DRS) is
the sampler half of it: uniform (instance-balanced) sampling before the switch epoch, a re-balancing
sampler from it on.

A deferred sampler is named by a *spec* ``"<before>><after>@<epoch>"``, e.g.
``"uniform>class_balanced@160"``, wherever a sampler name is accepted (a method's ``train_streams``,
:func:`ltlib.data.samplers.create_sampler`). The switch is driven by ``set_epoch``, which Lightning
calls before every epoch, so it is deterministic and survives resuming from a checkpoint: epoch ``e``
draws exactly what the ``before`` sampler draws at epoch ``e`` when ``e < epoch``, and what the
``after`` sampler draws at epoch ``e`` otherwise (epochs count from 0, as in Lightning); both phases
are seeded with the stream of the deferred sampler (see :func:`create_deferred_sampler`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ltlib.data.samplers import IndexSampler, create_sampler, epoch_indices, list_samplers
from ltlib.errors import LtlibError, unknown_name

_SPEC = re.compile(r"^(?P<before>[^>@]+)>(?P<after>[^>@]+)@(?P<epoch>.+)$")


def deferred_sampler_spec(before: str, after: str, switch_epoch: int) -> str:
    """The spec string of a sampler that is ``before`` until ``switch_epoch`` and ``after`` from it on
    (validated: both names must be base samplers, the epoch an integer >= 0)."""
    spec = f"{before}>{after}@{switch_epoch}"
    parse_deferred_spec(spec)
    return spec


def is_deferred_spec(name: str) -> bool:
    """Whether ``name`` is written as a deferred spec (``A>B@E``); it may still be invalid."""
    return ">" in str(name)


def parse_deferred_spec(spec: str) -> tuple[str, str, int]:
    """Split ``"<before>><after>@<epoch>"`` into ``(before, after, epoch)``; LtlibError if malformed."""
    match = _SPEC.match(str(spec).strip())
    if match is None:
        raise LtlibError(f"sampler {spec!r} is not a valid deferred sampler; expected '<before>><after>@<epoch>', "
                         "e.g. 'uniform>class_balanced@160'")
    known = list_samplers()
    before, after = match["before"].strip(), match["after"].strip()
    for name in (before, after):
        if name not in known:
            raise unknown_name("sampler", name, known)
    epoch_text = match["epoch"].strip()
    if not epoch_text.isdigit():
        raise LtlibError(f"sampler {spec!r}: switch epoch {epoch_text!r} is invalid; allowed: an integer >= 0")
    return before, after, int(epoch_text)


class DeferredSampler(IndexSampler):
    """Delegate to ``before`` for epochs ``< switch_epoch`` and to ``after`` from ``switch_epoch`` on.

    Both samplers must yield the same number of indices per epoch (so the number of steps per epoch,
    and with it the learning-rate schedule, does not change at the switch). ``set_epoch`` reaches both;
    ``indices(epoch, device)`` is the phase's ``indices(epoch, device)``, so the DataLoader path and
    the device loader switch at the same epoch.
    """

    def __init__(self, before: Sampler[int], after: Sampler[int], switch_epoch: int) -> None:
        if isinstance(switch_epoch, bool) or int(switch_epoch) != switch_epoch or switch_epoch < 0:
            raise LtlibError(f"switch_epoch={switch_epoch!r} is invalid; allowed: an integer >= 0")
        if len(before) != len(after):
            raise LtlibError(f"a deferred sampler needs samplers of equal length; got {len(before)} before the "
                             f"switch and {len(after)} after it")
        self.before, self.after = before, after
        self.switch_epoch = int(switch_epoch)
        self.epoch = 0

    def phase(self, epoch: int) -> Sampler[int]:
        """The sampler ``epoch`` draws from."""
        return self.after if epoch >= self.switch_epoch else self.before

    @property
    def active(self) -> Sampler[int]:
        """The sampler the current epoch draws from."""
        return self.phase(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for sampler in (self.before, self.after):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.before)

    def indices(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``epoch``'s indices from its phase (see :meth:`IndexSampler.indices` for the guarantees)."""
        return epoch_indices(self.phase(epoch), epoch, device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(before={type(self.before).__name__}, after={type(self.after).__name__}, "
                f"switch_epoch={self.switch_epoch})")


def create_deferred_sampler(spec: str, targets: Sequence[int] | np.ndarray | torch.Tensor, seed: int,
                            rank: int = 0, world_size: int = 1, *,
                            stream: str | int = "main") -> DeferredSampler:
    """Build the deferred sampler named by ``spec`` (``"<before>><after>@<epoch>"``), sharded for ``rank``,
    for the training stream ``stream``.

    Both phases share the stream's identity on purpose: they never draw in the same epoch (the switch
    picks one of them per epoch, and every epoch is seeded afresh), and sharing it keeps the promise of
    the module doc that epoch ``e`` draws exactly what ``create_sampler(before or after, ...,
    stream=stream)`` draws at epoch ``e``. (Even a ``uniform`` and a class-aware phase at rank 0 get
    distinct seeds: :func:`~ltlib.data.samplers.mix_seed` is injective, ``(seed, stream, epoch)`` is
    not ``(seed, stream, epoch, 0)``.)
    """
    before, after, epoch = parse_deferred_spec(spec)
    return DeferredSampler(create_sampler(before, targets, seed, rank, world_size, stream=stream),
                           create_sampler(after, targets, seed, rank, world_size, stream=stream), epoch)

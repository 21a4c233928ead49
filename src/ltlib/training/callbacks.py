"""Fault tolerance for long runs: reproducible epochs, a non-finite loss guard, atomic checkpoint files.

``ltlib.training.train`` adds all of these to every run:

* :class:`EpochSeeding` makes the random draws of training epoch ``k`` a function of ``(seed, k, rank)``,
  so that a run resumed from an end-of-epoch checkpoint repeats the uninterrupted run exactly (a
  checkpoint restores weights, optimiser, learning-rate schedule and loop counters, but not the host
  random-number streams that augmentation draws from).
* :class:`NonFiniteLossGuard` stops training at the first NaN/inf loss with one line naming the step
  and the last good checkpoint, without a per-step host synchronisation.
* :class:`AtomicCheckpointIO` writes checkpoint files so that a run killed while saving keeps its
  previous checkpoint intact.
* :class:`FlushLogsEachEpoch` writes the loggers' buffered rows at every checkpoint and epoch start, so
  that a killed run keeps the logged rows of the epochs its checkpoints cover.
* :class:`ConfigInCheckpoint` stores the run's resolved configuration in every checkpoint, so that an
  automatic resume can refuse a checkpoint written under another configuration.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from ltlib.data.samplers import mix_seed
from ltlib.errors import LtlibError, check_in_range
from ltlib.io import atomic_writer

# Distinct streams derived from the same (seed, epoch, rank): Python's, NumPy's and torch's global RNGs
# and the DataLoader's. NumPy's and torch's each get their own: seeded with one number, torch's CPU
# generator and NumPy's legacy one would produce the same words.
_HOST_STREAM = 0
_LOADER_STREAM = 1
_NUMPY_STREAM = 2
_TORCH_STREAM = 3
_NO_BAD_STEP = 2**62


class EpochSeeding(Callback):
    """Reseed every random stream of training epoch ``k`` from ``(seed, k, global rank)``.

    At the start of each training epoch: Python's ``random``, NumPy's global RNG and torch's (CPU and
    every CUDA device). The training DataLoader also gets its own ``generator``, reseeded the same way:
    PyTorch draws one number from it (the base seed of worker processes) whenever it creates an
    iterator, which would otherwise shift the global stream by one draw at a point that differs
    between an uninterrupted and a resumed run. The generator is attached when Lightning builds the
    training loader, after a checkpoint has been restored, so the first epoch after a resume is
    seeded too.

    With ``num_workers=0`` (augmentation in the main process) a run resumed from an end-of-epoch
    checkpoint therefore repeats the uninterrupted run exactly. Worker processes seed their own streams
    when they start (once per run with persistent workers, from the generator above): after a resume
    their draws differ from the uninterrupted run's, which changes nothing statistically.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._loader_generator = torch.Generator()
        self._wrapped: Any = None

    def _seed(self, epoch: int, rank: int, stream: int) -> int:
        return mix_seed(self.seed, epoch, rank, stream)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None:
            return
        build_loader = datamodule.train_dataloader

        def seeded_train_dataloader() -> Any:
            loader = build_loader()
            if isinstance(loader, DataLoader) and loader.generator is None:
                self._loader_generator.manual_seed(
                    self._seed(trainer.current_epoch, trainer.global_rank, _LOADER_STREAM))
                loader.generator = self._loader_generator
            return loader

        datamodule.train_dataloader = seeded_train_dataloader
        self._wrapped = datamodule

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            del self._wrapped.train_dataloader  # back to the class's method
            self._wrapped = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch, rank = trainer.current_epoch, trainer.global_rank
        random.seed(self._seed(epoch, rank, _HOST_STREAM))
        np.random.seed(self._seed(epoch, rank, _NUMPY_STREAM) % 2**32)
        torch.manual_seed(self._seed(epoch, rank, _TORCH_STREAM))  # also seeds every CUDA device
        self._loader_generator.manual_seed(self._seed(epoch, rank, _LOADER_STREAM))


def newest_checkpoint(trainer: L.Trainer) -> Path | None:
    """The most recently written checkpoint file of the trainer's ModelCheckpoint callbacks, if any."""
    paths = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            paths.update(p for p in (callback.best_model_path, callback.last_model_path) if p)
    existing = [Path(p) for p in paths if Path(p).is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


class NonFiniteLossGuard(Callback):
    """Stop training at the first non-finite (NaN or inf) training loss.

    Each step records, on the device, the index of the first step whose loss was not finite (two small
    device operations, no host synchronisation). The host reads that record every
    ``check_every_n_steps`` optimiser steps (training uses ``trainer.log_every_n_steps``, where
    Lightning reads the logged loss anyway), before each validation and at the end of every training
    epoch; under DDP the earliest step over all ranks counts, so every rank stops together. The check
    at the end of an epoch runs before the epoch's checkpoints are written (Lightning runs
    ModelCheckpoint after the other callbacks), so the checkpoint it names is from before the first bad
    step. It raises an :class:`~ltlib.errors.LtlibError`: ``ltlib.run`` prints it as one line.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        check_in_range("check_every_n_steps", check_every_n_steps, 1)
        self.check_every_n_steps = int(check_every_n_steps)
        self._first_bad: torch.Tensor | None = None
        self._step: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._step = torch.full((), trainer.global_step, dtype=torch.long, device=device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and self._first_bad is not None and self._step is not None:
            bad = ~torch.isfinite(loss.detach()).all()
            self._first_bad = torch.where(bad & (self._first_bad < 0), self._step, self._first_bad)
            self._step += 1
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Raise if a non-finite loss has been seen on any rank (one host synchronisation)."""
        if self._first_bad is None:
            return
        recorded = torch.where(self._first_bad < 0, torch.full_like(self._first_bad, _NO_BAD_STEP), self._first_bad)
        first_bad = int(trainer.strategy.reduce(recorded, reduce_op="min"))
        if first_bad >= _NO_BAD_STEP:
            return
        raise LtlibError(self.message(trainer, first_bad))

    @staticmethod
    def message(trainer: L.Trainer, step: int) -> str:
        """The one-line error for a non-finite loss at optimiser step ``step`` (0-based)."""
        per_epoch = trainer.num_training_batches
        where = f"step {step}"
        if isinstance(per_epoch, int) and per_epoch > 0:
            where += f" (epoch {step // per_epoch}, batch {step % per_epoch} of {per_epoch})"
        checkpoint = newest_checkpoint(trainer)
        if checkpoint is None:
            last_good = "no checkpoint was written before it"
        else:
            last_good = f"the last good checkpoint is {checkpoint}"
        return (f"the training loss became non-finite (NaN or inf) at {where}; training stopped, {last_good}; "
                "lower optim.lr or set trainer.gradient_clip_val, then start again or resume with ckpt_path=<checkpoint>")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file in the target's directory, flush it to disk, then rename it
    over the target (:func:`ltlib.io.atomic_writer`), so that a process killed while saving leaves the
    previous checkpoint intact. Lightning's own save stages the bytes in the system temporary directory
    and moves them, which turns into a non-atomic copy when that directory is on another filesystem (as
    on most clusters). Remote URLs (``s3://`` ...) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        text = str(path)
        if storage_options is not None or ("://" in text and not text.startswith("file://")):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(text.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(target) as file:
            torch.save(checkpoint, file)


def remove_partial_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete temporary files that :class:`AtomicCheckpointIO` left behind when a run was killed while
    saving; returns them."""
    leftovers = sorted(Path(checkpoint_dir).glob(".*.ckpt.*.tmp")) if Path(checkpoint_dir).is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


class FlushLogsEachEpoch(Callback):
    """Write the loggers' buffered rows (Lightning's CSVLogger keeps up to 100 steps in memory) whenever a
    checkpoint is saved and at the start of every training epoch, so that the rows a checkpoint covers
    are on disk when the run is killed. Lightning sends an epoch's epoch-mean training metrics to the
    loggers only after the epoch's checkpoints: a run killed in the few milliseconds between the two
    loses that one row (the resumed run continues with the next epoch)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()


class ConfigInCheckpoint(Callback):
    """Store the run's resolved configuration under ``checkpoint["ltlib_config"]``."""

    key = "ltlib_config"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = self.config

"""Per-class feature norms over training and on the test set (FBL figure 2, tables 5 and 6).

FBL argues that tail classes end up with small penultimate-feature norms ``||f||`` and that its loss
raises them. This module measures that for any method:

* :func:`per_class_feature_norms` and :func:`accumulate_feature_norms` compute the mean l2-norm of the
  features of each class (the data); :func:`plot_feature_norm_curves` and
  :func:`plot_feature_norms_per_class` draw the two panels of figure 2 from such data, for one run or
  several (CE next to FBL); :func:`compare_feature_norms` does so from run directories
  (``python -m ltlib.analysis.feature_norms OUT_DIR CE=run_ce FBL=run_fbl``).
* :class:`FeatureNormCallback` (``callbacks=feature_norms``) records, during training, the mean
  feature norm of every class in every epoch on the training batches, and at the end on the test
  set, then writes the plots and a per-class table (training count, mean train and test norm, test
  accuracy) into the run directory.

Which features: the pooled output of ``pl_module.backbone``, i.e. the input of a linear classifier
(post-ReLU, globally average pooled; what FBL's ``||f||`` is). The callback captures it with a forward
hook on the backbone when the method calls ``backbone(images)`` on the batch's images (CE, RW, RS, FBL
and every method built on ``LongTailMethod.forward``): no extra computation. For a method that calls
the backbone's parts separately (BBN's branches) or transforms the images first (mixup), the hook sees
no such call; the callback then computes the features itself after the step, under ``no_grad``, with
``pl_module.penultimate_features(images)`` when the method defines it, else ``pl_module.backbone(images)``,
in the module's current mode and with batch-norm running statistics restored afterwards, so training is
unchanged (at the cost of one extra forward pass of the analysed images per step).

Which images: single-stream batches ``(images, targets)`` as they are; multi-stream batches
``{stream: (images, targets)}`` use the stream named ``main``, else the first stream whose sampler is
``uniform`` (the natural, long-tailed distribution), else the first stream (``stream=`` overrides).
Training norms are those of the augmented training batches of the epoch, in training mode, as the
weights evolve over it; test norms come from the evaluated checkpoint in eval mode. Sums and counts stay
on the device during the epoch and are reduced across processes once, at its last batch.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ltlib.analysis.results import save_figure
from ltlib.errors import LtlibError, check_int
from ltlib.io import atomic_write_text

FEATURE_NORMS_CSV = "feature_norms.csv"
FEATURE_NORM_HISTORY_CSV = "feature_norms_history.csv"
CURVES_PLOT = "feature_norms_epochs.png"
PER_CLASS_PLOT = "feature_norms_test.png"

_LINE_STYLES = ("-", "--", ":", "-.")


# ---------------------------------------------------------------------------------------- the data
def accumulate_feature_norms(sums: Tensor, counts: Tensor, features: Tensor, targets: Tensor) -> None:
    """Add each sample's l2 feature norm to ``sums[target]`` and 1 to ``counts[target]``, in place, on
    the device of ``sums`` (no host synchronisation). ``features`` is ``[B, D]`` (or ``[B, ...]``,
    flattened), ``targets`` ``[B]`` class indices."""
    norms = torch.linalg.vector_norm(features.detach().flatten(1).float(), dim=1)
    targets = targets.to(sums.device)
    sums.index_add_(0, targets, norms.to(sums.device, sums.dtype))
    counts.index_add_(0, targets, torch.ones_like(norms, device=sums.device, dtype=counts.dtype))


def mean_norms(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums / counts`` per class as float32, NaN for classes without samples."""
    counts = counts.float()
    means = sums.float() / counts.clamp_min(1.0)
    return torch.where(counts > 0, means, torch.full_like(means, math.nan))


def per_class_feature_norms(features: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Mean l2-norm of the features of each class: ``[num_classes]`` float32 on the features' device,
    NaN for a class without samples.

    >>> per_class_feature_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]), torch.tensor([0, 1, 0]), 3)
    tensor([7.5000, 1.0000,    nan])
    """
    if features.dim() < 2 or targets.dim() != 1 or features.shape[0] != targets.shape[0]:
        raise LtlibError(f"features of shape {list(features.shape)} and targets of shape {list(targets.shape)} "
                         "do not match; expected [N, D] and [N]")
    sums = torch.zeros(num_classes, device=features.device)
    counts = torch.zeros(num_classes, device=features.device)
    accumulate_feature_norms(sums, counts, features, targets.long())
    return mean_norms(sums, counts)


def shown_classes(class_counts: Sequence[int], num_shown: int = 2, head_classes: Sequence[int] | None = None,
                  tail_classes: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """The head and tail classes figure 2's curves show: the given ones, else the ``num_shown`` classes
    with the most and with the fewest training images (ties by class index). For CIFAR-10-LT this is
    {0, 1} and {8, 9}, the paper's choice; the paper shows {9, 19} and {79, 89} for CIFAR-100-LT."""
    num_classes = len(class_counts)
    order = sorted(range(num_classes), key=lambda c: (-int(class_counts[c]), c))
    num_shown = min(int(num_shown), num_classes)
    head = list(head_classes) if head_classes is not None else sorted(order[:num_shown])
    tail = list(tail_classes) if tail_classes is not None else sorted(order[num_classes - num_shown:])
    for name, classes in (("head_classes", head), ("tail_classes", tail)):
        bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes]
        if bad:
            raise LtlibError(f"{name}={classes!r} has {bad!r} out of range; allowed: class indices 0..{num_classes - 1}")
    return head, tail


# ------------------------------------------------------------------------------------------ plots
def plot_feature_norm_curves(curves: Mapping[str, tuple[Sequence[int], np.ndarray | Tensor]],
                             head_classes: Sequence[int], tail_classes: Sequence[int],
                             path: str | os.PathLike[str], class_counts: Sequence[int] | None = None,
                             title: str = "Training feature norm per class") -> Path:
    """FBL figure 2, left: mean feature norm against the epoch for the head and tail classes.

    ``curves`` maps a run label (e.g. ``"CE"``, ``"FBL"``) to ``(epochs, norms)`` with ``norms`` of
    shape ``[len(epochs), C]``. One colour per class (blues for head, reds for tail), one line style
    per run.
    """
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    head_colors = ("#1f4e99", "#4C72B0", "#7fa6d6", "#a9c4e6")
    tail_colors = ("#C44E52", "#e07b39", "#d6a03c", "#8c2d2f")
    colors = {c: head_colors[i % len(head_colors)] for i, c in enumerate(head_classes)}
    colors.update({c: tail_colors[i % len(tail_colors)] for i, c in enumerate(tail_classes)})
    for k, (label, (epochs, norms)) in enumerate(curves.items()):
        values = np.asarray(torch.as_tensor(norms, dtype=torch.float32))
        for c in [*head_classes, *tail_classes]:
            kind = "head" if c in head_classes else "tail"
            count = f", n={int(class_counts[c])}" if class_counts is not None else ""
            name = f"{kind} class {c}{count}" + (f" ({label})" if len(curves) > 1 else "")
            ax.plot(list(epochs), values[:, c], _LINE_STYLES[k % len(_LINE_STYLES)], color=colors[c], label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean feature l2-norm (training batches)")
    ax.set_title(title)
    ax.legend(fontsize="x-small", ncol=2)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_feature_norms_per_class(norms: Mapping[str, np.ndarray | Tensor], class_counts: Sequence[int],
                                 path: str | os.PathLike[str], title: str = "Test feature norm per class") -> Path:
    """FBL figure 2, right: mean feature norm of each class on the test set, classes sorted by training
    count (head to tail; class index order for CIFAR-LT), one line per run."""
    order = sorted(range(len(class_counts)), key=lambda c: (-int(class_counts[c]), c))
    figure = Figure(figsize=(max(6.4, 0.08 * len(order) + 4), 4.0))
    ax = figure.add_subplot()
    for k, (label, values) in enumerate(norms.items()):
        array = np.asarray(torch.as_tensor(values, dtype=torch.float32))[order]
        ax.plot(np.arange(len(order)), array, _LINE_STYLES[k % len(_LINE_STYLES)], marker="o",
                markersize=3 if len(order) <= 100 else 0, label=label or None)
    if len(order) <= 20:
        ax.set_xticks(np.arange(len(order)), [str(c) for c in order])
    ax.set_xlabel("class, sorted by training images (head → tail)")
    ax.set_ylabel("mean feature l2-norm (test set)")
    ax.set_title(title)
    if any(norms):
        ax.legend(fontsize="small")
    figure.tight_layout()
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------- run files
def _cell(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def _nan_list(values: np.ndarray | Sequence[float] | None, size: int) -> list[float]:
    if values is None:
        return [math.nan] * size
    return [float(v) for v in np.asarray(values, dtype=np.float64)]


def write_feature_norm_tables(output_dir: str | os.PathLike[str], class_names: Sequence[str],
                              class_counts: Sequence[int], epochs: Sequence[int], train_history: np.ndarray | None,
                              test_norms: np.ndarray | None, test_acc: np.ndarray | None) -> list[Path]:
    """Write ``feature_norms.csv`` (class, name, train_count, train_norm of the last epoch, test_norm,
    test_acc) and, when there is a history, ``feature_norms_history.csv`` (one row per epoch, one column
    per class). Undefined values are empty cells."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = len(class_counts)
    last = train_history[-1] if train_history is not None and len(train_history) else None
    columns = zip(_nan_list(last, num_classes), _nan_list(test_norms, num_classes), _nan_list(test_acc, num_classes),
                  strict=True)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "name", "train_count", "train_norm", "test_norm", "test_acc"])
    for c, (train, test, acc) in enumerate(columns):
        writer.writerow([c, class_names[c], int(class_counts[c]), _cell(train), _cell(test), _cell(acc)])
    written = [out / FEATURE_NORMS_CSV]
    atomic_write_text(written[0], table.getvalue())
    if train_history is not None and len(train_history):
        history = io.StringIO()
        writer = csv.writer(history, lineterminator="\n")
        writer.writerow(["epoch", *range(num_classes)])
        for epoch, row in zip(epochs, np.asarray(train_history, dtype=np.float64), strict=True):
            writer.writerow([int(epoch), *map(_cell, row)])
        written.append(out / FEATURE_NORM_HISTORY_CSV)
        atomic_write_text(written[1], history.getvalue())
    return written


def _float(cell: str) -> float:
    return float(cell) if cell.strip() else math.nan


def read_feature_norms(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run directory's feature-norm tables back: ``class_names``, ``class_counts``, ``train_norm``,
    ``test_norm``, ``test_acc`` (arrays ``[C]``), ``epochs`` and ``train_history`` (``[E, C]``, empty
    when the run has no history)."""
    run = Path(run_dir)
    table = run / FEATURE_NORMS_CSV
    if not table.is_file():
        raise LtlibError(f"{str(run)!r} has no {FEATURE_NORMS_CSV}; was it run with callbacks=feature_norms?")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    data: dict[str, Any] = {
        "class_names": [row["name"] for row in rows],
        "class_counts": [int(row["train_count"]) for row in rows],
        **{key: np.array([_float(row[key]) for row in rows]) for key in ("train_norm", "test_norm", "test_acc")},
        "epochs": np.zeros(0, dtype=np.int64),
        "train_history": np.zeros((0, len(rows))),
    }
    history = run / FEATURE_NORM_HISTORY_CSV
    if history.is_file():
        with history.open(newline="") as handle:
            lines = list(csv.reader(handle))[1:]
        data["epochs"] = np.array([int(line[0]) for line in lines], dtype=np.int64)
        data["train_history"] = np.array([[_float(cell) for cell in line[1:]] for line in lines]).reshape(
            len(lines), len(rows))
    return data


def compare_feature_norms(runs: Mapping[str, str | os.PathLike[str]], output_dir: str | os.PathLike[str],
                          head_classes: Sequence[int] | None = None, tail_classes: Sequence[int] | None = None,
                          num_shown: int = 2) -> list[Path]:
    """FBL figure 2 for several runs (e.g. ``{"CE": ce_dir, "FBL": fbl_dir}``) of the same data, each run
    with ``callbacks=feature_norms``: writes ``feature_norms_epochs.png`` and ``feature_norms_test.png``
    into ``output_dir`` with one line style per run."""
    if not runs:
        raise LtlibError("compare_feature_norms needs at least one run directory")
    data = {label: read_feature_norms(run) for label, run in runs.items()}
    counts = next(iter(data.values()))["class_counts"]
    for label, values in data.items():
        if values["class_counts"] != counts:
            raise LtlibError(f"run {label!r} ({runs[label]}) has other class counts than {next(iter(runs))!r}; "
                             "compare runs of the same data")
    head, tail = shown_classes(counts, num_shown, head_classes, tail_classes)
    out = Path(output_dir)
    written = []
    curves = {label: (d["epochs"], d["train_history"]) for label, d in data.items() if len(d["epochs"])}
    if curves:
        written.append(plot_feature_norm_curves(curves, head, tail, out / CURVES_PLOT, class_counts=counts))
    written.append(plot_feature_norms_per_class({label: d["test_norm"] for label, d in data.items()}, counts,
                                                out / PER_CLASS_PLOT))
    return written


# --------------------------------------------------------------------------------------- callback
@contextmanager
def batch_norm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Restore every batch-norm running statistic of ``module`` on exit (device copies, no sync), so that
    an extra forward pass in training mode leaves the model as it was."""
    buffers = [buffer for layer in module.modules() if isinstance(layer, _BatchNorm)
               for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked) if buffer is not None]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


class FeatureNormCallback(L.Callback):
    """Record per-class mean feature norms every epoch (training batches) and on the test set.

    Works for any ``LongTailMethod`` (see the module docstring for how features are obtained and which
    stream is analysed). At the end of the run (``on_run_end``, called by ``ltlib.run`` on rank 0 after
    the test) it writes into the run directory:

    * ``feature_norms_epochs.png``: the norm over the epochs for the head and tail classes (figure 2, left);
    * ``feature_norms_test.png``: the norm of every class on the test set (figure 2, right);
    * ``feature_norms.csv``: per class the training count, the mean norm over the last training epoch,
      the mean test norm and the test accuracy (tables 5 and 6 next to the norms);
    * ``feature_norms_history.csv``: the training norm of every class in every epoch;

    and adds ``feature_norms`` to ``results.json``. The norms of the shown classes are also logged each
    epoch as ``feature_norm/class_<c>``. The history is kept in checkpoints, so a resumed run continues it.

    Args:
        head_classes, tail_classes: the classes of the epoch plot; default the ``num_shown`` classes with
            the most and with the fewest training images.
        num_shown: how many head and tail classes to show by default.
        stream: the training stream analysed in multi-stream batches (default: ``main``, else the first
            ``uniform`` stream, else the first).
    """

    def __init__(self, head_classes: Sequence[int] | None = None, tail_classes: Sequence[int] | None = None,
                 num_shown: int = 2, stream: str | None = None) -> None:
        super().__init__()
        check_int("feature_norms num_shown", num_shown, 1)
        self.head_classes = None if head_classes is None else [int(c) for c in head_classes]
        self.tail_classes = None if tail_classes is None else [int(c) for c in tail_classes]
        self.num_shown = num_shown
        self.stream = stream
        self.epochs: list[int] = []
        self.train_history: list[Tensor] = []
        self.test_norms: Tensor | None = None
        self._head: list[int] = []
        self._tail: list[int] = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._pending: tuple[Tensor, Tensor] | None = None
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None
        self._finished_epoch: int | None = None
        self._stage: str | None = None

    # ---------------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage
        num_classes = getattr(pl_module, "num_classes", None)
        counts = getattr(pl_module, "class_counts", None)
        if not isinstance(num_classes, int) or counts is None:
            raise LtlibError(f"callbacks=feature_norms needs a method with num_classes and class_counts; "
                             f"{type(pl_module).__name__} has none")
        backbone = getattr(pl_module, "backbone", None)
        if not isinstance(backbone, nn.Module) and not callable(getattr(pl_module, "penultimate_features", None)):
            raise LtlibError(f"callbacks=feature_norms needs a method with a backbone module or a "
                             f"penultimate_features(images) method; {type(pl_module).__name__} has neither")
        self._head, self._tail = shown_classes(torch.as_tensor(counts).tolist(), self.num_shown,
                                               self.head_classes, self.tail_classes)
        if self._hook is None and isinstance(backbone, nn.Module):
            self._hook = backbone.register_forward_hook(self._capture)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._pending = None

    def _reset(self, pl_module: L.LightningModule) -> None:
        self._sums = torch.zeros(pl_module.num_classes, device=pl_module.device)
        self._counts = torch.zeros(pl_module.num_classes, device=pl_module.device)

    # -------------------------------------------------------------------------------- features
    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook on the backbone: accumulate when it runs on the analysed images."""
        pending = self._pending
        if pending is None or not args or args[0] is not pending[0] or not isinstance(output, Tensor):
            return
        self._pending = None  # once per batch, however often the method calls the backbone
        accumulate_feature_norms(self._sums, self._counts, output, pending[1])

    def _analysed(self, batch: Any, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """``(images, targets)`` of the analysed stream of a training or evaluation batch."""
        if not isinstance(batch, Mapping):
            return batch[0], batch[1]
        if self.stream is not None:
            if self.stream not in batch:
                raise LtlibError(f"feature_norms stream={self.stream!r} is not a training stream; "
                                 f"available: {', '.join(map(str, batch))}")
            name = self.stream
        elif "main" in batch:
            name = "main"
        else:
            samplers = getattr(pl_module, "train_streams", {}) or {}
            name = next((s for s in batch if samplers.get(s) == "uniform"), next(iter(batch)))
        return batch[name][0], batch[name][1]

    def _features_after_step(self, pl_module: L.LightningModule) -> None:
        """The method did not call ``backbone(images)`` on the analysed images: compute them here."""
        images, targets = self._pending
        self._pending = None
        extract = getattr(pl_module, "penultimate_features", None)
        with torch.no_grad(), batch_norm_statistics_kept(pl_module):
            features = extract(images) if callable(extract) else pl_module.backbone(images)
        accumulate_feature_norms(self._sums, self._counts, features, targets)

    # -------------------------------------------------------------------------------- training
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._pending = self._analysed(batch, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending is not None:
            self._features_after_step(pl_module)
        # Finish the epoch at its last batch, before validation, so that the checkpoint written after
        # validation already holds this epoch.
        if batch_idx + 1 == trainer.num_training_batches:
            self._finish_epoch(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_epoch(trainer)
        if self.epochs and self.epochs[-1] == trainer.current_epoch:
            latest = self.train_history[-1]
            for c in sorted({*self._head, *self._tail}):
                # The same value on every rank; sync_dist only tells Lightning it is global (once per epoch).
                pl_module.log(f"feature_norm/class_{c}", float(latest[c]), on_step=False, on_epoch=True,
                              sync_dist=True)

    def _finish_epoch(self, trainer: L.Trainer) -> None:
        epoch = trainer.current_epoch
        if self._finished_epoch == epoch or self._sums is None:
            return
        sums = trainer.strategy.reduce(self._sums, reduce_op="sum")
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum")
        self.epochs.append(int(epoch))
        self.train_history.append(mean_norms(sums, counts).cpu())
        self._finished_epoch = epoch

    # ------------------------------------------------------------------------------------ test
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._pending = self._analysed(batch, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._pending is not None:
            self._features_after_step(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sums = trainer.strategy.reduce(self._sums, reduce_op="sum")
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum")
        self.test_norms = mean_norms(sums, counts).cpu()

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        history = torch.stack(self.train_history) if self.train_history else torch.zeros(0)
        return {"epochs": list(self.epochs), "train_history": history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resuming a fit continues the checkpoint's history. Validating or testing a checkpoint after
        # the fit (ltlib.run evaluates the best epoch) keeps the history of the whole run just recorded.
        if self._stage != "fit" and self.epochs:
            return
        self.epochs = [int(e) for e in state_dict.get("epochs", [])]
        history = state_dict.get("train_history")
        self.train_history = list(history.unbind(0)) if self.epochs else []

    # ----------------------------------------------------------------------------- run end
    def on_run_end(self, output_dir: str | os.PathLike[str], trainer: L.Trainer,
                   pl_module: L.LightningModule) -> dict[str, Any]:
        """Write the plots and tables into ``output_dir``; return the ``feature_norms`` entry of results.json."""
        out = Path(output_dir)
        counts = torch.as_tensor(pl_module.class_counts).tolist()
        names = list(getattr(pl_module, "class_names", [str(c) for c in range(len(counts))]))
        history = torch.stack(self.train_history).double().numpy() if self.train_history else None
        test = self.test_norms.double().numpy() if self.test_norms is not None else None
        test_metrics = getattr(pl_module, "last_metrics", {}).get("test", {})
        test_acc = test_metrics.get("per_class_acc")
        test_acc = torch.as_tensor(test_acc).double().cpu().numpy() if test_acc is not None else None
        files = write_feature_norm_tables(out, names, counts, self.epochs, history, test, test_acc)
        label = type(pl_module).__name__
        if history is not None:
            files.append(plot_feature_norm_curves({label: (self.epochs, history)}, self._head, self._tail,
                                                  out / CURVES_PLOT, class_counts=counts,
                                                  title=f"Training feature norm per class ({label})"))
        if test is not None:
            files.append(plot_feature_norms_per_class({label: test}, counts, out / PER_CLASS_PLOT,
                                                      title=f"Test feature norm per class ({label})"))
        entry: dict[str, Any] = {
            "head_classes": self._head,
            "tail_classes": self._tail,
            "epochs": list(self.epochs),
            "train_last_epoch": _nan_list(history[-1] if history is not None else None, len(counts)),
            "test": _nan_list(test, len(counts)),
            "curves": {str(c): (history[:, c].tolist() if history is not None else [])
                       for c in [*self._head, *self._tail]},
            "files": [os.path.relpath(path, out) for path in files],
        }
        return {"feature_norms": entry}


# -------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ltlib.analysis.feature_norms OUT_DIR LABEL=RUN_DIR ...``: figure 2 for several runs."""
    parser = argparse.ArgumentParser(prog="python -m ltlib.analysis.feature_norms",
                                     description="Draw FBL figure 2 (feature norms) for runs made with "
                                                 "callbacks=feature_norms, e.g. CE next to FBL.")
    parser.add_argument("output_dir")
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--head", type=int, nargs="+", default=None, help="head classes of the epoch plot")
    parser.add_argument("--tail", type=int, nargs="+", default=None, help="tail classes of the epoch plot")
    args = parser.parse_args(argv)
    try:
        runs = {}
        for item in args.runs:
            label, sep, run = item.partition("=")
            if not sep or not label or not run:
                raise LtlibError(f"run {item!r} is not LABEL=RUN_DIR")
            runs[label] = run
        for path in compare_feature_norms(runs, args.output_dir, args.head, args.tail):
            print(path)
    except LtlibError as exc:
        print(f"ltlib: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

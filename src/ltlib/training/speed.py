"""Fast training settings and phase timing.

The settings are options (:class:`SpeedSettings`) applied by the :class:`FastTraining` callback when
fitting starts; ``conf/trainer/gpu_fast.yaml`` switches them on for one GPU through
:func:`fast_trainer`, a drop-in replacement for ``lightning.Trainer`` as a Hydra ``_target_``:

=====================  ========================================================================
setting                effect
=====================  ========================================================================
``channels_last``      model parameters in NHWC; the device loader then produces NHWC images
``compile``            ``nn.Module.compile`` of the modules that carry the FLOPs (see
                       :func:`compile_targets`); ``compile_mode="reduce-overhead"`` adds CUDA-graph
                       capture of the compiled regions (static shapes)
``matmul_precision``   ``torch.set_float32_matmul_precision`` (``high``: TF32 on Ampere and later)
``cudnn_benchmark``    ``torch.backends.cudnn.benchmark`` (the trainer's ``benchmark`` does the same)
``sync_free_metrics``  turn off torchmetrics aggregators' NaN check, a host synchronisation per update
``progress_refresh``   progress bar refresh every N steps (each refresh reads the loss from the device)
=====================  ========================================================================

Mixed precision is Lightning's own: ``trainer.precision=bf16-mixed`` (autocast to bfloat16).

:class:`PhaseTimer` measures where a run's wall time goes (data, forward/backward, evaluation,
compile warm-up) and adds it to ``results.json`` (``callbacks=timing``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from ltlib.errors import LtlibError, unknown_name

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_PRECISIONS = ("highest", "high", "medium")


@dataclass
class SpeedSettings:
    """Training-speed options (all off by default: results identical to a plain run)."""

    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    compile_dynamic: bool | None = False
    matmul_precision: str | None = None
    cudnn_benchmark: bool | None = None
    sync_free_metrics: bool = True
    progress_refresh: int | None = None

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise unknown_name("speed.compile_mode", self.compile_mode, COMPILE_MODES)
        if self.matmul_precision is not None and self.matmul_precision not in MATMUL_PRECISIONS:
            raise unknown_name("speed.matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        if self.progress_refresh is not None and (isinstance(self.progress_refresh, bool)
                                                  or not isinstance(self.progress_refresh, int)
                                                  or self.progress_refresh < 1):
            raise LtlibError(f"speed.progress_refresh={self.progress_refresh!r} is invalid; allowed: an integer "
                             ">= 1 or null")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SpeedSettings:
        """Build from a config mapping; an unknown key is a one-line error."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise unknown_name("speed setting", key, known)
        return cls(**values)


def compile_targets(module: nn.Module) -> dict[str, nn.Module]:
    """The submodules :class:`FastTraining` compiles, by qualified name.

    Methods call a backbone's ``trunk`` and ``last_block`` directly (BBN runs the trunk on two
    sub-batches, the two-head model reads the unpooled map), so those two are compiled rather than
    the backbone as a whole; so is every other direct child of the method that holds a convolution
    (BBN's re-balancing block, the two-head feature-balancing head). Classifiers are left eager: they
    cost nothing and some take Python floats (BBN's alpha) that would recompile them every epoch.
    """
    targets: dict[str, nn.Module] = {}
    backbone = getattr(module, "backbone", None)
    for part in ("trunk", "last_block"):
        sub = getattr(backbone, part, None)
        if isinstance(sub, nn.Module):
            targets[f"backbone.{part}"] = sub
    if not targets and isinstance(backbone, nn.Module):
        targets["backbone"] = backbone
    for name, child in module.named_children():
        if child is backbone or name in targets:
            continue
        if any(isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) for m in child.modules()):
            targets[name] = child
    return targets


def disable_metric_nan_checks(module: nn.Module) -> int:
    """Set ``nan_strategy="disable"`` on every torchmetrics aggregator (MeanMetric, SumMetric, ...) in
    ``module``: their NaN check runs ``if nans.any()`` on the host, a device synchronisation per
    ``update``. A NaN loss then shows up as a NaN epoch mean instead of a warning. Returns the count."""
    from torchmetrics.aggregation import BaseAggregator

    count = 0
    for m in module.modules():
        if isinstance(m, BaseAggregator) and m.nan_strategy != "disable":
            m.nan_strategy = "disable"
            count += 1
    return count


def apply_speed_settings(module: nn.Module, settings: SpeedSettings) -> dict[str, Any]:
    """Apply ``settings`` to ``module`` (in place) and to the process; returns what was done."""
    done: dict[str, Any] = {}
    if settings.matmul_precision is not None:
        torch.set_float32_matmul_precision(settings.matmul_precision)
        done["matmul_precision"] = settings.matmul_precision
    if settings.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(settings.cudnn_benchmark)
        done["cudnn_benchmark"] = bool(settings.cudnn_benchmark)
    if settings.channels_last:
        module.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if settings.sync_free_metrics:
        done["sync_free_metrics"] = disable_metric_nan_checks(module)
    if settings.compile:
        targets = compile_targets(module)
        for sub in targets.values():
            sub.compile(mode=None if settings.compile_mode == "default" else settings.compile_mode,
                        backend=settings.compile_backend, dynamic=settings.compile_dynamic)
        done["compiled"] = sorted(targets)
    return done


class FastTraining(Callback):
    """Apply :class:`SpeedSettings` to the LightningModule once, before the dataloaders are built (so
    the device loader sees a channels_last model and produces channels_last images)."""

    def __init__(self, settings: SpeedSettings | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if settings is not None and kwargs:
            raise LtlibError("FastTraining takes settings or keyword settings, not both")
        self.settings = settings if isinstance(settings, SpeedSettings) else SpeedSettings.from_mapping(
            dict(settings or {}) | kwargs)
        self.applied: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "_ltlib_speed_applied", False):
            return
        self.applied = apply_speed_settings(pl_module, self.settings)
        pl_module._ltlib_speed_applied = True


def fast_trainer(*, speed: Mapping[str, Any] | None = None, callbacks: Sequence[Callback] | None = None,
                 **trainer_kwargs: Any) -> L.Trainer:
    """A ``lightning.Trainer`` with :class:`FastTraining` (``speed``: :class:`SpeedSettings` fields)
    appended to ``callbacks``; with ``speed.progress_refresh`` and a progress bar, a bar that refreshes
    (and reads the loss from the device) only every that many steps."""
    settings = SpeedSettings.from_mapping(speed)
    extra: list[Callback] = [FastTraining(settings)]
    if settings.progress_refresh and trainer_kwargs.get("enable_progress_bar", True) is not False:
        extra.append(TQDMProgressBar(refresh_rate=settings.progress_refresh))
    return L.Trainer(callbacks=[*(callbacks or []), *extra], **trainer_kwargs)


# ----------------------------------------------------------------------------------------------------
# Phase timing


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer(Callback):
    """Wall time of a run's phases, added to ``results.json`` as ``timings`` (and ``timings.json``).

    * ``train_epoch_s``: every training epoch, start to end, the device synchronised at the end;
    * ``data_s``: host time between the end of one training step and the start of the next, i.e.
      producing (and moving) the next batch; on a GPU the device work of the loader overlaps;
    * ``data_alone_s``: one training epoch of the loader iterated on its own at the end of fitting
      (synchronised), the loader's real cost per epoch;
    * ``eval_s``: every validation epoch, and with ``test_every_epoch`` a pass over the test set after
      every training epoch (its accuracy in ``test_each_epoch``; the official BBN code evaluates the
      test set every epoch); ``final_eval_s``: the final validation and test of the selected checkpoint;
    * ``warmup_s``: the first training epoch minus the median of the others (compilation, cuDNN
      autotuning, allocator warm-up), likewise for evaluation;
    * ``fit_s``: ``trainer.fit`` from ``on_fit_start`` to ``on_fit_end``.

    ``sync_steps`` synchronises the device around every step so that ``data_s`` is device time too
    (two host synchronisations per step: for a breakdown, not for the headline number).
    """

    def __init__(self, test_every_epoch: bool = False, sync_steps: bool = False, measure_data_alone: bool = True,
                 path: str | None = "timings.json") -> None:
        self.test_every_epoch = bool(test_every_epoch)
        self.sync_steps = bool(sync_steps)
        self.measure_data_alone = bool(measure_data_alone)
        self.path = path
        self.train_epoch_s: list[float] = []
        self.eval_s: list[float] = []
        self.test_epoch_s: list[float] = []
        self.test_each_epoch: list[float] = []
        self.data_s = 0.0
        self.data_alone_s: float | None = None
        self.final_eval_s = 0.0
        self.fit_s: float | None = None
        self.steps = 0
        self._t: dict[str, float] = {}
        self._test_top1: list[Tensor] = []

    # -- helpers
    def _now(self, pl_module: L.LightningModule, sync: bool = True) -> float:
        if sync:
            synchronize(pl_module.device)
        return time.perf_counter()

    # -- fit
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["fit"] = self._now(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_s = self._now(pl_module) - self._t["fit"]
        if self.measure_data_alone:
            self.data_alone_s = self._loader_epoch_time(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["epoch"] = self._t["step_end"] = self._now(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.data_s += self._now(pl_module, self.sync_steps) - self._t["step_end"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.steps += 1
        self._t["step_end"] = self._now(pl_module, self.sync_steps)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_epoch_s.append(self._now(pl_module) - self._t["epoch"])
        if self.test_every_epoch:
            start = self._now(pl_module)
            self._test_top1.append(self._evaluate_test(trainer, pl_module))
            self.test_epoch_s.append(self._now(pl_module) - start)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["val"] = self._now(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = self._now(pl_module) - self._t["val"]
        if trainer.state.fn == "fit":
            self.eval_s.append(elapsed)
        else:
            self.final_eval_s += elapsed

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["test"] = self._now(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final_eval_s += self._now(pl_module) - self._t["test"]

    # -- measurements outside the loop
    @torch.no_grad()
    def _evaluate_test(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """Top-1 on the test set with ``evaluate_logits`` (eval mode), accumulated on the device."""
        datamodule = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        correct = torch.zeros((), dtype=torch.long, device=pl_module.device)
        total = 0
        try:
            for images, targets in datamodule.test_dataloader():
                images = images.to(pl_module.device, non_blocking=True)
                targets = targets.to(pl_module.device, non_blocking=True)
                with trainer.precision_plugin.forward_context():
                    logits = pl_module.evaluate_logits(images)
                correct += (logits.argmax(dim=1) == targets).sum()
                total += int(targets.shape[0])
        finally:
            pl_module.train(was_training)
        return correct.double() / max(total, 1)

    def _loader_epoch_time(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, Mapping | Sequence):
            return None
        start = self._now(pl_module)
        for batch in loader:
            move_data_to_device(batch, pl_module.device)
        return self._now(pl_module) - start

    # -- report
    def summary(self) -> dict[str, Any]:
        """The measured timings as a JSON-ready dict."""
        def warmup(values: list[float]) -> float | None:
            return values[0] - statistics.median(values[1:]) if len(values) > 1 else None

        train_total = sum(self.train_epoch_s)
        eval_total = sum(self.eval_s) + sum(self.test_epoch_s)
        epochs = len(self.train_epoch_s)
        out: dict[str, Any] = {
            "fit_s": self.fit_s,
            "epochs": epochs,
            "steps": self.steps,
            "train_s": train_total,
            "train_epoch_median_s": statistics.median(self.train_epoch_s) if epochs else None,
            "data_s": self.data_s,
            "data_alone_s_per_epoch": self.data_alone_s,
            "eval_s": eval_total,
            "final_eval_s": self.final_eval_s,
            "train_warmup_s": warmup(self.train_epoch_s),
            "eval_warmup_s": warmup(self.test_epoch_s or self.eval_s),
            "sync_steps": self.sync_steps,
        }
        if self.data_alone_s is not None:
            out["forward_backward_s_estimate"] = train_total - epochs * self.data_alone_s
        if self._test_top1:
            values = torch.stack(self._test_top1).tolist()  # one synchronisation, at the end
            out["test_each_epoch"] = values
            out["test_top1_last_epoch"] = values[-1]
        return out

    def on_run_end(self, output_dir: Path, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        """Called by ``ltlib.training.train`` after the final evaluation: write ``timings.json``, return the entry."""
        summary = self.summary()
        if self.path:
            Path(output_dir, self.path).write_text(json.dumps(summary, indent=2) + "\n")
        return {"timings": summary}


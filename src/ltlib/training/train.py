"""One configured training + evaluation (``train``) and the process plumbing around it.

:func:`train` builds the data, backbone and method from the resolved config (:func:`ltlib.runs.build_method`),
trains with checkpoint selection on the balanced validation split, evaluates the selected checkpoint
once on the validation and test splits, and writes ``results.json``, ``per_class.csv`` and
``per_class_accuracy.png`` to the run directory. ``python -m ltlib.run`` calls it inside its Hydra job
(and records ``run_status.json`` around it); the studies' in-process runner calls it directly.

Fault tolerance (docs/scaling.md): the run resumes from ``ckpt_path`` or, with ``resume=auto``, from the
run directory's newest checkpoint written under the same training configuration
(:func:`ltlib.runs.resolve_checkpoint`); every epoch's host random streams are seeded from
``(seed, epoch, rank)`` (:class:`ltlib.training.callbacks.EpochSeeding`); SIGTERM stops after the current
step (:class:`RunInterrupted`); a non-finite loss stops the run with one line naming the step and the
last good checkpoint.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ltlib.errors import LtlibError
from ltlib.runs import RunDir, build_method, resolve_checkpoint

log = logging.getLogger("ltlib")


def quiet_third_party_noise() -> None:
    """Silence messages that say nothing about the run: Lightning's tips and hardware banner (they
    would be printed twice, through Hydra's log handler too) and deprecation notes from its internals."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # resume=auto checks the resumed run's configuration itself, and carry_over_metrics_log keeps the
    # resumed run's earlier log rows: Lightning's notes about existing files are beside the point.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")


class RunInterrupted(Exception):
    """Training stopped on SIGTERM; the message says how to resume."""


def exit_when_orphaned(poll_seconds: float = 2.0) -> None:
    """Exit this process once the process that launched it is gone.

    For processes started by a launcher (Lightning's DDP launcher, torchrun, srun: ``LOCAL_RANK`` is
    set): when the launcher is killed (SIGKILL, a lost node), a DDP rank would otherwise wait in a
    collective operation until its timeout (30 minutes for gloo), holding its device in the way of
    the resumed run.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                print(f"ltlib: rank {os.environ.get('LOCAL_RANK')}: the launching process {parent} is gone; exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="ltlib-orphan-watchdog", daemon=True).start()


def global_rank() -> int:
    """This process's global rank (also in a DDP child before the trainer starts; 0 without DDP)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


def is_global_zero() -> bool:
    return global_rank() == 0


def _relaunches_script(trainer: Any) -> bool:
    """Whether this is a Hydra multirun job whose trainer would start its DDP processes by re-running the
    command line (Lightning's subprocess launcher), which would restart the whole sweep in each process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)


def carry_over_metrics_log(logger: Any, resume_step: int) -> int:
    """Keep a resumed run's earlier rows of ``logs/metrics.csv``.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts; the rows logged before the
    checkpoint's step are read first and logged again into the new file. Rows from the lost part of
    the interrupted epoch (step >= the checkpoint's) are dropped: the resumed run logs them anew.
    Returns the number of rows kept.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger):
        return 0
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return 0

    def number(text: Any) -> float | int | None:
        """The cell's value; None for an empty cell or one cut short by the kill."""
        try:
            return int(text) if str(text).lstrip("-").isdigit() else float(text)
        except (TypeError, ValueError):
            return None

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = 0
    writer = logger.experiment  # creating it removes the old file
    for row in rows:
        step = number(row.pop("step", None))
        if step is None or step >= resume_step:
            continue
        values = {k: v for k, v in ((k, number(v)) for k, v in row.items() if k) if v is not None}
        writer.log_metrics(values, int(step))
        kept += 1
    writer.save()
    return kept


def batch_sizes(per_process: int, world_size: int, streams: int = 1) -> dict[str, int]:
    """The batch sizes of a run for results.json: ``data.batch_size`` is per process (and per sampler stream:
    BBN's two branches each get that many images), so the optimiser step sees ``global`` per stream."""
    return {"per_process": int(per_process), "processes": int(world_size), "global": int(per_process * world_size),
            "streams": int(streams)}


def train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run one configured training + evaluation; returns the results payload."""
    import lightning as L
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ltlib.analysis import print_results_table, write_results
    from ltlib.training.callbacks import (
        AtomicCheckpointIO,
        ConfigInCheckpoint,
        EpochSeeding,
        FlushLogsEachEpoch,
        NonFiniteLossGuard,
        newest_checkpoint,
        remove_partial_checkpoints,
    )

    quiet_third_party_noise()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    eval_ckpt = cfg.eval_checkpoint
    if eval_ckpt not in ("best", "last"):
        raise LtlibError(f"eval_checkpoint={eval_ckpt!r} is not allowed; use 'best' or 'last'")
    ckpt_path, resumed = resolve_checkpoint(cfg, output_dir)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    info = datamodule.split_info
    log.info("data %s: train %d images in %d classes (largest %d, smallest %d), val %d, test %d",
             choices.get("data", datamodule.name), info["train"]["size"], datamodule.num_classes,
             max(datamodule.class_counts), min(datamodule.class_counts), info["val"]["size"], info["test"]["size"])
    method = build_method(cfg.method, cfg.optim, datamodule, cfg.backbone, many_threshold=cfg.many_threshold,
                          few_threshold=cfg.few_threshold)

    checkpoint_dir = output_dir / "checkpoints"
    has_validation = datamodule.split_info["val"]["size"] > 0
    # Without a validation split there is nothing to select on: the last epoch is evaluated.
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=cfg.monitor, mode=cfg.monitor_mode,
                           save_top_k=1, auto_insert_metric_name=False,
                           enable_version_counter=False) if has_validation else None
    # Lightning's save_last writes last.ckpt only in epochs where the best one improved: a separate,
    # unmonitored callback overwrites last.ckpt after every epoch instead.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("enable_progress_bar") is None:
        trainer_cfg["enable_progress_bar"] = sys.stdout.isatty()
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    extra_callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    resolved_config = OmegaConf.to_container(cfg, resolve=True)
    fault_callbacks = [EpochSeeding(cfg.seed), NonFiniteLossGuard(int(trainer_cfg.get("log_every_n_steps") or 50)),
                       FlushLogsEachEpoch(), ConfigInCheckpoint(resolved_config)]
    checkpoint_callbacks = [c for c in (best, last) if c is not None]
    plugins = [instantiate(p) if isinstance(p, dict) else p for p in trainer_cfg.pop("plugins", None) or []]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer: L.Trainer = instantiate(
        trainer_cfg, callbacks=[*checkpoint_callbacks, *([LearningRateMonitor("epoch")] if logger else []),
                               *fault_callbacks, *extra_callbacks],
        logger=logger, default_root_dir=str(output_dir), plugins=plugins)

    if _relaunches_script(trainer):
        raise LtlibError(f"a -m sweep cannot run trainer.devices={cfg.trainer.get('devices')} processes through "
                         "Lightning's launcher (it restarts the command, sweep included); use "
                         "hydra/launcher=submitit_slurm, torchrun --nproc_per_node=N -m ltlib.run -m ... run_name=<name>, "
                         "or one command per sweep cell")
    if is_global_zero():
        remove_partial_checkpoints(checkpoint_dir)
        # An unfinished run never has a results.json (the report would take it as complete).
        (output_dir / "results.json").unlink(missing_ok=True)
        if ckpt_path is not None:
            kept = carry_over_metrics_log(logger, resumed["global_step"])
            log.info("resuming from %s (epoch %d, step %d; %d earlier log rows kept)", ckpt_path,
                     resumed["epoch"], resumed["global_step"], kept)
    log.info("method %s, backbone %s, %s epochs, global batch %d (%d per process x %d processes); run directory %s",
             choices.get("method", type(method).__name__), choices.get("backbone", "custom"), cfg.trainer.max_epochs,
             datamodule.batch_size * trainer.world_size, datamodule.batch_size, trainer.world_size, output_dir)
    try:
        trainer.fit(method, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        selected_best = eval_ckpt == "best" and best is not None and bool(best.best_model_path)
        selected = best.best_model_path if selected_best else last.best_model_path
        # The selected checkpoint is evaluated once on validation and once on test.
        trainer.validate(method, datamodule=datamodule, ckpt_path=selected or None, verbose=False)
        trainer.test(method, datamodule=datamodule, ckpt_path=selected or None, verbose=False)
    except SIGTERMException as exc:
        saved = newest_checkpoint(trainer) or RunDir(output_dir).checkpoint("resume", required=False)
        where = f"the newest checkpoint is {saved}" if saved else "no checkpoint was written yet"
        raise RunInterrupted(f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                             f"{where}; rerun the same command with hydra.run.dir={output_dir} (resume=auto) "
                             "to continue") from exc

    payload: dict[str, Any] = {}
    if trainer.is_global_zero:
        # Method and callbacks write their analysis files and add entries to results.json.
        analysis = method.on_run_end(output_dir)
        for callback in extra_callbacks:
            if hasattr(callback, "on_run_end"):
                analysis.update(callback.on_run_end(output_dir, trainer, method) or {})
        payload = write_results(
            output_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            class_names=datamodule.class_names,
            class_counts=datamodule.class_counts,
            metrics=method.last_metrics,
            split_info=datamodule.split_info,
            method=str(choices.get("method", type(method).__name__)),
            extra={
                "data": str(choices.get("data", "custom")),
                "backbone": str(choices.get("backbone", "custom")),
                "checkpoint": os.path.relpath(selected, output_dir) if selected else None,
                "selected_on": f"{cfg.monitor} ({cfg.monitor_mode}) on the validation split" if selected_best
                else "last epoch" if has_validation else "last epoch (no validation split)",
                "epochs_trained": trainer.current_epoch,
                "batch_size": batch_sizes(datamodule.batch_size, trainer.world_size, len(method.train_streams)),
                "device": str(torch.device(trainer.strategy.root_device)),
                **analysis,
            },
            many_threshold=cfg.many_threshold,
            few_threshold=cfg.few_threshold,
            metric_variants={method.variant_group: method.last_variant_metrics}
            if getattr(method, "variant_group", None) and method.last_variant_metrics else None,
        )
        print_results_table(payload)
        log.info("results written to %s", output_dir / "results.json")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
    return payload

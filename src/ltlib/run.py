"""Train and evaluate one long-tail run: ``python -m ltlib.run [overrides]``.

Builds the data, backbone and method from the Hydra config, trains with checkpoint selection on the
balanced validation split, evaluates the selected checkpoint once on the validation and test splits,
and writes ``results.json``, ``per_class.csv`` and ``per_class_accuracy.png`` to the run directory.

Examples::

    python -m ltlib.run                                   # CE on the embedded digits_lt, CPU
    python -m ltlib.run method=rw data=cifar10_lt data.imbalance_ratio=50
    python -m ltlib.run -m method=ce,rw,rs data.imbalance_ratio=10,50,100
    python -m ltlib.run ckpt_path=outputs/.../checkpoints/last.ckpt   # resume
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ltlib.errors import LtlibError

log = logging.getLogger("ltlib")


def config_dir() -> str:
    """The Hydra config directory: shipped inside the package, else the checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return str(checkout)
    raise LtlibError(f"ltlib's configs were not found in {packaged} nor {checkout}; reinstall ltlib")


def find_user_error(exc: BaseException) -> LtlibError | None:
    """The LtlibError behind ``exc`` (Hydra's instantiate and DataLoader workers wrap it), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LtlibError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def quiet_third_party_noise() -> None:
    """Silence messages that say nothing about the run: Lightning's tips and hardware banner (they
    would be printed twice, through Hydra's log handler too) and deprecation notes from its internals."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run one configured training + evaluation; returns the results payload."""
    import lightning as L
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from ltlib.analysis import print_results_table, write_results

    quiet_third_party_noise()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    info = datamodule.split_info
    log.info("data %s: train %d images in %d classes (largest %d, smallest %d), val %d, test %d",
             choices.get("data", datamodule.name), info["train"]["size"], datamodule.num_classes,
             max(datamodule.class_counts), min(datamodule.class_counts), info["val"]["size"], info["test"]["size"])
    backbone = instantiate(cfg.backbone, in_chans=datamodule.in_chans)
    method = instantiate(cfg.method)(
        backbone=backbone,
        num_classes=datamodule.num_classes,
        class_counts=datamodule.class_counts,
        class_names=datamodule.class_names,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        many_threshold=cfg.many_threshold,
        few_threshold=cfg.few_threshold,
    )

    checkpoint_dir = output_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=cfg.monitor, mode=cfg.monitor_mode,
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    # Lightning's save_last writes last.ckpt only in epochs where the best one improved: a separate,
    # unmonitored callback overwrites last.ckpt after every epoch instead.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("enable_progress_bar") is None:
        trainer_cfg["enable_progress_bar"] = sys.stdout.isatty()
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    extra_callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=[best, last, *([LearningRateMonitor("epoch")] if logger else []),
                                                               *extra_callbacks],
                                     logger=logger, default_root_dir=str(output_dir))

    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(checkpoint_dir / "last.ckpt")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise LtlibError(f"ckpt_path={cfg.ckpt_path!r}: no checkpoint file at {ckpt_path}")
    log.info("method %s, backbone %s, %s epochs; run directory %s", choices.get("method", type(method).__name__),
             choices.get("backbone", "custom"), cfg.trainer.max_epochs, output_dir)
    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)

    eval_ckpt = cfg.eval_checkpoint
    if eval_ckpt not in ("best", "last"):
        raise LtlibError(f"eval_checkpoint={eval_ckpt!r} is not allowed; use 'best' or 'last'")
    selected = best.best_model_path if eval_ckpt == "best" and best.best_model_path else last.best_model_path
    # The selected checkpoint is evaluated once on validation and once on test.
    trainer.validate(method, datamodule=datamodule, ckpt_path=selected or None, verbose=False)
    trainer.test(method, datamodule=datamodule, ckpt_path=selected or None, verbose=False)

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
                "selected_on": f"{cfg.monitor} ({cfg.monitor_mode}) on the validation split" if eval_ckpt == "best"
                else "last epoch",
                "epochs_trained": trainer.current_epoch,
                "device": str(torch.device(trainer.strategy.root_device)),
                **analysis,
            },
            many_threshold=cfg.many_threshold,
            few_threshold=cfg.few_threshold,
        )
        print_results_table(payload)
        log.info("results written to %s", output_dir / "results.json")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
    return payload


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train(cfg, output_dir)
    except Exception as exc:  # noqa: BLE001 - user errors become one line, the rest propagate
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        # An error raised in a DataLoader worker arrives with the worker's traceback in its message.
        message = str(user_error).strip().splitlines()[-1].removeprefix("ltlib.errors.LtlibError: ")
        print(f"ltlib: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

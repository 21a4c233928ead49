"""Surviving faults: kill-and-resume equivalence, SIGTERM, SLURM requeue, non-finite losses, atomic files,
and resume=auto's choice of checkpoint."""

from __future__ import annotations

import os
import random
import re
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from tests.conftest import run_cli
from tests.scaling_runs import (
    BBN_ARGS,
    bbn_reference_run,
    logged_epochs,
    metric_rows,
    mtime_ns,
    results,
    start_cli,
    wait_for,
)
from torch.utils.data import DataLoader, TensorDataset

from ltlib.config import compose
from ltlib.errors import LtlibError
from ltlib.runs import config_differences, resolve_checkpoint
from ltlib.training.callbacks import (
    AtomicCheckpointIO,
    ConfigInCheckpoint,
    EpochSeeding,
    NonFiniteLossGuard,
    remove_partial_checkpoints,
)
from ltlib.training.train import carry_over_metrics_log

#: these tests set Hydra's global HydraConfig, as a running job has it
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_hydra_config")]


# ------------------------------------------------------------------------------------------------------
# End to end


def test_killed_and_terminated_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL in the second epoch (once the first is logged), resume (resume=auto: same run directory),
    SIGTERM in the third epoch, resume again: results.json metrics, per-class accuracies, confusion matrix and
    every logged row equal the uninterrupted run's. BBN exercises two sampler streams, the epoch-driven
    alpha and the learning-rate schedule; augmentation draws must repeat across the resumes."""
    reference = bbn_reference_run()
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = (f"hydra.run.dir={run_dir}", *BBN_ARGS)

    killed = start_cli(*args)
    wait_for(lambda: 0 in logged_epochs(run_dir), killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    from ltlib.runs import describe_unfinished

    status, reason = describe_unfinished(run_dir)  # killed without a word: its status still says running
    assert status == "failed" and reason.startswith("stopped without finishing"), reason

    terminated = start_cli(*args)
    wait_for(lambda: 1 in logged_epochs(run_dir), terminated)
    terminated.send_signal(signal.SIGTERM)
    _, stderr = terminated.communicate()
    assert terminated.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    notes = [line for line in stderr.splitlines() if line.startswith("ltlib: interrupted:")]
    assert len(notes) == 1 and "SIGTERM" in notes[0] and str(last) in notes[0], stderr[-3000:]
    assert not (run_dir / "results.json").exists()
    assert describe_unfinished(run_dir)[0] == "interrupted"

    final = run_cli(*args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming from {last}" in final.stdout + final.stderr
    resumed, uninterrupted = results(run_dir), results(reference)
    for key in ("metrics", "per_class", "confusion", "epochs_trained", "checkpoint"):
        assert resumed[key] == uninterrupted[key], key
    assert metric_rows(run_dir) == metric_rows(reference)


def test_non_finite_loss_stops_the_run_with_one_line(tiny_run_args):
    proc = run_cli(*tiny_run_args, "optim.lr=1e30", "optim.warmup_epochs=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.search(r"non-finite \(NaN or inf\) at step \d+ \(epoch 0, batch \d+ of 7\)", lines[0]), lines[0]
    assert "no checkpoint was written before it" in lines[0]


def test_slurm_requeue_signal_saves_requeues_and_resumes(tmp_path):
    """Under a (simulated) SLURM allocation, SIGUSR1 makes Lightning save hpc_ckpt_1.ckpt and call
    `scontrol requeue <job>`; the requeued job, started again with the same command, resumes from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
           "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "ltlib-test", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost"}
    run_dir = tmp_path / "run"
    args = (f"hydra.run.dir={run_dir}", "backbone=resnet20", "trainer.max_epochs=2", "optim.warmup_epochs=1",
            "data.batch_size=32")
    job = start_cli(*args, env=env)
    wait_for((run_dir / "checkpoints" / "last.ckpt").exists, job)
    job.send_signal(signal.SIGUSR1)
    wait_for(lambda: (tmp_path / "scontrol.log").exists(), job)
    job.kill()  # SLURM ends the job once it is requeued
    job.communicate()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()

    requeued = run_cli(*args, env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'}" in requeued.stdout + requeued.stderr
    assert results(run_dir)["epochs_trained"] == 2


# ------------------------------------------------------------------------------------------------------
# The non-finite loss guard, in process


class _NaNAtStep(L.LightningModule):
    """A linear model whose loss becomes NaN at optimiser step ``bad_step``."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x).squeeze(1), y)
        return loss * float("nan") if self.global_step == self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_guard_names_the_exact_step_and_the_last_good_checkpoint(tmp_path):
    data = TensorDataset(torch.randn(20, 4), torch.randn(20))
    loader = DataLoader(data, batch_size=4)  # 5 steps per epoch
    last = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    # The host reads the device-side record only at the end of an epoch here (check interval 1000).
    trainer = L.Trainer(max_epochs=4, callbacks=[NonFiniteLossGuard(check_every_n_steps=1000), last],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(LtlibError) as caught:
        trainer.fit(_NaNAtStep(bad_step=7), loader)
    message = str(caught.value)
    assert "at step 7 (epoch 1, batch 2 of 5)" in message
    assert f"the last good checkpoint is {tmp_path / 'last.ckpt'}" in message
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


# ------------------------------------------------------------------------------------------------------
# Reproducible epochs, atomic checkpoints, the metrics log


def test_epoch_seeding_makes_each_epoch_a_function_of_seed_epoch_and_rank():
    seeding = EpochSeeding(seed=3)

    def draws(epoch: int, rank: int) -> tuple:
        seeding.on_train_epoch_start(SimpleNamespace(current_epoch=epoch, global_rank=rank), None)
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    assert draws(2, 0) == draws(2, 0)
    assert draws(2, 0) != draws(3, 0) and draws(2, 0) != draws(2, 1)

    class Data:
        def train_dataloader(self):
            return DataLoader(list(range(8)), batch_size=2)

    datamodule = Data()
    trainer = SimpleNamespace(datamodule=datamodule, current_epoch=5, global_rank=1)
    seeding.setup(trainer, None, "fit")
    loader = datamodule.train_dataloader()  # as Lightning builds it after restoring a checkpoint
    first_epoch_base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator))
    seeding.on_train_epoch_start(trainer, None)  # an uninterrupted run's epoch 5 starts here
    assert int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator)) == first_epoch_base_seed
    seeding.teardown(trainer, None, "fit")
    assert "train_dataloader" not in vars(datamodule)


def test_atomic_checkpoint_keeps_the_previous_file_when_saving_fails(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, target)
    assert torch.load(target, weights_only=False) == {"epoch": 1}

    def killed_while_writing(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"epoch": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    leftover = target.parent / ".last.ckpt.abc123.tmp"  # what a SIGKILL during the write leaves
    leftover.write_bytes(b"partial")
    assert remove_partial_checkpoints(target.parent) == [leftover] and not leftover.exists()


@pytest.mark.filterwarnings("ignore:.*Experiment logs directory")
def test_resumed_csv_log_keeps_the_rows_before_the_checkpoint(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,loss,step\n0,2.5,9\n0,,10\n1,1.5,19\n1,,20\n")
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version="")
    assert carry_over_metrics_log(logger, resume_step=20) == 3  # step 20 on: the lost part of the epoch
    assert (log_dir / "metrics.csv").read_text().splitlines() == ["epoch,loss,step", "0,2.5,9", "0,,10", "1,1.5,19"]


# ------------------------------------------------------------------------------------------------------
# resume=auto's choice


def _config(*overrides: str):
    """The run's config as the task function sees it (Hydra's runtime set, no hydra node)."""
    from omegaconf import open_dict

    config = compose(overrides, hydra_node=True)
    HydraConfig.instance().set_config(config)
    with open_dict(config):
        del config["hydra"]
    return config


def _save(path: Path, config) -> None:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 26, "epoch": 0, ConfigInCheckpoint.key: OmegaConf.to_container(config, resolve=True)},
               path)


def test_resume_auto_picks_the_newest_checkpoint_of_the_same_configuration(tmp_path):
    config = _config("method=bbn", "run_name=a")
    assert resolve_checkpoint(config, tmp_path) == (None, {})  # nothing to resume: start afresh
    last = tmp_path / "checkpoints" / "last.ckpt"
    _save(last, config)
    assert resolve_checkpoint(config, tmp_path) == (last, {"global_step": 26, "epoch": 0})
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written later, on a SLURM requeue signal
    _save(hpc, config)
    os.utime(last, ns=(mtime_ns(hpc) - 10**9,) * 2)
    assert resolve_checkpoint(config, tmp_path)[0] == hpc
    # Locations, loader and logging settings may change between the two.
    moved = _config("method=bbn", "run_name=b", "data.num_workers=3", "logger=none", "trainer.enable_progress_bar=false")
    assert resolve_checkpoint(moved, tmp_path)[0] == hpc
    assert resolve_checkpoint(_config("method=bbn", "resume=never"), tmp_path) == (None, {})


def test_resume_auto_refuses_a_checkpoint_of_another_configuration(tmp_path):
    _save(tmp_path / "checkpoints" / "last.ckpt", _config("method=bbn"))
    other = _config("method=bbn", "optim.lr=0.2", "trainer.max_epochs=7")
    with pytest.raises(LtlibError, match=r"another configuration \(optim.lr \(0.05 -> 0.2\); trainer.max_epochs "
                                         r"\(30 -> 7\)\); use another run_name"):
        resolve_checkpoint(other, tmp_path)
    explicit = _config("method=bbn", "optim.lr=0.2", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert resolve_checkpoint(explicit, tmp_path)[0] == tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(LtlibError, match="resume='sometimes' is not allowed"):
        resolve_checkpoint(_config("resume=sometimes"), tmp_path)
    with pytest.raises(LtlibError, match="ckpt_path='last': no checkpoint file at"):
        resolve_checkpoint(_config("ckpt_path=last"), tmp_path / "elsewhere")


def test_config_differences_ignore_locations_and_hardware_speed_settings():
    saved = {"optim": {"lr": 0.1}, "data": {"root": "/a", "num_workers": 2, "source": {"root": "/a"}},
             "trainer": {"precision": "32-true", "devices": 2}, "run_name": "x"}
    current = {"optim": {"lr": 0.1}, "data": {"root": "/b", "num_workers": 8, "source": {"root": "/b"}},
               "trainer": {"precision": "bf16-mixed", "devices": 4}, "run_name": "y"}
    assert config_differences(saved, current) == ["trainer.devices (2 -> 4)"]
    # an option that one ltlib version has and the other has not is not a change of experiment
    assert config_differences({"method": {"alpha": 0.5}}, {"method": {"alpha": 0.5, "new_option": 1}}) == []

"""Shared test helpers: paths, the ltlib CLI in a subprocess, free ports, DDP result gathering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_SHARED = SHARED / "data" / "cifar10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather_on_rank0(result: object, out: str) -> None:
    """Inside a spawned DDP worker: collect every rank's ``result`` and pickle the list to ``out`` on rank 0."""
    import pickle

    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        Path(out).write_bytes(pickle.dumps(gathered))


def cli_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: no wandb, a headless matplotlib, unbuffered output, one thread."""
    # One thread per process: the tiny test models gain nothing from more, and DDP tests run two processes
    # on CI's two cores, where oversubscribed threads make steps many times slower.
    return {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", **(extra or {})}


def run_cli(*overrides: str, module: str = "ltlib.run", cwd: Path | None = None,
            timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ltlib.run OVERRIDES`` and return the finished process (output captured)."""
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd or REPO, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(*overrides: str) -> subprocess.CompletedProcess:
    """``python -m ltlib.run OVERRIDES`` in this process (the same Hydra entry point, its exit status and its
    stderr), without the 10 s start of a new interpreter: for the one-line-error checks. Hydra's global state
    is put back afterwards."""
    import contextlib
    import io

    from ltlib import run
    from ltlib.config import restored_hydra_state

    stderr, stdout = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["ltlib.run", *overrides]
    try:
        with restored_hydra_state(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                run.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001 - the process would have died with a traceback
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["ltlib.run", *overrides], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def tiny_run_args(tmp_path: Path) -> list[str]:
    """Overrides that make a CLI run take a few seconds: 2 epochs of the digits data."""
    return [f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=2", "optim.warmup_epochs=1",
            "backbone=resnet20"]


@pytest.fixture
def restore_hydra_config():
    """Put Hydra's global HydraConfig back after a test that sets it (as a running job has it)."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests: the models are tiny, and on a shared 2-core machine two
    threads per process spin-wait and run them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_datamodule(stage: str | None = "fit", **overrides):
    """The data module of ``conf/data/digits_lt.yaml`` (ratio 10: 100 -> 10 images per class, 20 per class for
    validation, 50 for test, batch 64), set up for ``stage`` (None: not set up). ``overrides`` replace arguments."""
    from functools import partial

    from ltlib.data import LongTailDataModule, digits_pools

    arguments = {"name": "digits_lt", "imbalance_ratio": 10, "max_count": 100, "val_per_class": 20,
                 "augmentation": "digits", "mean": [0.5], "std": [0.5], "batch_size": 64, **overrides}
    datamodule = LongTailDataModule(partial(digits_pools, test_per_class=50, seed=0), **arguments)
    if stage is not None:
        datamodule.setup(stage)
    return datamodule

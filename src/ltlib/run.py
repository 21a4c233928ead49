"""Train and evaluate one long-tail run: ``python -m ltlib.run [overrides]``.

Builds the data, backbone and method from the Hydra config, trains with checkpoint selection on the
balanced validation split, evaluates the selected checkpoint once on the validation and test splits,
and writes ``results.json``, ``per_class.csv`` and ``per_class_accuracy.png`` to the run directory
(:func:`ltlib.training.train.train`), and ``run_status.json``: running, finished, failed with its error,
or interrupted (:mod:`ltlib.runs`).

Examples::

    python -m ltlib.run                                   # CE on the embedded digits_lt, CPU
    python -m ltlib.run method=rw data=cifar10_lt data.imbalance_ratio=50
    python -m ltlib.run -m method=ce,rw,rs data.imbalance_ratio=10,50,100
    python -m ltlib.run ckpt_path=outputs/.../checkpoints/last.ckpt   # resume from a checkpoint
    python -m ltlib.run run_name=bbn_c100 method=bbn    # outputs/<data>/bbn/bbn_c100: rerun to resume

Fault tolerance (docs/scaling.md): with ``resume=auto`` (default) a run whose directory already holds a
checkpoint resumes from the newest one (``checkpoints/last.ckpt``, written after every epoch, or
Lightning's ``hpc_ckpt_N.ckpt`` after a SLURM requeue), provided it was written under the same training
configuration. Every epoch's host random streams are seeded from ``(seed, epoch, rank)``
(:class:`ltlib.training.callbacks.EpochSeeding`), so a run resumed from ``last.ckpt`` (``num_workers=0``) ends
exactly where the uninterrupted run does. SIGTERM stops after the current step (exit status 143); a non-finite loss stops
the run with one line naming the step and the last good checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ltlib.config import config_dir
from ltlib.errors import find_user_error


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ltlib.runs import write_run_status
    from ltlib.training.train import RunInterrupted, exit_when_orphaned, global_rank, is_global_zero, train

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if "LOCAL_RANK" in os.environ:
        exit_when_orphaned()

    def record(status: str, message: str | None = None) -> None:
        if is_global_zero():
            write_run_status(output_dir, status, message)

    record("running")
    try:
        train(cfg, output_dir)
    except RunInterrupted as exc:
        record("interrupted", str(exc))
        if is_global_zero():
            print(f"ltlib: interrupted: {exc}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        record("interrupted", "KeyboardInterrupt")
        raise
    except Exception as exc:  # noqa: BLE001 - user errors become one line, the rest propagate
        user_error = find_user_error(exc)
        if user_error is None:
            last_line = (str(exc).strip().splitlines() or [""])[-1]
            record("failed", f"{type(exc).__name__}: {last_line}".rstrip(": "))
            raise
        # An error raised in a DataLoader worker arrives with the worker's traceback in its message.
        message = str(user_error).strip().splitlines()[-1].removeprefix("ltlib.errors.LtlibError: ")
        record("failed", message)
        # Every DDP rank reports (an error may concern one rank's data only), the others with their rank.
        rank = "" if is_global_zero() else f"rank {global_rank()}: "
        print(f"ltlib: error: {rank}{message}", file=sys.stderr)
        sys.exit(2)
    record("finished")


if __name__ == "__main__":
    main()

"""What a run directory's run is doing: ``run_status.json``, written by ``ltlib.run`` and read by reports.

A run directory without ``results.json`` is a run that failed, was interrupted, was killed, or is still
training; only the process itself knows which. ``ltlib.run`` (global rank 0) records it:

* ``running`` when training starts (with the host and process id),
* ``finished`` once ``results.json`` is written,
* ``failed`` with the one-line error when an exception ends the run,
* ``interrupted`` on SIGTERM or Ctrl-C (rerunning the command resumes from the last checkpoint).

A run killed with SIGKILL (or by the out-of-memory killer, or with its node) stays ``running``;
:func:`describe_unfinished` tells it from a live run when it ran on this host.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

RUN_STATUS_JSON = "run_status.json"
STATUSES = ("running", "finished", "failed", "interrupted")


def write_run_status(run_dir: str | os.PathLike[str], status: str, message: str | None = None) -> None:
    """Record ``status`` (one of :data:`STATUSES`) for the run in ``run_dir``, atomically."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; allowed: {', '.join(STATUSES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"status": status, "message": message, "host": socket.gethostname(), "pid": os.getpid(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = run_dir / f".{RUN_STATUS_JSON}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, run_dir / RUN_STATUS_JSON)


def read_run_status(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded status of the run in ``run_dir``, or None when there is none (or it is unreadable)."""
    try:
        payload = json.loads((Path(run_dir) / RUN_STATUS_JSON).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("status") in STATUSES else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe_unfinished(run_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """``(status, reason)`` for a run directory that has no ``results.json``: ``failed`` (with the
    error), ``interrupted``, ``running``, or ``failed`` for a run that stopped without a word."""
    status = read_run_status(run_dir)
    resume = "rerun the same command to resume from its last checkpoint"
    if status is None:
        return "failed", "no results.json (the run failed or has not finished)"
    since = f"since {status.get('time')}"
    if status["status"] == "failed":
        return "failed", f"failed: {status.get('message') or 'unknown error'}"
    if status["status"] == "interrupted":
        return "interrupted", f"interrupted at {status.get('time')} ({status.get('message')}); {resume}"
    if status["status"] == "finished":
        return "failed", "finished, but its results.json is missing"
    pid, host = status.get("pid"), status.get("host")
    if host != socket.gethostname():
        return "running", f"running on {host} {since}, or killed there (no word from it since)"
    if isinstance(pid, int) and _process_alive(pid):
        return "running", f"running (process {pid}) {since}"
    return "failed", f"stopped without finishing (killed or crashed; started {status.get('time')}); {resume}"

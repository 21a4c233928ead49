"""What a run is: the directory ``python -m ltlib.run`` writes, and rebuilding its model.

A run directory holds ``results.json`` (once the run finished; its ``config`` is the resolved config),
``checkpoints/best.ckpt`` and ``checkpoints/last.ckpt`` (each with the resolved config under
``ltlib_config``: :class:`ltlib.training.callbacks.ConfigInCheckpoint`), ``hpc_ckpt_N.ckpt`` after a
SLURM requeue, ``.hydra/`` (the config as composed, the group choices, the overrides) and
``run_status.json``. :class:`RunDir` reads all of them. Around it:

* :func:`build_method` builds a method from its config pieces for a data module (or a :class:`Task`), the
  one way every caller does it (training, ensemble members, diagnostics, studies);
  :func:`load_weights` loads a checkpoint's weights into it; :func:`read_checkpoint` is the one reader
  of checkpoint files (one-line :class:`~ltlib.errors.LtlibError` for an unreadable one).
* :data:`NON_EXPERIMENT_KEYS`: the config keys that say where and how a run ran, not what it trained,
  shared by ``resume=auto``'s comparison (:func:`config_differences`, :func:`resolve_checkpoint`) and the
  report's grouping of runs into cells (:func:`is_non_experiment_key`).
* The run's status (``run_status.json``: running, finished, failed with its error, interrupted), written
  by ``ltlib.run`` on global rank 0 and read by reports:

  - ``running`` when training starts (with the host and process id),
  - ``finished`` once ``results.json`` is written,
  - ``failed`` with the one-line error when an exception ends the run,
  - ``interrupted`` on SIGTERM or Ctrl-C (rerunning the command resumes from the last checkpoint).

  A run killed with SIGKILL (or by the out-of-memory killer, or with its node) stays ``running``;
  :func:`describe_unfinished` tells it from a live run when it ran on this host.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltlib.errors import LtlibError, unknown_name
from ltlib.io import atomic_write_text

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

RESULTS_JSON = "results.json"
RUN_STATUS_JSON = "run_status.json"
STATUSES = ("running", "finished", "failed", "interrupted")
#: ``RunDir.checkpoint``'s choices: ``selected`` is the one results.json names (the evaluated one),
#: ``resume`` the newest of ``checkpoints/last.ckpt`` and ``hpc_ckpt_*.ckpt``.
CHECKPOINTS = ("best", "last", "selected", "resume")
#: ``RunDir.config``'s sources; ``auto`` tries them in this order.
CONFIG_SOURCES = ("auto", "results", "checkpoint", "hydra")
RESUME_MODES = ("auto", "never")

# ------------------------------------------------------------------------------ what is the experiment
#: Config keys (with everything under them) that say where and how a run ran, not what it trained: its
#: name and resume settings, logging, where the data and outputs live, hardware placement and speed
#: settings. resume=auto lets them differ between a checkpoint and the run resuming it; the report puts
#: runs that differ only in them (and in seeds) into one cell.
NON_EXPERIMENT_KEYS = (
    "ckpt_path", "resume", "run_name", "logger", "callbacks", "hydra",
    "trainer._target_", "trainer.accelerator", "trainer.strategy", "trainer.precision", "trainer.speed",
    "trainer.benchmark", "trainer.deterministic", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.plugins", "trainer.default_root_dir",
    "data.num_workers", "data.pin_memory", "data.loader", "data.eval_batch_size",
)
#: Last components of keys that name a location (data roots, download switches): also not the experiment.
NON_EXPERIMENT_LEAVES = ("root", "download")
#: May differ on resume, but tells report cells apart: training is the same whichever checkpoint is
#: evaluated at the end, the numbers in results.json are not (best on validation vs. the last epoch).
RESUME_ONLY_KEYS = ("eval_checkpoint",)
#: Left out of report cells, but resume=auto refuses a change. Devices and nodes: ``data.batch_size`` is per
#: process, so another world size is another global batch and another split of each epoch over the
#: ranks, which a resumed run cannot continue; the report compares runs across hardware (results.json
#: records the global batch). ``method.cluster_checkpoint`` is a file path the report treats as a location
#: (copies of one checkpoint); resume=auto refuses another file as it refuses every other method option.
REPORT_ONLY_KEYS = ("trainer.devices", "trainer.num_nodes", "method.cluster_checkpoint")
#: What :func:`is_non_experiment_key` is asked for.
KEY_USES = ("resume", "report")


def is_non_experiment_key(key: str, use: str = "report") -> bool:
    """Whether a flattened config key (``a.b.c``) is not part of the experiment: one that ``resume=auto``
    lets differ (``use="resume"``) or that the report leaves out of its cells (``use="report"``)."""
    if use not in KEY_USES:
        raise unknown_name("key use", use, KEY_USES)
    keys = (*NON_EXPERIMENT_KEYS, *(RESUME_ONLY_KEYS if use == "resume" else REPORT_ONLY_KEYS))
    return key.rsplit(".", 1)[-1] in NON_EXPERIMENT_LEAVES or any(key == k or key.startswith(k + ".") for k in keys)


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}``; lists stay values, an empty section stays ``{}``."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Training-relevant keys whose values differ between two resolved configs, as ``key (a -> b)``.

    Keys present in only one of them (options added or removed by another ltlib version, each with
    its own default) do not count: the check is for a changed experiment, not a changed schema.
    """
    old, new = flatten_config(saved), flatten_config(current)
    keys = sorted(k for k in set(old) & set(new) if not is_non_experiment_key(k, "resume") and old[k] != new[k])
    return [f"{k} ({old[k]!r} -> {new[k]!r})" for k in keys]


# ------------------------------------------------------------------------------------------ run status
def write_run_status(run_dir: str | os.PathLike[str], status: str, message: str | None = None) -> None:
    """Record ``status`` (one of :data:`STATUSES`) for the run in ``run_dir``, atomically."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; allowed: {', '.join(STATUSES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"status": status, "message": message, "host": socket.gethostname(), "pid": os.getpid(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(run_dir / RUN_STATUS_JSON, json.dumps(payload, indent=2) + "\n")


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


# ------------------------------------------------------------------------------------------ checkpoints
def find_resume_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint a run directory holds: ``checkpoints/last.ckpt`` (end of an epoch) or
    Lightning's ``hpc_ckpt_N.ckpt`` (saved on a SLURM requeue signal, mid-epoch)."""
    output_dir = Path(output_dir)
    candidates = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def _subject(path: str | os.PathLike[str], key: str | None) -> str:
    return f"{key}={str(path)!r}" if key else str(path)


def read_checkpoint(path: str | os.PathLike[str], *, key: str | None = None, hint: str = "",
                    full: bool = False) -> dict[str, Any]:
    """The contents of a checkpoint file: a Lightning checkpoint, or a plain saved state dict.

    ``full`` reads everything a Lightning checkpoint holds (loop and optimiser states, hyper-parameters:
    trusted pickles, memory-mapped); otherwise only tensors and plain containers (``weights_only``).
    ``key`` names the option the path came from in the one-line :class:`LtlibError` raised for a missing
    or unreadable file; ``hint`` is appended to it.
    """
    import torch

    subject = _subject(path, key)
    file = Path(path).expanduser()
    if not file.is_file():
        raise LtlibError(f"{subject}: no checkpoint file there{hint}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=not full, mmap=full)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        reason = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
        raise LtlibError(f"cannot read {subject}: the file could not be read as a checkpoint ({reason}){hint}") from exc
    if not isinstance(checkpoint, Mapping):
        raise LtlibError(f"{subject} holds no state dict (a {type(checkpoint).__name__}){hint}")
    return dict(checkpoint)


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, Any], *, key: str | None = None) -> dict[str, Any]:
    """The model state dict of a checkpoint (a file or its loaded contents): a Lightning checkpoint's
    ``state_dict``, or a plain state dict as it is."""
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source, key=key)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise LtlibError(f"{_subject(source, key) if not isinstance(source, Mapping) else 'the checkpoint'} "
                         "holds no state dict")
    return dict(state)


def load_weights(module: nn.Module, checkpoint_path_or_state: str | os.PathLike[str] | Mapping[str, Any],
                 strict: bool = True, *, key: str | None = None, what: str | None = None) -> Any:
    """Load a checkpoint's model weights into ``module`` (a Lightning checkpoint, or a plain state dict;
    a file or its loaded contents); returns ``load_state_dict``'s missing / unexpected keys.

    Weights that do not fit raise a one-line :class:`LtlibError` naming ``what`` (default: the file).
    (Buffers whose size depends on the data, the two-head model's cluster assignment, resize themselves in
    a ``load_state_dict`` pre-hook.)
    """
    source = checkpoint_path_or_state
    state = read_state_dict(source, key=key)
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        label = what or (_subject(source, key) if not isinstance(source, Mapping) else "the checkpoint")
        raise LtlibError(f"{label} does not fit the model built from its run's config: {first}") from None


def resolve_checkpoint(cfg: DictConfig, output_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint ``fit`` resumes from (``ckpt_path``, else ``resume=auto``'s choice) and its
    contents' header (``global_step``, ``epoch``; empty when starting afresh)."""
    from omegaconf import OmegaConf

    from ltlib.training.callbacks import ConfigInCheckpoint

    explicit = cfg.get("ckpt_path")
    mode = cfg.get("resume", "auto")
    if mode not in RESUME_MODES:
        raise LtlibError(f"resume={mode!r} is not allowed; use 'auto' (resume from the run directory's newest "
                         "checkpoint when there is one) or 'never' (ckpt_path=<file> resumes from a given file)")
    if explicit is not None:
        path = output_dir / "checkpoints" / "last.ckpt" if explicit == "last" else Path(str(explicit))
        if not path.is_file():
            raise LtlibError(f"ckpt_path={explicit!r}: no checkpoint file at {path}")
    elif mode == "auto":
        path = RunDir(output_dir).checkpoint("resume", required=False)
        if path is None:
            return None, {}
    else:
        return None, {}
    checkpoint = read_checkpoint(path, key="ckpt_path" if explicit is not None else None, full=True,
                                 hint="; pass resume=never to start afresh or ckpt_path=<another checkpoint>")
    saved_config = checkpoint.get(ConfigInCheckpoint.key)
    if explicit is None and isinstance(saved_config, dict):
        differences = config_differences(saved_config, OmegaConf.to_container(cfg, resolve=True))
        if differences:
            shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
            raise LtlibError(f"the run directory {output_dir} holds {path.name} of a run with another configuration "
                             f"({shown}); use another run_name / hydra.run.dir, resume=never to start afresh, or "
                             f"ckpt_path={path} to resume from it anyway")
    return path, {"global_step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0))}


# ------------------------------------------------------------------------------------------ the run dir
@dataclass(frozen=True)
class RunDir:
    """One run directory of ``python -m ltlib.run`` (see the module docstring for what it holds)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @classmethod
    def containing(cls, path: str | os.PathLike[str]) -> RunDir:
        """The run of ``path``: a run directory, or a checkpoint file inside its ``checkpoints/``."""
        given = Path(path).expanduser()
        return cls(given.parent.parent if given.is_file() else given)

    def is_run(self) -> bool:
        """Whether the directory holds a run (``results.json`` or ``.hydra/``)."""
        return (self.path / RESULTS_JSON).is_file() or (self.path / ".hydra").is_dir()

    def results(self, required: bool = False) -> dict[str, Any] | None:
        """The ``results.json`` payload; None when the run has none (``required``: an LtlibError)."""
        file = self.path / RESULTS_JSON
        if not file.is_file():
            if required:
                raise LtlibError(f"no results.json in {self.path}; give the run directory of a finished "
                                 "python -m ltlib.run")
            return None
        try:
            payload = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise LtlibError(f"{file} could not be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict):
            raise LtlibError(f"{file} could not be read (a JSON {type(payload).__name__}, not an object)")
        return payload

    def config(self, source: str = "auto") -> dict[str, Any] | None:
        """The run's resolved config, None where ``source`` has none.

        ``results``: the one results.json holds (a finished run); ``checkpoint``: the one stored in the
        newest checkpoint (what ``resume=auto`` compares); ``hydra``: ``.hydra/config.yaml`` as composed,
        resolved where it can be, without ``logger`` and ``callbacks`` (their ``${hydra:...}`` paths only
        resolve inside the job); ``auto``: the first of these that exists.
        """
        if source not in CONFIG_SOURCES:
            raise unknown_name("config source", source, CONFIG_SOURCES)
        if source in ("auto", "results"):
            results = self.results()
            config = results.get("config") if results is not None else None
            if isinstance(config, dict) or source == "results":
                return config if isinstance(config, dict) else None
        if source in ("auto", "checkpoint"):
            from ltlib.training.callbacks import ConfigInCheckpoint

            path = self.checkpoint("resume", required=False)
            config = read_checkpoint(path, full=True).get(ConfigInCheckpoint.key) if path is not None else None
            if isinstance(config, dict) or source == "checkpoint":
                return config if isinstance(config, dict) else None
        return self._hydra_config()

    def _hydra_config(self) -> dict[str, Any] | None:
        from omegaconf import OmegaConf

        file = self.path / ".hydra" / "config.yaml"
        try:
            if not file.is_file():
                return None
            cfg = OmegaConf.load(file)
            for key in ("logger", "callbacks"):
                cfg.pop(key, None)
            try:
                config = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # noqa: BLE001 - unresolvable interpolations: keep them as written
                config = OmegaConf.to_container(cfg, resolve=False)
        except Exception:  # noqa: BLE001 - a damaged .hydra dir has no config
            return None
        return config if isinstance(config, dict) else None

    def overrides(self) -> list[str] | None:
        """The overrides the run was made with (``.hydra/overrides.yaml``); None without (or unreadable)."""
        from omegaconf import OmegaConf

        file = self.path / ".hydra" / "overrides.yaml"
        try:
            return [str(o) for o in OmegaConf.load(file)] if file.is_file() else None
        except Exception:  # noqa: BLE001 - a damaged file: no overrides known
            return None

    def choices(self) -> dict[str, str]:
        """The run's config group choices (``.hydra/hydra.yaml``'s ``hydra.runtime.choices``; empty without)."""
        from omegaconf import OmegaConf

        file = self.path / ".hydra" / "hydra.yaml"
        try:
            choices = OmegaConf.select(OmegaConf.load(file), "hydra.runtime.choices") if file.is_file() else None
            return {str(k): str(v) for k, v in (choices or {}).items() if v is not None}
        except Exception:  # noqa: BLE001 - a damaged file: no choices known
            return {}

    def checkpoint(self, which: str = "selected", required: bool = True) -> Path | None:
        """A checkpoint file of the run (:data:`CHECKPOINTS`): ``best``, ``last``, ``selected`` (the one
        results.json names: the evaluated one; ``last`` for a results.json without one) or ``resume``
        (the newest of ``checkpoints/last.ckpt`` and ``hpc_ckpt_*.ckpt``). Without that file: an
        LtlibError, or None when not ``required``."""
        if which == "resume":
            file = find_resume_checkpoint(self.path)
        elif which in ("best", "last"):
            file = self.path / "checkpoints" / f"{which}.ckpt"
        elif which == "selected":
            results = self.results(required=True) or {}
            file = self.path / (results.get("checkpoint") or os.path.join("checkpoints", "last.ckpt"))
        else:
            raise unknown_name("checkpoint", which, CHECKPOINTS)
        if file is None or not file.is_file():
            if required:
                raise LtlibError(f"the run in {self.path} has no {which} checkpoint"
                                 + (f": no file at {file}" if file is not None else ""))
            return None
        return file

    def status(self) -> dict[str, Any] | None:
        """The run's ``run_status.json`` (None when there is none or it is unreadable)."""
        return read_run_status(self.path)

    def describe_unfinished(self) -> tuple[str, str]:
        """``(status, reason)`` of a run without results.json (:func:`describe_unfinished`)."""
        return describe_unfinished(self.path)


# ------------------------------------------------------------------------------------------ the method
@dataclass(frozen=True)
class Task:
    """What a method is built for when there is no data module: the classes, their training counts and
    the input channels (a set-up data module has the same attributes)."""

    num_classes: int
    class_counts: list[int]
    class_names: list[str]
    in_chans: int = 3

    @classmethod
    def from_results(cls, results: Mapping[str, Any], in_chans: int = 3) -> Task:
        """The task a finished run was trained on, from its ``results.json`` per-class rows."""
        rows = results.get("per_class") or []
        return cls(len(rows), [int(r["train_count"]) for r in rows], [str(r.get("name", i)) for i, r in enumerate(rows)],
                   in_chans)


def build_method(method_cfg: Mapping[str, Any] | DictConfig, optim_cfg: Mapping[str, Any] | DictConfig | None,
                 datamodule_or_task: Any, backbone: nn.Module | Mapping[str, Any] | DictConfig, *,
                 many_threshold: int = 100, few_threshold: int = 20) -> nn.Module:
    """The method of a config, built as ``ltlib.run`` builds it.

    ``method_cfg``: the ``method`` node (a partial ``_target_``); ``optim_cfg``: the ``optim`` node;
    ``datamodule_or_task``: a set-up data module or a :class:`Task` (``num_classes``, ``class_counts``,
    ``class_names``, ``in_chans``); ``backbone``: a module, or the ``backbone`` node, instantiated here for
    the task's input channels (before the method, as training does).
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf
    from torch import nn

    task = datamodule_or_task
    if not isinstance(backbone, nn.Module):
        backbone = instantiate(backbone, in_chans=task.in_chans)
    optim = OmegaConf.to_container(optim_cfg, resolve=True) if isinstance(optim_cfg, DictConfig) else optim_cfg
    return instantiate(method_cfg)(
        backbone=backbone,
        num_classes=task.num_classes,
        class_counts=task.class_counts,
        class_names=task.class_names,
        optim=optim,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
    )


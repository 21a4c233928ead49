"""Diagnostics of finished runs (the command line: ``python -m ltlib.analyze RUN_DIR ...``, :mod:`ltlib.analyze`).

For each run directory (written by ``python -m ltlib.run``), the model is rebuilt from the resolved
config saved in ``results.json`` (:func:`ltlib.runs.build_method`, as training builds it), its checkpoint
is loaded (the one the run evaluated, or ``best``, ``last`` or a file: :func:`ltlib.runs.load_weights`),
and the model is run once over the run's own split (test by default) to compute, per class: accuracy,
intra-class compactness of the l2-normalised features (BBN supplementary B), mean feature norm (FBL
figure 2) and classifier weight norms (BBN figure 4, two-head figure 3). Written into the output directory:

* ``diagnostics.csv``: one row per run and class (training count, shot group and the values above);
* ``summary.csv``: one row per run (top-1, mean class, many / medium / few accuracy, mean compactness,
  mean feature norm, weight-norm spread);
* ``compactness.png``, ``feature_norms.png``, ``weight_norms.png``, ``accuracy_vs_count.png`` and
  ``shot_accuracy.png``: all runs side by side (runs must share the training data).

Example (BBN figure 6 for the decoupled study's three representations)::

    python -m ltlib.analyze outputs/study/decoupled/<time>/stage1/{ce,rw,rs} -o analysis/compactness
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltlib.analysis.diagnostics import (
    RunDiagnostics,
    class_weight_norms,
    diagnose,
    model_outputs,
    write_diagnostics_figures,
)
from ltlib.errors import LtlibError, unknown_name
from ltlib.runs import RunDir, build_method, load_weights

SPLITS = ("test", "val", "train")
CHECKPOINTS = ("selected", "best", "last")
#: Method options naming a file that the method reads when it is built; when the file is gone (another
#: machine, a relative path), the checkpoint being analysed, which holds the same weights, stands in.
_CONSTRUCTION_FILES = ("stage1_checkpoint", "cluster_checkpoint")


@dataclass
class LoadedRun:
    """A finished run rebuilt in memory: its results, data module (set up), method (weights loaded,
    eval mode) and the checkpoint file the weights came from."""

    run_dir: Path
    results: dict[str, Any]
    datamodule: Any
    method: nn.Module
    checkpoint: Path


def resolve_checkpoint(run_dir: Path, checkpoint: str = "selected") -> Path:
    """``selected`` (the one the run evaluated, from ``results.json``), ``best``, ``last`` or a file path."""
    if checkpoint in CHECKPOINTS:
        try:
            return RunDir(run_dir).checkpoint(checkpoint)
        except LtlibError as exc:
            raise LtlibError(f"{exc}; allowed: {', '.join(CHECKPOINTS)} or a checkpoint file") from None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise LtlibError(f"checkpoint {checkpoint!r} of run {run_dir}: no file at {path}; "
                         f"allowed: {', '.join(CHECKPOINTS)} or a checkpoint file")
    return path


def _method_config(config: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The run's ``method`` node, its construction files that are gone replaced by ``checkpoint``."""
    method_cfg = dict(config["method"])
    for key in _CONSTRUCTION_FILES:
        value = method_cfg.get(key)
        if value and not Path(str(value)).expanduser().is_file():
            method_cfg[key] = str(checkpoint)
    return method_cfg


def load_run(run_dir: str | os.PathLike[str], checkpoint: str = "selected") -> LoadedRun:
    """Rebuild a finished run's data module and method and load its checkpoint (see module docstring)."""
    from hydra.utils import instantiate

    run_dir = Path(run_dir)
    results = RunDir(run_dir).results(required=True)
    config = results.get("config")
    if not isinstance(config, Mapping) or not all(k in config for k in ("data", "backbone", "method")):
        raise LtlibError(f"{run_dir / 'results.json'} has no resolved config (data, backbone, method); "
                         "was it written by python -m ltlib.run?")
    path = resolve_checkpoint(run_dir, checkpoint)
    datamodule = instantiate(config["data"])
    datamodule.setup("test")
    saved_counts = [int(row["train_count"]) for row in results.get("per_class") or []]
    if saved_counts and saved_counts != list(datamodule.class_counts):
        raise LtlibError(f"the data of run {run_dir} now gives other training counts than when it ran "
                         f"({len(datamodule.class_counts)} classes); is data.root the same data?")
    method = build_method(_method_config(config, path), config.get("optim"), datamodule, config["backbone"],
                          many_threshold=config.get("many_threshold", 100),
                          few_threshold=config.get("few_threshold", 20))
    load_weights(method, path)
    method.eval()
    return LoadedRun(run_dir, results, datamodule, method, path)


def split_dataset(datamodule: Any, split: str) -> Any:
    """The data module's ``test``, ``val`` or ``train`` split, all with the evaluation transform (the
    training images without augmentation)."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    dataset = datamodule.eval_dataset(split)
    if len(dataset) == 0:
        raise LtlibError(f"the {split} split is empty; choose another --split")
    return dataset


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LtlibError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None


def analyze_run(run_dir: str | os.PathLike[str], *, label: str | None = None, split: str = "test",
                checkpoint: str = "selected", device: str = "auto", batch_size: int | None = None) -> RunDiagnostics:
    """The :class:`~ltlib.analysis.diagnostics.RunDiagnostics` of one finished run on one of its splits."""
    from torch.utils.data import DataLoader

    run = load_run(run_dir, checkpoint)
    dm = run.datamodule
    loader = DataLoader(split_dataset(dm, split), batch_size=batch_size or dm.eval_batch_size, shuffle=False,
                        num_workers=dm.num_workers)
    outputs = model_outputs(run.method, loader, pick_device(device))
    config = run.results["config"]
    return diagnose(outputs, dm.class_counts, label=label or default_label(run.results, Path(run_dir)),
                    class_names=dm.class_names, weight_norms=class_weight_norms(run.method.cpu()),
                    many_threshold=int(config.get("many_threshold", 100)),
                    few_threshold=int(config.get("few_threshold", 20)),
                    info={"run_dir": str(run_dir), "checkpoint": str(run.checkpoint), "split": split,
                          "method": run.results.get("method"), "data": run.results.get("data"),
                          "top1": float((outputs.predictions == outputs.targets).double().mean()),
                          "num_samples": int(outputs.targets.numel())})


def default_label(results: Mapping[str, Any], run_dir: Path) -> str:
    return str(results.get("method") or run_dir.name)


def unique_labels(labels: Sequence[str], run_dirs: Sequence[Path]) -> list[str]:
    """Labels made unique by appending the run directory's name (then its parent's) where they repeat."""
    out = list(labels)
    for depth in (1, 2):
        repeated = {label for label in out if out.count(label) > 1}
        if not repeated:
            break
        out = [f"{label} ({'/'.join(run_dirs[i].resolve().parts[-depth:])})" if label in repeated else label
               for i, label in enumerate(out)]
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 6)
    return value


def write_tables(runs: Mapping[str, RunDiagnostics], output_dir: Path) -> list[Path]:
    """``diagnostics.csv`` (run x class) and ``summary.csv`` (one row per run)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"run": label, **row} for label, run in runs.items() for row in run.rows()]
    summaries = []
    for label, run in runs.items():
        summary = run.summary()
        summaries.append({"run": label, "method": run.info.get("method"), "data": run.info.get("data"),
                          "split": run.info.get("split"), "top1": run.info.get("top1"),
                          **{k: v for k, v in summary.items() if k != "label"},
                          "checkpoint": run.info.get("checkpoint")})
    written = []
    for name, table in (("diagnostics.csv", rows), ("summary.csv", summaries)):
        columns: list[str] = []
        for row in table:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in table:
            writer.writerow({k: _cell(row.get(k, "")) for k in columns})
        (output_dir / name).write_text(buffer.getvalue())
        written.append(output_dir / name)
    return written


def analyze_runs(run_dirs: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str], *,
                 labels: Sequence[str] | None = None, split: str = "test", checkpoint: str = "selected",
                 device: str = "auto", batch_size: int | None = None) -> tuple[dict[str, RunDiagnostics], list[Path]]:
    """Analyse several runs and write the tables and figures; returns the diagnostics by label and the
    files written."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise LtlibError("no run directories given")
    if labels is not None and len(labels) != len(dirs):
        raise LtlibError(f"{len(labels)} labels for {len(dirs)} runs; give one label per run")
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    results = [RunDir(d).results(required=True) for d in dirs]
    names = unique_labels(list(labels) if labels else [default_label(r, d) for r, d in zip(results, dirs, strict=True)],
                          dirs)
    runs = {name: analyze_run(d, label=name, split=split, checkpoint=checkpoint, device=device,
                              batch_size=batch_size) for name, d in zip(names, dirs, strict=True)}
    out = Path(output_dir)
    files = write_tables(runs, out)
    files += write_diagnostics_figures(runs, out, {k: {"top1": r.info["top1"]} for k, r in runs.items()})
    return runs, files

"""Studies made of several ``ltlib.run`` jobs: ``python -m ltlib.study decoupled [options] [overrides]``.

**The decoupled experiment** (BBN section 3, figure 2). Stage 1 trains a representation with each of
the learning manners CE, RW and RS (``method=ce|rw|rs``, any method config can be given). Stage 2
freezes each representation and re-trains a linear classifier from scratch on it with each manner
again (``method=crt`` with ``sampler=uniform`` for CE and RW, ``class_weighting=inverse_frequency``
for RW, ``sampler=class_balanced`` for RS), pointing ``method.stage1_checkpoint`` at the stage-1 run's
selected checkpoint. The result is the 3 x 3 grid of error rates, representation manner in columns,
classifier manner in rows, written as ``decoupled_grid.csv``, ``decoupled_grid.md`` and a heat map
``decoupled_grid.png`` laid out as BBN figure 2. The transfer variant (figure 2 right: representations
learned on CIFAR-100-IR50, classifiers on CIFAR-10-IR50) re-trains the classifiers on other data:
``--transfer "data=cifar10_lt"`` adds a second grid (a second panel) per transfer target, whose stage-2
jobs normalise the target's images with the stage-1 run's mean / std (the normalisation the frozen
representation was trained with; a ``data.mean`` / ``data.std`` / ``data.normalization`` given in the
target or ``--stage2`` wins instead; the grid files record the choice)::

    python -m ltlib.study decoupled data=cifar100_lt data.imbalance_ratio=50 backbone=resnet32 \\
        --stage2 trainer.max_epochs=30 --transfer "data=cifar10_lt" trainer=gpu

Overrides given plainly apply to every job; ``--stage1 KEY=VALUE`` and ``--stage2 KEY=VALUE`` only to
one stage and replace a plain override of the same key; a transfer target's overrides replace both for
its stage-2 jobs. Each job is exactly ``python -m ltlib.run OVERRIDES`` with its run directory under
the study's output directory (``stage1/<manner>/``, ``stage2/<target>/repr-<r>_clf-<c>/``), run in a
subprocess (``--runner subprocess``, the default: isolated, DDP-capable) or in this process
(``--runner inprocess``: Hydra's compose API and :func:`ltlib.training.train.train`, no interpreter
start-up per job). A job whose directory already holds a ``results.json`` from the same overrides is reused, so an
interrupted study continues where it stopped when the command is repeated; ``study.json`` records
every job, its overrides and whether it was trained or reused.

Python: :func:`run_ltlib` runs one job (used by the notebooks), :func:`decoupled_study` the whole
experiment, :func:`decoupled_grid` / :func:`write_grid` build and write the grid from finished runs.
The command line is :mod:`ltlib.study`.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ltlib.analysis.results import save_figure
from ltlib.config import compose as compose_config
from ltlib.config import config_dir, restored_hydra_state
from ltlib.data.transforms import normalization_stats
from ltlib.errors import LtlibError, find_user_error, unknown_name
from ltlib.io import atomic_write_text
from ltlib.runs import RESULTS_JSON, RunDir

log = logging.getLogger("ltlib.study")

RUNNERS = ("subprocess", "inprocess")
#: BBN section 3's learning manners for the stage-2 classifier: (sampler, class weighting).
CLASSIFIER_MANNERS: dict[str, tuple[str, str]] = {
    "ce": ("uniform", "none"),
    "rw": ("uniform", "inverse_frequency"),
    "rs": ("class_balanced", "none"),
}
DEFAULT_MANNERS = ("ce", "rw", "rs")
SPLITS = ("test", "val")
GRID_METRICS = ("top1", "mean_class_acc")
GRID_CSV, GRID_MD, GRID_PNG, MANIFEST = "decoupled_grid.csv", "decoupled_grid.md", "decoupled_grid.png", "study.json"
#: Overrides the study sets itself (and every hydra.* setting: the study places the run directories).
_RESERVED = ("method",)


# ------------------------------------------------------------------------------------------ overrides
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def override_key(override: str) -> str:
    """The key or config group an override sets (``data`` for ``data=x``, ``a.b`` for ``+a.b=1``)."""
    try:
        (parsed,) = _parser().parse_overrides([override])
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors become one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtlibError(f"override {override!r} is not a valid Hydra override: {reason}") from None
    if parsed.is_sweep_override():
        raise LtlibError(f"override {override!r} is a sweep; a study runs one setting (run one study per value)")
    return str(parsed.key_or_group)


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """Concatenate override lists, a later override replacing an earlier one of the same key (in the
    earlier one's position)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged[override_key(override)] = override
    return list(merged.values())


def quote_value(value: str | os.PathLike[str]) -> str:
    """``value`` as a Hydra override value: bare when it is a plain path or word, else single-quoted."""
    text = str(value)
    if re.fullmatch(r"[\w./:+\-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_not_reserved(overrides: Sequence[str], where: str, allow_method_options: bool = False,
                        manner_keys: Sequence[str] = ()) -> None:
    """Reject overrides of what the study sets itself: the method (and, outside ``--stage1`` /
    ``--stage2``, its options, which differ between the stages), the run directory, the stage-2 manner."""
    for override in overrides:
        key = override_key(override)
        if key in _RESERVED or key in manner_keys or key.startswith("hydra."):
            raise LtlibError(f"{where} override {override!r} sets {key}, which the study sets itself; remove it")
        if key.startswith("method.") and not allow_method_options:
            raise LtlibError(f"{where} override {override!r} sets a method option; give it to one stage with "
                             f"--stage1 {override} or --stage2 {override}")


# ------------------------------------------------------------------------------------------ one job
def compose_run_config(overrides: Sequence[str], run_dir: str | os.PathLike[str]) -> Any:
    """The config ``python -m ltlib.run OVERRIDES hydra.run.dir=RUN_DIR`` would run, composed in this
    process, with its ``hydra`` node (``runtime.output_dir`` set to ``run_dir``)."""
    try:
        return compose_config(overrides, hydra_node=True, run_dir=run_dir)
    except Exception as exc:  # noqa: BLE001 - composition errors (unknown group option) as one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtlibError(f"cannot compose the run config: {reason}") from None


def _run_inprocess(overrides: Sequence[str], run_dir: Path) -> None:
    """One ``ltlib.run`` job in this process, writing ``.hydra/`` and ``run.log`` as Hydra does."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from ltlib.training.train import train

    cfg = compose_run_config(overrides, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(task_cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), hydra_dir / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")

    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    ltlib_logger = logging.getLogger("ltlib")
    ltlib_logger.addHandler(handler)
    level = ltlib_logger.level
    ltlib_logger.setLevel(logging.INFO)
    with restored_hydra_state():
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            train(cfg, run_dir)
        except Exception as exc:  # noqa: BLE001 - user errors become one LtlibError naming the run
            user_error = find_user_error(exc)
            if user_error is None:
                raise
            message = str(user_error).strip().splitlines()[-1]
            raise LtlibError(f"{message} (run {run_dir})") from exc
        finally:
            ltlib_logger.removeHandler(handler)
            ltlib_logger.setLevel(level)
            handler.close()
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover - torch is a dependency
                pass


def _run_subprocess(overrides: Sequence[str], run_dir: Path, capture: bool, env: Mapping[str, str] | None) -> None:
    """One ``python -m ltlib.run`` job in a child process."""
    command = [sys.executable, "-m", "ltlib.run", *overrides, f"hydra.run.dir={quote_value(run_dir.resolve())}"]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(command, env=full_env, text=True, capture_output=capture)
    if proc.returncode != 0:
        detail = "see its output above"
        if capture:
            lines = [line for line in (proc.stderr or "").splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
            errors = [line for line in lines if line.startswith("ltlib: error:")]
            if errors:
                detail = errors[-1]
            elif any(line.startswith("Traceback") for line in lines):
                detail = lines[-1]  # the exception
            else:
                detail = lines[0] if lines else "no output"  # Hydra's composition errors come first
        raise LtlibError(f"python -m ltlib.run failed (exit {proc.returncode}) for run {run_dir}: {detail}")


def run_ltlib(overrides: Sequence[str], run_dir: str | os.PathLike[str], *, runner: str = "subprocess",
              reuse: bool = True, capture: bool = False, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m ltlib.run OVERRIDES`` into ``run_dir`` and return its ``results.json`` payload.

    ``runner``: ``subprocess`` (a child process; ``capture`` keeps its output out of the console,
    ``env`` adds environment variables) or ``inprocess`` (this process, through Hydra's compose API and
    :func:`ltlib.training.train.train`; the same config, the same files). With ``reuse``, a ``run_dir`` that already
    holds a ``results.json`` made with the same overrides is returned as it is; one made with other
    overrides is an error. A ``run_dir`` left by an interrupted job (no ``results.json``) is handed to
    ``ltlib.run`` as it is: it resumes from the directory's last checkpoint where it can (``resume=auto``)
    and otherwise starts afresh, overwriting the old files.
    """
    if runner not in RUNNERS:
        raise unknown_name("runner", runner, RUNNERS)
    overrides = [str(o) for o in overrides]
    for override in overrides:
        if override_key(override).startswith("hydra."):
            raise LtlibError(f"override {override!r}: hydra.* settings are set by run_ltlib (run_dir)")
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    finished = run.results()
    if finished is not None:
        previous = run.overrides()
        if reuse and previous == overrides:
            return finished
        raise LtlibError(f"{run_dir} already holds a finished run (made with overrides {previous}); "
                         "choose another directory or delete it")
    if runner == "inprocess":
        _run_inprocess(overrides, run_dir)
    else:
        _run_subprocess(overrides, run_dir, capture, env)
    results = run.results()
    if results is None:
        raise LtlibError(f"the job in {run_dir} ended without writing {RESULTS_JSON}")
    return results


# ------------------------------------------------------------------------------- the decoupled study
@dataclass
class StudyJob:
    """One ``ltlib.run`` job of a study."""

    stage: str
    representation: str
    classifier: str | None
    target: str | None
    run_dir: str
    overrides: list[str]
    status: str = "planned"


@dataclass
class GridCell:
    """One cell of a decoupled grid: a representation manner x a classifier manner on one target."""

    target: str
    representation: str
    classifier: str
    error: float
    value: float
    metric: str
    split: str
    representation_data: str
    classifier_data: str
    stage1_run: str
    stage2_run: str
    stage1_checkpoint: str
    many_acc: float | None = None
    medium_acc: float | None = None
    few_acc: float | None = None
    #: where the stage-2 run's data.mean / data.std come from, and their values (JSON lists)
    normalization: str = ""
    data_mean: str | None = None
    data_std: str | None = None


@dataclass
class DecoupledStudy:
    """What :func:`decoupled_study` did: the jobs, the grid cells and the files written."""

    output_dir: Path
    jobs: list[StudyJob]
    cells: list[GridCell]
    files: list[Path] = field(default_factory=list)


def _target_name(overrides: Sequence[str], taken: set[str]) -> str:
    name = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "data" and "=" in o), "transfer")
    name = re.sub(r"[^\w.\-]+", "_", name) or "transfer"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _check_manners(kind: str, names: Sequence[str], allowed: Sequence[str] | None) -> list[str]:
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise LtlibError(f"{kind} is empty; give at least one manner, e.g. ce,rw,rs")
    if len(set(names)) != len(names):
        raise LtlibError(f"{kind}={','.join(names)} repeats a manner")
    for name in names:
        if allowed is not None and name not in allowed:
            raise unknown_name(f"{kind} manner", name, allowed)
        if not re.fullmatch(r"[\w\-]+", name):
            raise LtlibError(f"{kind} manner {name!r} is not a config name")
    return names


def _method_configs() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))


def stage1_overrides(representation: str, common: Sequence[str], stage1: Sequence[str]) -> list[str]:
    """The overrides of the stage-1 job of one representation manner (a method config name)."""
    return merge_overrides(common, stage1, [f"method={representation}"])


def stage2_overrides(classifier: str, stage1_checkpoint: str | os.PathLike[str], common: Sequence[str],
                     stage2: Sequence[str], target: Sequence[str] = (), normalization: Sequence[str] = ()) -> list[str]:
    """The overrides of a stage-2 job: ``method=crt`` on ``stage1_checkpoint`` with the classifier manner's
    sampler and class weighting (:data:`CLASSIFIER_MANNERS`). ``normalization`` (a transfer target's
    normalisation of the stage-1 run, :func:`stage1_normalization`) comes after ``common`` and before
    ``stage2`` and ``target``."""
    sampler, weighting = CLASSIFIER_MANNERS[classifier]
    return merge_overrides(common, normalization, stage2, target, [
        "method=crt", f"method.stage1_checkpoint={quote_value(stage1_checkpoint)}",
        f"method.sampler={sampler}", f"method.class_weighting={weighting}",
    ])


#: The data options that set the input normalisation (``data.normalization`` names a set of statistics).
NORMALIZATION_KEYS = ("data.mean", "data.std", "data.normalization")


def _float_list(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in value):
        return [float(v) for v in value]
    return None


def _named_normalization(name: Any) -> tuple[list[float], list[float]] | None:
    try:
        return normalization_stats(str(name))
    except LtlibError:
        return None


def run_normalization(results: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` a finished run normalised its inputs with: the values its data module recorded
    (``results.json``'s ``splits.normalization``), else its resolved ``data.mean`` / ``data.std``, else
    the statistics its ``data.normalization`` names; None when none can be told."""
    recorded = (results.get("splits") or {}).get("normalization") or {}
    mean, std = _float_list(recorded.get("mean")), _float_list(recorded.get("std"))
    if mean is not None and std is not None:
        return mean, std
    data = (results.get("config") or {}).get("data") or {}
    mean, std = _float_list(data.get("mean")), _float_list(data.get("std"))
    if mean is not None and std is not None:
        return mean, std
    if data.get("normalization"):
        return _named_normalization(data["normalization"])
    return None


def stage1_normalization(stage1_results: Mapping[str, Any]) -> list[str]:
    """Overrides giving a stage-2 job the input normalisation of the stage-1 run (``data.mean=[...]``,
    ``data.std=[...]`` and ``++data.normalization=null``, so that the lists apply): a classifier re-trained on a frozen representation of other data (a transfer
    target, BBN figure 2 right) must see inputs normalised as the representation was trained. Empty
    when the stage-1 run's normalisation cannot be told (:func:`run_normalization`)."""
    stats = run_normalization(stage1_results)
    if stats is None:
        return []
    overrides = [f"data.{key}=[{','.join(repr(v) for v in values)}]" for key, values in zip(("mean", "std"), stats,
                                                                                          strict=True)]
    return [*overrides, "++data.normalization=null"]


def _user_normalization(stage2: Sequence[str], target_overrides: Sequence[str]) -> str | None:
    """Which of the user's options set a target's normalisation (``--transfer data.std=[...]``), else None."""
    for flag, overrides in (("--transfer", target_overrides), ("--stage2", stage2)):
        given = [override_key(o) for o in overrides if override_key(o) in NORMALIZATION_KEYS]
        if given:
            return f"{flag} override ({', '.join(given)})"
    return None


def _normalization_choice(target: str, stage1_results: Mapping[str, Any], normalization: Sequence[str],
                          stage2: Sequence[str], target_overrides: Sequence[str]) -> str:
    """Where the stage-2 jobs of a target take their input normalisation from, in words."""
    if target == "same":
        return "stage 1's (same data)"
    user = _user_normalization(stage2, target_overrides)
    if user is not None:
        return user
    if normalization:
        return f"stage 1's ({_data_label(stage1_results)})"
    return "the target data's own (the stage-1 run's normalisation is not recorded)"


def _data_label(results: Mapping[str, Any]) -> str:
    data = (results.get("config") or {}).get("data") or {}
    name = data.get("name") or results.get("data") or "data"
    ratio = data.get("imbalance_ratio")
    return f"{name} (IR {ratio:g})" if isinstance(ratio, (int, float)) else str(name)


def _cell(job: StudyJob, stage1: StudyJob, results: Mapping[str, Any], stage1_results: Mapping[str, Any],
          split: str, metric: str, normalization: str = "") -> GridCell:
    metrics = (results.get("metrics") or {}).get(split)
    if not metrics or metrics.get(metric) is None:
        raise LtlibError(f"the run in {job.run_dir} has no {split} {metric}; choose --split/--metric it has")
    value = float(metrics[metric])
    used = run_normalization(results) or (None, None)
    return GridCell(
        target=str(job.target), representation=job.representation, classifier=str(job.classifier),
        error=100.0 * (1.0 - value), value=value, metric=metric, split=split,
        representation_data=_data_label(stage1_results), classifier_data=_data_label(results),
        stage1_run=stage1.run_dir, stage2_run=job.run_dir,
        stage1_checkpoint=str((results.get("config") or {}).get("method", {}).get("stage1_checkpoint")),
        many_acc=metrics.get("many_acc"), medium_acc=metrics.get("medium_acc"), few_acc=metrics.get("few_acc"),
        normalization=normalization,
        data_mean=None if used[0] is None else json.dumps(used[0]),
        data_std=None if used[1] is None else json.dumps(used[1]),
    )


def decoupled_study(common: Sequence[str] = (), *, output_dir: str | os.PathLike[str],
                    representations: Sequence[str] = DEFAULT_MANNERS, classifiers: Sequence[str] = DEFAULT_MANNERS,
                    stage1: Sequence[str] = (), stage2: Sequence[str] = (),
                    transfers: Sequence[Sequence[str]] = (), include_source: bool = True,
                    runner: str = "subprocess", split: str = "test", metric: str = "top1", reuse: bool = True,
                    capture: bool = False, env: Mapping[str, str] | None = None,
                    progress: Callable[[str], None] | None = None, command: str | None = None) -> DecoupledStudy:
    """Run BBN's decoupled experiment (section 3, figure 2) and write its grid into ``output_dir``.

    ``representations`` are method configs trained end to end in stage 1 (BBN: ``ce``, ``rw``, ``rs``);
    ``classifiers`` are stage-2 manners of :data:`CLASSIFIER_MANNERS`. ``common`` overrides apply to
    every job, ``stage1`` / ``stage2`` ones to one stage (replacing a common override of the same key),
    each entry of ``transfers`` adds a grid whose stage-2 jobs also get those overrides (other data);
    ``include_source=False`` drops the grid on the stage-1 data. Grid values: ``100 * (1 - metric)`` on
    ``split`` (``test``: the official test set, which BBN's CIFAR code calls its validation set).
    ``command`` is recorded in ``study.json`` (the CLI passes its command line).
    """
    if runner not in RUNNERS:
        raise unknown_name("runner", runner, RUNNERS)
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    if metric not in GRID_METRICS:
        raise unknown_name("metric", metric, GRID_METRICS)
    representations = _check_manners("representations", representations, _method_configs())
    classifiers = _check_manners("classifiers", classifiers, list(CLASSIFIER_MANNERS))
    _check_not_reserved(common, "plain")
    _check_not_reserved(stage1, "--stage1", allow_method_options=True)
    _check_not_reserved(stage2, "--stage2", allow_method_options=True,
                        manner_keys=("method.sampler", "method.class_weighting"))
    for transfer in transfers:
        _check_not_reserved(transfer, "--transfer")
    if not include_source and not transfers:
        raise LtlibError("--no-source needs at least one --transfer target: there would be no grid")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: log.info("%s", message))

    taken: set[str] = {"same"}
    targets: list[tuple[str, list[str]]] = [("same", [])] if include_source else []
    targets += [(_target_name(t, taken), list(t)) for t in transfers]
    jobs_stage1 = {r: StudyJob("stage1", r, None, None, str(out / "stage1" / r), stage1_overrides(r, common, stage1))
                   for r in representations}
    total = len(jobs_stage1) + len(targets) * len(representations) * len(classifiers)
    jobs: list[StudyJob] = []
    results: dict[str, dict[str, Any]] = {}
    cells: list[GridCell] = []

    def run(job: StudyJob) -> dict[str, Any]:
        jobs.append(job)
        already = (Path(job.run_dir) / RESULTS_JSON).is_file() and RunDir(job.run_dir).overrides() == job.overrides
        what = f"stage 1 {job.representation}" if job.stage == "stage1" else \
            f"stage 2 {job.target}: representation {job.representation}, classifier {job.classifier}"
        say(f"[{len(jobs)}/{total}] {what} -> {job.run_dir}" + (" (reused)" if already and reuse else ""))
        payload = run_ltlib(job.overrides, job.run_dir, runner=runner, reuse=reuse, capture=capture, env=env)
        job.status = "reused" if already and reuse else "trained"
        _write_manifest(out, command, common, stage1, stage2, targets, jobs, cells, runner)
        return payload

    for job in jobs_stage1.values():
        results[job.run_dir] = run(job)
    for target, target_overrides in targets:
        for representation in representations:
            first = jobs_stage1[representation]
            checkpoint = RunDir(Path(first.run_dir).resolve()).checkpoint("selected")
            # a transfer target's data would otherwise be normalised with its own data config's mean / std,
            # not with those the frozen representation was trained with
            normalization = [] if target == "same" or _user_normalization(stage2, target_overrides) else \
                stage1_normalization(results[first.run_dir])
            choice = _normalization_choice(target, results[first.run_dir], normalization, stage2, target_overrides)
            for classifier in classifiers:
                job = StudyJob("stage2", representation, classifier, target,
                               str(out / "stage2" / target / f"repr-{representation}_clf-{classifier}"),
                               stage2_overrides(classifier, checkpoint, common, stage2, target_overrides,
                                                normalization=normalization))
                cells.append(_cell(job, first, run(job), results[first.run_dir], split, metric, choice))
    files = write_grid(cells, out)
    _write_manifest(out, command, common, stage1, stage2, targets, jobs, cells, runner)
    return DecoupledStudy(out, jobs, cells, [*files, out / MANIFEST])


def _write_manifest(out: Path, command: str | None, common: Sequence[str], stage1: Sequence[str], stage2: Sequence[str],
                    targets: Sequence[tuple[str, Sequence[str]]], jobs: Sequence[StudyJob],
                    cells: Sequence[GridCell], runner: str) -> None:
    manifest = {
        "study": "decoupled",
        "command": command,
        "runner": runner,
        "overrides": {"common": list(common), "stage1": list(stage1), "stage2": list(stage2),
                      "targets": {name: list(o) for name, o in targets}},
        "jobs": [asdict(job) for job in jobs],
        "grid": [asdict(cell) for cell in cells],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False, default=str) + "\n")


# --------------------------------------------------------------------------------------- the grid
def decoupled_grid(cells: Sequence[GridCell | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Arrange cells per target: ``{target: {"representations": [...], "classifiers": [...],
    "error": [[...]] (rows: classifiers, columns: representations, NaN where missing),
    "representation_data": ..., "classifier_data": ..., "normalization": [(choice, mean, std), ...]}}``."""
    grids: dict[str, dict[str, Any]] = {}
    for cell in cells:
        c = asdict(cell) if isinstance(cell, GridCell) else dict(cell)
        grid = grids.setdefault(c["target"], {"representations": [], "classifiers": [], "values": {},
                                              "representation_data": c["representation_data"],
                                              "classifier_data": c["classifier_data"], "split": c["split"],
                                              "metric": c["metric"]})
        if c["representation"] not in grid["representations"]:
            grid["representations"].append(c["representation"])
        if c["classifier"] not in grid["classifiers"]:
            grid["classifiers"].append(c["classifier"])
        grid["values"][(c["classifier"], c["representation"])] = float(c["error"])
        normalization = (c.get("normalization") or "", c.get("data_mean"), c.get("data_std"))
        if any(normalization) and normalization not in grid.setdefault("normalization", []):
            grid["normalization"].append(normalization)
    for grid in grids.values():
        values = grid.pop("values")
        grid["error"] = [[values.get((clf, rep), math.nan) for rep in grid["representations"]]
                         for clf in grid["classifiers"]]
    return grids


def _grid_title(name: str, grid: Mapping[str, Any]) -> str:
    if grid["representation_data"] == grid["classifier_data"]:
        return str(grid["representation_data"])
    return f"{grid['representation_data']} → {grid['classifier_data']}"


def grid_markdown(cells: Sequence[GridCell]) -> str:
    """One markdown table per target: classifier manners in rows, representation manners in columns."""
    parts = []
    for name, grid in decoupled_grid(cells).items():
        parts.append(f"### {_grid_title(name, grid)}: top-1 error (%) on {grid['split']}"
                     + ("" if grid["metric"] == "top1" else f" (1 - {grid['metric']})"))
        parts.append("")
        parts.append("| classifier \\ representation | " + " | ".join(r.upper() for r in grid["representations"]) + " |")
        parts.append("| --- |" + " ---: |" * len(grid["representations"]))
        for clf, row in zip(grid["classifiers"], grid["error"], strict=True):
            parts.append(f"| **{clf.upper()}** | " + " | ".join("–" if math.isnan(v) else f"{v:.2f}" for v in row) + " |")
        parts.append("")
        for choice, mean, std in grid.get("normalization", []):
            parts.append(f"Stage-2 input normalisation: {choice or 'not recorded'}: data.mean {mean or '–'}, "
                         f"data.std {std or '–'}.")
            parts.append("")
    return "\n".join(parts)


def plot_grid(cells: Sequence[GridCell], path: str | os.PathLike[str] | None = None) -> Figure:
    """BBN figure 2: per target a heat map of error rates, representation manner on the x axis,
    classifier manner on the y axis, each block annotated with its error (%)."""
    grids = decoupled_grid(cells)
    if not grids:
        raise LtlibError("no grid cells to plot")
    figure = Figure(figsize=(3.6 * len(grids) + 0.6, 3.6))
    for k, (name, grid) in enumerate(grids.items()):
        ax = figure.add_subplot(1, len(grids), k + 1)
        error = np.asarray(grid["error"], dtype=np.float64)
        finite = error[np.isfinite(error)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        image = ax.imshow(error, cmap="Blues", vmin=low - 0.25 * (high - low + 1e-9), vmax=high)
        for i in range(error.shape[0]):
            for j in range(error.shape[1]):
                if np.isfinite(error[i, j]):
                    dark = error[i, j] > low + 0.6 * (high - low)
                    ax.text(j, i, f"{error[i, j]:.2f}", ha="center", va="center", fontsize=11,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(grid["representations"])), [r.upper() for r in grid["representations"]])
        ax.set_yticks(range(len(grid["classifiers"])), [c.upper() for c in grid["classifiers"]])
        ax.set_xlabel("representation learning manner")
        ax.set_ylabel("classifier learning manner")
        ax.set_title(_grid_title(name, grid), fontsize=10)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="top-1 error (%)")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure


def write_grid(cells: Sequence[GridCell], output_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``decoupled_grid.csv`` (one row per cell), ``decoupled_grid.md`` and ``decoupled_grid.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(cell) for cell in cells]
    buffer = io.StringIO()
    columns = list(rows[0]) if rows else [f.name for f in GridCell.__dataclass_fields__.values()]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else round(v, 4) if k == "error" else v) for k, v in row.items()})
    files = [out / GRID_CSV, out / GRID_MD, out / GRID_PNG]
    files[0].write_text(buffer.getvalue())
    files[1].write_text("# Decoupled representation / classifier learning (BBN section 3, figure 2)\n\n"
                        + grid_markdown(cells))
    plot_grid(cells, files[2])
    return files

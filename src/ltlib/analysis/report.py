"""Comparison report of a sweep (the command line: ``python -m ltlib.report SWEEP_DIR ...``, :mod:`ltlib.report`).

Reads every run under the given directories (a Hydra multirun directory, ``outputs/``, a study
directory: any tree of ``python -m ltlib.run`` run directories) and writes, into ``--output-dir``
(default ``SWEEP_DIR/report``):

* ``report.md`` and ``report.csv``: one row per cell, method x dataset x imbalance ratio (and
  backbone, and any other setting that differs), with the number of runs and the mean ± sample standard
  deviation over them of top-1, mean class, many-, medium- and few-shot accuracy (%), next to the
  numbers the papers report for the same cell (:mod:`ltlib.analysis.published`, with paper and table) and the
  difference (ours - published);
* ``report.png``: top-1 mean ± std per cell, one panel per dataset and imbalance ratio, the published
  numbers as markers;
* ``report_missing.csv``: runs that are missing or failed, also listed in ``report.md``: a run
  directory with ``.hydra/`` but no ``results.json`` (failed with its error, interrupted, killed, or
  still running, from the run's ``run_status.json``: :mod:`ltlib.runs`), an unreadable
  ``results.json`` or one without the split's metrics, and jobs of a multirun (``multirun.yaml``,
  basic sweeper) that never started. Failed runs whose config can be read count in their cell's
  ``runs`` column (``2/3``); none is dropped silently.

Runs belong to the same cell when their resolved configs are equal except for seeds (``seed``,
``data.subset_seed`` and every other ``*seed`` key: the replicates mean ± std is taken over) and for
where and how they ran (run name, paths, devices, precision, workers, loggers, callbacks:
:func:`ltlib.runs.is_non_experiment_key`, the list ``resume=auto`` uses too). A classifier re-training run
(``crt``) is told apart by the method of its stage-1 run. ``--alias folder=cifar10_lt`` renames a dataset so that
CIFAR-10 in folder layout is compared with the CIFAR-10-LT numbers.

A cell meets a published number only when it was trained as the number was: same method (and
options), dataset, imbalance ratio, backbone and the recipe the paper states (``trainer.max_epochs``,
``optim.schedule``, ``optim.milestones``; :func:`ltlib.analysis.published.match_published`). A cell that meets
none says why (``no published bbn result on cifar10_lt for 10 epochs (published: 200)``, a dataset
name the papers do not use, ...), in ``report.md`` and in the CSV's ``published_reason`` column; notes
on published values (a value printed differently by its source) are shown where the value is used.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ltlib.analysis.published import PublishedResult, match_published, published_datasets
from ltlib.analysis.results import save_figure
from ltlib.errors import LtlibError, unknown_name
from ltlib.runs import RunDir, describe_unfinished, flatten_config, is_non_experiment_key

REPORT_MD, REPORT_CSV, REPORT_PNG, MISSING_CSV = "report.md", "report.csv", "report.png", "report_missing.csv"
SPLITS = ("test", "val")
#: results.json metric keys reported, and their column names.
METRICS = {"top1": "top-1", "mean_class_acc": "mean class", "many_acc": "many", "medium_acc": "medium",
           "few_acc": "few"}
#: published metric (ltlib.analysis.published accuracy_metric) -> results.json metric key.
_PUBLISHED_TO_OURS = {"top1": "top1", "many": "many_acc", "medium": "medium_acc", "few": "few_acc"}
_PAPER_NAMES = {"bbn": "BBN", "fbl": "FBL", "two_head": "two-head"}

#: Method options that point at other runs; replaced by the method of the run they point at.
_RUN_REFERENCES = ("method.stage1_checkpoint", "method.members")


# ------------------------------------------------------------------------------------ the runs
@dataclass
class RunRecord:
    """One run directory (or a multirun job that never started) as the report sees it."""

    run_dir: str
    status: str  # ok | failed | interrupted | running | unreadable | no_metrics | not_started
    reason: str = ""
    method: str | None = None
    dataset: str | None = None
    imbalance_ratio: float | None = None
    backbone: str | None = None
    epochs: int | None = None
    #: trainer.max_epochs, optim.schedule and optim.milestones (ltlib.analysis.published.RECIPE_KEYS), where set
    recipe: dict[str, Any] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    setting: dict[str, Any] = field(default_factory=dict)
    method_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def groupable(self) -> bool:
        return self.method is not None and self.dataset is not None


def _flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`ltlib.runs.flatten_config` with lists as JSON text (hashable, compared and shown as written);
    empty sections say nothing about a cell and are left out."""
    return {key: json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, tuple)) else value
            for key, value in flatten_config(config).items() if not isinstance(value, Mapping)}


def is_seed_key(key: str) -> bool:
    """Whether a flattened config key is a seed (a replicate axis of mean ± std)."""
    last = key.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


def _ignored(key: str) -> bool:
    """Config keys that say where and how a run ran, not what it trained: left out when cells are formed."""
    return is_non_experiment_key(key, "report")


def _referenced_run_label(path: Any) -> str:
    """The method (and variant) of the run a checkpoint or run directory belongs to, else the path."""
    if not path:
        return str(path)
    given = Path(str(path)).expanduser()
    for run_dir in (given, given.parent.parent):
        try:
            payload = RunDir(run_dir).results()
        except LtlibError:
            break
        if payload is not None:
            config = payload.get("config") or {}
            method = payload.get("method") or "?"
            variant = method_variant(method, config.get("method") or {})
            return method + (f"[{format_variant(variant)}]" if variant else "")
    return str(path)


def _setting(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(setting, seeds)`` of a resolved config: the flattened keys that define the cell, and the seeds."""
    setting, seeds = {}, {}
    for key, value in _flatten(config).items():
        if is_seed_key(key):
            seeds[key] = value
        elif key in _RUN_REFERENCES:
            references = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
            if isinstance(references, list):
                setting[key] = json.dumps(sorted(_referenced_run_label(r) for r in references))
            else:
                setting[key] = _referenced_run_label(references)
        elif not _ignored(key):
            setting[key] = value
    return setting, seeds


@functools.lru_cache(maxsize=64)
def _default_method_config_json(name: str) -> str:
    from omegaconf import OmegaConf

    from ltlib.config import compose

    try:
        cfg = compose([f"method={name}"], job_name="report")
        return json.dumps(OmegaConf.to_container(cfg.method, resolve=True), default=str)
    except Exception:  # noqa: BLE001 - an unknown or custom method has no defaults to compare with
        return "null"


def default_method_config(name: str) -> dict[str, Any] | None:
    """The packaged ``conf/method/<name>.yaml`` as composed by Hydra (None for an unknown method)."""
    value = json.loads(_default_method_config_json(name))
    return value if isinstance(value, dict) else None


def method_variant(method: str, method_config: Mapping[str, Any]) -> dict[str, Any]:
    """The method options a run changed from the method config's defaults (seeds and file paths aside)."""
    defaults = default_method_config(method)
    if defaults is None:
        return {}
    variant = {}
    for key, value in method_config.items():
        if key.startswith("_") or is_seed_key(key) or f"method.{key}" in _RUN_REFERENCES or _ignored(f"method.{key}"):
            continue
        if key not in defaults or defaults[key] != value:
            variant[key] = value
    return variant


#: How setting keys that tell cells apart are shown.
_DISPLAY_KEYS = {"method.stage1_checkpoint": "stage 1", "method.members": "members"}


def format_variant(variant: Mapping[str, Any]) -> str:
    """``k=v, ...`` in key order (run references shown as ``stage 1=<method>``)."""
    return ", ".join(f"{_DISPLAY_KEYS.get(k, k)}={v}" for k, v in sorted(variant.items()))


def _fill_from_config(record: RunRecord, config: Mapping[str, Any], method: str | None,
                      aliases: Mapping[str, str]) -> None:
    data = config.get("data") or {}
    dataset = data.get("name") if isinstance(data, Mapping) else None
    record.method = method
    record.dataset = aliases.get(str(dataset), str(dataset)) if dataset else None
    ratio = data.get("imbalance_ratio") if isinstance(data, Mapping) else None
    record.imbalance_ratio = float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None
    backbone = config.get("backbone") or {}
    record.backbone = str(backbone.get("name")) if isinstance(backbone, Mapping) and backbone.get("name") else None
    epochs = (config.get("trainer") or {}).get("max_epochs")
    record.epochs = int(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else None
    optim = config.get("optim") or {}
    optim = optim if isinstance(optim, Mapping) else {}
    record.recipe = {"max_epochs": record.epochs, "schedule": optim.get("schedule"),
                     "milestones": optim.get("milestones")}
    if not isinstance(record.recipe["schedule"], str):
        record.recipe["schedule"] = None
    milestones = record.recipe["milestones"]
    if not (isinstance(milestones, (list, tuple)) and all(isinstance(m, int) for m in milestones)):
        record.recipe["milestones"] = None
    record.method_config = dict(config.get("method") or {})
    record.setting, record.seeds = _setting(config)
    if record.dataset and dataset != record.dataset:
        record.setting["data.name"] = record.dataset


def read_run(run_dir: str | os.PathLike[str], split: str = "test", aliases: Mapping[str, str] | None = None) -> RunRecord:
    """The :class:`RunRecord` of one run directory."""
    run = RunDir(run_dir)
    aliases = aliases or {}
    record = RunRecord(str(run_dir), "ok")
    # .hydra/ describes the run also when results.json is missing or unreadable
    hydra_config, hydra_method = run.config("hydra"), run.choices().get("method")
    record.overrides = run.overrides() or []
    try:
        payload = run.results()
        if payload is None:
            record.status, record.reason = describe_unfinished(run_dir)
            if hydra_config is not None:
                _fill_from_config(record, hydra_config, hydra_method, aliases)
            return record
        config = payload.get("config")
        if not isinstance(config, Mapping):
            raise LtlibError(f"results.json could not be read (no config: {type(config).__name__})")
    except LtlibError as exc:
        record.status, record.reason = "unreadable", str(exc)
        if hydra_config is not None:
            _fill_from_config(record, hydra_config, hydra_method, aliases)
        return record
    _fill_from_config(record, config, str(payload.get("method") or hydra_method or "?"), aliases)
    metrics = (payload.get("metrics") or {}).get(split)
    if not isinstance(metrics, Mapping) or metrics.get("top1") is None:
        record.status, record.reason = "no_metrics", f"results.json has no {split} metrics"
        return record
    record.metrics = {key: (None if metrics.get(key) is None else float(metrics[key])) for key in METRICS}
    return record


def _is_run_dir(path: Path) -> bool:
    return RunDir(path).is_run()


def find_run_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself when it is one), in sorted order; a run
    directory's own subdirectories are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise LtlibError(f"sweep directory {str(root)!r} does not exist")
    found = []
    for current, dirs, _files in os.walk(root):
        path = Path(current)
        if _is_run_dir(path):
            found.append(path)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def expected_jobs(multirun_yaml: str | os.PathLike[str]) -> list[list[str]] | None:
    """The override lists of every job a Hydra multirun planned (basic sweeper: the sweeper's params and
    the command line's sweeps expanded), or None when it cannot be told (another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(multirun_yaml)
        sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_") or ""
        if not str(sweeper).endswith("BasicSweeper"):
            return None
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()]
        arguments += [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task") or []]
        parsed = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml: no expectations
        return None
    return [list(job) for batch in batches for job in batch]


def collect_runs(sweep_dirs: Sequence[str | os.PathLike[str]], split: str = "test",
                 aliases: Mapping[str, str] | None = None) -> list[RunRecord]:
    """Every run under the sweep directories, plus the multirun jobs that never started."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    records: list[RunRecord] = []
    for sweep_dir in sweep_dirs:
        run_dirs = find_run_dirs(sweep_dir)
        records += [read_run(d, split, aliases) for d in run_dirs]
        for multirun in sorted(Path(sweep_dir).rglob("multirun.yaml")):
            planned = expected_jobs(multirun)
            if planned is None:
                continue
            seen = [sorted(r.overrides) for r in records if Path(r.run_dir).parent == multirun.parent]
            for job in planned:
                if sorted(job) in seen:
                    seen.remove(sorted(job))
                else:
                    records.append(RunRecord(str(multirun.parent), "not_started",
                                             "planned by the multirun but no run directory", overrides=job))
    if not records:
        raise LtlibError(f"no runs (directories with results.json or .hydra/) under {', '.join(map(str, sweep_dirs))}")
    return records


# ------------------------------------------------------------------------------------ the cells
@dataclass
class Cell:
    """Runs of one setting and their statistics (accuracies in %)."""

    method: str
    variant: dict[str, Any]
    dataset: str
    imbalance_ratio: float | None
    backbone: str | None
    epochs: int | None
    setting: dict[str, Any]
    runs: list[RunRecord]
    other: dict[str, Any] = field(default_factory=dict)
    published: list[PublishedResult] = field(default_factory=list)
    #: why no published number matches the cell (None when one does)
    published_reason: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "ok"]

    @property
    def label(self) -> str:
        """The method and the options it changed from its defaults, e.g. ``bbn [adaptor=linear_decay]``."""
        return self.method + (f" [{format_variant(self.variant)}]" if self.variant else "")

    @property
    def name(self) -> str:
        """:attr:`label` plus the settings that tell it from cells of the same method, data and backbone."""
        return self.label + (f" ({format_variant(self.other)})" if self.other else "")

    def stats(self, key: str) -> tuple[float, float, int]:
        """``(mean, sample std, n)`` of a metric over the finished runs, in % (NaN when undefined; the
        std needs two runs)."""
        values = np.array([100.0 * r.metrics[key] for r in self.ok if r.metrics.get(key) is not None])
        if not len(values):
            return math.nan, math.nan, 0
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)


def _cell_key(record: RunRecord) -> str:
    return json.dumps([record.method, record.setting], sort_keys=True, default=str)


def build_cells(records: Iterable[RunRecord], any_backbone: bool = False) -> list[Cell]:
    """Group runs into cells (equal settings up to seeds) and attach the published numbers."""
    grouped: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.groupable and record.status != "not_started":
            grouped.setdefault(_cell_key(record), []).append(record)
    cells = []
    for runs in grouped.values():
        first = runs[0]
        variant = method_variant(str(first.method), first.method_config)
        cell = Cell(str(first.method), variant, str(first.dataset), first.imbalance_ratio, first.backbone,
                    first.epochs, first.setting, runs, recipe=dict(first.recipe))
        if cell.dataset not in published_datasets():
            cell.published_reason = unknown_dataset_reason(cell.dataset)
        else:
            match = match_published(cell.method, cell.dataset, cell.imbalance_ratio,
                                    backbone=None if any_backbone else cell.backbone,
                                    method_config=first.method_config, variant_keys=variant, recipe=first.recipe)
            cell.published, cell.published_reason = match.results, match.reason
        cells.append(cell)
    # Settings that differ between cells of the same method, data and backbone are shown with the cell.
    families: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        families.setdefault((cell.label, cell.dataset, cell.imbalance_ratio, cell.backbone), []).append(cell)
    for family in families.values():
        if len(family) < 2:
            continue
        keys = sorted({k for c in family for k in c.setting})
        differing = [k for k in keys if len({json.dumps(c.setting.get(k), default=str) for c in family}) > 1]
        for cell in family:
            cell.other = {k: cell.setting.get(k) for k in differing}
    cells.sort(key=lambda c: (c.dataset, -1.0 if c.imbalance_ratio is None else -c.imbalance_ratio,
                              c.backbone or "", c.label, json.dumps(c.other, default=str)))
    return cells


#: Data configs whose data.name says nothing of which dataset it is: the published datasets they
#: most often hold, for the alias hint.
_GENERIC_DATASETS = {"filelist": "imagenet_lt", "folder": "cifar10_lt"}


def unknown_dataset_reason(dataset: str) -> str:
    """Why a cell on a dataset the papers do not name has no published number, and how to name it."""
    known = ", ".join(published_datasets())
    if dataset in _GENERIC_DATASETS:
        return (f"dataset {dataset!r} unknown: pass --alias {dataset}={_GENERIC_DATASETS[dataset]} (published "
                f"datasets: {known}) or set data.name")
    return (f"dataset {dataset!r} has no published numbers (published datasets: {known}; for a copy of one of "
            f"them pass --alias {dataset}=DATASET or set data.name)")


# ------------------------------------------------------------------------------------ the outputs
def _short_source(result: PublishedResult) -> str:
    table = result.table.split(" (")[0].replace("Table ", "T")
    return f"{_PAPER_NAMES.get(result.paper, result.paper)} {table}"


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _ratio_text(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:g}"


def _runs_text(cell: Cell) -> str:
    ok = len(cell.ok)
    if ok == len(cell.runs):
        return f"{ok}"
    others = Counter("failed" if r.status in ("unreadable", "no_metrics") else r.status for r in cell.runs
                     if r.status != "ok")
    return f"{ok}/{len(cell.runs)} (" + ", ".join(f"{n} {status}" for status, n in sorted(others.items())) + ")"


def _published_for(cell: Cell, metric: str) -> list[PublishedResult]:
    return [p for p in cell.published if _PUBLISHED_TO_OURS.get(p.accuracy_metric) == metric]


def _note_text(result: PublishedResult) -> str:
    """A published value's note with what it is about: ``FBL T2 "LDAM-DRW ..." cifar100_lt IR 50: ...``."""
    return (f"{_short_source(result)} \"{result.label}\", {result.dataset} IR {_ratio_text(result.imbalance_ratio)}, "
            f"{result.accuracy_metric}: {result.note}")


def published_notes(cells: Sequence[Cell]) -> list[str]:
    """The notes of the published values the cells use, each once, in order of first use."""
    notes: list[str] = []
    for cell in cells:
        for result in cell.published:
            if result.note and _note_text(result) not in notes:
                notes.append(_note_text(result))
    return notes


def report_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One flat dict per cell: identity, run counts, mean / std / n per metric, seeds, and for every
    published source matched anywhere in the report ``published <metric> (<source>)`` and
    ``delta <metric> (<source>)`` (ours - published, %), ``published_reason`` (why none matched) and
    ``published_notes`` (the notes of the matched values)."""
    sources = sorted({(_short_source(p), p.accuracy_metric) for c in cells for p in c.published})
    rows = []
    for cell in cells:
        row: dict[str, Any] = {
            "method": cell.method, "variant": format_variant(cell.variant), "dataset": cell.dataset,
            "imbalance_ratio": cell.imbalance_ratio, "backbone": cell.backbone, "epochs": cell.epochs,
            "other_settings": format_variant(cell.other), "schedule": cell.recipe.get("schedule"),
            "milestones": None if cell.recipe.get("milestones") is None else json.dumps(cell.recipe["milestones"]),
            "runs_ok": len(cell.ok),
            "runs_failed": len(cell.runs) - len(cell.ok),
            "seeds": "; ".join(json.dumps(r.seeds, sort_keys=True) for r in cell.ok),
        }
        for key in METRICS:
            mean, std, n = cell.stats(key)
            row.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_n": n})
        for source, metric in sources:
            ours_key = _PUBLISHED_TO_OURS[metric]
            match = [p for p in cell.published if _short_source(p) == source and p.accuracy_metric == metric]
            value = match[0].accuracy if match else math.nan
            row[f"published {metric} ({source})"] = value
            row[f"delta {metric} ({source})"] = cell.stats(ours_key)[0] - value if match else math.nan
        row["published_reason"] = cell.published_reason or ""
        row["published_notes"] = " | ".join(dict.fromkeys(_note_text(p) for p in cell.published if p.note))
        rows.append(row)
    return rows


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in columns})
    return buffer.getvalue()


def missing_records(records: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status != "ok"]


def report_markdown(cells: Sequence[Cell], records: Sequence[RunRecord], split: str = "test",
                    sweep_dirs: Sequence[str] = ()) -> str:
    """The report as markdown: the cell table with published numbers, then the missing or failed runs."""
    lines = ["# ltlib comparison report", ""]
    if sweep_dirs:
        lines += [f"Runs under {', '.join(f'`{d}`' for d in sweep_dirs)}; accuracies (%) on the {split} split, "
                  "mean ± sample std over the runs of a cell (seeds); *published*: the paper's number for the same "
                  "method, dataset, imbalance ratio, backbone and training recipe (epochs, lr schedule and "
                  "milestones; paper and table), Δ = ours − published.", ""]
    lines.append("| method | dataset | IR | backbone | epochs | runs | top-1 | mean class | many | medium | few "
                 "| published top-1 | Δ top-1 |")
    lines.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    notes = published_notes(cells)

    def marker(p: PublishedResult) -> str:
        return f" [note {notes.index(_note_text(p)) + 1}]" if p.note else ""

    for cell in cells:
        label = cell.name
        stats = {key: cell.stats(key) for key in METRICS}
        published = _published_for(cell, "top1")
        ours = stats["top1"][0]
        pub_text = "; ".join(f"{p.accuracy:.2f} ({_short_source(p)}){marker(p)}" for p in published) or "–"
        delta_text = "; ".join("–" if math.isnan(ours) else f"{ours - p.accuracy:+.2f}" for p in published) or "–"
        lines.append(f"| {label} | {cell.dataset} | {_ratio_text(cell.imbalance_ratio)} | {cell.backbone or '–'} | "
                     f"{cell.epochs if cell.epochs is not None else '–'} | {_runs_text(cell)} | "
                     + " | ".join(_fmt(m, s) for m, s, _ in stats.values()) + f" | {pub_text} | {delta_text} |")
    shot_published = [(c, p) for c in cells for p in c.published if p.accuracy_metric in ("many", "medium", "few")]
    if shot_published:
        lines += ["", "Published many / medium / few-shot accuracy for the same cells:", "",
                  "| method | dataset | source | metric | published | ours | Δ |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for cell, p in shot_published:
            ours = cell.stats(_PUBLISHED_TO_OURS[p.accuracy_metric])[0]
            delta = "–" if math.isnan(ours) else f"{ours - p.accuracy:+.2f}"
            lines.append(f"| {cell.label} | {cell.dataset} | {_short_source(p)}{marker(p)} | {p.accuracy_metric} | "
                         f"{p.accuracy:.2f} | {_fmt(ours, math.nan)} | {delta} |")
    if notes:
        lines += ["", "Notes on published values:", ""]
        lines += [f"{k}. {note}" for k, note in enumerate(notes, 1)]
    unmatched = [c for c in cells if c.published_reason]
    if unmatched:
        lines += ["", f"## Cells without a published number ({len(unmatched)})", "",
                  "| method | dataset | IR | backbone | epochs | why |", "| --- | --- | ---: | --- | ---: | --- |"]
        for cell in unmatched:
            lines.append(f"| {cell.name} | {cell.dataset} | {_ratio_text(cell.imbalance_ratio)} | "
                         f"{cell.backbone or '–'} | {cell.epochs if cell.epochs is not None else '–'} | "
                         f"{cell.published_reason} |")
    missing = missing_records(records)
    lines += ["", f"## Missing or failed runs ({len(missing)})", ""]
    if not missing:
        lines.append("None: every run finished and has its metrics.")
    else:
        lines += ["| run directory | status | reason | method | dataset | IR | overrides |",
                  "| --- | --- | --- | --- | --- | ---: | --- |"]
        for r in missing:
            lines.append(f"| `{r.run_dir}` | {r.status} | {r.reason} | {r.method or '–'} | {r.dataset or '–'} | "
                         f"{_ratio_text(r.imbalance_ratio)} | `{' '.join(r.overrides)}` |")
    sources = sorted({(p.paper, p.table, p.caption) for c in cells for p in c.published})
    if sources:
        from ltlib.analysis.published import papers

        info = papers()
        lines += ["", "## Published sources", ""]
        for paper, table, caption in sources:
            meta = info.get(paper, {})
            lines.append(f"* {_PAPER_NAMES.get(paper, paper)} {table}: {caption} — {meta.get('authors', '')}, "
                         f"\"{meta.get('title', paper)}\", {meta.get('venue') or 'venue not stated in the paper'}")
    return "\n".join(lines) + "\n"


def plot_report(cells: Sequence[Cell], path: str | os.PathLike[str] | None = None) -> Figure:
    """Top-1 mean ± std per cell as horizontal bars, one panel per dataset and imbalance ratio, the
    published numbers as markers (one marker shape per paper)."""
    panels: dict[tuple[str, float | None], list[Cell]] = {}
    for cell in cells:
        panels.setdefault((cell.dataset, cell.imbalance_ratio), []).append(cell)
    if not panels:
        raise LtlibError("no cells to plot")
    heights = [0.32 * len(group) + 1.4 for group in panels.values()]
    longest = max(len(c.name) + len(c.backbone or "") for c in cells)
    figure = Figure(figsize=(6.0 + 0.06 * min(longest, 90), sum(heights)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    markers = {"bbn": "D", "fbl": "^", "two_head": "s"}
    for ax, ((dataset, ratio), group) in zip(axes, panels.items(), strict=True):
        y = np.arange(len(group))[::-1]
        stats = [c.stats("top1") for c in group]
        ax.barh(y, [s[0] for s in stats], xerr=[0.0 if math.isnan(s[1]) else s[1] for s in stats], capsize=3,
                color="#4C72B0", alpha=0.85, label="ours (mean ± std)")
        seen: set[str] = set()
        for yi, cell in zip(y, group, strict=True):
            for p in _published_for(cell, "top1"):
                label = None if p.paper in seen else f"published ({_PAPER_NAMES.get(p.paper, p.paper)})"
                seen.add(p.paper)
                ax.scatter([p.accuracy], [yi], marker=markers.get(p.paper, "o"), color="black", zorder=3, s=25,
                           label=label)
        ax.set_yticks(y, [c.name + (f" · {c.backbone}" if c.backbone else "") for c in group], fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.set_title(f"{dataset}" + ("" if ratio is None else f", imbalance ratio {ratio:g}"), fontsize=10)
        ax.legend(fontsize="x-small", loc="lower right")
    if path is not None:
        save_figure(figure, path)
    return figure


def write_report(sweep_dirs: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str] | None = None, *,
                 split: str = "test", aliases: Mapping[str, str] | None = None, any_backbone: bool = False
                 ) -> tuple[list[Cell], list[RunRecord], list[Path]]:
    """Collect the runs, build the cells and write ``report.md``, ``report.csv``, ``report.png`` and
    ``report_missing.csv``; returns ``(cells, records, files)``."""
    if not sweep_dirs:
        raise LtlibError("no sweep directory given")
    records = collect_runs(sweep_dirs, split, aliases)
    cells = build_cells(records, any_backbone)
    out = Path(output_dir) if output_dir is not None else Path(sweep_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / REPORT_MD, out / REPORT_CSV, out / MISSING_CSV]
    files[0].write_text(report_markdown(cells, records, split, [str(d) for d in sweep_dirs]))
    files[1].write_text(_csv_text(report_rows(cells)))
    missing = [{"run_dir": r.run_dir, "status": r.status, "reason": r.reason, "method": r.method,
                "dataset": r.dataset, "imbalance_ratio": r.imbalance_ratio, "overrides": " ".join(r.overrides)}
               for r in missing_records(records)]
    files[2].write_text(_csv_text(missing, ["run_dir", "status", "reason", "method", "dataset", "imbalance_ratio",
                                            "overrides"]))
    if cells:
        files.append(out / REPORT_PNG)
        plot_report(cells, files[-1])
    return cells, records, files

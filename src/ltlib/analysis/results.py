"""Results of a run on disk and on the console: ``results.json``, ``per_class.csv``, a per-class plot.

Accuracies are stored as fractions in [0, 1], never percentages; only the console table and the
plot show percentages. Values that are undefined (the accuracy of a class or shot group without
evaluation samples, NaN in :class:`~ltlib.metrics.LongTailMetrics`) are ``null`` in JSON and empty
cells in the CSV.

Every file is written atomically: to a temporary file in the same directory, then moved into place
with ``os.replace``, so an interrupted run never leaves a half-written file. ``results.json`` is
written last and marks a complete set.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

import ltlib
from ltlib.errors import LtlibError
from ltlib.io import atomic_write_text, atomic_writer
from ltlib.metrics import SHOT_NAMES, shot_name
from ltlib.runs import RESULTS_JSON

PER_CLASS_CSV = "per_class.csv"
PER_CLASS_PLOT = "per_class_accuracy.png"

SUMMARY_KEYS: tuple[str, ...] = ("top1", "mean_class_acc", "many_acc", "medium_acc", "few_acc", "num_samples")
_RESERVED_KEYS = frozenset({"ltlib_version", "method", "config", "splits", "metrics", "per_class", "confusion"})
_DEFAULT_SPLIT_SOURCES = {
    "val": "balanced validation split (checkpoint selection)",
    "test": "official test set, evaluated once",
}
_SHOT_COLORS = {"many": "#4C72B0", "medium": "#DD8452", "few": "#C44E52"}


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively to plain JSON-compatible Python.

    Tensors and arrays become (nested) lists, numpy scalars Python scalars, ``DictConfig`` and
    ``ListConfig`` resolved containers, paths strings, enums their names, tuples lists and dict keys
    strings. Non-finite floats (NaN, +-inf) become ``None``, i.e. ``null`` in JSON.
    """
    if isinstance(obj, (DictConfig, ListConfig)):
        return to_jsonable(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        obj = (obj.double() if obj.is_floating_point() else obj).numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        # vectorised: a 1000-class confusion matrix is a million elements
        if obj.dtype.kind == "f":
            return np.where(np.isfinite(obj), obj, None).tolist()
        if obj.dtype.kind in "biu":
            return obj.tolist()
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON: {obj!r}")


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (the analysis modules' one way to write plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if figure.canvas is None or not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    with atomic_writer(path) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return path


def _to_numpy(value: Any) -> np.ndarray:
    """A tensor, array or list as a float64 numpy array on the host."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64)
    return np.asarray(value, dtype=np.float64)


def _group_means(per_class_acc: np.ndarray, shots: Sequence[str]) -> dict[str, float]:
    """Mean per-class accuracy of each shot group over its classes with samples (NaN if none)."""
    means = {}
    for name in SHOT_NAMES:
        values = per_class_acc[[shot == name for shot in shots]]
        values = values[~np.isnan(values)]
        means[name] = float(values.mean()) if len(values) else math.nan
    return means


def _split_summary(split: str, result: Mapping[str, Any], shots: Sequence[str]) -> dict[str, Any]:
    """The scalar summary of one split. Shot accuracies missing from ``result`` (a metric built
    without ``class_counts``) are derived from ``per_class_acc``; present ones must agree with it."""
    missing = {"top1", "mean_class_acc", "per_class_acc", "num_samples"} - result.keys()
    if missing:
        raise LtlibError(f"metrics[{split!r}] lacks {sorted(missing)}; expected a LongTailMetrics.compute() dict")
    per_class_acc = _to_numpy(result["per_class_acc"])
    if per_class_acc.shape != (len(shots),):
        raise LtlibError(
            f"metrics[{split!r}]['per_class_acc'] has shape {per_class_acc.shape}; expected ({len(shots)},)"
        )
    summary = {key: to_jsonable(result.get(key)) for key in SUMMARY_KEYS}
    for name, mean in _group_means(per_class_acc, shots).items():
        key = f"{name}_acc"
        if key not in result:
            summary[key] = to_jsonable(mean)
        elif not np.isclose(_to_numpy(result[key]), mean, rtol=1e-6, atol=0, equal_nan=True):
            raise LtlibError(
                f"metrics[{split!r}][{key!r}]={float(result[key]):.6g} disagrees with the per-class mean "
                f"{mean:.6g} of the {name}-shot classes; were the metric's shot thresholds different?"
            )
    return summary


def write_results(
    output_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | DictConfig,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    metrics: Mapping[str, Mapping[str, Any]],
    split_info: Mapping[str, Any],
    method: str,
    extra: Mapping[str, Any] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    metric_variants: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``per_class.csv`` and ``per_class_accuracy.png`` into ``output_dir``.

    ``metrics`` maps a split name (``"val"``, ``"test"``) to a ``LongTailMetrics.compute()`` dict.
    ``metric_variants`` maps an option (``"prediction"``) to ``{rule: {split: LongTailMetrics.compute()}}``
    of every evaluation rule of that option (a method's ``last_variant_metrics``); each becomes a key
    ``metrics_by_<option>`` of ``results.json``: ``{rule: {split: summary + per_class_acc}}``, the summary
    as in ``metrics``.
    ``split_info`` describes the splits (sizes, subset hash; ``split_info[split]["source"]``, when
    present, is shown in the console table). ``extra`` adds top-level keys to ``results.json``.
    Returns the JSON payload as written (NaN as ``None``).
    """
    if len(class_names) != len(class_counts):
        raise LtlibError(f"{len(class_names)} class names but {len(class_counts)} class counts; expected one each")
    if not metrics:
        raise LtlibError("metrics is empty; expected at least one split, e.g. {'test': ...}")
    variant_keys = {f"metrics_by_{group}" for group in (metric_variants or {})}
    clash = (_RESERVED_KEYS | variant_keys) & set(extra or {})
    if clash:
        raise LtlibError(f"extra uses reserved results.json keys {sorted(clash)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    shots = [shot_name(int(c), many_threshold, few_threshold) for c in class_counts]
    summaries = {split: _split_summary(split, result, shots) for split, result in metrics.items()}
    per_class_acc = {split: to_jsonable(_to_numpy(result["per_class_acc"])) for split, result in metrics.items()}
    per_class = [
        {
            "class": i,
            "name": str(name),
            "train_count": int(count),
            "shot": shots[i],
            **{f"{split}_acc": accs[i] for split, accs in per_class_acc.items()},
        }
        for i, (name, count) in enumerate(zip(class_names, class_counts, strict=True))
    ]
    payload = {
        "ltlib_version": ltlib.__version__,
        "method": method,
        "config": to_jsonable(config),
        "splits": to_jsonable(split_info),
        "metrics": summaries,
        "per_class": per_class,
        "confusion": {
            split: to_jsonable(result["confusion"]) for split, result in metrics.items() if "confusion" in result
        },
        **{f"metrics_by_{group}": {
            name: {split: {**_split_summary(f"{name}/{split}", result, shots),
                           "per_class_acc": to_jsonable(_to_numpy(result["per_class_acc"]))}
                   for split, result in by_split.items()}
            for name, by_split in by_name.items()}
           for group, by_name in (metric_variants or {}).items()},
        **to_jsonable(dict(extra or {})),
    }

    atomic_write_text(out / PER_CLASS_CSV, _per_class_csv(per_class, list(metrics)))
    plot_split = "test" if "test" in metrics else list(metrics)[-1]
    figure = _per_class_figure(
        per_class, plot_split, summaries[plot_split], method, many_threshold=many_threshold, few_threshold=few_threshold
    )
    with atomic_writer(out / PER_CLASS_PLOT) as handle:
        figure.savefig(handle, format="png", dpi=120)
    text = _format_json(payload) + "\n"
    atomic_write_text(out / RESULTS_JSON, text)
    return payload


def _format_json(obj: Any, level: int = 0) -> str:
    """JSON with one line per flat list or dict (a confusion-matrix row, a per-class entry) and
    indentation above, so a 1000-class matrix stays compact yet readable."""
    nested = isinstance(obj, (dict, list)) and any(
        isinstance(v, (dict, list)) for v in (obj.values() if isinstance(obj, dict) else obj)
    )
    if not nested:
        return json.dumps(obj, allow_nan=False)
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {_format_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{inner}{_format_json(v, level + 1)}" for v in obj]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"


def read_results(path_or_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``results.json`` given its path or the run directory holding it."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / RESULTS_JSON
    if not path.is_file():
        raise LtlibError(f"no results file at {str(path)!r}")
    with path.open() as handle:
        return json.load(handle)


def _per_class_csv(per_class: list[dict[str, Any]], splits: list[str]) -> str:
    """The per-class rows as CSV text; undefined accuracies are empty cells."""
    columns = ["class", "name", "train_count", "shot", *(f"{split}_acc" for split in splits)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in per_class:
        writer.writerow({key: "" if row[key] is None else row[key] for key in columns})
    return buffer.getvalue()


def _per_class_figure(
    per_class: list[dict[str, Any]],
    split: str,
    summary: Mapping[str, Any],
    method: str,
    *,
    many_threshold: int,
    few_threshold: int,
) -> Figure:
    """Bars of per-class accuracy over classes sorted by training count (descending), with the counts
    as a log-scale line and the many/medium/few groups shaded."""
    rows = sorted(per_class, key=lambda row: (-row["train_count"], row["class"]))
    x = np.arange(len(rows))
    accs = np.array([np.nan if row[f"{split}_acc"] is None else row[f"{split}_acc"] for row in rows])
    shots = [row["shot"] for row in rows]

    figure = Figure(figsize=(max(8.0, min(20.0, 0.25 * len(rows))), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    group_rules = {
        "many": f"> {many_threshold}",
        "medium": f"{few_threshold}–{many_threshold}",
        "few": f"< {few_threshold}",
    }
    bar_width = 0.8 if len(rows) <= 100 else 1.0
    handles = []
    for name in SHOT_NAMES:
        members = [i for i, shot in enumerate(shots) if shot == name]
        if not members:
            continue
        lo, hi = members[0] - 0.5, members[-1] + 0.5
        ax.axvspan(lo, hi, color=_SHOT_COLORS[name], alpha=0.12, linewidth=0)
        ax.text((lo + hi) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                color=_SHOT_COLORS[name], fontweight="bold")
        ax.bar(x[members], accs[members], width=bar_width, color=_SHOT_COLORS[name])
        mean = summary.get(f"{name}_acc")
        mean_text = "–" if mean is None else f"{100 * mean:.1f}%"
        label = f"{name} ({group_rules[name]} images, {len(members)} classes): mean {mean_text}"
        handles.append(Patch(color=_SHOT_COLORS[name], label=label))
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(f"{split} accuracy")
    if len(rows) <= 40:
        ax.set_xticks(x, [row["name"] for row in rows], rotation=90, fontsize=7)
        ax.set_xlabel("class (sorted by training count)")
    else:
        ax.set_xlabel("class rank by training count")

    counts_ax = ax.twinx()
    (count_line,) = counts_ax.plot(x, [max(row["train_count"], 1) for row in rows], color="black", linewidth=1.5)
    counts_ax.set_yscale("log")
    counts_ax.set_ylabel("training images (log scale)")
    count_line.set_label("training images")
    handles.append(count_line)

    top1, mean_class = summary.get("top1"), summary.get("mean_class_acc")
    title = f"{method}: per-class {split} accuracy"
    if top1 is not None and mean_class is not None:
        title += f" (top-1 {100 * top1:.1f}%, mean class {100 * mean_class:.1f}%)"
    ax.set_title(title)
    figure.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return figure


def _dataset_name(payload: Mapping[str, Any]) -> str | None:
    """The dataset's name from the payload, the split info or the config, where one is recorded."""
    candidates = [payload.get("dataset"), (payload.get("splits") or {}).get("dataset")]
    data_cfg = (payload.get("config") or {}).get("data")
    if isinstance(data_cfg, Mapping):
        candidates.append(data_cfg.get("name"))
    return next((str(c) for c in candidates if c), None)


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def print_results_table(payload: Mapping[str, Any], console: Console | None = None) -> Table:
    """Print one row per split (top-1, mean class, many/medium/few accuracy in percent), plus one per split and
    alternative evaluation rule of ``metrics_by_<option>`` (the configured rule is the split's row); return
    the table."""
    method = payload.get("method", "?")
    dataset = _dataset_name(payload)
    title = f"{method} on {dataset}" if dataset else str(method)
    table = Table(title=f"{title} · accuracy (%)")
    table.add_column("split", style="bold")
    for header in ("top-1", "mean class", "many", "medium", "few", "samples"):
        table.add_column(header, justify="right")

    metrics: Mapping[str, Mapping[str, Any]] = payload.get("metrics", {})
    order = {"train": 0, "val": 1, "test": 2}
    splits = sorted(metrics, key=lambda s: order.get(s, len(order)))
    split_info = payload.get("splits") or {}
    captions = []
    method_cfg = (payload.get("config") or {}).get("method")
    method_cfg = method_cfg if isinstance(method_cfg, Mapping) else {}
    variants = {key.removeprefix("metrics_by_"): value for key, value in payload.items()
                if key.startswith("metrics_by_") and isinstance(value, Mapping)}
    for split in splits:
        rows = [(split, metrics[split])]
        for group, by_name in variants.items():
            # the configured rule is the split's own row; one more row per other rule
            rows += [(f"{split} · {name}", by_split[split]) for name, by_split in by_name.items()
                     if name != method_cfg.get(group) and split in by_split]
        for label, row in rows:
            samples = row.get("num_samples")
            table.add_row(
                label,
                *(_percent(row.get(key)) for key in SUMMARY_KEYS[:-1]),
                "–" if samples is None else str(samples),
            )
        info = split_info.get(split)
        source = info.get("source") if isinstance(info, Mapping) else None
        source = source or _DEFAULT_SPLIT_SOURCES.get(split)
        if source:
            captions.append(f"{split}: {source}")
    for group, by_name in variants.items():
        others = [name for name in by_name if name != method_cfg.get(group)]
        configured = f"{', '.join(splits)}: {group}={method_cfg[group]} (configured); " if group in method_cfg else ""
        captions.append(configured + "; ".join(f"· {name}: {group}={name}" for name in others))
    if captions:
        table.caption = "\n".join(captions)
    (console or Console()).print(table)
    return table

"""The numbers the BBN, FBL and two-head papers report, with the table and paper of each.

The values live in ``ltlib/data_files/published_results.yaml``, one block per paper table laid out
as in the paper (rows, value columns), so a transcription can be checked against the paper line by
line. :func:`published_results` flattens them into :class:`PublishedResult` records;
:func:`find_published` looks up the ones that correspond to a run (method and its options, dataset,
imbalance ratio, backbone), which is what ``python -m ltlib.report`` puts next to a sweep's numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ltlib.errors import LtlibError

DATA_FILE = "published_results.yaml"
#: metric names of the data file: error and top-1 are overall (%), the rest per shot group or class (%).
METRICS = ("error", "top1", "many", "medium", "few", "class_acc")


@dataclass(frozen=True)
class PublishedResult:
    """One number of one paper table.

    ``value`` is as printed (percent); ``metric`` says what it is (``error`` = top-1 error rate).
    ``method`` is the ltlib method config that trains the row (None where ltlib has none or the paper
    leaves the variant open), ``params`` the method options that select the row's variant, ``setting``
    a note for rows trained off the paper's recipe (not matched automatically).
    """

    paper: str
    table: str
    label: str
    method: str | None
    dataset: str
    imbalance_ratio: float | None
    backbone: str | None
    metric: str
    value: float
    params: Mapping[str, Any] = field(default_factory=dict)
    class_index: int | None = None
    setting: str | None = None
    caption: str = ""

    @property
    def accuracy(self) -> float:
        """The value as an accuracy in percent (``100 - error`` for error rates)."""
        return 100.0 - self.value if self.metric == "error" else self.value

    @property
    def accuracy_metric(self) -> str:
        """The metric of :attr:`accuracy`: ``top1`` for error rates, else :attr:`metric`."""
        return "top1" if self.metric == "error" else self.metric

    @property
    def source(self) -> str:
        """``"<paper> <table>"``, e.g. ``"bbn Table 1"``."""
        return f"{self.paper} {self.table}"


@functools.lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    text = resources.files("ltlib").joinpath("data_files", DATA_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def papers() -> dict[str, dict[str, str]]:
    """Paper id -> ``{"title", "authors", "venue"}``."""
    return {key: dict(value) for key, value in _raw()["papers"].items()}


def _ratio(value: Any) -> float | None:
    return None if value is None else float(value)


@functools.lru_cache(maxsize=1)
def _flatten() -> tuple[PublishedResult, ...]:
    results = []
    for table in _raw()["tables"]:
        table_keys = {k: v for k, v in table.items() if k not in ("columns", "rows", "paper", "table", "caption")}
        for row in table["rows"]:
            values = row["values"]
            if len(values) != len(table["columns"]):
                raise LtlibError(f"{DATA_FILE}: {table['paper']} {table['table']} row {row['label']!r} has "
                                 f"{len(values)} values for {len(table['columns'])} columns")
            row_keys = {k: v for k, v in row.items() if k not in ("label", "method", "params", "values", "setting")}
            for column, value in zip(table["columns"], values, strict=True):
                if value is None:
                    continue
                keys = {**table_keys, **column, **row_keys}
                metric = keys.get("metric")
                if metric not in METRICS:
                    raise LtlibError(f"{DATA_FILE}: unknown metric {metric!r} in {table['paper']} {table['table']}")
                results.append(PublishedResult(
                    paper=table["paper"], table=table["table"], label=str(row["label"]), method=row.get("method"),
                    dataset=str(keys["dataset"]), imbalance_ratio=_ratio(keys.get("imbalance_ratio")),
                    backbone=keys.get("backbone"), metric=metric, value=float(value),
                    params=dict(row.get("params") or {}), class_index=keys.get("class"),
                    setting=row.get("setting"), caption=str(table.get("caption", "")),
                ))
    return tuple(results)


def published_results() -> list[PublishedResult]:
    """Every transcribed number, table by table, row by row, column by column."""
    return list(_flatten())


def _same_ratio(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b))


def find_published(method: str, dataset: str, imbalance_ratio: float | None, *, backbone: str | None = None,
                   method_config: Mapping[str, Any] | None = None, variant_keys: Iterable[str] = (),
                   metrics: Iterable[str] = ("top1", "many", "medium", "few")) -> list[PublishedResult]:
    """The published numbers for a cell: same ltlib ``method``, ``dataset`` and ``imbalance_ratio``,
    and ``backbone`` unless it is None (any backbone).

    A row with ``params`` matches when ``method_config`` (the run's resolved ``config.method``) has those
    values; ``variant_keys`` are the method options the run changed from the method's defaults, and
    every one of them must be pinned by the row's ``params`` (so a BBN run with the uniform
    re-balancing sampler matches table 3's "Uniform sampler" row, not table 1's "Our BBN"). Rows with
    a ``setting`` are never matched. ``metrics`` filters by :attr:`PublishedResult.accuracy_metric`.
    """
    config = dict(method_config or {})
    variant = set(variant_keys)
    wanted = set(metrics)
    found = []
    for result in _flatten():
        if result.method != method or result.setting or result.dataset != dataset:
            continue
        if result.accuracy_metric not in wanted or not _same_ratio(result.imbalance_ratio, imbalance_ratio):
            continue
        if backbone is not None and result.backbone is not None and result.backbone != backbone:
            continue
        if not variant <= set(result.params):
            continue
        if any(k not in config or config[k] != v for k, v in result.params.items()):
            continue
        found.append(result)
    return found

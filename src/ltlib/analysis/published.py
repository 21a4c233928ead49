"""The numbers the BBN, FBL and two-head papers report, with the table and paper of each.

The values live in ``ltlib/data_files/published_results.yaml``, one block per paper table laid out
as in the paper (rows, value columns), so a transcription can be checked against the paper line by
line. :func:`published_results` flattens them into :class:`PublishedResult` records;
:func:`find_published` looks up the ones that correspond to a run (method and its options, dataset,
imbalance ratio, backbone and training recipe: epochs, lr schedule and milestones), which is what
``python -m ltlib.report`` puts next to a sweep's numbers; :func:`match_published` also says why
nothing matched.
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
#: recipe keys of the data file, in the order they are checked: trainer.max_epochs, optim.schedule,
#: optim.milestones.
RECIPE_KEYS = ("max_epochs", "schedule", "milestones")
#: A published milestone matches a run's within this many epochs: "decayed at the 120th epoch" is
#: milestone 119 or 120 depending on whether epochs are counted from 1 (official codes) or 0 (ltlib).
MILESTONE_TOLERANCE = 1


@dataclass(frozen=True)
class PublishedResult:
    """One number of one paper table.

    ``value`` is as printed (percent); ``metric`` says what it is (``error`` = top-1 error rate).
    ``method`` is the ltlib method config that trains the row (None where ltlib has none or the paper
    leaves the variant open), ``params`` the method options that select the row's variant, ``recipe``
    what the paper states of the training (``max_epochs``, ``schedule``, ``milestones``; a key it does
    not state is absent), ``note`` a remark on the value (shown by the report), ``setting`` how ltlib
    would train a row without a method.
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
    recipe: Mapping[str, Any] = field(default_factory=dict)
    note: str | None = None

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


def implementation_options(method: str) -> frozenset[str]:
    """Method options that choose how ``method`` is implemented, not which published row it trains (the
    data file's ``implementation_options``: its ``"*"`` entry and the method's own)."""
    table = _raw().get("implementation_options") or {}
    return frozenset([*(table.get("*") or []), *(table.get(method) or [])])


def method_note(method: str) -> str | None:
    """The data file's ``method_notes`` entry of a method, if any: added to the reason a run meets no
    published number when the method has none or the run's method options leave none."""
    note = (_raw().get("method_notes") or {}).get(method)
    return None if note is None else " ".join(str(note).split())


def _ratio(value: Any) -> float | None:
    return None if value is None else float(value)


def _recipe(where: str, *layers: Any) -> dict[str, Any]:
    """Table, column and row ``recipe`` mappings merged in that order (a null value removes a key)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, Mapping):
            raise LtlibError(f"{DATA_FILE}: {where}: recipe {layer!r} is not a mapping")
        unknown = set(layer) - set(RECIPE_KEYS)
        if unknown:
            raise LtlibError(f"{DATA_FILE}: {where}: unknown recipe keys {sorted(unknown)}; known: {list(RECIPE_KEYS)}")
        merged.update(layer)
    recipe = {k: v for k, v in merged.items() if v is not None}
    if "milestones" in recipe:
        recipe["milestones"] = [int(m) for m in recipe["milestones"]]
    if "max_epochs" in recipe:
        recipe["max_epochs"] = int(recipe["max_epochs"])
    return recipe


def _notes(where: str, row: Mapping[str, Any], count: int) -> list[str | None]:
    """The note of each value of a row: the row's ``note`` and the value's entry of ``notes``."""
    per_value = row.get("notes")
    if per_value is None:
        per_value = [None] * count
    if not isinstance(per_value, list) or len(per_value) != count:
        raise LtlibError(f"{DATA_FILE}: {where}: notes must list one entry (or null) per value")
    notes = []
    for value_note in per_value:
        parts = [" ".join(str(n).split()) for n in (row.get("note"), value_note) if n]
        notes.append("; ".join(parts) or None)
    return notes


@functools.lru_cache(maxsize=1)
def _flatten() -> tuple[PublishedResult, ...]:
    results = []
    for table in _raw()["tables"]:
        table_keys = {k: v for k, v in table.items()
                      if k not in ("columns", "rows", "paper", "table", "caption", "recipe")}
        for row in table["rows"]:
            values = row["values"]
            where = f"{table['paper']} {table['table']} row {row['label']!r}"
            if len(values) != len(table["columns"]):
                raise LtlibError(f"{DATA_FILE}: {where} has {len(values)} values for {len(table['columns'])} columns")
            row_keys = {k: v for k, v in row.items()
                        if k not in ("label", "method", "params", "value_params", "values", "setting", "recipe", "note",
                                     "notes")}
            notes = _notes(where, row, len(values))
            value_params = row.get("value_params") or [None] * len(values)
            if not isinstance(value_params, list) or len(value_params) != len(values):
                raise LtlibError(f"{DATA_FILE}: {where}: value_params must list one entry (or null) per value")
            for column, value, note, extra in zip(table["columns"], values, notes, value_params, strict=True):
                if value is None:
                    continue
                recipe = _recipe(where, table.get("recipe"), column.get("recipe"), row.get("recipe"))
                keys = {**table_keys, **{k: v for k, v in column.items() if k != "recipe"}, **row_keys}
                metric = keys.get("metric")
                if metric not in METRICS:
                    raise LtlibError(f"{DATA_FILE}: unknown metric {metric!r} in {table['paper']} {table['table']}")
                results.append(PublishedResult(
                    paper=table["paper"], table=table["table"], label=str(row["label"]), method=row.get("method"),
                    dataset=str(keys["dataset"]), imbalance_ratio=_ratio(keys.get("imbalance_ratio")),
                    backbone=keys.get("backbone"), metric=metric, value=float(value),
                    params={**(row.get("params") or {}), **(extra or {})}, class_index=keys.get("class"),
                    setting=row.get("setting"), caption=str(table.get("caption", "")),
                    recipe=recipe, note=note,
                ))
    return tuple(results)


def published_results() -> list[PublishedResult]:
    """Every transcribed number, table by table, row by row, column by column."""
    return list(_flatten())


def _same_ratio(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b))


def published_datasets() -> list[str]:
    """The datasets (ltlib data names) the data file has numbers for, in order of first appearance."""
    return list(dict.fromkeys(r.dataset for r in _flatten()))


def _recipe_matches(key: str, published: Any, ours: Any) -> bool:
    if key == "milestones":
        ours = sorted(int(m) for m in ours)
        return len(ours) == len(published) and all(abs(a - b) <= MILESTONE_TOLERANCE
                                                   for a, b in zip(ours, sorted(published), strict=True))
    return published == ours


def _recipe_value(key: str, value: Any) -> str:
    return str([int(m) for m in value]) if key == "milestones" else str(value)


def _recipe_text(key: str, value: Any) -> str:
    """``200 epochs``, ``lr schedule cosine``, ``lr milestones [120, 160]``."""
    text = _recipe_value(key, value)
    return {"max_epochs": f"{text} epochs", "schedule": f"lr schedule {text}"}.get(key, f"lr milestones {text}")


def _listing(values: Iterable[Any]) -> str:
    unique: list[str] = []
    for value in values:
        if str(value) not in unique:
            unique.append(str(value))
    return ", ".join(unique)


@dataclass(frozen=True)
class PublishedMatch:
    """What :func:`match_published` found: the numbers, or why there are none (``reason``)."""

    results: list[PublishedResult]
    reason: str | None = None


def match_published(method: str, dataset: str, imbalance_ratio: float | None, *, backbone: str | None = None,
                    method_config: Mapping[str, Any] | None = None, variant_keys: Iterable[str] = (),
                    metrics: Iterable[str] = ("top1", "many", "medium", "few"),
                    recipe: Mapping[str, Any] | None = None) -> PublishedMatch:
    """The published numbers of a cell (as :func:`find_published`) and, when there are none, the first
    condition that left none, in words, e.g. ``no published bbn result on cifar10_lt for 10 epochs
    (published: 200)``. The conditions are checked in the order method, dataset, imbalance ratio,
    backbone, method options, epochs, lr schedule, milestones."""
    config = dict(method_config or {})
    variant = set(variant_keys) - implementation_options(method)
    wanted = set(metrics)
    recipe = dict(recipe or {})
    ratio_text = "none" if imbalance_ratio is None else f"{imbalance_ratio:g}"
    candidates = [r for r in _flatten() if r.method == method and r.accuracy_metric in wanted]
    if not candidates:
        note = method_note(method)
        return PublishedMatch([], f"no published number for method {method}" + (f" ({note})" if note else ""))

    def ratio_of(r: PublishedResult) -> str:
        return "none" if r.imbalance_ratio is None else f"{r.imbalance_ratio:g}"

    def variant_text() -> str:
        ours = ", ".join(f"{k}={config.get(k)}" for k in sorted(variant)) or "the default options"
        published = _listing(", ".join(f"{k}={v}" for k, v in sorted(r.params.items())) or "the defaults"
                             for r in candidates)
        note = method_note(method)
        return (f"no published {method} result on {dataset} with {ours} (published: {published})"
                + (f"; {note}" if note else ""))

    steps: list[tuple[Any, Any]] = [
        (lambda r: r.dataset == dataset,
         lambda: f"no published number for method {method} on {dataset} "
                 f"(published: {_listing(r.dataset for r in candidates)})"),
        (lambda r: _same_ratio(r.imbalance_ratio, imbalance_ratio),
         lambda: f"no published {method} result on {dataset} with imbalance ratio {ratio_text} "
                 f"(published: {_listing(ratio_of(r) for r in candidates)})"),
        (lambda r: backbone is None or r.backbone is None or r.backbone == backbone,
         lambda: f"no published {method} result on {dataset} with backbone {backbone} "
                 f"(published: {_listing(r.backbone for r in candidates)})"),
        (lambda r: variant <= set(r.params) and all(k in config and config[k] == v for k, v in r.params.items()),
         variant_text),
    ]
    for key in RECIPE_KEYS:
        ours = recipe.get(key)
        if ours is None or (key == "milestones" and recipe.get("schedule") not in (None, "multistep")):
            continue
        steps.append((
            lambda r, key=key, ours=ours: key not in r.recipe or _recipe_matches(key, r.recipe[key], ours),
            lambda key=key, ours=ours: (
                f"no published {method} result on {dataset} for {_recipe_text(key, ours)} (published: "
                + _listing(_recipe_value(key, r.recipe[key]) for r in candidates if key in r.recipe) + ")"),
        ))
    for keep, reason in steps:
        kept = [r for r in candidates if keep(r)]
        if not kept:
            return PublishedMatch([], reason())
        candidates = kept
    return PublishedMatch(candidates)


def find_published(method: str, dataset: str, imbalance_ratio: float | None, *, backbone: str | None = None,
                   method_config: Mapping[str, Any] | None = None, variant_keys: Iterable[str] = (),
                   metrics: Iterable[str] = ("top1", "many", "medium", "few"),
                   recipe: Mapping[str, Any] | None = None) -> list[PublishedResult]:
    """The published numbers for a cell: same ltlib ``method``, ``dataset`` and ``imbalance_ratio``,
    ``backbone`` unless it is None (any backbone), and a training ``recipe`` that agrees.

    A row with ``params`` matches when ``method_config`` (the run's resolved ``config.method``) has those
    values; ``variant_keys`` are the method options the run changed from the method's defaults, and
    every one of them must be pinned by the row's ``params`` (so a BBN run with the uniform
    re-balancing sampler matches table 3's "Uniform sampler" row, not table 1's "Our BBN"), except the
    method's :func:`implementation_options`. ``recipe`` holds the run's ``max_epochs`` (trainer),
    ``schedule`` and ``milestones`` (optim); every key a number's recipe states must agree (milestones
    within :data:`MILESTONE_TOLERANCE` epochs, compared for multistep runs only). A key missing from
    ``recipe`` (``recipe=None``: all) is not checked. Rows without a method are never matched.
    ``metrics`` filters by :attr:`PublishedResult.accuracy_metric`.
    """
    return match_published(method, dataset, imbalance_ratio, backbone=backbone, method_config=method_config,
                           variant_keys=variant_keys, metrics=metrics, recipe=recipe).results

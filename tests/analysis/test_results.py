"""results.json, per_class.csv, the per-class plot and the console table."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

import ltlib
from ltlib.analysis import print_results_table, read_results, to_jsonable, write_results
from ltlib.errors import LtlibError
from ltlib.metrics import LongTailMetrics

NAN = float("nan")
CLASS_NAMES = ["cat", "dog", "bird", "frog", "ship"]
CLASS_COUNTS = [500, 150, 100, 20, 19]  # many, many, medium, medium, few
SPLIT_INFO = {
    "dataset": "toy_lt",
    "val": {"size": 40, "source": "balanced validation split (checkpoint selection)"},
    "test": {"size": 50, "source": "official test set, evaluated once"},
}


def _metrics() -> dict[str, dict[str, torch.Tensor]]:
    """Hand-made LongTailMetrics.compute() dicts; "val" has no frog or ship sample (few_acc is NaN)."""
    val_acc = torch.tensor([0.9, 0.8, 0.5, NAN, NAN], dtype=torch.float64)
    test_acc = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.125], dtype=torch.float64)
    return {
        "val": {
            "top1": torch.tensor(0.7875, dtype=torch.float64),
            "per_class_acc": val_acc,
            "mean_class_acc": torch.tensor(0.7333, dtype=torch.float64),
            "many_acc": torch.tensor(0.85, dtype=torch.float64),
            "medium_acc": torch.tensor(0.5, dtype=torch.float64),
            "few_acc": torch.tensor(NAN, dtype=torch.float64),
            "confusion": torch.arange(25).view(5, 5),
            "num_samples": torch.tensor(40),
        },
        "test": {
            "top1": torch.tensor(0.6123, dtype=torch.float64),
            "per_class_acc": test_acc,
            "mean_class_acc": test_acc.mean(),
            "many_acc": torch.tensor(0.875, dtype=torch.float64),
            "medium_acc": torch.tensor(0.375, dtype=torch.float64),
            "few_acc": torch.tensor(0.125, dtype=torch.float64),
            "confusion": torch.eye(5, dtype=torch.int64) * 10,
            "num_samples": torch.tensor(50),
        },
    }


def _write(out: Path, **overrides: object) -> dict:
    kwargs = {
        "config": OmegaConf.create({"method": {"name": "ce"}, "data": {"name": "toy_lt", "ratio": 100}}),
        "class_names": CLASS_NAMES,
        "class_counts": CLASS_COUNTS,
        "metrics": _metrics(),
        "split_info": SPLIT_INFO,
        "method": "ce",
        "extra": {"best_epoch": np.int64(7), "train_time_s": np.float32(1.5)},
    }
    kwargs.update(overrides)
    return write_results(out, **kwargs)


def _strict_json(text: str) -> dict:
    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_results_json_fields_equal_inputs(tmp_path: Path) -> None:
    payload = _write(tmp_path)
    on_disk = _strict_json((tmp_path / "results.json").read_text())
    assert on_disk == payload == read_results(tmp_path) == read_results(tmp_path / "results.json")

    assert on_disk["ltlib_version"] == ltlib.__version__
    assert on_disk["method"] == "ce"
    assert on_disk["config"] == {"method": {"name": "ce"}, "data": {"name": "toy_lt", "ratio": 100}}
    assert on_disk["splits"] == SPLIT_INFO
    assert on_disk["best_epoch"] == 7 and on_disk["train_time_s"] == 1.5
    assert on_disk["metrics"]["val"] == {
        "top1": 0.7875, "mean_class_acc": 0.7333, "many_acc": 0.85, "medium_acc": 0.5, "few_acc": None,
        "num_samples": 40,
    }
    assert on_disk["metrics"]["test"]["few_acc"] == 0.125
    assert on_disk["per_class"][0] == {
        "class": 0, "name": "cat", "train_count": 500, "shot": "many", "val_acc": 0.9, "test_acc": 1.0,
    }
    assert [row["shot"] for row in on_disk["per_class"]] == ["many", "many", "medium", "medium", "few"]
    assert [row["val_acc"] for row in on_disk["per_class"]] == [0.9, 0.8, 0.5, None, None]
    assert on_disk["confusion"]["val"] == torch.arange(25).view(5, 5).tolist()
    assert on_disk["confusion"]["test"][2] == [0, 0, 10, 0, 0]


def test_per_class_csv_rows(tmp_path: Path) -> None:
    _write(tmp_path)
    with (tmp_path / "per_class.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["class", "name", "train_count", "shot", "val_acc", "test_acc"]
    assert [row["name"] for row in rows] == CLASS_NAMES
    assert [int(row["train_count"]) for row in rows] == CLASS_COUNTS
    assert [row["shot"] for row in rows] == ["many", "many", "medium", "medium", "few"]
    assert [row["val_acc"] for row in rows] == ["0.9", "0.8", "0.5", "", ""]
    assert [float(row["test_acc"]) for row in rows] == [1.0, 0.75, 0.5, 0.25, 0.125]


def test_plot_is_a_png(tmp_path: Path) -> None:
    _write(tmp_path)
    data = (tmp_path / "per_class_accuracy.png").read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_write_leaves_no_results_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no results.json, no temporary files


def test_failed_rewrite_keeps_previous_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    real_replace = os.replace

    def fail_on_results(src: str, dst: str | Path) -> None:
        if Path(dst).name == "results.json":
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_results)
    with pytest.raises(OSError, match="killed"):
        _write(tmp_path, method="other")
    assert (tmp_path / "results.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_class.csv", "per_class_accuracy.png", "results.json"]


def test_print_results_table_renders_percentages(tmp_path: Path) -> None:
    payload = _write(tmp_path)
    console = Console(record=True, width=120)
    table = print_results_table(payload, console=console)
    text = console.export_text()
    assert table.row_count == 2
    assert "ce on toy_lt" in text
    for value in ("78.75", "73.33", "85.00", "50.00", "61.23", "87.50", "37.50", "12.50"):
        assert value in text
    val_line = next(line for line in text.splitlines() if line.strip("│ ").startswith("val"))
    assert "–" in val_line  # few-shot accuracy is undefined on val
    assert text.index("val") < text.index("test")
    words = " ".join(text.split())  # the caption may wrap
    assert "val: balanced validation split (checkpoint selection)" in words
    assert "test: official test set, evaluated once" in words


def test_metric_variants_become_metrics_by_option_and_table_rows(tmp_path: Path) -> None:
    config = OmegaConf.create({"method": {"name": "two_head", "prediction": "max_logit"}, "data": {"name": "toy_lt"}})
    other = _metrics()["test"] | {"top1": torch.tensor(0.5, dtype=torch.float64)}
    variants = {"prediction": {"max_logit": _metrics(), "sum_prob": {"test": other}}}
    payload = _write(tmp_path, config=config, metric_variants=variants)
    by_rule = _strict_json((tmp_path / "results.json").read_text())["metrics_by_prediction"]
    assert by_rule == payload["metrics_by_prediction"] and set(by_rule) == {"max_logit", "sum_prob"}
    for split in ("val", "test"):
        assert {k: v for k, v in by_rule["max_logit"][split].items() if k != "per_class_acc"} == payload["metrics"][split]
    assert by_rule["sum_prob"]["test"]["top1"] == 0.5 and set(by_rule["sum_prob"]) == {"test"}
    assert by_rule["max_logit"]["val"]["per_class_acc"] == [0.9, 0.8, 0.5, None, None]
    console = Console(record=True, width=160)
    table = print_results_table(payload, console=console)
    text = console.export_text()
    assert table.row_count == 3 and "test · sum_prob" in text and "50.00" in text  # one row per other rule
    assert "val, test: prediction=max_logit (configured); · sum_prob: prediction=sum_prob" in " ".join(text.split())
    with pytest.raises(LtlibError, match="reserved"):
        _write(tmp_path, metric_variants=variants, extra={"metrics_by_prediction": 1})


def test_shot_accuracies_derived_when_metric_has_no_class_counts(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(5, (200,), generator=gen)
    logits = torch.randn(200, 5, generator=gen)
    plain, grouped = LongTailMetrics(5), LongTailMetrics(5, CLASS_COUNTS)
    for metric in (plain, grouped):
        metric.update(logits, targets)
    payload = _write(tmp_path, metrics={"test": plain.compute()})
    expected = grouped.compute()
    for key in ("top1", "mean_class_acc", "many_acc", "medium_acc", "few_acc"):
        assert payload["metrics"]["test"][key] == pytest.approx(expected[key].item(), rel=1e-12)
    assert payload["metrics"]["test"]["num_samples"] == 200


def test_invalid_inputs(tmp_path: Path) -> None:
    with pytest.raises(LtlibError, match="4 class names but 5 class counts"):
        _write(tmp_path, class_names=CLASS_NAMES[:4])
    with pytest.raises(LtlibError, match="reserved"):
        _write(tmp_path, extra={"metrics": 1})
    with pytest.raises(LtlibError, match="thresholds"):
        _write(tmp_path, many_threshold=160)
    with pytest.raises(LtlibError, match="no results file"):
        read_results(tmp_path / "missing")
    assert not (tmp_path / "results.json").exists()


def test_to_jsonable() -> None:
    converted = to_jsonable({
        "tensor": torch.tensor([1.0, NAN]),
        "matrix": np.arange(4).reshape(2, 2),
        "scalar": np.float32(0.5),
        "int": torch.tensor(3),
        "inf": math.inf,
        "cfg": OmegaConf.create({"a": [1, {"b": "${c}"}], "c": 2}),
        1: (np.bool_(True), Path("x/y")),
    })
    assert converted == {
        "tensor": [1.0, None], "matrix": [[0, 1], [2, 3]], "scalar": 0.5, "int": 3, "inf": None,
        "cfg": {"a": [1, {"b": 2}], "c": 2}, "1": [True, "x/y"],
    }
    json.dumps(converted, allow_nan=False)
    with pytest.raises(TypeError, match="object"):
        to_jsonable(object())

"""ltlib.report on hand-made sweeps (mean ± std, cells, published numbers, missing and failed runs) and the
published numbers' data file (its transcription checked across the papers and against ltlib's configs)."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from ltlib import report
from ltlib.data.samplers import list_samplers
from ltlib.published import find_published, published_results
from ltlib.run import config_dir
from ltlib.schedules import list_schedules

CONFIGS = Path(config_dir())


def base_config(method: str, *, dataset: str = "cifar10_lt", ratio: float | None = 100, seed: int = 0,
                backbone: str = "resnet32", **method_options) -> dict:
    """A resolved run config as ltlib.run writes it (the parts the report reads, plus paths and devices)."""
    method_config = copy.deepcopy(report.default_method_config(method))
    method_config.update(method_options)
    return {
        "method": method_config,
        "backbone": {"_target_": "ltlib.backbones.create_backbone", "name": backbone},
        "optim": {"lr": 0.1, "warmup_epochs": 5, "milestones": [120, 160]},
        "trainer": {"max_epochs": 200, "accelerator": "gpu", "devices": 1},
        "data": {"name": dataset, "imbalance_ratio": ratio, "subset_seed": 0, "seed": seed,
                 "root": f"/data/{seed}", "num_workers": 2},
        "logger": {"save_dir": f"/somewhere/{seed}"},
        "run_name": f"2026-01-0{seed + 1}_10-00-00",
        "resume": "auto",
        "seed": seed,
    }


def write_run(run_dir: Path, method: str, top1: float | None, config: dict, overrides: list[str] | None = None,
              shots: tuple[float, float, float] = (0.9, 0.6, 0.3)) -> Path:
    run_dir.mkdir(parents=True)
    hydra = run_dir / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides or [f"method={method}"]))
    (hydra / "config.yaml").write_text(yaml.safe_dump(config))
    (hydra / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"method": method}}}}))
    if top1 is not None:
        metrics = {"top1": top1, "mean_class_acc": top1 - 0.01, "many_acc": shots[0], "medium_acc": shots[1],
                   "few_acc": shots[2], "num_samples": 10000}
        (run_dir / "results.json").write_text(json.dumps({"method": method, "config": config,
                                                          "metrics": {"val": metrics, "test": metrics}}))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun of method=ce,bbn x seed=0,1,2 on CIFAR-10-LT IR 100: CE complete, BBN seed 1 failed
    (config written, no results), BBN seed 2 never started."""
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["method=ce,bbn", "seed=0,1,2", "data=cifar10_lt"]}}}))
    job = 0
    for method, top1s in (("ce", [0.70, 0.72, 0.75]), ("bbn", [0.80, None])):
        for seed, top1 in enumerate(top1s):
            write_run(root / f"{job}_{method}_cifar10_lt", method, top1, base_config(method, seed=seed),
                      [f"method={method}", f"seed={seed}", "data=cifar10_lt"])
            job += 1
    return root


def cell_of(cells, method: str, **where):
    (cell,) = [c for c in cells if c.method == method and all(getattr(c, k) == v for k, v in where.items())]
    return cell


def test_mean_and_std_over_seeds_with_published_numbers_and_missing_runs(sweep, tmp_path):
    cells, records, files = report.write_report([sweep], tmp_path / "out")
    ce = cell_of(cells, "ce")
    values = np.array([70.0, 72.0, 75.0])
    assert ce.stats("top1") == (pytest.approx(values.mean()), pytest.approx(values.std(ddof=1)), 3)
    assert ce.stats("mean_class_acc")[0] == pytest.approx(values.mean() - 1)
    assert [r.seeds["seed"] for r in ce.ok] == [0, 1, 2]
    assert {(p.source, round(p.accuracy, 2)) for p in ce.published} == {
        ("bbn Table 1", 70.36), ("fbl Table 2", 71.07), ("two_head Table 1", 70.36)}
    bbn = cell_of(cells, "bbn")
    assert len(bbn.runs) == 2 and len(bbn.ok) == 1
    mean, std, n = bbn.stats("top1")
    assert mean == pytest.approx(80.0) and math.isnan(std) and n == 1  # the std needs two runs

    statuses = sorted((r.status, Path(r.run_dir).name, " ".join(r.overrides)) for r in records if r.status != "ok")
    assert statuses == [("failed", "4_bbn_cifar10_lt", "method=bbn seed=1 data=cifar10_lt"),
                        ("not_started", "multirun", "method=bbn seed=2 data=cifar10_lt")]

    markdown = files[0].read_text()
    ce_line = next(line for line in markdown.splitlines() if line.startswith("| ce |"))
    assert "| 3 | 72.33 ± 2.52 | 71.33 ± 2.52 | 90.00 ± 0.00 |" in ce_line
    assert "70.36 (BBN T1)" in ce_line and "71.07 (FBL T2)" in ce_line and "70.36 (two-head T1)" in ce_line
    assert "+1.97" in ce_line and "+1.26" in ce_line
    bbn_line = next(line for line in markdown.splitlines() if line.startswith("| bbn |"))
    assert "| 1/2 (1 failed) | 80.00 |" in bbn_line and "79.82 (BBN T1)" in bbn_line and "+0.18" in bbn_line
    assert "## Missing or failed runs (2)" in markdown
    assert "not_started" in markdown and "method=bbn seed=2 data=cifar10_lt" in markdown

    with open(tmp_path / "out" / "report.csv") as handle:
        ce_row = next(row for row in csv.DictReader(handle) if row["method"] == "ce")
    assert float(ce_row["top1_mean"]) == pytest.approx(72.3333, abs=1e-3)
    assert float(ce_row["top1_std"]) == pytest.approx(2.5166, abs=1e-3)
    assert float(ce_row["delta top1 (FBL T2)"]) == pytest.approx(72.3333 - 71.07, abs=1e-3)
    missing = (tmp_path / "out" / "report_missing.csv").read_text().splitlines()
    assert len(missing) == 3 and missing[0].startswith("run_dir,status,reason")
    assert (tmp_path / "out" / "report.png").stat().st_size > 5000


def test_settings_split_cells_and_variants_pick_their_table(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "ce_a", "ce", 0.70, base_config("ce", seed=0))
    other_lr = base_config("ce", seed=1)
    other_lr["optim"]["lr"] = 0.05
    write_run(root / "ce_b", "ce", 0.60, other_lr)
    write_run(root / "bbn_uniform", "bbn", 0.785, base_config("bbn", ratio=50, rebalancing_sampler="uniform"))
    write_run(root / "bbn_default", "bbn", 0.82, base_config("bbn", ratio=50))
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    cells, records, _ = report.write_report([root], tmp_path / "out")

    ce_cells = [c for c in cells if c.method == "ce"]
    assert len(ce_cells) == 2 and {json.dumps(c.other) for c in ce_cells} == {'{"optim.lr": 0.1}', '{"optim.lr": 0.05}'}
    uniform = [c for c in cells if c.variant == {"rebalancing_sampler": "uniform"}]
    assert len(uniform) == 1 and uniform[0].label == "bbn [rebalancing_sampler=uniform]"
    assert [(p.source, p.label) for p in uniform[0].published] == [("bbn Table 3", "Uniform sampler")]
    assert uniform[0].published[0].accuracy == pytest.approx(100 - 21.31)
    default = cell_of(cells, "bbn", variant={})
    assert {p.source for p in default.published} == {"bbn Table 1", "bbn Table 3", "bbn Table 4",
                                                     "bbn Table 6 (supplementary C)", "fbl Table 2", "two_head Table 1"}
    assert {p.accuracy for p in default.published if p.paper == "fbl"} == {81.18}  # as printed in FBL table 2
    (broken,) = [r for r in records if r.status == "unreadable"]
    assert Path(broken.run_dir).name == "broken"


def test_aliases_and_backbones_decide_the_published_match(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "folder", "ce", 0.70, base_config("ce", dataset="folder"))
    write_run(root / "small", "ce", 0.65, base_config("ce", backbone="resnet20"))
    plain = report.build_cells(report.collect_runs([root]))
    assert all(not c.published for c in plain)
    aliased = report.build_cells(report.collect_runs([root], aliases={"folder": "cifar10_lt"}), any_backbone=True)
    assert len(aliased) == 2 and all({p.source for p in c.published} >= {"bbn Table 1", "fbl Table 2"} for c in aliased)


def test_expected_jobs_expand_the_sweeper_params_and_command_line(tmp_path):
    path = tmp_path / "multirun.yaml"
    path.write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"method": "ce,rw"}},
        "overrides": {"task": ["seed=0,1", "experiment=bbn_manners_cifar100"]}}}))
    jobs = report.expected_jobs(path)
    assert sorted(sorted(j) for j in jobs) == sorted(sorted([f"method={m}", f"seed={s}", "experiment=bbn_manners_cifar100"])
                                                     for m in ("ce", "rw") for s in (0, 1))
    path.write_text(yaml.safe_dump({"hydra": {"sweeper": {"_target_": "hydra_plugins.optuna.OptunaSweeper"}}}))
    assert report.expected_jobs(path) is None


def test_cli_writes_the_report_and_rejects_bad_input(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "-o", str(tmp_path / "r")]) == 0
    assert "| ce | cifar10_lt | 100 | resnet32 | 200 | 3 |" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert report.main([str(sweep), "--alias", "folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ltlib: error:") and "'folder'" in err[0]


# ------------------------------------------------------------------------------ published numbers
def values(paper: str, table: str, label: str) -> list[float]:
    return [r.value for r in published_results() if (r.paper, r.table, r.label) == (paper, table, label)]


def test_transcriptions_agree_across_the_papers():
    # The two-head paper quotes BBN's table 1 as accuracies (100 - error) for CE, Focal, Mixup, DRS and BBN.
    for bbn_label, two_head_label in (("CE", "CE"), ("Focal [17]", "Focal"), ("Mixup [32]", "Mixup"),
                                      ("CE-DRS [3]", "DRS"), ("Our BBN", "BBN")):
        errors = values("bbn", "Table 1", bbn_label)
        assert len(errors) == 6
        np.testing.assert_allclose([100 - e for e in errors], values("two_head", "Table 1", two_head_label), atol=1e-9)
    # FBL table 2 (CIFAR-10 100/50, CIFAR-100 100/50) against two-head table 1 (10 columns: 100/50/10 each)
    two_head_bbn = values("two_head", "Table 1", "BBN")
    fbl_bbn = values("fbl", "Table 2", "BBN [20] (CVPR 2020)")
    assert fbl_bbn == [two_head_bbn[0], 81.18, two_head_bbn[3], two_head_bbn[4]]  # 81.18 vs 82.18: as printed
    assert values("two_head", "Table 4", "FBH -, CDH -")[0::2] == values("two_head", "Table 1", "CE")[3:]
    assert values("two_head", "Table 4", "FBH yes, CDH yes")[0::2] == values("two_head", "Table 1", "Ours")[3:]
    assert values("two_head", "Table 4", "FBH yes, CDH yes")[1::2] == values("two_head", "Table 2", "Ours")
    assert values("bbn", "Table 3", "Reversed sampler (Ours)") == values("bbn", "Table 4",
                                                                         "Parabolic decay (Ours) 1 - (T/Tmax)^2") == [17.82]
    assert values("fbl", "Table 4", "Parabolic increase (t/T)^2") == [values("fbl", "Table 2", "FBL (ours)")[0]]
    assert values("fbl", "Table 5", "CE loss")[:10] == [91.0, 98.2, 83.2, 72.5, 78.8, 65.1, 68.8, 59.5, 49.0, 44.6]


def test_published_entries_name_real_methods_options_and_datasets():
    methods = {p.stem for p in (CONFIGS / "method").glob("*.yaml")}
    allowed_values = {"adaptor": set(list_schedules()), "schedule": set(list_schedules()),
                      "rebalancing_sampler": set(list_samplers()), "feature_balancing": {True, False},
                      "class_division": {True, False}}
    entries = published_results()
    assert len(entries) > 250
    for entry in entries:
        assert entry.paper in ("bbn", "fbl", "two_head")
        assert entry.dataset in {"cifar10_lt", "cifar100_lt", "tiny_imagenet_lt", "imagenet_lt", "places_lt",
                                 "inat2017", "inat2018"}
        assert 0 < entry.value < 100
        if entry.method is not None:
            assert entry.method in methods
            defaults = report.default_method_config(entry.method)
            for key, value in entry.params.items():
                assert key in defaults and value in allowed_values[key], (entry, key)
        if entry.dataset.startswith("cifar") or entry.dataset == "tiny_imagenet_lt":
            assert entry.imbalance_ratio in (10, 50, 100), entry
        else:
            assert entry.imbalance_ratio is None
    shots = {p.accuracy_metric: p.value for p in find_published("ce", "imagenet_lt", None, backbone="resnext50_32x4d")}
    assert shots == {"many": 65.9, "medium": 37.5, "few": 7.7, "top1": 44.4}
    assert not find_published("bbn", "inat2018", None, backbone="resnet50", variant_keys={"adaptor"})
    assert {p.value for p in find_published("bbn", "inat2018", None, backbone="resnet50")} == {33.71, 33.74}


def test_unfinished_runs_say_what_happened_to_them(tmp_path):
    """run_status.json tells a failed run (with its error), an interrupted one, a live one and one that was
    killed apart; the cell's runs column counts each kind."""
    import os
    import subprocess
    import sys

    from ltlib.run_status import write_run_status

    root = tmp_path / "sweep"
    for seed, top1 in enumerate([0.70, None, None, None, None]):
        write_run(root / f"{seed}_ce", "ce", top1, base_config("ce", seed=seed))
    write_run_status(root / "1_ce", "failed", "data.root='/nowhere' does not exist")
    write_run_status(root / "2_ce", "interrupted", "SIGTERM: stopped after step 120")
    write_run_status(root / "3_ce", "running")  # this test's own process: alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_run_status(root / "4_ce", "running")
    status_file = root / "4_ce" / "run_status.json"
    status_file.write_text(status_file.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead.stdout.strip()}'))

    records = {Path(r.run_dir).name: r for r in report.collect_runs([root])}
    assert (records["1_ce"].status, records["1_ce"].reason) == ("failed", "failed: data.root='/nowhere' does not exist")
    assert records["2_ce"].status == "interrupted" and "SIGTERM: stopped after step 120" in records["2_ce"].reason
    assert "rerun the same command to resume" in records["2_ce"].reason
    assert records["3_ce"].status == "running" and f"process {os.getpid()}" in records["3_ce"].reason
    assert records["4_ce"].status == "failed" and "stopped without finishing" in records["4_ce"].reason

    cells, _, files = report.write_report([root], tmp_path / "out")
    assert report._runs_text(cell_of(cells, "ce")) == "1/5 (2 failed, 1 interrupted, 1 running)"
    assert "failed: data.root='/nowhere' does not exist" in files[0].read_text()


def test_run_status_rejects_unknown_states_and_ignores_unreadable_files(tmp_path):
    from ltlib.run_status import describe_unfinished, read_run_status, write_run_status

    with pytest.raises(ValueError, match="unknown run status 'done'"):
        write_run_status(tmp_path, "done")
    (tmp_path / "run_status.json").write_text("{not json")
    assert read_run_status(tmp_path) is None
    assert describe_unfinished(tmp_path) == ("failed", "no results.json (the run failed or has not finished)")

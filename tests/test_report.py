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

from ltlib import report as report_cli
from ltlib.analysis import report
from ltlib.analysis.published import find_published, published_results
from ltlib.config import config_dir
from ltlib.data.samplers import list_samplers
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
        "optim": {"lr": 0.1, "warmup_epochs": 5, "schedule": "multistep", "milestones": [120, 160]},
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
    # the recipe decides too: FBL trained its CE baseline (71.07) with lr decays at 160 and 180, not 120 and 160
    assert {(p.source, round(p.accuracy, 2)) for p in ce.published} == {
        ("bbn Table 1", 70.36), ("two_head Table 1", 70.36)}
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
    assert "70.36 (BBN T1)" in ce_line and "70.36 (two-head T1)" in ce_line and "FBL" not in ce_line
    assert "+1.97" in ce_line
    bbn_line = next(line for line in markdown.splitlines() if line.startswith("| bbn |"))
    assert "| 1/2 (1 failed) | 80.00 |" in bbn_line and "79.82 (BBN T1)" in bbn_line and "+0.18" in bbn_line
    assert "## Missing or failed runs (2)" in markdown
    assert "not_started" in markdown and "method=bbn seed=2 data=cifar10_lt" in markdown

    with open(tmp_path / "out" / "report.csv") as handle:
        ce_row = next(row for row in csv.DictReader(handle) if row["method"] == "ce")
    assert float(ce_row["top1_mean"]) == pytest.approx(72.3333, abs=1e-3)
    assert float(ce_row["top1_std"]) == pytest.approx(2.5166, abs=1e-3)
    assert float(ce_row["delta top1 (two-head T1)"]) == pytest.approx(72.3333 - 70.36, abs=1e-3)
    assert ce_row["delta top1 (FBL T2)"] == "" and ce_row["published_reason"] == ""  # FBL T2 matches the BBN cell
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
    assert len(aliased) == 2 and all({p.source for p in c.published} >= {"bbn Table 1", "two_head Table 1"}
                                     for c in aliased)


def recipe_config(method: str, *, max_epochs: int, milestones: list[int], schedule: str = "multistep",
                  **kwargs) -> dict:
    """:func:`base_config` trained for ``max_epochs`` with the lr decays at ``milestones``."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("dataset", "ratio", "seed", "backbone")}
    config = base_config(method, **kwargs, **options)
    config["trainer"]["max_epochs"] = max_epochs
    config["optim"].update(schedule=schedule, milestones=milestones)
    return config


INAT18 = {"dataset": "inat2018", "ratio": None, "backbone": "resnet50"}


def test_the_recipe_decides_which_published_number_a_run_meets(tmp_path):
    """BBN on iNaturalist 2018 with the 2x schedule (experiment=bbn_inat_2x: 180 epochs, decays from the 120th
    and 160th epoch counted from 1, alpha horizon 200) meets table 2's "Our BBN (2x)" row, not the 1x row;
    the 1x run (90 epochs, 60 / 80) the 1x numbers only; runs off every published recipe meet nothing and
    the report says why."""
    root = tmp_path / "runs"
    write_run(root / "bbn_2x", "bbn", 0.69, recipe_config("bbn", max_epochs=180, milestones=[119, 159],
                                                          adaptor_epochs=200, **INAT18))
    write_run(root / "bbn_1x", "bbn", 0.66, recipe_config("bbn", max_epochs=90, milestones=[59, 79],
                                                          adaptor_epochs=100, **INAT18))
    write_run(root / "bbn_10_epochs", "bbn", 0.50, recipe_config("bbn", max_epochs=10, milestones=[6, 8]))
    write_run(root / "bbn_other_decays", "bbn", 0.78, recipe_config("bbn", max_epochs=200, milestones=[100, 150],
                                                                    dataset="cifar100_lt"))
    cells, _, files = report.write_report([root], tmp_path / "out")

    two_x = cell_of(cells, "bbn", epochs=180)
    # BBN table 2: "Our BBN ($2\times$)	30.38	34.25" (iNaturalist 2018, 2017; error rates)
    assert [(p.source, p.label, p.value) for p in two_x.published] == [("bbn Table 2", "Our BBN (2x)", 30.38)]
    one_x = cell_of(cells, "bbn", epochs=90)
    # BBN table 2: "Our BBN	33.71	36.61"; table 6: "BBN (Ours)	17.82	52.98	36.61	33.74" (iNaturalist 2018 last)
    assert sorted((p.source, p.label, p.value) for p in one_x.published) == [
        ("bbn Table 2", "Our BBN", 33.71), ("bbn Table 6 (supplementary C)", "BBN (Ours)", 33.74)]
    assert two_x.published_reason is None and one_x.published_reason is None
    short = cell_of(cells, "bbn", epochs=10)
    assert not short.published
    assert short.published_reason == "no published bbn result on cifar10_lt for 10 epochs (published: 200)"
    decays = cell_of(cells, "bbn", dataset="cifar100_lt")
    assert decays.published_reason == ("no published bbn result on cifar100_lt for lr milestones [100, 150] "
                                       "(published: [120, 160])")

    markdown = files[0].read_text()
    line_2x = next(line for line in markdown.splitlines() if line.startswith("| bbn [adaptor_epochs=200] |"))
    assert "| 69.62 (BBN T2) | -0.62 |" in line_2x
    assert "## Cells without a published number (2)" in markdown
    assert short.published_reason in markdown and decays.published_reason in markdown
    with open(files[1]) as handle:
        reasons = {row["epochs"]: row["published_reason"] for row in csv.DictReader(handle)}
    assert reasons == {"10": short.published_reason, "90": "", "180": "", "200": decays.published_reason}


def test_cb_focal_rows_are_cui_et_al_s_sigmoid_form(tmp_path):
    """BBN table 1's "CB-Focal [5]" and two-head table 1's "CB+Focal" quote Cui et al. [5] / [11], whose CB
    focal loss is the sigmoid one, cb_focal's default: a default cb_focal run meets them; a cb_focal run in
    LDAM-DRW's code's form (focal_form=ldam_code) meets none and is told why."""
    root = tmp_path / "runs"
    # experiment=bbn_table1_baselines method=cb_focal: Cui et al.'s code's decays at 160 and 180
    write_run(root / "sigmoid_preset", "cb_focal", 0.74,
              recipe_config("cb_focal", max_epochs=200, milestones=[160, 180]))
    # the CIFAR recipe of the two-head paper (section 3.1: decays at the 120th and 160th epoch)
    write_run(root / "sigmoid_cifar", "cb_focal", 0.73,
              recipe_config("cb_focal", max_epochs=200, milestones=[120, 160], seed=1))
    write_run(root / "ldam_code", "cb_focal", 0.72,
              recipe_config("cb_focal", max_epochs=200, milestones=[160, 180], seed=2,
                            focal_form="ldam_code", reduction="batch_mean"))
    cells = report.build_cells(report.collect_runs([root]))
    sigmoid = [c for c in cells if c.method == "cb_focal" and not c.variant]
    (preset,) = [c for c in sigmoid if c.recipe["milestones"] == [160, 180]]
    (cifar,) = [c for c in sigmoid if c.recipe["milestones"] == [120, 160]]
    # BBN table 1: "CB-Focal [5]	25.43	20.73	12.90	60.40	54.83	42.01" (CIFAR-10 IR 100 first)
    assert [(p.source, p.label, p.value) for p in preset.published] == [("bbn Table 1", "CB-Focal [5]", 25.43)]
    assert preset.published[0].accuracy == pytest.approx(74.57)
    # two-head table 1: "CB+Focal	RB+RB	74.57	79.27	87.49	39.60	45.32	57.99"
    assert sorted((p.source, p.label, p.value) for p in cifar.published) == [
        ("bbn Table 1", "CB-Focal [5]", 25.43), ("two_head Table 1", "CB+Focal", 74.57)]
    (ldam_code,) = [c for c in cells if c.method == "cb_focal" and c.variant]
    assert not ldam_code.published
    assert ldam_code.published_reason.startswith(
        "no published cb_focal result on cifar10_lt with focal_form=ldam_code (published: the defaults); ")
    assert "Cui et al.'s sigmoid form, cb_focal's default" in ldam_code.published_reason
    assert report.method_variant("cb_focal", preset.runs[0].method_config) == {}
    assert report.method_variant("cb_focal", ldam_code.runs[0].method_config) == {"focal_form": "ldam_code"}


def test_file_lists_meet_published_numbers_under_their_dataset_name(tmp_path):
    """data=filelist runs are named "filelist": no published number, with the way out; --alias or a
    data.name of their own puts them next to the dataset's numbers."""
    root = tmp_path / "runs"
    inat = {**INAT18, "dataset": "filelist"}
    write_run(root / "filelist", "bbn", 0.66, recipe_config("bbn", max_epochs=90, milestones=[60, 80], **inat))
    named = recipe_config("bbn", max_epochs=90, milestones=[60, 80], **INAT18, seed=1)  # data.name=inat2018
    write_run(root / "named", "bbn", 0.67, named)

    (plain_filelist, plain_named) = sorted(report.build_cells(report.collect_runs([root])), key=lambda c: c.dataset)
    assert plain_filelist.dataset == "filelist" and not plain_filelist.published
    assert plain_filelist.published_reason.startswith(
        "dataset 'filelist' unknown: pass --alias filelist=imagenet_lt (published datasets: cifar10_lt, cifar100_lt, ")
    assert plain_filelist.published_reason.endswith(") or set data.name")
    # BBN table 2: "Our BBN	33.71	36.61" (iNaturalist 2018, 2017)
    assert ("bbn Table 2", 33.71) in {(p.source, p.value) for p in plain_named.published}

    aliased = report.build_cells(report.collect_runs([root], aliases={"filelist": "inat2018"}))
    assert len(aliased) == 1 and len(aliased[0].runs) == 2  # the alias makes them one cell
    assert ("bbn Table 2", 33.71) in {(p.source, p.value) for p in aliased[0].published}

    assert report_cli.main([str(root), "-o", str(tmp_path / "cli")]) == 0
    with open(tmp_path / "cli" / "report.csv") as handle:
        rows = {row["dataset"]: row for row in csv.DictReader(handle)}
    assert rows["filelist"]["published_reason"] == plain_filelist.published_reason
    assert rows["inat2018"]["published_reason"] == ""
    markdown = (tmp_path / "cli" / "report.md").read_text()
    assert "dataset 'filelist' unknown: pass --alias filelist=imagenet_lt" in markdown


def test_a_published_value_s_note_is_shown_where_it_is_used(tmp_path):
    """FBL table 2 prints LDAM-DRW on CIFAR-100-LT IR 50 as 47.62; BBN table 1 gives the same result as
    53.38 % error (46.62 %): the value is kept as FBL prints it, with a note, in the markdown and the CSV."""
    root = tmp_path / "runs"
    # experiment=bbn_table1_baselines method=ldam_drw: LDAM-DRW's decays at 160 and 180 (FBL section 4.2 too)
    write_run(root / "ldam_drw", "ldam_drw", 0.47, recipe_config("ldam_drw", max_epochs=200, milestones=[160, 180],
                                                                 dataset="cifar100_lt", ratio=50))
    cells, _, files = report.write_report([root], tmp_path / "out")
    (cell,) = cells
    by_source = {p.source: p for p in cell.published}
    # FBL table 2: "LDAM-DRW [6] (<i>NeurIPS</i> 2019)	77.03	81.03	42.04	47.62" (CIFAR-100-LT IR 50 last)
    assert by_source["fbl Table 2"].value == 47.62 and "46.62" in by_source["fbl Table 2"].note
    # BBN table 1: "LDAM-DRW [3]	22.97	18.97	11.84	57.96	53.38	41.29" (CIFAR-100 IR 50 fifth)
    assert by_source["bbn Table 1"].value == 53.38 and by_source["bbn Table 1"].note is None
    markdown = files[0].read_text()
    assert "47.62 (FBL T2) [note 1]" in markdown and "46.62 (BBN T1); 47.62" in markdown
    note_line = next(line for line in markdown.splitlines() if line.startswith("1. FBL T2"))
    assert note_line.startswith('1. FBL T2 "LDAM-DRW [6] (NeurIPS 2019)", cifar100_lt IR 50, top1: as printed in FBL')
    assert "53.38 % error, i.e. 46.62 % accuracy" in note_line
    with open(files[1]) as handle:
        (row,) = list(csv.DictReader(handle))
    assert "46.62" in row["published_notes"] and row["published_notes"].startswith('FBL T2 "LDAM-DRW')
    # the other LDAM-DRW values of the row carry no note
    assert all(p.note is None for p in find_published("ldam_drw", "cifar100_lt", 100, backbone="resnet32"))


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
    assert report_cli.main([str(sweep), "-o", str(tmp_path / "r")]) == 0
    assert "| ce | cifar10_lt | 100 | resnet32 | 200 | 3 |" in capsys.readouterr().out
    assert report_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert report_cli.main([str(sweep), "--alias", "folder"]) == 2
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
                      "class_division": {True, False},
                      # the official codes' settings of FBL table 3 and two-head table 3 (their presets)
                      "lambda_": {150.0}, "freeze_trunk": {True}, "reset_last_block": {True}, "mixup_alpha": {0.2}}
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
    assert {p.value for p in find_published("bbn", "inat2018", None, backbone="resnet50")} == {33.71, 33.74, 30.38}
    assert {p.value for p in find_published("bbn", "inat2018", None, backbone="resnet50",
                                            recipe={"max_epochs": 90})} == {33.71, 33.74}


def test_recipes_and_notes_of_the_data_file_are_well_formed():
    from ltlib.analysis.published import RECIPE_KEYS, implementation_options

    method_options = {p.stem: set(report.default_method_config(p.stem) or {})
                      for p in (CONFIGS / "method").glob("*.yaml")}
    for entry in published_results():
        assert set(entry.recipe) <= set(RECIPE_KEYS), entry
        if entry.method is None:
            continue
        assert entry.setting is None, entry  # a setting only explains a row ltlib does not train
        assert isinstance(entry.recipe.get("max_epochs"), int), entry  # every matchable number has its epochs
        assert entry.recipe.get("schedule") in (None, "multistep", "cosine"), entry
        if "milestones" in entry.recipe:
            milestones = entry.recipe["milestones"]
            assert entry.recipe["schedule"] == "multistep" and milestones == sorted(milestones), entry
        for option in implementation_options(entry.method):
            assert option not in entry.params, (entry, option)
    for method, options in method_options.items():
        specific = implementation_options(method) - implementation_options("*")
        assert specific <= options, (method, specific - options)
    assert implementation_options("*") <= set().union(*method_options.values())
    noted = [(e.source, e.label, e.dataset, e.imbalance_ratio) for e in published_results() if e.note]
    assert ("fbl Table 2", "LDAM-DRW [6] (NeurIPS 2019)", "cifar100_lt", 50.0) in noted
    assert ("fbl Table 2", "LDAM-DRW [6] (NeurIPS 2019)", "cifar100_lt", 100.0) not in noted


# (preset overrides, method, rows the run must meet, rows it must not meet)
@pytest.mark.parametrize("overrides,method,expected,absent", [
    (["experiment=bbn_table1_cifar10"], "bbn", {("bbn Table 1", "Our BBN")}, set()),
    (["experiment=bbn_table1_baselines", "method=cb_focal"], "cb_focal",
     {("bbn Table 1", "CB-Focal [5]")}, set()),
    (["experiment=bbn_inat"], "bbn", {("bbn Table 2", "Our BBN"), ("bbn Table 6 (supplementary C)", "BBN (Ours)")},
     {("bbn Table 2", "Our BBN (2x)")}),
    (["experiment=bbn_inat_2x"], "bbn", {("bbn Table 2", "Our BBN (2x)")},
     {("bbn Table 2", "Our BBN"), ("bbn Table 6 (supplementary C)", "BBN (Ours)")}),
    (["experiment=fbl_table2"], "fbl", {("fbl Table 2", "FBL (ours)")}, set()),
    (["experiment=fbl_table3_places_lt"], "fbl", {("fbl Table 3", "FBL (ours)")}, set()),
    (["experiment=two_head_table3_imagenet_lt", "method=ce"], "ce", {("two_head Table 3", "CE")}, set()),
    (["experiment=two_head_full_table3_imagenet_lt"], "two_head_full", {("two_head Table 3", "Ours-Full")}, set()),
])
def test_each_preset_meets_its_own_table_row(overrides, method, expected, absent, tmp_path):
    """The resolved config of a table's preset, read as the report reads a run, meets that table's row
    (and, for the 2x schedule, not the 1x row)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from ltlib.analysis.study import compose_run_config
    from ltlib.config import restored_hydra_state

    cfg = compose_run_config([*overrides, "data.root=/data"], tmp_path / "run")
    with restored_hydra_state():
        HydraConfig.instance().set_config(cfg)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "logger", "callbacks")])
        config = OmegaConf.to_container(task, resolve=True)
    write_run(tmp_path / "run", method, 0.5, config)
    (cell,) = report.build_cells(report.collect_runs([tmp_path / "run"]))
    found = {(p.source, p.label) for p in cell.published}
    assert expected <= found and not absent & found, (found, cell.published_reason)


def test_unfinished_runs_say_what_happened_to_them(tmp_path):
    """run_status.json tells a failed run (with its error), an interrupted one, a live one and one that was
    killed apart; the cell's runs column counts each kind."""
    import os
    import subprocess
    import sys

    from ltlib.runs import write_run_status

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
    from ltlib.runs import describe_unfinished, read_run_status, write_run_status

    with pytest.raises(ValueError, match="unknown run status 'done'"):
        write_run_status(tmp_path, "done")
    (tmp_path / "run_status.json").write_text("{not json")
    assert read_run_status(tmp_path) is None
    assert describe_unfinished(tmp_path) == ("failed", "no results.json (the run failed or has not finished)")

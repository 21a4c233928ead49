"""The decoupled study end to end on the embedded digits (1 epoch, resnet20): one 3 x 3 smoke study is
shared by the tests (module fixture). The grid's cells come from the right stage-1 / stage-2 runs,
re-running reuses finished jobs, the transfer variant and the subprocess runner, ltlib.analyze and
ltlib.report on the study's runs, bad inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from tests.conftest import run_cli

from ltlib import analyze as analyze_cli
from ltlib import study as study_cli
from ltlib.analysis import report, study
from ltlib.errors import LtlibError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

COMMON = ["backbone=resnet20", "trainer.max_epochs=1", "optim.warmup_epochs=0"]
STAGE1_MANNERS = {"ce": ("uniform", "none"), "rw": ("uniform", "inverse_frequency"), "rs": ("class_balanced", "none")}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> Path:
    """``python -m ltlib.study decoupled`` with the in-process runner; stage 2 with its own batch size."""
    out = tmp_path_factory.mktemp("study") / "decoupled"
    proc = run_cli("decoupled", "--runner", "inprocess", "--output-dir", str(out), *COMMON,
                   "--stage2", "data.batch_size=32", module="ltlib.study")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **RS** |" in proc.stdout
    return out


def results(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_grid_cells_come_from_the_right_stage1_and_stage2_runs(smoke_study):
    manifest = json.loads((smoke_study / "study.json").read_text())
    jobs = manifest["jobs"]
    assert [j["stage"] for j in jobs] == ["stage1"] * 3 + ["stage2"] * 9
    assert all(j["status"] == "trained" for j in jobs)
    selected = {}
    for job in jobs[:3]:
        payload = results(job["run_dir"])
        sampler, weighting = STAGE1_MANNERS[job["representation"]]
        assert payload["method"] == job["representation"]
        assert (payload["config"]["method"]["sampler"], payload["config"]["method"]["class_weighting"]) == (sampler,
                                                                                                           weighting)
        assert payload["config"]["data"]["batch_size"] == 64  # the --stage2 override stays out of stage 1
        selected[job["representation"]] = (Path(job["run_dir"]) / payload["checkpoint"]).resolve()

    pairs = set()
    for job in jobs[3:]:
        rep, clf = job["representation"], job["classifier"]
        pairs.add((rep, clf))
        assert Path(job["run_dir"]) == smoke_study / "stage2" / "same" / f"repr-{rep}_clf-{clf}"
        config = results(job["run_dir"])["config"]
        assert config["method"]["_target_"] == "ltlib.methods.crt.ClassifierRetraining"
        assert Path(config["method"]["stage1_checkpoint"]) == selected[rep]
        assert (config["method"]["sampler"], config["method"]["class_weighting"]) == study.CLASSIFIER_MANNERS[clf]
        assert config["data"]["batch_size"] == 32
        # the stage-2 model holds the stage-1 representation bit for bit, and a classifier of its own
        stage1 = state_dict(selected[rep])
        stage2 = state_dict(Path(job["run_dir"]) / results(job["run_dir"])["checkpoint"])
        backbone = [k for k in stage1 if k.startswith("backbone.")]
        assert backbone and all(torch.equal(stage1[k], stage2[k]) for k in backbone)
        assert not torch.equal(stage1["classifier.weight"], stage2["classifier.weight"])
    assert pairs == {(r, c) for r in ("ce", "rw", "rs") for c in ("ce", "rw", "rs")}

    with open(smoke_study / "decoupled_grid.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and {(r["representation"], r["classifier"]) for r in rows} == pairs
    for row in rows:
        top1 = results(row["stage2_run"])["metrics"]["test"]["top1"]
        assert float(row["error"]) == pytest.approx(100 * (1 - top1), abs=1e-4)
        assert Path(row["stage1_run"]) == smoke_study / "stage1" / row["representation"]
        assert row["target"] == "same" and row["representation_data"] == row["classifier_data"] == "digits_lt (IR 10)"
    grid = study.decoupled_grid(manifest["grid"])["same"]
    assert grid["classifiers"] == grid["representations"] == ["ce", "rw", "rs"]
    markdown = (smoke_study / "decoupled_grid.md").read_text()
    for clf, line in zip(grid["classifiers"], grid["error"], strict=True):
        assert f"| **{clf.upper()}** | " + " | ".join(f"{v:.2f}" for v in line) + " |" in markdown
    assert (smoke_study / "decoupled_grid.png").stat().st_size > 5000


def test_rerun_reuses_stage1_and_adds_a_transfer_grid_through_subprocesses(smoke_study, tmp_path, monkeypatch, capsys):
    out = tmp_path / "transfer"
    shutil.copytree(smoke_study / "stage1" / "ce", out / "stage1" / "ce")
    checkpoint = out / "stage1" / "ce" / "checkpoints" / "best.ckpt"
    before = checkpoint.stat().st_mtime_ns
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = study_cli.main(["decoupled", "--runner", "subprocess", "--output-dir", str(out), "--representations", "ce",
                       "--classifiers", "rs", "--no-source", "--transfer", "data=digits_lt data.imbalance_ratio=5",
                       *COMMON, "--stage2", "data.batch_size=32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert checkpoint.stat().st_mtime_ns == before
    jobs = json.loads((out / "study.json").read_text())["jobs"]
    assert [(j["stage"], j["status"]) for j in jobs] == [("stage1", "reused"), ("stage2", "trained")]
    transfer = results(out / "stage2" / "digits_lt" / "repr-ce_clf-rs")
    assert transfer["config"]["data"]["imbalance_ratio"] == 5
    assert transfer["config"]["data"]["batch_size"] == 32
    assert Path(transfer["config"]["method"]["stage1_checkpoint"]) == checkpoint.resolve()
    assert (out / "stage2" / "digits_lt" / "repr-ce_clf-rs" / "run.log").is_file()  # written by Hydra itself
    with open(out / "decoupled_grid.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["target"], row["representation_data"], row["classifier_data"]) == (
        "digits_lt", "digits_lt (IR 10)", "digits_lt (IR 5)")
    assert "digits_lt (IR 10) → digits_lt (IR 5)" in (out / "decoupled_grid.md").read_text()


def test_analyze_recomputes_each_run_and_sees_the_shared_representation(smoke_study, tmp_path):
    runs = [smoke_study / "stage1" / m for m in ("ce", "rw", "rs")]
    crt = smoke_study / "stage2" / "same" / "repr-ce_clf-rs"
    assert analyze_cli.main([*map(str, runs), str(crt), "-o", str(tmp_path), "--device", "cpu"]) == 0
    with open(tmp_path / "diagnostics.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    assert list(by_run) == ["ce", "rw", "rs", "crt"]
    for label, run_dir in zip(by_run, [*runs, crt], strict=True):
        saved = [row["test_acc"] for row in results(run_dir)["per_class"]]
        np.testing.assert_allclose([float(r["accuracy"]) for r in by_run[label]], saved, atol=1e-9)
    # the classifier re-trained on the CE representation reads the very same features as CE
    for key in ("compactness", "feature_norm"):
        np.testing.assert_allclose([float(r[key]) for r in by_run["crt"]], [float(r[key]) for r in by_run["ce"]],
                                   rtol=1e-5)
    assert not np.allclose([float(r["compactness"]) for r in by_run["rw"]],
                           [float(r["compactness"]) for r in by_run["ce"]])
    for name in ("summary.csv", "compactness.png", "feature_norms.png", "weight_norms.png", "accuracy_vs_count.png",
                 "shot_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 100


def test_report_on_the_study_keeps_each_representation_apart(smoke_study, tmp_path):
    cells, records, files = report.write_report([smoke_study], tmp_path)
    assert len(records) == 12 and all(r.status == "ok" for r in records)
    assert sorted(c.method for c in cells) == ["ce", "crt", "crt", "crt", "crt", "crt", "crt", "crt", "crt", "crt", "rs",
                                               "rw"]
    crt_names = {c.name for c in cells if c.method == "crt"}
    assert len(crt_names) == 9 and any("stage 1=rw" in name for name in crt_names)
    assert "Missing or failed runs (0)" in files[0].read_text()


def test_run_ltlib_refuses_a_directory_holding_another_run(smoke_study):
    with pytest.raises(LtlibError, match="already holds a finished run"):
        study.run_ltlib(["method=rw", *COMMON], smoke_study / "stage1" / "ce", runner="inprocess")


def test_subprocess_runner_reports_the_run_error(tmp_path):
    # fails in Hydra's composition, before ltlib.run imports torch: a cheap failing child process
    with pytest.raises(LtlibError, match=r"exit 1\) for run .*: .*nonsense"):
        study.run_ltlib(["method=nonsense", *COMMON], tmp_path / "run", runner="subprocess", capture=True)


def test_overrides_merge_by_key_and_paths_are_quoted():
    merged = study.merge_overrides(["data=cifar100_lt", "data.imbalance_ratio=50", "trainer.max_epochs=200"],
                                   ["trainer.max_epochs=10"], ["data=cifar10_lt"])
    assert merged == ["data=cifar10_lt", "data.imbalance_ratio=50", "trainer.max_epochs=10"]
    path = "/tmp/a b/it's=here.ckpt"
    (parsed,) = OverridesParser.create().parse_overrides([f"method.stage1_checkpoint={study.quote_value(path)}"])
    assert parsed.value() == path
    assert study.quote_value("/plain/path-1.ckpt") == "/plain/path-1.ckpt"


@pytest.mark.parametrize("argv,expected", [
    (["decoupled", "method=ce"], "method=ce"),
    (["decoupled", "--classifiers", "ce,xx"], "'xx'"),
    (["decoupled", "--representations", "nonsense"], "'nonsense'"),
    (["decoupled", "--no-source"], "--transfer"),
    (["decoupled", "data=="], "data=="),
    (["decoupled", "data.imbalance_ratio=10,50"], "sweep"),
    (["decoupled", "method.beta=0.9"], "--stage1 method.beta=0.9"),
    (["decoupled", "--stage2", "method.sampler=uniform"], "method.sampler"),
    (["fancy"], "'fancy'"),
])
def test_bad_input_is_one_line_error(argv, expected, capsys, tmp_path):
    assert study_cli.main([*argv, "--output-dir", str(tmp_path / "x")] if argv[0] == "decoupled" else argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ltlib: error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert not (tmp_path / "x").exists()


def test_transfer_stage2_jobs_take_stage1_normalisation_unless_overridden(tmp_path, monkeypatch):
    """Planned without training: a fake runner composes each job's config as ``ltlib.run`` would, builds its
    data module (which checks the normalisation options and resolves them) and writes a results.json.
    Stage 1 normalises CIFAR-100-LT with CIFAR-100's statistics; the transfer target CIFAR-10-LT (whose
    own default is CIFAR-10's) gets them as overrides, the same-data grid gets none, and a normalisation
    the target sets itself wins."""
    from hydra.utils import instantiate

    def fake_run_ltlib(overrides, run_dir, **_):
        cfg = study.compose_run_config(overrides, run_dir)
        datamodule = instantiate(cfg.data)
        run_dir = Path(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "best.ckpt").write_bytes(b"")
        payload = {"config": {"data": {"name": cfg.data.name, "imbalance_ratio": cfg.data.imbalance_ratio},
                              "method": {"stage1_checkpoint": cfg.method.get("stage1_checkpoint")}},
                   "splits": {"normalization": {"name": datamodule.normalization, "mean": datamodule.mean,
                                                "std": datamodule.std}},
                   "metrics": {"test": {"top1": 0.5}}, "checkpoint": "checkpoints/best.ckpt"}
        (run_dir / "results.json").write_text(json.dumps(payload))
        return payload

    monkeypatch.setattr(study, "run_ltlib", fake_run_ltlib)
    cifar100 = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]  # CIFAR-100's training-set statistics
    imagenet = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's ImageNet statistics
    result = study.decoupled_study(
        ["data=cifar100_lt", "data.imbalance_ratio=50", "data.normalization=cifar100"], output_dir=tmp_path,
        representations=["ce"], classifiers=["rs"],
        transfers=[["data=cifar10_lt"], ["data=cifar10_lt", "data.normalization=imagenet"]])
    same, transfer, own = [j for j in result.jobs if j.stage == "stage2"]
    assert (same.target, transfer.target, own.target) == ("same", "cifar10_lt", "cifar10_lt_2")
    assert "data.normalization=cifar100" in same.overrides
    assert not any(o.startswith(("data.mean=", "data.std=")) for o in same.overrides + own.overrides)
    assert {"data=cifar10_lt", "data.mean=[0.5071,0.4865,0.4409]", "data.std=[0.2673,0.2564,0.2762]",
            "++data.normalization=null"} <= set(transfer.overrides)
    assert "data.normalization=imagenet" in own.overrides

    with open(tmp_path / "decoupled_grid.csv") as handle:
        rows = {row["target"]: row for row in csv.DictReader(handle)}
    for target, stats in (("same", cifar100), ("cifar10_lt", cifar100), ("cifar10_lt_2", imagenet)):
        assert (json.loads(rows[target]["data_mean"]), json.loads(rows[target]["data_std"])) == stats, target
    assert rows["same"]["normalization"] == "stage 1's (same data)"
    assert rows["cifar10_lt"]["normalization"] == "stage 1's (cifar100_lt (IR 50))"
    assert rows["cifar10_lt"]["classifier_data"] == "cifar10_lt (IR 50)"
    assert rows["cifar10_lt_2"]["normalization"] == "--transfer override (data.normalization)"
    markdown = (tmp_path / "decoupled_grid.md").read_text()
    assert ("Stage-2 input normalisation: stage 1's (cifar100_lt (IR 50)): data.mean [0.5071, 0.4865, 0.4409], "
            "data.std [0.2673, 0.2564, 0.2762].") in markdown

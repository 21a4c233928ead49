"""The benchmark scripts run on tiny settings (their numbers are not checked: benchmarks are scripts, not
timed tests) and produce complete reports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, cli_env


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    proc = run_script("throughput.py", "--smoke", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["method"], r["path"]): r for r in report["summary"]}
    expected = {(m, p) for m in ("ce", "bbn", "fbl", "two_head") for p in ("ltlib", "plain")} | {("bbn", "plain_concat")}
    assert set(rows) == expected
    for (_, path), row in rows.items():
        assert row["images_per_s"] > 0
        assert (row["ltlib_over_path_median"] is None) == (path == "ltlib")
    assert {(r["loader"], r["streams"]) for r in report["loaders"]} == {("cpu", 1), ("cpu", 2), ("device", 1),
                                                                          ("device", 2)}
    bbn_segments = [s for s in report["segments"] if s["method"] == "bbn" and s["path"] == "ltlib"]
    assert all(s["images"] == 2 * 8 * s["steps"] for s in bbn_segments)  # two sub-batches of 8 per step
    assert "| ce | plain |" in proc.stdout


def test_time_to_accuracy_smoke(tmp_path):
    proc = run_script("time_to_accuracy.py", "--smoke", "--methods", "bbn", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["method"], r["epochs"]) for r in report["runs"]] == [("bbn", 1)]
    for run in report["runs"]:
        assert 0.0 <= run["test_top1_last_epoch"] <= 1.0 and 0.0 <= run["test_top1_selected"] <= 1.0
        assert 0 < run["train_s"] <= run["fit_s"] < run["process_wall_s"]
        assert run["eval_s"] > 0 and run["data_s"] > 0
    assert "| bbn | auto | 1 |" in report["markdown"]


def test_microbench_smoke(tmp_path):
    out = tmp_path / "micro.json"
    proc = run_script("microbench.py", "--smoke", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["convolutions"]) == 6 and all(r["tflops"] > 0 for r in report["convolutions"])
    assert report["kernels_per_step"]["bbn"] > report["kernels_per_step"]["ce"] > 0
    floors = report["floors_200_epoch_bbn"]
    assert 2.2 < floors["total_pflop"] < 2.4  # the arithmetic: about 2.3 PFLOP
    assert floors["compute_floor_s"] > 0 and report["launch_latency_us"]["eager_us"] > 0

"""End-to-end runs of ``python -m ltlib.run`` on the embedded digits data, and its bad inputs."""

import csv
import json

import pytest
from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["ce", "rw", "rs"])
def test_cli_trains_each_method_and_writes_results(method, tiny_run_args, tmp_path):
    proc = run_cli(f"method={method}", *tiny_run_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == method
    assert results["batch_size"]["global"] == results["config"]["data"]["batch_size"]  # one process
    assert set(results["metrics"]) == {"val", "test"}
    test = results["metrics"]["test"]
    assert 0.0 <= test["top1"] <= 1.0 and test["num_samples"] == 500  # 50 per class, balanced
    assert len(results["per_class"]) == 10
    counts = [row["train_count"] for row in results["per_class"]]
    assert counts == sorted(counts, reverse=True) and counts[0] == 100 and counts[-1] == 10
    assert (run_dir / "per_class.csv").is_file() and (run_dir / "per_class_accuracy.png").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((run_dir / "run_status.json").read_text())["status"] == "finished"
    assert "Top-1" in proc.stdout or "top-1" in proc.stdout.lower()


def test_seeded_cpu_runs_repeat_exactly(tiny_run_args, tmp_path):
    first = run_cli(*tiny_run_args)
    second = run_cli(*[a.replace("/run", "/run2") for a in tiny_run_args])
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    a = json.loads((tmp_path / "run" / "results.json").read_text())
    b = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert a["metrics"] == b["metrics"] and a["per_class"] == b["per_class"]


def test_resume_from_checkpoint_continues_training(tiny_run_args, tmp_path):
    first = run_cli(*tiny_run_args)
    assert first.returncode == 0, first.stderr[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    args = [a for a in tiny_run_args if not a.startswith(("hydra.run.dir", "trainer.max_epochs"))]
    resumed = run_cli(*args, f"hydra.run.dir={tmp_path / 'resumed'}", "trainer.max_epochs=3",
                      f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["epochs_trained"] == 3
    # only the third epoch ran after resuming from the end of the second
    with open(tmp_path / "resumed" / "logs" / "metrics.csv") as handle:
        trained_epochs = {row["epoch"] for row in csv.DictReader(handle) if row.get("train/loss_epoch")}
    assert trained_epochs == {"2"}


@pytest.mark.parametrize("override,expected", [
    ("data.imbalance_ratio=0.5", "0.5"),
    ("backbone.name=resnet33", "resnet33"),
    ("method.sampler=sqrt", "sqrt"),
    ("optim.schedule=poly", "poly"),
    ("ckpt_path=/nonexistent/last.ckpt", "/nonexistent/last.ckpt"),
    ("trainer.max_epochs=-1", "-1"),
])
def test_bad_input_is_one_line_error(override, expected, tiny_run_args):
    proc = run_in_process(*tiny_run_args, override)  # the exit status and stderr of the CLI; the subprocess
    # path (no traceback from a fresh interpreter) is covered by the other CLI error tests
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]


def test_missing_folder_root_is_one_line_error(tiny_run_args, tmp_path):
    proc = run_in_process(*tiny_run_args, "data=folder", f"data.root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr
    # the run directory says why it has no results (what ltlib.report lists)
    status = json.loads((tmp_path / "run" / "run_status.json").read_text())
    assert status["status"] == "failed" and "nowhere" in status["message"]
    assert proc.stderr.strip().endswith(status["message"])


def test_unknown_method_group_lists_the_options(tiny_run_args):
    proc = run_cli(*tiny_run_args, "method=nonsense")
    assert proc.returncode != 0
    assert "nonsense" in proc.stderr and "ce" in proc.stderr and "rw" in proc.stderr


def test_offline_cifar_download_is_one_line_error(tiny_run_args, tmp_path):
    proc = run_in_process(*tiny_run_args, "data=cifar100_lt", f"data.root={tmp_path / 'cifar'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(tmp_path / "cifar") in proc.stderr


def test_multirun_sweep_writes_one_directory_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=ce,rs", "data.imbalance_ratio=5,10", "trainer.max_epochs=1",
                   "backbone=resnet20", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 4
    cells = {(r["method"], r["config"]["data"]["imbalance_ratio"]) for r in results}
    assert cells == {("ce", 5), ("ce", 10), ("rs", 5), ("rs", 10)}
    # the imbalance ratio really changes the training set
    smallest = {r["config"]["data"]["imbalance_ratio"]: min(row["train_count"] for row in r["per_class"])
                for r in results}
    assert smallest == {5: 20, 10: 10}


def test_two_process_ddp_run_matches_single_process_evaluation(tiny_run_args, tmp_path):
    ddp = run_cli(*tiny_run_args, "trainer=ddp_cpu", "eval_checkpoint=last")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert ddp_results["metrics"]["test"]["num_samples"] == 500  # no padded duplicates
    per_process = ddp_results["config"]["data"]["batch_size"]
    assert ddp_results["batch_size"] == {"per_process": per_process, "processes": 2, "global": 2 * per_process,
                                         "streams": 1}
    # Evaluate the same checkpoint in one process: resuming at max_epochs trains nothing more.
    args = [a for a in tiny_run_args if not a.startswith("hydra.run.dir")]
    single = run_cli(*args, f"hydra.run.dir={tmp_path / 'single'}", "eval_checkpoint=last",
                     f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    assert single.returncode == 0, single.stderr[-3000:]
    single_results = json.loads((tmp_path / "single" / "results.json").read_text())
    assert single_results["metrics"] == ddp_results["metrics"]
    assert single_results["confusion"] == ddp_results["confusion"]


def test_unreadable_image_in_a_worker_is_one_line_error(tiny_run_args, tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "b" / "9.png").write_bytes(b"not an image")
    proc = run_cli(*tiny_run_args, "data=folder", f"data.root={tmp_path / 'images'}", "data.num_workers=2",
                   "data.val_per_class=1", "data.augmentation=none", "data.batch_size=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(error_lines) == 1 and "9.png" in error_lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("logger", ["none", "wandb", "tensorboard"])
def test_every_logger_option_runs(logger, tiny_run_args, tmp_path):
    proc = run_cli(*tiny_run_args, f"logger={logger}", "trainer.max_epochs=1", env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").is_file()
    if logger == "tensorboard":
        assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))

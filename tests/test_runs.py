"""ltlib.runs over a run directory made by a tiny in-process training (the default digits config, one
epoch): RunDir's results, config, checkpoints and status; rebuilding the method from the saved config and
loading its weights; the one list of config keys that are not part of the experiment."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from ltlib.config import compose
from ltlib.errors import LtlibError
from ltlib.runs import (
    NON_EXPERIMENT_KEYS,
    REPORT_ONLY_KEYS,
    RESUME_ONLY_KEYS,
    RunDir,
    Task,
    build_method,
    config_differences,
    is_non_experiment_key,
    load_weights,
    read_checkpoint,
    write_run_status,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """``ltlib.training.train.train`` on the default config with ``trainer.max_epochs=1``, in this process,
    with the ``.hydra/`` files Hydra would write."""
    from hydra.core.hydra_config import HydraConfig

    from ltlib.training.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    overrides = ["trainer.max_epochs=1"]
    cfg = compose(overrides, hydra_node=True, run_dir=run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), run_dir / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    saved = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        train(cfg, run_dir)
    finally:
        HydraConfig.instance().cfg = saved
    return RunDir(run_dir)


def test_results_config_overrides_and_choices(run):
    results = run.results()
    assert results["method"] == "ce" and set(results["metrics"]) == {"val", "test"}
    assert results["config"]["trainer"]["max_epochs"] == 1
    assert run.config() == results["config"] == run.config("results")
    # the checkpoint stores the same experiment; .hydra/ the config as composed (logger, callbacks left out)
    assert config_differences(run.config("checkpoint"), results["config"]) == []
    hydra = run.config("hydra")
    assert "logger" not in hydra and hydra["method"] == results["config"]["method"]
    assert run.overrides() == ["trainer.max_epochs=1"] and run.choices()["method"] == "ce"
    assert run.is_run() and RunDir.containing(run.checkpoint("best")) == run

    empty = RunDir(run.path.parent / "nothing")
    assert empty.results() is None and empty.config() is None and empty.overrides() is None
    assert not empty.is_run() and empty.choices() == {}
    with pytest.raises(LtlibError, match="no results.json in"):
        empty.results(required=True)
    with pytest.raises(LtlibError, match="config source"):
        run.config("elsewhere")


def test_checkpoints(run, tmp_path):
    best, last = run.path / "checkpoints" / "best.ckpt", run.path / "checkpoints" / "last.ckpt"
    assert run.checkpoint("best") == best and run.checkpoint("last") == last
    assert run.checkpoint("selected") == run.path / run.results()["checkpoint"] == best  # best on validation
    assert run.checkpoint("resume") == last
    # a SLURM requeue's checkpoint, written later, is what a resume continues from
    copy_dir = tmp_path / "copy"
    shutil.copytree(run.path, copy_dir)
    hpc = copy_dir / "hpc_ckpt_1.ckpt"
    shutil.copy(last, hpc)
    os.utime(copy_dir / "checkpoints" / "last.ckpt", (1, 1))
    assert RunDir(copy_dir).checkpoint("resume") == hpc
    (copy_dir / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(LtlibError, match="has no selected checkpoint: no file at") as info:
        RunDir(copy_dir).checkpoint("selected")
    assert "\n" not in str(info.value)
    assert RunDir(copy_dir).checkpoint("best", required=False) is None
    assert RunDir(tmp_path).checkpoint("resume", required=False) is None
    with pytest.raises(LtlibError, match="unknown checkpoint 'newest'"):
        run.checkpoint("newest")


def test_status(run, tmp_path):
    assert run.status() is None  # ltlib.run records it around train(); train() alone does not
    status_dir = RunDir(tmp_path)
    write_run_status(status_dir.path, "interrupted", "SIGTERM")
    assert status_dir.status()["status"] == "interrupted"
    assert status_dir.describe_unfinished()[0] == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_status.json"]  # no temporary file left


def test_build_method_and_load_weights_round_trip(run):
    results, config = run.results(), run.config()
    datamodule = instantiate(config["data"])
    datamodule.setup("test")

    def rebuilt(task, seed: int):
        torch.manual_seed(seed)  # another initialisation each time: only the loaded weights may count
        return build_method(config["method"], config["optim"], task, config["backbone"],
                            many_threshold=config["many_threshold"], few_threshold=config["few_threshold"]).eval()

    from_data = rebuilt(datamodule, 1)
    load_weights(from_data, run.checkpoint("selected"))
    from_results = rebuilt(Task.from_results(results, in_chans=datamodule.in_chans), 2)
    assert from_results.class_counts.tolist() == list(datamodule.class_counts)
    load_weights(from_results, read_checkpoint(run.checkpoint("selected")))  # a loaded checkpoint works too
    from_state = rebuilt(datamodule, 3)
    load_weights(from_state, from_data.state_dict())  # and a plain state dict

    correct = total = 0
    with torch.no_grad():
        for images, targets in datamodule.test_dataloader():
            logits = from_data.evaluate_logits(images)
            assert torch.equal(logits, from_results.evaluate_logits(images))
            assert torch.equal(logits, from_state.evaluate_logits(images))
            correct += int((logits.argmax(1) == targets).sum())
            total += len(targets)
    assert correct / total == pytest.approx(results["metrics"]["test"]["top1"], abs=1e-12)  # what the run measured


def test_weights_that_do_not_fit_and_unreadable_files_are_one_line_errors(run, tmp_path):
    config = run.config()
    other = build_method(config["method"], config["optim"], Task(3, [5, 3, 1], ["a", "b", "c"], in_chans=1),
                         config["backbone"])
    with pytest.raises(LtlibError, match="does not fit the model built from its run's config") as info:
        load_weights(other, run.checkpoint("best"))
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LtlibError, match=r"cannot read method.stage1_checkpoint='.*garbage.ckpt': the file could "
                                         r"not be read as a checkpoint") as info:
        read_checkpoint(garbage, key="method.stage1_checkpoint")
    assert "\n" not in str(info.value)
    with pytest.raises(LtlibError, match="no checkpoint file there"):
        load_weights(other, tmp_path / "missing.ckpt")


def test_one_list_of_keys_that_are_not_the_experiment(run, tmp_path):
    saved = run.config()
    moved = copy.deepcopy(saved)
    moved["data"]["num_workers"], moved["data"]["root"], moved["run_name"] = 7, "/elsewhere", "another"
    moved["trainer"]["enable_progress_bar"], moved["logger"] = True, {"_target_": "nowhere"}
    assert config_differences(saved, moved) == []
    reseeded = copy.deepcopy(saved)
    reseeded["seed"] = saved["seed"] + 1
    assert config_differences(saved, reseeded) == [f"seed ({saved['seed']} -> {saved['seed'] + 1})"]
    other_method = copy.deepcopy(saved)
    other_method["method"]["sampler"] = "class_balanced"
    assert config_differences(saved, other_method) == ["method.sampler ('uniform' -> 'class_balanced')"]
    for key in NON_EXPERIMENT_KEYS:
        assert is_non_experiment_key(key, "resume") and is_non_experiment_key(f"{key}.x", "report")
    assert all(is_non_experiment_key(k, "resume") and not is_non_experiment_key(k, "report") for k in RESUME_ONLY_KEYS)
    assert all(is_non_experiment_key(k, "report") and not is_non_experiment_key(k, "resume") for k in REPORT_ONLY_KEYS)
    assert not is_non_experiment_key("optim.lr", "resume") and not is_non_experiment_key("method.sampler", "report")
    with pytest.raises(LtlibError, match="unknown key use"):
        is_non_experiment_key("seed", "sometimes")

    # the report uses the same list: a run differing only in where and how it ran joins the cell, a method
    # option makes another cell
    from ltlib.analysis import report

    def copy_with(name: str, config: dict) -> None:
        shutil.copytree(run.path, tmp_path / "sweep" / name)
        results_file = tmp_path / "sweep" / name / "results.json"
        results_file.write_text(json.dumps({**json.loads(results_file.read_text()), "config": config}))

    copy_with("a", saved)
    copy_with("b", moved)
    copy_with("c", reseeded)
    copy_with("d", other_method)
    cells = report.build_cells(report.collect_runs([tmp_path / "sweep"]))
    assert sorted(len(c.runs) for c in cells) == [1, 3]
    assert {Path(r.run_dir).name for c in cells for r in c.runs if len(c.runs) == 3} == {"a", "b", "c"}

"""The FBL method (``method=fbl``): the loss it trains with, the per-epoch curriculum in both progress
modes (read back from the CSV log), resume, the Places-LT fine-tuning options, the paper presets and its
one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from tests.conftest import digits_datamodule, run_cli, run_in_process
from torch import nn

from ltlib.backbones.base import Backbone
from ltlib.config import config_dir
from ltlib.data import LongTailDataModule
from ltlib.errors import LtlibError
from ltlib.methods.fbl import FeatureBalancedClassifier

COUNTS = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]  # digits_lt's training counts


def tiny_backbone() -> Backbone:
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    last_block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    return Backbone(trunk, last_block, 6, arch="tiny")


def make_method(data: LongTailDataModule | None = None, **options) -> FeatureBalancedClassifier:
    counts = data.class_counts if data is not None else COUNTS
    return FeatureBalancedClassifier(tiny_backbone(), num_classes=10, class_counts=counts,
                                     optim={"lr": 0.05, "warmup_epochs": 0, "milestones": []}, **options)


def fit(method, data, tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=1, deterministic=True, **trainer_args)
    trainer.fit(method, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def logged_alphas(metrics_csv: Path) -> dict[int, float]:
    with metrics_csv.open() as handle:
        return {int(row["epoch"]): float(row["train/fbl_alpha"]) for row in csv.DictReader(handle)
                if row.get("train/fbl_alpha")}


def expected_loss(logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor, alpha: float, lam: float,
                  counts: list[int]) -> float:
    """Eq. 5 + 8 with the official normalised stimulus, written out in numpy."""
    log_n = np.log(np.asarray(counts, dtype=np.float64))
    s = (log_n.max() - log_n) / (log_n.max() - log_n.min())
    norms = np.linalg.norm(features.detach().double().numpy(), axis=1, keepdims=True)
    z = logits.detach().double().numpy() - alpha * lam * s[None, :] / norms
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    return float(-log_p[np.arange(len(targets)), targets.numpy()].mean())


# ------------------------------------------------------------------------------------------ the loss
def test_compute_loss_is_eq5_eq8_on_the_backbone_features_and_evaluation_uses_raw_logits() -> None:
    torch.manual_seed(0)
    method = make_method(lambda_=60.0)
    method.criterion.set_progress(0.5)
    images, targets = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    features = method.backbone(images)
    logits = method.classifier(features)
    loss = method.compute_loss((images, targets))
    assert loss.item() == pytest.approx(expected_loss(logits, targets, features, 0.25, 60.0, COUNTS), rel=1e-5)
    assert loss.item() > F.cross_entropy(logits, targets).item()  # the stimulus only ever lowers logits
    loss.backward()  # features are not detached: the stimulus term reaches the backbone
    assert method.backbone.trunk[0].weight.grad.abs().sum() > 0
    method.eval()
    torch.testing.assert_close(method.evaluate_logits(images), method.classifier(method.backbone(images)))


def test_training_skips_the_finite_check_unless_asked() -> None:
    assert make_method().criterion.check_finite is False
    strict = make_method(check_finite=True)
    images = torch.full((2, 1, 8, 8), math.nan)
    with pytest.raises(LtlibError, match="non-finite"):
        strict.compute_loss((images, torch.tensor([0, 1])))


# ------------------------------------------------------------------------------------ the curriculum
@pytest.mark.parametrize("schedule,formula", [("parabolic_increment", lambda p: p * p),
                                              ("sine_increment", lambda p: math.sin(math.pi / 2 * p))])
def test_alpha_set_and_logged_each_epoch_from_the_epoch_counter(schedule, formula, tmp_path) -> None:
    data = digits_datamodule()
    method = make_method(data, schedule=schedule)
    seen: dict[int, float] = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.current_epoch] = pl_module.criterion.alpha

    fit(method, data, tmp_path, max_epochs=4, callbacks=[Spy()], limit_train_batches=2)
    expected = {epoch: formula(epoch / 4) for epoch in range(4)}
    assert seen == pytest.approx(expected, abs=1e-12)
    assert logged_alphas(tmp_path / "logs" / "version_0" / "metrics.csv") == pytest.approx(expected, rel=1e-6)


def test_official_progress_mode_is_epoch_over_max_epochs_minus_ten_unclipped(tmp_path) -> None:
    data = digits_datamodule()
    method = make_method(data, progress_mode="official")
    fit(method, data, tmp_path, max_epochs=12, limit_train_batches=1)
    alphas = logged_alphas(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert alphas == pytest.approx({epoch: (epoch / 2) ** 2 for epoch in range(12)}, rel=1e-6)
    assert alphas[11] > 1.0  # the official curriculum overshoots 1 in its last ten epochs


def test_resumed_run_recomputes_alpha_from_the_checkpoint_epoch(tmp_path) -> None:
    data = digits_datamodule()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(make_method(data), data, tmp_path / "first", max_epochs=2, callbacks=[checkpoints], limit_train_batches=1)
    resumed = make_method(data)
    assert resumed.criterion.alpha == 0.0  # nothing carried over but the epoch counter
    fit(resumed, data, tmp_path / "second", max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        limit_train_batches=1)
    assert logged_alphas(tmp_path / "second" / "logs" / "version_0" / "metrics.csv") == pytest.approx(
        {2: (2 / 4) ** 2, 3: (3 / 4) ** 2}, rel=1e-6)


# ------------------------------------------------------------------------- Places-LT fine-tuning
def test_freeze_trunk_and_reset_last_block(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = FeatureBalancedClassifier(backbone, num_classes=10, class_counts=COUNTS, freeze_trunk=True,
                                       reset_last_block=True, optim={"warmup_epochs": 0})
    state = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    assert not torch.equal(state["last_block.0.weight"], pretrained["last_block.0.weight"])  # re-initialised
    assert all(not p.requires_grad for p in method.backbone.trunk.parameters())
    optimised = {id(p) for group in method.parameter_groups() for p in group["params"]}
    assert optimised == {id(p) for p in [*method.backbone.last_block.parameters(), *method.classifier.parameters()]}
    method.train()
    assert not method.backbone.trunk.training and method.backbone.last_block.training
    data = digits_datamodule()
    fit(method, data, tmp_path, max_epochs=1, limit_train_batches=2)
    after = method.backbone.state_dict()
    for key, value in pretrained.items():
        if key.startswith("trunk."):  # weights and batch-norm statistics untouched
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["last_block.1.running_mean"], state["last_block.1.running_mean"])


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options,expected", [
    ({"lambda_": -1.0}, "-1.0"),
    ({"stimulus": "sqrt"}, "sqrt"),
    ({"schedule": "quadratic"}, "quadratic"),
    ({"progress_mode": "epochwise"}, "epochwise"),
])
def test_bad_options_are_one_line_errors(options, expected) -> None:
    with pytest.raises(LtlibError) as info:
        make_method(**options)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cli_official_progress_with_too_few_epochs_is_a_one_line_error(tiny_run_args) -> None:
    proc = run_in_process("method=fbl", *tiny_run_args, "method.progress_mode=official")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(lines) == 1 and "max_epochs=2" in lines[0] and "> 10" in lines[0], proc.stderr[-2000:]


# ---------------------------------------------------------------------------------- end to end
def test_cli_trains_fbl_with_feature_norms_and_logs_alpha(tiny_run_args, tmp_path) -> None:
    proc = run_cli("method=fbl", "callbacks=feature_norms", *tiny_run_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "fbl" and results["config"]["method"]["lambda_"] == 60.0
    assert 0.0 <= results["metrics"]["test"]["top1"] <= 1.0
    assert logged_alphas(run / "logs" / "metrics.csv") == pytest.approx({0: 0.0, 1: 0.25}, rel=1e-6)
    norms = results["feature_norms"]
    assert norms["epochs"] == [0, 1] and norms["head_classes"] == [0, 1] and norms["tail_classes"] == [8, 9]
    assert all(v > 0 for v in norms["test"]) and all(v > 0 for v in norms["train_last_epoch"])
    for name in ("feature_norms.csv", "feature_norms_history.csv", "feature_norms_epochs.png", "feature_norms_test.png"):
        assert (run / name).is_file(), name


# -------------------------------------------------------------------------------------- presets
def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("experiment,data", [("fbl_cifar10_lt", "cifar10_lt"), ("fbl_cifar100_lt", "cifar100_lt"),
                                             ("fbl_table2", "cifar10_lt"), ("fbl_table4", "cifar10_lt")])
def test_cifar_presets_use_the_fbl_recipe(experiment, data) -> None:
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.data.name == data and cfg.data.batch_size == 64 and cfg.data.imbalance_ratio == 100
    assert cfg.backbone.name == "resnet32" and cfg.method._target_.endswith("FeatureBalancedClassifier")
    assert cfg.method.lambda_ == 60.0 and cfg.trainer.max_epochs == 200
    assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 2e-4 and cfg.optim.warmup_epochs == 5
    assert list(cfg.optim.milestones) == [160, 180] and cfg.optim.decay_factor == 0.01
    assert cfg.optim.warmup_per_step is False


def test_presets_keep_their_recipe_with_other_data_and_sweep_the_tables() -> None:
    folder = compose_cfg("experiment=fbl_cifar10_lt", "data=folder", "data.root=/tmp/cifar10")
    assert list(folder.optim.milestones) == [160, 180] and folder.data.imbalance_ratio == 100
    assert folder.data.batch_size == 64
    table2 = compose_cfg("experiment=fbl_table2").hydra.sweeper.params
    assert table2["data"] == "cifar10_lt,cifar100_lt" and table2["method"] == "ce,fbl"
    assert table2["data.imbalance_ratio"] == "100,50"
    ce_large = compose_cfg("method=ce", "recipe@_global_=fbl_large")  # the table-3 baseline's recipe
    assert ce_large.trainer.max_epochs == 180 and list(ce_large.optim.milestones) == [120, 160]
    table4 = compose_cfg("experiment=fbl_table4").hydra.sweeper.params
    assert set(table4["method.schedule"].split(",")) == {
        "linear_decay", "linear_increment", "sine_increment", "cosine_increment", "parabolic_increment"}


@pytest.mark.parametrize("experiment,backbone", [("fbl_table3_imagenet_lt", "resnet50"),
                                                 ("fbl_table3_inat2018", "resnet50"),
                                                 ("fbl_table3_places_lt", "resnet152")])
def test_large_presets(experiment, backbone) -> None:
    cfg = compose_cfg(f"experiment={experiment}", "data.root=/x")
    assert cfg.backbone.name == backbone and cfg.method.lambda_ == 150.0 and cfg.data.batch_size == 512
    assert cfg.trainer.max_epochs == 180 and cfg.optim.lr == 0.2 and list(cfg.optim.milestones) == [120, 160]
    assert cfg.optim.decay_factor == 0.1 and cfg.data._target_ == "ltlib.data.LongTailDataModule"
    places = experiment.endswith("places_lt")
    assert cfg.method.freeze_trunk is places and cfg.method.reset_last_block is places
    assert cfg.backbone.get("pretrained", False) is places
    # the dataset's own data config: the user gives the image root, the official lists are its defaults
    assert cfg.data.name == experiment.removeprefix("fbl_table3_")
    assert OmegaConf.is_missing(compose_cfg(f"experiment={experiment}").data, "root")

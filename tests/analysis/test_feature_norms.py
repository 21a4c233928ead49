"""Per-class feature norms (FBL figure 2, tables 5-6): the functions against a direct numpy computation,
the callback against the features the training step itself saw (backbone hook and recomputation
paths, multi-stream batches, resume), its files through the CLI, and the comparison plots."""

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
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.conftest import digits_datamodule, run_cli
from torch import nn

from ltlib.analysis.feature_norms import (
    CURVES_PLOT,
    PER_CLASS_PLOT,
    FeatureNormCallback,
    accumulate_feature_norms,
    compare_feature_norms,
    main,
    per_class_feature_norms,
    read_feature_norms,
    shown_classes,
    write_feature_norm_tables,
)
from ltlib.backbones.base import Backbone
from ltlib.errors import LtlibError
from ltlib.methods.base import LongTailMethod


def numpy_norms(features: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        rows = [math.sqrt(sum(v * v for v in f)) for f, t in zip(features, targets, strict=True) if t == c]
        if rows:
            out[c] = sum(rows) / len(rows)
    return out


# ----------------------------------------------------------------------------------- functions
def test_per_class_feature_norms_is_the_mean_l2_norm_of_each_class() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(60, 7, generator=gen) * torch.rand(60, 1, generator=gen) * 5
    targets = torch.randint(0, 5, (60,), generator=gen)  # class 5 gets no sample
    got = per_class_feature_norms(features, targets, 6)
    np.testing.assert_allclose(got.numpy(), numpy_norms(features.numpy(), targets.numpy(), 6), rtol=1e-6)
    assert math.isnan(got[5])
    sums, counts = torch.zeros(6), torch.zeros(6)
    for chunk in range(0, 60, 17):  # accumulating batch by batch gives the same means
        accumulate_feature_norms(sums, counts, features[chunk:chunk + 17], targets[chunk:chunk + 17])
    np.testing.assert_allclose((sums / counts)[:5].numpy(), got[:5].numpy(), rtol=1e-6)
    with pytest.raises(LtlibError, match=r"\[60, 7\]"):
        per_class_feature_norms(features, targets[:10], 6)


def test_shown_classes_default_to_the_largest_and_smallest() -> None:
    assert shown_classes([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]) == ([0, 1], [8, 9])
    assert shown_classes([3, 50, 7, 50, 1], num_shown=1) == ([1], [4])
    assert shown_classes([9, 8, 7], head_classes=[2], tail_classes=[0]) == ([2], [0])
    with pytest.raises(LtlibError) as info:
        shown_classes([9, 8, 7], head_classes=[3])
    assert "head_classes=[3]" in str(info.value) and "\n" not in str(info.value)


def test_tables_read_back_and_compare_runs(tmp_path, capsys) -> None:
    counts, names = [30, 20, 10], ["a", "b", "c"]
    runs = {}
    for label, scale in (("CE", 1.0), ("FBL", 2.0)):
        history = scale * np.array([[1.0, 2.0, np.nan], [1.5, 2.5, 3.5]])
        write_feature_norm_tables(tmp_path / label, names, counts, [0, 1], history, scale * np.array([4.0, 5.0, 6.0]),
                                  np.array([0.9, 0.5, np.nan]))
        runs[label] = tmp_path / label
    data = read_feature_norms(runs["FBL"])
    assert data["class_counts"] == counts and data["class_names"] == names and list(data["epochs"]) == [0, 1]
    np.testing.assert_allclose(data["train_history"], [[2.0, 4.0, np.nan], [3.0, 5.0, 7.0]])
    np.testing.assert_allclose(data["train_norm"], [3.0, 5.0, 7.0])
    np.testing.assert_allclose(data["test_acc"], [0.9, 0.5, np.nan])
    written = compare_feature_norms(runs, tmp_path / "figure2", head_classes=[0], tail_classes=[2])
    assert [p.name for p in written] == [CURVES_PLOT, PER_CLASS_PLOT] and all(p.stat().st_size > 0 for p in written)
    assert main([str(tmp_path / "cli"), f"CE={runs['CE']}", f"FBL={runs['FBL']}"]) == 0
    assert (tmp_path / "cli" / CURVES_PLOT).is_file() and (tmp_path / "cli" / PER_CLASS_PLOT).is_file()
    write_feature_norm_tables(tmp_path / "other", names, [30, 20, 5], [], None, None, None)
    capsys.readouterr()
    assert main([str(tmp_path / "cli"), f"CE={runs['CE']}", f"X={tmp_path / 'other'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("ltlib: error:") and "'X'" in error[0]


# ------------------------------------------------------------------------------------ callback
def tiny_backbone() -> Backbone:
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    last_block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    return Backbone(trunk, last_block, 6, arch="tiny")


class Recording(LongTailMethod):
    """Cross-entropy through ``self.backbone(images)`` that keeps what each step saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def compute_loss(self, batch):
        images, targets = batch
        features = self.backbone(images)
        self.seen.setdefault(self.current_epoch, []).append((features.detach().clone(), targets.clone()))
        return F.cross_entropy(self.classifier(features), targets)


class TwoBranches(LongTailMethod):
    """BBN-like: two streams, the backbone's parts called separately (the hook never fires), only the
    classifier trained, so features recomputed after the step equal those of the step."""

    train_streams = {"balanced": "class_balanced", "natural": "uniform"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def parameter_groups(self):
        return [{"params": list(self.classifier.parameters())}]

    def compute_loss(self, batch):
        loss = 0.0
        for stream in ("balanced", "natural"):
            images, targets = batch[stream]
            features = self.backbone.pool(self.backbone.last_block(self.backbone.trunk(images)))
            if stream == "natural":
                self.seen.setdefault(self.current_epoch, []).append((features.detach().clone(), targets.clone()))
            loss = loss + F.cross_entropy(self.classifier(features), targets)
        return loss


def make(cls, data):
    torch.manual_seed(0)
    return cls(tiny_backbone(), num_classes=10, class_counts=data.class_counts,
               optim={"lr": 0.05, "warmup_epochs": 0, "milestones": []})


def trainer(tmp_path: Path, max_epochs: int, callbacks) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                     default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=1, deterministic=True)


def expected_history(seen, num_classes: int) -> np.ndarray:
    rows = []
    for epoch in sorted(seen):
        features = torch.cat([f for f, _ in seen[epoch]]).numpy()
        targets = torch.cat([t for _, t in seen[epoch]]).numpy()
        rows.append(numpy_norms(features, targets, num_classes))
    return np.array(rows)


def test_callback_norms_equal_a_direct_computation(tmp_path) -> None:
    data = digits_datamodule()
    method = make(Recording, data)
    callback = FeatureNormCallback()
    run = trainer(tmp_path, 2, [callback])
    run.fit(method, datamodule=data)
    assert callback.epochs == [0, 1]
    for epoch in (0, 1):  # every training image once per epoch, each seen by the hook
        targets = torch.cat([t for _, t in method.seen[epoch]])
        assert torch.bincount(targets, minlength=10).tolist() == data.class_counts
    np.testing.assert_allclose(torch.stack(callback.train_history).numpy(), expected_history(method.seen, 10),
                               rtol=1e-5)

    run.test(method, datamodule=data, verbose=False)
    method.eval()
    with torch.no_grad():
        batches = [(method.backbone(x), y) for x, y in data.test_dataloader()]
    direct = numpy_norms(torch.cat([f for f, _ in batches]).numpy(), torch.cat([y for _, y in batches]).numpy(), 10)
    np.testing.assert_allclose(callback.test_norms.numpy(), direct, rtol=1e-5)

    entry = callback.on_run_end(tmp_path / "out", run, method)["feature_norms"]
    assert entry["head_classes"] == [0, 1] and entry["tail_classes"] == [8, 9] and entry["epochs"] == [0, 1]
    np.testing.assert_allclose(entry["test"], direct, rtol=1e-5)
    with (tmp_path / "out" / "feature_norms.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    accuracy = method.last_metrics["test"]["per_class_acc"].numpy()
    assert [int(r["train_count"]) for r in rows] == data.class_counts
    np.testing.assert_allclose([float(r["test_acc"]) for r in rows], accuracy, rtol=1e-6)
    np.testing.assert_allclose([float(r["train_norm"]) for r in rows], expected_history(method.seen, 10)[-1],
                               rtol=1e-5)
    assert {Path(f).name for f in entry["files"]} >= {CURVES_PLOT, PER_CLASS_PLOT}


def test_callback_recomputes_features_when_the_backbone_is_called_in_parts(tmp_path) -> None:
    data = digits_datamodule()
    method = make(TwoBranches, data)
    callback = FeatureNormCallback()
    trainer(tmp_path, 2, [callback]).fit(method, datamodule=data)
    for epoch in (0, 1):  # the natural (uniform) stream was analysed, not the balanced one
        targets = torch.cat([t for _, t in method.seen[epoch]])
        assert torch.bincount(targets, minlength=10).tolist() == data.class_counts
    np.testing.assert_allclose(torch.stack(callback.train_history).numpy(), expected_history(method.seen, 10),
                               rtol=1e-5)
    # the extra forward passes left the batch-norm statistics as training alone makes them
    plain = make(TwoBranches, data)
    trainer(tmp_path / "plain", 2, []).fit(plain, datamodule=data)
    for key, value in plain.backbone.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(method.backbone.state_dict()[key], value, rtol=0, atol=0)


def test_history_survives_resume(tmp_path) -> None:
    data = digits_datamodule()
    first = FeatureNormCallback()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 2, [first, checkpoints]).fit(make(Recording, data), datamodule=data)
    resumed = FeatureNormCallback()
    run, method = trainer(tmp_path, 3, [resumed]), make(Recording, data)
    run.fit(method, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.epochs == [0, 1, 2]
    np.testing.assert_array_equal(torch.stack(resumed.train_history[:2]).numpy(),
                                  torch.stack(first.train_history).numpy())
    # evaluating an earlier checkpoint after the fit (ltlib.run tests the best epoch) keeps the whole history
    run.test(method, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    assert resumed.epochs == [0, 1, 2] and resumed.test_norms is not None


def test_bad_callback_options_are_one_line_errors() -> None:
    with pytest.raises(LtlibError, match="num_shown=0"):
        FeatureNormCallback(num_shown=0)
    data = digits_datamodule()
    method = make(Recording, data)
    with pytest.raises(LtlibError) as info:
        FeatureNormCallback(tail_classes=[3, 10]).setup(None, method, "fit")
    assert "tail_classes=[3, 10]" in str(info.value) and "\n" not in str(info.value)
    callback = FeatureNormCallback(stream="reversed")
    batch = {"main": (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))}
    with pytest.raises(LtlibError, match="'reversed'.*available: main"):
        callback._analysed(batch, method)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_ce_with_feature_norms(tiny_run_args, tmp_path) -> None:
    proc = run_cli("method=ce", "callbacks=feature_norms", *tiny_run_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    data = read_feature_norms(run)
    test_acc = {row["class"]: row["test_acc"] for row in results["per_class"]}
    np.testing.assert_allclose(data["test_acc"], [test_acc[c] for c in range(10)], rtol=1e-6)
    assert list(data["epochs"]) == [0, 1] and data["train_history"].shape == (2, 10)
    np.testing.assert_allclose(data["train_norm"], data["train_history"][-1])
    entry = results["feature_norms"]
    np.testing.assert_allclose(entry["test"], data["test_norm"], rtol=1e-6)
    np.testing.assert_allclose(entry["curves"]["9"], data["train_history"][:, 9], rtol=1e-6)
    assert (run / CURVES_PLOT).is_file() and (run / PER_CLASS_PLOT).is_file()

"""The two-head model over its lifecycle: "Ours-Full"'s class weights with mixup and their deferred switch,
training on a plain DataLoader after ``fit_clusters``, ``load_from_checkpoint``, a real kill-and-resume that
keeps a feature-based cluster assignment, and identical assignments on both ranks of a real 2-process gloo run.

Everything runs on the digits (403 training images, 10 classes) with ResNet-20 (D = 64 feature channels)."""

from __future__ import annotations

import math
import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tests.conftest import digits_datamodule, free_port, gather_on_rank0, run_cli
from tests.scaling_runs import metric_rows, mtime_ns, results, start_cli, wait_for
from torch.utils.data import DataLoader, TensorDataset

import ltlib.methods.two_head as two_head_module
from ltlib.backbones import create_backbone
from ltlib.errors import LtlibError
from ltlib.losses import class_balanced_weights
from ltlib.methods.class_division import assign_clusters
from ltlib.methods.reweighting import ClassReweighting
from ltlib.methods.two_head import TwoHeadModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_SCHEDULE = {"warmup_epochs": 0, "milestones": []}


def make_model(counts: list[int], **kwargs) -> TwoHeadModel:
    torch.manual_seed(0)
    return TwoHeadModel(create_backbone("resnet20", in_chans=1), len(counts), counts,
                        optim=kwargs.pop("optim", NO_SCHEDULE), **kwargs)


def trainer(max_epochs: int, **kwargs) -> L.Trainer:
    options = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   num_sanity_val_steps=0)
    return L.Trainer(**{**options, **kwargs})


def soft_labels(model: TwoHeadModel, clusters: list[int]) -> torch.Tensor:
    """Eq. 4 written out: alpha on the image's cluster, the rest shared by its class's other clusters."""
    owner = model.division.cluster_to_class
    q = torch.zeros(len(clusters), model.num_clusters)
    for i, k in enumerate(clusters):
        siblings = [j for j in range(model.num_clusters) if owner[j] == owner[k]]
        for j in siblings:
            q[i, j] = 1.0 if len(siblings) == 1 else (
                model.alpha if j == k else (1 - model.alpha) / (len(siblings) - 1))
    return q


def per_image_losses(model: TwoHeadModel, images, cluster_q, labels) -> torch.Tensor:
    """``-sum_k q_k log p_k + lambda CE(fbh, y)`` for every image (no weights, no reduction)."""
    fmap = model.backbone.forward_features(images)
    l2 = -(cluster_q * model.classifier(model.backbone.pool(fmap)).log_softmax(1)).sum(1)
    return l2 + model.lambda_fbh * F.cross_entropy(model.fbh(fmap), labels, reduction="none")


# ---------------------------------------------------------------------------------------------------
# "Ours-Full": class weights, mixup, the deferred switch


def test_class_weights_with_mixup_are_the_weighted_mixed_soft_cross_entropy(monkeypatch):
    """lambda w_a CE_a + (1 - lambda) w_b CE_b on both heads (class weights per original class, on the cluster
    soft labels and the FBH's class labels alike), with a known lambda and pairing."""
    datamodule = digits_datamodule(stage=None)
    datamodule.setup("fit")
    counts, targets_all = datamodule.class_counts, datamodule.train_targets
    model = make_model(counts, mixup_alpha=1.0, class_weighting="class_balanced", reweight_from_epoch=0)
    assignment = model.fit_clusters(targets_all)
    lam, perm = 0.3, torch.tensor([2, 0, 4, 1, 3])

    def known_mixup(images, targets, num_classes, alpha):
        assert alpha == 1.0 and targets.shape[1] == num_classes == model.num_clusters + 10
        return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm], lam

    monkeypatch.setattr(two_head_module, "mixup_batch", known_mixup)
    indices = torch.tensor([0, 7, 150, 300, 402])
    labels = torch.as_tensor(targets_all)[indices]
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model.train()  # batch statistics: the same outputs for the same mixed batch below
    loss = model.compute_loss((images, labels, indices))

    weights = class_balanced_weights(counts, 0.9999)
    mixed = lam * images + (1 - lam) * images[perm]
    q = soft_labels(model, assignment[indices].tolist())
    own = per_image_losses(model, mixed, q, labels)
    partner = per_image_losses(model, mixed, q[perm], labels[perm])
    expected = (lam * weights[labels] * own + (1 - lam) * weights[labels[perm]] * partner).mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, (lam * own + (1 - lam) * partner).mean())  # the weights matter here


def test_deferred_reweighting_starts_at_the_first_lr_decay_else_at_80_percent_of_the_epochs():
    counts = [100, 10]
    recipe = {"lr": 0.1, "warmup_epochs": 5, "schedule": "multistep", "milestones": [120, 160], "decay_factor": 0.01}
    deferred, fixed = (make_model(counts, class_weighting="class_balanced", optim=recipe),
                       make_model(counts, class_weighting="class_balanced", reweight_from_epoch=5, optim=recipe))
    # 200 epochs: DRW's rule, the first decay (120); 90, 4, 1 epochs: no decay inside the run, 80% of it
    for max_epochs, epoch in ((200, 120), (90, 72), (4, 3), (1, 0)):
        deferred._trainer = fixed._trainer = SimpleNamespace(max_epochs=max_epochs, current_epoch=epoch - 1)
        assert (deferred.reweight_epoch, fixed.reweight_epoch) == (epoch, 5)
        assert deferred.active_class_weights() is None or epoch == 0
        deferred._trainer.current_epoch = epoch
        torch.testing.assert_close(deferred.active_class_weights(), class_balanced_weights(counts, 0.9999))
    assert make_model(counts).active_class_weights() is None  # class_weighting=none: never weighted


class FixedBatchLoss(L.Callback):
    """At the first batch of every epoch: the model's loss of one fixed batch, and the same loss computed by
    hand without and with the class weights (eval mode: batch norm's running statistics, no update)."""

    def __init__(self, indices: torch.Tensor, labels: torch.Tensor) -> None:
        self.indices, self.labels = indices, labels
        self.images = torch.randn(len(indices), 1, 8, 8, generator=torch.Generator().manual_seed(2))
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, model, batch, batch_idx):
        if batch_idx:
            return
        model.eval()
        with torch.no_grad():
            loss = model.compute_loss((self.images, self.labels, self.indices))
            q = soft_labels(model, model.cluster_assignment[self.indices].tolist())
            per_image = per_image_losses(model, self.images, q, self.labels)
            weights = class_balanced_weights(model.class_counts.tolist(), 0.9999)
        model.train()
        self.rows.append({"epoch": trainer.current_epoch, "weights_on": model.active_class_weights() is not None,
                          "loss": loss, "unweighted": per_image.mean(),
                          "weighted": (weights[self.labels] * per_image).mean()})


@pytest.mark.parametrize("reweight_from_epoch,switch", [(2, 2), (None, 3)])
def test_class_weights_switch_on_exactly_at_the_configured_epoch(reweight_from_epoch, switch):
    """A real Trainer, 4 epochs: unweighted before ``switch``, weighted from it (null: floor(0.8 * 4) = 3)."""
    datamodule = digits_datamodule(stage=None)
    datamodule.setup("fit")
    model = make_model(datamodule.class_counts, class_weighting="class_balanced",
                       reweight_from_epoch=reweight_from_epoch)
    indices = torch.tensor([0, 11, 123, 250, 400])
    probe = FixedBatchLoss(indices, torch.as_tensor(datamodule.train_targets)[indices])
    trainer(4, limit_train_batches=2, callbacks=[probe]).fit(model, datamodule=datamodule)
    assert [row["epoch"] for row in probe.rows] == [0, 1, 2, 3]
    for row in probe.rows:
        weighted = row["epoch"] >= switch
        assert row["weights_on"] == weighted
        torch.testing.assert_close(row["loss"], row["weighted" if weighted else "unweighted"])
        assert not torch.allclose(row["weighted"], row["unweighted"])


# ---------------------------------------------------------------------------------------------------
# Data sources and checkpoints


def test_fit_on_a_plain_dataloader_after_fit_clusters():
    """No LongTailDataModule: fit_clusters(targets), then a DataLoader over (image, target, index) items."""
    counts = [30, 12, 5]
    targets = np.random.default_rng(0).permutation(np.repeat(np.arange(3), counts))
    images = torch.randn(len(targets), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = make_model(counts, u=3)
    assignment = model.fit_clusters(targets).clone()
    loader = DataLoader(TensorDataset(images, torch.as_tensor(targets), torch.arange(len(targets))),
                        batch_size=16, shuffle=True)
    fitted = trainer(2)
    fitted.fit(model, train_dataloaders=loader)
    assert fitted.global_step == 2 * math.ceil(len(targets) / 16)
    assert torch.equal(model.cluster_assignment, assignment)  # kept, not recomputed

    without_indices = DataLoader(TensorDataset(images, torch.as_tensor(targets)), batch_size=16)
    clustered = make_model(counts, u=3)
    clustered.fit_clusters(targets)
    with pytest.raises(LtlibError, match=r"needs \(images, targets, indices\) training batches") as info:
        trainer(1).fit(clustered, train_dataloaders=without_indices)
    assert "\n" not in str(info.value) and "(image, target, index)" in str(info.value)
    with pytest.raises(LtlibError, match=r"call fit_clusters\(targets\) before training with another data source"):
        trainer(1).fit(make_model(counts, u=3), train_dataloaders=loader)


def test_load_from_checkpoint_restores_the_model_and_its_clusters(tmp_path):
    datamodule = digits_datamodule(stage=None)
    model = make_model([100, 77, 59, 46, 35, 27, 21, 16, 12, 10], clustering="kmeans", cluster_on="initial",
                       class_weighting="class_balanced")
    fitted = trainer(1, limit_train_batches=2)
    fitted.fit(model, datamodule=datamodule)
    path = tmp_path / "two_head.ckpt"
    fitted.save_checkpoint(path)
    assert model.is_clustered and "num_clusters" not in model.hparams  # only constructor arguments

    loaded = TwoHeadModel.load_from_checkpoint(path, backbone=create_backbone("resnet20", in_chans=1),
                                               class_counts=datamodule.class_counts)
    assert torch.equal(loaded.cluster_assignment, model.cluster_assignment)
    assert int(loaded.clustered_epoch) == int(model.clustered_epoch) == 0
    assert (loaded.clustering, loaded.cluster_on, loaded.num_clusters) == ("kmeans", "initial", model.num_clusters)
    assert (loaded.fbh.channel_assignment, loaded.fbh.channels_per_class) == ("split_floor", 6)
    assert loaded.reweighting == model.reweighting == ClassReweighting("class_balanced", 0.9999, None)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(6, 1, 8, 8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        assert torch.equal(loaded.cluster_logits(images), model.cluster_logits(images))


# ---------------------------------------------------------------------------------------------------
# Kill and resume (CLI)

#: clusters from the features after one warm-up epoch: a resumed run that re-clustered would differ
KMEANS_ARGS = ("method=two_head", "method.clustering=kmeans", "method.cluster_on=warmup",
               "method.cluster_warmup_epochs=1", "backbone=resnet20", "trainer.max_epochs=3",
               "optim.warmup_epochs=1", "data.batch_size=16")


def checkpoint_epoch(path: Path, seen: dict) -> int:
    """The ``epoch`` of a checkpoint file (-1: none yet), read again only when the file changes."""
    stamp = mtime_ns(path)
    if stamp < 0:
        return -1
    if seen.get("stamp") != stamp:
        seen.update(stamp=stamp, epoch=torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    return seen["epoch"]


def saved_assignment(run_dir: Path) -> torch.Tensor:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return state["cluster_assignment"]


@pytest.mark.slow
def test_killed_run_resumes_with_its_cluster_assignment(tmp_path):
    """SIGKILL once the epoch-1 checkpoint (clustered at the start of epoch 1) exists, resume: the final
    assignment and results equal the uninterrupted run's; the checkpoint loads with load_from_checkpoint."""
    reference = tmp_path / "reference"
    proc = run_cli(f"hydra.run.dir={reference}", *KMEANS_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    killed = start_cli(f"hydra.run.dir={run_dir}", *KMEANS_ARGS)
    seen: dict = {}
    wait_for(lambda: checkpoint_epoch(last, seen) >= 1, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"
    at_kill = torch.load(last, map_location="cpu", weights_only=True)
    assert at_kill["epoch"] == 1 and int(at_kill["state_dict"]["clustered_epoch"]) == 1

    resumed = run_cli(f"hydra.run.dir={run_dir}", *KMEANS_ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout + resumed.stderr
    final, uninterrupted = saved_assignment(run_dir), saved_assignment(reference)
    assert final.numel() == 403 and torch.equal(final, uninterrupted)
    assert torch.equal(final, at_kill["state_dict"]["cluster_assignment"])
    ours, theirs = results(run_dir), results(reference)
    for key in ("metrics", "per_class", "confusion", "epochs_trained", "checkpoint", "class_division"):
        assert ours[key] == theirs[key], key
    assert ours["class_division"]["clustered_at_epoch"] == 1
    assert metric_rows(run_dir) == metric_rows(reference)

    loaded = TwoHeadModel.load_from_checkpoint(last, backbone=create_backbone("resnet20", in_chans=1),
                                               class_counts=[100, 77, 59, 46, 35, 27, 21, 16, 12, 10])
    assert torch.equal(loaded.cluster_assignment, final)


# ---------------------------------------------------------------------------------------------------
# Two real gloo processes


class RecordingTwoHead(TwoHeadModel):
    """Also computes, on every rank, the assignment the rank would have made on its own."""

    def _cluster(self, targets: np.ndarray) -> None:
        features = self._clustering_features()
        self.rank_local = assign_clusters(targets, self.division, self.clustering, features, self.cluster_seed)
        super()._cluster(targets)


def ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    try:
        datamodule = digits_datamodule(stage=None)
        torch.manual_seed(0)
        # cluster_seed differs by rank, so that a rank clustering on its own would certainly disagree (in a real
        # run the ranks' batch-norm statistics, and with them the features, differ too)
        model = RecordingTwoHead(create_backbone("resnet20", in_chans=1), 10,
                                 [100, 77, 59, 46, 35, 27, 21, 16, 12, 10], optim=NO_SCHEDULE,
                                 clustering="kmeans", cluster_on="warmup", cluster_warmup_epochs=1, cluster_seed=rank)
        fitted = trainer(2, devices=2, strategy="ddp", limit_train_batches=2)
        fitted.fit(model, datamodule=datamodule)
        gather_on_rank0({"rank": fitted.global_rank, "world": fitted.world_size,
                         "assignment": model.cluster_assignment.cpu().numpy(), "local": model.rank_local,
                         "epoch": int(model.clustered_epoch)}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_both_ranks_of_a_gloo_run_hold_rank_zeros_assignment(tmp_path):
    out = tmp_path / "gathered.pkl"
    mp.spawn(ddp_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    ranks = pickle.loads(out.read_bytes())
    assert [(r["rank"], r["world"], r["epoch"]) for r in ranks] == [(0, 2, 1), (1, 2, 1)]
    assert not np.array_equal(ranks[0]["local"], ranks[1]["local"])  # what each would compute alone
    np.testing.assert_array_equal(ranks[0]["assignment"], ranks[1]["assignment"])
    np.testing.assert_array_equal(ranks[1]["assignment"], ranks[0]["local"])  # rank 0's, broadcast

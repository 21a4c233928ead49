"""The two-head class-balancing model: eq. 3 cluster counts, cluster assignment, soft labels (eq. 4),
the feature-balancing head's grouped convolution (eq. 1), prediction mapping, loss (eq. 2, 4), bad
options, checkpoints, presets and end-to-end CLI runs."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tests.conftest import run_cli, run_in_process

from ltlib.backbones import create_backbone
from ltlib.config import config_dir
from ltlib.data import LongTailDataModule, digits_pools, long_tail_counts
from ltlib.errors import LtlibError
from ltlib.losses import class_balanced_weights
from ltlib.methods.class_division import (
    ClassDivision,
    assign_clusters,
    class_spread_targets,
    cluster_to_class_logits,
    clusters_per_class,
    per_class_norms,
    soft_cluster_targets,
)
from ltlib.methods.two_head import FeatureBalancingHead, TwoHeadModel

DIGITS_COUNTS = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]  # digits_lt: long_tail_counts(100, 10, 10)


def eq3(counts: list[int], u: int) -> list[int]:
    """Eq. 3 written out with decimal half-up rounding (independent of the implementation)."""
    n1, nC = min(counts), max(counts)
    return [1 + int((Decimal(n - n1) / Decimal(nC - n1) * (u - 1)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            for n in counts]


def make_model(counts=DIGITS_COUNTS, in_chans: int = 1, **kwargs) -> TwoHeadModel:
    torch.manual_seed(0)
    return TwoHeadModel(create_backbone("resnet20", in_chans=in_chans), len(counts), counts, **kwargs)


def targets_of(counts: list[int], seed: int = 0) -> np.ndarray:
    """Class labels with the given counts, shuffled (dataset order is not class order)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


# ---------------------------------------------------------------------------------------------------
# Eq. 3: clusters per class


def test_clusters_per_class_follows_eq3_on_known_counts():
    # (n - 10) / 90 * 9 = 9, 4, 1.5, 0 -> 10, 5, 3 (half rounds up), 1
    assert clusters_per_class([100, 50, 25, 10], 10) == [10, 5, 3, 1]
    cifar100 = long_tail_counts(500, 100, 100)
    for u in (2, 5, 10, 20):
        assert clusters_per_class(cifar100, u) == eq3(cifar100, u)
    assert ClassDivision.from_counts(cifar100, 10).num_clusters == sum(eq3(cifar100, 10))
    assert clusters_per_class([10, 100, 25], 10) == [1, 10, 3]  # the classes' own order is kept


def test_equal_counts_and_u_one_give_one_cluster_per_class():
    assert clusters_per_class([50, 50, 50], 10) == [1, 1, 1]  # 0/0 in eq. 3: balanced data needs no division
    assert clusters_per_class([100, 50, 10], 1) == [1, 1, 1]
    assert clusters_per_class([1, 2, 3], 2) == [1, 2, 2]  # 0.5 rounds half up
    assert clusters_per_class([3, 1], 10) == [3, 1]  # never more clusters than images


def test_cluster_layout_is_contiguous_per_class():
    division = ClassDivision.from_counts([100, 50, 25, 10], 10)
    assert division.offsets == [0, 10, 15, 18]
    assert division.cluster_to_class == [0] * 10 + [1] * 5 + [2] * 3 + [3]
    index = division.cluster_index()
    assert index.shape == (4, 10) and index[1].tolist() == [10, 11, 12, 13, 14] + [19] * 5


# ---------------------------------------------------------------------------------------------------
# Cluster assignment


@pytest.mark.parametrize("strategy", ["random", "kmeans", "hierarchical"])
def test_assignment_partitions_every_class_exactly(strategy):
    counts = [40, 25, 12, 7, 3]
    division = ClassDivision.from_counts(counts, 6)
    targets = targets_of(counts)
    features = np.random.default_rng(1).normal(size=(targets.size, 5))
    assignment = assign_clusters(targets, division, strategy, features, seed=3)
    owner = np.asarray(division.cluster_to_class)
    assert assignment.shape == targets.shape
    np.testing.assert_array_equal(owner[assignment], targets)  # every image lands in a cluster of its class
    sizes = np.bincount(assignment, minlength=division.num_clusters)
    assert (sizes > 0).all()  # no empty cluster: u_c clusters of every class are used
    for c, n in enumerate(counts):
        assert sizes[owner == c].sum() == n
    np.testing.assert_array_equal(assignment, assign_clusters(targets, division, strategy, features, seed=3))
    if strategy == "random":
        for c in range(len(counts)):
            class_sizes = sizes[owner == c]
            assert class_sizes.max() - class_sizes.min() <= 1
        assert not np.array_equal(assignment, assign_clusters(targets, division, strategy, seed=4))


@pytest.mark.parametrize("strategy", ["kmeans", "hierarchical"])
def test_feature_clustering_recovers_separated_groups(strategy):
    # class 0 (30 images) = three tight, far-apart blobs; u = 3 gives class 0 three clusters
    rng = np.random.default_rng(0)
    blob = np.repeat(np.arange(3), 10)
    features = np.concatenate([np.eye(4)[blob] * 10 + rng.normal(0, 0.01, (30, 4)), rng.normal(0, 1, (10, 4))])
    targets = np.array([0] * 30 + [1] * 10)
    division = ClassDivision.from_counts([30, 10], 3)
    assignment = assign_clusters(targets, division, strategy, features, seed=0)
    for b in range(3):
        assert len(set(assignment[:30][blob == b])) == 1  # each blob is one cluster
    assert len(set(assignment[:30])) == 3 and set(assignment[30:]) == {3}


def test_assignment_rejects_missing_features_and_unknown_strategy():
    division = ClassDivision.from_counts([4, 2], 2)
    with pytest.raises(LtlibError, match="one feature row per training image"):
        assign_clusters([0, 0, 0, 0, 1, 1], division, "kmeans")
    with pytest.raises(LtlibError, match="unknown clustering 'dbscan'"):
        assign_clusters([0, 0, 0, 0, 1, 1], division, "dbscan")


# ---------------------------------------------------------------------------------------------------
# Soft labels (eq. 4)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0, 0.1])
def test_soft_labels_put_alpha_on_the_own_cluster_and_spread_the_rest(alpha):
    division = ClassDivision.from_counts([100, 50, 25, 10], 10)  # u_c = 10, 5, 3, 1
    owner = torch.tensor(division.cluster_to_class)
    u = torch.tensor(division.clusters_per_class)
    ids = torch.arange(division.num_clusters)
    q = soft_cluster_targets(ids, owner, u, alpha)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(len(ids)))
    for k in range(division.num_clusters):
        c = division.cluster_to_class[k]
        uc = division.clusters_per_class[c]
        expected = torch.zeros(division.num_clusters)
        if uc == 1:
            expected[k] = 1.0
        else:
            for j in range(division.num_clusters):
                if division.cluster_to_class[j] == c:
                    expected[j] = alpha if j == k else (1 - alpha) / (uc - 1)
        torch.testing.assert_close(q[k], expected)


def test_warmup_targets_spread_evenly_over_the_class_clusters():
    division = ClassDivision.from_counts([100, 50, 25, 10], 10)
    q = class_spread_targets(torch.tensor([0, 2, 3]), torch.tensor(division.cluster_to_class),
                             torch.tensor(division.clusters_per_class))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(3))
    assert torch.allclose(q[0, :10], torch.full((10,), 0.1)) and q[0, 10:].sum() == 0
    assert torch.allclose(q[1, 15:18], torch.full((3,), 1 / 3)) and q[2, 18] == 1.0


# ---------------------------------------------------------------------------------------------------
# Prediction mapping


def test_prediction_maps_clusters_to_classes_like_an_independent_computation():
    division = ClassDivision.from_counts([100, 50, 25, 10], 10)
    logits = torch.randn(6, division.num_clusters, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(dim=1)
    summed = torch.stack([sum(probs[:, k] for k in range(division.num_clusters)
                              if division.cluster_to_class[k] == c) for c in range(4)], dim=1)
    best = torch.stack([torch.stack([logits[:, k] for k in range(division.num_clusters)
                                     if division.cluster_to_class[k] == c]).max(dim=0).values for c in range(4)], dim=1)
    index = division.cluster_index()
    sum_prob = cluster_to_class_logits(logits, index, "sum_prob")
    assert sum_prob.shape == (6, 4)
    torch.testing.assert_close(sum_prob.softmax(dim=1), summed)  # class probability = sum of its clusters'
    torch.testing.assert_close(cluster_to_class_logits(logits, index, "max_logit"), best)
    owner = torch.tensor(division.cluster_to_class)
    assert torch.equal(cluster_to_class_logits(logits, index, "max_logit").argmax(1), owner[logits.argmax(1)])


def test_model_forward_returns_class_scores_of_the_chosen_heads():
    model = make_model().eval()
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        fmap = model.backbone.forward_features(images)
        main = cluster_to_class_logits(model.classifier(model.backbone.pool(fmap)), model.cluster_index)
        fbh = model.fbh(fmap)
        torch.testing.assert_close(model(images), main)
        model.predict_heads = "both"
        torch.testing.assert_close(model(images).exp(), (main.softmax(1) + fbh.softmax(1)) / 2)
        model.predict_heads = "fbh"
        torch.testing.assert_close(model(images), fbh)
    assert model.classifier.out_features == sum(eq3(DIGITS_COUNTS, 10)) == model.num_clusters


# ---------------------------------------------------------------------------------------------------
# Feature-balancing head (eq. 1)


@pytest.mark.parametrize("channels,classes,assignment,expected_mode,width", [
    (12, 4, "auto", "split", 3),          # D > C, a multiple: the paper's split
    (8, 8, "split", "split", 1),          # D = C
    (10, 4, "cyclic", "cyclic", 2),       # D > C, not a multiple: 2 per class, 2 channels unused
    (4, 10, "cyclic", "cyclic", 1),       # D < C: channels shared
    (10, 4, "auto", "split_floor", 2),    # D > C, not a multiple: D // C own channels per class, 2 unused
    (10, 4, "projection", "projection", 3),  # projection to ceil(D / C) per class
    (64, 10, "auto", "split_floor", 6),   # ResNet-32 on CIFAR-10
    (4, 10, "projection", "projection", 1),
    (64, 100, "auto", "projection", 1),   # ResNet-32 on CIFAR-100
])
def test_each_class_logit_reads_only_its_channel_group(channels, classes, assignment, expected_mode, width):
    torch.manual_seed(0)
    head = FeatureBalancingHead(channels, classes, assignment).eval()
    assert (head.channel_assignment, head.channels_per_class) == (expected_mode, width)
    assert head.grouped.groups == classes and head.grouped.in_channels == width * classes
    fmap = torch.randn(2, channels, 4, 4)
    # the map the grouped convolution sees: the backbone map itself, or the projected one
    projected = expected_mode == "projection"
    base = head.grouped_input(fmap).detach() if projected else fmap
    score = head.classify_groups if projected else head
    reference = score(base).detach()
    for c in (range(classes) if classes <= 10 else (0, 1, classes // 2, classes - 1)):
        own = head.group_channels(c)
        assert len(own) == width
        others = [j for j in range(base.shape[1]) if j not in own]
        perturbed = base.clone()
        perturbed[:, others] += torch.randn(2, len(others), 4, 4) * 5
        torch.testing.assert_close(score(perturbed)[:, c], reference[:, c])  # other groups do not matter
        own_changed = base.clone()
        own_changed[:, own] += 5.0 * torch.randn(2, len(own), 4, 4)
        assert not torch.allclose(score(own_changed)[:, c], reference[:, c])


def test_split_head_is_eq1_for_each_class():
    torch.manual_seed(0)
    head = FeatureBalancingHead(12, 4, "split", kernel_size=3)
    fmap = torch.randn(2, 12, 5, 5)
    z = head(fmap)
    for c in range(4):
        group = fmap[:, 3 * c:3 * c + 3]
        kernel = head.grouped.weight[c:c + 1]
        expected = F.conv2d(group, kernel, head.grouped.bias[c:c + 1], padding=1).mean(dim=(1, 2, 3))
        torch.testing.assert_close(z[:, c], expected)


def test_auto_gives_each_class_its_own_backbone_channels_when_d_is_not_a_multiple():
    """ResNet-32 on CIFAR-10 (D=64, C=10): 6 unique backbone channels per class, channels 60-63 unused by the
    FBH; on CIFAR-100 (D=64 < C=100) the projection; D=60, C=10 the paper's split."""
    torch.manual_seed(0)
    head = FeatureBalancingHead(64, 10)
    assert (head.channel_assignment, head.channels_per_class, head.project) == ("split_floor", 6, None)
    groups = [head.group_channels(c) for c in range(10)]
    assert groups == [list(range(6 * c, 6 * c + 6)) for c in range(10)]
    assert head.unused_channels == [60, 61, 62, 63] and not set(sum(groups, [])) & {60, 61, 62, 63}
    assert "channel_assignment='split_floor' (from 'auto')" in repr(head) and "unused_channels=4" in repr(head)
    # d z_c / d F by autograd, one class at a time: zero outside class c's 6 channels, non-zero inside
    fmap = torch.randn(3, 64, 4, 4, requires_grad=True)
    z = head(fmap)
    for c in range(10):
        (grad,) = torch.autograd.grad(z[:, c].sum(), fmap, retain_graph=True)
        per_channel = grad.abs().sum(dim=(0, 2, 3))
        own = torch.zeros(64, dtype=torch.bool)
        own[6 * c:6 * c + 6] = True
        assert torch.all(per_channel[~own] == 0) and torch.all(per_channel[own] > 0), c
    assert FeatureBalancingHead(64, 100).channel_assignment == "projection"
    assert (FeatureBalancingHead(60, 10).channel_assignment, FeatureBalancingHead(60, 10).channels_per_class) == (
        "split", 6)
    assert FeatureBalancingHead(64, 10, "split_floor", channels_per_class=4).unused_channels == list(range(40, 64))
    with pytest.raises(LtlibError, match="channels_per_class=7 gives 70 channels but D=64"):
        FeatureBalancingHead(64, 10, channels_per_class=7)
    with pytest.raises(LtlibError, match="split_floor needs at least one feature channel per class"):
        FeatureBalancingHead(64, 100, "split_floor")


def test_split_needs_a_multiple_and_bad_head_options_are_errors():
    with pytest.raises(LtlibError, match="D=10 to be a multiple of the classes C=4"):
        FeatureBalancingHead(10, 4, "split")
    with pytest.raises(LtlibError, match="unknown channel_assignment 'repeat'"):
        FeatureBalancingHead(10, 4, "repeat")
    with pytest.raises(LtlibError, match="fbh_kernel_size=2"):
        FeatureBalancingHead(12, 4, kernel_size=2)
    with pytest.raises(LtlibError, match="channels_per_class=2 contradicts"):
        FeatureBalancingHead(12, 4, "split", channels_per_class=2)


# ---------------------------------------------------------------------------------------------------
# Loss (L = L2 + lambda L1), class weights


def test_loss_is_soft_cluster_ce_plus_lambda_times_fbh_ce():
    model = make_model(lambda_fbh=1.5, alpha=0.5)
    targets_all = targets_of(DIGITS_COUNTS)
    assignment = model.fit_clusters(targets_all)
    indices = torch.tensor([0, 5, 17, 300, 402])
    labels = torch.as_tensor(targets_all)[indices]
    images = torch.randn(5, 1, 8, 8)
    model.train()  # batch norm uses the batch statistics, in compute_loss and below alike
    loss = model.compute_loss((images, labels, indices))
    # independent: soft labels built by hand from the assignment
    owner = model.division.cluster_to_class
    q = torch.zeros(5, model.num_clusters)
    for i, k in enumerate(assignment[indices].tolist()):
        c = owner[k]
        siblings = [j for j in range(model.num_clusters) if owner[j] == c]
        for j in siblings:
            q[i, j] = 1.0 if len(siblings) == 1 else (0.5 if j == k else 0.5 / (len(siblings) - 1))
    fmap = model.backbone.forward_features(images)
    l2 = -(q * model.classifier(model.backbone.pool(fmap)).log_softmax(1)).sum(1).mean()
    l1 = F.cross_entropy(model.fbh(fmap), labels)
    torch.testing.assert_close(loss, l2 + 1.5 * l1)


def test_mixup_mixes_cluster_and_class_labels_with_the_same_pairing(monkeypatch):
    # A stand-in mixup with lam = 0 and a reversing permutation: every image takes its partner's place,
    # so the loss must equal the unmixed loss of the reversed batch (cluster and class labels alike).
    import ltlib.methods.two_head as two_head_module

    def reverse(images, targets, num_classes, alpha):
        assert targets.shape[1] == num_classes == model.num_clusters + 10 and alpha == 1.0
        return images.flip(0), targets.flip(0), 0.0

    model = make_model(mixup_alpha=1.0)
    targets_all = targets_of(DIGITS_COUNTS)
    model.fit_clusters(targets_all)
    indices = torch.tensor([1, 50, 200, 400])
    labels = torch.as_tensor(targets_all)[indices]
    images = torch.randn(4, 1, 8, 8)
    monkeypatch.setattr(two_head_module, "mixup_batch", reverse)
    mixed = model.compute_loss((images, labels, indices))
    model.mixup_alpha = 0.0
    torch.testing.assert_close(mixed, model.compute_loss((images.flip(0), labels.flip(0), indices.flip(0))))


def test_class_weights_multiply_every_target_entry_by_its_class_weight():
    model = make_model(class_weighting="class_balanced", feature_balancing=False, reweight_from_epoch=0)
    weights = class_balanced_weights(DIGITS_COUNTS, 0.9999)
    torch.testing.assert_close(model.active_class_weights(), weights)
    targets_all = targets_of(DIGITS_COUNTS)
    model.fit_clusters(targets_all)
    indices = torch.tensor([3, 99, 250])
    labels = torch.as_tensor(targets_all)[indices]
    images = torch.randn(3, 1, 8, 8)
    loss = model.compute_loss((images, labels, indices))
    q = model.cluster_targets(labels, indices)
    logits = model.classifier(model.backbone(images))
    per_image = -(q * logits.log_softmax(1)).sum(1)
    torch.testing.assert_close(loss, (weights[labels] * per_image).mean())
    assert make_model(class_weighting="class_balanced", reweight_from_epoch=3).active_class_weights() is None


def test_undivided_model_is_plain_cross_entropy():
    model = make_model(class_division=False, feature_balancing=False)
    assert model.num_clusters == 10 and model.fbh is None and not model.needs_clusters
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 9, 9])
    torch.testing.assert_close(model.compute_loss((images, labels)), F.cross_entropy(model(images), labels))


# ---------------------------------------------------------------------------------------------------
# Options, checkpoints, data


@pytest.mark.parametrize("option,value,expected", [
    ("u", 0, "u=0"), ("u", 2.5, "u=2.5"), ("alpha", 0.0, "alpha=0.0"), ("alpha", 1.5, "alpha=1.5"),
    ("lambda_fbh", -0.5, "lambda_fbh=-0.5"), ("clustering", "dbscan", "dbscan"), ("cluster_on", "pixels", "pixels"),
    ("prediction", "vote", "vote"), ("mixup_alpha", -1.0, "mixup_alpha=-1.0"), ("class_weighting", "cb", "'cb'"),
    ("cluster_checkpoint", "/nowhere.ckpt", "/nowhere.ckpt"),
    ("reweight_from_epoch", -1, "reweight_from_epoch=-1 is invalid; allowed: an integer >= 0 or null"),
    ("reweight_from_epoch", 1.5, "reweight_from_epoch=1.5"),
])
def test_bad_options_raise_one_line_errors(option, value, expected):
    with pytest.raises(LtlibError) as info:
        make_model(**{option: value})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_reweight_start_epoch_is_the_accepted_old_name_of_reweight_from_epoch():
    old = make_model(class_weighting="class_balanced", reweight_start_epoch=3)
    assert old.reweight_epoch == 3 and old.hparams["reweight_from_epoch"] == 3
    assert "reweight_start_epoch" not in old.hparams
    assert old.active_class_weights(2) is None and old.active_class_weights(3) is not None
    with pytest.raises(LtlibError, match="reweight_start_epoch=3 and reweight_from_epoch=5 disagree"):
        make_model(reweight_start_epoch=3, reweight_from_epoch=5)


def test_checkpoint_without_file_and_fbh_prediction_without_fbh_are_errors():
    with pytest.raises(LtlibError, match="cluster_on=checkpoint needs cluster_checkpoint"):
        make_model(clustering="kmeans", cluster_on="checkpoint")
    with pytest.raises(LtlibError, match="predict_heads='both' needs the feature-balancing head"):
        make_model(feature_balancing=False, predict_heads="both")


def test_warmup_longer_than_training_is_an_error():
    model = make_model(clustering="kmeans", cluster_warmup_epochs=3)
    datamodule = SimpleNamespace(train_targets=targets_of(DIGITS_COUNTS))
    model._trainer = SimpleNamespace(max_epochs=3, current_epoch=0, datamodule=datamodule, is_global_zero=True)
    with pytest.raises(LtlibError, match="cluster_warmup_epochs=3 leaves no epoch"):
        model.on_fit_start()


def test_assignment_survives_a_checkpoint_round_trip():
    model = make_model()
    assignment = model.fit_clusters(targets_of(DIGITS_COUNTS)).clone()
    checkpoint = {"state_dict": model.state_dict()}
    fresh = make_model()
    assert not fresh.is_clustered
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.cluster_assignment, assignment) and int(fresh.clustered_epoch) == 0
    with pytest.raises(LtlibError, match="covers 403 images but the training set has 5"):
        fresh.set_cluster_assignment(assignment, [0, 1, 2, 3, 4])


def test_cluster_on_checkpoint_loads_the_backbone_of_an_ltlib_checkpoint(tmp_path):
    trained = make_model()
    with torch.no_grad():
        for p in trained.backbone.parameters():
            p.add_(1.0)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)
    model = make_model(clustering="kmeans", cluster_on="checkpoint", cluster_checkpoint=str(path))
    loaded = model._checkpoint_backbone()
    for key, value in trained.backbone.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert not torch.equal(next(model.backbone.parameters()), next(loaded.parameters()))  # a copy
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    model.cluster_checkpoint = str(tmp_path / "bad.ckpt")
    with pytest.raises(LtlibError, match="cannot read cluster_checkpoint"):
        model._checkpoint_backbone()


def test_datamodule_appends_the_dataset_position_for_train_with_index():
    datamodule = LongTailDataModule(digits_pools, imbalance_ratio=10, max_count=100, augmentation="none",
                                    mean=(0.5,), std=(0.5,), batch_size=16, val_per_class=20)
    datamodule.setup("fit")
    plain_images, plain_targets = next(iter(datamodule.train_dataloader()))
    datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(train_with_index=True,
                                                                          train_streams={"main": "uniform"}),
                                         global_rank=0, world_size=1,
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))
    images, targets, indices = next(iter(datamodule.train_dataloader()))
    assert torch.equal(images, plain_images) and torch.equal(targets, plain_targets)  # same batch, plus indices
    np.testing.assert_array_equal(datamodule.train_targets[indices.numpy()], targets.numpy())


def test_per_class_norms_reduce_each_class_clusters():
    norms = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    owner = [0, 0, 1, 2, 2]
    torch.testing.assert_close(per_class_norms(norms, owner, 3, "mean"), torch.tensor([2.0, 2.0, 4.5]))
    torch.testing.assert_close(per_class_norms(norms, owner, 3, "max"), torch.tensor([3.0, 2.0, 5.0]))


# ---------------------------------------------------------------------------------------------------
# Presets and CLI


def two_head_experiments() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("two_head*.yaml"))


@pytest.mark.parametrize("experiment", two_head_experiments())
def test_experiment_presets_compose_for_every_swept_value(experiment):
    filelist = ["data.root=/x", "data.source.train_list=a.txt", "data.source.test_list=b.txt"]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        params = {k: str(v) for k, v in (base.hydra.sweeper.params or {}).items()}
        extra = filelist if base.data.name == "imagenet_lt" else []
        values = {k: (["1", "20"] if v.startswith("range") else v.split(",")) for k, v in params.items()}
        for key, options in values.items():
            for option in options:
                cfg = compose("config", overrides=[f"experiment={experiment}", *extra, f"{key}={option}"])
                for node in ("method", "data", "backbone", "optim", "trainer"):
                    OmegaConf.to_container(cfg[node], resolve=True, throw_on_missing=True)


def test_presets_carry_the_paper_settings():
    with initialize_config_dir(config_dir(), version_base="1.3"):
        ours = compose("config", overrides=["method=two_head"]).method
        assert (ours.u, ours.alpha, ours.lambda_fbh, ours.clustering) == (10, 0.5, 1.5, "random")
        full = compose("config", overrides=["method=two_head_full"]).method
        assert full.mixup_alpha == 1.0 and full.class_weighting == "class_balanced"
        imagenet = compose("config", overrides=["experiment=two_head_full_table3_imagenet_lt"])
        assert (imagenet.optim.lr, imagenet.optim.schedule, imagenet.trainer.max_epochs) == (0.2, "cosine", 90)
        assert imagenet.data.batch_size == 512 and imagenet.backbone.name == "resnext50_32x4d"
        tiny = compose("config", overrides=["experiment=two_head_table2_tiny_imagenet"])
        assert tiny.backbone.name == "resnet18" and tiny.backbone.small_input and tiny.data.image_size == 64
        assert tiny.trainer.max_epochs == 200 and list(tiny.optim.milestones) == [120, 160]


@pytest.mark.slow
def test_cli_trains_two_head_and_writes_the_division(tiny_run_args, tmp_path):
    one_epoch = [a for a in tiny_run_args if not a.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1"]
    proc = run_cli("method=two_head", *one_epoch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    division = results["class_division"]
    assert division["clusters_per_class"] == eq3(DIGITS_COUNTS, 10)
    assert division["num_clusters"] == sum(eq3(DIGITS_COUNTS, 10)) and division["clustered_at_epoch"] == 0
    assert sum(division["cluster_sizes"]) == sum(DIGITS_COUNTS) and min(division["cluster_sizes"]) >= 1
    assert len(results["weight_norms"]["classifier"]["norms"]) == 10
    assert len(results["cluster_weight_norms"]) == division["num_clusters"]
    assert (run_dir / "weight_norms.png").is_file() and (run_dir / "fbh_weight_norms.png").is_file()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    owner = np.asarray(ClassDivision.from_counts(DIGITS_COUNTS, 10).cluster_to_class)
    assignment = state["cluster_assignment"].numpy()
    assert assignment.size == sum(DIGITS_COUNTS) and (np.bincount(owner[assignment]) == DIGITS_COUNTS).all()


@pytest.mark.slow
def test_cli_trains_two_head_full_with_kmeans_after_warmup_under_ddp(tiny_run_args, tmp_path):
    # two processes: rank 0 clusters after the warm-up epoch and broadcasts the assignment
    proc = run_cli("method=two_head_full", "method.clustering=kmeans", "method.cluster_warmup_epochs=1",
                   "trainer=ddp_cpu", "eval_checkpoint=last", *tiny_run_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    division = results["class_division"]
    assert division["clustering"] == "kmeans" and division["clustered_at_epoch"] == 1
    assert sum(division["cluster_sizes"]) == sum(DIGITS_COUNTS) and min(division["cluster_sizes"]) >= 1
    assert results["config"]["method"]["mixup_alpha"] == 1.0
    assert results["metrics"]["test"]["num_samples"] == 500
    # the other K -> C rule's metrics are summed over the ranks too
    assert results["metrics_by_prediction"]["sum_prob"]["test"]["num_samples"] == 500


def test_non_zero_ranks_adopt_the_assignment_rank_zero_broadcasts():
    model = make_model(clustering="kmeans", cluster_on="initial")
    targets = targets_of(DIGITS_COUNTS)
    from_rank_zero = torch.as_tensor(assign_clusters(targets, model.division, "random", seed=7))
    sent = []

    def broadcast(obj, src=0):
        sent.append((obj, src))
        return from_rank_zero

    # no train_dataset on this data module: a rank that tried to extract features itself would fail
    model._trainer = SimpleNamespace(is_global_zero=False, strategy=SimpleNamespace(broadcast=broadcast),
                                     current_epoch=0, max_epochs=3,
                                     datamodule=SimpleNamespace(train_targets=targets))
    model.on_fit_start()
    assert sent == [(None, 0)]
    assert torch.equal(model.cluster_assignment, from_rank_zero)


@pytest.mark.slow
def test_cli_bad_option_is_one_line_error(tiny_run_args):
    # every bad option raises the same way (see test_bad_options_raise_one_line_errors); one CLI round trip
    override, expected = "method.alpha=1.5", "alpha=1.5 is out of range; allowed: (0, 1]"
    proc = run_in_process("method=two_head", override, *tiny_run_args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]

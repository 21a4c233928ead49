"""The two-head class-balancing model (Chen, Lu, Wang and Zheng, "Improving class balancing at both
feature extractor and classifier head"; no public code, ltlib's is the first implementation).

* Feature-balancing head (auxiliary, section 2.1, eq. 1-2): the backbone's last feature map
  ``F [B, D, H, W]`` is divided into C channel groups, one per class; each group is convolved with its
  own class-specific kernel (one grouped convolution) and globally average-pooled to the class's
  logit ``z_c``; trained with cross-entropy ``L1``.
* Class-division head (main, section 2.2, eq. 3-4): every class ``c`` is divided into ``u_c`` clusters
  (:mod:`ltlib.methods.class_division`), each cluster is a class of the K-way linear head, trained
  with cross-entropy ``L2`` against smoothed cluster labels.
* ``L = L2 + lambda * L1``; at test time the K cluster outputs are mapped back to the C classes.

``two_head_full`` adds mixup and class re-weighting ("Ours-Full", table 1). Every choice the paper
leaves open is an option documented in ``docs/methods/two_head.md``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from ltlib.analysis.weight_norms import classifier_weight_norms, plot_weight_norms, weight_norm_summary
from ltlib.errors import LtlibError, check_in_range, check_int, unknown_name
from ltlib.losses import SoftTargetCrossEntropy
from ltlib.methods.base import LongTailMethod
from ltlib.methods.class_division import (
    CLUSTERINGS,
    PREDICTION_RULES,
    ClassDivision,
    assign_clusters,
    check_alpha,
    class_spread_targets,
    cluster_to_class_logits,
    per_class_norms,
    soft_cluster_targets,
)
from ltlib.methods.mixup import mixup_batch
from ltlib.methods.reweighting import ClassReweighting, resolve_reweight_alias

log = logging.getLogger("ltlib")

CHANNEL_ASSIGNMENTS = ("auto", "split", "split_floor", "cyclic", "projection")
CLUSTER_SOURCES = ("warmup", "initial", "checkpoint")
PREDICT_HEADS = ("main", "both", "fbh")


class FeatureBalancingHead(nn.Module):
    """Eq. 1: ``z_c = GAP(F_c * K_c)``, one grouped convolution over C channel groups of ``m`` channels.

    ``channel_assignment`` says which channels form class ``c``'s group when the paper's assumption
    "D / C is an integer" fails:

    * ``split``: ``D`` must be a multiple of ``C``; class ``c`` owns channels ``c m .. c m + m - 1`` of
      the backbone map (``m = D / C``) — exactly the paper's head;
    * ``split_floor``: ``D >= C``; class ``c`` owns backbone channels ``c m .. c m + m - 1`` with
      ``m = D // C`` (or ``channels_per_class``, at most ``D // C``): eq. 1 on the first ``m C``
      channels, every class with ``m`` unique channels of the backbone's own map; the ``D - m C``
      left-over channels feed the main head only (``cyclic`` with ``m C <= D``, without the gather);
    * ``cyclic``: class ``c`` reads backbone channels ``(c m + j) mod D`` for ``j < m`` (default
      ``m = max(1, D // C)``): unique channels when ``m C <= D`` (the ``D mod C`` left-over channels feed
      the main head only), channels shared by up to ``ceil(m C / D)`` classes when ``D < m C``;
    * ``projection``: a learned 1x1 convolution (+ batch norm + ReLU) maps ``F`` to ``m C`` channels
      (default ``m = ceil(D / C)``) that are then split as in ``split``; every class owns ``m`` unique
      channels of the projected map. The nonlinearity matters: without it, projection, grouped
      convolution and pooling compose to one unconstrained linear map of ``F``;
    * ``auto`` (default): ``split`` when ``D`` is a multiple of ``C``, else ``split_floor`` when
      ``D >= C``, else (``D < C``: no unique backbone channel for every class) ``projection``.

    Args:
        in_channels: ``D``, channels of the backbone's feature map.
        num_classes: ``C``.
        channel_assignment: see above.
        channels_per_class: ``m`` for ``split_floor``, ``cyclic`` and ``projection`` (``split`` fixes it
            to ``D / C``).
        kernel_size: spatial size of every class kernel ``K_c`` (odd; zero padding keeps ``H x W``).
    """

    def __init__(self, in_channels: int, num_classes: int, channel_assignment: str = "auto",
                 channels_per_class: int | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        if channel_assignment not in CHANNEL_ASSIGNMENTS:
            raise unknown_name("channel_assignment", channel_assignment, CHANNEL_ASSIGNMENTS)
        channels_per_class = check_int("channels_per_class", channels_per_class, optional=True)
        kernel_size = check_int("fbh_kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise LtlibError(f"fbh_kernel_size={kernel_size} is invalid; allowed: an odd integer >= 1")
        mode = channel_assignment
        if mode == "auto":
            mode = ("split" if in_channels % num_classes == 0
                    else "split_floor" if in_channels >= num_classes else "projection")
        if mode == "split":
            if in_channels % num_classes:
                raise LtlibError(f"channel_assignment=split needs the feature channels D={in_channels} to be a "
                                 f"multiple of the classes C={num_classes}; allowed here: cyclic, projection, auto")
            width = in_channels // num_classes
            if channels_per_class not in (None, width):
                raise LtlibError(f"channels_per_class={channels_per_class} contradicts channel_assignment=split, "
                                 f"which gives D / C = {width}; leave it null or use cyclic / projection")
        elif mode == "split_floor":
            if in_channels < num_classes:
                raise LtlibError(f"channel_assignment=split_floor needs at least one feature channel per class "
                                 f"(D={in_channels} < C={num_classes}); allowed here: cyclic, projection, auto")
            width = channels_per_class or in_channels // num_classes
            if width * num_classes > in_channels:
                raise LtlibError(f"channels_per_class={width} gives {width * num_classes} channels but D="
                                 f"{in_channels} (channel_assignment={channel_assignment}); allowed: at most "
                                 f"D // C = {in_channels // num_classes}, or use cyclic / projection")
        elif mode == "cyclic":
            width = channels_per_class or max(1, in_channels // num_classes)
        else:
            width = channels_per_class or math.ceil(in_channels / num_classes)
        self.in_channels, self.num_classes = in_channels, num_classes
        #: the resolved mode (never ``auto``) and the option as given
        self.channel_assignment, self.channels_per_class = mode, width
        self.requested_assignment = channel_assignment
        grouped_channels = width * num_classes
        self.project: nn.Module | None = None
        if mode == "projection":
            self.project = nn.Sequential(nn.Conv2d(in_channels, grouped_channels, 1, bias=False),
                                         nn.BatchNorm2d(grouped_channels), nn.ReLU(inplace=True))
        index = torch.arange(grouped_channels) % in_channels if mode == "cyclic" else None
        self.register_buffer("channel_index", index, persistent=False)
        self.grouped = nn.Conv2d(grouped_channels, num_classes, kernel_size, padding=kernel_size // 2,
                                 groups=num_classes)

    def group_channels(self, c: int) -> list[int]:
        """Channels class ``c``'s kernel reads: of the backbone map (``split``, ``split_floor``, ``cyclic``)
        or of the projected map (``projection``)."""
        channels = range(c * self.channels_per_class, (c + 1) * self.channels_per_class)
        if self.channel_assignment == "cyclic":
            return [j % self.in_channels for j in channels]
        return list(channels)

    def grouped_input(self, fmap: Tensor) -> Tensor:
        """The ``[B, m C, H, W]`` map whose consecutive ``m``-channel groups belong to the classes."""
        if self.project is not None:
            return self.project(fmap)
        if self.channel_index is not None:
            return fmap.index_select(1, self.channel_index)
        if self.channel_assignment == "split_floor":
            return fmap[:, :self.channels_per_class * self.num_classes]
        return fmap

    @property
    def unused_channels(self) -> list[int]:
        """Backbone channels the head never reads (they feed the main head only): the ``D - m C``
        left-over channels of ``split_floor`` and of ``cyclic`` with ``m C < D``; none otherwise."""
        if self.project is not None:
            return []
        return list(range(min(self.channels_per_class * self.num_classes, self.in_channels), self.in_channels))

    def classify_groups(self, grouped: Tensor) -> Tensor:
        """``z_c = GAP(grouped_c * K_c)`` for a map laid out as :meth:`grouped_input` returns it."""
        return self.grouped(grouped).mean(dim=(2, 3))

    def forward(self, fmap: Tensor) -> Tensor:
        return self.classify_groups(self.grouped_input(fmap))

    def class_kernel_norms(self) -> Tensor:
        """l2-norm of every class kernel ``K_c`` (``m x k x k`` weights)."""
        return self.grouped.weight.detach().float().flatten(1).norm(dim=1).cpu()

    def extra_repr(self) -> str:
        requested = (f" (from {self.requested_assignment!r})"
                     if self.requested_assignment != self.channel_assignment else "")
        return (f"D={self.in_channels}, C={self.num_classes}, channel_assignment={self.channel_assignment!r}"
                f"{requested}, channels_per_class={self.channels_per_class}, "
                f"unused_channels={len(self.unused_channels)}")


class TwoHeadModel(LongTailMethod):
    """Backbone + feature-balancing head (auxiliary) + class-division head (main), eq. 1-4.

    Args:
        feature_balancing: build and train the feature-balancing head (FBH; table 4 ablation).
        class_division: divide classes into clusters (CDH); ``False`` makes the main head the plain
            C-way classifier trained with cross-entropy (``u_c = 1`` everywhere).
        u: clusters of the largest class (eq. 3); the smallest class gets one.
        alpha: soft label of an image's own cluster, in (0, 1]; its ``u_c - 1`` siblings share ``1 - alpha``.
        lambda_fbh: ``lambda`` of ``L = L2 + lambda L1``, >= 0.
        clustering: ``random`` (paper default), ``kmeans`` or ``hierarchical`` (figure 4 right).
        cluster_on: features ``kmeans`` / ``hierarchical`` cluster (``random`` needs none):
            ``warmup`` — the model's own backbone after ``cluster_warmup_epochs`` epochs, during which the
            CDH trains on labels spread evenly over the class's clusters; ``initial`` — the backbone as it
            is at the start of fitting (random or ``backbone.pretrained``); ``checkpoint`` — the backbone
            weights of ``cluster_checkpoint`` (an ltlib Lightning checkpoint or a backbone state dict).
        cluster_warmup_epochs: epochs before clustering with ``cluster_on=warmup``.
        cluster_checkpoint: the file for ``cluster_on=checkpoint``.
        cluster_seed: seed of the random splitting and of k-means (the run's ``seed`` in the configs).
        channel_assignment, channels_per_class, fbh_kernel_size: see :class:`FeatureBalancingHead`.
        prediction: K -> C mapping, ``max_logit`` (the class of the best cluster; default, the paper's
            "correspondence between the K clusters and the original C classes") or ``sum_prob`` (sum of the
            class's cluster probabilities). Validation and test evaluate both rules from one forward pass:
            the configured one gives ``val/*`` / ``test/*``, each is also logged as ``val_<rule>/*`` /
            ``test_<rule>/*`` and written to ``results.json`` as ``metrics_by_prediction`` (not with
            ``predict_heads=fbh`` or when no class is divided, where the rules do not apply or coincide).
        predict_heads: what validation and test use: ``main`` (the CDH, as the paper says), ``both``
            (mean of the two heads' class probabilities) or ``fbh``.
        mixup_alpha: mixup's Beta(alpha, alpha); 0 disables mixup ("Ours-Full" uses it).
        class_weighting: ``none``, ``class_balanced`` (Cui et al., "Ours-Full") or ``inverse_frequency``.
        beta: Cui et al.'s beta for ``class_balanced``.
        reweight_from_epoch: first epoch (0-based) whose loss uses the class weights: ``null`` (default)
            defers them, DRW-style, to epoch ``floor(0.8 * trainer.max_epochs)`` (160 of 200, 72 of 90; 0
            outside a Trainer, where ``max_epochs`` reads 1); ``0`` weights from the start; any other
            integer is that epoch (the baselines' option of the same name, e.g. ``ce_drw``'s 160).
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    #: the DataModule appends each image's position in ``train_dataset`` to the training batches.
    train_with_index = True

    def __init__(
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
        feature_balancing: bool = True,
        class_division: bool = True,
        u: int = 10,
        alpha: float = 0.5,
        lambda_fbh: float = 1.5,
        clustering: str = "random",
        cluster_on: str = "warmup",
        cluster_warmup_epochs: int = 5,
        cluster_checkpoint: str | None = None,
        cluster_seed: int = 0,
        channel_assignment: str = "auto",
        channels_per_class: int | None = None,
        fbh_kernel_size: int = 3,
        prediction: str = "max_logit",
        predict_heads: str = "main",
        mixup_alpha: float = 0.0,
        class_weighting: str = "none",
        beta: float = 0.9999,
        reweight_from_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        reweight_from_epoch = resolve_reweight_alias(kwargs, reweight_from_epoch)
        u = check_int("u", u)
        alpha = check_alpha(alpha)
        check_in_range("lambda_fbh", lambda_fbh, 0.0)
        if clustering not in CLUSTERINGS:
            raise unknown_name("clustering", clustering, CLUSTERINGS)
        if cluster_on not in CLUSTER_SOURCES:
            raise unknown_name("cluster_on", cluster_on, CLUSTER_SOURCES)
        check_int("cluster_warmup_epochs", cluster_warmup_epochs, 0)
        check_int("cluster_seed", cluster_seed, 0)
        check_in_range("cluster_seed", cluster_seed, 0, 2**32 - 1)
        if cluster_on == "checkpoint" and clustering != "random":
            if not cluster_checkpoint or not Path(cluster_checkpoint).is_file():
                raise LtlibError(f"cluster_on=checkpoint needs cluster_checkpoint=FILE (an ltlib checkpoint or a "
                                 f"backbone state dict); got {cluster_checkpoint!r}, which is not a file")
        elif cluster_checkpoint is not None and cluster_on != "checkpoint":
            raise LtlibError(f"cluster_checkpoint={cluster_checkpoint!r} is only read with cluster_on=checkpoint "
                             f"(cluster_on={cluster_on!r}); set cluster_on=checkpoint or cluster_checkpoint=null")
        if prediction not in PREDICTION_RULES:
            raise unknown_name("prediction", prediction, PREDICTION_RULES)
        if predict_heads not in PREDICT_HEADS:
            raise unknown_name("predict_heads", predict_heads, PREDICT_HEADS)
        if predict_heads != "main" and not feature_balancing:
            raise LtlibError(f"predict_heads={predict_heads!r} needs the feature-balancing head; allowed with "
                             "feature_balancing=false: main")
        check_in_range("mixup_alpha", mixup_alpha, 0.0)
        reweighting = ClassReweighting(class_weighting, float(beta), reweight_from_epoch)
        division = ClassDivision.from_counts(class_counts, u if class_division else 1)
        # The class-division head: a K-way linear classifier (K = sum u_c).
        head = nn.Linear(backbone.out_dim, division.num_clusters)
        super().__init__(backbone, num_classes, class_counts, head=head, **kwargs)
        self.division = division
        self.feature_balancing, self.class_division = bool(feature_balancing), bool(class_division)
        self.u, self.alpha, self.lambda_fbh = u, float(alpha), float(lambda_fbh)
        self.clustering, self.cluster_on = clustering, cluster_on
        self.cluster_warmup_epochs, self.cluster_checkpoint = int(cluster_warmup_epochs), cluster_checkpoint
        self.cluster_seed = int(cluster_seed)
        self.prediction, self.predict_heads = prediction, predict_heads
        self.mixup_alpha = float(mixup_alpha)

        self.fbh = (FeatureBalancingHead(backbone.out_dim, num_classes, channel_assignment, channels_per_class,
                                         fbh_kernel_size) if feature_balancing else None)
        self.soft_cross_entropy = SoftTargetCrossEntropy()
        self.register_buffer("cluster_to_class", torch.tensor(division.cluster_to_class), persistent=False)
        self.register_buffer("clusters_per_class",
                             torch.tensor(division.clusters_per_class, dtype=torch.long), persistent=False)
        self.register_buffer("cluster_index", division.cluster_index(), persistent=False)
        if predict_heads != "fbh" and self.needs_clusters:  # the other K -> C rule, from the same logits
            self.add_evaluation_variants("prediction", prediction, PREDICTION_RULES)
        self.set_class_reweighting(reweighting)
        # Saved in checkpoints so that a resumed run keeps its clusters: the cluster id of every
        # training image (empty until clustered) and the epoch the clustering ran (-1: not yet).
        self.register_buffer("cluster_assignment", torch.empty(0, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))
        self.register_load_state_dict_pre_hook(self._resize_assignment)
        # Epoch means of L2 and L1 (means of the batch means), accumulated on the device; nan_strategy
        # "disable" skips torchmetrics' per-update NaN test, a host synchronisation every step.
        self.train_loss_cdh = MeanMetric(nan_strategy="disable")
        self.train_loss_fbh = MeanMetric(nan_strategy="disable")

    # ----------------------------------------------------------------- model
    @property
    def num_clusters(self) -> int:
        return self.division.num_clusters

    @property
    def needs_clusters(self) -> bool:
        """Whether any class is divided (otherwise the cluster of an image is its class)."""
        return self.division.num_clusters > self.num_classes

    @property
    def is_clustered(self) -> bool:
        return self.cluster_assignment.numel() > 0

    def cluster_logits(self, images: Tensor) -> Tensor:
        """``[B, K]`` logits of the class-division head."""
        return self.classifier(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C]`` class scores from ``predict_heads`` (the K cluster outputs mapped by ``prediction``)."""
        return self.class_scores(images, (self.prediction,))[self.prediction]

    def evaluate_variants(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured rule's class scores and those of the other K -> C rule, from one forward pass."""
        scores = self.class_scores(images, (self.prediction, *self.evaluation_variants))
        return scores.pop(self.prediction), scores

    def class_scores(self, images: Tensor, rules: Sequence[str]) -> dict[str, Tensor]:
        """``{rule: [B, C] class scores}`` of ``predict_heads`` for each K -> C rule, from one forward pass.
        With ``both`` the rule maps the main head's K logits before they are averaged with the FBH; ``fbh``
        does not use the main head (every rule gives the FBH's logits)."""
        fmap = self.backbone.forward_features(images)
        if self.predict_heads == "fbh":
            fbh = self.fbh(fmap)
            return dict.fromkeys(rules, fbh)
        cluster_logits = self.classifier(self.backbone.pool(fmap))
        main = {rule: cluster_to_class_logits(cluster_logits, self.cluster_index, rule) for rule in rules}
        if self.predict_heads == "main":
            return main
        # "both": log of the mean of the two heads' class probabilities
        fbh_log_prob = F.log_softmax(self.fbh(fmap), dim=1)
        return {rule: torch.logaddexp(F.log_softmax(scores, dim=1), fbh_log_prob) - math.log(2.0)
                for rule, scores in main.items()}

    # -------------------------------------------------------------- training
    def compute_loss(self, batch: Any) -> Tensor:
        """``L = L2 + lambda L1``: soft-label cross-entropy of the K-way head (eq. 4) plus lambda times the
        feature-balancing head's cross-entropy (eq. 2), on mixed images/labels and with class weights
        when enabled."""
        images, targets, indices = self._unpack(batch)
        cluster_targets = self.cluster_targets(targets, indices)
        class_targets = F.one_hot(targets, self.num_classes).to(cluster_targets.dtype)
        if self.mixup_alpha > 0:
            # One permutation and one lambda mix both label sets (cluster labels and class labels).
            images, mixed, _ = mixup_batch(images, torch.cat([cluster_targets, class_targets], dim=1),
                                           self.num_clusters + self.num_classes, self.mixup_alpha)
            cluster_targets, class_targets = mixed.split([self.num_clusters, self.num_classes], dim=1)
        weights = self.active_class_weights()
        if weights is not None:
            # Weighted soft cross-entropy: every target entry is weighted by the weight of its class.
            cluster_targets = cluster_targets * weights[self.cluster_to_class]
            class_targets = class_targets * weights
        fmap = self.backbone.forward_features(images)
        loss_cdh = self.soft_cross_entropy(self.classifier(self.backbone.pool(fmap)), cluster_targets)
        self.train_loss_cdh.update(loss_cdh.detach())
        if self.fbh is None:
            return loss_cdh
        loss_fbh = self.soft_cross_entropy(self.fbh(fmap), class_targets)
        self.train_loss_fbh.update(loss_fbh.detach())
        return loss_cdh + self.lambda_fbh * loss_fbh

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(batch, Mapping):
            raise LtlibError(f"{type(self).__name__} trains on one stream; got streams {list(batch)}")
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        return batch[0], batch[1], None

    def cluster_targets(self, targets: Tensor, indices: Tensor | None) -> Tensor:
        """``[B, K]`` soft labels q of eq. 4 for images of classes ``targets`` at dataset positions
        ``indices``; before clustering (``cluster_on=warmup``) ``1 / u_c`` on each cluster of the class."""
        if not self.needs_clusters:
            return F.one_hot(targets, self.num_classes).to(torch.float32)
        if not self.is_clustered:
            return class_spread_targets(targets, self.cluster_to_class, self.clusters_per_class)
        if indices is None:
            raise LtlibError(f"{type(self).__name__} needs (images, targets, indices) training batches to look up "
                             "each image's cluster; LongTailDataModule provides them (train_with_index), another "
                             "loader needs a dataset whose items are (image, target, index), index the image's "
                             "position in the targets given to fit_clusters")
        return soft_cluster_targets(self.cluster_assignment[indices], self.cluster_to_class, self.clusters_per_class,
                                    self.alpha)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("train/loss_cdh", self.train_loss_cdh.compute(), sync_dist=True)
        self.train_loss_cdh.reset()
        if self.fbh is not None:
            self.log("train/loss_fbh", self.train_loss_fbh.compute(), sync_dist=True)
            self.train_loss_fbh.reset()

    # ------------------------------------------------------------ clustering
    def on_fit_start(self) -> None:
        if not self.needs_clusters:
            return
        if self.is_clustered:  # restored from a checkpoint, or set by fit_clusters
            # checked against the DataModule's labels when there is one; a plain DataLoader is fine
            targets = self._train_targets(required=False)
            if targets is not None:
                self._check_assignment(self.cluster_assignment.cpu(), targets)
            return
        targets = self._train_targets()
        waits = self.clustering != "random" and self.cluster_on == "warmup"
        if waits and self.cluster_warmup_epochs >= self.max_epochs:
            raise LtlibError(f"cluster_warmup_epochs={self.cluster_warmup_epochs} leaves no epoch to train on the "
                             f"clusters (trainer.max_epochs={self.max_epochs}); allowed: < max_epochs")
        if not waits or self.current_epoch >= self.cluster_warmup_epochs:
            self._cluster(targets)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.needs_clusters and not self.is_clustered and self.current_epoch >= self.cluster_warmup_epochs:
            self._cluster(self._train_targets())

    def fit_clusters(self, targets: Sequence[int] | np.ndarray, features: np.ndarray | None = None) -> Tensor:
        """Divide the training images (classes ``targets``, in dataset order) into clusters with
        ``clustering`` and ``cluster_seed``, store and return the assignment (usable without a Trainer).

        Training can then run on any loader whose batches are ``(images, targets, indices)``, ``indices``
        the images' positions in ``targets`` (a LongTailDataModule is not needed; with one, its training
        labels must match ``targets``)."""
        targets = np.asarray(targets, dtype=np.int64)
        assignment = torch.as_tensor(assign_clusters(targets, self.division, self.clustering, features,
                                                     self.cluster_seed))
        self.set_cluster_assignment(assignment, targets)
        return self.cluster_assignment

    def set_cluster_assignment(self, assignment: Tensor, targets: Sequence[int] | np.ndarray | None = None) -> None:
        """Store the cluster id of every training image (checked against ``targets`` when given)."""
        assignment = torch.as_tensor(assignment, dtype=torch.long).cpu()
        if targets is not None:
            self._check_assignment(assignment, np.asarray(targets, dtype=np.int64))
        self.cluster_assignment = assignment.to(self.cluster_to_class.device)
        self.clustered_epoch = torch.tensor(self.current_epoch if self._trainer is not None else 0,
                                            dtype=torch.long, device=self.cluster_to_class.device)

    def _check_assignment(self, assignment: Tensor, targets: np.ndarray) -> None:
        if assignment.numel() != targets.size:
            raise LtlibError(f"the cluster assignment covers {assignment.numel()} images but the training set has "
                             f"{targets.size}; resume with the data the checkpoint was trained on")
        ids = assignment.numpy()
        if ids.min() < 0 or ids.max() >= self.num_clusters or (
                np.asarray(self.division.cluster_to_class)[ids] != targets).any():
            raise LtlibError("the cluster assignment does not match the training labels (an image is in a cluster "
                             "of another class); resume with the data the checkpoint was trained on")

    def _cluster(self, targets: np.ndarray) -> None:
        """Compute the assignment on rank 0 and broadcast it, so every rank holds the same one."""
        assignment = None
        if self._trainer is None or self.trainer.is_global_zero:
            features = self._clustering_features() if self.clustering != "random" else None
            assignment = torch.as_tensor(assign_clusters(targets, self.division, self.clustering, features,
                                                         self.cluster_seed))
        if self._trainer is not None:
            assignment = self.trainer.strategy.broadcast(assignment, src=0)
        self.set_cluster_assignment(assignment, targets)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        sizes = torch.bincount(self.cluster_assignment.cpu(), minlength=self.num_clusters)
        log.info("two-head: %d classes divided into %d clusters (u=%d, %s) at epoch %d; cluster sizes %d..%d",
                 self.num_classes, self.num_clusters, self.u, self.clustering, int(self.clustered_epoch),
                 int(sizes.min()), int(sizes.max()))

    def _datamodule(self, required: bool = True) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "train_targets"):
            if not required:
                return None
            raise LtlibError(f"{type(self).__name__} reads the training labels from a LongTailDataModule; call "
                             "fit_clusters(targets) before training with another data source, whose batches must "
                             "then be (images, targets, indices), indices the images' positions in targets")
        return datamodule

    def _train_targets(self, required: bool = True) -> np.ndarray | None:
        datamodule = self._datamodule(required)
        return None if datamodule is None else np.asarray(datamodule.train_targets, dtype=np.int64)

    def _clustering_features(self) -> np.ndarray:
        """l2-normalised pooled features of every training image (evaluation transform, dataset order)."""
        datamodule = self._datamodule()
        loader = DataLoader(datamodule.eval_dataset("train"), batch_size=datamodule.eval_batch_size, shuffle=False,
                            num_workers=datamodule.num_workers)
        backbone = self._checkpoint_backbone() if self.cluster_on == "checkpoint" else self.backbone
        return backbone_features(backbone, loader, self.device)

    def _checkpoint_backbone(self) -> nn.Module:
        """A copy of the backbone carrying the weights of ``cluster_checkpoint``."""
        from ltlib.runs import read_state_dict

        path = str(self.cluster_checkpoint)
        state = read_state_dict(path, key="cluster_checkpoint")
        from_method = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        backbone = copy.deepcopy(self.backbone)
        load = getattr(backbone, "load_pretrained", None)
        if load is not None:
            load(from_method or state, source=f"cluster_checkpoint={path!r}")
        else:
            try:
                backbone.load_state_dict(from_method or state)
            except RuntimeError as exc:
                raise LtlibError(f"cluster_checkpoint {path} does not fit the backbone: "
                                 f"{str(exc).strip().splitlines()[0]}") from exc
        return backbone.to(self.device)

    def _resize_assignment(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Before ``load_state_dict``: the assignment's length is the training-set size, unknown at
        construction, so the empty buffer takes the saved one's shape (a resumed run keeps its clusters)."""
        saved = state_dict.get(prefix + "cluster_assignment")
        if isinstance(saved, Tensor) and saved.shape != self.cluster_assignment.shape:
            self.cluster_assignment = torch.empty_like(saved, device=self.cluster_assignment.device)

    # ------------------------------------------------------------ end of run
    def class_weight_norms(self) -> dict[str, Tensor]:
        """Figure 3: the mean l2-norm of each class's cluster weight vectors in the main head and, with the
        feature-balancing head, the norm of each class's kernel."""
        cluster_norms = classifier_weight_norms(self.classifier.weight)
        norms = {"classifier": per_class_norms(cluster_norms, self.division.cluster_to_class, self.num_classes,
                                               "mean")}
        if self.fbh is not None:
            norms["feature_balancing_head"] = self.fbh.class_kernel_norms().detach().float().cpu()
        return norms

    def on_run_end(self, output_dir: Path) -> dict[str, Any]:
        """Figure 3: per-class weight norms of the main head (the mean of the l2-norms of the class's
        cluster weight vectors) in ``weight_norms.png``; the feature-balancing head's per-class kernel
        norms in ``fbh_weight_norms.png``; the class division in ``results.json``."""
        counts = self.class_counts.tolist()
        norms = self.class_weight_norms()
        plot_weight_norms({"classifier": norms["classifier"]}, counts, Path(output_dir) / "weight_norms.png",
                          title="Class-division head: mean weight norm of each class's clusters")
        if self.fbh is not None:
            plot_weight_norms({"feature_balancing_head": norms["feature_balancing_head"]}, counts,
                              Path(output_dir) / "fbh_weight_norms.png",
                              title="Feature-balancing head: kernel norm of each class")
        cluster_norms = classifier_weight_norms(self.classifier.weight)
        norms["classifier_max"] = per_class_norms(cluster_norms, self.division.cluster_to_class, self.num_classes,
                                                  "max")
        sizes = (torch.bincount(self.cluster_assignment.cpu(), minlength=self.num_clusters).tolist()
                 if self.is_clustered else None)
        return {
            "weight_norms": weight_norm_summary(norms),
            "cluster_weight_norms": cluster_norms.tolist(),
            "class_division": {
                "u": self.u if self.class_division else 1,
                "num_clusters": self.num_clusters,
                "clusters_per_class": list(self.division.clusters_per_class),
                "clustering": self.clustering,
                "cluster_on": self.cluster_on if self.clustering != "random" else None,
                "clustered_at_epoch": int(self.clustered_epoch) if self.is_clustered else None,
                "cluster_sizes": sizes,
            },
            "feature_balancing_head": None if self.fbh is None else {
                "channel_assignment": self.fbh.channel_assignment,  # resolved: never "auto"
                "channel_assignment_option": self.fbh.requested_assignment,
                "channels_per_class": self.fbh.channels_per_class,
                "in_channels": self.fbh.in_channels,
                "unused_channels": len(self.fbh.unused_channels),
            },
            "class_reweighting": self.reweighting.summary(self.optim, self.max_epochs),
        }


@torch.no_grad()
def backbone_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """l2-normalised pooled features ``[N, D]`` of a loader's images, the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        features = [F.normalize(backbone(batch[0].to(device)).float(), dim=1).cpu() for batch in loader]
    finally:
        backbone.train(was_training)
    return torch.cat(features).numpy()

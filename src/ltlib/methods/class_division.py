"""Class division of the two-head model (Chen et al., "Improving class balancing at both feature
extractor and classifier head", section 2.2): each class ``c`` is split into ``u_c`` clusters (eq. 3),
every cluster is a new class of the K-way main head, trained on smoothed cluster labels (eq. 4), and
the K outputs are mapped back to the C classes at test time.

Plain functions and one frozen dataclass, usable without Lightning:

* :func:`clusters_per_class` — eq. 3, ``u_c = 1 + round((n_c - n_1) / (n_C - n_1) * (u - 1))``;
* :class:`ClassDivision` — the cluster layout (class ``c`` owns the contiguous cluster ids
  ``offsets[c] .. offsets[c] + u_c - 1``);
* :func:`assign_clusters` — random splitting, k-means or hierarchical clustering of every class;
* :func:`soft_cluster_targets` / :func:`class_spread_targets` — the soft labels q of eq. 4;
* :func:`cluster_to_class_logits` — K cluster logits to C class logits (``max_logit`` or ``sum_prob``);
* :func:`per_class_norms` — one weight norm per class from the K cluster weight norms (figure 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ltlib.errors import LtlibError, check_in_range, check_int, unknown_name

CLUSTERINGS = ("random", "kmeans", "hierarchical")
PREDICTION_RULES = ("max_logit", "sum_prob")
NORM_REDUCTIONS = ("mean", "max")


def check_u(u: object) -> int:
    """``u`` (clusters of the largest class) must be an integer >= 1."""
    return check_int("u", u, 1, meaning="clusters of the largest class")


def clusters_per_class(class_counts: Sequence[int], u: int) -> list[int]:
    """Eq. 3: ``u_c = 1 + round((n_c - n_1) / (n_C - n_1) * (u - 1))``, then at most ``n_c``.

    ``n_1`` / ``n_C`` are the smallest / largest counts (the paper sorts the classes; eq. 3 only needs
    the extremes, so the result is in the classes' own order). Rounding is half-up (0.5 -> 1), computed
    in exact integer arithmetic. Equal counts everywhere (``n_C = n_1``, eq. 3 is 0/0) give
    ``u_c = 1``: the data is balanced already, so the head is the plain C-way classifier. A class with
    fewer images than eq. 3 asks for gets one cluster per image (no empty clusters).
    """
    u = check_u(u)
    counts = [int(n) for n in class_counts]
    if not counts or min(counts) < 1:
        raise LtlibError(f"class_counts must be positive for every class; got {counts[:10]}")
    smallest, largest = min(counts), max(counts)
    span = largest - smallest
    if span == 0:
        return [1] * len(counts)
    # round half up of (n - n_1) (u - 1) / span  ==  floor((2 (n - n_1) (u - 1) + span) / (2 span))
    return [min(n, 1 + (2 * (n - smallest) * (u - 1) + span) // (2 * span)) for n in counts]


@dataclass(frozen=True)
class ClassDivision:
    """The cluster layout: ``u_c`` clusters per class, numbered class by class.

    Attributes:
        clusters_per_class: ``u_c`` of every class, in class order.
        offsets: the first cluster id of every class (``offsets[c] = sum_{j<c} u_j``).
        cluster_to_class: the class of every cluster id ``0 .. K-1``.
    """

    clusters_per_class: tuple[int, ...]

    @classmethod
    def from_counts(cls, class_counts: Sequence[int], u: int) -> ClassDivision:
        return cls(tuple(clusters_per_class(class_counts, u)))

    @property
    def num_classes(self) -> int:
        return len(self.clusters_per_class)

    @property
    def num_clusters(self) -> int:
        """K = sum_c u_c."""
        return int(sum(self.clusters_per_class))

    @property
    def offsets(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.clusters_per_class)[:-1]]).astype(int).tolist()

    @property
    def cluster_to_class(self) -> list[int]:
        return np.repeat(np.arange(self.num_classes), self.clusters_per_class).tolist()

    def cluster_index(self) -> Tensor:
        """``[C, max u_c]`` long tensor of every class's cluster ids, padded with ``K`` (one past the
        last id) where a class has fewer than ``max u_c`` clusters."""
        width = max(self.clusters_per_class)
        index = torch.full((self.num_classes, width), self.num_clusters, dtype=torch.long)
        for c, (start, count) in enumerate(zip(self.offsets, self.clusters_per_class, strict=True)):
            index[c, :count] = torch.arange(start, start + count)
        return index


def _split_randomly(count: int, parts: int, rng: np.random.RandomState) -> np.ndarray:
    """Labels ``0 .. parts-1`` for ``count`` items: a random permutation cut into near-equal chunks."""
    labels = np.empty(count, dtype=np.int64)
    for part, chunk in enumerate(np.array_split(rng.permutation(count), parts)):
        labels[chunk] = part
    return labels


def _cluster_features(features: np.ndarray, parts: int, strategy: str, rng: np.random.RandomState) -> np.ndarray:
    """Labels ``0 .. parts-1`` from k-means or Ward hierarchical clustering of ``features``."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if strategy == "kmeans":
        seed = int(rng.randint(0, 2**31 - 1))
        return KMeans(n_clusters=parts, n_init=10, random_state=seed).fit_predict(features).astype(np.int64)
    return AgglomerativeClustering(n_clusters=parts, linkage="ward").fit_predict(features).astype(np.int64)


def assign_clusters(targets: Sequence[int] | np.ndarray, division: ClassDivision, strategy: str = "random",
                    features: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The cluster id (``0 .. K-1``) of every training image.

    Each class's images are divided into its ``u_c`` clusters, independently of the other classes and
    in class order, with one ``np.random.RandomState(seed)``:

    * ``random``: the class's images, randomly permuted, cut into ``u_c`` near-equal chunks (sizes
      differ by at most one); ``features`` are not used;
    * ``kmeans``: scikit-learn k-means (10 initialisations, seeded) of the class's ``features``;
    * ``hierarchical``: scikit-learn agglomerative clustering with Ward linkage (deterministic).

    ``features`` is ``[N, D]`` (one row per image, e.g. l2-normalised pooled backbone features).
    Every cluster receives at least one image (``u_c <= n_c`` by :func:`clusters_per_class`, and both
    scikit-learn methods return exactly ``u_c`` non-empty clusters).
    """
    if strategy not in CLUSTERINGS:
        raise unknown_name("clustering", strategy, CLUSTERINGS)
    labels = np.asarray(targets, dtype=np.int64).reshape(-1)
    counts = np.bincount(labels, minlength=division.num_classes)
    if counts.size != division.num_classes or (counts < np.asarray(division.clusters_per_class)).any():
        raise LtlibError(f"the training targets have {counts.size} classes with counts {counts.tolist()[:10]}, "
                         f"which cannot hold the class division {list(division.clusters_per_class)[:10]} "
                         f"({division.num_classes} classes)")
    if strategy != "random":
        if features is None or len(features) != labels.size:
            got = "no features" if features is None else f"features for {len(features)} images"
            raise LtlibError(f"clustering={strategy!r} needs one feature row per training image "
                             f"({labels.size}); got {got}")
        features = np.asarray(features, dtype=np.float64).reshape(labels.size, -1)
    rng = np.random.RandomState(seed)
    assignment = np.empty(labels.size, dtype=np.int64)
    for c, (start, parts) in enumerate(zip(division.offsets, division.clusters_per_class, strict=True)):
        members = np.flatnonzero(labels == c)
        if parts == 1:
            local = np.zeros(members.size, dtype=np.int64)
        elif strategy == "random":
            local = _split_randomly(members.size, parts, rng)
        else:
            local = _cluster_features(features[members], parts, strategy, rng)
        assignment[members] = start + local
    return assignment


def soft_cluster_targets(cluster_ids: Tensor, cluster_to_class: Tensor, clusters_per_class: Tensor,
                         alpha: float) -> Tensor:
    """Soft labels of eq. 4: ``alpha`` on the image's own cluster and ``(1 - alpha) / (u_c - 1)`` on each
    of the ``u_c - 1`` other clusters of its class; all mass on the own cluster when ``u_c = 1``.

    Args:
        cluster_ids: ``[B]`` cluster id of every image.
        cluster_to_class: ``[K]`` class of every cluster.
        clusters_per_class: ``[C]`` ``u_c``.
    Returns:
        ``[B, K]`` float rows summing to one.
    """
    classes = cluster_to_class[cluster_ids]
    u = clusters_per_class[classes].to(torch.float32)
    divided = u > 1
    sibling_value = torch.where(divided, (1.0 - alpha) / (u - 1.0).clamp(min=1.0), torch.zeros_like(u))
    own_value = torch.where(divided, torch.full_like(u, alpha), torch.ones_like(u))
    same_class = (cluster_to_class.unsqueeze(0) == classes.unsqueeze(1)).to(torch.float32)
    targets = same_class * sibling_value.unsqueeze(1)
    return targets.scatter(1, cluster_ids.unsqueeze(1), own_value.unsqueeze(1))


def class_spread_targets(class_targets: Tensor, cluster_to_class: Tensor, clusters_per_class: Tensor) -> Tensor:
    """``[B, K]`` targets ``1 / u_c`` on every cluster of the image's class: the labels the class-division
    head trains on before the clusters exist (``cluster_on=warmup``); rows sum to one."""
    u = clusters_per_class[class_targets].to(torch.float32)
    same_class = (cluster_to_class.unsqueeze(0) == class_targets.unsqueeze(1)).to(torch.float32)
    return same_class / u.unsqueeze(1)


def cluster_to_class_logits(cluster_logits: Tensor, cluster_index: Tensor, rule: str = "max_logit") -> Tensor:
    """Map ``[B, K]`` cluster logits to ``[B, C]`` class scores.

    * ``max_logit`` (default): ``max_{k in c} z_k``, i.e. the class of the most probable cluster;
    * ``sum_prob``: ``s_c = log sum_{k in c} exp(z_k)``, whose softmax over classes is exactly the sum of
      the class's cluster probabilities under the K-way softmax. With eq. 4's labels the K-way loss is
      cross-entropy on these ``s_c`` plus a within-class term, so its decision is the one of a class-level
      cross-entropy classifier (``docs/methods/two_head.md``, section 5).

    ``cluster_index`` is :meth:`ClassDivision.cluster_index` (padding id ``K``).
    """
    if rule not in PREDICTION_RULES:
        raise unknown_name("prediction rule", rule, PREDICTION_RULES)
    padding = cluster_logits.new_full((cluster_logits.shape[0], 1), float("-inf"))
    grouped = torch.cat([cluster_logits, padding], dim=1)[:, cluster_index]  # [B, C, max u_c]
    if rule == "sum_prob":
        return torch.logsumexp(grouped, dim=2)
    return grouped.max(dim=2).values


def per_class_norms(cluster_norms: Tensor, cluster_to_class: Sequence[int], num_classes: int,
                    reduction: str = "mean") -> Tensor:
    """One weight norm per class from the K cluster weight norms: the ``mean`` (default) or ``max``
    over the class's clusters (equal to the plain norm when ``u_c = 1``)."""
    if reduction not in NORM_REDUCTIONS:
        raise unknown_name("norm reduction", reduction, NORM_REDUCTIONS)
    owner = torch.as_tensor(list(cluster_to_class), dtype=torch.long)
    norms = cluster_norms.detach().float().cpu()
    if reduction == "mean":
        totals = torch.zeros(num_classes).index_add_(0, owner, norms)
        return totals / torch.bincount(owner, minlength=num_classes).clamp(min=1)
    return torch.full((num_classes,), float("-inf")).scatter_reduce_(0, owner, norms, reduce="amax")


def check_alpha(alpha: float) -> float:
    """The own-cluster label ``alpha`` must lie in (0, 1]."""
    return check_in_range("alpha", alpha, 0.0, 1.0, low_inclusive=False)

"""Feature-balanced loss (FBL; Li, Cheung and Jiang, eq. 5-8).

FBL lowers every class's logit by a class-dependent *stimulus* divided by the feature norm,

    z_j^b = z_j - alpha(t) * lambda * s_j / ||f||                      (eq. 5, eq. 6 for s_j)

and trains with cross-entropy on ``z^b`` (eq. 8). Tail classes get the larger stimulus ``s_j``, so
their samples can only reach a low loss by growing ``||f||``; ``alpha(t)`` is a curriculum that
rises from 0 (eq. 7, table 4). At evaluation the raw logits ``z`` are used.

Paper versus official code (github.com/juyongjiang/FBL, ``loss.py`` and ``train.py``):

* stimulus: the paper's eq. 6 is ``s_j = log n_max - log n_j``; the code divides it by its maximum,
  ``log n_max - log n_min``, so ``s_j`` lies in [0, 1] (``stimulus="normalized"``, the default here).
  The two differ only by a constant: ``stimulus="log"`` with ``lambda_=L`` equals
  ``stimulus="normalized"`` with ``lambda_=L * log(n_max / n_min)``.
* scale: the paper writes ``alpha(t) ∝ (t/T)^2`` without the constant; the code multiplies by
  ``lambda_`` (``--lambda_``, default 60, used for CIFAR; ``run.sh`` uses 150 for ImageNet-LT,
  iNaturalist and Places-LT).
* curriculum: the code computes ``alpha = (epoch / (epochs - 10)) ** 2`` once per epoch with the
  0-based epoch and no clipping, so alpha reaches 1 at epoch ``epochs - 10`` and keeps growing
  (``(199 / 190) ** 2 ≈ 1.097`` in the last of 200 epochs). ``progress_mode="official"`` with
  :meth:`FeatureBalancedLoss.official_progress` reproduces this; the default ``"standard"`` mode
  takes progress in [0, 1] as eq. 7 does. (The code's commented-out alternative curricula use
  ``epoch / epochs``, without the ``- 10``.)
* evaluation: the code's validation calls the loss with ``curr=0`` (plain CE) and predicts from the
  raw scores; here too, predictions use the raw logits.
* zero norms: the code divides by ``||f|| + 1e-12``; here the norm is clamped to at least ``eps``
  (the same in float32 unless ``||f||`` is below about 1e-5).
* equal class counts make the code's normalised stimulus 0/0 = NaN; here it is 0 (plain CE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ltlib.errors import LtlibError, check_in_range, unknown_name
from ltlib.losses.base import AdjustedCrossEntropyLoss, check_logits, compute_dtype, shape_str
from ltlib.losses.registry import register_loss
from ltlib.losses.weights import as_class_counts
from ltlib.schedules import get_schedule

STIMULI = ("normalized", "log")
PROGRESS_MODES = ("standard", "official")


def feature_balanced_stimulus(class_counts: Sequence[int] | Tensor, stimulus: str = "normalized") -> Tensor:
    """Per-class stimulus ``s_j`` of FBL, a float32 tensor of shape ``[C]`` (0 for the largest class).

    ``"log"``: ``s_j = log n_max - log n_j`` (eq. 6). ``"normalized"`` (official code): the same divided
    by ``log n_max - log n_min``, so the rarest class gets 1. All-equal counts give all zeros.

    >>> feature_balanced_stimulus([100, 10, 1]).tolist()
    [0.0, 0.5, 1.0]
    """
    if stimulus not in STIMULI:
        raise unknown_name("stimulus", stimulus, STIMULI)
    log_counts = as_class_counts(class_counts).log()
    s = log_counts.max() - log_counts
    if stimulus == "normalized":
        span = float(s.max())
        s = s / span if span > 0 else torch.zeros_like(s)
    return s.float()


@register_loss("feature_balanced")
class FeatureBalancedLoss(AdjustedCrossEntropyLoss):
    """Cross-entropy on feature-balanced logits (FBL eq. 5 and 8).

    For every class ``j`` the logit becomes ``z_j - alpha(t) * lambda_ * s_j / max(||f||, eps)``,
    where ``f`` is the sample's penultimate feature (the classifier's input), ``s_j`` the stimulus of
    :func:`feature_balanced_stimulus` and ``alpha(t)`` the curriculum ``schedule`` evaluated at the
    training progress set by :meth:`set_progress`. The features are *not* detached: the loss pushes
    tail-class feature norms up through them. Training uses this loss; evaluation uses the raw
    logits ``z`` (the stimulus is a training signal only, as in the official code).

    Args:
        class_counts: training images per class (all positive), ``C`` entries.
        lambda_: stimulus strength ``lambda`` (official code: 60 on CIFAR, 150 on large datasets).
        stimulus: ``"normalized"`` (official code, default) or ``"log"`` (paper eq. 6).
        schedule: the name of ``alpha(t)`` in :mod:`ltlib.schedules`; FBL table 4 uses
            ``parabolic_increment`` (default), ``linear_increment``, ``sine_increment``,
            ``cosine_increment`` and ``linear_decay``.
        progress_mode: ``"standard"``: progress ``p`` in [0, 1] (e.g. epoch / max_epochs) and
            ``alpha = schedule(p)``. ``"official"``: ``p`` in [0, inf), normally from
            :meth:`official_progress`, ``epoch / (max_epochs - 10)``, which exceeds 1 in the last ten
            epochs and is not clipped, exactly like the official code.
        weight: optional per-class weights, treated as in ``F.cross_entropy(weight=...)``: ``"mean"``
            is ``sum_i w_{y_i} l_i / sum_i w_{y_i}``. May be replaced later (``loss.weight = w``,
            e.g. for deferred re-weighting); it is not saved in ``state_dict``.
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`.
        eps: lower bound on the feature norm, so an all-zero feature gives no division by zero.
        check_finite: raise an :class:`~ltlib.errors.LtlibError` when ``features`` hold NaN or inf.
            The check reads one boolean back from the device, a host sync per call on a GPU; pass
            ``False`` to skip it in tight GPU loops (non-finite features then give a NaN loss).

    Shapes: ``logits [B, C]``, ``targets [B]`` (int64 class indices), ``features [B, D]``.

    Example (plain PyTorch, no trainer)::

        import torch
        from ltlib.losses import FeatureBalancedLoss
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 64), torch.nn.ReLU())
        classifier = torch.nn.Linear(64, 10)
        criterion = FeatureBalancedLoss(class_counts=[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
        optimizer = torch.optim.SGD([*backbone.parameters(), *classifier.parameters()], lr=0.1)
        images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        criterion.set_progress(0.5)                      # epoch / max_epochs
        features = backbone(images)
        loss = criterion(classifier(features), targets, features)
        loss.backward(); optimizer.step()
    """

    extra_inputs = ("features",)  # called as loss(logits, targets, features)

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        lambda_: float = 60.0,
        stimulus: str = "normalized",
        schedule: str = "parabolic_increment",
        progress_mode: str = "standard",
        weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        eps: float = 1e-12,
        check_finite: bool = True,
    ) -> None:
        counts = as_class_counts(class_counts)
        check_in_range("lambda_", float(lambda_), 0.0, math.inf, high_inclusive=False)
        if progress_mode not in PROGRESS_MODES:
            raise unknown_name("progress_mode", progress_mode, PROGRESS_MODES)
        check_in_range("eps", float(eps), 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        schedule_fn = get_schedule(schedule)
        class_stimulus = feature_balanced_stimulus(counts, stimulus)
        super().__init__(num_classes=counts.numel(), weight=weight, reduction=reduction)
        self._schedule_fn = schedule_fn
        self.lambda_ = float(lambda_)
        self.stimulus = stimulus
        self.schedule = schedule
        self.progress_mode = progress_mode
        self.eps = float(eps)
        self.check_finite = bool(check_finite)
        self._progress = 0.0
        self.register_buffer("class_stimulus", class_stimulus, persistent=False)

    # ---- curriculum -------------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """The training progress last given to :meth:`set_progress` (0 until then)."""
        return self._progress

    @property
    def alpha(self) -> float:
        """The stimulus strength ``alpha(t) = schedule(progress)`` (eq. 7), not clipped."""
        return float(self._schedule_fn(self._progress))

    def set_progress(self, progress: float) -> None:
        """Set training progress: in [0, 1] in ``"standard"`` mode, in [0, inf) in ``"official"`` mode."""
        p = float(progress)
        if self.progress_mode == "standard":
            check_in_range("progress", p, 0.0, 1.0)
        else:
            check_in_range("progress", p, 0.0, math.inf, high_inclusive=False)
        self._progress = p

    def set_epoch(self, epoch: float, max_epochs: int) -> None:
        """Set progress from a 0-based epoch: ``epoch / max_epochs`` in ``"standard"`` mode,
        :meth:`official_progress` (``epoch / (max_epochs - 10)``) in ``"official"`` mode."""
        if self.progress_mode == "official":
            self.set_progress(self.official_progress(epoch, max_epochs))
            return
        check_in_range("max_epochs", float(max_epochs), 0.0, None, low_inclusive=False)
        check_in_range("epoch", float(epoch), 0.0, float(max_epochs))
        self.set_progress(float(epoch) / float(max_epochs))

    @classmethod
    def official_progress(cls, epoch: float, max_epochs: int) -> float:
        """The official code's progress ``epoch / (max_epochs - 10)`` for a 0-based ``epoch``.

        The official ``train.py`` sets ``alpha = (epoch / (epochs - 10)) ** 2`` at the start of each
        epoch and never clips it, so with 200 epochs alpha is 0 at epoch 0, 1 at epoch 190 and
        ``(199 / 190) ** 2 ≈ 1.097`` in the last epoch; eq. 7's ``(t / T) ** 2`` ends at 1. Only
        defined for ``max_epochs > 10``.

        >>> FeatureBalancedLoss.official_progress(95, 200)
        0.5
        """
        if not float(max_epochs) > 10:
            raise LtlibError(
                f"max_epochs={max_epochs!r} is out of range for the official FBL curriculum "
                f"epoch / (max_epochs - 10); allowed: > 10"
            )
        check_in_range("epoch", float(epoch), 0.0, float(max_epochs))
        return float(epoch) / (float(max_epochs) - 10.0)

    # ---- loss -------------------------------------------------------------------------------------
    def check_extra_inputs(self, logits: Tensor, features: Tensor) -> None:
        """``features`` must be floating ``[B, D]`` (and finite when ``check_finite``)."""
        owner = self.owner
        if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
            got = (f"shape {shape_str(features)} {features.dtype}" if isinstance(features, Tensor)
                   else type(features).__name__)
            raise LtlibError(f"{owner}: features must be pooled penultimate features of shape [batch, dim]; got {got}")
        if features.shape[0] != logits.shape[0]:
            raise LtlibError(
                f"{owner}: features hold {features.shape[0]} samples but logits hold {logits.shape[0]}"
            )
        if self.check_finite and not bool(torch.isfinite(features).all()):
            bad = int((~torch.isfinite(features)).sum())
            raise LtlibError(
                f"{owner}: features contain {bad} non-finite values (NaN or inf) out of {features.numel()}; "
                f"the feature norm must be finite"
            )

    def feature_balanced_logits(self, logits: Tensor, features: Tensor) -> Tensor:
        """Return ``z_j^b = z_j - alpha * lambda_ * s_j / max(||f||, eps)`` (eq. 5), shape ``[B, C]``,
        computed in at least float32. Differentiable w.r.t. both ``logits`` and ``features``."""
        check_logits(logits, self.num_classes, self.owner)
        self.check_extra_inputs(logits, features)
        return self._balanced(logits.to(compute_dtype(logits)), features)

    def adjusted_logits(self, logits: Tensor, targets: Tensor, features: Tensor) -> Tensor:
        """Eq. 5 on inputs :meth:`forward` has checked (FBL eq. 8 is cross-entropy on them)."""
        return self._balanced(logits, features)

    def _balanced(self, logits: Tensor, features: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(features.to(logits.dtype), dim=1, keepdim=True).clamp_min(self.eps)
        stimulus = self.class_stimulus.to(device=logits.device, dtype=logits.dtype)
        return logits - (self.alpha * self.lambda_) * stimulus / norms

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, lambda_={self.lambda_:g}, stimulus={self.stimulus!r}, "
                f"schedule={self.schedule!r}, progress_mode={self.progress_mode!r}, "
                f"progress={self._progress:g}, reduction={self.reduction!r}")

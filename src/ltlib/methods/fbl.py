"""Feature-balanced loss (FBL; Li, Cheung and Jiang) as an end-to-end training method.

A zoo backbone and a linear classifier trained with :class:`~ltlib.losses.FeatureBalancedLoss`:
every logit is lowered by ``alpha(t) * lambda * s_j / ||f||`` (eq. 5) during training, so tail-class
samples reach a low loss only by growing their feature norm ``||f||``; evaluation uses the raw logits
``z = W f + b`` (as the official code's validation does).

The curriculum ``alpha(t)`` (eq. 7, table 4) is set once per epoch, at its start, from the epoch
counter alone, so a resumed run recomputes it from the checkpoint's epoch and nothing about it is
stored:

* ``progress_mode="standard"`` (default): progress ``p = epoch / max_epochs`` with the 0-based epoch,
  :meth:`~ltlib.methods.base.LongTailMethod.training_progress`, ltlib's one progress counter (0 in the
  first epoch, ``(T - 1) / T`` in the last), and ``alpha = schedule(p)``. Eq. 7 writes
  ``alpha(t) ∝ (t / T)^2``; Algorithm 1 counts ``t`` from 1, so there alpha reaches 1 in the last
  epoch, here ``((T - 1) / T)^2`` (0.990 for T = 200).
* ``progress_mode="official"``: the official ``train.py``'s ``p = epoch / (max_epochs - 10)``, not
  clipped (alpha is 1 at epoch T - 10 and ``(199 / 190)^2 ≈ 1.097`` in the last of 200 epochs). Only
  defined for ``max_epochs > 10``.

``alpha(t)`` is logged once per epoch as ``train/fbl_alpha``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ltlib.losses import FeatureBalancedLoss
from ltlib.methods.base import LongTailMethod


class FeatureBalancedClassifier(LongTailMethod):
    """Backbone + linear classifier trained with the feature-balanced loss (FBL eq. 5-8, Algorithm 1).

    Args:
        lambda_: stimulus strength (official code: 60 on CIFAR, 150 on ImageNet-LT, iNaturalist and
            Places-LT).
        stimulus: ``"normalized"`` (official code, default: ``s_j`` scaled to [0, 1]) or ``"log"``
            (eq. 6, ``s_j = log n_max - log n_j``).
        schedule: the curriculum ``alpha(t)``, a name of :mod:`ltlib.schedules`; FBL table 4 compares
            ``parabolic_increment`` (default), ``linear_increment``, ``sine_increment``,
            ``cosine_increment`` and ``linear_decay``.
        progress_mode: ``"standard"`` (``epoch / max_epochs``, default) or ``"official"``
            (``epoch / (max_epochs - 10)``, unclipped); see the module docstring.
        check_finite: let the loss raise a one-line error on NaN or inf features. Off by default: the
            check reads a flag back from the device, a host synchronisation in every training step;
            with it off, non-finite features give a NaN loss instead.
        freeze_trunk: train only ``backbone.last_block`` and the classifier, keeping the rest of the
            backbone fixed in eval mode (its batch-norm statistics frozen too): the official code's
            Places-LT setting on an ImageNet-pretrained ResNet-152.
        reset_last_block: replace ``backbone.last_block`` by a freshly initialised copy (the official
            Places-LT model drops the last pretrained bottleneck and trains a new one).
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
        lambda_: float = 60.0,
        stimulus: str = "normalized",
        schedule: str = "parabolic_increment",
        progress_mode: str = "standard",
        check_finite: bool = False,
        freeze_trunk: bool = False,
        reset_last_block: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, class_counts, **kwargs)
        self.criterion = FeatureBalancedLoss(class_counts, lambda_=lambda_, stimulus=stimulus, schedule=schedule,
                                             progress_mode=progress_mode, check_finite=check_finite)
        self.freeze_trunk = bool(freeze_trunk)
        if reset_last_block:
            self.backbone.last_block = self.backbone.copy_last_block()
        if self.freeze_trunk:
            self.freeze(self.backbone.trunk)  # fixed pretrained statistics, as in the official Places-LT code

    # ------------------------------------------------------------------ curriculum
    def epoch_progress(self) -> float:
        """Curriculum progress of the current epoch, from the epoch counter alone: ``epoch / max_epochs``
        (standard, :meth:`training_progress`) or ``epoch / (max_epochs - 10)`` (official)."""
        if self.criterion.progress_mode == "official":
            return FeatureBalancedLoss.official_progress(self.current_epoch, self.max_epochs)
        return self.training_progress()

    def on_fit_start(self) -> None:
        # Fails before the first step, with one line, where the official curriculum is undefined.
        self.epoch_progress()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        progress = self.epoch_progress()
        self.criterion.set_progress(progress)
        # A Python float, the same on every rank: sync_dist only marks it global (reduced once per epoch).
        self.log("train/fbl_alpha", self.criterion.alpha, on_step=False, on_epoch=True, sync_dist=True)

    @property
    def alpha(self) -> float:
        """The stimulus strength ``alpha(t)`` of the current epoch (eq. 7)."""
        return self.criterion.alpha

    # ---------------------------------------------------------------------- model
    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """FBL (eq. 8) on the pooled penultimate features, which the loss keeps in the graph."""
        images, targets = batch
        features = self.backbone(images)
        return self.criterion(self.classifier(features), targets, features)

"""The loss-based long-tail baselines and the deferred re-balancing schedule of Cao et al.

One method, :class:`BaselineClassifier`, covers the baseline rows of BBN table 1 (and the two-head
and FBL papers' baseline tables) that train a single classifier with a per-sample loss:

======================  ========================================================================
``method=``             what it trains
======================  ========================================================================
``focal``               focal loss, ``gamma = 1``, sigmoid form of Cui et al.'s code (which produced
                        BBN's "Focal" numbers); ``focal_form=softmax``: LDAM-DRW's code
``cb_focal``            class-balanced focal loss (Cui et al., beta = 0.9999, gamma = 1) in the
                        sigmoid form of Cui et al.'s code (which produced every CB-focal number of
                        BBN and the two-head paper); ``focal_form=ldam_code reduction=batch_mean``:
                        LDAM-DRW's code (``--loss_type Focal --train_rule Reweight``)
``ce_drw``              CE, class-balanced weights switched on at epoch 160 (Cao et al., DRW)
``ldam``                LDAM loss on a cosine classifier (Cao et al.)
``ldam_drw``            LDAM loss + deferred re-weighting (Cao et al.)
``ce_drs``              CE, uniform sampling, class-balanced sampling from epoch 160 (Cao et al., DRS)
``la``                  logit-adjusted loss ``CE(z + tau log pi, y)`` (Menon et al.), tau = 1
``ce_posthoc_la``       CE; predictions post-hoc adjusted to ``z - tau log pi`` (Menon et al.)
======================  ========================================================================

Deferred re-weighting (DRW; Cao et al.) uses the loss without weights before epoch
``reweight_from_epoch`` and with ``class_balanced_weights(counts, beta)`` from that epoch on (epochs
count from 0: LDAM-DRW's code switches at ``epoch // 160 == 1``, i.e. the 161st epoch, which is also
where its learning rate first drops). The weights are set on the loss module in
:meth:`~BaselineClassifier.on_train_epoch_start`, once per epoch. Deferred re-sampling (DRS) is a
deferred sampler spec (:mod:`ltlib.data.deferred`) in :attr:`train_streams`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ltlib.data.deferred import deferred_sampler_spec
from ltlib.data.samplers import check_sampler
from ltlib.errors import LtlibError, check_in_range, unknown_name
from ltlib.losses import (
    CBFocalLoss,
    FocalLoss,
    LDAMCodeFocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    NormedLinear,
    log_class_priors,
)
from ltlib.losses.weights import as_class_counts
from ltlib.methods.base import LongTailMethod, OptimConfig
from ltlib.methods.standard import CLASS_WEIGHTINGS, make_class_weights

log = logging.getLogger("ltlib")

LOSSES = ("ce", "focal", "ldam", "logit_adjusted")
#: softmax: Lin et al.'s (1 - p_t)^gamma; sigmoid: Cui et al.'s one-vs-all focal loss; ldam_code:
#: LDAM-DRW's code, whose modulating factor is computed from the weighted cross-entropy.
FOCAL_FORMS = ("softmax", "sigmoid", "ldam_code")
CLASSIFIERS = ("auto", "linear", "normed")
#: weighted_mean: sum_i w_{y_i} l_i / sum_i w_{y_i} (F.cross_entropy(weight=...)); batch_mean: / B.
REDUCTIONS = ("weighted_mean", "batch_mean")


def _check_choice(kind: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise unknown_name(kind, value, allowed)
    return value


def _check_epoch(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LtlibError(f"{name}={value!r} is invalid; allowed: an integer >= 0 (an epoch, counted from 0)")
    return value


class BaselineClassifier(LongTailMethod):
    """A backbone and one classifier trained with CE, focal, LDAM or logit-adjusted loss, optionally
    with (deferred) class re-weighting, (deferred) re-sampling and post-hoc logit adjustment.

    Args:
        loss: ``ce``, ``focal`` (``gamma``, ``focal_form``), ``ldam`` (``max_margin``, ``scale``;
            Cao et al.) or ``logit_adjusted`` (``tau``; Menon et al.'s loss).
        gamma: focal loss focusing parameter, ``>= 0``.
        focal_form: ``softmax`` (Lin et al.'s ``(1 - p_t)^gamma`` on softmax probabilities; the
            Python default), ``sigmoid`` (Cui et al.'s code: one sigmoid per class, last-layer bias
            initialised to ``-log(C - 1)`` and not weight-decayed; the ``focal`` / ``cb_focal``
            configs' default) or ``ldam_code`` (LDAM-DRW's code, factor from the weighted CE:
            :class:`~ltlib.losses.LDAMCodeFocalLoss`).
        max_margin, scale: LDAM's largest margin (0.5) and logit scale ``s`` (30).
        tau: logit adjustment strength of the ``logit_adjusted`` loss.
        classifier: ``linear``, ``normed`` (cosine, :class:`~ltlib.losses.NormedLinear`) or ``auto``
            (``normed`` for LDAM, as LDAM-DRW's code, else ``linear``).
        class_weighting: ``none``, ``inverse_frequency`` or ``class_balanced`` (``beta``).
        beta: Cui et al.'s effective-number beta in [0, 1).
        reweight_from_epoch: the first epoch (from 0) whose loss uses the class weights; 0 weights
            from the start, 160 is LDAM-DRW's DRW on a 200-epoch schedule.
        sampler: the training sampler (:func:`ltlib.data.samplers.list_samplers`).
        deferred_sampler: if set, the sampler used from ``resample_from_epoch`` on (DRS).
        resample_from_epoch: the first epoch (from 0) drawn by ``deferred_sampler``.
        reduction: ``weighted_mean`` (``sum w_y l / sum w_y``, as ``F.cross_entropy(weight=...)`` and
            LDAM-DRW's CE and LDAM losses) or ``batch_mean`` (``sum w_y l / B``, as LDAM-DRW's focal
            loss and Cui et al.'s sigmoid losses). With class weights the two differ by the factor
            ``sum_i w_{y_i} / B`` (several-fold on a long-tailed batch with class-balanced weights).
        posthoc_tau: if > 0, validation and test predict with ``z - posthoc_tau * log pi`` (Menon et
            al.'s post-hoc adjustment, :func:`~ltlib.losses.posthoc_logit_adjustment`).
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Sequence[int],
        optim: OptimConfig | Mapping[str, Any] | None = None,
        loss: str = "ce",
        gamma: float = 1.0,
        focal_form: str = "softmax",
        max_margin: float = 0.5,
        scale: float = 30.0,
        tau: float = 1.0,
        classifier: str = "auto",
        class_weighting: str = "none",
        beta: float = 0.9999,
        reweight_from_epoch: int = 0,
        sampler: str = "uniform",
        deferred_sampler: str | None = None,
        resample_from_epoch: int = 160,
        reduction: str = "weighted_mean",
        posthoc_tau: float = 0.0,
        **kwargs: Any,
    ) -> None:
        _check_choice("loss", loss, LOSSES)
        _check_choice("focal_form", focal_form, FOCAL_FORMS)
        _check_choice("classifier", classifier, CLASSIFIERS)
        _check_choice("class_weighting", class_weighting, CLASS_WEIGHTINGS)
        _check_choice("reduction", reduction, REDUCTIONS)
        check_in_range("gamma", float(gamma), 0.0, math.inf, high_inclusive=False)
        check_in_range("beta", float(beta), 0.0, 1.0, high_inclusive=False)
        check_in_range("posthoc_tau", float(posthoc_tau), 0.0, math.inf, high_inclusive=False)
        counts = as_class_counts(class_counts)  # every class needs a training image (one-line error)
        if classifier == "auto":
            classifier = "normed" if loss == "ldam" else "linear"
        # Read by build_classifier, which LongTailMethod.__init__ calls.
        self._head_kind = classifier
        self._sigmoid_head = loss == "focal" and focal_form == "sigmoid"
        super().__init__(backbone, num_classes, class_counts, optim, **kwargs)
        if self._sigmoid_head and num_classes > 1:
            # Cui et al.'s code starts every sigmoid at the prior 1/C: b = -log(C - 1) (after the weight
            # initialisation of the base class, which may reset the bias).
            nn.init.constant_(self.classifier.bias, -math.log(num_classes - 1))

        check_sampler(sampler)
        self.reweight_from_epoch = _check_epoch("reweight_from_epoch", reweight_from_epoch)
        self.resample_from_epoch = _check_epoch("resample_from_epoch", resample_from_epoch)
        self.deferred_sampler = deferred_sampler
        stream = sampler if deferred_sampler is None else deferred_sampler_spec(
            sampler, deferred_sampler, self.resample_from_epoch)
        self.train_streams = {"main": stream}

        self.loss_name, self.focal_form, self.reduction = loss, focal_form, reduction
        self.register_buffer("deferred_class_weights", make_class_weights(class_weighting, counts, float(beta)),
                             persistent=False)
        self.criterion = self._build_criterion(loss, counts, float(gamma), focal_form, float(max_margin),
                                               float(scale), float(tau))
        self.criterion.weight = self.class_weights_at(0)
        self.register_buffer("posthoc_shift", float(posthoc_tau) * log_class_priors(counts), persistent=False)
        self.posthoc_tau = float(posthoc_tau)
        self.save_hyperparameters({
            "loss": loss, "gamma": gamma, "focal_form": focal_form, "max_margin": max_margin, "scale": scale,
            "tau": tau, "classifier": classifier, "class_weighting": class_weighting, "beta": beta,
            "reweight_from_epoch": reweight_from_epoch, "sampler": sampler, "deferred_sampler": deferred_sampler,
            "resample_from_epoch": resample_from_epoch, "reduction": reduction, "posthoc_tau": posthoc_tau,
        })

    # ----------------------------------------------------------------- model
    def build_classifier(self, in_features: int, num_classes: int) -> nn.Module:
        if self._head_kind == "normed":
            return NormedLinear(in_features, num_classes)
        return nn.Linear(in_features, num_classes)

    def _build_criterion(self, loss: str, counts: Tensor, gamma: float, focal_form: str, max_margin: float,
                         scale: float, tau: float) -> nn.Module:
        reduction = "mean" if self.reduction == "weighted_mean" else "none"
        if loss == "ce":
            # FocalLoss with gamma = 0 is (weighted) cross-entropy whose weight, unlike
            # nn.CrossEntropyLoss's, stays out of the checkpoint (it changes at the DRW switch).
            return FocalLoss(0.0, reduction=reduction)
        if loss == "ldam":
            return LDAMLoss(counts, max_margin=max_margin, scale=scale, reduction=reduction)
        if loss == "logit_adjusted":
            return LogitAdjustedLoss(counts, tau=tau, reduction=reduction)
        if focal_form == "sigmoid":
            # beta=0 gives equal weights; the weights in use are set by class_weights_at below.
            return CBFocalLoss(counts, beta=0.0, gamma=gamma, loss_type="sigmoid", reduction=reduction)
        if focal_form == "ldam_code":
            return LDAMCodeFocalLoss(gamma, reduction=reduction)
        return FocalLoss(gamma, reduction=reduction)

    def parameter_groups(self) -> list[dict[str, Any]]:
        if not self._sigmoid_head:
            return super().parameter_groups()
        # Cui et al.'s code does not weight-decay the last layer's bias of its sigmoid losses.
        bias = self.classifier.bias
        rest = [p for p in self.parameters() if p.requires_grad and p is not bias]
        return [{"params": rest}, {"params": [bias], "weight_decay": 0.0}]

    def evaluate_logits(self, images: Tensor) -> Tensor:
        logits = self(images)
        if self.posthoc_tau > 0:
            return logits - self.posthoc_shift.to(logits.dtype)
        return logits

    # ----------------------------------------------------- deferred schedule
    def class_weights_at(self, epoch: int) -> Tensor | None:
        """The per-class loss weights in use at ``epoch`` (None: unweighted)."""
        if self.deferred_class_weights is None or epoch < self.reweight_from_epoch:
            return None
        return self.deferred_class_weights

    def on_train_start(self) -> None:
        max_epochs = self.trainer.max_epochs or 0
        if self.deferred_class_weights is not None and self.reweight_from_epoch >= max_epochs:
            log.warning("reweight_from_epoch=%d >= max_epochs=%d: the class weights never switch on",
                        self.reweight_from_epoch, max_epochs)
        if self.deferred_sampler is not None and self.resample_from_epoch >= max_epochs:
            log.warning("resample_from_epoch=%d >= max_epochs=%d: the deferred sampler %r is never used",
                        self.resample_from_epoch, max_epochs, self.deferred_sampler)

    def on_train_epoch_start(self) -> None:
        weights = self.class_weights_at(self.current_epoch)
        self.criterion.weight = weights
        if self.deferred_class_weights is not None:
            self.log("train/class_weights_on", float(weights is not None), on_step=False, on_epoch=True)
        if self.deferred_sampler is not None:
            resampling = self.current_epoch >= self.resample_from_epoch
            self.log("train/deferred_sampler_on", float(resampling), on_step=False, on_epoch=True)

    # -------------------------------------------------------------- training
    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, targets = batch
        loss = self.criterion(self(images), targets)
        return loss.mean() if self.reduction == "batch_mean" else loss


__all__ = [
    "CLASSIFIERS",
    "FOCAL_FORMS",
    "LOSSES",
    "REDUCTIONS",
    "BaselineClassifier",
]

"""The single-classifier baselines: CE, RW and RS (BBN section 3), the loss-based rows of the three papers'
tables, and Cao et al.'s deferred re-balancing.

One method, :class:`BaselineClassifier`, trains a backbone and one classifier with a per-sample loss of
:mod:`ltlib.losses` (any name of :func:`~ltlib.losses.list_losses`), a sampler, optional (deferred)
class weights and optional post-hoc logit adjustment:

======================  ========================================================================
``method=``             what it trains
======================  ========================================================================
``ce``                  cross-entropy, uniform sampler (BBN section 3, "CE")
``rw``                  cross-entropy weighted by ``1 / N_c`` (BBN section 3, "RW")
``rs``                  cross-entropy, class-balanced sampler (BBN section 3, "RS")
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

Deferred re-weighting (DRW; Cao et al.) is a :class:`~ltlib.methods.reweighting.ClassReweighting` with
``from_epoch`` (``reweight_from_epoch``; epochs count from 0: LDAM-DRW's code switches at
``epoch // 160 == 1``, the 161st epoch, where its learning rate first drops); the loss's ``weight`` is set
once per epoch, in :meth:`~BaselineClassifier.on_train_epoch_start`. Deferred re-sampling (DRS) is a
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
from ltlib.errors import check_choice, check_in_range, check_int
from ltlib.losses import NormedLinear, create_loss, list_losses, log_class_priors
from ltlib.losses.registry import loss_options as options_of
from ltlib.losses.weights import as_class_counts
from ltlib.methods.base import LongTailMethod
from ltlib.methods.reweighting import ClassReweighting

log = logging.getLogger("ltlib")

#: softmax: Lin et al.'s (1 - p_t)^gamma; sigmoid: Cui et al.'s one-vs-all focal loss; ldam_code:
#: LDAM-DRW's code, whose modulating factor is computed from the weighted cross-entropy.
FOCAL_FORMS = ("softmax", "sigmoid", "ldam_code")
#: the registered loss each ``focal_form`` of ``loss=focal`` trains with
FOCAL_LOSSES = {"softmax": "focal", "sigmoid": "sigmoid_focal", "ldam_code": "ldam_code_focal"}
CLASSIFIERS = ("auto", "linear", "normed")
#: ltlib.losses' vocabulary: mean = sum_i w_{y_i} l_i / sum_i w_{y_i} (F.cross_entropy(weight=...)); batch_mean: / B.
REDUCTIONS = ("mean", "batch_mean")
#: the names of earlier versions, still accepted
REDUCTION_ALIASES = {"weighted_mean": "mean"}


class BaselineClassifier(LongTailMethod):
    """A backbone and one classifier trained with a loss of :mod:`ltlib.losses`, optionally with (deferred)
    class re-weighting, (deferred) re-sampling and post-hoc logit adjustment. CE, RW and RS are its
    defaults with ``class_weighting=inverse_frequency`` (RW) or ``sampler=class_balanced`` (RS).

    Args:
        loss: a name of :func:`~ltlib.losses.list_losses`: ``ce`` (default), ``focal`` (``gamma``,
            ``focal_form``), ``ldam`` (``max_margin``, ``scale``; Cao et al.), ``logit_adjusted`` (``tau``;
            Menon et al.'s loss), or any other registered loss (its own options in ``loss_options``).
        gamma: focal loss focusing parameter, ``>= 0``.
        focal_form: with ``loss=focal``: ``softmax`` (Lin et al.'s ``(1 - p_t)^gamma`` on softmax
            probabilities; the Python default), ``sigmoid`` (Cui et al.'s code: one sigmoid per class,
            last-layer bias initialised to ``-log(C - 1)`` and not weight-decayed; the ``focal`` /
            ``cb_focal`` configs' default) or ``ldam_code`` (LDAM-DRW's code, factor from the weighted CE:
            :class:`~ltlib.losses.LDAMCodeFocalLoss`).
        max_margin, scale: LDAM's largest margin (0.5) and logit scale ``s`` (30).
        tau: logit adjustment strength of the ``logit_adjusted`` loss.
        loss_options: further keyword options of the loss (those of a loss registered by the user).
        classifier: ``linear``, ``normed`` (cosine, :class:`~ltlib.losses.NormedLinear`) or ``auto``
            (``normed`` for LDAM, as LDAM-DRW's code, else ``linear``).
        class_weighting: ``none``, ``inverse_frequency`` (RW) or ``class_balanced`` (``beta``).
        beta: Cui et al.'s effective-number beta in [0, 1).
        reweight_from_epoch: the first epoch (from 0) whose loss uses the class weights; 0 weights
            from the start, 160 is LDAM-DRW's DRW on a 200-epoch schedule, null defers them to the first
            learning-rate decay (:class:`~ltlib.methods.reweighting.ClassReweighting`).
        sampler: the training sampler (:func:`ltlib.data.samplers.list_samplers`).
        deferred_sampler: if set, the sampler used from ``resample_from_epoch`` on (DRS).
        resample_from_epoch: the first epoch (from 0) drawn by ``deferred_sampler``.
        reduction: ``mean`` (``sum w_y l / sum w_y``, as ``F.cross_entropy(weight=...)`` and LDAM-DRW's CE
            and LDAM losses; ``weighted_mean`` is its old name) or ``batch_mean`` (``sum w_y l / B``, as
            LDAM-DRW's focal loss and Cui et al.'s sigmoid losses). With class weights the two differ by the
            factor ``sum_i w_{y_i} / B`` (several-fold on a long-tailed batch with class-balanced weights).
        posthoc_tau: if > 0, validation and test predict with ``z - posthoc_tau * log pi`` (Menon et
            al.'s post-hoc adjustment, :func:`~ltlib.losses.posthoc_logit_adjustment`).
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
        loss: str = "ce",
        gamma: float = 1.0,
        focal_form: str = "softmax",
        max_margin: float = 0.5,
        scale: float = 30.0,
        tau: float = 1.0,
        loss_options: Mapping[str, Any] | None = None,
        classifier: str = "auto",
        class_weighting: str = "none",
        beta: float = 0.9999,
        reweight_from_epoch: int | None = 0,
        sampler: str = "uniform",
        deferred_sampler: str | None = None,
        resample_from_epoch: int = 160,
        reduction: str = "mean",
        posthoc_tau: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_choice("loss", loss, list_losses())
        check_choice("focal_form", focal_form, FOCAL_FORMS)
        check_choice("classifier", classifier, CLASSIFIERS)
        reduction = check_choice("reduction", REDUCTION_ALIASES.get(reduction, reduction), REDUCTIONS)
        check_in_range("gamma", float(gamma), 0.0, math.inf, high_inclusive=False)
        check_in_range("posthoc_tau", float(posthoc_tau), 0.0, math.inf, high_inclusive=False)
        check_sampler(sampler)
        reweighting = ClassReweighting(class_weighting, float(beta), reweight_from_epoch)
        resample_from_epoch = check_int("resample_from_epoch", resample_from_epoch, 0,
                                        meaning="an epoch, counted from 0")
        counts = as_class_counts(class_counts)  # every class needs a training image (one-line error)
        sigmoid_head = loss == "focal" and focal_form == "sigmoid"
        normed = classifier == "normed" or (classifier == "auto" and loss == "ldam")
        head = (NormedLinear if normed else nn.Linear)(backbone.out_dim, num_classes)
        super().__init__(backbone, num_classes, class_counts, head=head, **kwargs)
        if sigmoid_head and num_classes > 1:
            # Cui et al.'s code starts every sigmoid at the prior 1/C: b = -log(C - 1) (after the weight
            # initialisation of the base class, which may reset the bias).
            nn.init.constant_(self.classifier.bias, -math.log(num_classes - 1))
        self.sigmoid_head = sigmoid_head
        self.loss_name = FOCAL_LOSSES[focal_form] if loss == "focal" else loss
        self.focal_form, self.reduction = focal_form, reduction
        self.set_class_reweighting(reweighting)
        self.resample_from_epoch, self.deferred_sampler = resample_from_epoch, deferred_sampler
        stream = sampler if deferred_sampler is None else deferred_sampler_spec(
            sampler, deferred_sampler, resample_from_epoch)
        self.train_streams = {"main": stream}
        offered = {"gamma": float(gamma), "max_margin": float(max_margin), "scale": float(scale), "tau": float(tau)}
        accepted = options_of(self.loss_name)
        options = {k: v for k, v in offered.items() if k in accepted}
        self.criterion = create_loss(self.loss_name, counts, reduction=reduction, **options, **dict(loss_options or {}))
        self.criterion.weight = self.active_class_weights()
        self.register_buffer("posthoc_shift", float(posthoc_tau) * log_class_priors(counts), persistent=False)
        self.posthoc_tau = float(posthoc_tau)

    def parameter_groups(self) -> list[dict[str, Any]]:
        if not self.sigmoid_head:
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
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.deferred_sampler is not None and self.resample_from_epoch >= self.max_epochs:
            log.warning("resample_from_epoch=%d >= max_epochs=%d: the deferred sampler %r is never used",
                        self.resample_from_epoch, self.max_epochs, self.deferred_sampler)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.criterion.weight = self.active_class_weights()
        if self.deferred_sampler is not None:
            resampling = self.current_epoch >= self.resample_from_epoch
            self.log("train/deferred_sampler_on", float(resampling), on_step=False, on_epoch=True)

    # -------------------------------------------------------------- training
    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, targets = batch
        return self.criterion(self(images), targets)


__all__ = [
    "CLASSIFIERS",
    "FOCAL_FORMS",
    "REDUCTIONS",
    "BaselineClassifier",
]

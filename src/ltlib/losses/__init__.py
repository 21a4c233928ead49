"""Long-tail losses as plain ``nn.Module`` objects, usable with or without Lightning, built by name.

Example::

    from ltlib.losses import class_balanced_weights, create_loss, list_losses
    list_losses()                                     # ['cb_focal', 'ce', 'feature_balanced', ...]
    criterion = create_loss("ldam", class_counts=[5000, 500, 50], max_margin=0.5, scale=30.0)
    criterion.weight = class_balanced_weights([5000, 500, 50], 0.9999)  # e.g. at the DRW epoch
    loss = criterion(logits, targets)                                  # logits [B, C], targets [B]

Every loss is a :class:`LongTailLoss`: it takes per-class training counts (not a dataset) where it
needs them, is called like a PyTorch loss, ``loss(logits, targets)`` (``feature_balanced`` also takes
the penultimate ``features``), checks its inputs once in the base class with one-line
:class:`~ltlib.errors.LtlibError` messages, and keeps an optional per-class ``weight`` that may be
replaced at any time (it is not saved in ``state_dict``). One reduction vocabulary,
:data:`REDUCTIONS`, serves every loss: ``mean`` (``sum_i w_{y_i} l_i / sum_i w_{y_i}``, the plain
mean without weights, as ``F.cross_entropy(weight=...)``), ``batch_mean`` (``sum_i w_{y_i} l_i / B``,
as LDAM-DRW's focal loss and Cui et al.'s sigmoid losses), ``sum`` and ``none`` (``w_{y_i} l_i``).

Registered names (:func:`list_losses`; the options, :func:`loss_options`, are the class's
constructor arguments):

====================  ==========================================  ===============================
name                  class                                       needs ``class_counts``
====================  ==========================================  ===============================
``ce``                :class:`WeightedCrossEntropy`               no
``focal``             :class:`FocalLoss` (softmax, Lin et al.)    no
``sigmoid_focal``     :class:`SigmoidFocalLoss` (Cui et al.'s)    no
``cb_focal``          :class:`CBFocalLoss` (``loss_type``)        yes (class-balanced weights)
``ldam_code_focal``   :class:`LDAMCodeFocalLoss` (LDAM-DRW code)  no
``ldam``              :class:`LDAMLoss` (Cao et al.)              yes (margins)
``logit_adjusted``    :class:`LogitAdjustedLoss` (Menon et al.)   yes (priors)
``feature_balanced``  :class:`FeatureBalancedLoss` (FBL)          yes (stimulus)
``soft_target_ce``    :class:`SoftTargetCrossEntropy`             no (soft targets ``[B, C]``)
====================  ==========================================  ===============================

Adding a loss is one decorated class in a module of this package (imported below, so that
``import ltlib.losses`` fills the registry)::

    @register_loss("my_loss")
    class MyLoss(LongTailLoss):                      # + a docstring: the formula, the paper's eq.
        def __init__(self, class_counts, strength: float = 1.0, weight=None, reduction: str = "mean"):
            counts = as_class_counts(class_counts)
            super().__init__(num_classes=counts.numel(), weight=weight, reduction=reduction)
            self.strength = float(strength)

        def per_sample_loss(self, logits, targets, weight):  # checked inputs, logits in >= float32
            return apply_class_weight(my_formula(logits, targets, self.strength), targets, weight)

``create_loss("my_loss", class_counts, strength=2.0)`` then builds it, so a method config can select
it by name and pass its options as keyword arguments. Cross-entropy on adjusted logits derives from
:class:`AdjustedCrossEntropyLoss` and implements ``adjusted_logits`` instead; a loss with more inputs
names them in ``extra_inputs`` and checks them in ``check_extra_inputs``; one with other targets
overrides ``check_targets``. The shared checks, the weight handling and the reductions are the base
class's and are not repeated in the subclass.
"""

from ltlib.losses.base import REDUCTIONS, AdjustedCrossEntropyLoss, LongTailLoss
from ltlib.losses.feature_balanced import FeatureBalancedLoss, feature_balanced_stimulus
from ltlib.losses.focal import (
    CBFocalLoss,
    FocalLoss,
    LDAMCodeFocalLoss,
    SigmoidFocalLoss,
    WeightedCrossEntropy,
)
from ltlib.losses.ldam import LDAMLoss, NormedLinear, ldam_margins
from ltlib.losses.logit_adjustment import LogitAdjustedLoss, log_class_priors, posthoc_logit_adjustment
from ltlib.losses.registry import create_loss, list_losses, loss_options, register_loss
from ltlib.losses.soft_target import SoftTargetCrossEntropy
from ltlib.losses.weights import as_class_counts, class_balanced_weights, inverse_frequency_weights

__all__ = [
    "REDUCTIONS",
    "AdjustedCrossEntropyLoss",
    "CBFocalLoss",
    "FeatureBalancedLoss",
    "FocalLoss",
    "LDAMCodeFocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "LongTailLoss",
    "NormedLinear",
    "SigmoidFocalLoss",
    "SoftTargetCrossEntropy",
    "WeightedCrossEntropy",
    "as_class_counts",
    "class_balanced_weights",
    "create_loss",
    "feature_balanced_stimulus",
    "inverse_frequency_weights",
    "ldam_margins",
    "list_losses",
    "log_class_priors",
    "loss_options",
    "posthoc_logit_adjustment",
    "register_loss",
]

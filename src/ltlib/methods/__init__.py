"""Training methods: one LightningModule base and the methods built on it (one module per method family).

========================  ===============================================================  =====================
module                    what                                                             ``method=``
========================  ===============================================================  =====================
``base``                  :class:`LongTailMethod`, :class:`OptimConfig`: the shared protocol
``reweighting``           :class:`ClassReweighting`: per-class loss weights, deferred or not
``baselines``             :class:`BaselineClassifier`: one classifier, any registered loss   ce, rw, rs, focal, ...
``bbn``                   BBN (bilateral branches, cumulative learning)                     bbn
``fbl``                   the feature-balanced loss as a training method                   fbl
``two_head``              the two-head model (class division + feature balancing)          two_head, two_head_full
``mixup_baselines``       mixup / manifold mixup, one sampler or two                       mixup, manifold_mixup*
``crt``                   classifier re-training on a frozen representation                 crt
``ensemble``              the average of finished runs                                     ensemble
========================  ===============================================================  =====================
"""

from ltlib.methods.base import LongTailMethod, OptimConfig
from ltlib.methods.baselines import BaselineClassifier
from ltlib.methods.reweighting import ClassReweighting, make_class_weights

#: Saved configs of earlier versions name CE, RW and RS's class ``ltlib.methods.StandardClassifier``; it is
#: BaselineClassifier with its defaults (CE), ``class_weighting=inverse_frequency`` (RW) or ``sampler=class_balanced`` (RS).
StandardClassifier = BaselineClassifier

__all__ = ["BaselineClassifier", "ClassReweighting", "LongTailMethod", "OptimConfig", "StandardClassifier",
           "make_class_weights"]

"""Long-tail losses as plain ``nn.Module`` objects, usable with or without Lightning.

Each loss takes per-class training counts (not a dataset) and is called like a PyTorch loss,
``loss(logits, targets)`` (:class:`FeatureBalancedLoss` also takes the penultimate ``features``).
Per-class ``weight`` arguments behave as in ``F.cross_entropy(weight=...)``.
"""

from ltlib.losses.feature_balanced import FeatureBalancedLoss, feature_balanced_stimulus
from ltlib.losses.focal import CBFocalLoss, FocalLoss, LDAMCodeFocalLoss
from ltlib.losses.ldam import LDAMLoss, NormedLinear, ldam_margins
from ltlib.losses.logit_adjustment import LogitAdjustedLoss, log_class_priors, posthoc_logit_adjustment
from ltlib.losses.soft_target import SoftTargetCrossEntropy
from ltlib.losses.weights import as_class_counts, class_balanced_weights, inverse_frequency_weights

__all__ = [
    "CBFocalLoss",
    "FeatureBalancedLoss",
    "FocalLoss",
    "LDAMCodeFocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "NormedLinear",
    "SoftTargetCrossEntropy",
    "as_class_counts",
    "class_balanced_weights",
    "feature_balanced_stimulus",
    "inverse_frequency_weights",
    "ldam_margins",
    "log_class_priors",
    "posthoc_logit_adjustment",
]

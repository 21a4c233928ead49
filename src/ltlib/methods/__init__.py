"""Training methods: one LightningModule base and the methods built on it."""

from ltlib.methods.base import LongTailMethod, OptimConfig
from ltlib.methods.standard import StandardClassifier, make_class_weights

__all__ = ["LongTailMethod", "OptimConfig", "StandardClassifier", "make_class_weights"]

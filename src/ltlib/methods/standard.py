"""The three learning manners BBN section 3 compares: CE, re-weighting (RW) and re-sampling (RS).

All three are one classifier trained with cross-entropy; they differ in the sampler that feeds it
(``uniform`` or ``class_balanced``) and in the per-class loss weights (none or ``1 / N_c``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.data.samplers import check_sampler
from ltlib.errors import LtlibError
from ltlib.losses import class_balanced_weights, inverse_frequency_weights
from ltlib.methods.base import LongTailMethod, OptimConfig

CLASS_WEIGHTINGS = ("none", "inverse_frequency", "class_balanced")


def make_class_weights(weighting: str, class_counts: Sequence[int], beta: float = 0.9999) -> Tensor | None:
    """Per-class loss weights by name: ``none``, ``inverse_frequency`` (1/N_c) or ``class_balanced``
    (Cui et al.'s effective number with ``beta``)."""
    if weighting == "none":
        return None
    if weighting == "inverse_frequency":
        return inverse_frequency_weights(class_counts)
    if weighting == "class_balanced":
        return class_balanced_weights(class_counts, beta)
    raise LtlibError(f"unknown class_weighting {weighting!r}; available: {', '.join(CLASS_WEIGHTINGS)}")


class StandardClassifier(LongTailMethod):
    """A backbone and a linear classifier trained with (optionally weighted) cross-entropy.

    Args:
        sampler: the training sampler: ``uniform`` (CE, RW) or ``class_balanced`` (RS), or any
            other name of :func:`ltlib.data.samplers.list_samplers`.
        class_weighting: ``none`` (CE, RS), ``inverse_frequency`` (RW) or ``class_balanced``.
        beta: Cui et al.'s beta for ``class_balanced`` weighting.
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Sequence[int],
        optim: OptimConfig | Mapping[str, Any] | None = None,
        sampler: str = "uniform",
        class_weighting: str = "none",
        beta: float = 0.9999,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, class_counts, optim, **kwargs)
        check_sampler(sampler)
        self.train_streams = {"main": sampler}
        self.class_weighting = class_weighting
        weights = make_class_weights(class_weighting, class_counts, beta)
        self.register_buffer("class_weights", weights, persistent=False)
        self.save_hyperparameters({"sampler": sampler, "class_weighting": class_weighting})

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, targets = batch
        return F.cross_entropy(self(images), targets, weight=self.class_weights)

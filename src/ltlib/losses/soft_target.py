"""Cross-entropy against soft targets: mixup labels, or the smoothed cluster labels of the two-head
class-division model (two-head paper, eq. 4: ``L_2 = -1/N sum_i sum_k q_ik log p_ik``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ltlib.errors import LtlibError
from ltlib.losses.base import LongTailLoss, shape_str
from ltlib.losses.registry import register_loss


@register_loss("soft_target_ce")
class SoftTargetCrossEntropy(LongTailLoss):
    """``l_i = -sum_k q_ik log softmax(z_i)_k`` for target distributions ``q`` of shape ``[B, C]``.

    The targets are used as given (not renormalised, not checked to sum to 1, which would need a host
    sync); with one-hot targets this is plain cross-entropy. It has no per-class weights (a sample
    has no single class ``y_i``), so ``"mean"`` and ``"batch_mean"`` are both the batch mean.

    Args:
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`.

    >>> import torch
    >>> logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    >>> soft = SoftTargetCrossEntropy()(logits, torch.nn.functional.one_hot(labels, 3).float())
    >>> bool(torch.isclose(soft, torch.nn.functional.cross_entropy(logits, labels)))
    True
    """

    takes_weight = False

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)

    def check_targets(self, targets: Tensor, logits: Tensor) -> Tensor:
        """``targets`` must be a floating tensor shaped like the logits, ``[B, C]``."""
        if not isinstance(targets, Tensor) or not targets.is_floating_point() or targets.shape != logits.shape:
            got = (f"shape {shape_str(targets)} {targets.dtype}" if isinstance(targets, Tensor)
                   else type(targets).__name__)
            raise LtlibError(
                f"{self.owner}: targets must be a floating tensor shaped like the logits "
                f"{shape_str(logits)}; got {got}"
            )
        return targets

    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
        return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

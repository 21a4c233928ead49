"""Cross-entropy against soft targets: mixup labels, or the smoothed cluster labels of the two-head
class-division model (two-head paper, eq. 4: ``L_2 = -1/N sum_i sum_k q_ik log p_ik``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.errors import LtlibError
from ltlib.losses._common import check_logits, check_reduction, compute_dtype


class SoftTargetCrossEntropy(nn.Module):
    """``l_i = -sum_k q_ik log softmax(z_i)_k`` for target distributions ``q`` of shape ``[B, C]``.

    The targets are used as given (not renormalised, not checked to sum to 1, which would need a host
    sync); with one-hot targets this is plain cross-entropy.

    Args:
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"``.

    >>> import torch
    >>> logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    >>> soft = SoftTargetCrossEntropy()(logits, torch.nn.functional.one_hot(labels, 3).float())
    >>> bool(torch.isclose(soft, torch.nn.functional.cross_entropy(logits, labels)))
    True
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, None, "SoftTargetCrossEntropy")
        if not isinstance(targets, Tensor) or not targets.is_floating_point() or targets.shape != logits.shape:
            got = (f"shape [{', '.join(map(str, targets.shape))}] {targets.dtype}"
                   if isinstance(targets, Tensor) else type(targets).__name__)
            raise LtlibError(
                f"SoftTargetCrossEntropy: targets must be a floating tensor shaped like the logits "
                f"[{', '.join(map(str, logits.shape))}]; got {got}"
            )
        dtype = compute_dtype(logits)
        losses = -(targets.to(dtype) * F.log_softmax(logits.to(dtype), dim=1)).sum(dim=1)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

"""Label-distribution-aware margin loss (LDAM; Cao et al., NeurIPS 2019) and the cosine classifier
it is trained with.

LDAM subtracts a class margin ``Delta_y = C / n_y^{1/4}`` from the target logit only, with ``C``
chosen so the largest margin (the rarest class) equals ``max_margin``, scales all logits by ``s``
and applies cross-entropy. The reference code (kaidic/LDAM-DRW) feeds it cosine logits from a
:class:`NormedLinear` head and adds deferred re-weighting (DRW): plain weights until a late epoch
(160 of 200 on CIFAR), then ``class_balanced_weights(counts, 0.9999)``; here that is
``loss.weight = class_balanced_weights(counts, 0.9999)`` at the deferred epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.errors import LtlibError, check_in_range
from ltlib.losses.base import AdjustedCrossEntropyLoss
from ltlib.losses.registry import register_loss
from ltlib.losses.weights import as_class_counts


def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float = 0.5) -> Tensor:
    """Per-class LDAM margins ``Delta_j ∝ n_j^{-1/4}`` scaled so the largest is ``max_margin``
    (float32, shape ``[C]``).

    >>> [round(m, 6) for m in ldam_margins([10000, 625, 16], max_margin=0.5).tolist()]
    [0.1, 0.2, 0.5]
    """
    check_in_range("max_margin", float(max_margin), 0.0, math.inf, high_inclusive=False)
    margins = as_class_counts(class_counts).pow(-0.25)
    return (margins * (float(max_margin) / margins.max())).float()


@register_loss("ldam")
class LDAMLoss(AdjustedCrossEntropyLoss):
    """LDAM loss: ``CE(s * (z - Delta_y e_y), y)`` with ``Delta_j = C / n_j^{1/4}``, ``max_j Delta_j =
    max_margin`` (Cao et al.'s softmax LDAM loss).

    Args:
        class_counts: training images per class (all positive), ``C`` entries.
        max_margin: the margin of the rarest class (paper and code: 0.5).
        scale: logit scale ``s`` applied after the margin (code: 30). Meant for cosine logits in
            [-1, 1], e.g. from :class:`NormedLinear`.
        weight: optional per-class weights (DRW), handled as in ``F.cross_entropy(weight=...)``;
            may be replaced later (``loss.weight = w``); not saved in ``state_dict``.
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`.

    Shapes: ``logits [B, C]``, ``targets [B]`` (int64 class indices).

    >>> import torch
    >>> head = NormedLinear(64, 3)
    >>> loss_fn = LDAMLoss([500, 50, 5])
    >>> loss = loss_fn(head(torch.randn(4, 64)), torch.tensor([0, 1, 2, 1]))
    >>> bool(torch.isfinite(loss))
    True
    """

    def __init__(self, class_counts: Sequence[int] | Tensor, max_margin: float = 0.5, scale: float = 30.0,
                 weight: Tensor | Sequence[float] | None = None, reduction: str = "mean") -> None:
        counts = as_class_counts(class_counts)
        check_in_range("scale", float(scale), 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        margins = ldam_margins(counts, max_margin)
        super().__init__(num_classes=counts.numel(), weight=weight, reduction=reduction)
        self.max_margin = float(max_margin)
        self.scale = float(scale)
        self.register_buffer("margins", margins, persistent=False)

    def adjusted_logits(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``s * (z - Delta_y e_y)``."""
        margins = self.margins.to(device=logits.device, dtype=logits.dtype)
        return self.scale * logits.scatter_add(1, targets.unsqueeze(1), -margins[targets].unsqueeze(1))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, max_margin={self.max_margin:g}, scale={self.scale:g}, "
                f"reduction={self.reduction!r}")


class NormedLinear(nn.Module):
    """Cosine classifier: ``logits = normalize(x) @ normalize(W)^T``, values in [-1, 1], no bias.

    The weight has nn.Linear's layout ``[out_features, in_features]`` and is initialised, as in
    LDAM-DRW, uniformly in [-1, 1] and then rescaled so each class vector has unit norm. (LDAM-DRW
    stores the transpose, ``[in_features, out_features]``; transpose to load its checkpoints.)

    >>> import torch
    >>> head = NormedLinear(8, 3)
    >>> out = head(torch.randn(5, 8))
    >>> out.shape, bool(out.abs().max() <= 1 + 1e-6)
    (torch.Size([5, 3]), True)
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LtlibError(f"NormedLinear: {name}={value!r} is out of range; allowed: an integer >= 1")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(torch.linalg.vector_norm(self.weight, dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

"""Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

Both forms use the training class priors ``pi_j = n_j / sum_k n_k``:

* post-hoc: train with plain cross-entropy, predict with ``argmax_j z_j - tau * log pi_j``
  (:func:`posthoc_logit_adjustment`);
* loss: train with cross-entropy on ``z_j + tau * log pi_j`` and predict with the raw logits
  (:class:`LogitAdjustedLoss`). ``tau = 1`` is the paper's default for both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from ltlib.errors import check_in_range
from ltlib.losses.base import AdjustedCrossEntropyLoss, check_logits, compute_dtype
from ltlib.losses.registry import register_loss
from ltlib.losses.weights import as_class_counts


def log_class_priors(class_counts: Sequence[int] | Tensor) -> Tensor:
    """``log pi_j = log n_j - log sum_k n_k`` as a float32 tensor of shape ``[C]``."""
    counts = as_class_counts(class_counts)
    return (counts.log() - counts.sum().log()).float()


def _check_tau(tau: float) -> float:
    return check_in_range("tau", float(tau), 0.0, math.inf, high_inclusive=False)


def posthoc_logit_adjustment(logits: Tensor, class_counts: Sequence[int] | Tensor, tau: float = 1.0) -> Tensor:
    """Return ``z - tau * log pi`` (Menon et al.'s post-hoc adjustment), in at least float32.

    >>> import torch
    >>> logits = torch.tensor([[2.0, 1.0]])            # the head class wins on raw logits
    >>> posthoc_logit_adjustment(logits, [90, 10]).argmax(dim=1).item()
    1
    """
    tau = _check_tau(tau)
    log_prior = log_class_priors(class_counts)
    check_logits(logits, log_prior.numel(), "posthoc_logit_adjustment")
    dtype = compute_dtype(logits)
    return logits.to(dtype) - tau * log_prior.to(device=logits.device, dtype=dtype)


@register_loss("logit_adjusted")
class LogitAdjustedLoss(AdjustedCrossEntropyLoss):
    """Logit-adjusted cross-entropy ``CE(z + tau * log pi, y)`` (Menon et al.); predict with raw ``z``.

    Args:
        class_counts: training images per class (all positive), ``C`` entries.
        tau: adjustment strength, ``>= 0``; 0 gives plain cross-entropy.
        weight: optional per-class weights, handled as in ``F.cross_entropy(weight=...)``; may be
            replaced later (``loss.weight = w``); not saved in ``state_dict``.
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`.

    Shapes: ``logits [B, C]``, ``targets [B]`` (int64 class indices).

    >>> import torch
    >>> loss_fn = LogitAdjustedLoss([500, 50, 5], tau=1.0)
    >>> loss_fn(torch.randn(4, 3), torch.tensor([0, 1, 2, 1])).shape
    torch.Size([])
    """

    def __init__(self, class_counts: Sequence[int] | Tensor, tau: float = 1.0,
                 weight: Tensor | Sequence[float] | None = None, reduction: str = "mean") -> None:
        log_prior = log_class_priors(class_counts)
        tau = _check_tau(tau)
        super().__init__(num_classes=log_prior.numel(), weight=weight, reduction=reduction)
        self.tau = tau
        self.register_buffer("log_prior", log_prior, persistent=False)

    def adjusted_logits(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``z + tau * log pi``."""
        return logits + self.tau * self.log_prior.to(device=logits.device, dtype=logits.dtype)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau:g}, reduction={self.reduction!r}"

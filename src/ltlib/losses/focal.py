"""Focal loss (Lin et al., ICCV 2017 / TPAMI 2020) and its class-balanced variant (CB focal; Cui et
al., CVPR 2019: focal loss weighted by the inverse effective number of samples).

The three forms in use, and where each comes from:

* ``"sigmoid"`` (:class:`SigmoidFocalLoss`; :class:`CBFocalLoss` ``loss_type="sigmoid"``): Cui et
  al.'s paper and code (``src/cifar_main.py``, ``focal_loss``): one binary focal term
  ``-(1 - p^t_c)^gamma log p^t_c`` per class, every term of a sample weighted by ``w_y``, summed and
  divided by the number of positive labels, the batch size (``reduction="batch_mean"``). The CB-focal and focal numbers the BBN and two-head papers print on
  CIFAR are Cui et al.'s (their table 2; BBN's CB-focal cells 12.90 and 54.83, cited to Cui et al.,
  are not in it), i.e. this form's.
* ``"softmax"`` (:class:`FocalLoss`): Lin et al.'s alpha-balanced focal loss on softmax
  probabilities, ``-w_y (1 - p_t)^gamma log p_t``; ``"mean"`` is the weighted mean ``sum w_y l /
  sum w_y`` of ``F.cross_entropy(weight=...)``.
* LDAM-DRW's ``FocalLoss`` (``losses.py``; copied into the FBL repository):
  :class:`LDAMCodeFocalLoss`, ``(1 - exp(-w_y CE))^gamma w_y CE`` -- the modulating factor is computed
  from the *weighted* cross-entropy, i.e. ``(1 - p_t^{w_y})^gamma`` -- averaged with a plain batch
  mean (``reduction="batch_mean"``). Without weights it equals the softmax form. (The FBL
  copy also detaches ``p``; here, as in LDAM-DRW's code, gradients flow through the factor.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ltlib.errors import check_in_range, unknown_name
from ltlib.losses.base import LongTailLoss, apply_class_weight
from ltlib.losses.registry import register_loss
from ltlib.losses.weights import as_class_counts, class_balanced_weights

FOCAL_TYPES = ("softmax", "sigmoid")

# (1 - p_t) is clamped to at least this before the power, so that gamma < 1 gives a finite gradient
# when p_t rounds to 1 (there the loss and its gradient are 0 anyway).
_MIN_ONE_MINUS_P = 1e-12


def _softmax_focal(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """Unweighted per-sample ``-(1 - p_t)^gamma log p_t`` with ``p_t = softmax(z)_y``."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    if gamma == 0:
        return -log_pt
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(_MIN_ONE_MINUS_P)
    return -(one_minus_pt ** gamma) * log_pt


def _sigmoid_focal(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """Unweighted per-sample ``sum_c -(1 - p^t_c)^gamma log p^t_c`` with ``p^t_c = sigmoid(±z_c)``
    (+ for the target class, - otherwise), the one-vs-all focal loss of Cui et al.'s code."""
    sign = 2.0 * F.one_hot(targets, logits.shape[1]).to(logits.dtype) - 1.0
    log_pt = F.logsigmoid(sign * logits)
    per_class = -log_pt
    if gamma != 0:
        per_class = torch.exp(gamma * F.logsigmoid(-sign * logits)) * per_class
    return per_class.sum(dim=1)


def _check_gamma(gamma: float) -> float:
    return check_in_range("gamma", float(gamma), 0.0, math.inf, high_inclusive=False)


@register_loss("focal")
class FocalLoss(LongTailLoss):
    """Softmax focal loss ``l_i = -w_{y_i} (1 - p_t)^gamma log p_t`` (Lin et al.'s alpha-balanced
    focal loss with per-class weights ``w`` as ``alpha_t``; ``p_t = softmax(z)_{y_i}``).

    Args:
        gamma: focusing parameter, ``>= 0``; ``gamma=0`` is (weighted) cross-entropy. LDAM-DRW and
            FBL use 1 on CIFAR.
        weight: optional per-class weights ``[C]``; may be replaced later (``loss.weight = w``).
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`; ``"mean"`` is ``sum w_y l / sum w_y`` as in
            ``F.cross_entropy(weight=...)``.

    Shapes: ``logits [B, C]``, ``targets [B]`` (int64 class indices).

    >>> import torch
    >>> logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    >>> focal = FocalLoss(gamma=0.0)(logits, targets)
    >>> bool(torch.isclose(focal, torch.nn.functional.cross_entropy(logits, targets)))
    True
    """

    def __init__(self, gamma: float = 1.0, weight: Tensor | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(weight=weight, reduction=reduction)
        self.gamma = _check_gamma(gamma)

    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
        return apply_class_weight(_softmax_focal(logits, targets, self.gamma), targets, weight)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, {super().extra_repr()}"


@register_loss("ce")
class WeightedCrossEntropy(FocalLoss):
    """Cross-entropy ``l_i = -w_{y_i} log softmax(z_i)_{y_i}``: :class:`FocalLoss` with ``gamma=0``,
    the value of ``F.cross_entropy(weight=w)`` (up to rounding).

    Unlike ``nn.CrossEntropyLoss``, the weight stays out of ``state_dict`` and may be replaced between
    epochs (``loss.weight = w``, e.g. at the DRW switch), and ``reduction`` also takes
    ``"batch_mean"`` (``sum_i w_{y_i} l_i / B``).

    Args:
        weight: optional per-class weights ``[C]``.
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`.

    >>> import torch
    >>> logits, targets, w = torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 2.0, 4.0])
    >>> loss = WeightedCrossEntropy(weight=w)(logits, targets)
    >>> bool(torch.isclose(loss, torch.nn.functional.cross_entropy(logits, targets, weight=w)))
    True
    """

    def __init__(self, weight: Tensor | Sequence[float] | None = None, reduction: str = "mean") -> None:
        super().__init__(0.0, weight=weight, reduction=reduction)

    def extra_repr(self) -> str:
        return LongTailLoss.extra_repr(self)


@register_loss("sigmoid_focal")
class SigmoidFocalLoss(LongTailLoss):
    """One-vs-all sigmoid focal loss of Cui et al.'s code, ``l_i = w_{y_i} sum_c -(1 - p^t_c)^gamma
    log p^t_c`` with ``p^t_c = sigmoid(z_c)`` for the target class and ``1 - sigmoid(z_c)`` otherwise.

    Cui et al.'s code divides by the number of positive labels, the batch size: ``reduction="batch_mean"``.
    With class-balanced weights this is :class:`CBFocalLoss` ``loss_type="sigmoid"``.

    Args:
        gamma: focusing parameter, ``>= 0``; 0 gives the (weighted) one-vs-all sigmoid cross-entropy.
        weight: optional per-class weights ``[C]``; may be replaced later (``loss.weight = w``).
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`.

    Shapes: ``logits [B, C]``, ``targets [B]`` (int64 class indices).
    """

    def __init__(self, gamma: float = 1.0, weight: Tensor | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(weight=weight, reduction=reduction)
        self.gamma = _check_gamma(gamma)

    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
        return apply_class_weight(_sigmoid_focal(logits, targets, self.gamma), targets, weight)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, {super().extra_repr()}"


@register_loss("ldam_code_focal")
class LDAMCodeFocalLoss(LongTailLoss):
    """The focal loss of LDAM-DRW's code, ``l_i = (1 - exp(-w_y CE_i))^gamma w_y CE_i``.

    LDAM-DRW's ``FocalLoss(weight=w, gamma)`` computes ``CE_i`` as
    ``F.cross_entropy(z, y, weight=w, reduction="none")`` (so ``w_y CE_i``), takes
    ``p = exp(-w_y CE_i)`` and returns ``((1 - p)^gamma w_y CE_i).mean()``. With class weights its
    modulating factor is therefore ``(1 - p_t^{w_y})^gamma`` instead of Lin et al.'s
    ``(1 - p_t)^gamma`` (:class:`~ltlib.losses.FocalLoss`); without weights the two agree.

    ``"mean"`` divides by ``sum_i w_{y_i}`` as for the other losses; LDAM-DRW's code divides by the
    batch size, ``reduction="batch_mean"`` (equal to ``reduction="none"`` then ``.mean()``). The two
    differ by the factor ``sum_i w_{y_i} / B``.
    """

    def __init__(self, gamma: float = 1.0, weight: Tensor | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(weight=weight, reduction=reduction)
        self.gamma = _check_gamma(gamma)

    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
        weighted_ce = F.cross_entropy(logits, targets, weight=weight, reduction="none")
        return (-torch.expm1(-weighted_ce)).clamp_min(_MIN_ONE_MINUS_P) ** self.gamma * weighted_ce

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, {super().extra_repr()}"


@register_loss("cb_focal")
class CBFocalLoss(LongTailLoss):
    """Class-balanced focal loss (Cui et al., CVPR 2019): focal loss weighted by
    :func:`~ltlib.losses.class_balanced_weights`, ``w_c ∝ (1 - beta) / (1 - beta^{n_c})`` (the
    inverse effective number of samples), normalised to sum to ``C``.

    Args:
        class_counts: training images per class (all positive), ``C`` entries.
        beta: effective-number hyper-parameter in [0, 1); 0 gives equal weights.
        gamma: focusing parameter, ``>= 0``.
        loss_type: ``"softmax"`` (default): ``l_i = -w_{y_i} (1 - p_t)^gamma log p_t`` with softmax
            probabilities (Lin et al.'s alpha-balanced form with ``alpha_t = w_y``, as
            :class:`FocalLoss`). ``"sigmoid"``: Cui et al.'s own form (their paper's eq. and
            ``src/cifar_main.py``), ``l_i = w_{y_i} sum_c -(1 - p^t_c)^gamma log p^t_c`` with one sigmoid
            per class (as :class:`SigmoidFocalLoss`).
        reduction: one of :data:`~ltlib.losses.REDUCTIONS`: ``"mean"`` (weighted mean
            ``sum w_y l / sum w_y``, as ``F.cross_entropy``), ``"sum"``, ``"none"`` (``w_{y_i} l_i``)
            or ``"batch_mean"``: Cui et al.'s code divides the sum by the number of positive labels,
            the batch size.

    The weights are set from the counts and kept in ``weight``, which may be replaced later.
    Class-balanced cross-entropy (CB softmax) needs no class of its own:
    ``create_loss("ce", weight=class_balanced_weights(class_counts, beta))``.

    >>> import torch
    >>> loss_fn = CBFocalLoss([500, 50, 5], beta=0.999, gamma=1.0)
    >>> loss_fn.weight.argmax().item()   # the rarest class gets the largest weight
    2
    >>> loss_fn(torch.randn(4, 3), torch.tensor([0, 1, 2, 1])).shape
    torch.Size([])
    """

    def __init__(self, class_counts: Sequence[int] | Tensor, beta: float = 0.9999, gamma: float = 1.0,
                 loss_type: str = "softmax", reduction: str = "mean") -> None:
        counts = as_class_counts(class_counts)
        if loss_type not in FOCAL_TYPES:
            raise unknown_name("loss_type", loss_type, FOCAL_TYPES)
        gamma = _check_gamma(gamma)
        weight = class_balanced_weights(counts, float(beta))
        super().__init__(num_classes=counts.numel(), weight=weight, reduction=reduction)
        self.beta = float(beta)
        self.gamma = gamma
        self.loss_type = loss_type

    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
        per_sample = _softmax_focal if self.loss_type == "softmax" else _sigmoid_focal
        return apply_class_weight(per_sample(logits, targets, self.gamma), targets, weight)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, beta={self.beta:g}, gamma={self.gamma:g}, "
                f"loss_type={self.loss_type!r}, reduction={self.reduction!r}")

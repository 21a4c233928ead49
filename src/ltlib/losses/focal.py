"""Focal loss (Lin et al., ICCV 2017 / TPAMI 2020) and its class-balanced variant (CB focal; Cui et
al., CVPR 2019: focal loss weighted by the inverse effective number of samples).

The three forms in use, and where each comes from:

* ``"sigmoid"`` (:class:`CBFocalLoss` ``loss_type="sigmoid"``): Cui et al.'s paper and code
  (``src/cifar_main.py``, ``focal_loss``): one binary focal term ``-(1 - p^t_c)^gamma log p^t_c`` per
  class, every term of a sample weighted by ``w_y``, summed and divided by the number of positive
  labels (the batch size). The CB-focal and focal numbers the BBN and two-head papers print on
  CIFAR are Cui et al.'s (their table 2; BBN's CB-focal cells 12.90 and 54.83, cited to Cui et al.,
  are not in it), i.e. this form's.
* ``"softmax"`` (:class:`FocalLoss`): Lin et al.'s alpha-balanced focal loss on softmax
  probabilities, ``-w_y (1 - p_t)^gamma log p_t``; ``"mean"`` is the weighted mean ``sum w_y l /
  sum w_y`` of ``F.cross_entropy(weight=...)``.
* LDAM-DRW's ``FocalLoss`` (``losses.py``; copied into the FBL repository):
  :class:`LDAMCodeFocalLoss`, ``(1 - exp(-w_y CE))^gamma w_y CE`` -- the modulating factor is computed
  from the *weighted* cross-entropy, i.e. ``(1 - p_t^{w_y})^gamma`` -- averaged with a plain batch
  mean (``reduction="none"`` then ``.mean()``). Without weights it equals the softmax form. (The FBL
  copy also detaches ``p``; here, as in LDAM-DRW's code, gradients flow through the factor.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.errors import check_in_range, unknown_name
from ltlib.losses._common import (
    check_logits,
    check_reduction,
    check_targets,
    compute_dtype,
    prepare_weight,
    reduce_weighted,
    weight_for,
)
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


class FocalLoss(nn.Module):
    """Softmax focal loss ``l_i = -w_{y_i} (1 - p_t)^gamma log p_t`` (Lin et al.'s alpha-balanced
    focal loss with per-class weights ``w`` as ``alpha_t``; ``p_t = softmax(z)_{y_i}``).

    Args:
        gamma: focusing parameter, ``>= 0``; ``gamma=0`` is (weighted) cross-entropy. LDAM-DRW and
            FBL use 1 on CIFAR.
        weight: optional per-class weights ``[C]``; ``"mean"`` is ``sum w_y l / sum w_y`` as in
            ``F.cross_entropy(weight=...)``. May be replaced later (``loss.weight = w``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes: ``logits [B, C]``, ``targets [B]`` (int64 class indices).

    >>> import torch
    >>> logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    >>> focal = FocalLoss(gamma=0.0)(logits, targets)
    >>> bool(torch.isclose(focal, torch.nn.functional.cross_entropy(logits, targets)))
    True
    """

    def __init__(self, gamma: float = 1.0, weight: Tensor | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)
        self.reduction = check_reduction(reduction)
        self.register_buffer("weight", prepare_weight(weight, None, "FocalLoss"), persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, None, "FocalLoss")
        targets = check_targets(targets, logits, "FocalLoss")
        dtype = compute_dtype(logits)
        weight = weight_for(self.weight, logits, dtype, "FocalLoss")
        losses = _softmax_focal(logits.to(dtype), targets, self.gamma)
        return reduce_weighted(losses, targets, weight, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, reduction={self.reduction!r}, weighted={self.weight is not None}"


class LDAMCodeFocalLoss(nn.Module):
    """The focal loss of LDAM-DRW's code, ``l_i = (1 - exp(-w_y CE_i))^gamma w_y CE_i``.

    LDAM-DRW's ``FocalLoss(weight=w, gamma)`` computes ``CE_i`` as
    ``F.cross_entropy(z, y, weight=w, reduction="none")`` (so ``w_y CE_i``), takes
    ``p = exp(-w_y CE_i)`` and returns ``((1 - p)^gamma w_y CE_i).mean()``. With class weights its
    modulating factor is therefore ``(1 - p_t^{w_y})^gamma`` instead of Lin et al.'s
    ``(1 - p_t)^gamma`` (:class:`~ltlib.losses.FocalLoss`); without weights the two agree.

    Reduction as the other losses here: ``"mean"`` divides by ``sum_i w_{y_i}``. LDAM-DRW's code
    divides by the batch size: ``LDAMCodeFocalLoss(gamma, w, reduction="none")(z, y).mean()`` is its
    loss exactly (``BaselineClassifier(focal_form="ldam_code", reduction="batch_mean")``); the two
    differ by the factor ``sum_i w_{y_i} / B``.
    """

    def __init__(self, gamma: float = 1.0, weight: Tensor | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)
        self.reduction = check_reduction(reduction)
        self.register_buffer("weight", prepare_weight(weight, None, "LDAMCodeFocalLoss"), persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, None, "LDAMCodeFocalLoss")
        targets = check_targets(targets, logits, "LDAMCodeFocalLoss")
        dtype = compute_dtype(logits)
        weight = weight_for(self.weight, logits, dtype, "LDAMCodeFocalLoss")
        weighted_ce = F.cross_entropy(logits.to(dtype), targets, weight=weight, reduction="none")
        losses = (-torch.expm1(-weighted_ce)).clamp_min(_MIN_ONE_MINUS_P) ** self.gamma * weighted_ce
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean() if weight is None else losses.sum() / weight[targets].sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, reduction={self.reduction!r}, weighted={self.weight is not None}"


class CBFocalLoss(nn.Module):
    """Class-balanced focal loss (Cui et al., CVPR 2019): focal loss weighted by
    :func:`~ltlib.losses.class_balanced_weights`, ``w_c ∝ (1 - beta) / (1 - beta^{n_c})`` (the
    inverse effective number of samples), normalised to sum to ``C``.

    Args:
        class_counts: training images per class (all positive), ``C`` entries.
        beta: effective-number hyper-parameter in [0, 1); 0 gives equal weights.
        gamma: focusing parameter, ``>= 0``.
        loss_type: ``"softmax"`` (default): ``l_i = -w_{y_i} (1 - p_t)^gamma log p_t`` with softmax
            probabilities (Lin et al.'s alpha-balanced form with ``alpha_t = w_y``). ``"sigmoid"``: Cui
            et al.'s own form (their paper's eq. and ``src/cifar_main.py``),
            ``l_i = w_{y_i} sum_c -(1 - p^t_c)^gamma log p^t_c`` with one sigmoid per class.
        reduction: ``"mean"`` (weighted mean ``sum w_y l / sum w_y``, as ``F.cross_entropy``),
            ``"sum"`` or ``"none"`` (``w_{y_i} l_i``). Cui et al.'s code divides the sum by the number
            of positive labels, the batch size: ``CBFocalLoss(..., reduction="none")(logits,
            targets).mean()``.

    Class-balanced cross-entropy (CB softmax) needs no class of its own:
    ``torch.nn.CrossEntropyLoss(weight=class_balanced_weights(class_counts, beta))``.

    >>> import torch
    >>> loss_fn = CBFocalLoss([500, 50, 5], beta=0.999, gamma=1.0)
    >>> loss_fn.weight.argmax().item()   # the rarest class gets the largest weight
    2
    >>> loss_fn(torch.randn(4, 3), torch.tensor([0, 1, 2, 1])).shape
    torch.Size([])
    """

    def __init__(self, class_counts: Sequence[int] | Tensor, beta: float = 0.9999, gamma: float = 1.0,
                 loss_type: str = "softmax", reduction: str = "mean") -> None:
        super().__init__()
        counts = as_class_counts(class_counts)
        if loss_type not in FOCAL_TYPES:
            raise unknown_name("loss_type", loss_type, FOCAL_TYPES)
        self.num_classes = counts.numel()
        self.beta = float(beta)
        self.gamma = _check_gamma(gamma)
        self.loss_type = loss_type
        self.reduction = check_reduction(reduction)
        self.register_buffer("weight", class_balanced_weights(counts, self.beta), persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_logits(logits, self.num_classes, "CBFocalLoss")
        targets = check_targets(targets, logits, "CBFocalLoss")
        dtype = compute_dtype(logits)
        weight = weight_for(self.weight, logits, dtype, "CBFocalLoss")
        per_sample = _softmax_focal if self.loss_type == "softmax" else _sigmoid_focal
        losses = per_sample(logits.to(dtype), targets, self.gamma)
        return reduce_weighted(losses, targets, weight, self.reduction)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, beta={self.beta:g}, gamma={self.gamma:g}, "
                f"loss_type={self.loss_type!r}, reduction={self.reduction!r}")

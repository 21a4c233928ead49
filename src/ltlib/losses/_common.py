"""Input checks and the weighted reduction shared by the losses in :mod:`ltlib.losses`.

Every check here looks only at shapes and dtypes, so none of them forces a device-to-host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ltlib.errors import LtlibError, unknown_name

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is ``"mean"``, ``"sum"`` or ``"none"``, else raise."""
    if reduction not in REDUCTIONS:
        raise unknown_name("reduction", reduction, REDUCTIONS)
    return reduction


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a loss is computed in: at least float32 (half-precision logits are upcast)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_logits(logits: Tensor, num_classes: int | None, owner: str) -> None:
    """``logits`` must be a floating ``[B, C]`` tensor; ``C`` must equal ``num_classes`` when given."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {_shape(logits)} {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise LtlibError(f"{owner}: logits must be a floating tensor of shape [batch, classes]; got {got}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise LtlibError(
            f"{owner}: logits have {logits.shape[1]} classes (shape {_shape(logits)}) but class_counts has "
            f"{num_classes} entries; they must match"
        )


def check_targets(targets: Tensor, logits: Tensor, owner: str) -> Tensor:
    """``targets`` must be integer class indices of shape ``[B]``; return them as int64."""
    if not isinstance(targets, Tensor):
        raise LtlibError(f"{owner}: targets must be a tensor of class indices; got {type(targets).__name__}")
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LtlibError(
            f"{owner}: targets must be integer class indices of shape [batch]; got shape {_shape(targets)} "
            f"{targets.dtype} (for soft targets use SoftTargetCrossEntropy)"
        )
    if targets.shape[0] != logits.shape[0]:
        raise LtlibError(
            f"{owner}: targets hold {targets.shape[0]} labels but logits hold {logits.shape[0]} samples"
        )
    return targets.long()


def prepare_weight(weight: Tensor | Sequence[float] | None, num_classes: int | None, owner: str) -> Tensor | None:
    """Validate per-class weights once, at construction: 1-D, finite, non-negative, one per class."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    if w.dim() != 1 or w.numel() == 0:
        raise LtlibError(f"{owner}: weight must be a 1-D tensor with one weight per class; got shape {_shape(w)}")
    if num_classes is not None and w.numel() != num_classes:
        raise LtlibError(f"{owner}: weight has {w.numel()} entries but there are {num_classes} classes")
    if not torch.isfinite(w).all() or (w < 0).any():
        bad = [v for v in w.tolist() if not 0 <= v < float("inf")]
        raise LtlibError(f"{owner}: weight must be finite and non-negative; got {bad[:5]} among them")
    return w


def weight_for(weight: Tensor | None, logits: Tensor, dtype: torch.dtype, owner: str) -> Tensor | None:
    """Per-class weights moved to the logits' device and ``dtype``; checks the length (no sync)."""
    if weight is None:
        return None
    if weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
        raise LtlibError(
            f"{owner}: weight has shape {_shape(weight)} but logits have {logits.shape[1]} classes; "
            f"expected shape [{logits.shape[1]}]"
        )
    return weight.to(device=logits.device, dtype=dtype)


def reduce_weighted(losses: Tensor, targets: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Reduce per-sample losses ``l_i`` the way ``F.cross_entropy(weight=w)`` does.

    ``"none"`` returns ``w_{y_i} l_i``, ``"sum"`` returns ``sum_i w_{y_i} l_i`` and ``"mean"`` the
    weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (the plain mean when ``weight`` is None).
    """
    if weight is None:
        if reduction == "none":
            return losses
        return losses.sum() if reduction == "sum" else losses.mean()
    sample_weight = weight[targets]
    weighted = sample_weight * losses
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / sample_weight.sum()

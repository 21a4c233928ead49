"""Per-class loss weights computed from training counts.

Both helpers return a float tensor of shape ``[C]`` normalised so that the weights sum to ``C``
(the convention of LDAM-DRW's and Cui et al.'s code, which keeps the loss scale comparable with
unweighted cross-entropy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ltlib.errors import LtlibError


def as_class_counts(class_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Validate per-class training counts and return them as a float64 tensor."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0:
        raise LtlibError("class_counts is empty; expected one training count per class")
    if not torch.isfinite(counts).all() or (counts <= 0).any():
        bad = [c for c in counts.tolist() if not c > 0]
        raise LtlibError(f"class_counts must be positive for every class; got {bad[:5]} among them")
    return counts


def inverse_frequency_weights(class_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Weights proportional to 1 / N_c (BBN section 3, "re-weighting"), summing to C."""
    counts = as_class_counts(class_counts)
    weights = 1.0 / counts
    return (weights * counts.numel() / weights.sum()).float()


def class_balanced_weights(class_counts: Sequence[int] | torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Weights proportional to (1 - beta) / (1 - beta^N_c), the inverse effective number of samples
    (Cui et al., CVPR 2019, eq. 4), summing to C. ``beta`` must lie in [0, 1)."""
    if not 0.0 <= beta < 1.0:
        raise LtlibError(f"beta={beta!r} is out of range; allowed: [0, 1)")
    counts = as_class_counts(class_counts)
    effective_num = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts)
    weights = (1.0 - beta) / effective_num
    return (weights * counts.numel() / weights.sum()).float()

"""Independent NumPy references for the loss tests: explicit log-sum-exp loops and the weighted reductions
(``sum w_y l / sum w_y`` for mean, as ``F.cross_entropy(weight=...)``), written without torch."""

from __future__ import annotations

import math

import numpy as np


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax with an explicit log-sum-exp loop."""
    out = np.empty_like(np.asarray(z, dtype=np.float64))
    for i, row in enumerate(z):
        m = max(row)
        out[i] = np.asarray(row) - (m + math.log(sum(math.exp(v - m) for v in row)))
    return out


def np_softmax_row(row: np.ndarray) -> np.ndarray:
    m = max(row)
    e = np.array([math.exp(v - m) for v in row])
    return e / e.sum()


def np_reduce(losses: np.ndarray, y: np.ndarray, weight: np.ndarray | None, reduction: str):
    """Per-sample losses weighted by their class's weight, reduced as ``F.cross_entropy`` does."""
    w = np.ones(len(losses)) if weight is None else np.array([weight[t] for t in y])
    if reduction == "none":
        return w * losses
    if reduction == "sum":
        return (w * losses).sum()
    return (w * losses).sum() / w.sum()


def np_cross_entropy(adjusted: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None,
                     reduction: str = "mean"):
    """Cross-entropy of already-adjusted logits (margins, priors, stimuli applied by the caller)."""
    logp = np_log_softmax(adjusted)
    return np_reduce(np.array([-logp[i, t] for i, t in enumerate(y)]), y, weight, reduction)

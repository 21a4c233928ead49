"""Independent NumPy references for the loss tests: explicit log-sum-exp loops and the weighted reductions
(``sum w_y l / sum w_y`` for mean, as ``F.cross_entropy(weight=...)``), written without torch; and the
official codes' focal losses written from their formulas (LDAM-DRW's ``losses.py``, Cui et al.'s
``src/cifar_main.py``), not from ltlib's."""

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


def np_class_balanced_weights(counts, beta: float) -> np.ndarray:
    """LDAM-DRW's ``--train_rule Reweight`` / Cui et al.'s weights: ``(1 - beta) / (1 - beta^n)``, summing to C."""
    effective_num = 1.0 - np.power(beta, np.asarray(counts, dtype=np.float64))
    w = (1.0 - beta) / effective_num
    return w / w.sum() * len(counts)


def np_ldam_code_focal(z: np.ndarray, y: np.ndarray, gamma: float, weight: np.ndarray | None = None) -> float:
    """LDAM-DRW's ``FocalLoss(weight, gamma)``: ``ce = F.cross_entropy(z, y, reduction='none', weight=w)``
    (``w_y * -log softmax(z)_y``), ``p = exp(-ce)``, ``((1 - p)^gamma * ce).mean()`` over the batch."""
    logp = np_log_softmax(z)
    w = np.ones(np.asarray(z).shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    ce = np.array([-w[t] * logp[i, t] for i, t in enumerate(y)])
    p = np.exp(-ce)
    return float(((1.0 - p) ** gamma * ce).mean())


def np_cui_sigmoid_focal(z: np.ndarray, y: np.ndarray, gamma: float, weight: np.ndarray) -> float:
    """Cui et al.'s ``focal_loss(labels, logits, alpha, gamma)`` (``src/cifar_main.py``), TensorFlow's formulas:
    ``sigmoid_cross_entropy_with_logits = max(z, 0) - z * t + log(1 + exp(-|z|))``, modulator
    ``exp(-gamma * t * z - gamma * log(1 + exp(-z)))`` (1 when gamma = 0), ``alpha = w_y`` on every class of a
    sample, the sum of ``alpha * modulator * ce`` divided by the sum of the one-hot labels."""
    z = np.asarray(z, dtype=np.float64)
    labels = np.zeros_like(z)
    labels[np.arange(len(y)), y] = 1.0
    ce = np.maximum(z, 0.0) - z * labels + np.log1p(np.exp(-np.abs(z)))
    modulator = 1.0 if gamma == 0.0 else np.exp(-gamma * labels * z - gamma * np.log1p(np.exp(-z)))
    alpha = np.asarray(weight, dtype=np.float64)[np.asarray(y)][:, None] * np.ones_like(z)
    return float((alpha * modulator * ce).sum() / labels.sum())

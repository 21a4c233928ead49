"""LogitAdjustedLoss and posthoc_logit_adjustment against Menon et al.'s formulas in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.losses.reference import np_cross_entropy

from ltlib.errors import LtlibError
from ltlib.losses import LogitAdjustedLoss, log_class_priors, posthoc_logit_adjustment

COUNTS = [600, 150, 40, 10, 1]
REDUCTIONS = ["mean", "sum", "none"]


def np_log_priors(counts):
    total = float(sum(counts))
    return np.array([math.log(n / total) for n in counts])


def np_la_loss(z, y, counts, tau, weight=None, reduction="mean"):
    log_pi = np_log_priors(counts)
    adjusted = np.array([[v + tau * log_pi[c] for c, v in enumerate(row)] for row in z])
    return np_cross_entropy(adjusted, y, weight, reduction)


def _batch(num_classes: int, batch: int = 14, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return logits, targets


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_formula(tau: float, reduction: str, weighted: bool) -> None:
    logits, targets = _batch(len(COUNTS))
    weight = np.array([0.3, 0.6, 1.0, 1.7, 2.4]) if weighted else None
    loss_fn = LogitAdjustedLoss(COUNTS, tau=tau, reduction=reduction,
                                weight=None if weight is None else torch.tensor(weight))
    got = loss_fn(logits, targets)
    want = np_la_loss(logits.numpy(), targets.numpy(), COUNTS, tau, weight, reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_tau_zero_and_equal_counts_are_cross_entropy() -> None:
    logits, targets = _batch(len(COUNTS))
    torch.testing.assert_close(LogitAdjustedLoss(COUNTS, tau=0.0)(logits, targets), F.cross_entropy(logits, targets))
    torch.testing.assert_close(LogitAdjustedLoss([7] * 5)(logits, targets), F.cross_entropy(logits, targets))


def test_posthoc_adjustment() -> None:
    logits, _ = _batch(len(COUNTS))
    for tau in (0.0, 1.0, 1.5):
        got = posthoc_logit_adjustment(logits, COUNTS, tau=tau)
        want = logits.numpy() - tau * np_log_priors(COUNTS)[None, :]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_class_priors(COUNTS).numpy(), np_log_priors(COUNTS), rtol=1e-6)
    # equal raw logits: the adjusted prediction is the rarest class
    assert posthoc_logit_adjustment(torch.zeros(1, 5), COUNTS).argmax().item() == 4
    # a head-class win by a small margin flips to the tail class
    assert posthoc_logit_adjustment(torch.tensor([[1.0, 0.5]]), [900, 100]).argmax().item() == 1


def test_one_class_and_one_image() -> None:
    logits, targets = _batch(1)
    loss = LogitAdjustedLoss([5])(logits, targets)
    assert torch.isfinite(loss) and loss.item() == 0.0
    logits, targets = _batch(3)
    got = LogitAdjustedLoss([1000, 10, 1])(logits, targets)
    np.testing.assert_allclose(got.item(), np_la_loss(logits.numpy(), targets.numpy(), [1000, 10, 1], 1.0),
                               rtol=1e-6)


def test_gradient() -> None:
    logits, targets = _batch(len(COUNTS), batch=4)
    loss_fn = LogitAdjustedLoss(COUNTS, tau=1.0)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, targets), (logits.requires_grad_(True),))


def test_errors() -> None:
    with pytest.raises(LtlibError, match=r"tau=-1\.0 .*\[0, inf\)"):
        LogitAdjustedLoss(COUNTS, tau=-1.0)
    with pytest.raises(LtlibError, match=r"tau=-0\.5"):
        posthoc_logit_adjustment(torch.zeros(2, 5), COUNTS, tau=-0.5)
    with pytest.raises(LtlibError, match=r"logits have 3 classes .* class_counts has 5 entries"):
        posthoc_logit_adjustment(torch.zeros(2, 3), COUNTS)
    with pytest.raises(LtlibError, match=r"class_counts must be positive .*0\.0"):
        LogitAdjustedLoss([10, 0, 3])
    logits, targets = _batch(4)
    with pytest.raises(LtlibError, match=r"logits have 4 classes"):
        LogitAdjustedLoss(COUNTS)(logits, targets)

"""SoftTargetCrossEntropy against -sum q log softmax(z) written out in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltlib.errors import LtlibError
from ltlib.losses import SoftTargetCrossEntropy

REDUCTIONS = ["mean", "sum", "none"]


def np_soft_ce(z, q, reduction):
    losses = []
    for row, target in zip(z, q, strict=True):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        losses.append(-sum(qc * (v - lse) for qc, v in zip(target, row, strict=True)))
    losses = np.array(losses)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def _batch(batch: int = 10, num_classes: int = 6, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * 2
    soft = torch.rand(batch, num_classes, generator=g, dtype=torch.float64)
    return logits, soft / soft.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_formula(reduction: str) -> None:
    logits, soft = _batch()
    got = SoftTargetCrossEntropy(reduction)(logits, soft)
    np.testing.assert_allclose(got.numpy(), np_soft_ce(logits.numpy(), soft.numpy(), reduction), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_hot_targets_are_cross_entropy(reduction: str) -> None:
    logits, _ = _batch()
    labels = torch.randint(0, 6, (10,), generator=torch.Generator().manual_seed(5))
    got = SoftTargetCrossEntropy(reduction)(logits, F.one_hot(labels, 6).double())
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction=reduction))


def test_mixup_targets_equal_mixed_cross_entropy() -> None:
    logits, _ = _batch()
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 6, (10,), generator=g), torch.randint(0, 6, (10,), generator=g)
    lam = 0.3
    q = lam * F.one_hot(a, 6).double() + (1 - lam) * F.one_hot(b, 6).double()
    want = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, q), want)


def test_gradient_is_softmax_minus_target() -> None:
    logits, soft = _batch()
    logits.requires_grad_(True)
    SoftTargetCrossEntropy()(logits, soft).backward()
    want = (torch.softmax(logits.detach(), dim=1) - soft) / logits.shape[0]
    torch.testing.assert_close(logits.grad, want)


def test_one_class() -> None:
    loss = SoftTargetCrossEntropy()(torch.randn(3, 1), torch.ones(3, 1))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_errors() -> None:
    logits, soft = _batch()
    with pytest.raises(LtlibError, match=r"shaped like the logits \[10, 6\]; got shape \[10, 5\]"):
        SoftTargetCrossEntropy()(logits, soft[:, :5])
    with pytest.raises(LtlibError, match=r"got shape \[10\] torch.int64"):
        SoftTargetCrossEntropy()(logits, torch.zeros(10, dtype=torch.long))
    with pytest.raises(LtlibError, match=r"unknown reduction 'batchmean'"):
        SoftTargetCrossEntropy("batchmean")

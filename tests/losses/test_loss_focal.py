"""FocalLoss and CBFocalLoss against Lin et al.'s and Cui et al.'s formulas written out in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.losses.reference import (
    np_class_balanced_weights,
    np_cui_sigmoid_focal,
    np_ldam_code_focal,
    np_reduce,
    np_softmax_row,
)

from ltlib.errors import LtlibError
from ltlib.losses import CBFocalLoss, FocalLoss, LDAMCodeFocalLoss, class_balanced_weights

COUNTS = [400, 120, 40, 9, 1]
REDUCTIONS = ["mean", "sum", "none"]


def np_focal(z, y, gamma, weight=None, reduction="mean"):
    """Lin et al.: -(1 - p_t)^gamma log p_t with softmax p_t, per-class weight w_y."""
    losses = []
    for row, t in zip(z, y, strict=True):
        pt = np_softmax_row(row)[t]
        losses.append(-((1 - pt) ** gamma) * math.log(pt))
    return np_reduce(np.array(losses), y, weight, reduction)


def np_sigmoid_focal(z, y, gamma):
    """Cui et al.'s one-vs-all focal loss: sum over classes of -(1 - p^t)^gamma log p^t."""
    losses = []
    for row, t in zip(z, y, strict=True):
        total = 0.0
        for c, v in enumerate(row):
            p = 1 / (1 + math.exp(-v))
            pt = p if c == t else 1 - p
            total += -((1 - pt) ** gamma) * math.log(pt)
        losses.append(total)
    return np.array(losses)


def np_cb_weights(counts, beta):
    n = np.asarray(counts, dtype=np.float64)
    w = (1 - beta) / (1 - beta ** n)
    return w / w.sum() * len(counts)


def _batch(num_classes: int, batch: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return logits, targets


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_matches_formula(gamma: float, reduction: str, weighted: bool) -> None:
    logits, targets = _batch(5)
    weight = np.array([0.1, 0.4, 1.0, 2.0, 3.5]) if weighted else None
    loss_fn = FocalLoss(gamma=gamma, weight=None if weight is None else torch.tensor(weight), reduction=reduction)
    got = loss_fn(logits, targets)
    want = np_focal(logits.numpy(), targets.numpy(), gamma, weight, reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma_zero_is_cross_entropy(reduction: str) -> None:
    logits, targets = _batch(5)
    weight = torch.tensor([0.1, 0.4, 1.0, 2.0, 3.5], dtype=torch.float64)
    torch.testing.assert_close(FocalLoss(0.0, reduction=reduction)(logits, targets),
                               F.cross_entropy(logits, targets, reduction=reduction))
    torch.testing.assert_close(FocalLoss(0.0, weight=weight, reduction=reduction)(logits, targets),
                               F.cross_entropy(logits, targets, weight=weight, reduction=reduction))


def test_focal_down_weights_easy_samples() -> None:
    logits, targets = _batch(5)
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = FocalLoss(2.0, reduction="none")(logits, targets)
    assert (focal <= ce).all() and (focal < ce).any()


def test_focal_saturated_probability_has_finite_gradient() -> None:
    logits = torch.tensor([[200.0, -200.0, 0.0], [0.3, 0.1, -0.2]], requires_grad=True)
    targets = torch.tensor([0, 2])
    for gamma in (0.25, 1.0, 2.0):
        logits.grad = None
        loss = FocalLoss(gamma)(logits, targets)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_gradient_matches_finite_differences() -> None:
    logits, targets = _batch(4, batch=5)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    loss_fn = FocalLoss(1.5, weight=weight)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, targets), (logits.requires_grad_(True),))


def test_focal_one_class_is_zero() -> None:
    logits, targets = _batch(1)
    loss = FocalLoss(1.0)(logits, targets)
    assert torch.isfinite(loss) and loss.item() == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cb_focal_softmax_is_focal_with_cb_weights(reduction: str) -> None:
    logits, targets = _batch(5)
    beta, gamma = 0.999, 1.0
    got = CBFocalLoss(COUNTS, beta=beta, gamma=gamma, reduction=reduction)(logits, targets)
    want = np_focal(logits.numpy(), targets.numpy(), gamma, np_cb_weights(COUNTS, beta), reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    same = FocalLoss(gamma, weight=class_balanced_weights(COUNTS, beta), reduction=reduction)(logits, targets)
    torch.testing.assert_close(got, same)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cb_focal_sigmoid_matches_cui(gamma: float, reduction: str) -> None:
    logits, targets = _batch(5)
    beta = 0.9999
    w = np_cb_weights(COUNTS, beta)
    got = CBFocalLoss(COUNTS, beta=beta, gamma=gamma, loss_type="sigmoid", reduction=reduction)(logits, targets)
    per_sample = np_sigmoid_focal(logits.numpy(), targets.numpy(), gamma)
    np.testing.assert_allclose(got.numpy(), np_reduce(per_sample, targets.numpy(), w, reduction),
                               rtol=1e-6, atol=1e-7)
    if reduction == "none":
        # Cui et al.'s code: sum of weighted terms divided by the number of positives (the batch size)
        cui = sum(w[t] * v for t, v in zip(targets.numpy(), per_sample, strict=True)) / len(targets)
        np.testing.assert_allclose(got.mean().item(), cui, rtol=1e-6)


# CIFAR-10-LT, imbalance ratio 100 (n_c = 5000 * 0.01^(c / 9)), and a batch of 128 drawn from it, as the
# official codes train: most samples from the head classes, whose class-balanced weights are small.
CIFAR10_LT_100 = [int(5000 * 0.01 ** (c / 9)) for c in range(10)]


def _long_tailed_batch(batch: int = 128, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prior = torch.tensor(CIFAR10_LT_100, dtype=torch.float64)
    targets = torch.multinomial(prior / prior.sum(), batch, replacement=True, generator=g)
    return torch.randn(batch, 10, generator=g, dtype=torch.float64) * 3, targets


def test_ldam_code_focal_on_a_batch_of_128_is_ldam_drws_cb_focal() -> None:
    """LDAM-DRW's ``--loss_type Focal --train_rule Reweight``: CB weights (beta 0.9999, sum C), factor from
    the weighted CE, plain batch mean. The weighted mean differs from it by exactly sum_i w_{y_i} / B."""
    logits, targets = _long_tailed_batch()
    w = np_class_balanced_weights(CIFAR10_LT_100, 0.9999)
    np.testing.assert_allclose(class_balanced_weights(CIFAR10_LT_100, 0.9999).numpy(), w, rtol=1e-6)
    weight = torch.tensor(w)
    want = np_ldam_code_focal(logits.numpy(), targets.numpy(), 1.0, w)
    got = LDAMCodeFocalLoss(1.0, weight=weight, reduction="none")(logits, targets).mean()
    assert got.item() == pytest.approx(want, rel=1e-6)
    factor = w[targets.numpy()].sum() / len(targets)
    assert factor < 0.5  # a long-tailed batch: the weighted mean is more than twice the batch mean
    weighted_mean = LDAMCodeFocalLoss(1.0, weight=weight)(logits, targets)
    assert weighted_mean.item() == pytest.approx(want / factor, rel=1e-6)
    # ltlib's former cb_focal (Lin et al.'s factor, weighted mean) is neither.
    former = FocalLoss(1.0, weight=weight)(logits, targets).item()
    assert former != pytest.approx(want, rel=0.05) and former != pytest.approx(want / factor, rel=1e-3)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_cb_focal_sigmoid_on_a_batch_of_128_is_cuis_tensorflow_loss(gamma: float) -> None:
    logits, targets = _long_tailed_batch()
    w = np_class_balanced_weights(CIFAR10_LT_100, 0.9999)
    want = np_cui_sigmoid_focal(logits.numpy(), targets.numpy(), gamma, w)
    loss_fn = CBFocalLoss(CIFAR10_LT_100, beta=0.9999, gamma=gamma, loss_type="sigmoid", reduction="none")
    assert loss_fn(logits, targets).mean().item() == pytest.approx(want, rel=1e-6)


def test_ldam_code_focal_without_weights_is_lin_and_gamma_below_one_has_finite_gradient() -> None:
    logits, targets = _batch(5)
    for gamma in (0.0, 1.0, 2.0):
        torch.testing.assert_close(LDAMCodeFocalLoss(gamma)(logits, targets), FocalLoss(gamma)(logits, targets))
        assert LDAMCodeFocalLoss(gamma)(logits, targets).item() == pytest.approx(
            np_ldam_code_focal(logits.numpy(), targets.numpy(), gamma), rel=1e-9)
    z = torch.tensor([[300.0, -300.0, 0.0], [0.3, 0.1, -0.2]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)  # a zero weight gives w_y CE = 0 exactly
    loss = LDAMCodeFocalLoss(0.5, weight=weight, reduction="sum")(z, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_cb_weights_favour_the_tail() -> None:
    w = CBFocalLoss(COUNTS).weight
    assert (w[1:] > w[:-1]).all()
    assert w.sum().item() == pytest.approx(len(COUNTS))


def test_focal_errors() -> None:
    with pytest.raises(LtlibError, match=r"gamma=-0\.5 .*\[0, inf\)"):
        FocalLoss(-0.5)
    with pytest.raises(LtlibError, match=r"gamma=-1\.0"):
        CBFocalLoss(COUNTS, gamma=-1.0)
    with pytest.raises(LtlibError, match=r"unknown loss_type 'hinge'; available: sigmoid, softmax"):
        CBFocalLoss(COUNTS, loss_type="hinge")
    with pytest.raises(LtlibError, match=r"beta=1\.5"):
        CBFocalLoss(COUNTS, beta=1.5)
    logits, targets = _batch(4)
    with pytest.raises(LtlibError, match=r"logits have 4 classes .* class_counts has 5 entries"):
        CBFocalLoss(COUNTS)(logits, targets)
    with pytest.raises(LtlibError, match=r"weight has shape \[5\] but logits have 4 classes"):
        FocalLoss(weight=torch.ones(5))(logits, targets)
    with pytest.raises(LtlibError, match=r"targets must be integer class indices .*shape \[12, 4\]"):
        FocalLoss()(logits, F.one_hot(targets, 4).double())

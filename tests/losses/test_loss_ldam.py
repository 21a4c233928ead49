"""LDAMLoss and NormedLinear against Cao et al.'s formulas written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.losses.reference import np_cross_entropy

from ltlib.errors import LtlibError
from ltlib.losses import LDAMLoss, NormedLinear, ldam_margins

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
REDUCTIONS = ["mean", "sum", "none"]


def np_margins(counts, max_margin):
    raw = np.array([1.0 / n ** 0.25 for n in counts])
    return raw * (max_margin / raw.max())


def np_ldam(z, y, counts, max_margin, scale, weight=None, reduction="mean"):
    margins = np_margins(counts, max_margin)
    adjusted = np.array([[scale * (v - margins[t]) if c == t else scale * v for c, v in enumerate(row)]
                         for row, t in zip(z, y, strict=True)])
    return np_cross_entropy(adjusted, y, weight, reduction)


def _cosine_batch(num_classes: int, batch: int = 16, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(batch, num_classes, generator=g, dtype=torch.float64) * 2 - 1
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return logits, targets


def test_margins() -> None:
    margins = ldam_margins(COUNTS, max_margin=0.5)
    assert margins.max().item() == pytest.approx(0.5)
    assert margins[-1].item() == pytest.approx(0.5)              # the rarest class has the max margin
    assert (margins[1:] > margins[:-1]).all()                    # tail > head
    np.testing.assert_allclose(margins.numpy(), np_margins(COUNTS, 0.5), rtol=1e-6)
    # Delta_j * n_j^{1/4} is the same constant C for every class
    products = margins.double().numpy() * np.asarray(COUNTS, dtype=np.float64) ** 0.25
    np.testing.assert_allclose(products, products[0], rtol=1e-6)
    assert LDAMLoss(COUNTS, max_margin=0.3).margins.max().item() == pytest.approx(0.3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_ldam_matches_formula(reduction: str, weighted: bool) -> None:
    logits, targets = _cosine_batch(len(COUNTS))
    weight = np.linspace(0.2, 4.0, len(COUNTS)) if weighted else None
    loss_fn = LDAMLoss(COUNTS, max_margin=0.5, scale=30.0, reduction=reduction,
                       weight=None if weight is None else torch.tensor(weight))
    got = loss_fn(logits, targets)
    want = np_ldam(logits.numpy(), targets.numpy(), COUNTS, 0.5, 30.0, weight, reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_margin_only_on_target_logit() -> None:
    logits, targets = _cosine_batch(len(COUNTS), batch=4)
    zero_margin = LDAMLoss(COUNTS, max_margin=0.0, scale=10.0)
    torch.testing.assert_close(zero_margin(logits, targets), F.cross_entropy(10.0 * logits, targets))
    # a margin makes every sample's loss larger than plain scaled CE
    with_margin = LDAMLoss(COUNTS, scale=10.0, reduction="none")(logits, targets)
    assert (with_margin > F.cross_entropy(10.0 * logits, targets, reduction="none")).all()


def test_ldam_one_class_and_one_image() -> None:
    logits, targets = _cosine_batch(1)
    loss = LDAMLoss([3])(logits, targets)
    assert torch.isfinite(loss) and loss.item() == 0.0
    logits, targets = _cosine_batch(3)
    loss = LDAMLoss([1000, 30, 1])(logits, targets)
    want = np_ldam(logits.numpy(), targets.numpy(), [1000, 30, 1], 0.5, 30.0)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)


def test_ldam_gradient() -> None:
    logits, targets = _cosine_batch(len(COUNTS), batch=5)
    loss_fn = LDAMLoss(COUNTS, scale=5.0, weight=torch.linspace(0.5, 2, len(COUNTS)))
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, targets), (logits.requires_grad_(True),))


def test_normed_linear_is_cosine_similarity() -> None:
    torch.manual_seed(0)
    head = NormedLinear(8, 5)
    assert head.weight.shape == (5, 8)
    torch.testing.assert_close(torch.linalg.vector_norm(head.weight, dim=1), torch.ones(5))
    x = torch.randn(6, 8, requires_grad=True)
    out = head(x)
    xn, wn = x.detach().numpy(), head.weight.detach().numpy()
    want = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in wn] for a in xn])
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    # scaling inputs or weights does not change cosine logits
    torch.testing.assert_close(head(3.0 * x), out)
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    assert "in_features=8, out_features=5" in repr(head)


def test_ldam_errors() -> None:
    with pytest.raises(LtlibError, match=r"max_margin=-0\.1"):
        LDAMLoss(COUNTS, max_margin=-0.1)
    with pytest.raises(LtlibError, match=r"scale=0\.0 .*\(0, inf\)"):
        LDAMLoss(COUNTS, scale=0.0)
    with pytest.raises(LtlibError, match=r"class_counts must be positive .*-5\.0"):
        LDAMLoss([10, -5])
    logits, targets = _cosine_batch(4)
    with pytest.raises(LtlibError, match=r"logits have 4 classes .* class_counts has 10 entries"):
        LDAMLoss(COUNTS)(logits, targets)
    with pytest.raises(LtlibError, match=r"in_features=0"):
        NormedLinear(0, 3)
    with pytest.raises(LtlibError, match=r"out_features=2\.5"):
        NormedLinear(4, 2.5)

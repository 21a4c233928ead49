"""What every loss in ltlib.losses shares: exports, reductions, weights, count validation, doctests.
(Every registered loss built by name through the registry: test_loss_registry.py.)"""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ltlib.losses as losses
from ltlib.errors import LtlibError

COUNTS = [300, 60, 12, 2]
MODULES = ["base", "feature_balanced", "focal", "ldam", "logit_adjustment", "registry", "soft_target", "weights"]

_FEATURES = torch.randn(8, 5).abs()


def _call(loss_fn, logits, targets):
    if isinstance(loss_fn, losses.FeatureBalancedLoss):
        loss_fn.set_progress(0.5)
        return loss_fn(logits, targets, _FEATURES)
    if isinstance(loss_fn, losses.SoftTargetCrossEntropy):
        return loss_fn(logits, F.one_hot(targets, logits.shape[1]).float())
    return loss_fn(logits, targets)


# name -> constructor taking class counts and keyword arguments
COUNTED = {
    "FeatureBalancedLoss": lambda counts, **kw: losses.FeatureBalancedLoss(counts, **kw),
    "LDAMLoss": lambda counts, **kw: losses.LDAMLoss(counts, **kw),
    "LogitAdjustedLoss": lambda counts, **kw: losses.LogitAdjustedLoss(counts, **kw),
    "CBFocalLoss": lambda counts, **kw: losses.CBFocalLoss(counts, **kw),
}
ALL = {
    **COUNTED,
    "FocalLoss": lambda counts, **kw: losses.FocalLoss(**kw),
    "SigmoidFocalLoss": lambda counts, **kw: losses.SigmoidFocalLoss(**kw),
    "LDAMCodeFocalLoss": lambda counts, **kw: losses.LDAMCodeFocalLoss(**kw),
    "WeightedCrossEntropy": lambda counts, **kw: losses.WeightedCrossEntropy(**kw),
    "SoftTargetCrossEntropy": lambda counts, **kw: losses.SoftTargetCrossEntropy(**kw),
}


def test_exports() -> None:
    for name in ("FeatureBalancedLoss", "FocalLoss", "CBFocalLoss", "LDAMLoss", "NormedLinear",
                 "LogitAdjustedLoss", "posthoc_logit_adjustment", "SoftTargetCrossEntropy",
                 "inverse_frequency_weights", "class_balanced_weights", "LongTailLoss", "REDUCTIONS",
                 "SigmoidFocalLoss", "WeightedCrossEntropy", "LDAMCodeFocalLoss", "AdjustedCrossEntropyLoss",
                 "create_loss", "list_losses", "loss_options", "register_loss"):
        assert name in losses.__all__ and hasattr(losses, name)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"ltlib.losses.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_reductions(name: str) -> None:
    logits, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    none = _call(ALL[name](COUNTS, reduction="none"), logits, targets)
    assert none.shape == (8,)
    torch.testing.assert_close(_call(ALL[name](COUNTS, reduction="sum"), logits, targets), none.sum())
    torch.testing.assert_close(_call(ALL[name](COUNTS, reduction="mean"), logits, targets), none.mean())
    assert torch.equal(_call(ALL[name](COUNTS, reduction="batch_mean"), logits, targets), none.mean())
    with pytest.raises(LtlibError, match=r"unknown reduction 'elementwise_mean'; available: batch_mean, mean, none, sum"):
        ALL[name](COUNTS, reduction="elementwise_mean")


@pytest.mark.parametrize("name", ["FeatureBalancedLoss", "LDAMLoss", "LogitAdjustedLoss", "FocalLoss",
                                  "SigmoidFocalLoss", "WeightedCrossEntropy"])
def test_weighted_mean_is_like_cross_entropy(name: str) -> None:
    """reduction="mean" with weights is sum_i w_{y_i} l_i / sum_i w_{y_i}, as in F.cross_entropy."""
    logits, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 3, 3, 1, 0])
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0])
    unweighted = _call(ALL[name](COUNTS, reduction="none"), logits, targets)
    weighted_none = _call(ALL[name](COUNTS, weight=weight, reduction="none"), logits, targets)
    torch.testing.assert_close(weighted_none, weight[targets] * unweighted)
    weighted_mean = _call(ALL[name](COUNTS, weight=weight), logits, targets)
    torch.testing.assert_close(weighted_mean, (weight[targets] * unweighted).sum() / weight[targets].sum())


@pytest.mark.parametrize("name", sorted(COUNTED))
@pytest.mark.parametrize(("counts", "bad"), [([300, 0, 12], "0.0"), ([300, -4, 12], "-4.0"), ([], "empty")])
def test_bad_counts(name: str, counts: list[int], bad: str) -> None:
    with pytest.raises(LtlibError, match="class_counts") as excinfo:
        COUNTED[name](counts)
    assert bad in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_counts_accept_tensors_and_numpy(name: str) -> None:
    logits, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    from_list = _call(COUNTED[name](COUNTS), logits, targets)
    torch.testing.assert_close(_call(COUNTED[name](torch.tensor(COUNTS)), logits, targets), from_list)
    torch.testing.assert_close(_call(COUNTED[name](np.array(COUNTS)), logits, targets), from_list)


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_module_moves_and_has_empty_state_dict(name: str) -> None:
    loss_fn = COUNTED[name](COUNTS).to(torch.float64)
    assert loss_fn.state_dict() == {}
    logits, targets = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    assert torch.isfinite(_call(loss_fn, logits, targets))

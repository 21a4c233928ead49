"""The learning-rate schedule against the recipes' formulas, and OptimConfig validation."""

import math

import pytest

from ltlib.errors import LtlibError
from ltlib.methods import OptimConfig


def test_cifar_recipe_warmup_then_two_decays():
    cfg = OptimConfig(lr=0.1, warmup_epochs=5, milestones=[120, 160], decay_factor=0.01)
    spe, epochs = 10, 200
    # per-step linear warm-up from 0: step s of the first 5 epochs has factor (s + 1) / 50
    for step in (0, 7, 49):
        assert cfg.lr_factor(step, spe, epochs) == pytest.approx((step + 1) / 50)
    assert cfg.lr_factor(50, spe, epochs) == pytest.approx(1.0)
    assert cfg.lr_factor(119 * spe + 9, spe, epochs) == pytest.approx(1.0)
    assert cfg.lr_factor(120 * spe, spe, epochs) == pytest.approx(0.01)
    assert cfg.lr_factor(160 * spe, spe, epochs) == pytest.approx(1e-4)
    assert cfg.lr_factor(199 * spe + 9, spe, epochs) == pytest.approx(1e-4)


def test_epoch_wise_warmup_with_start_factor():
    cfg = OptimConfig(warmup_epochs=4, warmup_start_factor=0.2, warmup_per_step=False, milestones=[])
    spe = 3
    for epoch in range(4):
        expected = 0.2 + 0.8 * (epoch + 1) / 4
        assert all(cfg.lr_factor(epoch * spe + i, spe, 10) == pytest.approx(expected) for i in range(spe))


def test_cosine_reaches_min_lr():
    cfg = OptimConfig(lr=0.2, warmup_epochs=0, schedule="cosine", min_lr=0.002)
    spe, epochs = 5, 8
    total = spe * epochs
    for step in (0, 13, 27, total):
        t = step / total
        expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        assert cfg.lr_factor(step, spe, epochs) == pytest.approx(expected)


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("momentum", 1.5), ("decay_factor", 0.0),
                                         ("schedule", "poly"), ("warmup_epochs", -1)])
def test_bad_optim_values_are_one_line_errors(field, value):
    with pytest.raises(LtlibError) as info:
        OptimConfig(**{field: value})
    assert repr(value) in str(info.value) and "\n" not in str(info.value)
